//! Starting registrars for tests (owned by the registrar tests).
//!
//! A `Rig` is one test's world: its own etcd, key prefix, node name, state dir and run
//! id. Every registrar it starts sees only containers labelled with that run id
//! (`--only-label portolan.test=<run>`), because other tests use the same Docker Engine
//! at the same time. Dropping the rig removes the run's containers, even on panic.
//!
//! Registrars run in-process (`portolan::registrar::run`, stopped by cancelling its
//! token) or as a `portolan registrar` subprocess when a test needs SIGKILL, SIGTERM or a
//! restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portolan::config::RegistrarConfig;
use portolan::schema;
use tokio_util::sync::CancellationToken;

use super::*;

#[derive(Debug, Clone)]
pub struct Opts {
    pub ttl: u64,
    pub resync: u64,
    pub internal: bool,
    pub deregister_on_exit: bool,
    pub docker_host: Option<String>,
    /// `--advertise-ip`; 127.0.0.1 when None.
    pub advertise_ip: Option<String>,
    /// A state dir of its own (another host, as far as the lease goes); the rig's when
    /// None.
    pub state_dir: Option<PathBuf>,
    /// `--etcd-username` and `--etcd-password-file` (subprocesses only).
    pub etcd_auth: Option<(String, PathBuf)>,
    /// A config file's text (`[[hook]]`, `[[registrar.service]]`): resolved by
    /// `resolve_registrar` in process, passed as `--config` to a subprocess.
    pub toml: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            ttl: 3,
            resync: 60,
            internal: false,
            deregister_on_exit: false,
            docker_host: None,
            advertise_ip: None,
            state_dir: None,
            etcd_auth: None,
            toml: None,
        }
    }
}

impl Opts {
    fn advertise_ip(&self) -> &str {
        self.advertise_ip.as_deref().unwrap_or("127.0.0.1")
    }
}

pub struct Rig {
    pub etcd: Etcd,
    pub prefix: String,
    pub run: String,
    pub node: String,
    pub state: tempfile::TempDir,
}

impl Rig {
    pub async fn new(tag: &str) -> Rig {
        portolan::telemetry::init(false);
        ensure_test_image();
        Rig {
            etcd: Etcd::start().await,
            prefix: unique_prefix(tag),
            run: unique(tag),
            node: format!("node-{}", unique(tag)),
            state: tempfile::tempdir().expect("state dir"),
        }
    }

    pub fn only_label(&self) -> String {
        format!("{TEST_LABEL}={}", self.run)
    }

