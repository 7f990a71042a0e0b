//! `portolan ls` against a real etcd: the built binary, a known state, exact output.
mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

const LEASE_TTL: i64 = 3600;

/// Runs the built binary with a config file of nothing, so the machine's
/// the default config files (/etc/portolan/{watcher,registrar}.toml) and PORTOLAN_* variables cannot leak in.
async fn portolan(args: &[&str]) -> Output {
    tokio::process::Command::from(common::portolan_cmd())
        .args(["--config", "/dev/null"])
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run portolan")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Fixture {
    etcd: Etcd,
    prefix: String,
    lease_hex: String,
    revision: i64,
}

/// JSON records (one on a lease), a hand-written bare host:port, a key with an
/// invalid service name, an invalid value, and a node key that `ls` must not list.
async fn fixture() -> Fixture {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix("ls");
    let mut c = etcd.client().await;
    let lease = c.lease_grant(LEASE_TTL, None).await.expect("grant").id();
    let leased = etcd_client::PutOptions::new().with_lease(lease);
    let s = format!("{prefix}/services");
    c.put(
        format!("{s}/web/host-a-3f2a9c1b7d10-8080"),
        r#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":["v2"],"weight":100}"#,
        Some(leased),
    )
    .await
    .expect("put");
    etcd.put(
        &format!("{s}/web/host-b-0123456789ab-8080"),
        r#"{"addr":"10.0.0.6:32769","node":"host-b","container":"0123456789ab","port":8080,"tags":["v2","canary"],"weight":50}"#,
    )
    .await;
    etcd.put(&format!("{s}/api/manual-1"), "10.0.0.9:80").await;
    etcd.put(&format!("{s}/bad name/x"), "10.0.0.1:80").await;
    etcd.put(&format!("{s}/web/broken"), "10.0.0.9:80 backup")
        .await;
    etcd.put(&format!("{prefix}/nodes/host-a"), "{}").await;
    let revision = c
        .get(prefix.as_str(), None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    Fixture {
        etcd,
        prefix,
        lease_hex: format!("{lease:x}"),
        revision,
    }
}

/// The remaining TTL is the one moving part: check it is sane, then pin it.
fn pin_remaining_ttl(table: &str) -> String {
    let cell = table
        .split_whitespace()
        .find(|w| w.ends_with(&format!("s/{LEASE_TTL}s")))
        .unwrap_or_else(|| panic!("no lease cell in\n{table}"));
    let remaining: i64 = cell.split('s').next().unwrap().parse().expect("number");
    assert!(
        (LEASE_TTL - 30..=LEASE_TTL).contains(&remaining),
        "remaining TTL {remaining}"
    );
    table.replace(cell, &format!("{LEASE_TTL}s/{LEASE_TTL}s"))
}

#[tokio::test]
async fn table_shows_the_known_state_and_warns_about_bad_keys() {
    let f = fixture().await;
    let ep = f.etcd.endpoint();
    let out = portolan(&["ls", "--etcd-endpoints", &ep, "--prefix", &f.prefix]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let expected = "\
SERVICE  INSTANCE                  ADDR            NODE    CONTAINER     LEASE        WEIGHT  TAGS
api      manual-1                  10.0.0.9:80     -       -             -            100     -
web      host-a-3f2a9c1b7d10-8080  10.0.0.5:32768  host-a  3f2a9c1b7d10  3600s/3600s  100     v2
web      host-b-0123456789ab-8080  10.0.0.6:32769  host-b  0123456789ab  -            50      v2,canary
";
    assert_eq!(pin_remaining_ttl(&text(&out.stdout)), expected);

    let stderr = text(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: skipped"))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        warnings[0].contains(&format!("\"{}/services/bad name/x\"", f.prefix))
            && warnings[0].contains("names must match"),
        "{stderr}"
    );
    assert!(
        warnings[1].contains(&format!("\"{}/services/web/broken\"", f.prefix))
            && warnings[1].contains("is not a number"),
        "{stderr}"
    );

    // One service: only its rows, and "web" does not match a longer name by prefix.
    f.etcd
        .put(&format!("{}/services/web2/x", f.prefix), "10.0.0.7:80")
        .await;
    let out = portolan(&["ls", "api", "--etcd-endpoints", &ep, "--prefix", &f.prefix]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "\
SERVICE  INSTANCE  ADDR         NODE  CONTAINER  LEASE  WEIGHT  TAGS
api      manual-1  10.0.0.9:80  -     -          -      100     -
"
    );
    let out = portolan(&["ls", "web", "--etcd-endpoints", &ep, "--prefix", &f.prefix]).await;
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("web2"), "{stdout}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

#[tokio::test]
async fn json_is_the_stable_document() {
    let f = fixture().await;
    let ep = f.etcd.endpoint();
    let out = portolan(&[
        "ls",
        "--json",
        "--etcd-endpoints",
        &ep,
        "--prefix",
        &f.prefix,
    ])
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let mut doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let ttl = &mut doc["services"]["web"][0]["lease"]["ttl"];
    let remaining = ttl.as_i64().expect("ttl is a number");
    assert!(
        (LEASE_TTL - 30..=LEASE_TTL).contains(&remaining),
        "{remaining}"
    );
    *ttl = LEASE_TTL.into();
    let p = &f.prefix;
    let expected = serde_json::json!({
        "prefix": p,
        "revision": f.revision,
        "services": {
            "api": [{"id": "manual-1", "addr": "10.0.0.9:80", "host": "10.0.0.9", "port": 80,
                     "node": null, "container": null, "tags": [], "weight": 100, "lease": null}],
            "web": [
                {"id": "host-a-3f2a9c1b7d10-8080", "addr": "10.0.0.5:32768", "host": "10.0.0.5",
                 "port": 32768, "node": "host-a", "container": "3f2a9c1b7d10", "tags": ["v2"],
                 "weight": 100,
                 "lease": {"id": f.lease_hex, "ttl": LEASE_TTL, "granted_ttl": LEASE_TTL}},
                {"id": "host-b-0123456789ab-8080", "addr": "10.0.0.6:32769", "host": "10.0.0.6",
                 "port": 32769, "node": "host-b", "container": "0123456789ab",
                 "tags": ["v2", "canary"], "weight": 50, "lease": null}
            ]
        },
        "skipped": [
            {"key": format!("{p}/services/bad name/x"),
             "reason": "service \"bad name\": names must match [a-z0-9][a-z0-9_.-]{0,127}: service names are lower case, as host names ignore case (Web would capture web's traffic)"},
            {"key": format!("{p}/services/web/broken"),
             "reason": "address \"10.0.0.9:80 backup\": port \"80 backup\" is not a number in 1..65535"}
        ],
        "refused": []
    });
    assert_eq!(doc, expected);

    // The lease id is the one etcdctl knows.
    let out = tokio::process::Command::new("etcdctl")
        .args(["--endpoints", &ep, "lease", "list"])
        .env("ETCDCTL_API", "3")
        .output()
        .await
        .expect("etcdctl");
    assert!(
        text(&out.stdout).contains(&f.lease_hex),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn unreachable_etcd_and_bad_names_fail_with_a_message() {
    let ep = format!("http://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let out = portolan(&["ls", "--etcd-endpoints", &ep]).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&ep) && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(15));

    let out = portolan(&["ls", "bad name", "--etcd-endpoints", &ep]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("service \"bad name\""),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn addrs_prints_one_host_port_a_line_for_scripts() {
    let f = fixture().await;
    let ep = f.etcd.endpoint();
    let out = portolan(&[
        "ls",
        "web",
        "--addrs",
        "--etcd-endpoints",
        &ep,
        "--prefix",
        &f.prefix,
    ])
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "10.0.0.5:32768\n10.0.0.6:32769\n");
    let out = portolan(&[
        "ls",
        "api",
        "--addrs",
        "--etcd-endpoints",
        &ep,
        "--prefix",
        &f.prefix,
    ])
    .await;
    assert_eq!(text(&out.stdout), "10.0.0.9:80\n");
    let out = portolan(&["ls", "--addrs", "--json", "--etcd-endpoints", &ep]).await;
    assert!(!out.status.success(), "--addrs with --json must be refused");
}

/// More keys than one page of the listing (1,000), and more bytes than gRPC's 4 MiB
/// default message limit: all listed, from one revision.
#[tokio::test]
async fn a_listing_larger_than_one_message_is_read_in_pages() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix("ls-big");
    let mut c = etcd.client().await;
    // ~2 KiB of tags per record: 2,500 records are ~5 MiB.
    let tags: Vec<String> = (0..150).map(|i| format!("\"tag-{i:08}\"")).collect();
    let tags = tags.join(",");
    let n = 2500;
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("{prefix}/services/big/i-{i:05}"),
                    format!(
                        r#"{{"addr":"10.1.{}.{}:80","tags":[{tags}]}}"#,
                        i / 250,
                        i % 250
                    ),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("txn");
    }
    let out = portolan(&[
        "ls",
        "big",
        "--json",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--prefix",
        &prefix,
    ])
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.len() > 4 << 20, "{} bytes", out.stdout.len());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["services"]["big"].as_array().map(Vec::len), Some(n));
    let out = portolan(&[
        "ls",
        "big",
        "--addrs",
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--prefix",
        &prefix,
    ])
    .await;
    assert_eq!(text(&out.stdout).lines().count(), n);
}
