//! README promises that had no test of their own (issue 22, the last of them), each
//! against the real parts: etcd TLS files read again on reconnect, a periodic
//! `--resync` healing what the event streams missed, etcd auth tokens outliving
//! `--auth-token-ttl`, the deferred check's cap under churn, HAProxy refusing a runtime
//! batch, drain on the reload path and in a persistent backend, one reload at a time.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options};
use common::pki::make_pki;
use common::registrar::*;
use common::*;
use portolan::config::EtcdTls;

const T: Duration = Duration::from_secs(20);

// ---------- etcd over TLS, restartable with other certificates ----------

/// A single-member etcd on fixed ports demanding client certificates, restartable with
/// another PKI (a folder made by `make_pki`) over the same data.
struct TlsEtcd {
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
}

impl TlsEtcd {
    fn start(dir: &Path, pki: &Path) -> TlsEtcd {
        let mut e = TlsEtcd {
            dir: dir.to_path_buf(),
            client_port: free_port(),
            peer_port: free_port(),
            proc: None,
        };
        e.launch(pki);
        e
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    fn launch(&mut self, pki: &Path) {
        let endpoint = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let file = |name: &str| pki.join(name).display().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let mut cmd = owned_command("etcd");
        cmd.args(["--name", "tls", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .args(["--cert-file", &file("server.pem")])
            .args(["--key-file", &file("server.key")])
            .args(["--trusted-ca-file", &file("ca.pem"), "--client-cert-auth"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.proc = Some(Proc::spawn("etcd (TLS)", &mut cmd));
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// An `[etcd]` config using the CA, certificate and key in `files`.
fn tls_config(endpoint: &str, prefix: &str, files: &Path) -> EtcdConfig {
    let mut cfg = EtcdConfig::local(endpoint, prefix);
    cfg.tls = Some(EtcdTls {
        ca_file: files.join("ca.pem"),
        client: Some((files.join("client.pem"), files.join("client.key"))),
    });
    cfg
}

async fn answers(cfg: &EtcdConfig) -> bool {
    match portolan::etcd::connect(cfg).await {
        Ok(mut c) => portolan::etcd::call(c.status()).await.is_ok(),
        Err(_) => false,
    }
}

/// The lease of `key` (0 for none), None when the key is absent.
async fn lease_of(cfg: &EtcdConfig, key: &str) -> Option<i64> {
    let mut c = portolan::etcd::connect(cfg).await.ok()?;
    let r = portolan::etcd::call(c.get(key, None)).await.ok()?;
    r.kvs().first().map(|kv| kv.lease())
}

/// Copies `from`'s CA, client certificate and key over `to`'s, each by a rename (as
/// certificate tools do).
fn install_client_files(from: &Path, to: &Path) {
    for name in ["ca.pem", "client.pem", "client.key"] {
        let tmp = to.join(format!(".{name}.new"));
        std::fs::copy(from.join(name), &tmp).expect("copy a TLS file");
        std::fs::rename(&tmp, to.join(name)).expect("rename a TLS file");
    }
}

/// Certificates replaced on disk while etcd is down (a new CA, new client and server
/// certificates; the old client certificate refused) are what both daemons use once
/// etcd is back: the watcher routes a change made afterwards, and the registrar keeps
/// its lease alive past several TTLs and registers a container on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_replaced_while_etcd_is_down_are_read_again_on_reconnect() {
    let rig = Rig::new("tls-reread").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (old, new, files) = (
        tmp.path().join("old"),
        tmp.path().join("new"),
        tmp.path().join("files"),
    );
    for d in [&old, &new, &files] {
        std::fs::create_dir(d).expect("mkdir");
    }
    make_pki(&old);
    make_pki(&new);
    install_client_files(&old, &files);
    let mut etcd = TlsEtcd::start(tmp.path(), &old);
    let cfg = tls_config(&etcd.endpoint(), &rig.prefix, &files);
    wait_until("the TLS etcd to answer", T, || answers(&cfg)).await;

    let opts = Opts::default();
    let mut reg_cfg = rig.config(&opts);
    reg_cfg.etcd = cfg.clone();
    let registrar = InProcess::start(reg_cfg);
    let node_key = rig.node_key();
    wait_until("the registrar's node key", T, || async {
        lease_of(&cfg, &node_key).await.is_some()
    })
    .await;
    let lease = lease_of(&cfg, &node_key).await.expect("node key");
    assert_ne!(lease, 0);

    // The watcher: the harness's front door, its [etcd] pointed at the TLS etcd.
    let mut fd = FrontDoor::prepare(&rig.etcd, Options::default()).await;
    let text = std::fs::read_to_string(&fd.config).expect("watcher config");
    let f = |name: &str| files.join(name).display().to_string();
    let text = text.replace(
        &format!("endpoints = [\"{}\"]", rig.etcd.endpoint()),
        &format!(
            "endpoints = [\"{}\"]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}",
            etcd.endpoint(),
            f("ca.pem"),
            f("client.pem"),
            f("client.key")
        ),
    );
    std::fs::write(&fd.config, text).expect("watcher config");
    fd.start_watcher();
    fd.wait_for_first_reload().await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let put = |key: String, value: String| {
        let cfg = cfg.clone();
        async move {
            let mut c = portolan::etcd::connect(&cfg).await.expect("connect");
            c.put(key, value, None).await.expect("put over TLS");
        }
    };
    put(fd.service_key("web", "a"), a.record()).await;
    wait_until("web routed to a over TLS", T, || fd.routes_to("web", "a")).await;

    // The rotation: etcd down, every file replaced, etcd back with the new PKI only.
    etcd.stop();
    install_client_files(&new, &files);
    etcd.launch(&new);
    wait_until("etcd to answer with the new files", T, || answers(&cfg)).await;
    let back = Instant::now();
    assert!(
        !answers(&tls_config(&etcd.endpoint(), &rig.prefix, &old)).await,
        "etcd still accepts the old client certificate: the rotation proves nothing"
    );

    put(fd.service_key("api", "b"), b.record()).await;
    wait_until(
        "a change made after the rotation routed by the watcher",
        T,
        || fd.routes_to("api", "b"),
    )
    .await;

    // Past two TTLs since etcd came back, the lease is still the one from before: its
    // keep-alives went over the new files (etcd expires a lease not renewed within its
    // TTL, once a leader is elected).
    tokio::time::sleep_until((back + Duration::from_secs(2 * opts.ttl + 1)).into()).await;
    let c = rig.container(&[]);
    let key = rig.image_key(&c);
    wait_until(
        "a container started after the rotation registered",
        T,
        || async { lease_of(&cfg, &key).await.is_some() },
    )
    .await;
    assert_eq!(
        lease_of(&cfg, &key).await,
        Some(lease),
        "the container was registered on another lease: the old one expired"
    );
    assert_eq!(lease_of(&cfg, &node_key).await, Some(lease));
    assert!(registrar.running());
    assert!(!fd.log().contains("panicked"), "{}", fd.log());
}

// ---------- a periodic --resync heals what Docker's events missed ----------

/// A proxy in front of the machine's Docker socket that passes every request but
/// withholds the body of `/events`: the registrar's event stream opens and then hears
/// nothing, as a stream that silently lost events would. Stops on drop.
struct DeafDocker {
    dir: tempfile::TempDir,
    stop: tokio_util::sync::CancellationToken,
}

impl DeafDocker {
    fn start() -> DeafDocker {
        let dir = tempfile::Builder::new()
            .prefix("pdd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let listener =
            tokio::net::UnixListener::bind(dir.path().join("docker.sock")).expect("bind");
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                };
                tokio::spawn(Self::relay(client, s.clone()));
            }
        });
        DeafDocker { dir, stop }
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    async fn relay(client: tokio::net::UnixStream, stop: tokio_util::sync::CancellationToken) {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(server) = tokio::net::UnixStream::connect("/var/run/docker.sock").await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let events = Arc::new(AtomicBool::new(false));
        let seen = events.clone();
        let up = async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if String::from_utf8_lossy(&buf[..n]).contains("/events") {
                    seen.store(true, Ordering::SeqCst);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let down = async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut head = Vec::new();
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = &buf[..n];
                if events.load(Ordering::SeqCst) {
                    // Headers through (the stream is open), then nothing.
                    let before = head.len();
                    head.extend_from_slice(out);
                    match head.windows(4).position(|w| w == b"\r\n\r\n") {
                        Some(end) if end + 4 > before => out = &out[..end + 4 - before],
                        Some(_) => out = &[],
                        None => {}
                    }
                }
                if cw.write_all(out).await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = async { tokio::join!(up, down) } => {}
        }
    }
}

impl Drop for DeafDocker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// With Docker's events lost on the way (the stream open and silent), a container
/// started and one stopped are put right by the next `--resync` alone: the first
/// registered, the second's key deleted, and the registrar never reconnected to Docker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_resync_heals_what_lost_docker_events_left_behind() {
    let rig = Rig::new("resync-heal").await;
    let deaf = DeafDocker::start();
    let stays = rig.container(&[]);
    let goes = rig.container(&[]);
    let registrar = rig.spawn(&Opts {
        resync: 2,
        docker_host: Some(deaf.host()),
        ..Default::default()
    });
    // Both listed at start (the snapshot goes through).
    for c in [&stays, &goes] {
        rig.wait_value(&rig.image_key(c), T).await;
    }
    let started = rig.container(&[]);
    docker(&["rm", "-f", &goes.id]);
    let took = wait_until(
        "the started container registered and the removed one deleted, by a resync",
        T,
        || async {
            rig.value(&rig.image_key(&started)).await.is_some()
                && rig.value(&rig.image_key(&goes)).await.is_none()
        },
    )
    .await;
    eprintln!("healed by --resync 2 in {took:?}");
    assert!(rig.value(&rig.image_key(&stays)).await.is_some());
    let log = registrar.log();
    assert!(
        !log.contains("docker: reconnected") && !log.contains("connection lost"),
        "healed by a Docker reconnect, not the resync: {log}"
    );
}

// ---------- etcd auth tokens past --auth-token-ttl ----------

/// A plain single-member etcd with `extra` flags, waited for; (endpoint, process).
async fn etcd_with(dir: &Path, extra: &[&str]) -> (String, Proc) {
    let (client_port, peer_port) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = owned_command("etcd");
    cmd.args(["--name", "own", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("own={peer}")])
        .args(["--logger", "zap", "--log-level", "error"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc::spawn("etcd", &mut cmd);
    let cfg = EtcdConfig::local(&endpoint, "/x");
    wait_until("etcd to answer", T, || answers(&cfg)).await;
    (endpoint, proc)
}

/// With etcd's simple tokens living 2 s (`--auth-token-ttl 2`), both daemons, idle for
/// several token lifetimes, still do their work: the registrar registers a container
/// without a single failed sync (the expired token is refreshed and the call made
/// again), and the watcher routes a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auth_tokens_are_refreshed_past_the_auth_token_ttl() {
    const TOKEN_TTL: u64 = 2;
    let rig = Rig::new("token-ttl").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = TOKEN_TTL.to_string();
    let (endpoint, _etcd) = etcd_with(dir.path(), &["--auth-token-ttl", &ttl]).await;
    let password = "pw-token-ttl";
    let mut root = etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect");
    root.user_add("root", password, None)
        .await
        .expect("user add");
    root.user_grant_role("root", "root")
        .await
        .expect("grant root");
    root.auth_enable().await.expect("auth enable");
    let pw = dir.path().join("etcd-password");
    write_private(&pw, password);
    let mut cfg = EtcdConfig::local(&endpoint, &rig.prefix);
    cfg.username = Some("root".into());
    cfg.password = Some(portolan::config::Secret::new(password));
    let get = |key: String| {
        let cfg = cfg.clone();
        async move {
            let mut c = portolan::etcd::connect(&cfg).await.ok()?;
            let r = portolan::etcd::call(c.get(key, None)).await.ok()?;
            r.kvs()
                .first()
                .map(|kv| kv.value_str().unwrap_or("").to_string())
        }
    };

    // The registrar, as a process (its log is the oracle), on this etcd.
    let log = dir.path().join("registrar.log");
    let file = std::fs::File::create(&log).expect("log");
    let mut cmd = portolan_cmd();
    cmd.args(["registrar", "--config", "/dev/null"])
        .args(["--etcd-endpoints", &endpoint, "--prefix", &rig.prefix])
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(&pw)
        .args(["--node", &rig.node, "--advertise-ip", "127.0.0.1"])
        .args(["--ttl", "3", "--resync", "3600"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--only-label", &rig.only_label()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file);
    let mut registrar = Proc::spawn("portolan registrar", &mut cmd);
    let node_key = rig.node_key();
    wait_until("the registrar's node key", T, || async {
        get(node_key.clone()).await.is_some()
    })
    .await;

    // The watcher, on the same etcd with the same user.
    let mut fd = FrontDoor::prepare(&rig.etcd, Options::default()).await;
    let text = std::fs::read_to_string(&fd.config).expect("watcher config");
    let text = text.replace(
        &format!("endpoints = [\"{}\"]", rig.etcd.endpoint()),
        &format!(
            "endpoints = [\"{endpoint}\"]\nusername = \"root\"\npassword_file = {:?}",
            pw.display().to_string()
        ),
    );
    std::fs::write(&fd.config, text).expect("watcher config");
    fd.start_watcher();
    fd.wait_for_first_reload().await;

    // Idle for three token lifetimes: every token either daemon holds has expired.
    let idle = Duration::from_secs(3 * TOKEN_TTL + 1);
    tokio::time::sleep(idle).await;
    let c = rig.container(&[]);
    let key = rig.image_key(&c);
    wait_until(
        "a container started after the idle spell registered",
        T,
        || async { get(key.clone()).await.is_some() },
    )
    .await;
    let a = Backend::start("a").await;
    let mut writer = portolan::etcd::connect(&cfg).await.expect("connect");
    writer
        .put(fd.service_key("web", "a"), a.record(), None)
        .await
        .expect("put");
    wait_until(
        "the watcher to route an instance put after the idle spell",
        T,
        || fd.routes_to("web", "a"),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("cannot sync") && !text.contains("invalid auth token"),
        "the registrar failed a call on an expired token: {text}"
    );
    assert!(registrar.alive(), "{text}");
    assert!(!fd.log().contains("invalid auth token"), "{}", fd.log());
}

// ---------- the deferred check's cap under steady churn ----------

/// Seconds since the epoch, as `date +%s.%N` writes them.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// The start times a check command wrapper logged (`date +%s.%N >> log`).
fn logged_times(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn weighted(b: &Backend, weight: u32) -> String {
    format!(
        r#"{{"addr":"{}","node":"test","tags":["t"],"weight":{weight}}}"#,
        b.addr
    )
}

/// A change every 100 ms (less than the 250 ms of quiet a deferred check waits for)
/// for 8 s, each taking the runtime path: the background check still runs during the
/// churn, at most ~2 s after the first change it covers, instead of after the churn,
/// and not back to back either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_churn_never_puts_the_deferred_check_off_past_its_cap() {
    const CHURN: Duration = Duration::from_secs(8);
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let checks = dir.path().join("checks.log");
    let a = Backend::start("a").await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            admin_socket: true,
            check_cmd: format!("date +%s.%N >> {}; haproxy -c -f {{src}}", checks.display()),
            ..Default::default()
        },
    )
    .await;
    let key = fd.service_key("web", "a");
    etcd.put(&key, &weighted(&a, 100)).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;
    let reloads = fd.haproxy.reloads().await;

    let start = epoch_now();
    let began = Instant::now();
    let mut weight = 1;
    while began.elapsed() < CHURN {
        weight = weight % 200 + 1;
        etcd.put(&key, &weighted(&a, weight)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = epoch_now();
    // The last weight reached HAProxy: every change was applied, runtime first.
    wait_until("the last weight in HAProxy", T, || async {
        fd.admin("show servers state svc_web")
            .await
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some("a") && l.contains(&format!(" {weight} ")))
    })
    .await;
    assert_eq!(fd.haproxy.reloads().await, reloads, "the churn reloaded");

    let during: Vec<f64> = logged_times(&checks)
        .into_iter()
        .filter(|t| *t > start && *t < end)
        .collect();
    let gaps: Vec<f64> = std::iter::once(start)
        .chain(during.iter().copied())
        .chain(std::iter::once(end))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    eprintln!(
        "checks started during {CHURN:?} of churn: {}; gaps (s): {gaps:.2?}",
        during.len()
    );
    // 8 s of churn under a 2 s cap: three or four checks; without the cap, none.
    assert!(
        during.len() >= 2,
        "{} deferred checks ran during {CHURN:?} of steady churn (gaps {gaps:.2?})",
        during.len()
    );
    // Nor back to back: a check starts 250 ms after the last change or at the cap,
    // so about four in 8 s (eight allows for a machine that stalls the watcher).
    assert!(
        during.len() <= 8,
        "{} deferred checks during {CHURN:?} of churn: run back to back (gaps {gaps:.2?})",
        during.len()
    );
    // A generous sanity bound: the cap is 2 s, the check itself takes its time too.
    assert!(
        gaps.iter().all(|g| *g < 5.0),
        "a deferred check waited past 5 s under churn: {gaps:.2?}"
    );
}

// ---------- HAProxy refusing a runtime batch; a server that never drains ----------

/// Servers HAProxy's running worker has in `backend` (`show servers state`).
async fn live_servers(fd: &FrontDoor, backend: &str) -> Vec<String> {
    let state = fd.admin(&format!("show servers state {backend}")).await;
    let mut names: Vec<String> = state
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 6 && f[1] == backend).then(|| f[3].to_string())
        })
        .collect();
    names.sort();
    names
}

/// An operator deletes server b by hand (`set server … state maint`, `del server`); the
/// next batch adds d, re-weights c and removes b in one etcd transaction. HAProxy takes
/// the add and the weight, then refuses b's removal (no such server): the watcher says
/// so, reloads onto the file instead and HAProxy runs exactly what etcd says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_refusing_a_runtime_batch_part_way_is_repaired_by_a_reload_and_said() {
    use etcd_client::{Txn, TxnOp};
    let etcd = Etcd::start().await;
    let (a, b, c, d) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    );
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    for x in [&a, &b, &c] {
        etcd.put(&fd.service_key("web", &x.name), &x.record()).await;
    }
    wait_until("a, b and c in HAProxy", T, || async {
        live_servers(&fd, "svc_web").await == ["a", "b", "c"]
    })
    .await;
    let reloads = fd.haproxy.reloads().await;

