//! Zero-error rolling deploys, end to end: a real registrar, watcher, HAProxy and Docker
//! containers that keep serving for 3 s after SIGTERM (as an app finishing its requests
//! does). `docker stop` drains the container at once: no new request reaches it a few
//! tens of milliseconds after the stop was issued, though it exits only 3 s later, and a
//! rolling deploy under load fails no request.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::haproxy::{FrontDoor, Options};
use common::registrar::{InProcess, Opts, Rig};
use common::*;

const T: Duration = Duration::from_secs(20);
/// Serves, and on SIGTERM keeps serving for 3 s before it exits.
const SLOW_STOP: &[&str] = &["sh", "-c", "trap 'sleep 3; exit 0' TERM; /bin/serve & wait"];

struct World {
    rig: Rig,
    fd: FrontDoor,
    _registrar: InProcess,
}

async fn world(tag: &str) -> World {
    let rig = Rig::new(tag).await;
    let fd = FrontDoor::start(&rig.etcd, Options::with_admin_socket()).await;
    let mut cfg = rig.config(&Opts::default());
    cfg.etcd.prefix = fd.prefix.clone();
    let registrar = InProcess::start(cfg);
    World {
        rig,
        fd,
        _registrar: registrar,
    }
}

impl World {
    fn web(&self) -> Container {
        Container::run(
            &self.rig.run,
            &["-p", "127.0.0.1::8080", "-l", "portolan.service=web"],
            Some(SLOW_STOP),
        )
    }

    async fn routed(&self, c: &Container) {
        let page = c.short_id();
        let ok = eventually(T, || async {
            for _ in 0..20 {
                if matches!(self.fd.get("web").await, Some((200, b)) if b.trim() == page) {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            ok,
            "web never routed to {page}: {:?}\nwatcher log:\n{}\nfile:\n{}",
            self.fd.get("web").await,
            self.fd.log(),
            self.fd.dest_text()
        );
    }
}

/// Issues `docker stop` in the background; returns when it was issued.
fn stop_in_background(c: &Container) -> Instant {
    let id = c.id.clone();
    let issued = Instant::now();
    std::thread::spawn(move || {
        let _ = std::process::Command::new("docker")
            .args(["stop", "-t", "10", &id])
            .output();
    });
    issued
}

fn median_max(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    (d[d.len() / 2], d[d.len() - 1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_drains_at_once_and_a_rolling_deploy_fails_no_request() {
    let w = world("drain").await;
    let mut live = vec![w.web(), w.web()];
    for c in &live {
        w.routed(c).await;
    }

    // Stop → no new request: the last request the stopped container answered, after
    // the stop was issued, while it still serves for 3 s.
    let mut drain_times = Vec::new();
    for _ in 0..20 {
        let fresh = w.web();
        w.routed(&fresh).await;
        let old = live.remove(0);
        let page = old.short_id();
        let issued = stop_in_background(&old);
        let mut last_hit = None;
        let mut misses = 0;
        let mut polls = 0;
        while misses < 200 && polls < 5000 {
            polls += 1;
            match w.fd.get("web").await {
                Some((200, body)) if body.trim() == page => {
                    last_hit = Some(issued.elapsed());
                    misses = 0;
                }
                Some((200, _)) => misses += 1,
                other => panic!("a request failed during the drain: {other:?}"),
            }
        }
        assert!(misses >= 200, "{page} kept getting requests");
        let drained = last_hit.unwrap_or_default();
        assert!(
            drained < Duration::from_millis(500),
            "{page} got a new request {drained:?} after docker stop"
        );
        drain_times.push(drained);
        live.push(fresh);
    }
    let (median, max) = median_max(drain_times.clone());
    eprintln!(
        "drain: docker stop issued → last new request to it: median {median:?}, max {max:?} (n={})",
        drain_times.len()
    );

    // A rolling deploy under load: 20 times, start a new container, wait until it is
    // routed, stop an old one; requests keep flowing all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let addr = w.fd.http_addr();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, total, failed, addr) =
            (stop.clone(), total.clone(), failed.clone(), addr.clone());
        load.push(tokio::spawn(async move {
            // Bounded: at most 20,000 requests per task.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                total.fetch_add(1, Ordering::Relaxed);
                match http_get(&addr, "web.test", "/").await {
                    Some((200, _)) => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    let mut stopped = Vec::new();
    for _ in 0..20 {
        let fresh = w.web();
        w.routed(&fresh).await;
        let old = live.remove(0);
        stop_in_background(&old);
        stopped.push(old);
        live.push(fresh);
    }
    // The stopped ones finish their 3 s and exit while the load goes on.
    wait_until("every stopped container to exit", T, || async {
        stopped.iter().all(|c| {
            try_docker(&["inspect", "-f", "{{.State.Running}}", &c.id]).as_deref() != Some("true")
        })
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.expect("load task");
    }
    let (total, failed) = (
        total.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "rolling deploy: 20 stops in {:?} under load: {total} requests, {failed} failed",
        started.elapsed()
    );
    assert!(total > 1000, "too little load to mean anything: {total}");
    assert_eq!(
        failed, 0,
        "{failed} of {total} requests failed during the rolling deploy"
    );
}
