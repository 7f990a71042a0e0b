//! What a container asks to be registered as: its labels (and registrator's `SERVICE_*`
//! environment variables), its published ports and its state become a list of
//! `Registration`s. Pure: it reads a `docker inspect` document and nothing else.
//!
//! Lookup order for a setting `<x>` of container port `<p>`, most specific first:
//! `portolan.port.<p>.<x>` label, `SERVICE_<p>_<X>` env, `portolan.<x>` label,
//! `SERVICE_<X>` env (the env fallback exists for `service`, `ignore` and `tags` only,
//! as in registrator). A service name set nowhere is Compose's
//! (`com.docker.compose.service`), else the image's base name; any name is lower-cased.
//!
//! Any bad input makes the whole container a list of `LabelWarning`s, each naming the
//! container and the label: registering half of a misconfigured container would be a
//! surprise, skipping it with a clear message is not.
//!
//! `labels` reads labels and environment variables (names, tags, weights, checks);
//! `ports` resolves published ports to the addresses to register.

mod labels;
mod ports;
mod service;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod fuzz;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, HealthStatusEnum};

use self::labels::{
    check, check_container_labels, check_port_labels, image_base_name, parse_ignore, parse_tags,
    Meta, Warnings,
};
use self::ports::{ports, Published};
pub(crate) use self::service::service;
use crate::schema::{self, InstanceRecord, DEFAULT_WEIGHT, MAX_WEIGHT};
use crate::watcher::policy::Cidr;

const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_FALL: u32 = 3;
const DEFAULT_CHECK_RISE: u32 = 2;

/// The part of the registrar's configuration the selector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeSettings {
    pub(crate) node: String,
    /// Address of this host for published ports bound to every interface.
    pub(crate) advertise_ip: IpAddr,
    /// Register container IP and container port instead.
    pub(crate) internal: bool,
    /// `[registrar] advertise_networks`: a port bound to one host IP registers only when
    /// that IP is `advertise_ip` or lies in one of these.
    pub(crate) advertise_networks: Vec<Cidr>,
}

/// One key this node wants in etcd:
/// `<prefix>/nodes/<node>/services/<service>/<instance>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registration {
    pub(crate) service: String,
    pub(crate) instance: String,
    pub(crate) record: InstanceRecord,
    /// The registrar's own probe of `record.addr`, if the labels ask for one.
    pub(crate) check: Option<Check>,
}

impl Registration {
    pub(crate) fn key(&self, prefix: &str) -> String {
        schema::node_service_key(prefix, &self.record.node, &self.service, &self.instance)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) kind: CheckKind,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// Failures in a row that deregister.
    pub(crate) fall: u32,
    /// Successes in a row that register again after a fall.
    pub(crate) rise: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CheckKind {
    /// `GET <path>`; any 2xx or 3xx answer is a success.
    Http {
        path: String,
    },
    Tcp,
}

/// A problem with one container's configuration. The container is not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LabelWarning {
    /// `name (short id)`.
    pub(crate) container: String,
    /// The label or environment variable at fault (or `image` for a default name).
    pub(crate) label: String,
    pub(crate) message: String,
}

impl fmt::Display for LabelWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "container {}: {}: {}",
            self.container, self.label, self.message
        )
    }
}

/// What a container registers, and the published ports it leaves out (each with why).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Selected {
    pub(crate) registrations: Vec<Registration>,
    /// Ports skipped on purpose (bound to loopback only, or to a host IP that is not
    /// advertised): the rest still registers.
    pub(crate) skipped: Vec<LabelWarning>,
}

/// Whether a container may be registered at all, from its Docker state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Up,
    NotRunning,
    Paused,
    Restarting,
    /// Has a HEALTHCHECK that has not passed yet.
    HealthStarting,
    Unhealthy,
}

/// Running, not paused, and healthy if the image has a HEALTHCHECK.
pub(crate) fn gate(c: &ContainerInspectResponse) -> Gate {
    let Some(state) = &c.state else {
        return Gate::NotRunning;
    };
    if state.restarting == Some(true) {
        return Gate::Restarting;
    }
    if state.running != Some(true) {
        return Gate::NotRunning;
    }
    if state.paused == Some(true) {
        return Gate::Paused;
    }
    match state.health.as_ref().and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Gate::HealthStarting,
        Some(HealthStatusEnum::UNHEALTHY) => Gate::Unhealthy,
        _ => Gate::Up,
    }
}

/// `name (short id)` for messages; either part may be missing in a broken document.
pub(crate) fn display_name(c: &ContainerInspectResponse) -> String {
    let id = schema::short_id(c.id.as_deref().unwrap_or(""));
    match c.name.as_deref().map(|n| n.trim_start_matches('/')) {
        Some(n) if !n.is_empty() => format!("{n} ({id})"),
        _ => id.to_string(),
    }
}