    // The operator, behind the watcher's back.
    assert_eq!(fd.admin("set server svc_web/b state maint").await, "");
    let del = fd.admin("del server svc_web/b").await;
    assert!(del.contains("Server deleted"), "{del}");

    let mut client = etcd.client().await;
    client
        .txn(Txn::new().and_then([
            TxnOp::put(fd.service_key("web", "d"), d.record(), None),
            TxnOp::put(fd.service_key("web", "c"), weighted(&c, 7), None),
            TxnOp::delete(fd.service_key("web", "b"), None),
        ]))
        .await
        .expect("txn");
    wait_until(
        "the refused batch reported and reloaded instead",
        T,
        || async { fd.log().contains("runtime API failed, reloaded instead") },
    )
    .await;
    wait_until(
        "HAProxy runs a, c (weight 7) and d after the reload",
        T,
        || async {
            live_servers(&fd, "svc_web").await == ["a", "c", "d"]
                && fd.haproxy.reloads().await > reloads
        },
    )
    .await;
    let log = fd.log();
    let line = log
        .lines()
        .find(|l| l.contains("runtime API failed, reloaded instead"))
        .unwrap_or_default();
    eprintln!("{line}");
    assert!(
        line.contains("svc_web/b") && line.contains("refused"),
        "the warning names the refused command: {line}"
    );
    let state = fd.admin("show servers state svc_web").await;
    assert!(
        state
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some("c") && l.contains(" 7 ")),
        "{state}"
    );
    assert_eq!(
        fd.metric(r#"portolan_watcher_runtime_updates_total{result="fallback"}"#)
            .await,
        Some(1.0)
    );
    for _ in 0..6 {
        let got = fd.get("web").await;
        assert!(matches!(&got, Some((200, body)) if body != "b"), "{got:?}");
    }
}

