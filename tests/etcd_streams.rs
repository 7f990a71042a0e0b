//! The shared etcd connection keeps an idle watch stream open. etcd polices HTTP/2
//! pings (GOAWAY for pings more often than its 5 s `--grpc-keepalive-min-time`); with
//! a 2 s ping interval every idle watch died after ~8 s and the watcher re-listed the
//! whole prefix in a loop. This waits 21 s idle on a real etcd.
mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_client::{EventType, WatchOptions};

#[tokio::test]
async fn an_idle_watch_survives_several_ping_intervals() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix("streams");
    let mut client = portolan::etcd::connect(&etcd.config(&prefix))
        .await
        .expect("connect");
    let mut stream = client
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    let created = stream
        .message()
        .await
        .expect("watch created")
        .expect("open");
    assert!(created.created());
    // A fixed time, not one derived from `KEEPALIVE_INTERVAL`: the constant under test
    // may be wrong. 21 s is two pings at the shipped 10 s and ten at the 2 s that made
    // etcd end every idle watch after ~8 s.
    let idle = Duration::from_secs(21);
    let started = Instant::now();
    // Idle on purpose: nothing but HTTP/2 pings crosses the connection meanwhile.
    let early = tokio::time::timeout(idle, stream.message()).await;
    assert!(
        early.is_err(),
        "the idle watch ended after {:?}: {early:?}",
        started.elapsed()
    );
    etcd.put(&format!("{prefix}/k"), "v").await;
    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("event within 5 s")
        .expect("watch stream still healthy")
        .expect("stream not closed");
    let events = msg.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type(), EventType::Put);
}
