//! Published ports → the address to register for each: the host's view (advertise IP or
//! the bound host IP, host port), the container's (`--internal`), or the host's own
//! ports for `--network host`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use bollard::models::{ContainerInspectResponse, PortBinding};

use super::NodeSettings;
use crate::schema;

/// HAProxy balances TCP and HTTP.
pub(super) fn ports(
    c: &ContainerInspectResponse,
    settings: &NodeSettings,
) -> BTreeMap<u16, Option<String>> {
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
            out.insert(p, Some(addr(settings.advertise_ip, p)));
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
            out.insert(p, ip.map(|ip| addr(ip, p)));
        }
        return out;
    }
    for (spec, bindings) in port_map.into_iter().flatten() {
        let Some(p) = tcp_port(spec) else { continue };
        let Some(bindings) = bindings.as_ref().filter(|b| !b.is_empty()) else {
            continue;
        };
        out.insert(p, published_addr(bindings, settings.advertise_ip));
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
/// binding on one host IP (127.0.0.1, 10.0.0.5) only at that IP. Wildcard bindings win,
/// IPv4 first, so the choice is stable whatever order Docker lists them in.
fn published_addr(bindings: &[PortBinding], advertise: IpAddr) -> Option<String> {
    let mut candidates: Vec<(u8, String, u16)> = bindings
        .iter()
        .filter_map(|b| {
            let port = b
                .host_port
                .as_deref()
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)?;
            let host_ip = b.host_ip.as_deref().unwrap_or("");
            Some(match host_ip {
                "" | "0.0.0.0" => (0, advertise.to_string(), port),
                "::" => (1, advertise.to_string(), port),
                ip => (2, ip.parse::<IpAddr>().ok()?.to_string(), port),
            })
        })
        .collect();
    candidates.sort();
    let (_, ip, port) = candidates.into_iter().next()?;
    let ip: IpAddr = ip.parse().ok()?;
    Some(addr(ip, port))
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

    #[test]
    fn host_ip_bindings_register_that_ip() {
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "127.0.0.1:40001"
        );
        // Wildcards win over a specific IP, v4 over v6, whatever the order.
        let ports = serde_json::json!({"8080/tcp": [
            {"HostIp": "::", "HostPort": "40003"},
            {"HostIp": "127.0.0.1", "HostPort": "40001"},
            {"HostIp": "0.0.0.0", "HostPort": "40002"},
        ]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "10.0.0.5:40002"
        );
        let ports = serde_json::json!({"8080/tcp": [{"HostIp": "::1", "HostPort": "40001"}]});
        assert_eq!(
            regs(&inspect(&[], &[], ports))[0].record.addr,
            "[::1]:40001"
        );
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
        .unwrap();
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