/// A backend that accepts connections and never answers: a request sent to it stays
/// in flight. Counts the connections that carried a request (health checks only
/// connect).
struct Mute {
    addr: std::net::SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl Mute {
    async fn start() -> Mute {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let (r, s) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let (r, s) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut counted = false;
                    loop {
                        tokio::select! {
                            _ = s.cancelled() => return,
                            n = conn.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if !counted && buf[..n].starts_with(b"GET ") {
                                        counted = true;
                                        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    }
                                }
                            },
                        }
                    }
                });
            }
        });
        Mute {
            addr,
            requests,
            stop,
        }
    }

    fn record(&self) -> String {
        format!(
            r#"{{"addr":"{}","node":"test","tags":["t"],"weight":100}}"#,
            self.addr
        )
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A removed server with a request that never finishes cannot be deleted through the
/// runtime API: after its drain window the watcher gives up on it, says so (naming the
/// server), and reloads; the new worker has no such server and the old one keeps the
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_server_that_never_drains_is_left_to_a_reload_and_said() {
    use tokio::io::AsyncWriteExt;
    let etcd = Etcd::start().await;
    let (a, mute) = (Backend::start("a").await, Mute::start().await);
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "m"), &mute.record()).await;
    wait_until("a and m in HAProxy", T, || async {
        live_servers(&fd, "svc_web").await == ["a", "m"]
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    // Requests until one is in flight at m (round robin sends every other one there).
    let mut held = Vec::new();
    let deadline = Instant::now() + T;
    while mute.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no request reached m");
        let mut s = tokio::net::TcpStream::connect(fd.http_addr())
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .expect("send");
        held.push(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    etcd.delete(&fd.service_key("web", "m")).await;
    wait_until("m given up on and reloaded instead", T, || async {
        fd.log().lines().any(|l| {
            l.contains("runtime API failed, reloaded instead")
                && l.contains("still had connections")
        })
    })
    .await;
    wait_until("the new worker without m", T, || async {
        live_servers(&fd, "svc_web").await == ["a"] && fd.haproxy.reloads().await > reloads
    })
    .await;
    let line = fd
        .log()
        .lines()
        .find(|l| l.contains("still had connections"))
        .unwrap_or_default()
        .to_string();
    eprintln!("{line}");
    assert!(line.contains("svc_web/m"), "{line}");
    assert!(!fd.dest_text().contains("server m "));
    assert!(fd.routes_to("web", "a").await);
    drop(held);
}

// ---------- drain on the reload path, and in a persistent backend ----------

/// Without an admin socket, a draining instance leaves rotation by a reload onto a file
/// that says `disabled`: no request reaches it afterwards, and clearing the flag
/// routes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_leaves_rotation_by_reload_without_an_admin_socket() {
    use std::sync::atomic::Ordering;
    let etcd = Etcd::start().await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;
    wait_until("web routed to b", T, || fd.routes_to("web", "b")).await;
    let reloads = fd.haproxy.reloads().await;

    etcd.put(&fd.service_key("web", "b"), &b.draining_record())
        .await;
    wait_until(
        "a reload onto the file that says b is disabled",
        T,
        || async {
            says_disabled(&fd.dest_text(), "b", b.addr) && fd.haproxy.reloads().await > reloads
        },
    )
    .await;
    // The reload is confirmed once the new worker runs: from then on, only a.
    wait_until("the new worker serving", T, || async {
        fd.haproxy
            .status()
            .await
            .is_some_and(|s| s.reloads > reloads)
    })
    .await;
    let before = b.hits.load(Ordering::Relaxed);
    for _ in 0..40 {
        assert_eq!(fd.get("web").await, Some((200, "a".to_string())));
    }
    assert_eq!(b.hits.load(Ordering::Relaxed), before, "b got new requests");

    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("b routed again", T, || fd.routes_to("web", "b")).await;
}

/// GET http://web.test/ through `front` from the local address `from`: the body of a
/// 200, None otherwise.
async fn get_from(from: &str, front: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(format!("{from}:0").parse().ok()?).ok()?;
    let mut s = socket.connect(front.parse().ok()?).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.trim().to_string())
}

