//! The registrar's /metrics and /healthz (`[registrar] listen`): Docker event → etcd
//! latency as a histogram, measured from Docker's own event time.
mod common;

use std::time::Duration;

use common::registrar::{Opts, Rig};
use common::*;

const T: Duration = Duration::from_secs(20);

async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_get(addr, "registrar", path).await
}

fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_measure_docker_event_to_etcd() {
    let rig = Rig::new("reg-metrics").await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _registrar = rig.start(&Opts {
        toml: Some(format!("[registrar]\nlisten = \"{addr}\"\n")),
        ..Default::default()
    });
    wait_until("healthz to answer 200", T, || async {
        matches!(get(&addr, "/healthz").await, Some((200, _)))
    })
    .await;
    let instances = || async {
        let text = get(&addr, "/metrics")
            .await
            .map(|m| m.1)
            .unwrap_or_default();
        series(&text, "portolan_registrar_instances")
    };
    let c = rig.container(&[]);
    rig.wait_value(&rig.image_key(&c), T).await;
    // The gauge follows the write that registered it, not the one before.
    wait_until("portolan_registrar_instances 1", T, || async {
        instances().await == Some(1.0)
    })
    .await;
    docker(&["kill", &c.id]);
    rig.wait_gone(&rig.image_key(&c), T).await;
    wait_until("portolan_registrar_instances 0", T, || async {
        instances().await == Some(0.0)
    })
    .await;
    let text = get(&addr, "/metrics").await.expect("metrics").1;
    let count = series(&text, "portolan_registrar_event_to_etcd_seconds_count").unwrap_or(0.0);
    let sum = series(&text, "portolan_registrar_event_to_etcd_seconds_sum").unwrap_or(f64::NAN);
    assert!(count >= 2.0, "a start and a kill are measured:\n{text}");
    assert!(
        sum / count < 1.0,
        "mean event → etcd {:.1} ms:\n{text}",
        1000.0 * sum / count
    );
    assert!(
        series(&text, r#"portolan_registrar_writes_total{op="delete"}"#) >= Some(1.0),
        "{text}"
    );
    eprintln!(
        "registrar event → etcd: mean {:.1} ms over {count} events",
        1000.0 * sum / count
    );
}
