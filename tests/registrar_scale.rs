//! 100 containers started at once: exactly 100 keys, then 0 when they are all gone.
//! Its own binary so nextest can run it alone (see .config/nextest.toml): it loads the
//! Docker Engine that every other test shares.
mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::registrar::*;
use common::*;

const N: usize = 100;
/// `docker run` processes at once: enough to make a burst, few enough for 2 cores.
const PARALLEL: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_containers_register_and_deregister() {
    let rig = Rig::new("reg-scale").await;
    let _registrar = rig.spawn(&Opts {
        ttl: 5,
        ..Default::default()
    });
    wait_until(
        "the registrar's node key",
        Duration::from_secs(20),
        || async { rig.value(&rig.node_key()).await.is_some() },
    )
    .await;

    let start = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut starting = Vec::new();
    for _ in 0..N {
        let slots = slots.clone();
        let run = rig.run.clone();
        starting.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.expect("semaphore");
            tokio::task::spawn_blocking(move || {
                Container::run(&run, &["-p", "127.0.0.1::8080"], None)
            })
            .await
            .expect("docker run")
        }));
    }
    let mut containers = Vec::new();
    for s in starting {
        containers.push(s.await.expect("start task"));
    }
    let started = start.elapsed();
    let want: BTreeSet<String> = containers.iter().map(|c| rig.image_key(c)).collect();
    assert_eq!(want.len(), N);
    wait_until("100 keys", Duration::from_secs(60), || async {
        rig.services().await.len() >= N
    })
    .await;
    let registered = start.elapsed();
    let got = rig.services().await;
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);
    for c in containers.iter().step_by(33) {
        let rec = record(&got[&rig.image_key(c)]);
        let body = http_get(&rec.addr, "test", "/").await;
        assert_eq!(
            body.map(|(s, b)| (s, b.trim().to_string())),
            Some((200, c.short_id()))
        );
    }

    let start = Instant::now();
    let ids: Vec<String> = containers.iter().map(|c| c.id.clone()).collect();
    let mut removing = Vec::new();
    for chunk in ids.chunks(N.div_ceil(PARALLEL)) {
        let mut args = vec!["rm".to_string(), "-f".into(), "-v".into()];
        args.extend(chunk.iter().cloned());
        removing.push(tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            docker(&args);
        }));
    }
    for r in removing {
        r.await.expect("docker rm");
    }
    let removed = start.elapsed();
    wait_until("0 keys", Duration::from_secs(60), || async {
        rig.services().await.is_empty()
    })
    .await;
    let deregistered = start.elapsed();
    assert!(
        rig.value(&rig.node_key()).await.is_some(),
        "the node key must stay"
    );
    eprintln!(
        "registrar scale: {N} containers started in {started:.1?}, all {N} keys in etcd after {registered:.1?}; \
         removed in {removed:.1?}, 0 keys after {deregistered:.1?}"
    );
}
