//! Shared integration-test harness: real etcd, real HAProxy, real Docker.
//!
//! Every process a test starts is owned by a guard that kills it (by PID) on drop, so a
//! panicking test cleans up too; children also get PDEATHSIG so a test process killed
//! by a timeout takes them along. Each test gets free 127.0.0.1 ports, its own temp
//! dir and its own key prefix, so tests run in parallel.
#![allow(dead_code)]

pub mod cdp;
pub mod dns;
pub mod haproxy;
pub mod netns;
pub mod pki;
pub mod registrar;

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use portolan::config::EtcdConfig;

/// Test image built from scratch with busybox (see scripts/test-env.sh).
pub const TEST_IMAGE: &str = "portolan-test-busybox:latest";
/// Every container a test creates carries this label (value: the test's run id).
pub const TEST_LABEL: &str = "portolan.test";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique across parallel test processes: `<tag>-<pid>-<n>`.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A key prefix of its own for one test.
pub fn unique_prefix(tag: &str) -> String {
    format!("/t/{}", unique(tag))
}

/// A port that was free a moment ago. Racy by nature; starters retry on bind errors.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Polls `cond` every 20 ms until it is true or `timeout` passes: the one waiting loop
/// of the suite. Ok(how long it took), or Err(timeout).
async fn poll<F, Fut>(timeout: Duration, cond: F) -> Result<Duration, Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    when(timeout, Duration::from_millis(20), cond)
        .await
        .ok_or(timeout)
}

/// Checks `cond` every `every` until it holds (how long that took) or `limit` passes
/// (None). Measurements poll finer than `wait_until`'s 20 ms, which would round every
/// figure up to it.
pub async fn when<F, Fut>(limit: Duration, every: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until `cond` holds. Returns how long it took; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(timeout, cond)
        .await
        .unwrap_or_else(|t| panic!("timed out after {t:?} waiting for: {what}"))
}

/// Like `wait_until`, but returns false instead of panicking on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(timeout, cond).await.is_ok()
}

/// Fails the test with what to install when `program` is not on PATH: a service-backed
/// test on an unprepared machine says what it needs instead of a bare "No such file".
pub fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "this test needs `{program}` (Debian package {package}): run `bash scripts/test-env.sh`, \
         which installs and starts everything the tests use"
    );
}

/// A `Command` whose child dies with the test process (SIGKILL on parent death).
pub fn owned_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    cmd
}

