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
use crate::config::{self, EtcdConfig, TemplateResource};
use crate::{etcd, registrar, watcher};

/// A binary `portolan dev` needs, and the Debian package that provides it.
const NEEDS: &[(&str, &str)] = &[("etcd", "etcd-server"), ("haproxy", "haproxy")];

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
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

    // The same resolution as `portolan watcher` and `portolan registrar`, from the file
    // a user would write for this stack: dev gets their defaults and validation (a bad
    // --only-label is refused here, by name).
    let file = config::FileConfig {
        etcd: config::EtcdOptions {
            endpoints: Some(vec![endpoint.to_string()]),
            prefix: Some(PREFIX.to_string()),
            ..Default::default()
        },
        registrar: config::RegistrarOptions {
            advertise_ip: Some("127.0.0.1".into()),
            state_dir: Some(dir.join("state")),
            deregister_on_exit: Some(true),
            only_label: args.only_label.clone(),
            ..Default::default()
        },
        watcher: config::WatcherOptions {
            name: Some("dev".into()),
            // The registrar advertises 127.0.0.1 here, which the default routing
            // policy refuses (loopback is the load balancer itself).
            allowed_networks: Some(vec!["127.0.0.0/8".into()]),
            ..Default::default()
        },
        template: vec![TemplateResource {
            src: dir.join("haproxy.cfg.tera"),
            dest: dir.join("haproxy.cfg"),
            check_cmd: Some("haproxy -c -f {src}".into()),
            haproxy_master_socket: Some(master.clone()),
            reload_cmd: None,
            haproxy_admin_socket: Some(dir.join("admin.sock")),
            mode: None,
            vars,
        }],
        ..Default::default()
    };
    let watcher_cfg = config::resolve_watcher(&file, &Default::default())?;
    let registrar_cfg = config::resolve_registrar(&file, &Default::default())?;

    let components = shutdown.child_token();
    let mut watcher_task = tokio::spawn(
        watcher::run(watcher_cfg, components.clone()).instrument(tracing::info_span!("watcher")),
    );
    let mut registrar_task = tokio::spawn(
        registrar::run(registrar_cfg, components.clone())
            .instrument(tracing::info_span!("registrar")),
    );
    print_banner(args, dir, endpoint).await;

    let outcome = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = &mut watcher_task => Err(component_ended("watcher", r)),
        r = &mut registrar_task => Err(component_ended("registrar", r)),
        s = haproxy.wait() => Err(anyhow::anyhow!("haproxy exited unexpectedly ({})", s.map(|s| s.to_string()).unwrap_or_default())),
    };
    components.cancel();
    let drain = async {
        let _ = (&mut watcher_task).await;
        let _ = (&mut registrar_task).await;
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

async fn print_banner(args: &DevArgs, dir: &Path, endpoint: &str) {
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
        String::new(),
        "Try it:".into(),
        format!("  {run}"),
        format!("  curl -H 'Host: hello.{}' {front}/", args.domain),
        format!("  {} ls --etcd-endpoints {endpoint}", self_command()),
        format!("  etcdctl --endpoints {endpoint} get --prefix {PREFIX}/"),
        String::new(),
    ];
    println!("{}", lines.join("\n"));
}