    pub fn config(&self, opts: &Opts) -> RegistrarConfig {
        let file = match &opts.toml {
            Some(text) => {
                let file = portolan::config::FileConfig::from_str(text, Path::new("test.toml"))
                    .unwrap_or_else(|e| panic!("{e}"));
                let flags = portolan::config::RegistrarArgs {
                    registrar: portolan::config::RegistrarOptions {
                        node: Some(self.node.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Some(
                    portolan::config::resolve_registrar(&file, &flags)
                        .unwrap_or_else(|e| panic!("{e}")),
                )
            }
            None => None,
        };
        RegistrarConfig {
            etcd: self.etcd.config(&self.prefix),
            node: self.node.clone(),
            advertise_ip: Some(opts.advertise_ip().parse().expect("ip")),
            advertise_networks: file
                .as_ref()
                .map(|f| f.advertise_networks.clone())
                .unwrap_or_default(),
            ttl: Duration::from_secs(opts.ttl),
            state_dir: self.state_dir(opts),
            docker_host: opts.docker_host.clone(),
            docker_api_version: None,
            internal: opts.internal,
            resync: Duration::from_secs(opts.resync),
            deregister_on_exit: opts.deregister_on_exit,
            only_label: Some(self.only_label()),
            hooks: file.as_ref().map(|f| f.hooks.clone()).unwrap_or_default(),
            listen: file.as_ref().and_then(|f| f.listen),
            services: file.map(|f| f.services).unwrap_or_default(),
        }
    }

    fn state_dir(&self, opts: &Opts) -> PathBuf {
        opts.state_dir
            .clone()
            .unwrap_or_else(|| self.state.path().join("state"))
    }

    /// A registrar running in this test's runtime.
    pub fn start(&self, opts: &Opts) -> InProcess {
        InProcess::start(self.config(opts))
    }

    /// A `portolan registrar` child process logging to a file in the state dir.
    pub fn spawn(&self, opts: &Opts) -> Subprocess {
        self.spawn_with_env(opts, &[])
    }

    /// `spawn` with `env` set for the child (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn spawn_with_env(&self, opts: &Opts, env: &[(&str, &str)]) -> Subprocess {
        let log = self
            .state
            .path()
            .join(format!("registrar-{}.log", unique("log")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = portolan_cmd();
        cmd.arg("registrar")
            .args(["--etcd-endpoints", &self.etcd.endpoint()])
            .args(["--prefix", &self.prefix])
            .args(["--node", &self.node])
            .args(["--advertise-ip", opts.advertise_ip()])
            .args(["--ttl", &opts.ttl.to_string()])
            .args(["--resync", &opts.resync.to_string()])
            .arg("--state-dir")
            .arg(self.state_dir(opts))
            .args(["--only-label", &self.only_label()])
            .env("RUST_LOG", "info")
            // A config file on this machine must not leak into the test.
            .arg("--config")
            .arg(match &opts.toml {
                Some(text) => {
                    let path = self.state.path().join(format!("{}.toml", unique("config")));
                    std::fs::write(&path, text).expect("config file");
                    path
                }
                None => PathBuf::from("/dev/null"),
            })
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        if opts.internal {
            cmd.arg("--internal");
        }
        if opts.deregister_on_exit {
            cmd.arg("--deregister-on-exit");
        }
        if let Some(h) = &opts.docker_host {
            cmd.args(["--docker-host", h]);
        }
        cmd.envs(env.iter().copied());
        if let Some((user, password_file)) = &opts.etcd_auth {
            cmd.args(["--etcd-username", user])
                .arg("--etcd-password-file")
                .arg(password_file);
        }
        Subprocess {
            proc: Proc::spawn("portolan registrar", &mut cmd),
            log,
        }
    }

    /// A container of this run, publishing 8080 on loopback only.
    pub fn container(&self, extra: &[&str]) -> Container {
        let mut args = vec!["-p", "127.0.0.1::8080"];
        args.extend_from_slice(extra);
        Container::run(&self.run, &args, None)
    }

    /// Where this rig's node registers its instances.
    pub fn services_prefix(&self) -> String {
        format!("{}services/", schema::node_prefix(&self.prefix, &self.node))
    }

    /// Where hand-written instances live, and v1 registrars wrote theirs.
    pub fn hand_written_prefix(&self) -> String {
        schema::services_prefix(&self.prefix)
    }

    pub fn node_key(&self) -> String {
        schema::node_key(&self.prefix, &self.node)
    }

    pub fn key(&self, service: &str, c: &Container, port: u16) -> String {
        schema::node_service_key(
            &self.prefix,
            &self.node,
            service,
            &schema::instance_id(&self.node, &c.id, port),
        )
    }

    /// The default service name of the test image.
    pub fn image_key(&self, c: &Container) -> String {
        self.key("portolan-test-busybox", c, 8080)
    }

    /// Every key under the prefix with its metadata.
    pub async fn kvs(&self) -> BTreeMap<String, Kv> {
        let mut c = self.etcd.client().await;
        let resp = c
            .get(
                self.prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().unwrap_or("").to_string();
                (
                    key,
                    Kv {
                        value: kv.value_str().unwrap_or("").to_string(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    },
                )
            })
            .collect()
    }

    /// This node's instance keys only, key → value.
    pub async fn services(&self) -> BTreeMap<String, String> {
        self.etcd
            .get_prefix(&self.services_prefix())
            .await
            .into_iter()
            .collect()
    }

    pub async fn value(&self, key: &str) -> Option<String> {
        self.kvs().await.remove(key).map(|kv| kv.value)
    }

    pub async fn wait_value(&self, key: &str, timeout: Duration) -> String {
        wait_until(&format!("key {key}"), timeout, || async {
            self.value(key).await.is_some()
        })
        .await;
        self.value(key).await.unwrap_or_default()
    }

    pub async fn wait_gone(&self, key: &str, timeout: Duration) -> Duration {
        wait_until(&format!("key {key} to vanish"), timeout, || async {
            self.value(key).await.is_none()
        })
        .await
    }

    /// The current etcd revision: unchanged means nothing was written.
    pub async fn revision(&self) -> i64 {
        let mut c = self.etcd.client().await;
        let resp = c.get("\0", None).await.expect("etcd get");
        resp.header().map(|h| h.revision()).unwrap_or_default()
    }

    pub fn state_file(&self) -> PathBuf {
        self.state.path().join("state").join("registrar.lease")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        remove_labelled(&self.run);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub value: String,
    pub mod_revision: i64,
    pub lease: i64,
}

/// The instance record of a registered key.
pub fn record(value: &str) -> schema::InstanceRecord {
    serde_json::from_str(value).unwrap_or_else(|e| panic!("not a record: {value:?}: {e}"))
}

/// `portolan::registrar::run` on the test's runtime, stopped when dropped.
pub struct InProcess {
    token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub fn start(cfg: RegistrarConfig) -> InProcess {
        let token = CancellationToken::new();
        let handle = tokio::spawn(portolan::registrar::run(cfg, token.clone()));
        InProcess {
            token,
            handle: Some(handle),
        }
    }

    /// True while `run` has not returned.
    pub fn running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits for `run` to return by itself.
    pub async fn exited(mut self, timeout: Duration) -> anyhow::Result<()> {
        let h = self.handle.take().expect("running");
        tokio::time::timeout(timeout, h)
            .await
            .unwrap_or_else(|_| panic!("the registrar did not exit within {timeout:?}"))
            .expect("registrar task")
    }

    /// Cancels and waits; returns how long the stop took.
    pub async fn stop(mut self) -> Duration {
        let start = std::time::Instant::now();
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), h)
                .await
                .expect("registrar stops within 10 s");
            r.expect("registrar task").expect("registrar returns Ok");
        }
        start.elapsed()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

pub struct Subprocess {
    pub proc: Proc,
    pub log: PathBuf,
}

impl Subprocess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_until(
            &format!("registrar log line {needle:?}"),
            timeout,
            || async { self.log().contains(needle) },
        )
        .await;
    }

    pub fn sigkill(&mut self) {
        self.proc.signal(nix::sys::signal::Signal::SIGKILL);
        self.proc.wait_exit(Duration::from_secs(5));
    }
}

/// Records every change under a prefix with the wall-clock time it reached this test,
/// to measure Docker event → etcd latency.
pub struct KeyWatch {
    events: Arc<Mutex<Vec<WatchEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub key: String,
    /// Empty for a delete.
    pub value: String,
    pub put: bool,
    pub at: SystemTime,
}

impl KeyWatch {
    pub async fn start(etcd: &Etcd, prefix: &str) -> KeyWatch {
        let mut client = etcd.client().await;
        let mut stream = client
            .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .expect("etcd watch");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(Some(resp)) = stream.message().await {
                let at = SystemTime::now();
                let mut sink = sink.lock().expect("lock");
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        sink.push(WatchEvent {
                            key: kv.key_str().unwrap_or("").to_string(),
                            value: kv.value_str().unwrap_or("").to_string(),
                            put: ev.event_type() == etcd_client::EventType::Put,
                            at,
                        });
                    }
                }
            }
        });
        KeyWatch { events, task }
    }

    /// When `key` was last put (or deleted).
    pub fn last(&self, key: &str, put: bool) -> Option<SystemTime> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .find(|e| e.key == key && e.put == put)
            .map(|e| e.at)
    }

    /// Every put of `key` so far: when, and the value.
    pub fn puts(&self, key: &str) -> Vec<(SystemTime, String)> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.key == key && e.put)
            .map(|e| (e.at, e.value.clone()))
            .collect()
    }

    pub fn count(&self, key: &str, put: bool) -> usize {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.key == key && e.put == put)
            .count()
    }
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// A live `docker events` stream of one test's containers, read back with `events()`.
/// Live, not `docker events --since`: the engine keeps only its last 256 events for
/// `--since`, and on a machine running the suite in parallel a test's early events
/// are gone from that ring by the time it asks.
pub struct DockerEvents {
    log: PathBuf,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl DockerEvents {
    /// Starts streaming. Events of containers created after the stream attached are
    /// all seen: wait for one with `wait_for` before relying on that.
    pub fn start(run: &str) -> DockerEvents {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("events");
        let out = std::fs::File::create(&log).expect("events file");
        let mut cmd = owned_command("docker");
        cmd.args([
            "events",
            "--filter",
            &format!("label={TEST_LABEL}={run}"),
            "--filter",
            "type=container",
            "--format",
            "{{.TimeNano}} {{.Action}} {{.Actor.ID}}",
        ])
        .stdin(Stdio::null())
        .stdout(out);
        DockerEvents {
            log,
            _dir: dir,
            _proc: Proc::spawn("docker events", &mut cmd),
        }
    }

    /// (container id, action, Docker's own time) of every event so far.
    pub fn events(&self) -> Vec<(String, String, SystemTime)> {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Actions may contain spaces ("health_status: healthy"): time first, id last.
        out.lines()
            .filter_map(|l| {
                let (nanos, rest) = l.split_once(' ')?;
                let (action, id) = rest.rsplit_once(' ')?;
                let nanos: u64 = nanos.parse().ok()?;
                Some((
                    id.to_string(),
                    action.to_string(),
                    UNIX_EPOCH + Duration::from_nanos(nanos),
                ))
            })
            .collect()
    }

    pub fn has(&self, id: &str, action: &str) -> bool {
        self.events().iter().any(|(i, a, _)| i == id && a == action)
    }

    /// When Docker says container `id` had event `action` (the first such).
    pub fn time_of(&self, id: &str, action: &str) -> Option<SystemTime> {
        self.events()
            .into_iter()
            .find(|(i, a, _)| i == id && a == action)
            .map(|(_, _, t)| t)
    }

    /// Waits until the stream has shown `action` for container `id`.
    pub async fn wait_for(&self, id: &str, action: &str) {
        wait_until(
            &format!("docker event {action} of {id}"),
            Duration::from_secs(20),
            || async { self.has(id, action) },
        )
        .await;
    }
}

/// `median=… max=…` of a list of durations.
pub fn summary(mut d: Vec<Duration>) -> String {
    d.sort();
    if d.is_empty() {
        return "n/a".into();
    }
    let median = d[d.len() / 2];
    let max = d[d.len() - 1];
    format!("median={median:.1?} max={max:.1?}")
}

/// A TCP relay in front of etcd that a test can cut, to partition a registrar from
/// etcd while etcd itself keeps running (and so keeps expiring leases).
pub struct Partition {
    pub port: u16,
    cut: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Partition {
    pub async fn start(target_port: u16) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused in effect
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().expect("lock").push(relay);
            }
        });
        Partition {
            port,
            cut,
            conns,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// An HTTP server on 127.0.0.1 answering 200 to every request and keeping the bodies:
/// a webhook receiver. Stops on drop.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = bodies.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                sink.lock()
                                    .expect("lock")
                                    .push(String::from_utf8_lossy(&body).into_owned());
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(hyper::body::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, bodies, task }
    }

    /// Accepts connections and never answers: a hook target that hangs.
    pub async fn hanging() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Receiver {
            addr,
            bodies: Arc::default(),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every body received so far, parsed as JSON.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .expect("lock")
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or_else(|e| panic!("not JSON: {b:?}: {e}")))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