/// A child process killed (SIGKILL, by PID) and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits up to `timeout` for exit; returns the exit status if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The flags of one member of a new etcd cluster (`initial_cluster`: `name=peer_url,…`
/// of every member), logging warnings only; `extra` flags after them.
pub fn etcd_member_args(
    name: &str,
    data_dir: &Path,
    client_url: &str,
    peer_url: &str,
    initial_cluster: &str,
    token: &str,
    extra: &[&str],
) -> Vec<String> {
    let data_dir = data_dir.display().to_string();
    [
        "--name",
        name,
        "--data-dir",
        &data_dir,
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        token,
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// A private single-member etcd on free 127.0.0.1 ports with a temp data dir.
pub struct Etcd {
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    proc: Option<Proc>,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Etcd::start_in(tempfile::tempdir().expect("tempdir")).await
    }

    async fn start_in(dir: tempfile::TempDir) -> Etcd {
        need("etcd", "etcd-server");
        let data_dir = dir.path().join("data");
        let mut e = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            data_dir,
            dir,
            proc: None,
        };
        for _ in 0..5 {
            if e.launch().await {
                return e;
            }
            e.client_port = free_port();
            e.peer_port = free_port();
        }
        panic!("etcd did not start after 5 attempts; is etcd-server installed?");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig::local(&self.endpoint(), prefix)
    }

    async fn launch(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("log file");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let mut cmd = owned_command("etcd");
        cmd.args(["--name", "test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let mut proc = Proc::spawn("etcd", &mut cmd);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !proc.alive() {
                return false;
            }
            if self.healthy().await {
                self.proc = Some(proc);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        false
    }

    async fn healthy(&self) -> bool {
        match etcd_client::Client::connect([self.endpoint()], None).await {
            Ok(mut c) => matches!(
                tokio::time::timeout(Duration::from_secs(1), c.status()).await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connect to test etcd")
    }

    /// Stops etcd (SIGKILL), keeping its data dir.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts etcd again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.launch().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not restart on port {}", self.client_port);
    }

    /// Replaces etcd by an empty cluster on the same ports (fresh data dir).
    pub async fn restart_empty(&mut self) {
        self.stop();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.data_dir = self.dir.path().join(format!("data-{n}"));
        for _ in 0..50 {
            if self.launch().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("fresh etcd did not start on port {}", self.client_port);
    }

    /// All keys and values under `prefix`, sorted.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut c = self.client().await;
        let resp = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("etcd get");
        let mut kvs: Vec<(String, String)> = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key_str().unwrap_or("").to_string(),
                    kv.value_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        kvs.sort();
        kvs
    }

    pub async fn put(&self, key: &str, value: &str) {
        let mut c = self.client().await;
        c.put(key, value, None).await.expect("etcd put");
    }

    pub async fn delete(&self, key: &str) {
        let mut c = self.client().await;
        c.delete(key, None).await.expect("etcd delete");
    }

    /// `etcdctl del --prefix`, in one transaction.
    pub async fn delete_prefix(&self, prefix: &str) {
        let mut c = self.client().await;
        c.delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .expect("etcd delete --prefix");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------- Docker ----------

/// Runs the docker CLI, returning trimmed stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    need("docker", "docker.io");
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker CLI");
    if !out.status.success() {
        panic!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Like `docker`, but returns None on failure.
pub fn try_docker(args: &[&str]) -> Option<String> {
    let out = Command::new("docker").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds the busybox test image if it is missing (scripts/test-env.sh normally has).
pub fn ensure_test_image() {
    need("docker", "docker.io");
    assert!(
        try_docker(&["info", "--format", "{{.ServerVersion}}"]).is_some(),
        "no Docker Engine answers: run `bash scripts/test-env.sh` (starts dockerd), or set DOCKER_HOST"
    );
    if try_docker(&["image", "inspect", TEST_IMAGE]).is_some() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("bash")
        .arg(root.join("scripts/build-test-image.sh"))
        .status()
        .expect("run scripts/build-test-image.sh");
    assert!(status.success(), "building the test image failed");
}

/// A container removed (`docker rm -f`) on drop. Created with the test label, serving
/// `httpd` on port 8080 with a page that names the container.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker run -d` with the test label, `extra` args (labels, ports, env) and the
    /// busybox httpd command unless `cmd` is given.
    pub fn run(run_id: &str, extra: &[&str], cmd: Option<&[&str]>) -> Container {
        ensure_test_image();
        let name = unique("c");
        let label = format!("{TEST_LABEL}={run_id}");
        let mut args: Vec<&str> = vec!["run", "-d", "--name", &name, "--label", &label];
        args.extend_from_slice(extra);
        args.push(TEST_IMAGE);
        let default_cmd = ["/bin/serve"];
        args.extend_from_slice(cmd.unwrap_or(&default_cmd));
        let id = docker(&args);
        Container { id, name }
    }

    pub fn short_id(&self) -> String {
        self.id.chars().take(12).collect()
    }

    /// The host port published for `container_port/tcp`.
    pub fn host_port(&self, container_port: u16) -> u16 {
        let out = docker(&["port", &self.id, &format!("{container_port}/tcp")]);
        out.lines()
            .next()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no published port for {container_port} in {out:?}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes every container carrying the test label with this run id.
pub fn remove_labelled(run_id: &str) {
    let filter = format!("label={TEST_LABEL}={run_id}");
    if let Some(ids) = try_docker(&["ps", "-aq", "--filter", &filter]) {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = try_docker(&args);
        }
    }
}

// ---------- HTTP ----------

/// A plain HTTP/1.1 GET over TCP with a Host header, so tests need no HTTP client
/// crate. Returns (status, body) or None when the connection fails.
pub async fn http_get(addr: &str, host: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .ok()
        .flatten()
}

/// Path of the portolan binary built for these tests; `PORTOLAN_TEST_BIN` names a copy
/// instead (several checkouts sharing one target dir overwrite each other's binary).
pub fn portolan_bin() -> PathBuf {
    std::env::var_os("PORTOLAN_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portolan")))
}

/// The built binary, with every `PORTOLAN_*` variable of the test's own environment
/// removed, so a setting on the machine running the tests cannot leak in. The one way
/// tests run the binary; callers add `--config` (or `PORTOLAN_CONFIG`) as they need.
pub fn portolan_cmd() -> Command {
    let mut cmd = owned_command(portolan_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTOLAN_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Writes a secret file with mode 0600, as the daemons require of a password file.
pub fn write_private(path: impl AsRef<Path>, text: impl AsRef<[u8]>) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.as_ref();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    std::io::Write::write_all(&mut f, text.as_ref()).expect("write secret");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 600");
}
