//! What a node's etcd credentials can do to the front door, tried as an attacker would:
//! a node writes only under its own `nodes/<node>/` (a fixed etcd enforces that), and
//! these tests check that nothing it writes there replaces an instance it does not own,
//! serves a service it may not serve, or points outside its networks. The real binary,
//! etcd and HAProxy; real HTTP through the front door tells which backend answers.
mod common;

use std::time::Duration;

use common::haproxy::{Backend, FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

/// A record as a node's registrar writes it, at `b`'s address.
fn record(b: &Backend) -> String {
    format!(r#"{{"addr":"{}","weight":100}}"#, b.addr)
}

/// The node-scoped key of `node`'s instance `id` of `service`.
fn node_key(fd: &FrontDoor, node: &str, service: &str, id: &str) -> String {
    format!("{}/nodes/{node}/services/{service}/{id}", fd.prefix)
}

/// Puts a marker service and waits until it is routed: everything written before it
/// has been through the watcher by then (one snapshot holds both).
async fn settle(etcd: &Etcd, fd: &FrontDoor, marker: &Backend) {
    etcd.put(&fd.service_key("marker", "m"), &marker.addr_string())
        .await;
    wait_until("the marker routed", T, || {
        fd.routes_to("marker", &marker.name)
    })
    .await;
}

/// Every one of `n` requests for `service` is answered by `backend` (round robin would
/// send some to a second server, were there one).
async fn only(fd: &FrontDoor, service: &str, backend: &str, n: usize) {
    for i in 0..n {
        let got = fd.get(service).await;
        assert!(
            matches!(&got, Some((200, body)) if body == backend),
            "request {i} for {service}: {got:?}, expected only {backend}\n{}",
            fd.dest_text()
        );
    }
}

async fn portolan(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let out = tokio::process::Command::from(portolan_cmd())
        .arg("--config")
        .arg(config)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run portolan");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_does_not_replace_the_operators_hand_written_instance() {
    let etcd = Etcd::start().await;
    let operator = Backend::start("operator").await;
    let attacker = Backend::start("attacker").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "db1"), &operator.addr_string())
        .await;
    wait_until("db1 routed to the operator's address", T, || {
        fd.routes_to("web", "operator")
    })
    .await;
    // web1's credentials write only under nodes/web1/: that is all it takes to try.
    let evil = node_key(&fd, "web1", "web", "db1");
    etcd.put(&evil, &record(&attacker)).await;
    settle(&etcd, &fd, &marker).await;
    only(&fd, "web", "operator", 20).await;
    let dest = fd.dest_text();
    assert!(
        dest.contains(&format!("server db1 {} ", operator.addr)),
        "{dest}"
    );
    assert!(!dest.contains(&attacker.addr.to_string()), "{dest}");
    let log = fd.log();
    assert!(
        log.contains(&evil) && log.contains("does not start with \"web1-\""),
        "{log}"
    );
    let refused = r#"portolan_watcher_refused_total{reason="foreign_id"}"#;
    wait_until("the refusal counted", T, || async {
        fd.metric(refused).await.unwrap_or(0.0) >= 1.0
    })
    .await;

    // `portolan ls` names the refused key; `portolan status` does too.
    let (code, out, err) = portolan(&["ls", "web", "--json"], &fd.config).await;
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("ls --json");
    let web = doc["services"]["web"].as_array().expect("web listed");
    assert_eq!(web.len(), 1, "{out}");
    assert_eq!(web[0]["addr"], operator.addr.to_string());
    assert_eq!(doc["refused"][0]["key"], evil.as_str(), "{out}");
    assert_eq!(doc["refused"][0]["reason"], "foreign_id", "{out}");
    assert!(err.contains(&evil), "{err}");
    let (_, out, err) = portolan(&["status"], &fd.config).await;
    assert!(
        out.contains(&format!("refused: {evil}")),
        "status:\n{out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_key_does_not_replace_another_nodes_instance() {
    let etcd = Etcd::start().await;
    let victim = Backend::start("victim").await;
    let attacker = Backend::start("attacker").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    let id = "web2-0123456789ab-8080";
    let good = node_key(&fd, "web2", "pay", id);
    etcd.put(&good, &record(&victim)).await;
    wait_until("pay routed to web2's instance", T, || {
        fd.routes_to("pay", "victim")
    })
    .await;
    // nodes/web1/… sorts before nodes/web2/…: the lowest key used to win.
    let evil = node_key(&fd, "web1", "pay", id);
    etcd.put(&evil, &record(&attacker)).await;
    settle(&etcd, &fd, &marker).await;
    only(&fd, "pay", "victim", 20).await;
    assert!(
        fd.dest_text()
            .contains(&format!("server {id} {} ", victim.addr)),
        "{}",
        fd.dest_text()
    );
    assert!(fd.log().contains(&evil), "{}", fd.log());

    let (code, out, err) = portolan(&["ls", "pay", "--json"], &fd.config).await;
    assert_eq!(code, 0, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("ls --json");
    assert_eq!(doc["services"]["pay"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(doc["services"]["pay"][0]["node"], "web2", "{out}");
    assert_eq!(doc["refused"][0]["key"], evil.as_str(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_two_keys_claim_is_kept_by_the_hand_written_key_and_never_merged() {
    let etcd = Etcd::start().await;
    let operator = Backend::start("operator").await;
    let node = Backend::start("node").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    // An id web1 may use (it starts with "web1-"), already written by hand: during a
    // v1 → v2 upgrade, or an operator naming an instance after its host.
    let id = "web1-0123456789ab-80";
    etcd.put(&fd.service_key("web", id), &operator.addr_string())
        .await;
    wait_until("the hand-written key routed", T, || {
        fd.routes_to("web", "operator")
    })
    .await;
    let second = node_key(&fd, "web1", "web", id);
    etcd.put(&second, &record(&node)).await;
    settle(&etcd, &fd, &marker).await;
    only(&fd, "web", "operator", 20).await;
    let dest = fd.dest_text();
    assert_eq!(
        dest.matches(&format!("server {id} ")).count(),
        1,
        "one server line for the name:\n{dest}"
    );
    assert!(fd.dest_is_valid(), "{dest}");
    let (_, out, err) = portolan(&["ls", "web", "--json"], &fd.config).await;
    let doc: serde_json::Value = serde_json::from_str(&out).expect("ls --json");
    assert_eq!(doc["refused"][0]["key"], second.as_str(), "{out}\n{err}");
    assert_eq!(doc["refused"][0]["reason"], "name_taken", "{out}");
    assert!(
        doc["refused"][0]["rule"]
            .as_str()
            .unwrap()
            .contains(&fd.service_key("web", id)),
        "{out}"
    );
    let refused = r#"portolan_watcher_refused_total{reason="name_taken"}"#;
    wait_until("the refusal counted", T, || async {
        fd.metric(refused).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    // The holder goes: the node's key is the one left, and takes the name.
    etcd.delete(&fd.service_key("web", id)).await;
    wait_until("the node's key routed", T, || fd.routes_to("web", "node")).await;
    only(&fd, "web", "node", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_written_and_a_node_instance_are_both_listed_with_their_owners() {
    let etcd = Etcd::start().await;
    let operator = Backend::start("operator").await;
    let node = Backend::start("node").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "manual-1"), &operator.addr_string())
        .await;
    etcd.put(
        &node_key(&fd, "web1", "web", "web1-aaaaaaaaaaaa-80"),
        &record(&node),
    )
    .await;
    settle(&etcd, &fd, &marker).await;
    wait_until("web routed to both", T, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            if let Some((200, b)) = fd.get("web").await {
                seen.insert(b);
            }
        }
        seen.len() == 2
    })
    .await;
    let (code, out, err) = portolan(&["ls", "web"], &fd.config).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].contains("manual-1") && rows[0].split_whitespace().nth(3) == Some("-"),
        "{out}"
    );
    assert!(
        rows[1].contains("web1-aaaaaaaaaaaa-80")
            && rows[1].split_whitespace().nth(3) == Some("web1"),
        "{out}"
    );
    assert!(!err.contains("refused"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_allow_list_refuses_a_node_serving_a_service_it_may_not() {
    let etcd = Etcd::start().await;
    let pay = Backend::start("pay").await;
    let attacker = Backend::start("attacker").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            watcher_extra: r#"services = { pay = ["pay-*"], "*" = ["*"] }"#.into(),
            ..Default::default()
        },
    )
    .await;
    etcd.put(
        &node_key(&fd, "pay-1", "pay", "pay-1-bbbbbbbbbbbb-80"),
        &record(&pay),
    )
    .await;
    wait_until("pay routed to pay-1", T, || fd.routes_to("pay", "pay")).await;
    // web1 adds itself to pay, with an id of its own: only the allow-list stops it.
    let evil = node_key(&fd, "web1", "pay", "web1-aaaaaaaaaaaa-80");
    etcd.put(&evil, &record(&attacker)).await;
    settle(&etcd, &fd, &marker).await;
    only(&fd, "pay", "pay", 20).await;
    let log = fd.log();
    assert!(
        log.contains(&evil) && log.contains("[watcher] services"),
        "{log}"
    );
    let refused = r#"portolan_watcher_refused_total{reason="service"}"#;
    wait_until("the refusal counted", T, || async {
        fd.metric(refused).await.unwrap_or(0.0) >= 1.0
    })
    .await;
    let (_, out, err) = portolan(&["ls", "pay", "--json"], &fd.config).await;
    let doc: serde_json::Value = serde_json::from_str(&out).expect("ls --json");
    assert_eq!(doc["refused"][0]["key"], evil.as_str(), "{out}\n{err}");
    assert_eq!(doc["refused"][0]["reason"], "service", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_false_routes_only_what_nodes_registered() {
    let etcd = Etcd::start().await;
    let node = Backend::start("node").await;
    let manual = Backend::start("manual").await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            watcher_extra: "hand_written = false".into(),
            ..Default::default()
        },
    )
    .await;
    let hand = fd.service_key("web", "manual-1");
    etcd.put(&hand, &manual.addr_string()).await;
    etcd.put(
        &node_key(&fd, "web1", "web", "web1-aaaaaaaaaaaa-80"),
        &record(&node),
    )
    .await;
    wait_until("web routed to the node's instance", T, || {
        fd.routes_to("web", "node")
    })
    .await;
    only(&fd, "web", "node", 10).await;
    assert!(
        fd.log().contains(&hand) && fd.log().contains("hand_written"),
        "{}",
        fd.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_networks_refuses_an_instance_outside_its_nodes_networks() {
    let etcd = Etcd::start().await;
    let inside = Backend::start("inside").await;
    let outside = Backend::start("outside").await;
    let marker = Backend::start("marker").await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            watcher_extra:
                r#"node_networks = { "web*" = ["10.1.0.0/16"], "lo-*" = ["127.0.0.0/8"] }"#.into(),
            ..Default::default()
        },
    )
    .await;
    etcd.put(
        &node_key(&fd, "lo-1", "web", "lo-1-bbbbbbbbbbbb-80"),
        &record(&inside),
    )
    .await;
    wait_until("web routed to lo-1's instance", T, || {
        fd.routes_to("web", "inside")
    })
    .await;
    // web1 lives in 10.1.0.0/16; an instance of it at 127.0.0.1 is not its own.
    let evil = node_key(&fd, "web1", "web", "web1-aaaaaaaaaaaa-80");
    etcd.put(&evil, &record(&outside)).await;
    settle(&etcd, &fd, &marker).await;
    only(&fd, "web", "inside", 20).await;
    let log = fd.log();
    assert!(log.contains(&evil) && log.contains("10.1.0.0/16"), "{log}");
    let refused = r#"portolan_watcher_refused_total{reason="node_network"}"#;
    wait_until("the refusal counted", T, || async {
        fd.metric(refused).await.unwrap_or(0.0) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_bad_glob_and_a_bad_network() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.tera"), "x").unwrap();
    let cfg = dir.path().join("w.toml");
    std::fs::write(
        &cfg,
        r#"[watcher]
services = { web = ["web-[0-9]"], "Bad Name" = ["*"] }
node_networks = { "web-*" = ["10.1.0.0/33"] }
[[template]]
src = "t.tera"
dest = "out.cfg"
"#,
    )
    .unwrap();
    let (code, out, err) = portolan(&["check"], &cfg).await;
    assert_ne!(code, 0, "{out}");
    for named in ["\"web-[0-9]\"", "\"Bad Name\"", "\"10.1.0.0/33\""] {
        assert!(err.contains(named), "{named} not in:\n{err}");
    }
}