/// The registrations a running container asks for. Does not look at the state: call
/// `gate` first (a stopped container has no published ports, which would read as
/// port labels naming unpublished ports).
pub(crate) fn registrations(
    c: &ContainerInspectResponse,
    settings: &NodeSettings,
) -> Result<Selected, Vec<LabelWarning>> {
    let mut w = Warnings {
        container: display_name(c),
        list: Vec::new(),
    };
    let Some(id) =
        c.id.as_deref()
            .filter(|id| id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        w.push("Id", "the container has no valid id in docker inspect");
        return Err(w.list);
    };
    let empty_labels = HashMap::new();
    let config = c.config.as_ref();
    let meta = Meta {
        labels: config
            .and_then(|c| c.labels.as_ref())
            .unwrap_or(&empty_labels),
        env: config
            .and_then(|c| c.env.as_ref())
            .map(|env| {
                env.iter()
                    .filter_map(|e| e.split_once('='))
                    .filter(|(k, _)| k.starts_with("SERVICE_"))
                    .collect()
            })
            .unwrap_or_default(),
        from_file: false,
    };

    let ports = ports(c, settings);
    check_port_labels(&meta, &ports, &mut w);
    check_container_labels(&meta, &mut w);

    let base_name = meta.lookup(None, "service");
    // Compose names each container after its service: a better default than the
    // image, which several services often share.
    let compose_name = meta.get_label("com.docker.compose.service");
    let image_name = config
        .and_then(|c| c.image.as_deref())
        .and_then(image_base_name);
    let several = ports.len() > 1;
    let mut out = Vec::new();
    let mut skipped = Warnings {
        container: w.container.clone(),
        list: Vec::new(),
    };
    for (&port, published) in &ports {
        let addr = match published {
            Published::At(addr) => addr,
            Published::LoopbackOnly(binding) | Published::NotAdvertised(binding) => {
                let ignored = meta
                    .lookup(Some(port), "ignore")
                    .is_some_and(|(src, v)| parse_ignore(&src, v) == Ok(true));
                if ignored {
                    continue;
                }
                let why = if matches!(published, Published::LoopbackOnly(_)) {
                    format!(
                        "published only on loopback ({binding}), which other hosts cannot reach while this host advertises {}: publish it on all interfaces or on an address of this host, or set portolan.port.{port}.ignore=true",
                        settings.advertise_ip
                    )
                } else {
                    format!(
                        "published only on {binding}, a host IP that is neither the advertise IP {} nor in [registrar] advertise_networks (docker0 or a bridge, which the load balancer must not be sent to): publish it on all interfaces or on the advertise IP, add its network to advertise_networks, or set portolan.port.{port}.ignore=true",
                        settings.advertise_ip
                    )
                };
                skipped.push(&format!("port {port}/tcp"), &why);
                continue;
            }
            Published::Unusable => {
                w.push(
                    &format!("port {port}/tcp"),
                    "published without a usable host port or container IP",
                );
                continue;
            }
        };
        if let Some((src, v)) = meta.lookup(Some(port), "ignore") {
            match parse_ignore(&src, v) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    w.push(&src, &e);
                    continue;
                }
            }
        }
        let service = match meta.lookup_port_only(port, "service") {
            Some((src, name)) => Some((src, name.to_string())),
            None => match (&base_name, &compose_name, &image_name) {
                (Some((src, name)), _, _) | (None, Some((src, name)), _) => {
                    Some((src.clone(), suffixed(name, port, several)))
                }
                (None, None, Some(name)) => {
                    Some(("image".to_string(), suffixed(name, port, several)))
                }
                (None, None, None) => None,
            },
        };
        let Some((service_src, service)) = service else {
            w.push(
                "image",
                "the image has no name to derive a service name from: set portolan.service",
            );
            continue;
        };
        // Service names are lower case (host names ignore case): `MyApp` is `myapp`.
        let service = service.to_ascii_lowercase();
        if !schema::is_valid_service_name(&service) {
            w.push(
                &service_src,
                &format!(
                    "service name {service:?} must match [a-z0-9][a-z0-9_.-]{{0,127}} (upper case is lowered)"
                ),
            );
            continue;
        }
        let tags = match meta.lookup(Some(port), "tags") {
            Some((src, v)) => match parse_tags(v) {
                Ok(t) => t,
                Err(e) => {
                    w.push(&src, &e);
                    continue;
                }
            },
            None => Vec::new(),
        };
        let weight = match meta.label(Some(port), "weight") {
            Some((src, v)) => match v.trim().parse::<u32>() {
                Ok(n) if n <= MAX_WEIGHT => n,
                _ => {
                    w.push(
                        &src,
                        &format!("weight {v:?} is not a number in 0..={MAX_WEIGHT}"),
                    );
                    continue;
                }
            },
            None => DEFAULT_WEIGHT,
        };
        let check = match check(&meta, port) {
            Ok(c) => c,
            Err((src, e)) => {
                w.push(&src, &e);
                continue;
            }
        };
        let route = match labels::route(&meta, Some(port)) {
            Ok(r) => r,
            Err((src, e)) => {
                w.push(&src, &e);
                continue;
            }
        };
        let instance = schema::instance_id(&settings.node, id, port);
        out.push(Registration {
            service,
            record: InstanceRecord {
                addr: addr.to_string(),
                node: settings.node.clone(),
                container: schema::short_id(id).to_string(),
                port: Some(port),
                tags,
                weight,
                draining: false,
                route: schema::Routing::Routed(route),
            },
            instance,
            check,
        });
    }
    if w.list.is_empty() {
        Ok(Selected {
            registrations: out,
            skipped: skipped.list,
        })
    } else {
        Err(w.list)
    }
}

