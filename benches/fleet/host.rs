//! A simulated host: a real registrar session (`portolan::registrar::run_from`, the code
//! `portolan registrar` runs: its own etcd client, lease, keep-alive, node record and
//! writes) whose containers come from a script instead of Docker. The script sends what
//! the Docker task would: a snapshot of `docker inspect` documents at start, then
//! `die` and `start` events (a replacement). Losing the host stops its registrar without
//! deregistering, so its keep-alives stop and its keys go when the lease expires, as
//! when a machine dies.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use bollard::models::ContainerInspectResponse;
use portolan::config::{EtcdConfig, RegistrarConfig};
use portolan::registrar::{ContainerReport, Source};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The container port every simulated container publishes.
const CONTAINER_PORT: u16 = 8080;

#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub service: String,
    pub host_port: u16,
}

struct Running {
    tx: mpsc::Sender<ContainerReport>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub struct Host {
    pub node: String,
    pub ip: Ipv4Addr,
    idx: usize,
    state_dir: PathBuf,
    containers: BTreeMap<String, Container>,
    seq: u64,
    run: Option<Running>,
}

/// What one instance is in etcd and HAProxy: (backend, server name, ip:port).
pub type Server = (String, String, String);

impl Host {
    /// Host `idx` with `instances` containers over `services` services.
    pub fn new(idx: usize, instances: usize, services: usize, dir: &std::path::Path) -> Host {
        // 127.1.0.0/16 and up: an address of its own per host, inside allowed_networks.
        let ip = Ipv4Addr::new(
            127,
            1 + (idx / 65_536) as u8,
            ((idx / 256) % 256) as u8,
            (idx % 256) as u8,
        );
        let mut h = Host {
            node: format!("h{idx:05}"),
            ip,
            idx,
            state_dir: dir.join(format!("h{idx:05}")),
            containers: BTreeMap::new(),
            seq: 0,
            run: None,
        };
        for j in 0..instances {
            let service = format!("s{:05}", (idx * instances + j) % services);
            h.add(service);
        }
        h
    }

    fn add(&mut self, service: String) -> Container {
        self.seq += 1;
        let c = Container {
            id: format!("{:012x}{:052x}", self.seq, self.idx),
            service,
            host_port: 10_000 + (self.seq % 50_000) as u16,
        };
        self.containers.insert(c.id.clone(), c.clone());
        c
    }

    pub fn running(&self) -> bool {
        self.run.is_some()
    }

    /// The instances this host registers while it runs.
    pub fn servers(&self) -> impl Iterator<Item = Server> + '_ {
        self.containers.values().map(|c| self.server(c))
    }

    pub fn server(&self, c: &Container) -> Server {
        (
            format!("svc_{}", c.service),
            portolan::schema::instance_id(&self.node, &c.id, CONTAINER_PORT),
            format!("{}:{}", self.ip, c.host_port),
        )
    }

    fn inspect(&self, c: &Container) -> ContainerInspectResponse {
        serde_json::from_value(serde_json::json!({
            "Id": c.id,
            "Name": format!("/{}-{}", c.service, self.seq),
            "State": {"Status": "running", "Running": true, "Paused": false, "Restarting": false},
            "Config": {
                "Image": "fleet/app:1",
                "Labels": {"portolan.service": c.service},
                "ExposedPorts": {format!("{CONTAINER_PORT}/tcp"): {}},
            },
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {
                "Ports": {format!("{CONTAINER_PORT}/tcp"): [{"HostIp": "0.0.0.0", "HostPort": c.host_port.to_string()}]},
                "Networks": {"bridge": {"IPAddress": "172.17.0.2"}},
            },
        }))
        .expect("a docker inspect document")
    }

    /// Starts this host's registrar and hands it the snapshot of its containers.
    pub fn start(&mut self, etcd: &EtcdConfig, ttl: Duration) {
        if self.run.is_some() {
            return;
        }
        let cfg = RegistrarConfig {
            etcd: etcd.clone(),
            node: self.node.clone(),
            advertise_ip: Some(self.ip.into()),
            advertise_networks: Vec::new(),
            ttl,
            state_dir: self.state_dir.clone(),
            docker_host: None,
            docker_api_version: None,
            internal: false,
            resync: Duration::from_secs(60),
            deregister_on_exit: false,
            only_label: None,
            hooks: Vec::new(),
            services: Vec::new(),
            listen: None,
        };
        let (tx, rx) = mpsc::channel(256);
        let snapshot: Vec<_> = self.containers.values().map(|c| self.inspect(c)).collect();
        tx.try_send(ContainerReport::Snapshot(snapshot))
            .expect("a fresh channel takes the snapshot");
        let stop = CancellationToken::new();
        let handle = tokio::spawn(portolan::registrar::run_from(
            cfg,
            Source::Scripted(rx),
            stop.clone(),
        ));
        self.run = Some(Running { tx, stop, handle });
    }

    /// The host is lost: its registrar stops without revoking the lease (keep-alives
    /// stop; its keys stay until the lease expires).
    pub async fn lose(&mut self) {
        if let Some(r) = self.run.take() {
            r.stop.cancel();
            match tokio::time::timeout(Duration::from_secs(15), r.handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("{}: registrar ended with: {e:#}", self.node),
                Ok(Err(e)) => eprintln!("{}: registrar task failed: {e}", self.node),
                Err(_) => eprintln!("{}: registrar did not stop within 15 s", self.node),
            }
        }
    }

    /// Whether the registrar task ended by itself (it must not).
    pub fn failed(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.handle.is_finished())
    }

    /// One container replaced: `die` of a random one, `start` of a new one of the same
    /// service. Returns the new instance (None when the host is down or the channel is
    /// full); `before` hears of it before the registrar does.
    pub fn replace(&mut self, before: impl FnOnce(&Server)) -> Option<Server> {
        let run = self.run.as_ref()?;
        if run.tx.capacity() < 2 || self.containers.is_empty() {
            return None;
        }
        let k = fastrand::usize(..self.containers.len());
        let old = self.containers.keys().nth(k).cloned()?;
        let gone = self.containers.remove(&old)?;
        let new = self.add(gone.service);
        let at = SystemTime::now();
        let doc = self.inspect(&new);
        let server = self.server(&new);
        before(&server);
        let run = self.run.as_ref()?;
        let _ = run.tx.try_send(ContainerReport::Event {
            at,
            report: Box::new(ContainerReport::Gone {
                id: old,
                action: "die".into(),
            }),
        });
        let _ = run.tx.try_send(ContainerReport::Event {
            at,
            report: Box::new(ContainerReport::Changed(Box::new(doc))),
        });
        Some(server)
    }
}

/// The instances the running hosts register: what etcd must hold once every lost
/// host's lease has expired.
pub fn expected(hosts: &[Host]) -> BTreeSet<Server> {
    hosts
        .iter()
        .filter(|h| h.running())
        .flat_map(|h| h.servers().collect::<Vec<_>>())
        .collect()
}
