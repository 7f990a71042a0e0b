//! A 3-member etcd cluster on 127.0.0.1: free ports, one temp dir, each member a child
//! process killed by PID when its guard drops (as `tests/common`'s single etcd). A member
//! can be stopped and started again on its data dir (the "member restarted" scenario).

use std::process::Stdio;
use std::time::Duration;

use crate::common::{free_port, need, owned_command, Proc};

pub struct Member {
    pub name: String,
    pub client_port: u16,
    args: Vec<String>,
    log: std::path::PathBuf,
    proc: Option<Proc>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let mut cmd = owned_command("etcd");
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.proc = Some(Proc::spawn(&format!("etcd {}", self.name), &mut cmd));
    }

    /// SIGKILL, keeping the data dir.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
}

/// (this member's id, the leader's id) as the member at `endpoint` answers.
pub async fn member_status(endpoint: &str) -> Option<(u64, u64)> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    let mut c = etcd_client::Client::connect([endpoint], Some(opts))
        .await
        .ok()?;
    let s = tokio::time::timeout(Duration::from_secs(1), c.status())
        .await
        .ok()?
        .ok()?;
    Some((s.header()?.member_id(), s.leader()))
}

impl Cluster {
    pub async fn start() -> Cluster {
        need("etcd", "etcd-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let names = ["e1", "e2", "e3"];
        let ports: Vec<(u16, u16)> = names.iter().map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = names
            .iter()
            .zip(&ports)
            .map(|(n, (_, p))| format!("{n}=http://127.0.0.1:{p}"))
            .collect();
        let token = crate::common::unique("fleet");
        let mut members = Vec::new();
        for (n, (client_port, peer_port)) in names.iter().zip(&ports) {
            let client = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{peer_port}");
            let args = crate::common::etcd_member_args(
                n,
                &dir.path().join(n),
                &client,
                &peer,
                &initial.join(","),
                &token,
                &[],
            );
            let mut m = Member {
                name: n.to_string(),
                client_port: *client_port,
                args,
                log: dir.path().join(format!("etcd-{n}.log")),
                proc: None,
            };
            m.start();
            members.push(m);
        }
        let c = Cluster { dir, members };
        assert!(
            c.wait_for_leader(Duration::from_secs(30)).await.is_some(),
            "a 3-member etcd cluster on ports {ports:?} elected no leader within 30 s; logs in {}",
            c.dir.path().display()
        );
        c
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Waits until every running member names the same leader; how long that took.
    pub async fn wait_for_leader(&self, limit: Duration) -> Option<Duration> {
        let endpoints = self.endpoints();
        crate::common::when(limit, Duration::from_millis(50), || {
            let endpoints = endpoints.clone();
            async move {
                let mut leaders = Vec::new();
                for e in &endpoints {
                    match member_status(e).await {
                        Some((_, leader)) if leader != 0 => leaders.push(leader),
                        _ => return false,
                    }
                }
                leaders.windows(2).all(|w| w[0] == w[1])
            }
        })
        .await
    }

    /// The index of the member that leads now.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if let Some((me, leader)) = member_status(&m.endpoint()).await {
                if me == leader {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Stops member `i` (SIGKILL) and starts it again on its data dir after `down`.
    /// How long until all three agree on a leader again, from the restart.
    pub async fn restart(&mut self, i: usize, down: Duration) -> Option<Duration> {
        self.members[i].stop();
        tokio::time::sleep(down).await;
        // A member with data ignores --initial-cluster-state; "existing" says what holds.
        for a in self.members[i].args.iter_mut() {
            if a == "new" {
                *a = "existing".into();
            }
        }
        self.members[i].start();
        self.wait_for_leader(Duration::from_secs(60)).await
    }

    /// Each member's `/metrics` text (empty for one that does not answer).
    pub async fn metrics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.members {
            let addr = format!("127.0.0.1:{}", m.client_port);
            out.push(
                crate::common::http_get(&addr, "localhost", "/metrics")
                    .await
                    .map(|(_, b)| b)
                    .unwrap_or_default(),
            );
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }
}
