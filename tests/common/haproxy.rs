//! The front door for tests (owned by the watcher tests): HAProxy in master-worker mode,
//! small HTTP backends that answer with their own name, and a `portolan watcher`
//! process rendering the shipped template into HAProxy's config.
//!
//! Everything listens on 127.0.0.1 free ports and lives in a temp dir; HAProxy and the
//! watcher are killed by PID on drop (HAProxy's workers exit with their master).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use portolan::watcher::haproxy::{show_proc, MasterStatus};
use tokio_util::sync::CancellationToken;

use super::{free_port, need, owned_command, portolan_cmd, unique, wait_until, Etcd, Proc};

/// Host-header domain used by every front door test.
pub const DOMAIN: &str = "test";

/// Path of the shipped default template.
pub fn shipped_template() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy.cfg.tera")
}

// ---------- HTTP backends ----------

/// An HTTP/1.1 server on 127.0.0.1 answering every request with `name` (keep-alive
/// supported, so wrk through HAProxy works). Stops on drop.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0").await
    }

    /// One on `addr` (another loopback address, or a port another backend uses).
    pub async fn start_on(name: &str, addr: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
        let addr = listener.local_addr().expect("backend addr");
        let stop = CancellationToken::new();
        let hits = Arc::new(AtomicU64::new(0));
        let (body, h, s) = (Bytes::from(name.to_string()), hits.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((st, _)) => st, Err(_) => continue },
                };
                let (body, h, s) = (body.clone(), h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body)))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = s.cancelled() => {}
                    }
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            hits,
            stop,
        }
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    /// An instance record as the registrar writes it.
    pub fn record(&self) -> String {
        format!(
            r#"{{"addr":"{}","node":"test","tags":["t"],"weight":100}}"#,
            self.addr
        )
    }

    /// The record the registrar writes on the container's stop signal.
    pub fn draining_record(&self) -> String {
        self.record().replace('}', r#","draining":true}"#)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------- hook receiver ----------

/// An HTTP server on 127.0.0.1 that answers 200 to every POST and keeps the bodies
/// (parsed as JSON), as a webhook receiver would. Stops on drop.
pub struct HookReceiver {
    pub url: String,
    pub bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    stop: CancellationToken,
}

impl HookReceiver {
    pub async fn start() -> HookReceiver {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind hook receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
        let (b, s) = (bodies.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((st, _)) => st, Err(_) => continue },
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let b = b.clone();
                            async move {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|c| c.to_bytes())
                                    .unwrap_or_default();
                                if let Ok(v) = serde_json::from_slice(&body) {
                                    b.lock().unwrap().push(v);
                                }
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                    Bytes::new(),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HookReceiver { url, bodies, stop }
    }

    /// The events received so far named `event`.
    pub fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["event"] == event)
            .cloned()
            .collect()
    }
}

impl Drop for HookReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------- HAProxy ----------

/// `haproxy -W -S <sock> -f <cfg>`: master-worker mode, master CLI on a unix socket.
pub struct Haproxy {
    pub cfg: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    proc: Proc,
}

impl Haproxy {
    /// Starts HAProxy on an existing config and waits for its master socket.
    pub async fn start(cfg: &Path, sock: &Path, log: &Path) -> Haproxy {
        Haproxy::start_in(cfg, sock, log, None).await
    }

