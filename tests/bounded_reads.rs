//! A node can write values as large as etcd takes (1.5 MiB by default) under its own
//! prefix. Three of them are more than one gRPC message (4 MiB): a listing that takes
//! them in one page fails, for every watcher, `ls` and `render`, for good. Listings are
//! paged by bytes too, and instance and node values over 64 KiB are refused and named.
mod common;

use std::time::Duration;

use common::haproxy::*;
use common::*;

const T: Duration = Duration::from_secs(30);

/// A valid bare `host:port` padded with blanks to `bytes`: only its size is wrong.
fn padded(addr: &str, bytes: usize) -> String {
    format!("{addr}{}", " ".repeat(bytes - addr.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_1_4_mib_values_under_a_node_prefix_are_named_and_break_no_listing() {
    let mut etcd = Etcd::start().await;
    let good = Backend::start("good").await;
    let mut fd = FrontDoor::prepare(&etcd, Options::default()).await;
    let prefix = fd.prefix.clone();
    let big_key = |i: usize| format!("{prefix}/nodes/web1/services/web/web1-big{i}");
    let big = padded("127.0.0.1:1", 1400 * 1024);
    assert!(big.len() == 1400 * 1024 && big.len() < 1536 * 1024);
    // Before the watcher starts: its first listing meets them.
    for i in 0..3 {
        etcd.put(&big_key(i), &big).await;
    }
    etcd.put(&fd.service_key("web", "ok"), &good.record()).await;
    etcd.put(
        &format!("{prefix}/nodes/web1/services/api/web1-aaaaaaaaaaaa-80"),
        &format!(r#"{{"addr":"{}"}}"#, good.addr),
    )
    .await;
    fd.start_watcher();
    fd.wait_for_first_reload().await;
    for service in ["web", "api"] {
        wait_until(&format!("{service} routed to good"), T, || {
            fd.routes_to(service, "good")
        })
        .await;
    }
    // A fourth, while it watches.
    etcd.put(&big_key(3), &big).await;
    let named = |log: &str, i: usize| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&big_key(i))
                && l.contains(&format!("{} bytes", big.len()))
                && l.contains("64 KiB")
        })
    };
    let all_named = eventually(T, || async {
        let log = fd.log();
        (0..4).all(|i| named(&log, i))
    })
    .await;
    assert!(all_named, "a big key is not named:\n{}", fd.log());
    assert_eq!(fd.metric("portolan_watcher_invalid_keys").await, Some(4.0));
    let cfg = fd.dest_text();
    assert!(!cfg.contains("big"), "{cfg}");
    assert!(
        !fd.log().contains("message length too large"),
        "{}",
        fd.log()
    );

    // The same listing serves `ls` and `render --once`.
    let out = portolan_cmd()
        .args(["--config", "/dev/null", "ls", "--json"])
        .args(["--etcd-endpoints", &etcd.endpoint(), "--prefix", &prefix])
        .output()
        .expect("run ls");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls --json");
    assert_eq!(
        doc["services"]["web"].as_array().map(Vec::len),
        Some(1),
        "{doc}"
    );
    assert_eq!(
        doc["services"]["api"].as_array().map(Vec::len),
        Some(1),
        "{doc}"
    );
    let skipped = doc["skipped"].to_string();
    for i in 0..4 {
        assert!(skipped.contains(&big_key(i)), "{skipped}");
    }
    assert!(skipped.contains("64 KiB"), "{skipped}");
    let out = portolan_cmd()
        .arg("--config")
        .arg(&fd.config)
        .args(["render", "--once", "--dry-run"])
        .output()
        .expect("run render");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A re-list (etcd restarted) meets all four at once: the watcher lists again and
    // keeps routing.
    let resyncs = fd
        .metric("portolan_watcher_resyncs_total")
        .await
        .unwrap_or(0.0);
    etcd.restart().await;
    wait_until("a re-list after the restart", T, || async {
        fd.metric("portolan_watcher_resyncs_total")
            .await
            .is_some_and(|n| n > resyncs)
    })
    .await;
    etcd.put(&fd.service_key("web", "ok2"), &good.record())
        .await;
    wait_until("ok2 rendered", T, || async {
        fd.dest_text().contains("ok2")
    })
    .await;
    assert!(fd.routes_to("api", "good").await);
}

/// Twelve 1.4 MiB values are past even the raised decoder limit (16 MiB) in one page:
/// the listing retries with fewer keys, then sizes its pages from what it read.
#[tokio::test]
async fn a_listing_larger_than_any_one_message_is_read_in_pages_by_bytes() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix("pages");
    let big = padded("127.0.0.1:1", 1400 * 1024);
    let key = |i: usize| format!("{prefix}/nodes/web1/services/web/web1-big{i:02}");
    for i in 0..12 {
        etcd.put(&key(i), &big).await;
    }
    for i in 0..50 {
        etcd.put(
            &format!("{prefix}/services/web/ok{i:02}"),
            &format!("127.0.0.1:{}", 1000 + i),
        )
        .await;
    }
    let out = portolan_cmd()
        .args(["--config", "/dev/null", "ls", "--json"])
        .args(["--etcd-endpoints", &etcd.endpoint(), "--prefix", &prefix])
        .output()
        .expect("run ls");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls --json");
    assert_eq!(
        doc["services"]["web"].as_array().map(Vec::len),
        Some(50),
        "{doc}"
    );
    let skipped = doc["skipped"].to_string();
    for i in 0..12 {
        assert!(skipped.contains(&key(i)), "{skipped}");
    }
}
