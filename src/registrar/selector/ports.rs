//! Published ports → the address to register for each: the host's view (advertise IP or
//! the bound host IP, host port), the container's (`--internal`), or the host's own
//! ports for `--network host`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, PortBinding};

use super::NodeSettings;
use crate::schema;

/// What a published container port comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Published {
    /// Register this address.
    At(String),
    /// Bound only to a loopback host IP (`-p 127.0.0.1:8404:80`, this binding) while
    /// this host advertises an address other hosts reach: registered, it would send
    /// the load balancer to its own loopback, so it is skipped.
    LoopbackOnly(String),
    /// Bound only to host IPs that are neither the advertise IP nor in
    /// `advertise_networks` (`-p 172.17.0.1:27777:80`, this binding): docker0 or a
    /// bridge, which other hosts do not reach and the load balancer's host may own
    /// too. Skipped.
    NotAdvertised(String),
    /// No usable host port or container IP.
    Unusable,
}

impl Published {
    fn from_addr(addr: Option<String>) -> Published {
        addr.map_or(Published::Unusable, Published::At)
    }
}

/// HAProxy balances TCP and HTTP.
pub(super) fn ports(
    c: &ContainerInspectResponse,
    settings: &NodeSettings,
) -> BTreeMap<u16, Published> {
    let mut out = BTreeMap::new();
    let host_mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    let exposed: BTreeSet<u16> = c
        .config
        .as_ref()
        .and_then(|c| c.exposed_ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| tcp_port(p))
        .collect();
    let port_map = c.network_settings.as_ref().and_then(|n| n.ports.as_ref());
    if host_mode {
        // The container shares the host's network: its ports are the host's ports.
        for p in exposed {
            out.insert(p, Published::At(addr(settings.advertise_ip, p)));
        }
        return out;
    }
    if settings.internal {
        let ip = container_ip(c);
        let mapped = port_map
            .into_iter()
            .flat_map(|m| m.keys())
            .filter_map(|p| tcp_port(p));
        for p in exposed.iter().copied().chain(mapped) {
            out.insert(p, Published::from_addr(ip.map(|ip| addr(ip, p))));
        }
        return out;
    }
    for (spec, bindings) in port_map.into_iter().flatten() {
        let Some(p) = tcp_port(spec) else { continue };
        let Some(bindings) = bindings.as_ref().filter(|b| !b.is_empty()) else {
            continue;
        };
        out.insert(p, published_addr(bindings, settings));
    }
    out
}

fn tcp_port(spec: &str) -> Option<u16> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    (proto == "tcp").then(|| port.parse().ok()).flatten()
}

fn addr(ip: IpAddr, port: u16) -> String {
    schema::Addr {
        host: ip.to_string(),
        port,
    }
    .to_string()
}

/// A binding on every interface (0.0.0.0 or ::) is reached at the advertise IP; a
/// binding on one host IP only at that IP, which is registered only when it is the
/// advertise IP or lies in `advertise_networks` (else it is docker0 or a bridge).
/// Wildcard bindings win, IPv4 first, so the choice is stable whatever order Docker
/// lists them in. A loopback host IP counts only when the advertise IP is loopback too
/// (a one-host setup): otherwise the load balancer would be sent to its own 127.0.0.1.
fn published_addr(bindings: &[PortBinding], settings: &NodeSettings) -> Published {
    let advertise = settings.advertise_ip.to_canonical();
    let (mut loopback, mut elsewhere) = (None, None);
    let mut candidates: Vec<(u8, IpAddr, u16)> = bindings
        .iter()
        .filter_map(|b| {
            let port = b
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)?;
            let host_ip = b.host_ip.as_deref().unwrap_or("");
            Some(match host_ip {
                "" | "0.0.0.0" => (0, settings.advertise_ip, port),
                "::" => (1, settings.advertise_ip, port),
                ip => {
                    let ip = ip.parse::<IpAddr>().ok()?.to_canonical();
                    if ip.is_loopback() {
                        if !advertise.is_loopback() {
                            loopback.get_or_insert_with(|| addr(ip, port));
                            return None;
                        }
                    } else if ip != advertise
                        && !settings.advertise_networks.iter().any(|n| n.contains(ip))
                    {
                        elsewhere.get_or_insert_with(|| addr(ip, port));
                        return None;
                    }
                    (2, ip, port)
                }
            })
        })
        .collect();
    candidates.sort();
    match (candidates.into_iter().next(), elsewhere, loopback) {
        (Some((_, ip, port)), _, _) => Published::At(addr(ip, port)),
        (None, Some(binding), _) => Published::NotAdvertised(binding),
        (None, None, Some(binding)) => Published::LoopbackOnly(binding),
        (None, None, None) => Published::Unusable,
    }
}

