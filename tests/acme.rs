//! ACME for the fleet against a real Pebble (the ACME test CA, Debian package
//! `pebble`): two watchers and two HAProxys share one etcd; one of them issues at a
//! time, every front door answers the CA's HTTP-01 challenges from etcd, and the
//! certificate lands in `<prefix>/certs/<name>` as the store's record.
//!
//! Pebble's directory speaks TLS with a CA this test makes (rcgen); its DNS is
//! `pebble-challtestsrv`, which answers every name with the front door the test picks
//! (127.0.0.1 or 127.0.0.2: the two HAProxys bind the same port on those addresses,
//! the one port Pebble's HTTP-01 validation connects to).
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::haproxy::{Backend, FrontDoor, HookReceiver, Options};
use common::*;

const T: Duration = Duration::from_secs(60);

/// Polls `f` every 20 ms until it gives a value, or fails naming `what` after `T`.
async fn got<V, F, Fut>(what: &str, mut f: F) -> Option<V>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<V>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > T {
            eprintln!("timed out waiting for {what}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pebble with its DNS, on free ports, in a temp dir.
struct Pebble {
    dir: tempfile::TempDir,
    directory: String,
    management: String,
    dns_management: String,
    /// Where HTTP-01 validation connects: the fleet's front doors bind it.
    http_port: u16,
    log: PathBuf,
    _pebble: Proc,
    _dns: Proc,
}

impl Pebble {
    /// `http_port`: where HTTP-01 validation connects; `validity_s`: certificate
    /// lifetime (None: Pebble's default, years).
    async fn start(validity_s: Option<u64>) -> Pebble {
        let http_port = free_port();
        need("pebble", "pebble");
        need("pebble-challtestsrv", "pebble");
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            "portolan test: Pebble's directory CA",
        );
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
                .unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "pebble");
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();

        let (port, mgmt, dns, dns_mgmt) = (free_port(), free_port(), free_port(), free_port());
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": "cert.pem",
            "privateKey": "key.pem",
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(v) = validity_s {
            config["pebble"]["certificateValidityPeriod"] = v.into();
        }
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let mut c = owned_command("pebble-challtestsrv");
        c.current_dir(dir.path())
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let dns_proc = Proc::spawn("pebble-challtestsrv", &mut c);
        let log = dir.path().join("pebble.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut c = owned_command("pebble");
        c.current_dir(dir.path())
            .args(["-config", "pebble.json"])
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let pebble = Proc::spawn("pebble", &mut c);
        let p = Pebble {
            directory: format!("https://127.0.0.1:{port}/dir"),
            management: format!("https://127.0.0.1:{mgmt}"),
            dns_management: format!("http://127.0.0.1:{dns_mgmt}"),
            http_port,
            log,
            dir,
            _pebble: pebble,
            _dns: dns_proc,
        };
        let client = p.client();
        let url = p.directory.clone();
        wait_until("Pebble's directory", T, || async {
            client.get(&url).send().await.is_ok()
        })
        .await;
        p
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.ca_file()).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
    }

    /// The root Pebble issues under (from its management interface).
    async fn root(&self) -> String {
        let url = format!("{}/roots/0", self.management);
        self.client()
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Orders Pebble took, counted in its own log.
    fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Added order")
            .count()
    }

    /// `host` resolves to `ip` for Pebble from now on.
    async fn point(&self, host: &str, ip: &str) {
        let r = reqwest::Client::new()
            .post(format!("{}/add-a", self.dns_management))
            .body(serde_json::json!({"host": format!("{host}."), "addresses": [ip]}).to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{r:?}");
    }
}

/// Two front doors on one etcd prefix, each with `[acme]` on; their HAProxys bind
/// 127.0.0.1:P and 127.0.0.2:P.
struct Fleet {
    etcd: Etcd,
    doors: Vec<FrontDoor>,
    prefix: String,
    port: u16,
    _backend: Backend,
}

async fn fleet(pebble: &Pebble, hook: Option<&str>) -> Fleet {
    fleet_at(&pebble.directory, &pebble.ca_file(), pebble.http_port, hook).await
}

async fn fleet_at(directory: &str, ca_file: &Path, port: u16, hook: Option<&str>) -> Fleet {
    let etcd = Etcd::start().await;
    let mut doors = Vec::new();
    for _ in 0..2 {
        doors.push(FrontDoor::prepare(&etcd, Options::default()).await);
    }
    let prefix = doors[0].prefix.clone();
    for (i, fd) in doors.iter_mut().enumerate() {
        let mut text = std::fs::read_to_string(&fd.config).unwrap();
        text = text.replace(
            &format!("prefix = \"{}\"", fd.prefix),
            &format!("prefix = \"{prefix}\""),
        );
        text = text.replace(
            &format!("http_bind = \"127.0.0.1:{}\"", fd.http_port),
            &format!("http_bind = \"127.0.0.{}:{port}\"", i + 1),
        );
        text.push_str(&format!(
            "\n[acme]\nenabled = true\ndirectory = {directory:?}\nca_file = {:?}\nemail = \"ops@example.com\"\nlock_ttl_s = 2\nretry_min_s = 1\n",
            ca_file.display().to_string()
        ));
        if let Some(url) = hook {
            text.push_str(&format!(
                "\n[[hook]]\nevents = [\"cert_issued\", \"cert_renewed\", \"cert_failed\"]\nurl = {url:?}\n"
            ));
        }
        std::fs::write(&fd.config, text).unwrap();
        fd.prefix = prefix.clone();
        fd.http_port = port;
        fd.start_watcher();
    }
    for fd in &doors {
        let ok = eventually(Duration::from_secs(20), || async {
            fd.haproxy.status().await.is_some_and(|s| s.reloads >= 1)
        })
        .await;
        assert!(
            ok,
            "no first reload; watcher log:\n{}\nhaproxy:\n{}",
            fd.log(),
            fd.haproxy.log_text()
        );
    }
    let backend = Backend::start("web-1").await;
    Fleet {
        etcd,
        doors,
        prefix,
        port,
        _backend: backend,
    }
}

impl Fleet {
    fn http_addr(&self, i: usize) -> String {
        format!("127.0.0.{}:{}", i + 1, self.port)
    }

    async fn put(&self, key: &str, value: &str) {
        self.etcd
            .client()
            .await
            .put(key, value, None)
            .await
            .unwrap();
    }

    async fn get(&self, key: &str) -> Option<String> {
        let mut c = self.etcd.client().await;
        let r = c.get(key, None).await.ok()?;
        r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// A routed service `name` with one instance.
    async fn service(&self, name: &str) {
        let key = self.doors[0].service_key(name, "i1");
        self.put(&key, &self._backend.record()).await;
    }

    async fn record(&self, name: &str) -> Option<serde_json::Value> {
        let v = self.get(&format!("{}/certs/{name}", self.prefix)).await?;
        serde_json::from_str(&v).ok()
    }

    /// Index of the door whose watcher holds the issuer's lock.
    async fn issuer(&self) -> usize {
        let key = format!("{}/acme/lock", self.prefix);
        let who = got("an issuer", || self.get(&key))
            .await
            .expect("an issuer");
        self.doors.iter().position(|d| d.name == who).unwrap()
    }

    fn logs(&self) -> String {
        self.doors
            .iter()
            .map(|d| d.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

/// The record's certificate: its DNS names, and whether it chains to `root`.
fn check_chain(record: &serde_json::Value, root: &str, dir: &Path) -> Vec<String> {
    let chain = record["cert"].as_str().unwrap();
    let leaf = portolan::acme::record::leaf(chain).unwrap();
    std::fs::write(dir.join("chain.pem"), chain).unwrap();
    std::fs::write(dir.join("root.pem"), root).unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args([
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "chain.pem",
            "chain.pem",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the certificate does not chain to Pebble's root: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The key is the leaf's: openssl agrees on the public key.
    std::fs::write(dir.join("key.pem"), record["key"].as_str().unwrap()).unwrap();
    let pubkey = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let from_cert = pubkey(&["x509", "-in", "chain.pem", "-noout", "-pubkey"]);
    let from_key = pubkey(&["pkey", "-in", "key.pem", "-pubout"]);
    assert!(
        !from_cert.is_empty() && from_cert == from_key,
        "key does not match the leaf"
    );
    leaf.domains
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_gets_one_certificate_ordered_once_for_the_fleet() {
    let pebble = Pebble::start(None).await;
    let f = fleet(&pebble, None).await;
    f.service("web").await;
    let Some(rec) = got("a record", || f.record("web.test")).await else {
        panic!("no certificate record; logs:\n{}", f.logs());
    };
    assert_eq!(rec["source"], "acme");
    assert_eq!(rec["domains"], serde_json::json!(["web.test"]));
    for k in ["not_after", "issued_at"] {
        let v = rec[k].as_str().unwrap();
        assert!(humantime::parse_rfc3339(v).is_ok(), "{k} = {v}");
    }
    let root = pebble.root().await;
    assert_eq!(check_chain(&rec, &root, pebble.dir.path()), ["web.test"]);
    // Marker: a second service's certificate comes after; by then the first was
    // ordered exactly once, by one watcher, whichever of the two.
    f.service("api").await;
    let found = eventually(T, || async { f.record("api.test").await.is_some() }).await;
    assert!(found, "no record for api.test; logs:\n{}", f.logs());
    assert_eq!(pebble.orders(), 2, "orders at Pebble; logs:\n{}", f.logs());
    let issued: f64 = {
        let mut n = 0.0;
        for d in &f.doors {
            n += d
                .metric("portolan_acme_orders_total{result=\"created\"}")
                .await
                .unwrap_or(0.0);
        }
        n
    };
    assert_eq!(issued, 2.0);
    // The account lives in etcd, for whichever watcher issues next.
    let account = f.get(&format!("{}/acme/account", f.prefix)).await.unwrap();
    let account: serde_json::Value = serde_json::from_str(&account).unwrap();
    assert_eq!(account["directory"], pebble.directory.as_str());
    // Nothing of the orders is left behind.
    let mut c = f.etcd.client().await;
    let left = c
        .get(
            format!("{}/acme/orders/", f.prefix),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_issuer_mid_order_the_other_watcher_finishes_that_order() {
    let pebble = Pebble::start(None).await;
    let mut f = fleet(&pebble, None).await;
    let issuer = f.issuer().await;
    let other = 1 - issuer;
    // The CA reaches only the other front door: its watcher answers the challenge the
    // first issuer may have put, or the one it puts itself.
    pebble
        .point("web.test", &format!("127.0.0.{}", other + 1))
        .await;
    f.service("web").await;
    let order_key = format!("{}/acme/orders/web.test", f.prefix);
    let ordered = got("the order in etcd", || f.get(&order_key)).await;
    assert!(ordered.is_some(), "no order; logs:\n{}", f.logs());
    f.doors[issuer].kill_watcher();
    let Some(rec) = got("a record", || f.record("web.test")).await else {
        panic!("no certificate record; logs:\n{}", f.logs());
    };
    assert_eq!(rec["domains"], serde_json::json!(["web.test"]));
    assert_eq!(
        check_chain(&rec, &pebble.root().await, pebble.dir.path()),
        ["web.test"]
    );
    // The order was taken over, not placed again.
    assert_eq!(pebble.orders(), 1, "orders at Pebble; logs:\n{}", f.logs());
    let d = &f.doors[other];
    assert_eq!(
        d.metric("portolan_acme_orders_total{result=\"resumed\"}")
            .await,
        Some(1.0),
        "{}",
        d.log()
    );
    assert_eq!(
        d.metric("portolan_acme_orders_total{result=\"created\"}")
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_certificate_is_renewed_before_its_end() {
    // 30 s certificates: renewed a third of their life before the end (20 s in).
    let pebble = Pebble::start(Some(30)).await;
    let hooks = HookReceiver::start().await;
    let f = fleet(&pebble, Some(&hooks.url)).await;
    f.service("web").await;
    let Some(first) = got("a record", || f.record("web.test")).await else {
        panic!("no certificate record; logs:\n{}", f.logs());
    };
    let renewed = got("a renewed record", || async {
        f.record("web.test")
            .await
            .filter(|r| r["cert"] != first["cert"])
    })
    .await;
    let Some(second) = renewed else {
        panic!("not renewed; logs:\n{}", f.logs());
    };
    assert_ne!(second["key"], first["key"], "a renewal makes a new key");
    assert!(second["not_after"].as_str() > first["not_after"].as_str());
    check_chain(&second, &pebble.root().await, pebble.dir.path());
    let ok = eventually(T, || async {
        !hooks.events("cert_renewed").is_empty() && !hooks.events("cert_issued").is_empty()
    })
    .await;
    assert!(ok, "hooks: {:?}", hooks.bodies.lock().unwrap());
    let e = &hooks.events("cert_renewed")[0];
    assert_eq!(e["name"], "web.test");
    assert_eq!(e["reason"], "renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_front_door_answers_a_challenge_put_in_etcd() {
    // No CA needed: a token put in etcd is answered by both front doors, whichever
    // watcher would issue. (The directory does not answer: issuing just retries.)
    let not_a_ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let f = fleet_at("https://127.0.0.1:1/dir", &not_a_ca, free_port(), None).await;
    let thumb = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";
    let key = |t: &str| format!("{}/acme/challenges/{t}", f.prefix);
    f.put(&key("tok-A_1"), &format!("tok-A_1.{thumb}")).await;
    // A value that is not the token's key authorization: never served.
    f.put(&key("evil"), "evil.x\r\nSet-Cookie: a=b").await;
    for i in 0..2 {
        let addr = f.http_addr(i);
        let ok = eventually(T, || async {
            http_get(
                &addr,
                "anything.example",
                "/.well-known/acme-challenge/tok-A_1",
            )
            .await
                == Some((200, format!("tok-A_1.{thumb}")))
        })
        .await;
        assert!(ok, "front door {i} did not answer; logs:\n{}", f.logs());
        let (status, body) = http_get(&addr, "x", "/.well-known/acme-challenge/evil")
            .await
            .unwrap();
        assert_eq!(status, 404, "{body}");
        assert!(!body.contains("Set-Cookie"));
    }
    // Deleted: no longer answered.
    f.etcd
        .client()
        .await
        .delete(key("tok-A_1"), None)
        .await
        .unwrap();
    for i in 0..2 {
        let addr = f.http_addr(i);
        let ok = eventually(T, || async {
            matches!(
                http_get(&addr, "x", "/.well-known/acme-challenge/tok-A_1").await,
                Some((404, _))
            )
        })
        .await;
        assert!(ok, "front door {i} still answers a deleted challenge");
    }
}
