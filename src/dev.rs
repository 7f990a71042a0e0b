//! `portolan dev`: etcd + HAProxy + registrar + watcher on one machine, started and
//! stopped together. etcd and HAProxy are child processes (killed with us, even on
//! SIGKILL, through PDEATHSIG); registrar and watcher run in-process on the same
//! runtime, exactly as their daemons do.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::Instrument;

use crate::cli::DevArgs;
use crate::config::{self, EtcdConfig};
use crate::{etcd, registrar, watcher};

/// A binary `portolan dev` needs, and the Debian package that provides it.
const NEEDS: &[(&str, &str)] = &[("etcd", "etcd-server"), ("haproxy", "haproxy")];

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Before anything is started or written: a second `dev` on the same ports would
    // otherwise talk to the first one's etcd (and delete its status key on the way out).
    ports_are_free(&args)?;
    preflight().await?;
    let dir = workdir()?;
    let tasks = TaskTracker::new();
    let result = run_in(&args, &dir, &tasks, &shutdown).await;
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        eprintln!("[dev] some components did not stop within 10 s");
    }
    if args.keep {
        eprintln!("[dev] kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Every port this stack would listen on, with the flag that moves it.
fn ports(args: &DevArgs) -> [(u16, &'static str); 4] {
    [
        (args.http_port, "--http-port"),
        (args.stats_port, "--stats-port"),
        (args.etcd_port, "--etcd-port"),
        (
            args.etcd_port.wrapping_add(1),
            "--etcd-port (etcd's peer port is the next one)",
        ),
    ]
}

/// Refuses ports that are taken (by another `portolan dev`, or anything) or given
/// twice, naming each and its flag, before anything is touched.
fn ports_are_free(args: &DevArgs) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for (port, flag) in ports(args) {
        if port == 0 {
            problems.push(format!("{flag}: port 0 is not a port to listen on"));
        } else if let Some(other) = seen.insert(port, flag) {
            problems.push(format!("port {port} is given twice ({other} and {flag})"));
        } else if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            problems.push(format!(
                "port {port} on 127.0.0.1 is in use ({e}): another `portolan dev`? stop it, or pick another with {flag}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "portolan dev cannot start:\n  - {}",
            problems.join("\n  - ")
        )
    }
}

/// Finds what is missing before anything is started, and says how to install it.
async fn preflight() -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (bin, package) in NEEDS {
        if which(bin).is_none() {
            problems.push(format!(
                "`{bin}` is not on PATH: install it with `sudo apt-get install {package}`"
            ));
        }
    }
    match bollard::Docker::connect_with_local_defaults() {
        Ok(d) => {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(3), d.ping())
                .await
                .map_err(|_| "timed out".to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                problems.push(format!(
                    "no Docker Engine answers ({e}): install it with `sudo apt-get install docker.io` \
                     and start it (`sudo systemctl start docker`, or `sudo dockerd &`)"
                ));
            }
        }
        Err(e) => problems.push(format!(
            "cannot reach Docker ({e}): install it with `sudo apt-get install docker.io`"
        )),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "portolan dev cannot start:\n  - {}",
            problems.join("\n  - ")
        )
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

fn workdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("portolan-dev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Spawns a child that dies with us, streaming its output with a `[name]` prefix.
fn spawn_child(
    name: &'static str,
    cmd: &mut Command,
    tasks: &TaskTracker,
) -> anyhow::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: set_pdeathsig only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
    if let Some(out) = child.stdout.take() {
        tasks.spawn(prefix_lines(name, out));
    }
    if let Some(err) = child.stderr.take() {
        tasks.spawn(prefix_lines(name, err));
    }
    Ok(child)
}

async fn prefix_lines(name: &'static str, stream: impl tokio::io::AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("[{name}] {line}");
    }
}

/// Stops a child politely (SIGTERM), then firmly after `grace`.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

async fn wait_for_etcd(endpoint: &str, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("etcd exited at start ({status}); is port {endpoint} already in use? try --etcd-port");
        }
        if let Ok(mut c) = etcd::connect(&EtcdConfig::local(endpoint, PREFIX)).await {
            if etcd::call(c.status()).await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("etcd did not answer on {endpoint} within {timeout:?}")
}

/// The default template, shipped inside the binary so `portolan dev` works from anywhere.
const DEFAULT_TEMPLATE: &str = include_str!("../templates/haproxy.cfg.tera");
/// Image built by scripts/dev.sh (busybox httpd on :8080), used in the printed example.
const DEMO_IMAGE: &str = "portolan-demo:latest";
const PREFIX: &str = "/portolan";

async fn run_in(
    args: &DevArgs,
    dir: &Path,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let endpoint = format!("http://127.0.0.1:{}", args.etcd_port);
    let peer = format!("http://127.0.0.1:{}", args.etcd_port.saturating_add(1));
    let mut etcd = spawn_child(
        "etcd",
        Command::new("etcd")
            .args(["--name", "dev", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("dev={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"]),
        tasks,
    )?;
    let result = with_etcd(args, dir, tasks, shutdown, &endpoint, &mut etcd).await;
    stop_child(&mut etcd, Duration::from_secs(5)).await;
    result
}

async fn with_etcd(
    args: &DevArgs,
    dir: &Path,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    endpoint: &str,
    etcd: &mut Child,
) -> anyhow::Result<()> {
    tokio::select! {
        r = wait_for_etcd(endpoint, etcd, Duration::from_secs(20)) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    }

    // HAProxy needs a valid file before the watcher exists: render the template
    // with no services, exactly as the watcher would.
    let template_path = dir.join("haproxy.cfg.tera");
    let cfg_path = dir.join("haproxy.cfg");
    let master = dir.join("master.sock");
    let admin = dir.join("admin.sock");
    std::fs::write(&template_path, DEFAULT_TEMPLATE)?;
    let mut vars = toml::Table::new();
    vars.insert("domain".into(), args.domain.clone().into());
    vars.insert(
        "http_bind".into(),
        format!("127.0.0.1:{}", args.http_port).into(),
    );
    vars.insert(
        "stats_bind".into(),
        format!("127.0.0.1:{}", args.stats_port).into(),
    );
    vars.insert("admin_socket".into(), admin.display().to_string().into());
    // No HTTPS bind: the default *:443 needs root and may be taken (HTTPS in `dev`, with
    // a dev CA, is not built yet).
    vars.insert("https_bind".into(), "off".into());
    // HAProxy runs as the developer on temp paths: no user switch, no chroot.
    vars.insert("drop_privileges".into(), false.into());
    let template =
        watcher::render::Template::compile(&template_path.display().to_string(), DEFAULT_TEMPLATE)?;
    let empty = watcher::store::StoreSnapshot::default();
    std::fs::write(
        &cfg_path,
        template.render(&watcher::render::context(&empty, &vars))?,
    )?;

    let mut haproxy = spawn_child(
        "haproxy",
        Command::new("haproxy")
            .arg("-W")
            .arg("-S")
            .arg(format!("{},mode,600", master.display()))
            .arg("-f")
            .arg(&cfg_path),
        tasks,
    )?;
    let result = with_haproxy(args, dir, shutdown, endpoint, &mut haproxy, vars).await;
    stop_child(&mut haproxy, Duration::from_secs(5)).await;
    result
}

async fn with_haproxy(
    args: &DevArgs,
    dir: &Path,
    shutdown: &CancellationToken,
    endpoint: &str,
    haproxy: &mut Child,
    vars: toml::Table,
) -> anyhow::Result<()> {
    let master = dir.join("master.sock");
    let start = Instant::now();
    while !master.exists() {
        if let Ok(Some(status)) = haproxy.try_wait() {
            bail!(
                "haproxy exited at start ({status}); are ports {} and {} free? try --http-port/--stats-port",
                args.http_port,
                args.stats_port
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "haproxy did not open its master socket {}",
                master.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The file a user would write for this stack, written where `status` and `ls` can be
    // pointed at it, and read back through the same resolution as `portolan watcher`
    // and `portolan registrar`: dev gets their defaults and validation (a bad
    // --only-label is refused here, by name), and the file is exactly what runs.
    let config_path = dir.join("portolan.toml");
    std::fs::write(&config_path, config_file(args, dir, endpoint, &vars))
        .with_context(|| format!("write {}", config_path.display()))?;
    let file = config::FileConfig::load(Some(&config_path))?;
    let watcher_cfg = config::resolve_watcher(&file, &Default::default())?;
    let registrar_cfg = config::resolve_registrar(&file, &Default::default())?;

    let components = shutdown.child_token();
    let watcher_task = tokio::spawn(
        watcher::run(watcher_cfg, components.clone()).instrument(tracing::info_span!("watcher")),
    );
    let registrar_task = tokio::spawn(
        registrar::run(registrar_cfg, components.clone())
            .instrument(tracing::info_span!("registrar")),
    );
    print_banner(args, dir, endpoint, &config_path).await;
    let haproxy_exit = async {
        let s = haproxy.wait().await;
        format!(
            "haproxy exited unexpectedly ({})",
            s.map(|s| s.to_string()).unwrap_or_default()
        )
    };
    supervise(
        watcher_task,
        registrar_task,
        haproxy_exit,
        shutdown,
        components,
    )
    .await
}

/// Runs until Ctrl-C or until a component ends: then stops the others and returns that
/// component's own error (the caller cleans up and exits non-zero). A task that has
/// ended is never awaited again (a JoinHandle polled after completion panics).
async fn supervise(
    mut watcher_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    mut registrar_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    haproxy_exit: impl std::future::Future<Output = String>,
    shutdown: &CancellationToken,
    components: CancellationToken,
) -> anyhow::Result<()> {
    let (mut watcher_done, mut registrar_done) = (false, false);
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = &mut watcher_task => {
            watcher_done = true;
            Err(component_ended("watcher", r))
        }
        r = &mut registrar_task => {
            registrar_done = true;
            Err(component_ended("registrar", r))
        }
        why = haproxy_exit => Err(anyhow::anyhow!(why)),
    };
    if let Err(e) = &outcome {
        eprintln!("[dev] {e:#}; stopping everything");
    }
    components.cancel();
    let drain = async {
        if !watcher_done {
            let _ = (&mut watcher_task).await;
        }
        if !registrar_done {
            let _ = (&mut registrar_task).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        watcher_task.abort();
        registrar_task.abort();
        eprintln!("[dev] registrar/watcher did not stop within 10 s");
    }
    outcome
}

/// The stack's config file, as a user would write it (`portolan status --config` and
/// `portolan ls --config` read it). Paths and strings are TOML-quoted.
fn config_file(args: &DevArgs, dir: &Path, endpoint: &str, vars: &toml::Table) -> String {
    let q = |s: &str| toml::Value::from(s).to_string();
    let p = |p: &Path| q(&p.display().to_string());
    let only_label = args
        .only_label
        .as_deref()
        .map(|l| format!("only_label = {}\n", q(l)))
        .unwrap_or_default();
    format!(
        "# Written by `portolan dev`: the config of this stack, for\n\
         #   portolan status --config {path}\n\
         #   portolan ls --config {path}\n\
         [etcd]\n\
         endpoints = [{endpoint}]\n\
         prefix = {prefix}\n\n\
         [registrar]\n\
         advertise_ip = \"127.0.0.1\"\n\
         state_dir = {state}\n\
         deregister_on_exit = true\n\
         {only_label}\n\
         [watcher]\n\
         name = \"dev\"\n\
         state_dir = {wstate}\n\
         # The registrar advertises 127.0.0.1 here, which the default routing policy\n\
         # refuses (loopback is the load balancer itself).\n\
         allowed_networks = [\"127.0.0.0/8\"]\n\n\
         [[template]]\n\
         src = {src}\n\
         dest = {dest}\n\
         check_cmd = \"haproxy -c -f {{src}}\"\n\
         haproxy_master_socket = {master}\n\
         haproxy_admin_socket = {admin}\n\n\
         [template.vars]\n\
         {vars}",
        path = dir.join("portolan.toml").display(),
        endpoint = q(endpoint),
        prefix = q(PREFIX),
        state = p(&dir.join("state")),
        wstate = p(&dir.join("watcher-state")),
        src = p(&dir.join("haproxy.cfg.tera")),
        dest = p(&dir.join("haproxy.cfg")),
        master = p(&dir.join("master.sock")),
        admin = p(&dir.join("admin.sock")),
        vars = toml::to_string(vars).unwrap_or_default(),
    )
}

fn component_ended(
    name: &str,
    r: Result<anyhow::Result<()>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow::anyhow!("{name} stopped unexpectedly"),
        Ok(Err(e)) => e.context(format!("{name} failed")),
        Err(e) => anyhow::anyhow!("{name} panicked: {e}"),
    }
}

/// How to call this binary again: `portolan` when that is what PATH finds, else the
/// full path (e.g. target/release/portolan right after scripts/dev.sh).
fn self_command() -> String {
    let me = std::env::current_exe().ok();
    match (&me, which("portolan")) {
        (Some(me), Some(found)) if found.canonicalize().ok().as_ref() == Some(me) => {
            "portolan".into()
        }
        (Some(me), _) => me.display().to_string(),
        (None, _) => "portolan".into(),
    }
}

async fn print_banner(args: &DevArgs, dir: &Path, endpoint: &str, config: &Path) {
    let front = format!("http://127.0.0.1:{}", args.http_port);
    let have_demo = Command::new("docker")
        .args(["image", "inspect", DEMO_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    let run = if have_demo {
        format!("docker run -d --rm -l portolan.service=hello -p 8080 {DEMO_IMAGE}")
    } else {
        "docker run -d --rm -l portolan.service=hello -p 80 nginx   \
         # any image serving HTTP; scripts/dev.sh builds portolan-demo offline"
            .to_string()
    };
    let lines = [
        String::new(),
        "Portolan dev stack is up (Ctrl-C stops everything).".into(),
        format!(
            "  front door  {front}   routes Host: <service>.{}",
            args.domain
        ),
        format!("  stats       http://127.0.0.1:{}/", args.stats_port),
        format!("  etcd        {endpoint}   prefix {PREFIX}"),
        format!(
            "  files       {}   (edit haproxy.cfg.tera there: it re-renders at once)",
            dir.display()
        ),
        format!("  config      {}", config.display()),
        String::new(),
        "Try it:".into(),
        format!("  {run}"),
        format!("  curl -H 'Host: hello.{}' {front}/", args.domain),
        format!("  {} ls --etcd-endpoints {endpoint}", self_command()),
        format!("  {} status --config {}", self_command(), config.display()),
        format!("  etcdctl --endpoints {endpoint} get --prefix {PREFIX}/"),
        String::new(),
    ];
    println!("{}", lines.join("\n"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(http: u16, stats: u16, etcd: u16) -> DevArgs {
        DevArgs {
            http_port: http,
            stats_port: stats,
            etcd_port: etcd,
            domain: "localhost".into(),
            keep: false,
            only_label: Some("portolan.test=a\"b".into()),
        }
    }

    /// A component that stops is reported with its own error, the other one is
    /// stopped, and nothing panics (a finished JoinHandle awaited again would).
    #[tokio::test]
    async fn a_component_that_stops_is_reported_by_its_own_error() {
        let shutdown = CancellationToken::new();
        let components = shutdown.child_token();
        let registrar = tokio::spawn(async {
            Err(anyhow::anyhow!(
                "node name \"vm\" is held by another registrar"
            ))
        });
        let stopped = components.clone();
        let watcher = tokio::spawn(async move {
            stopped.cancelled().await;
            Ok(())
        });
        let err = supervise(
            watcher,
            registrar,
            std::future::pending(),
            &shutdown,
            components.clone(),
        )
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("registrar failed") && msg.contains("held by another"),
            "{msg}"
        );
        assert!(components.is_cancelled());

        // The watcher ending without error is still a stop to report.
        let err = watcher_ends(&shutdown, tokio::spawn(async { Ok(()) })).await;
        assert!(
            err.to_string().contains("watcher stopped unexpectedly"),
            "{err}"
        );
        // A panic in a component is an error too, not a panic of dev.
        let err = watcher_ends(&shutdown, tokio::spawn(async { panic!("boom") })).await;
        assert!(err.to_string().contains("watcher panicked"), "{err}");
    }

    /// `supervise` with `watcher` and a registrar that runs until it is stopped.
    async fn watcher_ends(
        shutdown: &CancellationToken,
        watcher: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> anyhow::Error {
        let components = shutdown.child_token();
        let c = components.clone();
        let registrar = tokio::spawn(async move {
            c.cancelled().await;
            Ok(())
        });
        supervise(
            watcher,
            registrar,
            std::future::pending(),
            shutdown,
            components,
        )
        .await
        .unwrap_err()
    }

    #[test]
    fn busy_or_repeated_ports_are_refused_by_flag_before_anything_starts() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = ports_are_free(&args(busy, free(), 0))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("port {busy}")) && err.contains("--http-port"),
            "{err}"
        );
        assert!(err.contains("--etcd-port: port 0"), "{err}");
        let p = free();
        let err = ports_are_free(&args(p, p, 0)).unwrap_err().to_string();
        assert!(
            err.contains("given twice (--http-port and --stats-port)"),
            "{err}"
        );
        // etcd's peer port (etcd + 1) counts.
        let err = ports_are_free(&args(free(), free(), busy - 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("peer port"), "{err}");
    }

    /// The file dev writes is one `status`, `ls` and the daemons accept, and it
    /// describes this stack.
    #[test]
    fn the_written_config_file_resolves_to_this_stack() {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = toml::Table::new();
        vars.insert("domain".into(), "localhost".into());
        vars.insert("drop_privileges".into(), false.into());
        let text = config_file(
            &args(8080, 8404, 23790),
            dir.path(),
            "http://127.0.0.1:23790",
            &vars,
        );
        let path = dir.path().join("portolan.toml");
        std::fs::write(&path, &text).unwrap();
        std::fs::write(dir.path().join("haproxy.cfg.tera"), "x").unwrap();
        let f = config::FileConfig::load(Some(&path)).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let w = config::resolve_watcher(&f, &Default::default()).unwrap();
        assert_eq!(w.etcd.endpoints, ["http://127.0.0.1:23790"]);
        assert_eq!(w.name, "dev");
        assert_eq!(w.templates[0].dest, dir.path().join("haproxy.cfg"));
        assert_eq!(
            w.templates[0].haproxy_admin_socket.as_deref(),
            Some(dir.path().join("admin.sock").as_path())
        );
        assert_eq!(w.templates[0].vars["domain"].as_str(), Some("localhost"));
        let r = config::resolve_registrar(&f, &Default::default()).unwrap();
        assert_eq!(r.only_label.as_deref(), Some("portolan.test=a\"b"));
        assert!(r.deregister_on_exit);
    }
}