/// The container's IP on the network it was started with, else on the first network
/// (by name) that gave it one.
fn container_ip(c: &ContainerInspectResponse) -> Option<IpAddr> {
    let networks = c.network_settings.as_ref()?.networks.as_ref()?;
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref());
    let ip_of = |name: &str| {
        networks
            .get(name)
            .and_then(|n| n.ip_address.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
    };
    let preferred = match mode {
        Some("default") | None => ip_of("bridge"),
        Some(m) => ip_of(m),
    };
    preferred.or_else(|| {
        let mut names: Vec<&String> = networks.keys().collect();
        names.sort();
        names.into_iter().find_map(|n| ip_of(n))
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;

    fn advertising(ip: &str) -> NodeSettings {
        NodeSettings {
            advertise_ip: ip.parse().unwrap(),
            ..settings()
        }
    }

    #[test]
    fn a_binding_on_the_advertise_ip_or_an_advertise_network_registers_that_ip() {
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "10.0.0.5", "HostPort": "40001"}]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "10.0.0.5:40001"
        );
        let s = NodeSettings {
            advertise_networks: vec!["10.0.0.0/24".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ..settings()
        };
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "10.0.0.7", "HostPort": "40001"}]});
        let r = registrations(&inspect(&[], &[], ports), &s).unwrap();
        assert_eq!(r.registrations[0].record.addr, "10.0.0.7:40001");
        // Wildcards win over a specific IP, v4 over v6, whatever the order.
        let ports = serde_json::json!({"8080/tcp": [
            {"HostIp": "::", "HostPort": "40003"},
            {"HostIp": "10.0.0.7", "HostPort": "40001"},
            {"HostIp": "0.0.0.0", "HostPort": "40002"},
        ]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "10.0.0.5:40002"
        );
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "fd00::7", "HostPort": "40001"}]});
        let r = registrations(&inspect(&[], &[], ports), &s).unwrap();
        assert_eq!(r.registrations[0].record.addr, "[fd00::7]:40001");
    }

    /// `-p 172.17.0.1:27777:80` on a host that advertises 10.0.0.5: registered, it
    /// would aim the load balancer at its own docker0 (or at a bridge other hosts do
    /// not reach). Skipped, and named.
    #[test]
    fn a_binding_on_another_host_ip_is_skipped_and_named() {
        for (host_ip, binding) in [
            ("172.17.0.1", "172.17.0.1:27777"),
            ("10.0.0.7", "10.0.0.7:27777"),
            ("::ffff:172.17.0.1", "172.17.0.1:27777"),
            ("fd00::7", "[fd00::7]:27777"),
        ] {
            let text = one_skipped(host_ip, "27777");
            for needle in [
                "web-1 (3f2a9c1b7d10)",
                "port 80/tcp",
                binding,
                "10.0.0.5",
                "advertise_networks",
            ] {
                assert!(text.contains(needle), "{host_ip}: {needle}: {text}");
            }
            // The ignore label silences it.
            let c = inspect(
                &[("portolan.port.80.ignore", "true")],
                &[],
                c_ports(host_ip),
            );
            assert!(registrations(&c, &settings()).unwrap().skipped.is_empty());
        }
        // A specific binding beside a wildcard one: the wildcard registers, silently.
        let ports = serde_json::json!({"8080/tcp": [
            {"HostIp": "172.17.0.1", "HostPort": "40001"},
            {"HostIp": "0.0.0.0", "HostPort": "40002"},
        ]});
        let s = registrations(&inspect(&[], &[], ports), &settings()).unwrap();
        assert_eq!(s.registrations[0].record.addr, "10.0.0.5:40002");
        assert!(s.skipped.is_empty());
    }

    /// Port 80 published on `host_ip:host_port` beside a wildcard 9090: the wildcard one
    /// registers alone, and the line naming the skipped binding is returned.
    fn one_skipped(host_ip: &str, host_port: &str) -> String {
        let s = registrations(
            &inspect(&[], &[], c_ports_on(host_ip, host_port)),
            &settings(),
        )
        .expect("no label warnings");
        let addrs: Vec<&str> = s
            .registrations
            .iter()
            .map(|r| r.record.addr.as_str())
            .collect();
        assert_eq!(addrs, vec!["10.0.0.5:40002"], "{host_ip}");
        assert_eq!(s.skipped.len(), 1, "{host_ip}");
        s.skipped[0].to_string()
    }

    /// Port 80 on `host_ip:host_port`, and 9090 on every address.
    fn c_ports_on(host_ip: &str, host_port: &str) -> serde_json::Value {
        serde_json::json!({
            "80/tcp": [{"HostIp": host_ip, "HostPort": host_port}],
            "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40002"}],
        })
    }

    fn c_ports(host_ip: &str) -> serde_json::Value {
        serde_json::json!({"80/tcp": [{"HostIp": host_ip, "HostPort": "27777"}]})
    }

    #[test]
    fn a_loopback_binding_is_skipped_with_a_warning_unless_we_advertise_loopback() {
        for (host_ip, binding) in [
            ("127.0.0.1", "127.0.0.1:8404"),
            ("127.0.0.2", "127.0.0.2:8404"),
            ("::1", "[::1]:8404"),
            ("::ffff:127.0.0.1", "127.0.0.1:8404"),
        ] {
            let text = one_skipped(host_ip, "8404");
            assert!(text.contains("web-1 (3f2a9c1b7d10)"), "{text}");
            assert!(text.contains("port 80/tcp"), "{text}");
            assert!(text.contains(binding), "{text}");
            // A one-host setup advertising loopback registers it as before.
            let c = inspect(&[], &[], c_ports_on(host_ip, "8404"));
            for advertise in ["127.0.0.1", "::1"] {
                let s = registrations(&c, &advertising(advertise)).unwrap();
                assert!(s.skipped.is_empty(), "{host_ip} {advertise}");
                assert!(
                    s.registrations.iter().any(|r| r.record.addr == binding),
                    "{host_ip} {advertise}: {:?}",
                    s.registrations
                );
            }
        }
        // A routable binding beside a loopback one is the one registered, silently.
        let ports = serde_json::json!({"8080/tcp": [
            {"HostIp": "127.0.0.1", "HostPort": "40001"},
            {"HostIp": "10.0.0.5", "HostPort": "40002"},
        ]});
        let s = registrations(&inspect(&[], &[], ports), &settings()).unwrap();
        assert_eq!(s.registrations[0].record.addr, "10.0.0.5:40002");
        assert!(s.skipped.is_empty());
    }

    #[test]
    fn unpublished_containers_register_nothing() {
        assert!(regs(&inspect(&[], &[], serde_json::json!({"8080/tcp": null}))).is_empty());
        assert!(regs(&inspect(&[], &[], serde_json::json!({}))).is_empty());
    }

    #[test]
    fn internal_registers_container_ip_and_port() {
        let s = NodeSettings {
            internal: true,
            ..settings()
        };
        let r = registrations(
            &inspect(&[], &[], serde_json::json!({"8080/tcp": null})),
            &s,
        )
        .unwrap()
        .registrations;
        assert_eq!(r[0].record.addr, "172.17.0.3:8080");
        assert_eq!(r[0].record.port, Some(8080));
    }

    #[test]
    fn host_network_registers_exposed_ports_at_the_advertise_ip() {
        let mut c = inspect(&[], &[], serde_json::json!({}));
        c.host_config.as_mut().unwrap().network_mode = Some("host".into());
        assert_eq!(regs(&c)[0].record.addr, "10.0.0.5:8080");
    }
}