    /// `start`, looking host names up through `resolv_conf` (see `dns::use_resolv_conf`).
    pub async fn start_in(
        cfg: &Path,
        sock: &Path,
        log: &Path,
        resolv_conf: Option<&Path>,
    ) -> Haproxy {
        need("haproxy", "haproxy");
        let out = std::fs::File::create(log).expect("haproxy log");
        let mut cmd = owned_command("haproxy");
        if let Some(r) = resolv_conf {
            super::dns::use_resolv_conf(&mut cmd, r);
        }
        cmd.arg("-W")
            .arg("-S")
            .arg(sock)
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        let mut h = Haproxy {
            cfg: cfg.to_path_buf(),
            sock: sock.to_path_buf(),
            log: log.to_path_buf(),
            proc: Proc::spawn("haproxy", &mut cmd),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if h.status().await.is_some() {
                return h;
            }
            if !h.proc.alive() || std::time::Instant::now() > deadline {
                panic!("haproxy did not start; log:\n{}", h.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL the master (its workers follow). The socket file stays, as after a crash.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn master_pid(&self) -> i32 {
        self.proc.pid()
    }

    pub async fn status(&self) -> Option<MasterStatus> {
        show_proc(&self.sock, Duration::from_secs(2)).await.ok()
    }

    /// The master's reload counter, waiting out a reload in progress.
    pub async fn reloads(&self) -> u64 {
        for _ in 0..250 {
            if let Some(s) = self.status().await {
                return s.reloads;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "haproxy master socket {} stopped answering",
            self.sock.display()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A config HAProxy can start with before the watcher has rendered anything.
pub fn bootstrap_config(http_port: u16) -> String {
    format!(
        "global\n    log stderr format short local0 notice\n\
defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\
frontend bootstrap\n    bind 127.0.0.1:{http_port}\n\
    http-request return status 503 content-type text/plain string \"bootstrap\"\n"
    )
}

// ---------- the watcher ----------

/// How a front door is set up. `Default` is the shipped template with `haproxy -c`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Template text; None = the shipped `templates/haproxy.cfg.tera`.
    pub template: Option<String>,
    /// Lines appended to the shipped template (ignored when `template` is set).
    pub template_extra: String,
    pub check_cmd: String,
    /// Extra `key = value` lines for `[template.vars]`.
    pub vars: String,
    pub wait_min_ms: u64,
    pub wait_max_ms: u64,
    pub command_timeout_ms: u64,
    /// `reload_cmd` instead of the master socket.
    pub reload_cmd: Option<String>,
    /// Render `stats socket <dir>/admin.sock level admin` and give the watcher that
    /// socket (`haproxy_admin_socket`): membership changes go through the runtime API.
    pub admin_socket: bool,
    /// `haproxy_admin_socket` given to the watcher instead of the rendered one (to
    /// inject runtime API failures). Implies the rendered socket as with `admin_socket`.
    pub watcher_admin_socket: Option<String>,
    /// `[watcher] allowed_networks`; None = the default routing policy. The default
    /// here is 127.0.0.0/8, as every backend of these tests listens on 127.0.0.1.
    pub allowed_networks: Option<Vec<String>>,
    /// Extra `key = value` lines for `[watcher]`.
    pub watcher_extra: String,
    /// HAProxy and the watcher look host names up through this resolv.conf (a test
    /// resolver, `dns::Dns`) instead of the machine's.
    pub resolv_conf: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            template: None,
            template_extra: String::new(),
            check_cmd: "haproxy -c -f {src}".into(),
            vars: String::new(),
            wait_min_ms: 20,
            wait_max_ms: 500,
            command_timeout_ms: 10_000,
            reload_cmd: None,
            admin_socket: false,
            watcher_admin_socket: None,
            allowed_networks: Some(vec!["127.0.0.0/8".into()]),
            watcher_extra: String::new(),
            resolv_conf: None,
        }
    }
}

impl Options {
    /// The shipped template with the admin socket: membership changes take the
    /// runtime API.
    pub fn with_admin_socket() -> Options {
        Options {
            admin_socket: true,
            ..Default::default()
        }
    }
}

/// HAProxy + a watcher process + their files, for one test.
pub struct FrontDoor {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub name: String,
    pub http_port: u16,
    /// The default template's HTTPS bind (`https_bind`).
    pub https_port: u16,
    pub stats_port: u16,
    pub metrics_port: u16,
    pub template: PathBuf,
    pub dest: PathBuf,
    pub config: PathBuf,
    pub watcher_log: PathBuf,
    pub haproxy: Haproxy,
    pub watcher: Option<Proc>,
    pub etcd_endpoint: String,
    /// HAProxy's admin socket, when the config renders one.
    pub admin_sock: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

impl FrontDoor {
    /// Starts HAProxy on a bootstrap config, then the watcher, and waits for the
    /// watcher's first confirmed reload.
    pub async fn start(etcd: &Etcd, opts: Options) -> FrontDoor {
        let mut fd = FrontDoor::prepare(etcd, opts).await;
        fd.start_watcher();
        fd.wait_for_first_reload().await;
        fd
    }

    /// Everything but the watcher.
    pub async fn prepare(etcd: &Etcd, opts: Options) -> FrontDoor {
        let dir = tempfile::tempdir().expect("tempdir");
        let template = dir.path().join("haproxy.cfg.tera");
        let text = match &opts.template {
            Some(t) => t.clone(),
            None => {
                let mut t = std::fs::read_to_string(shipped_template()).expect("shipped template");
                t.push_str(&opts.template_extra);
                t
            }
        };
        std::fs::write(&template, text).expect("write template");
        let dest = dir.path().join("haproxy.cfg");
        let sock = dir.path().join("master.sock");
        let http_port = free_port();
        let https_port = free_port();
        let stats_port = free_port();
        let metrics_port = free_port();
        std::fs::write(&dest, bootstrap_config(http_port)).expect("bootstrap config");
        let haproxy = Haproxy::start_in(
            &dest,
            &sock,
            &dir.path().join("haproxy.log"),
            opts.resolv_conf.as_deref(),
        )
        .await;
        let prefix = super::unique_prefix("w");
        let name = unique("lb");
        let reload = match &opts.reload_cmd {
            Some(cmd) => format!("reload_cmd = {cmd:?}"),
            None => format!("haproxy_master_socket = {:?}", sock.display().to_string()),
        };
        let admin_sock = dir.path().join("admin.sock");
        let mut vars = opts.vars.clone();
        let mut admin = String::new();
        if opts.admin_socket || opts.watcher_admin_socket.is_some() {
            vars.push_str(&format!(
                "\nadmin_socket = {:?}\n",
                admin_sock.display().to_string()
            ));
            let watcher_sock = opts
                .watcher_admin_socket
                .clone()
                .unwrap_or_else(|| admin_sock.display().to_string());
            admin = format!("haproxy_admin_socket = {watcher_sock:?}");
        }
        let allowed = match &opts.allowed_networks {
            Some(nets) => format!("allowed_networks = {nets:?}"),
            None => String::new(),
        };
        let config = dir.path().join("portolan.toml");
        let toml = format!(
            r#"[etcd]
endpoints = ["{endpoint}"]
prefix = "{prefix}"

[watcher]
name = "{name}"
listen = "127.0.0.1:{metrics_port}"
wait = {{ min_ms = {min}, max_ms = {max} }}
command_timeout_ms = {timeout}
state_dir = {state_dir:?}
{allowed}
{watcher_extra}

[[template]]
src = "haproxy.cfg.tera"
dest = "haproxy.cfg"
check_cmd = {check:?}
{reload}
{admin}

[template.vars]
# HAProxy runs as the test's user on temp paths: no user switch, no chroot.
drop_privileges = false
domain = "{DOMAIN}"
http_bind = "127.0.0.1:{http_port}"
https_bind = "127.0.0.1:{https_port}"
stats_bind = "127.0.0.1:{stats_port}"
{vars}
"#,
            endpoint = etcd.endpoint(),
            min = opts.wait_min_ms,
            max = opts.wait_max_ms,
            timeout = opts.command_timeout_ms,
            check = opts.check_cmd,
            watcher_extra = opts.watcher_extra,
            state_dir = dir.path().join("watcher-state").display().to_string(),
        );
        std::fs::write(&config, toml).expect("write watcher config");
        FrontDoor {
            watcher_log: dir.path().join("watcher.log"),
            dir,
            prefix,
            name,
            http_port,
            https_port,
            stats_port,
            metrics_port,
            template,
            dest,
            config,
            haproxy,
            watcher: None,
            etcd_endpoint: etcd.endpoint(),
            admin_sock,
            resolv_conf: opts.resolv_conf.clone(),
        }
    }

    /// Starts `portolan watcher --config …`, appending its log to `watcher.log`.
    pub fn start_watcher(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.watcher_log)
            .expect("watcher log");
        let mut cmd = portolan_cmd();
        if let Some(r) = &self.resolv_conf {
            super::dns::use_resolv_conf(&mut cmd, r);
        }
        cmd.arg("watcher")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.watcher = Some(Proc::spawn("portolan watcher", &mut cmd));
    }

    /// SIGKILL the watcher (no cleanup runs).
    pub fn kill_watcher(&mut self) {
        if let Some(mut p) = self.watcher.take() {
            p.kill();
        }
    }

    pub async fn wait_for_first_reload(&self) {
        let h = &self.haproxy;
        wait_until(
            "the watcher's first reload",
            Duration::from_secs(20),
            || async { h.status().await.map(|s| s.reloads >= 1).unwrap_or(false) },
        )
        .await;
    }

    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    pub fn service_key(&self, service: &str, instance: &str) -> String {
        format!("{}/services/{service}/{instance}", self.prefix)
    }

    /// GET http://<service>.test/ through HAProxy: (status, body).
    pub async fn get(&self, service: &str) -> Option<(u16, String)> {
        super::http_get(&self.http_addr(), &format!("{service}.{DOMAIN}"), "/").await
    }

    /// True when a request for `service` is answered by `backend`.
    pub async fn routes_to(&self, service: &str, backend: &str) -> bool {
        matches!(self.get(service).await, Some((200, body)) if body == backend)
    }

    pub fn dest_text(&self) -> String {
        std::fs::read_to_string(&self.dest).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.watcher_log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        super::http_get(&self.metrics_addr(), "x", "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// One sample from /metrics, e.g. `portolan_watcher_reloads_total{result="ok"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// One command on HAProxy's admin socket; its answer, trimmed.
    pub async fn admin(&self, cmd: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(&self.admin_sock)
            .await
            .unwrap_or_else(|e| panic!("admin socket {}: {e}", self.admin_sock.display()));
        s.write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("admin write");
        s.shutdown().await.expect("admin shutdown");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("admin read");
        out.trim().to_string()
    }

    /// `srv_admin_state` of `backend/server` in `show servers state` (0 = ready; bit 1
    /// forced maintenance, 4 maintenance from the file's `disabled`, 8 forced drain).
    pub async fn admin_state(&self, backend: &str, server: &str) -> Option<u32> {
        let state = self.admin(&format!("show servers state {backend}")).await;
        state.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 6 && f[1] == backend && f[3] == server)
                .then(|| f[6].parse().ok())
                .flatten()
        })
    }

    /// Runs `haproxy -c` on the live file.
    pub fn dest_is_valid(&self) -> bool {
        std::process::Command::new("haproxy")
            .args(["-c", "-q", "-f"])
            .arg(&self.dest)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Writes the template the way editors do: a new file renamed over the old one.
    pub fn save_template(&self, text: &str) {
        let tmp = self.dir.path().join(".haproxy.cfg.tera.swp");
        std::fs::write(&tmp, text).expect("write template");
        std::fs::rename(&tmp, &self.template).expect("rename template");
    }
}