/// Whether `file` has `server <name> <addr> id <n> weight 100 check disabled` (the id
/// is the shipped template's, derived from the name).
fn says_disabled(file: &str, name: &str, addr: std::net::SocketAddr) -> bool {
    let head = format!("server {name} {addr} ");
    file.lines()
        .map(str::trim)
        .any(|l| l.starts_with(&head) && l.ends_with(" weight 100 check disabled"))
}

/// In a backend whose clients persist on a server (`stick on src`), a draining instance
/// is put in HAProxy's `drain` state, not maintenance: a client already stuck to it
/// keeps reaching it, a new client does not, and the file says `disabled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_in_a_persistent_backend_keeps_its_stuck_clients() {
    let etcd = Etcd::start().await;
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let template = std::fs::read_to_string(common::haproxy::shipped_template())
        .expect("shipped template")
        .replace(
            "{% else %}roundrobin{% endif %}\n",
            "{% else %}roundrobin{% endif %}\n    stick-table type ip size 1k expire 10m\n    stick on src\n",
        );
    assert!(template.contains("stick on src"), "the template changed");
    let fd = FrontDoor::start(
        &etcd,
        Options {
            template: Some(template),
            admin_socket: true,
            ..Default::default()
        },
    )
    .await;
    let front = fd.http_addr();
    // b alone first: 127.0.0.1 sticks to it.
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("127.0.0.1 stuck to b", T, || async {
        get_from("127.0.0.1", &front).await.as_deref() == Some("b")
    })
    .await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("a in HAProxy", T, || async {
        fd.admin_state("svc_web", "a").await == Some(0)
    })
    .await;
    let reloads = fd.haproxy.reloads().await;

    etcd.put(&fd.service_key("web", "b"), &b.draining_record())
        .await;
    wait_until("b in HAProxy's drain state", T, || async {
        fd.admin_state("svc_web", "b")
            .await
            .is_some_and(|s| s & 8 == 8)
    })
    .await;
    wait_until("the file says b is disabled", T, || async {
        says_disabled(&fd.dest_text(), "b", b.addr)
    })
    .await;
    assert_eq!(
        fd.admin_state("svc_web", "b").await.map(|s| s & 1),
        Some(0),
        "b in maintenance"
    );
    for _ in 0..10 {
        assert_eq!(
            get_from("127.0.0.1", &front).await.as_deref(),
            Some("b"),
            "the client stuck to b was sent elsewhere"
        );
        assert_eq!(
            get_from("127.0.0.2", &front).await.as_deref(),
            Some("a"),
            "a new client reached the draining b"
        );
    }
    assert_eq!(fd.haproxy.reloads().await, reloads, "the drain reloaded");
}

