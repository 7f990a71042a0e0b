//! `portolan dev` as a new user runs it: the printed example works as printed, and
//! SIGTERM leaves no etcd, HAProxy or portolan process and no temp folder behind.
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Two consecutive free ports (etcd takes port and port+1).
fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}

/// PIDs of every descendant of `pid` (children, grandchildren, …), from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents = std::collections::HashMap::<u32, Vec<u32>>::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Field 4 is the parent PID; the command name (field 2) may contain spaces.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parents.entry(ppid).or_default().push(child);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in parents.get(&p).cloned().unwrap_or_default() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[tokio::test]
async fn dev_serves_the_printed_example_and_stops_clean() {
    let run = unique("dev");
    let (http, stats, etcd) = (free_port(), free_port(), free_port_pair());
    let demo = "portolan-demo:latest";
    if try_docker(&["image", "inspect", demo]).is_none() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let ok = std::process::Command::new("bash")
            .arg(root.join("scripts/build-test-image.sh"))
            .arg(demo)
            .arg("--stop-on-term")
            .status()
            .expect("build demo image")
            .success();
        assert!(ok, "building {demo} failed");
    }

    let logs = tempfile::tempdir().expect("tempdir");
    let log_path = logs.path().join("dev.log");
    let started = Instant::now();
    let mut cmd = portolan_cmd();
    cmd.args(["dev", "--http-port", &http.to_string()])
        .args(["--stats-port", &stats.to_string()])
        .args(["--etcd-port", &etcd.to_string()])
        // Other tests run containers on the same engine meanwhile: register only ours.
        .args(["--only-label", &format!("{TEST_LABEL}={run}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).expect("dev log"));
    let mut dev = Proc::spawn("portolan dev", &mut cmd);
    let stdout = dev
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    while !banner.iter().any(|l: &String| l.contains("get --prefix")) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => banner.push(line),
            Err(e) => panic!("no banner from portolan dev ({e}); got {banner:?}"),
        }
    }
    eprintln!("dev: banner after {:?}", started.elapsed());
    let line = |needle: &str| {
        banner
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("banner has no {needle:?}: {banner:#?}"))
            .trim()
            .to_string()
    };
    assert!(line("front door").contains(&format!("http://127.0.0.1:{http}")));
    let dir = line("files")
        .split_whitespace()
        .nth(1)
        .expect("files path")
        .to_string();
    assert!(std::path::Path::new(&dir).join("haproxy.cfg").is_file());
    let config = line("config")
        .split_whitespace()
        .nth(1)
        .expect("config path")
        .to_string();
    assert!(config.starts_with(&dir), "{config} not in {dir}");

    // A second `dev` on the same ports refuses before it touches anything (it used to
    // attach to this stack's etcd and delete its status key on the way out).
    let second = portolan_cmd()
        .args(["dev", "--http-port", &http.to_string()])
        .args(["--stats-port", &stats.to_string()])
        .args(["--etcd-port", &etcd.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run a second portolan dev");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second dev started: {err}");
    for flag in ["--http-port", "--stats-port", "--etcd-port"] {
        assert!(
            err.contains(flag) && err.contains("in use"),
            "{flag}: {err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");

    // The printed `docker run`, as printed, plus our cleanup label.
    let docker_run = line("docker run");
    assert!(docker_run.contains(demo), "{docker_run}");
    let mut args: Vec<String> = docker_run
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    args.insert(1, format!("--label={TEST_LABEL}={run}"));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let clicked = Instant::now();
    let id = docker(&arg_refs);

    // The printed curl, run by a shell exactly as printed.
    let curl = line("curl -H");
    let reach = Instant::now();
    let reached = eventually(Duration::from_secs(20), || {
        let curl = curl.clone();
        let id = id.clone();
        async move {
            let out = tokio::process::Command::new("sh")
                .args(["-c", &format!("{curl} --silent --max-time 2")])
                .output()
                .await
                .expect("run curl");
            String::from_utf8_lossy(&out.stdout).trim() == &id[..12]
        }
    })
    .await;
    let took = reach.elapsed();
    if !reached {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "the printed curl never reached container {id} within 20 s; portolan dev log tail:\n{}",
            tail.join("\n")
        );
    }
    eprintln!("dev: container reachable through the front door {took:?} after docker run ({:?} incl. docker run)", clicked.elapsed());

    // `portolan ls` as printed (the binary's own path, as it is not on PATH here) lists it.
    let ls = line(" ls --etcd-endpoints");
    let out = std::process::Command::new("sh")
        .args(["-c", &ls])
        .output()
        .expect("run ls");
    let ls_out = String::from_utf8_lossy(&out.stdout);
    assert!(
        ls_out.contains("hello") && ls_out.contains(&id[..12]),
        "{ls_out}"
    );

    // The printed config file is one `status` and `ls` read: the watcher's status key
    // is there (the second dev did not delete it) and the container is listed.
    let status = portolan_cmd()
        .args(["status", "--config", &config])
        .output()
        .expect("run status");
    let st = String::from_utf8_lossy(&status.stdout);
    assert!(
        matches!(status.status.code(), Some(0 | 1)),
        "status --config {config}: {status:?}\n{st}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(st.contains("watcher dev: last apply"), "{st}");
    let out = portolan_cmd()
        .args(["ls", "--config", &config])
        .output()
        .expect("run ls --config");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id[..12]));

    // SIGTERM: everything it started goes away, and so does its temp folder.
    let family = descendants(dev.pid() as u32);
    let names: Vec<String> = family.iter().filter_map(|p| comm(*p)).collect();
    assert!(
        names.iter().any(|n| n == "etcd"),
        "no etcd child: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == "haproxy"),
        "no haproxy child: {names:?}"
    );
    dev.signal(nix::sys::signal::Signal::SIGTERM);
    let status = dev
        .wait_exit(Duration::from_secs(20))
        .expect("portolan dev exits on SIGTERM");
    assert!(status.success(), "exit status {status}");
    wait_until(
        "every child of portolan dev to be gone",
        Duration::from_secs(5),
        || {
            let family = family.clone();
            async move { family.iter().all(|p| comm(*p).is_none()) }
        },
    )
    .await;
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err(),
        "front door still open"
    );
    docker(&["rm", "-f", &id]);
    remove_labelled(&run);
}

