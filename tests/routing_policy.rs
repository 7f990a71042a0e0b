//! The default routing policy against a running watcher, tried as an attacker who can
//! write instance keys would: aim the front door at the load balancer's own addresses
//! (read from this test host's real interfaces, docker0 included) and at an address
//! that becomes the host's only after the watcher started.
mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::haproxy::{FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

/// This host's addresses → interface, as the kernel lists them.
fn host_addresses() -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().expect("getifaddrs") {
        let Some(a) = ifa.address else { continue };
        let ip = if let Some(v4) = a.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = a.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.insert(ip, ifa.interface_name);
    }
    out
}

/// Counts every connection to a port open on all interfaces: anything of the load
/// balancer's own bound to 0.0.0.0.
struct Listener {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl Listener {
    async fn start() -> Listener {
        let l = tokio::net::TcpListener::bind("[::]:0").await.expect("bind");
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while l.accept().await.is_ok() {
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        Listener { port, accepted }
    }
}

fn server_lines(cfg: &str) -> Vec<&str> {
    cfg.lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect()
}

/// The instances an attacker points at this host's own addresses — a non-loopback
/// interface address and docker0's 172.17.0.1, as the kernel lists them, plain and in
/// IPv4-mapped / NAT64 spellings — are not routed and are named in the log; an
/// instance elsewhere, put after them, is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_never_routes_to_the_load_balancers_own_interfaces() {
    let etcd = Etcd::start().await;
    let own = host_addresses();
    let routable: Vec<(IpAddr, String)> = own
        .iter()
        .filter(|(ip, _)| {
            !ip.is_loopback()
                && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
        })
        .map(|(ip, n)| (*ip, n.clone()))
        .collect();
    assert!(
        !routable.is_empty(),
        "this test needs a non-loopback interface address: {own:?}"
    );
    let docker0: IpAddr = "172.17.0.1".parse().unwrap();
    assert!(
        own.contains_key(&docker0),
        "this test needs docker0 at 172.17.0.1 (dockerd running): {own:?}"
    );
    let lb = Listener::start().await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            allowed_networks: None,
            // Not used by the template: the front door's address as an operator wrote it.
            vars: "public_bind = \"203.0.113.80:443\"\n".into(),
            ..Default::default()
        },
    )
    .await;
    let port = lb.port;
    let mut attacks: Vec<(String, String, String)> = Vec::new();
    for (i, (ip, name)) in routable.iter().enumerate() {
        let addr = match ip {
            IpAddr::V4(_) => format!("{ip}:{port}"),
            IpAddr::V6(_) => format!("[{ip}]:{port}"),
        };
        attacks.push((format!("own{i}"), addr, format!("(interface {name})")));
        if let IpAddr::V4(v4) = ip {
            let [a, b, c, d] = v4.octets();
            attacks.push((
                format!("mapped{i}"),
                format!("[::ffff:{ip}]:{port}"),
                format!("(interface {name})"),
            ));
            attacks.push((
                format!("nat{i}"),
                format!(
                    "[64:ff9b::{:x}:{:x}]:{port}",
                    u16::from_be_bytes([a, b]),
                    u16::from_be_bytes([c, d])
                ),
                format!("NAT64 (64:ff9b::/96) spelling of {ip}"),
            ));
        }
    }
    attacks.push((
        "bind".into(),
        "203.0.113.80:443".into(),
        "front door bind address".into(),
    ));
    for (svc, addr, _) in &attacks {
        etcd.put(&fd.service_key(svc, "x"), addr).await;
    }
    // The marker, put last: once it is rendered, every attack before it was judged.
    etcd.put(&fd.service_key("elsewhere", "x"), "198.51.100.7:80")
        .await;
    wait_until("the allowed instance rendered", T, || async {
        fd.dest_text().contains("198.51.100.7:80")
    })
    .await;
    let cfg = fd.dest_text();
    assert_eq!(server_lines(&cfg).len(), 1, "only the marker: {cfg}");
    let named = |log: &str, svc: &str, why: &str| {
        let key = fd.service_key(svc, "x");
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(&key) && l.contains(why))
    };
    eventually(T, || async {
        let log = fd.log();
        attacks.iter().all(|(svc, _, why)| named(&log, svc, why))
    })
    .await;
    let log = fd.log();
    for (svc, addr, why) in &attacks {
        assert!(
            named(&log, svc, why),
            "{svc} at {addr} not refused for {why:?}: {log}"
        );
    }
    let docker_key = attacks
        .iter()
        .find(|(_, a, _)| a.starts_with("172.17.0.1:"))
        .map(|(s, _, _)| fd.service_key(s, "x"))
        .expect("docker0 attacked");
    assert!(
        log.lines().any(|l| l.contains(&docker_key)
            && l.contains("this host's own address (interface docker0)")),
        "{log}"
    );
    for (svc, _, _) in &attacks {
        assert!(matches!(fd.get(svc).await, Some((503, _))), "{svc}");
    }
    assert_eq!(
        lb.accepted.load(Ordering::Relaxed),
        0,
        "nothing reached the load balancer's own port"
    );
    eprintln!(
        "refused {} spellings of {} own addresses ({})",
        attacks.len(),
        routable.len(),
        routable
            .iter()
            .map(|(ip, n)| format!("{ip} on {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// A veth pair in the host's namespace, deleted on drop.
struct Veth(String);

impl Veth {
    fn add(addr: &str) -> Veth {
        let name = format!("ptl{}a", std::process::id() % 100_000);
        let peer = format!("ptl{}b", std::process::id() % 100_000);
        netns::ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        let v = Veth(name);
        netns::ip(&["addr", "add", addr, "dev", &v.0]);
        v
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

/// An address added to this host after the watcher started (a new interface, a VIP
/// moving here) stops being routed without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_the_host_gains_later_stops_being_routed() {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(
        &etcd,
        Options {
            allowed_networks: None,
            ..Default::default()
        },
    )
    .await;
    let key = fd.service_key("vip", "x");
    etcd.put(&key, "198.51.100.77:80").await;
    wait_until("the instance rendered while not ours", T, || async {
        fd.dest_text().contains("198.51.100.77:80")
    })
    .await;
    let veth = Veth::add("198.51.100.77/32");
    let took = wait_until(
        "the instance left out once the address is ours",
        T,
        || async { !fd.dest_text().contains("198.51.100.77:80") },
    )
    .await;
    let log = fd.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains(&key)
            && l.contains(&format!("this host's own address (interface {})", veth.0))),
        "{log}"
    );
    eprintln!(
        "a new host address was refused {} ms after it appeared",
        took.as_millis()
    );
}
