//! Least privilege end to end: an etcd with TLS and auth on, users made by `portolan
//! auth`, and a registrar and a watcher that do their whole job with exactly those
//! users. Their passwords appear in no command line, environment or log.
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::pki::{make_pki, tls_etcd};
use common::*;
use portolan::config::{EtcdTls, Secret};

const T: Duration = Duration::from_secs(20);

struct SecureEtcd {
    endpoint: String,
    _proc: Proc,
}

/// An etcd serving https with `server.pem`, with a root user and auth enabled.
async fn secure_etcd(dir: &Path, root_pw: &str) -> SecureEtcd {
    need("etcd", "etcd-server");
    let (endpoint, proc) = tls_etcd(dir, false);
    let mut cfg = EtcdConfig::local(&endpoint, "/x");
    cfg.tls = Some(EtcdTls {
        ca_file: dir.join("ca.pem"),
        client: None,
    });
    wait_until("the TLS etcd to answer", T, || async {
        match portolan::etcd::connect(&cfg).await {
            Ok(mut c) => c.status().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let mut c = portolan::etcd::connect(&cfg).await.expect("connect");
    c.user_add("root", root_pw, None)
        .await
        .expect("user add root");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.auth_enable().await.expect("auth enable");
    SecureEtcd {
        endpoint,
        _proc: proc,
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Everything a process exposes to other local users: its command line and environment.
fn exposed(pid: i32) -> String {
    let read = |f: &str| {
        std::fs::read(format!("/proc/{pid}/{f}"))
            .map(|b| text(&b).replace('\0', " "))
            .unwrap_or_default()
    };
    format!("{} {}", read("cmdline"), read("environ"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_and_a_watcher_work_with_only_the_users_portolan_auth_made() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let root_pw = "root-pw-least-privilege";
    let etcd = secure_etcd(d, root_pw).await;
    let ep = etcd.endpoint.clone();
    let prefix = unique_prefix("lp");
    let ca = d.join("ca.pem");
    write_private(d.join("root.pw"), root_pw);
    let tls_args = |cmd: &mut std::process::Command| {
        cmd.args(["--etcd-endpoints", &ep, "--prefix", &prefix])
            .arg("--etcd-ca")
            .arg(&ca);
    };
    for (what, name, file) in [("add-node", "n1", "n1.pw"), ("add-watcher", "lb", "lb.pw")] {
        let mut cmd = portolan_cmd();
        cmd.args([
            "--config",
            "/dev/null",
            "auth",
            what,
            name,
            // What the daemons do with these users is the point here; whether etcd
            // enforces the roles against a hostile host is tests/etcd_rbac_bypass.rs.
            "--allow-unsafe-etcd",
            "--password-file",
        ])
        .arg(d.join(file))
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(d.join("root.pw"));
        tls_args(&mut cmd);
        let out = cmd.output().expect("run portolan auth");
        assert!(out.status.success(), "auth {what}: {}", text(&out.stderr));
    }
    let node_secret = std::fs::read_to_string(d.join("n1.pw"))
        .unwrap()
        .trim()
        .to_string();
    let lb_secret = std::fs::read_to_string(d.join("lb.pw"))
        .unwrap()
        .trim()
        .to_string();

    // The registrar, as user portolan-node-n1.
    let run = unique("lp-run");
    let reg_log = d.join("registrar.log");
    let mut cmd = portolan_cmd();
    cmd.args(["--config", "/dev/null", "registrar", "--node", "n1"])
        .args(["--advertise-ip", "127.0.0.1", "--ttl", "5"])
        .args(["--only-label", &format!("{TEST_LABEL}={run}")])
        .args([
            "--etcd-username",
            "portolan-node-n1",
            "--etcd-password-file",
        ])
        .arg(d.join("n1.pw"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&reg_log).unwrap())
        .stderr(std::fs::File::create(d.join("registrar.err")).unwrap());
    tls_args(&mut cmd);
    let registrar = Proc::spawn("registrar", &mut cmd);

    // The watcher, as user portolan-watcher-lb: a small template, no HAProxy needed to
    // show what it reads and writes.
    std::fs::write(
        d.join("t.tera"),
        "{% for name, list in services %}backend {{ name }}\n{% for i in list %}  server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        d.join("watcher.toml"),
        format!(
            "[etcd]\nendpoints = [\"{ep}\"]\nprefix = \"{prefix}\"\nca_file = \"{}\"\n\
             username = \"portolan-watcher-lb\"\npassword_file = \"{}\"\n\
             [watcher]\nname = \"lb\"\nallowed_networks = [\"127.0.0.0/8\"]\n\
             [[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\nreload_cmd = \"env > {}\"\n",
            ca.display(),
            d.join("lb.pw").display(),
            d.join("child.env").display()
        ),
    )
    .unwrap();
    let w_log = d.join("watcher.log");
    let mut cmd = portolan_cmd();
    cmd.arg("--config")
        .arg(d.join("watcher.toml"))
        .arg("watcher")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&w_log).unwrap())
        .stderr(std::fs::File::create(d.join("watcher.err")).unwrap());
    let watcher = Proc::spawn("watcher", &mut cmd);

    let c = Container::run(
        &run,
        &["-p", "127.0.0.1::8080", "-l", "portolan.service=web"],
        None,
    );
    let addr = format!("127.0.0.1:{}", c.host_port(8080));
    let out = d.join("out.cfg");
    let logs = || {
        format!(
            "registrar:\n{}{}\nwatcher:\n{}{}",
            std::fs::read_to_string(&reg_log).unwrap_or_default(),
            std::fs::read_to_string(d.join("registrar.err")).unwrap_or_default(),
            std::fs::read_to_string(&w_log).unwrap_or_default(),
            std::fs::read_to_string(d.join("watcher.err")).unwrap_or_default()
        )
    };
    let routed = eventually(T, || async {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains(&addr))
    })
    .await;
    assert!(
        routed,
        "the container never reached the rendered file\n{}",
        logs()
    );

    let mut root_cfg = EtcdConfig::local(&ep, &prefix);
    root_cfg.tls = Some(EtcdTls {
        ca_file: ca.clone(),
        client: None,
    });
    root_cfg.username = Some("root".into());
    root_cfg.password = Some(Secret::new(root_pw));
    let status = eventually(T, || async {
        let mut root = portolan::etcd::connect(&root_cfg).await.expect("root");
        root.get(format!("{prefix}/watchers/lb"), None)
            .await
            .is_ok_and(|r| !r.kvs().is_empty())
    })
    .await;
    // No write was refused. The registrar's one expected refusal is a read: the v1
    // layout probe outside its node prefix, logged once as such.
    let all = logs();
    let refused: Vec<&str> = all
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            (l.contains("permission denied") || l.contains("refuses access"))
                && !l.contains("not looking for keys of the v1 layout")
        })
        .collect();
    assert!(
        refused.is_empty(),
        "refused under least privilege:\n{}",
        refused.join("\n")
    );
    assert!(status, "the watcher never wrote its status key\n{all}");

    // What each wrote, read back as root after the watcher wrote its status key: the
    // registrar under its node prefix, the watcher its status key, nothing else.
    let mut root = portolan::etcd::connect(&root_cfg).await.expect("root");
    let keys: Vec<String> = root
        .get(
            format!("{prefix}/"),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| text(kv.key()))
        .collect();
    let node_key = format!("{prefix}/nodes/n1/node");
    assert!(keys.contains(&node_key), "{keys:?}");
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{prefix}/nodes/n1/services/web/n1-"))),
        "{keys:?}"
    );
    assert!(keys.contains(&format!("{prefix}/watchers/lb")), "{keys:?}");
    for k in &keys {
        assert!(
            k.starts_with(&format!("{prefix}/nodes/n1/")) || k == &format!("{prefix}/watchers/lb"),
            "unexpected key {k}"
        );
    }

    // The secrets: in no command line, environment, log, or check/reload child.
    for (who, pid) in [("registrar", registrar.pid()), ("watcher", watcher.pid())] {
        let e = exposed(pid);
        assert!(
            !e.contains(&node_secret) && !e.contains(&lb_secret),
            "{who} exposes a password"
        );
    }
    assert!(
        !all.contains(&node_secret) && !all.contains(&lb_secret),
        "a password in a log"
    );
    let child_env = std::fs::read_to_string(d.join("child.env")).unwrap_or_default();
    assert!(!child_env.is_empty(), "the reload command never ran");
    assert!(
        !child_env.contains(&lb_secret),
        "the reload child inherits the password"
    );
}

/// Whoever reads `<prefix>/certs/` holds every front door's private keys. The attack:
/// a host's registrar credentials (a node user) reading them, or a plain watcher's
/// writing one (choosing what every front door serves). Only the watchers read them,
/// and only a watcher made with `--issuer` writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_user_cannot_read_certificates_and_only_an_issuer_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let root_pw = "root-pw-certs";
    let etcd = secure_etcd(d, root_pw).await;
    let ep = etcd.endpoint.clone();
    let prefix = unique_prefix("lpc");
    write_private(d.join("root.pw"), root_pw);
    let users = [
        ("add-node", "n1", false),
        ("add-watcher", "lb", false),
        ("add-watcher", "acme1", true),
    ];
    for (what, name, issuer) in users {
        let mut cmd = portolan_cmd();
        cmd.args([
            "--config",
            "/dev/null",
            "auth",
            what,
            name,
            "--allow-unsafe-etcd",
        ]);
        if issuer {
            cmd.arg("--issuer");
        }
        cmd.arg("--password-file")
            .arg(d.join(format!("{name}.pw")))
            .args(["--etcd-username", "root", "--etcd-password-file"])
            .arg(d.join("root.pw"))
            .args(["--etcd-endpoints", &ep, "--prefix", &prefix])
            .arg("--etcd-ca")
            .arg(d.join("ca.pem"));
        let out = cmd.output().expect("run portolan auth");
        assert!(out.status.success(), "auth {what}: {}", text(&out.stderr));
    }
    let as_user = |user: &str, pw: &str| {
        let mut c = EtcdConfig::local(&ep, &prefix);
        c.tls = Some(EtcdTls {
            ca_file: d.join("ca.pem"),
            client: None,
        });
        c.username = Some(user.into());
        c.password = Some(Secret::new(pw));
        c
    };
    let pw = |name: &str| {
        std::fs::read_to_string(d.join(format!("{name}.pw")))
            .unwrap()
            .trim()
            .to_string()
    };
    let cert_key = format!("{prefix}/certs/web");
    let secret = r#"{"cert":"","key":"-----BEGIN PRIVATE KEY----- secret","domains":[],"not_after":"","source":"import","issued_at":""}"#;
    let mut root = portolan::etcd::connect(&as_user("root", root_pw))
        .await
        .expect("root");
    root.put(cert_key.as_str(), secret, None)
        .await
        .expect("root writes a certificate");
    root.put(format!("{prefix}/acme/account"), "account key", None)
        .await
        .expect("root writes acme/");

    // The node user: neither certs/ nor acme/, by key or by prefix.
    let mut node = portolan::etcd::connect(&as_user("portolan-node-n1", &pw("n1")))
        .await
        .expect("node");
    for (what, r) in [
        ("get certs/web", node.get(cert_key.as_str(), None).await),
        (
            "get --prefix certs/",
            node.get(
                format!("{prefix}/certs/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await,
        ),
        (
            "get acme/account",
            node.get(format!("{prefix}/acme/account"), None).await,
        ),
    ] {
        match r {
            Err(e) => assert!(e.to_string().contains("permission denied"), "{what}: {e}"),
            Ok(resp) => panic!(
                "node user could {what}: {:?}",
                resp.kvs().first().map(|kv| text(kv.value()))
            ),
        }
    }
    // A plain watcher reads them (it serves them) but cannot write them.
    let mut lb = portolan::etcd::connect(&as_user("portolan-watcher-lb", &pw("lb")))
        .await
        .expect("lb");
    let got = lb
        .get(cert_key.as_str(), None)
        .await
        .expect("the watcher reads certs/");
    assert_eq!(got.kvs().len(), 1);
    let e = lb
        .put(cert_key.as_str(), "{}", None)
        .await
        .expect_err("a plain watcher writes certs/");
    assert!(e.to_string().contains("permission denied"), "{e}");
    // The issuer writes both.
    let mut issuer = portolan::etcd::connect(&as_user("portolan-watcher-acme1", &pw("acme1")))
        .await
        .expect("issuer");
    issuer
        .put(cert_key.as_str(), secret, None)
        .await
        .expect("the issuer writes certs/");
    issuer
        .put(format!("{prefix}/acme/orders/x"), "o", None)
        .await
        .expect("the issuer writes acme/");
}