fn suffixed(name: &str, port: u16, several: bool) -> String {
    if several {
        format!("{name}-{port}")
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn default_name_is_the_image_base_name() {
        let r = regs(&inspect(&[], &[], one_port()));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].service, "shop-web");
        assert_eq!(r[0].instance, "host-a-3f2a9c1b7d10-8080");
        assert_eq!(
            r[0].record.to_json(),
            r#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":[],"weight":100}"#
        );
        assert_eq!(r[0].check, None);
        assert_eq!(
            r[0].key("/portolan"),
            "/portolan/nodes/host-a/services/shop-web/host-a-3f2a9c1b7d10-8080"
        );
    }

    #[test]
    fn several_ports_get_suffixes_unless_named() {
        let ports = serde_json::json!({
            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32768"}],
            "9090/tcp": [{"HostIp": "0.0.0.0", "HostPort": "32769"}],
            "5353/udp": [{"HostIp": "0.0.0.0", "HostPort": "32770"}],
            "7070/tcp": null,
        });
        let r = regs(&inspect(
            &[("portolan.port.9090.service", "admin")],
            &[],
            ports.clone(),
        ));
        let got: Vec<(&str, &str)> = r
            .iter()
            .map(|r| (r.service.as_str(), r.record.addr.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("shop-web-8080", "10.0.0.5:32768"),
                ("admin", "10.0.0.5:32769")
            ]
        );
        let r = regs(&inspect(&[("portolan.service", "shop")], &[], ports));
        assert_eq!(r[0].service, "shop-8080");
        assert_eq!(r[1].service, "shop-9090");
    }

    #[test]
    fn missing_fields_never_panic() {
        let c: ContainerInspectResponse = serde_json::from_str("{}").unwrap();
        assert_eq!(gate(&c), Gate::NotRunning);
        assert!(registrations(&c, &settings()).is_err());
        let c: ContainerInspectResponse =
            serde_json::from_value(serde_json::json!({"Id": ID, "State": {"Running": true}}))
                .unwrap();
        assert_eq!(gate(&c), Gate::Up);
        // No published port: nothing to register, nothing to complain about.
        assert_eq!(registrations(&c, &settings()), Ok(Selected::default()));
        let c: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Id": ID, "Config": {"Image": "x"},
            "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": ""}], "bad": null}}
        }))
        .unwrap();
        assert!(registrations(&c, &settings()).is_err());
    }

    #[test]
    fn gates() {
        let mut c = inspect(&[], &[], one_port());
        assert_eq!(gate(&c), Gate::Up);
        let state = c.state.as_mut().unwrap();
        state.paused = Some(true);
        assert_eq!(gate(&c), Gate::Paused);
        let state = c.state.as_mut().unwrap();
        state.paused = Some(false);
        for (status, want) in [
            ("starting", Gate::HealthStarting),
            ("healthy", Gate::Up),
            ("unhealthy", Gate::Unhealthy),
            ("none", Gate::Up),
        ] {
            c.state.as_mut().unwrap().health =
                Some(serde_json::from_value(serde_json::json!({"Status": status})).unwrap());
            assert_eq!(gate(&c), want, "{status}");
        }
        c.state.as_mut().unwrap().running = Some(false);
        assert_eq!(gate(&c), Gate::NotRunning);
        c.state.as_mut().unwrap().restarting = Some(true);
        assert_eq!(gate(&c), Gate::Restarting);
    }
}