// ---------- one reload in flight ----------

/// A burst of changes that each need a reload (a new service every 80 ms), against a
/// reload command that takes 300 ms and stamps its start and end: reloads never
/// overlap, changes that arrive during one are folded into the next, and every service
/// ends up routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_two_reloads_at_once() {
    const SERVICES: usize = 8;
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            reload_cmd: Some(String::new()),
            ..Default::default()
        },
    )
    .await;
    let stamps = fd.dir.path().join("reloads");
    let cmd = format!(
        "echo s $(date +%s.%N) >> {log}; sleep 0.3; kill -USR2 {pid}; echo e $(date +%s.%N) >> {log}",
        log = stamps.display(),
        pid = fd.haproxy.master_pid()
    );
    let cfg = std::fs::read_to_string(&fd.config).expect("config");
    std::fs::write(
        &fd.config,
        cfg.replace("reload_cmd = \"\"", &format!("reload_cmd = {cmd:?}")),
    )
    .expect("config");
    fd.start_watcher();
    fd.wait_for_first_reload().await;
    let first = std::fs::read_to_string(&stamps)
        .unwrap_or_default()
        .lines()
        .count();

    let mut puts = Vec::new();
    for i in 0..SERVICES {
        puts.push(epoch_now());
        etcd.put(&fd.service_key(&format!("s{i}"), "a"), &a.record())
            .await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    for i in 0..SERVICES {
        let name = format!("s{i}");
        wait_until(&format!("{name} routed"), T, || fd.routes_to(&name, "a")).await;
    }
    // The last reload's end stamped too.
    let spans = || -> Vec<(f64, f64)> {
        let text = std::fs::read_to_string(&stamps).unwrap_or_default();
        let lines: Vec<&str> = text.lines().skip(first).collect();
        let mut starts = Vec::new();
        let mut spans = Vec::new();
        for l in lines {
            match l.split_once(' ') {
                Some(("s", t)) => starts.push(t.parse::<f64>().expect("stamp")),
                Some(("e", t)) => {
                    // Ends pair with starts in order only if reloads never overlap;
                    // pair with the earliest open start, and judge below.
                    let s = starts.remove(0);
                    spans.push((s, t.parse::<f64>().expect("stamp")));
                }
                _ => {}
            }
        }
        spans
    };
    wait_until("every reload's end stamped", T, || async {
        let text = std::fs::read_to_string(&stamps).unwrap_or_default();
        let lines: Vec<&str> = text.lines().skip(first).collect();
        lines.iter().filter(|l| l.starts_with("s ")).count()
            == lines.iter().filter(|l| l.starts_with("e ")).count()
    })
    .await;
    let spans = spans();
    eprintln!(
        "{} reloads for {SERVICES} changes: {:.2?}",
        spans.len(),
        spans.iter().map(|(s, e)| e - s).collect::<Vec<_>>()
    );
    assert!(spans.len() >= 2, "the burst took one reload: {spans:?}");
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "a reload started at {:.3} while the one started at {:.3} ran until {:.3}",
            w[1].0,
            w[0].0,
            w[0].1
        );
    }
    // The scenario happened: some change arrived while a reload was in flight.
    assert!(
        puts.iter()
            .any(|p| spans.iter().any(|(s, e)| p > s && p < e)),
        "no change arrived during a reload: puts {puts:?}, reloads {spans:?}"
    );
}

