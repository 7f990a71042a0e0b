//! README promises that had no test of their own, each against the real parts: SIGUSR1
//! confirming a held mass removal, `portolan status`'s exit codes for an unreachable etcd
//! and a file behind etcd, `min_reload_interval_ms`, and the watcher's `fail` hook event.
mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::haproxy::{Backend, FrontDoor, HookReceiver, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

/// `portolan status` with the front door's config and `extra` flags: (exit code, output).
fn status(fd: &FrontDoor, extra: &[&str]) -> (i32, String) {
    let out = portolan_cmd()
        .arg("status")
        .arg("--config")
        .arg(&fd.config)
        .args(extra)
        .output()
        .expect("run portolan status");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A removal held for a minute goes at once when the operator confirms it with SIGUSR1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_confirms_a_held_mass_removal_at_once() {
    const HOLD: Duration = Duration::from_secs(60);
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            admin_socket: true,
            watcher_extra: format!(
                "mass_removal = {{ share = 0.5, min = 5, hold_s = {} }}",
                HOLD.as_secs()
            ),
            ..Default::default()
        },
    )
    .await;
    for i in 0..10 {
        etcd.put(&fd.service_key("web", &format!("i{i}")), &a.record())
            .await;
    }
    wait_until("10 instances rendered", T, || async {
        fd.dest_text().matches("    server i").count() == 10
    })
    .await;
    let mut client = etcd.client().await;
    let deleted = Instant::now();
    client
        .delete(
            format!("{}/services/", fd.prefix),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("del --prefix");
    wait_until("the hold is logged", T, || async {
        fd.log()
            .contains("holding back the removal of 10 of 10 live instances")
    })
    .await;
    assert!(fd.routes_to("web", "a").await, "routed while held");

    fd.watcher
        .as_ref()
        .expect("watcher")
        .signal(nix::sys::signal::Signal::SIGUSR1);
    wait_until("removed once confirmed", T, || async {
        matches!(fd.get("web").await, Some((503, _)))
    })
    .await;
    // Runtime first: HAProxy drops them, then the file follows.
    wait_until("the file follows", T, || async {
        fd.dest_text().matches("    server i").count() == 0
    })
    .await;
    assert!(
        deleted.elapsed() < HOLD,
        "removed only when the hold ran out"
    );
    assert!(
        fd.log()
            .contains("SIGUSR1: the operator confirmed the removal of 10 held instance(s)"),
        "{}",
        fd.log()
    );
    wait_until("nothing held any more", T, || async {
        fd.metric("portolan_watcher_removals_held").await == Some(0.0)
    })
    .await;
}

/// Exit 1 for a file behind etcd (the watcher is stopped, etcd moves on), exit 2 when
/// etcd cannot be reached: the status cannot tell, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_1_for_a_file_behind_etcd_and_2_without_etcd() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;
    wait_until("status in sync", T, || async { status(&fd, &[]).0 == 0 }).await;

    // The watcher stops; etcd gets a new instance the file does not have.
    fd.kill_watcher();
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    let (code, out) = status(&fd, &[]);
    assert_eq!(code, 1, "{out}");
    let diffs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("difference:"))
        .collect();
    assert_eq!(diffs.len(), 1, "{out}");
    assert!(
        diffs[0].contains("svc_web/b: in etcd, not in the file"),
        "{out}"
    );

    // etcd unreachable (nothing listens on the endpoint given).
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, out) = status(&fd, &["--etcd-endpoints", &nowhere]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("etcd"), "the error names etcd: {out}");
    assert!(!out.contains("difference:"), "{out}");
}

/// Reloads start at least `min_reload_interval_ms` apart, even when a change asks for
/// one right after the last. The reload command stamps each start (wall clock, ns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_start_at_least_min_reload_interval_apart() {
    const INTERVAL: Duration = Duration::from_millis(1500);
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            reload_cmd: Some(String::new()),
            watcher_extra: format!("min_reload_interval_ms = {}", INTERVAL.as_millis()),
            ..Default::default()
        },
    )
    .await;
    let stamps = fd.dir.path().join("reloads");
    let cmd = format!(
        "date +%s%N >> {} && kill -USR2 {}",
        stamps.display(),
        fd.haproxy.master_pid()
    );
    let cfg = std::fs::read_to_string(&fd.config).expect("config");
    std::fs::write(
        &fd.config,
        cfg.replace("reload_cmd = \"\"", &format!("reload_cmd = {cmd:?}")),
    )
    .expect("config");
    let starts = || -> Vec<u128> {
        std::fs::read_to_string(&stamps)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let now_ns = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    };
    fd.start_watcher();
    wait_until("the first render's reload", T, || async {
        starts().len() == 1
    })
    .await;

    // Each new service asks for a reload at once, right after the previous one started.
    let mut asked = Vec::new();
    for (service, backend) in [("web", &a), ("api", &b)] {
        let seen = starts().len();
        asked.push(now_ns());
        etcd.put(&fd.service_key(service, "x"), &backend.record())
            .await;
        wait_until("the next reload", T, || async { starts().len() > seen }).await;
    }
    let s = starts();
    assert_eq!(s.len(), 3, "one reload per change: {s:?}");
    for (n, pair) in s.windows(2).enumerate() {
        let gap = Duration::from_nanos((pair[1] - pair[0]) as u64);
        assert!(
            gap >= INTERVAL,
            "reload {} started {gap:?} after the one before (min_reload_interval_ms = {})",
            n + 1,
            INTERVAL.as_millis()
        );
        // The change was there well before the interval ran out: the limit held it back.
        let waited = Duration::from_nanos((pair[1] - asked[n]) as u64);
        assert!(
            asked[n] < pair[0] + INTERVAL.as_nanos() / 2,
            "change {n} came too late to test the limit"
        );
        eprintln!(
            "reload {}: {gap:?} after the previous, {waited:?} after its change",
            n + 1
        );
    }
    wait_until("api routed", T, || fd.routes_to("api", "b")).await;
}

/// A reload that fails (HAProxy's master socket is gone) is told to the `fail` hook,
/// with the watcher, the file, the revision and what went wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_emits_the_fail_hook_event() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let receiver = HookReceiver::start().await;
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            command_timeout_ms: 1500,
            ..Default::default()
        },
    )
    .await;
    let cfg = std::fs::read_to_string(&fd.config).expect("config");
    std::fs::write(
        &fd.config,
        format!(
            "{cfg}\n[[hook]]\nevents = [\"fail\"]\nurl = {:?}\n",
            receiver.url
        ),
    )
    .expect("config");
    fd.haproxy.kill();
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    fd.start_watcher();
    wait_until("a fail event", T, || async {
        !receiver.events("fail").is_empty()
    })
    .await;
    let e = &receiver.events("fail")[0];
    assert_eq!(e["watcher"], fd.name.as_str(), "{e}");
    assert_eq!(e["dest"], fd.dest.display().to_string(), "{e}");
    assert!(e["revision"].as_i64().is_some_and(|r| r > 0), "{e}");
    let summary = e["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains(&fd.haproxy.sock.display().to_string()),
        "the summary names the unreachable socket: {e}"
    );
    assert_eq!(
        fd.metric(r#"portolan_watcher_reloads_total{result="failed"}"#)
            .await
            .map(|n| n >= 1.0),
        Some(true)
    );
}
