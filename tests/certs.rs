//! HTTPS at every front door: certificates in etcd (`<prefix>/certs/<name>`), served by
//! two watchers and two HAProxys sharing one etcd prefix, through the runtime API.
//! A certificate CA and leaves are made here (rcgen); clients trust only that CA and
//! read the certificate each handshake got, so "served" means a new handshake saw it.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::haproxy::{Backend, FrontDoor, Options, DOMAIN};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

const T: Duration = Duration::from_secs(20);

/// A root and an intermediate it signed; leaves come from the intermediate.
struct Ca {
    root_pem: String,
    inter_pem: String,
    inter_params: CertificateParams,
    inter_key: KeyPair,
}

/// One issued leaf: its DER (what a handshake shows), the chain and the key as PEM.
struct Leaf {
    der: Vec<u8>,
    chain: String,
    leaf_pem: String,
    key: String,
}

fn ca() -> Ca {
    let root_key = KeyPair::generate().unwrap();
    let mut rp = CertificateParams::new(Vec::<String>::new()).unwrap();
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "Portolan Test Root");
    let root = rp.self_signed(&root_key).unwrap();
    let inter_key = KeyPair::generate().unwrap();
    let mut ip = CertificateParams::new(Vec::<String>::new()).unwrap();
    ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "Portolan Test Intermediate");
    let inter = ip
        .signed_by(&inter_key, &Issuer::from_params(&rp, &root_key))
        .unwrap();
    Ca {
        root_pem: root.pem(),
        inter_pem: inter.pem(),
        inter_params: ip,
        inter_key,
    }
}

impl Ca {
    /// A leaf for `names`, valid from `days.0` to `days.1` days from now.
    fn leaf(&self, names: &[&str], days: (i64, i64)) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let cert = p
            .signed_by(
                &key,
                &Issuer::from_params(&self.inter_params, &self.inter_key),
            )
            .unwrap();
        Leaf {
            der: cert.der().to_vec(),
            chain: format!("{}{}", cert.pem(), self.inter_pem),
            leaf_pem: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn record(chain: &str, key: &str, domains: &[&str]) -> String {
    serde_json::json!({
        "cert": chain, "key": key, "domains": domains,
        "not_after": "2030-01-01T00:00:00Z", "source": "import",
        "issued_at": "2026-01-01T00:00:00Z",
    })
    .to_string()
}

fn host() -> String {
    format!("web.{DOMAIN}")
}

/// A client that trusts only `root` (strict) or anything (to read what is served).
fn client(fd: &FrontDoor, root: Option<&str>) -> reqwest::Client {
    let addr: SocketAddr = format!("127.0.0.1:{}", fd.https_port).parse().unwrap();
    let b = reqwest::Client::builder()
        .resolve(&host(), addr)
        .tls_info(true)
        // Every request a new connection, so a new handshake.
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5));
    match root {
        Some(pem) => b
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()),
        None => b.danger_accept_invalid_certs(true),
    }
    .build()
    .unwrap()
}

fn url(fd: &FrontDoor) -> String {
    format!("https://{}:{}/", host(), fd.https_port)
}

/// The certificate a new handshake with `fd` gets for web.test (and the body).
async fn served(fd: &FrontDoor) -> Option<(Vec<u8>, String)> {
    let r = client(fd, None).get(url(fd)).send().await.ok()?;
    let der = r
        .extensions()
        .get::<reqwest::tls::TlsInfo>()?
        .peer_certificate()?
        .to_vec();
    Some((der, r.text().await.ok()?))
}

async fn serves(fd: &FrontDoor, der: &[u8]) -> bool {
    served(fd).await.is_some_and(|(d, _)| d == der)
}

/// Two front doors (admin sockets, HTTPS on free ports) whose watchers share a prefix.
async fn two_front_doors(etcd: &Etcd) -> (FrontDoor, FrontDoor) {
    let mut a = FrontDoor::prepare(etcd, Options::with_admin_socket()).await;
    let mut b = FrontDoor::prepare(etcd, Options::with_admin_socket()).await;
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(&b.config, cfg.replace(&b.prefix, &a.prefix)).unwrap();
    b.prefix = a.prefix.clone();
    a.start_watcher();
    b.start_watcher();
    a.wait_for_first_reload().await;
    b.wait_for_first_reload().await;
    (a, b)
}

/// `certs_refused` of `fd`'s watcher in its status key.
async fn refused(etcd: &Etcd, fd: &FrontDoor) -> serde_json::Map<String, serde_json::Value> {
    let key = format!("{}/watchers/{}", fd.prefix, fd.name);
    etcd.get_prefix(&key)
        .await
        .into_iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| serde_json::from_str::<serde_json::Value>(&v).ok())
        .and_then(|v| v.get("certs_refused")?.as_object().cloned())
        .unwrap_or_default()
}

