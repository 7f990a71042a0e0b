//! The harness itself: a private etcd starts, serves, restarts and cleans up.
mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn etcd_starts_restarts_and_replaces() {
    let mut etcd = Etcd::start().await;
    let prefix = unique_prefix("harness");
    etcd.put(&format!("{prefix}/a"), "1").await;
    assert_eq!(etcd.get_prefix(&prefix).await.len(), 1);
    etcd.restart().await;
    assert_eq!(
        etcd.get_prefix(&prefix).await.len(),
        1,
        "data survives a restart"
    );
    etcd.restart_empty().await;
    assert!(
        etcd.get_prefix(&prefix).await.is_empty(),
        "fresh cluster is empty"
    );
    // The wait is the assertion: it panics if no put is visible within 5 s.
    wait_until("a put to be visible", Duration::from_secs(5), || async {
        etcd.put(&format!("{prefix}/b"), "2").await;
        etcd.get_prefix(&prefix).await.len() == 1
    })
    .await;
    assert_eq!(
        etcd.get_prefix(&prefix).await,
        vec![(format!("{prefix}/b"), "2".to_string())]
    );
}

#[tokio::test]
async fn test_image_serves_http() {
    let run = unique("harness");
    let c = Container::run(&run, &["-p", "127.0.0.1::8080"], None);
    let port = c.host_port(8080);
    let addr = format!("127.0.0.1:{port}");
    wait_until("busybox httpd to answer", Duration::from_secs(10), || async {
        matches!(http_get(&addr, "x", "/").await, Some((200, body)) if body.trim() == c.short_id())
    })
    .await;
    drop(c);
    remove_labelled(&run);
    assert!(
        try_docker(&["ps", "-q", "--filter", &format!("label={TEST_LABEL}={run}")])
            .unwrap_or_default()
            .is_empty()
    );
}
