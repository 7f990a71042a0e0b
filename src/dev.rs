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

use crate::cli::DevArgs;

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
        if let Ok(mut c) = etcd_client::Client::connect([endpoint], None).await {
            if matches!(
                tokio::time::timeout(Duration::from_secs(1), c.status()).await,
                Ok(Ok(_))
            ) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("etcd did not answer on {endpoint} within {timeout:?}")
}

async fn run_in(
    args: &DevArgs,
    dir: &Path,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let _ = (args, dir, tasks, shutdown);
    let _ = (spawn_child, stop_child, wait_for_etcd);
    bail!("dev: not implemented yet")
}
