//! The mass-removal guard against the ways a fleet really empties, end to end: real etcd,
//! real HAProxy, the `portolan watcher` and `portolan render --once` binaries. Each test
//! is a removal a bad day makes (a delete loop, a restart in the middle of a hold, an
//! operator's one-shot render) that must not empty the load balancer unasked.
mod common;

use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

/// A front door with the guard at share 0.5, min 5, and `hold_s`, and ten instances of
/// `web` on two backends, all routed.
async fn ten_instances(etcd: &Etcd, hold_s: u64) -> (FrontDoor, Backend, Backend) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let fd = FrontDoor::start(
        etcd,
        Options {
            admin_socket: true,
            watcher_extra: format!("mass_removal = {{ share = 0.5, min = 5, hold_s = {hold_s} }}"),
            ..Default::default()
        },
    )
    .await;
    for i in 0..10 {
        let backend = if i % 2 == 0 { &a } else { &b };
        etcd.put(&fd.service_key("web", &format!("i{i}")), &backend.record())
            .await;
    }
    wait_until("10 instances rendered", T, || async {
        fd.dest_text().matches("    server i").count() == 10
    })
    .await;
    wait_until("web routed", T, || fd.routes_to("web", "a")).await;
    (fd, a, b)
}

fn servers(fd: &FrontDoor) -> usize {
    fd.dest_text().matches("    server i").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_by_key_delete_loop_is_held_before_the_backend_empties() {
    let etcd = Etcd::start().await;
    let (fd, _a, _b) = ten_instances(&etcd, 30).await;
    // One key at a time, each applied before the next, as a careless script does.
    let mut fewest = 10;
    for i in 0..10 {
        etcd.delete(&fd.service_key("web", &format!("i{i}"))).await;
        let gone = format!("    server i{i} ");
        wait_until("the delete applied or held", T, || async {
            !fd.dest_text().contains(&gone) || fd.log().contains("holding back the removal of")
        })
        .await;
        fewest = fewest.min(servers(&fd));
        assert!(
            matches!(fd.get("web").await, Some((200, _))),
            "web unrouted after deleting i0..=i{i}"
        );
    }
    wait_until(
        "every delete seen: what is rendered is what is held",
        T,
        || async { fd.metric("portolan_watcher_removals_held").await == Some(servers(&fd) as f64) },
    )
    .await;
    fewest = fewest.min(servers(&fd));
    assert!(fewest >= 5, "the loop emptied the backend down to {fewest}");
    wait_until("the hold is logged", T, || async {
        fd.log().contains("holding back the removal of")
    })
    .await;
    assert!(fd.metric("portolan_watcher_removals_held").await >= Some(1.0));
    eprintln!("key-by-key loop: the backend kept {fewest} of 10 servers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_restarted_during_a_hold_keeps_holding() {
    let etcd = Etcd::start().await;
    let (mut fd, _a, _b) = ten_instances(&etcd, 30).await;
    etcd.delete_prefix(&format!("{}/services/", fd.prefix))
        .await;
    wait_until("the hold is logged", T, || async {
        fd.log().contains("holding back the removal of 10 of 10")
    })
    .await;
    // A clean restart: the status record goes with the lease, so only the file HAProxy
    // runs tells the new watcher what was live.
    if let Some(w) = fd.watcher.as_mut() {
        w.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(w.wait_exit(T).is_some(), "the watcher stops on SIGTERM");
    }
    fd.watcher = None;
    let before = fd.log().len();
    fd.start_watcher();
    wait_until(
        "the restarted watcher holds the removal again",
        T,
        || async { fd.log()[before..].contains("holding back the removal of 10 of 10") },
    )
    .await;
    assert_eq!(servers(&fd), 10, "the restart emptied the backend");
    assert!(matches!(fd.get("web").await, Some((200, _))));
    // A crash: the status record outlives the watcher for a few seconds and carries the
    // hold's end, which the next run keeps instead of starting a fresh hold.
    let status_key = format!("{}/watchers/{}", fd.prefix, fd.name);
    wait_until("the status record says until when", T, || async {
        etcd.get_prefix(&status_key)
            .await
            .first()
            .is_some_and(|(_, v)| v.contains("\"held_until\""))
    })
    .await;
    fd.kill_watcher();
    let before = fd.log().len();
    fd.start_watcher();
    wait_until("the hold's end is resumed", T, || async {
        fd.log()[before..].contains("a mass removal was held when this watcher last stopped")
    })
    .await;
    wait_until("still held after the crash", T, || async {
        fd.log()[before..].contains("holding back the removal of 10 of 10")
    })
    .await;
    assert_eq!(servers(&fd), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_once_refuses_what_the_guard_would_hold_unless_forced() {
    let etcd = Etcd::start().await;
    let (mut fd, _a, _b) = ten_instances(&etcd, 30).await;
    // The operator stops the watcher and renders by hand, with etcd emptied by mistake.
    fd.kill_watcher();
    etcd.delete_prefix(&format!("{}/services/", fd.prefix))
        .await;
    let render = |extra: &[&str]| {
        portolan_cmd()
            .args(["render", "--once", "--config"])
            .arg(&fd.config)
            .args(extra)
            .output()
            .expect("run portolan render")
    };
    let before = std::fs::read(&fd.dest).expect("dest");
    let out = render(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a held render must fail: {stderr}");
    assert!(
        stderr.contains("mass-removal guard") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("removes 10 instance(s)"), "{stderr}");
    assert_eq!(
        std::fs::read(&fd.dest).expect("dest"),
        before,
        "nothing written"
    );
    // A dry run says so and still shows the diff.
    let out = render(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mass-removal guard holds this render back"),
        "{stdout}"
    );
    assert!(stdout.contains("-    server i0 "), "{stdout}");
    // Forced: applied.
    let started = Instant::now();
    let out = render(&["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(servers(&fd), 0);
    eprintln!("forced render took {:?}", started.elapsed());
}