// ---------- keep-alives past an endpoint that accepts and never answers ----------

/// The node key's (lease, create revision), None when absent.
async fn node_key_identity(etcd: &Etcd, key: &str) -> Option<(i64, i64)> {
    let mut c = etcd.client().await;
    let r = c.get(key, None).await.ok()?;
    r.kvs().first().map(|kv| (kv.lease(), kv.create_revision()))
}

/// A TCP relay to `upstream` that can be made to behave like an etcd member restarted
/// without quorum: while muted, it accepts connections and answers nothing (they are
/// closed when it is unmuted). Relayed connections end with the upstream's.
struct Muting {
    addr: std::net::SocketAddr,
    muted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Relayed connections pass nothing on while set (a member that stops answering
    /// mid-stream, or the path to it cut), and resume after.
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    unmuted: std::sync::Arc<tokio::sync::Notify>,
    stop: tokio_util::sync::CancellationToken,
}

impl Muting {
    async fn start(upstream: String) -> Muting {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let muted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let unmuted = std::sync::Arc::new(tokio::sync::Notify::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let (m, f, u, s) = (muted.clone(), frozen.clone(), unmuted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let (m, f, u, s, upstream) =
                    (m.clone(), f.clone(), u.clone(), s.clone(), upstream.clone());
                tokio::spawn(async move {
                    if m.load(Ordering::SeqCst) {
                        // Held, unanswered, until unmuted.
                        tokio::select! {
                            _ = s.cancelled() => {}
                            _ = u.notified() => {}
                        }
                        return;
                    }
                    let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = conn.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = Self::pump(cr, uw, f.clone()) => {}
                        _ = Self::pump(ur, cw, f) => {}
                    }
                });
            }
        });
        Muting {
            addr,
            muted,
            frozen,
            unmuted,
            stop,
        }
    }

    /// Copies `from` to `to`, holding what it read while `frozen`.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while frozen.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Muted and frozen: nothing passes, old connections or new.
    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
        self.mute(on);
    }

    fn mute(&self, on: bool) {
        self.muted.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            self.unmuted.notify_waiters();
        }
    }
}

