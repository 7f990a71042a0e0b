//! dockerd restarted under a running registrar: it reconnects and reconciles.
//!
//! Restarting the machine's shared dockerd would stop every other test's containers
//! (and other people's), so this test runs a private dockerd the way the test machine
//! runs its own (`nohup dockerd … &`, no systemd), with its own socket, data root, exec
//! root, pid file and bridge, and restarts that one: SIGTERM by PID, wait for the exit,
//! start it again with the same arguments, wait for `docker info`. Needs root, as
//! dockerd does.
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::registrar::*;
use common::*;
use portolan::schema;

const T: Duration = Duration::from_secs(30);

struct PrivateDockerd {
    dir: tempfile::TempDir,
    bridge: String,
    proc: Option<Proc>,
}

impl PrivateDockerd {
    fn start() -> PrivateDockerd {
        // Short paths: unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ptd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let n = std::process::id() % 200;
        let bridge = format!("ptd{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["link", "del", &bridge]).status();
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip link add {bridge} type bridge && ip addr add 10.213.{n}.1/24 dev {bridge} && ip link set {bridge} up"
            ))
            .status()
            .expect("ip")
            .success();
        assert!(ok, "cannot create bridge {bridge}");
        let mut d = PrivateDockerd {
            dir,
            bridge,
            proc: None,
        };
        d.launch();
        // No registry here: copy the test image over from the shared daemon.
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {TEST_IMAGE} | docker -H {} load -q",
                d.host()
            ))
            .stdout(Stdio::null())
            .status()
            .expect("docker save | load")
            .success();
        assert!(ok, "cannot load the test image into the private dockerd");
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    fn docker(&self, args: &[&str]) -> String {
        let host = self.host();
        let mut all = vec!["-H", host.as_str()];
        all.extend_from_slice(args);
        docker(&all)
    }

    fn launch(&mut self) {
        // A SIGKILLed daemon leaves its pid file behind and then refuses to start.
        let _ = std::fs::remove_file(self.path("docker.pid"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .expect("log");
        let mut cmd = owned_command("dockerd");
        cmd.args(["--host", &self.host()])
            .arg("--data-root")
            .arg(self.path("data"))
            .arg("--exec-root")
            .arg(self.path("exec"))
            .arg("--pidfile")
            .arg(self.path("docker.pid"))
            .args(["--bridge", &self.bridge])
            .args(["--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.proc = Some(Proc::spawn("dockerd", &mut cmd));
        let host = self.host();
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if try_docker(&["-H", &host, "info"]).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "private dockerd did not come up; log:\n{}",
            std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default()
        );
    }

    /// SIGTERM by PID and wait for the exit: dockerd stops its containers on the way.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            if p.wait_exit(T).is_none() {
                p.kill();
            }
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        let host = self.host();
        if let Some(ids) = try_docker(&["-H", &host, "ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["-H", host.as_str(), "rm", "-f"];
                args.extend(ids);
                let _ = try_docker(&args);
            }
        }
        self.stop();
        // dockerd bind-mounts its roots; unmount before the temp dir goes.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {0}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.path().display()
            ))
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_restart_reconnects_and_reconciles() {
    // Not a silent pass: without root this test cannot run, and says so as a failure.
    assert!(
        is_root(),
        "a private dockerd needs root: run the suite as root (CI does), or leave this test out with `--skip dockerd_restart`"
    );
    let mut daemon = tokio::task::block_in_place(PrivateDockerd::start);
    let rig = Rig::new("reg-dockerd").await;
    // No periodic resync during the test: only the reconnect can heal what is stale.
    let registrar = rig.start(&Opts {
        docker_host: Some(daemon.host()),
        resync: 3600,
        ttl: 10,
        ..Default::default()
    });
    let label = format!("{TEST_LABEL}={}", rig.run);
    let run = |daemon: &PrivateDockerd, restart: &str, port: u16| {
        daemon.docker(&[
            "run",
            "-d",
            "--label",
            &label,
            "--restart",
            restart,
            "--stop-timeout",
            "1",
            "-p",
            &format!("127.0.0.1:{port}:8080"),
            TEST_IMAGE,
        ])
    };
    let (port_a, port_b) = (free_port(), free_port());
    let survivor = run(&daemon, "always", port_a);
    let goner = run(&daemon, "no", port_b);
    let key = |id: &str| {
        schema::node_service_key(
            &rig.prefix,
            &rig.node,
            "portolan-test-busybox",
            &schema::instance_id(&rig.node, id, 8080),
        )
    };
    rig.wait_value(&key(&survivor), T).await;
    rig.wait_value(&key(&goner), T).await;
    let page = |id: &str| id.chars().take(12).collect::<String>();
    let addr_a = format!("127.0.0.1:{port_a}");
    let serves_survivor = || async {
        matches!(http_get(&addr_a, "t", "/").await, Some((200, b)) if b.trim() == page(&survivor))
    };
    assert!(serves_survivor().await);

    // Restart: dockerd stops both containers on the way down and brings back the one
    // with a restart policy. Meanwhile a stale key of this node appears in etcd that
    // only a reconcile (not an event) can remove.
    tokio::task::block_in_place(|| daemon.stop());
    let ghost = schema::node_service_key(
        &rig.prefix,
        &rig.node,
        "ghost",
        &format!("{}-0123456789ab-8080", rig.node),
    );
    rig.etcd
        .put(
            &ghost,
            &format!(
                r#"{{"addr":"127.0.0.1:1","node":"{}","container":"0123456789ab","port":8080}}"#,
                rig.node
            ),
        )
        .await;
    tokio::task::block_in_place(|| daemon.launch());
    let restarted = Instant::now();

    rig.wait_gone(&ghost, T).await;
    rig.wait_gone(&key(&goner), T).await;
    rig.wait_value(&key(&survivor), T).await;
    let healed = restarted.elapsed();
    wait_until("the restarted container to serve", T, serves_survivor).await;
    assert_eq!(rig.services().await.len(), 1, "{:?}", rig.services().await);
    assert!(
        registrar.running(),
        "the registrar exited when dockerd went away"
    );

    // Events flow again on the new connection.
    let late = run(&daemon, "no", free_port());
    rig.wait_value(&key(&late), T).await;
    eprintln!("dockerd restart: etcd matched Docker {healed:?} after the daemon answered again");
    drop(registrar);
    tokio::task::block_in_place(|| drop(daemon));
}