fn certs_cmd(etcd: &Etcd, prefix: &str, args: &[&str]) -> std::process::Output {
    portolan_cmd()
        .args(["--config", "/dev/null", "certs"])
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint(), "--prefix", prefix])
        .output()
        .expect("run portolan certs")
}

fn import(
    etcd: &Etcd,
    prefix: &str,
    dir: &std::path::Path,
    name: &str,
    leaf: &Leaf,
) -> std::process::Output {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, &leaf.chain).unwrap();
    std::fs::write(&k, &leaf.key).unwrap();
    portolan_cmd()
        .args(["--config", "/dev/null", "certs", "import", name, "--cert"])
        .arg(&c)
        .arg("--key")
        .arg(&k)
        .args(["--etcd-endpoints", &etcd.endpoint(), "--prefix", prefix])
        .output()
        .expect("run portolan certs import")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_goes_live_renews_and_goes_at_both_front_doors_without_a_reload() {
    let etcd = Etcd::start().await;
    let (a, b) = two_front_doors(&etcd).await;
    let backend = Backend::start("web").await;
    etcd.put(&a.service_key("web", "1"), &backend.record())
        .await;
    for fd in [&a, &b] {
        wait_until("web routed", T, || fd.routes_to("web", "web")).await;
    }
    // Before any certificate: the watcher's self-signed default answers.
    let ca = ca();
    let strict = client(&a, Some(&ca.root_pem));
    assert!(
        strict.get(url(&a)).send().await.is_err(),
        "the default certificate is not the CA's"
    );
    let reloads = (a.haproxy.reloads().await, b.haproxy.reloads().await);

    // Imported (through the CLI): live at both, no reload.
    let v1 = ca.leaf(&[&host()], (-1, 30));
    let tmp = tempfile::tempdir().unwrap();
    let out = import(&etcd, &a.prefix, tmp.path(), "web", &v1);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for fd in [&a, &b] {
        wait_until("v1 served", T, || serves(fd, &v1.der)).await;
        let r = client(fd, Some(&ca.root_pem))
            .get(url(fd))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "web", "HTTPS routes like HTTP");
        // HTTP is redirected for a host a certificate covers.
        let (status, _) = fd.get("web").await.unwrap();
        assert_eq!(status, 301);
    }
    assert_eq!(
        (a.haproxy.reloads().await, b.haproxy.reloads().await),
        reloads,
        "no reload for an added certificate"
    );

    // `certs ls` names both front doors as serving it (once both status keys say so:
    // each watcher writes its own after its pass).
    let ls_row = || async {
        let ls = certs_cmd(&etcd, &a.prefix, &["ls", "--json"]);
        assert!(
            ls.status.success(),
            "{}",
            String::from_utf8_lossy(&ls.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
        v["certs"][0].clone()
    };
    let mut names = vec![a.name.clone(), b.name.clone()];
    names.sort();
    let both = serde_json::json!(names);
    wait_until("certs ls: served by both", T, || async {
        let row = ls_row().await;
        let mut by: Vec<String> = row["served_by"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        by.sort();
        serde_json::json!(by) == both
    })
    .await;
    let row = ls_row().await;
    assert_eq!(row["name"], "web");
    assert_eq!(row["source"], "import");
    assert_eq!(row["domains"], serde_json::json!([host()]));
    assert!(
        row["days_left"]
            .as_i64()
            .is_some_and(|d| (28..=30).contains(&d)),
        "{row}"
    );

    // Renewal under load: every handshake at either door succeeds, trusting the CA only.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for fd in [&a, &b] {
        let (c, u) = (client(fd, Some(&ca.root_pem)), url(fd));
        let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
        load.push(tokio::spawn(async move {
            // Bounded: at most 2000 requests a door, whatever happens.
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&u).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    wait_until("load running", T, || async {
        ok.load(Ordering::Relaxed) > 20
    })
    .await;
    let v2 = ca.leaf(&[&host()], (-1, 60));
    etcd.put(
        &format!("{}/certs/web", a.prefix),
        &record(&v2.chain, &v2.key, &[&host()]),
    )
    .await;
    for fd in [&a, &b] {
        wait_until("v2 served", T, || serves(fd, &v2.der)).await;
    }
    let before = ok.load(Ordering::Relaxed);
    wait_until("load after the swap", T, || async {
        ok.load(Ordering::Relaxed) > before + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    eprintln!(
        "HTTPS requests during the swap: {} ok, {} failed",
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "{} requests ok",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        (a.haproxy.reloads().await, b.haproxy.reloads().await),
        reloads,
        "no reload for a renewal"
    );

    // Removed: the default certificate answers again, HTTP is served again, no reload.
    let rm = certs_cmd(&etcd, &a.prefix, &["rm", "web"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    for fd in [&a, &b] {
        wait_until("v2 gone", T, || async {
            served(fd).await.is_some_and(|(d, _)| d != v2.der)
        })
        .await;
        wait_until("no redirect", T, || fd.routes_to("web", "web")).await;
    }
    assert_eq!(
        (a.haproxy.reloads().await, b.haproxy.reloads().await),
        reloads,
        "no reload for a removal"
    );
    assert!(a.dest_is_valid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_certificate_is_refused_and_named_and_the_last_good_one_stays_served() {
    let etcd = Etcd::start().await;
    let (a, b) = two_front_doors(&etcd).await;
    let backend = Backend::start("web").await;
    etcd.put(&a.service_key("web", "1"), &backend.record())
        .await;
    let ca = ca();
    let good = ca.leaf(&[&host()], (-1, 30));
    // Routed first: the new backend is a reload of its own, before the baseline.
    for fd in [&a, &b] {
        wait_until("web routed", T, || fd.routes_to("web", "web")).await;
    }
    let key = format!("{}/certs/web", a.prefix);
    etcd.put(&key, &record(&good.chain, &good.key, &[&host()]))
        .await;
    for fd in [&a, &b] {
        wait_until("the good certificate served", T, || serves(fd, &good.der)).await;
    }
    let reloads = (a.haproxy.reloads().await, b.haproxy.reloads().await);
    let other = ca.leaf(&[&host()], (-1, 30));
    let expired = ca.leaf(&[&host()], (-60, -1));
    let h = host();
    let table: Vec<(&str, String, &str)> = vec![
        (
            "not PEM",
            record("not a certificate", &good.key, &[&h]),
            "not_pem",
        ),
        (
            "key mismatch",
            record(&good.chain, &other.key, &[&h]),
            "key_mismatch",
        ),
        (
            "expired",
            record(&expired.chain, &expired.key, &[&h]),
            "expired",
        ),
        (
            "wrong domain",
            record(&good.chain, &good.key, &["elsewhere.example"]),
            "domain",
        ),
        (
            "truncated chain",
            record(&good.leaf_pem, &good.key, &[&h]),
            "chain",
        ),
        (
            "wrong order",
            record(
                &format!("{}{}", ca.inter_pem, good.leaf_pem),
                &good.key,
                &[&h],
            ),
            "chain",
        ),
        ("not JSON", "{".to_string(), "json"),
    ];
    for (what, value, reason) in table {
        etcd.put(&key, &value).await;
        for fd in [&a, &b] {
            wait_until(&format!("{what} refused"), T, || async {
                refused(&etcd, fd)
                    .await
                    .get("web")
                    .and_then(|v| v.as_str())
                    .is_some_and(|s| s.ends_with(&format!("({reason})")))
            })
            .await;
            assert!(
                serves(fd, &good.der).await,
                "{what}: the last good certificate stays served"
            );
            assert!(
                fd.log().contains(&format!("certificate {key} refused")),
                "{what}: the log names the key"
            );
        }
        // The status of the next row starts from a good value again.
        etcd.put(&key, &record(&good.chain, &good.key, &[&h])).await;
        for fd in [&a, &b] {
            wait_until("refusal cleared", T, || async {
                refused(&etcd, fd).await.is_empty()
            })
            .await;
        }
    }
    let m = a
        .metric("portolan_cert_rejected_total{reason=\"key_mismatch\"}")
        .await;
    assert_eq!(m, Some(1.0));
    assert_eq!(
        (a.haproxy.reloads().await, b.haproxy.reloads().await),
        reloads
    );
    // The CLI refuses the same with the reason, and writes nothing.
    let tmp = tempfile::tempdir().unwrap();
    let bad = Leaf {
        key: other.key.clone(),
        ..ca.leaf(&[&host()], (-1, 30))
    };
    let out = import(&etcd, &a.prefix, tmp.path(), "web", &bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("key_mismatch") && err.contains("nothing was written"),
        "{err}"
    );
    for fd in [&a, &b] {
        assert!(serves(fd, &good.der).await);
    }

    // A watcher restarted while etcd holds a bad value keeps serving the last good one
    // (what it served is kept beside the files in certs_dir).
    etcd.put(&key, &record(&good.chain, &other.key, &[&h]))
        .await;
    wait_until("refused before the restart", T, || async {
        !refused(&etcd, &a).await.is_empty()
    })
    .await;
    let mut a = a;
    let before = a.haproxy.reloads().await;
    a.kill_watcher();
    a.start_watcher();
    wait_until("the restarted watcher's first reload", T, || async {
        a.haproxy.reloads().await > before
    })
    .await;
    wait_until("refused after the restart", T, || async {
        !refused(&etcd, &a).await.is_empty()
    })
    .await;
    assert!(
        serves(&a, &good.der).await,
        "the last good certificate survives a restart"
    );
}