#[test]
fn dev_names_the_package_of_a_missing_tool() {
    let out = portolan_cmd()
        .args(["dev", "--etcd-port", &free_port_pair().to_string()])
        .args(["--http-port", &free_port().to_string()])
        .args(["--stats-port", &free_port().to_string()])
        .env("PATH", "/nonexistent")
        .output()
        .expect("run portolan dev");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install etcd-server"), "{err}");
    assert!(err.contains("apt-get install haproxy"), "{err}");
}

/// The tour's demo image stops at once on `docker stop` (its /bin/serve traps SIGTERM;
/// httpd as PID 1 would ignore it and make every stop last its whole timeout), while
/// the tests' image keeps ignoring it (the drain tests measure in that window).
#[test]
fn the_demo_image_stops_on_sigterm_at_once() {
    let image = format!("{}:latest", unique("portolan-demo-test"));
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ok = std::process::Command::new("bash")
        .arg(root.join("scripts/build-test-image.sh"))
        .arg(&image)
        .arg("--stop-on-term")
        .status()
        .expect("build demo image")
        .success();
    assert!(ok, "building {image} failed");
    let run = unique("demo-stop");
    let label = format!("{TEST_LABEL}={run}");
    let id = docker(&["run", "-d", "--label", &label, &image]);
    // Serving first: the trap is set once httpd runs.
    wait_until_sync(Duration::from_secs(10), || {
        try_docker(&[
            "exec",
            &id,
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ])
        .is_some()
    });
    let started = Instant::now();
    docker(&["stop", "-t", "30", &id]);
    let took = started.elapsed();
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &id]);
    eprintln!("demo image: docker stop took {took:?}, exit code {code}");
    docker(&["rm", "-f", &id]);
    remove_labelled(&run);
    let _ = try_docker(&["rmi", &image]);
    assert!(
        took < Duration::from_secs(10),
        "docker stop took {took:?} (killed at the timeout?)"
    );
    assert_eq!(code.trim(), "0", "exited by its trap, not by SIGKILL");
}

fn wait_until_sync(limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "not ready within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
