//! `portolan status`: etcd, the file on disk and HAProxy's memory compared, against a
//! real etcd, HAProxy (runtime API on) and watcher.
mod common;

use std::time::Duration;

use common::haproxy::{Backend, FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

fn status(fd: &FrontDoor, json: bool) -> (i32, String) {
    let mut cmd = portolan_cmd();
    cmd.arg("status").arg("--config").arg(&fd.config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run portolan status");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_zero_in_sync_and_names_every_drifted_server() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed to a and b", T, || async {
        fd.routes_to("web", "a").await && fd.routes_to("web", "b").await
    })
    .await;
    // The watcher may still be writing its status after the apply: wait for agreement.
    wait_until("status to agree", T, || async { status(&fd, false).0 == 0 }).await;
    let (code, out) = status(&fd, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in sync"), "{out}");
    assert!(out.contains(&format!("watcher {}", fd.name)), "{out}");
    let (code, json) = status(&fd, true);
    assert_eq!(code, 0, "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(doc["in_sync"], true);
    let web = &doc["templates"][0]["backends"]["svc_web"];
    assert_eq!(web["a"]["haproxy"]["admin"], "ready", "{json}");
    // Both sides name a's real address (two missing fields would be equal too).
    let addr = a.addr.to_string();
    assert_eq!(web["a"]["etcd"]["addr"], addr.as_str(), "{json}");
    assert_eq!(web["a"]["file"]["addr"], addr.as_str(), "{json}");

    // An operator puts a server in maintenance by hand.
    fd.admin("set server svc_web/a state maint").await;
    let (code, out) = status(&fd, false);
    assert_eq!(code, 1, "{out}");
    let diffs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("difference:"))
        .collect();
    assert_eq!(diffs.len(), 1, "{out}");
    assert!(
        diffs[0].contains("svc_web/a: HAProxy has it in maintenance"),
        "{out}"
    );
    fd.admin("set server svc_web/a state ready").await;
    assert_eq!(status(&fd, false).0, 0);

    // A server added by hand on the admin socket.
    fd.admin(&format!("add server svc_web/handmade {}", a.addr_string()))
        .await;
    let (code, out) = status(&fd, true);
    assert_eq!(code, 1, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("json");
    let diffs = doc["differences"].as_array().expect("differences");
    assert_eq!(diffs.len(), 1, "{out}");
    assert!(
        diffs[0]
            .as_str()
            .unwrap()
            .starts_with("svc_web/handmade: HAProxy runs it, but the file does not have it"),
        "{out}"
    );

    // HAProxy unreachable: it cannot tell, and says so with its own exit code.
    let mut fd = fd;
    fd.haproxy.kill();
    let (code, out) = status(&fd, false);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("admin socket"), "{out}");
}

/// `render --dry-run` says how the watcher would apply the change: which runtime
/// commands, or why it takes a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_says_runtime_or_reload_and_why() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;
    fd.kill_watcher();
    let dry_run = || {
        let out = portolan_cmd()
            .args(["render", "--once", "--dry-run", "--config"])
            .arg(&fd.config)
            .output()
            .expect("run portolan render");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    let out = dry_run();
    assert!(
        out.contains("# through the runtime API, no reload (1 change(s)):"),
        "{out}"
    );
    assert!(
        out.contains(&format!("#   add server svc_web/b {}", b.addr_string())),
        "{out}"
    );
    etcd.put(&fd.service_key("api", "a"), &a.record()).await;
    let out = dry_run();
    assert!(out.contains("# needs a reload: "), "{out}");
}
