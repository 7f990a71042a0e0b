//! `cargo bench --bench footprint`: memory of the two daemons as deployed, read from
//! /proc (VmRSS / VmHWM). A watcher holding 1,000 and 10,000 instances of a real etcd,
//! and an idle registrar connected to the real Docker Engine and etcd. Needs etcd and
//! Docker, as the tests do.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

fn mem_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn fill(etcd: &Etcd, prefix: &str, from: usize, to: usize) {
    let mut client = etcd.client().await;
    for chunk in (from..to).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                let key = format!("{prefix}/services/svc{:03}/node-{i:05}", i % 100);
                let value = format!(
                    r#"{{"addr":"127.0.0.1:{}","node":"node","container":"{:012x}","port":8080,"tags":[],"weight":100}}"#,
                    10000 + i % 50000,
                    i
                );
                etcd_client::TxnOp::put(key, value, None)
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("txn");
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let etcd = Etcd::start().await;
    let prefix = unique_prefix("footprint");
    let dir = tempfile::tempdir().expect("tempdir");
    let tpl = dir.path().join("t.tera");
    std::fs::write(
        &tpl,
        "{% for name, list in services %}backend {{ name }}\n{% for i in list %}  server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}",
    )
    .expect("template");
    let cfg = dir.path().join("watcher.toml");
    std::fs::write(
        &cfg,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\nprefix = \"{prefix}\"\n[watcher]\nname = \"bench\"\nallowed_networks = [\"127.0.0.0/8\"]\n\
             [[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\nreload_cmd = \"true\"\n",
            etcd.endpoint()
        ),
    )
    .expect("config");
    let out = dir.path().join("out.cfg");
    let mut cmd = owned_command(portolan_bin());
    cmd.args(["--config"])
        .arg(&cfg)
        .arg("watcher")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let watcher = Proc::spawn("watcher", &mut cmd);
    println!(
        "{:>10} {:>14} {:>14}",
        "instances", "watcher RSS", "peak RSS"
    );
    let mut have = 0;
    for n in [0usize, 1_000, 10_000] {
        fill(&etcd, &prefix, have, n).await;
        have = n;
        wait_until(
            "the watcher to render everything",
            Duration::from_secs(60),
            || {
                let out = out.clone();
                async move {
                    std::fs::read_to_string(&out)
                        .map(|t| t.matches("  server ").count() == n)
                        .unwrap_or(false)
                }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!(
            "{n:>10} {:>10} KiB {:>10} KiB   (now: heap and stacks {} KiB, the binary's pages {} KiB)",
            mem_kib(watcher.pid(), "VmRSS:"),
            mem_kib(watcher.pid(), "VmHWM:"),
            mem_kib(watcher.pid(), "RssAnon:"),
            mem_kib(watcher.pid(), "RssFile:")
        );
    }

    let state = tempfile::tempdir().expect("state dir");
    let mut cmd = owned_command(portolan_bin());
    cmd.args([
        "registrar",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--prefix",
        &prefix,
    ])
    .args([
        "--node",
        "bench",
        "--advertise-ip",
        "127.0.0.1",
        "--ttl",
        "5",
    ])
    .args(["--only-label", "portolan.bench=none"])
    .arg("--state-dir")
    .arg(state.path())
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let registrar = Proc::spawn("registrar", &mut cmd);
    let node_key = format!("{prefix}/nodes/bench");
    wait_until(
        "the registrar to write its node key",
        Duration::from_secs(30),
        || async { !etcd.get_prefix(&node_key).await.is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "registrar, idle: {} KiB RSS, {} KiB peak",
        mem_kib(registrar.pid(), "VmRSS:"),
        mem_kib(registrar.pid(), "VmHWM:")
    );
}