impl Drop for Muting {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An etcd member restarted while its cluster has no quorum accepts connections before
/// it serves anything (etcd answers only once it has published itself through a
/// leader): a call sent there hangs. Here a relay to etcd plays that member after each
/// restart, beside etcd's own endpoint: the registrar's keep-alive stream, broken by
/// the restart, must resume on the member that answers within the lease's TTL (which
/// etcd restarts when a leader is elected). Four restarts later, the node key is still
/// the first one, on the first lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_resume_past_an_endpoint_that_accepts_and_never_answers() {
    let mut rig = Rig::new("mute-member").await;
    let relay = Muting::start(format!("127.0.0.1:{}", rig.etcd.client_port)).await;
    let opts = Opts::default();
    let mut cfg = rig.config(&opts);
    cfg.etcd.endpoints = vec![format!("http://{}", relay.addr), rig.etcd.endpoint()];
    let registrar = InProcess::start(cfg);
    let key = rig.node_key();
    wait_until("the registrar's node key", T, || async {
        node_key_identity(&rig.etcd, &key).await.is_some()
    })
    .await;
    let first = node_key_identity(&rig.etcd, &key).await;
    for round in 0..4 {
        relay.mute(true);
        rig.etcd.restart().await;
        // Two TTLs with etcd answering: a lease not renewed in one is gone.
        tokio::time::sleep(Duration::from_secs(2 * opts.ttl)).await;
        assert_eq!(
            node_key_identity(&rig.etcd, &key).await,
            first,
            "round {round}: the node key was lost and written again (its lease expired)"
        );
        relay.mute(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(registrar.running());
}

/// The member carrying the keep-alive stream stops answering mid-stream (the path to it
/// cut; its TCP connection open, silent): the stream moves to a member that answers
/// while the lease runs. Two relays to one etcd stand for two members and are frozen in
/// turn, so the stream is on the frozen one in at least three of four rounds; the node
/// key keeps its first lease throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_move_off_a_member_that_stops_answering_mid_stream() {
    let rig = Rig::new("silent-member").await;
    let upstream = format!("127.0.0.1:{}", rig.etcd.client_port);
    let relays = [
        Muting::start(upstream.clone()).await,
        Muting::start(upstream).await,
    ];
    let opts = Opts::default();
    let mut cfg = rig.config(&opts);
    cfg.etcd.endpoints = relays
        .iter()
        .map(|r| format!("http://{}", r.addr))
        .collect();
    let registrar = InProcess::start(cfg);
    let key = rig.node_key();
    wait_until("the registrar's node key", T, || async {
        node_key_identity(&rig.etcd, &key).await.is_some()
    })
    .await;
    let first = node_key_identity(&rig.etcd, &key).await;
    for round in 0..4 {
        let relay = &relays[round % 2];
        relay.freeze(true);
        // Two TTLs: a lease not renewed in one is gone.
        tokio::time::sleep(Duration::from_secs(2 * opts.ttl)).await;
        assert_eq!(
            node_key_identity(&rig.etcd, &key).await,
            first,
            "round {round}: the node key was lost and written again (its lease expired)"
        );
        relay.freeze(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(registrar.running());
}
