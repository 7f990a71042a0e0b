//! The `[watcher]` section, its flags and the `[[template]]` resources: what a watcher
//! renders, how it checks the result and how it makes HAProxy load it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{at_least_min_timeout, at_most_a_day, name_or_hostname, EtcdConfig, Problems};
use crate::schema;
use crate::watcher::confine::{Confinement, Glob};
use crate::watcher::policy::{self, Cidr, Policy};

pub const DEFAULT_WAIT_MIN_MS: u64 = 20;
pub const DEFAULT_WAIT_MAX_MS: u64 = 500;
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MIN_RELOAD_INTERVAL_MS: u64 = 100;
pub const DEFAULT_MASS_REMOVAL_SHARE: f64 = 0.5;
pub const DEFAULT_MASS_REMOVAL_MIN: usize = 5;
pub const DEFAULT_MASS_REMOVAL_HOLD_S: u64 = 60;
pub const DEFAULT_EMPTY_BACKEND_GRACE_S: u64 = 300;
pub const DEFAULT_DNS_STALE_S: u64 = 300;
pub const DEFAULT_DNS_REFRESH_S: u64 = 30;
/// Not under the registrar's /var/lib/portolan: its unit makes that folder 0750 for
/// its own user, which the watcher's user could not enter on a host running both.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portolan-watcher";

/// `[watcher]` in the file and the watcher's flags: each option declared once.
#[derive(Debug, Clone, Default, Deserialize, Serialize, Args)]
#[serde(deny_unknown_fields)]
pub struct WatcherOptions {
    /// Watcher name, the key of its status under <prefix>/watchers/ [default: the host name].
    #[arg(long, env = "PORTOLAN_WATCHER_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Coalescing of etcd changes (file only).
    #[arg(skip)]
    pub wait: Option<WaitOptions>,
    /// Serve /metrics and /healthz on this address, e.g. 127.0.0.1:9477.
    #[arg(long, env = "PORTOLAN_LISTEN", value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Serve the status page (`/`, `/ui`, `/api/status`, `/api/events`) on `listen`
    /// too [default: true when `listen` is a loopback address, false otherwise]. The
    /// page is read-only and unauthenticated, and shows every instance's address: bind
    /// it where only operators reach.
    #[arg(long, env = "PORTOLAN_UI", value_name = "true|false")]
    pub ui: Option<bool>,
    /// Time limit of one check, reload or runtime-API exchange, in milliseconds
    /// [default: 10000] (file only).
    #[arg(skip)]
    pub command_timeout_ms: Option<u64>,
    /// Least time between two HAProxy reloads, in milliseconds [default: 100] (file
    /// only). Runtime-API changes are not bound by it.
    #[arg(skip)]
    pub min_reload_interval_ms: Option<u64>,
    /// Seconds a service whose last instance left keeps its backend section, empty
    /// (answering 503), so an instance coming back is a runtime-API change, not two
    /// reloads [default: 300] (file only). 0: the section goes with the last instance.
    #[arg(skip)]
    pub empty_backend_grace_s: Option<u64>,
    /// Networks instances may be routed to, as CIDRs, comma separated (e.g.
    /// 10.0.0.0/8,fd00::/8): the whole list. An instance outside them is left out with
    /// a warning. [default: everything but loopback, link-local (cloud metadata),
    /// unspecified, multicast and broadcast addresses, the metadata services
    /// fd00:ec2::254, 100.100.100.200 and 168.63.129.16, this host's own interface
    /// addresses and the front door's bind addresses (template vars), and IPv6
    /// spellings (mapped, compatible, NAT64, 6to4) of any of these IPv4 addresses]
    #[arg(
        long = "allowed-networks",
        env = "PORTOLAN_ALLOWED_NETWORKS",
        value_name = "CIDR[,CIDR…]",
        value_delimiter = ','
    )]
    pub allowed_networks: Option<Vec<String>>,
    /// The mass-removal guard (file only): `mass_removal = { share = 0.5, min = 5,
    /// hold_s = 60 }`, or the flat keys below.
    #[arg(skip)]
    pub mass_removal: Option<MassRemovalOptions>,
    #[arg(skip)]
    pub mass_removal_share: Option<f64>,
    #[arg(skip)]
    pub mass_removal_min: Option<usize>,
    #[arg(skip)]
    pub mass_removal_hold_s: Option<u64>,
    #[arg(skip)]
    pub mass_removal_per_service_share: Option<f64>,
    /// Which nodes may serve which service (file only): service name, or "*" for every
    /// service not listed, → node-name globs (`*` any run, `?` one character), e.g.
    /// `services = { pay = ["pay-*"], "*" = ["*"] }`. A node's instance of a service
    /// its name matches no glob of is refused and named. Without a "*" entry no node
    /// may serve an unlisted service. [default: "*" = ["*"], every node every service]
    #[arg(skip)]
    pub services: Option<BTreeMap<String, Vec<String>>>,
    /// Whether hand-written instance keys (`<prefix>/services/…`) route (file only)
    /// [default: true]. false: only nodes' keys (`<prefix>/nodes/<node>/services/…`) do.
    #[arg(skip)]
    pub hand_written: Option<bool>,
    /// Where each node's instances may point (file only): node-name glob → CIDRs, e.g.
    /// `node_networks = { "web-*" = ["10.1.0.0/16"] }`. The instances of a node these
    /// globs match must be IP addresses inside the networks of every matching glob; a
    /// node no glob matches is not constrained. [default: none]
    #[arg(skip)]
    pub node_networks: Option<BTreeMap<String, Vec<String>>>,
    /// Seconds an instance named by a DNS name keeps its last good answer while lookups
    /// of the name fail (stale-if-error); past that it is left out, named in the log
    /// [default: 300] (file only). 0: left out at the first failed lookup.
    #[arg(skip)]
    pub dns_stale_s: Option<u64>,
    /// Seconds between two lookups of a DNS name instances use [default: 30] (file only).
    #[arg(skip)]
    pub dns_refresh_s: Option<u64>,
    /// Where the watcher keeps what must survive a restart (the last good DNS answers,
    /// so a restart renders DNS-named instances before its first lookup); created 0700
    /// [default: /var/lib/portolan-watcher].
    #[arg(long, env = "PORTOLAN_WATCHER_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the watcher writes the certificates it serves (one PEM file each, 0600,
    /// with the key), the crt-list naming them, the hosts they cover and its
    /// self-signed default certificate; a folder of its own, created 0700
    /// [default: <state_dir>/certs].
    #[arg(long, env = "PORTOLAN_WATCHER_CERTS_DIR", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,
}

/// A batch of changes removing more than `share` of the live instances, and at least
/// `min` of them, is held: the removed servers stay in the config for `hold_s` seconds
/// (or until SIGUSR1), so an emptied etcd or a broken registrar does not empty the
/// load balancer at once.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MassRemovalOptions {
    /// Share of the live instances, 0 < share <= 1 [default: 0.5].
    pub share: Option<f64>,
    /// Fewer removals than this are never held [default: 5].
    pub min: Option<usize>,
    /// Seconds a removal is held; 0 turns the guard off [default: 60]. Also the window
    /// over which removals add up: the drop is measured from the peak of the last hold_s.
    pub hold_s: Option<u64>,
    /// The same judgement per service, with this share of the service's own peak, 0 <
    /// share <= 1 [default: 1.0 = off]: 0.5 holds a removal that would take a service
    /// below half its instances even when the fleet as a whole loses little.
    pub per_service_share: Option<f64>,
}

/// The validated mass-removal guard settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MassRemoval {
    pub share: f64,
    /// 1.0: off.
    pub per_service_share: f64,
    pub min: usize,
    /// Zero: the guard is off.
    pub hold: Duration,
}

impl Default for MassRemoval {
    fn default() -> Self {
        MassRemoval {
            share: DEFAULT_MASS_REMOVAL_SHARE,
            per_service_share: 1.0,
            min: DEFAULT_MASS_REMOVAL_MIN,
            hold: Duration::from_secs(DEFAULT_MASS_REMOVAL_HOLD_S),
        }
    }
}

/// Coalescing of etcd changes (group commit, see `watcher` module docs): a change that
/// finds the watcher idle is applied at once; changes arriving during an apply (or within
/// `min_ms` after it) are batched until `min_ms` pass without a change, but no longer than
/// `max_ms` after that apply started.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WaitOptions {
    /// Quiet period that closes a batch [default: 20].
    pub min_ms: Option<u64>,
    /// Longest a batched change may wait [default: 500].
    pub max_ms: Option<u64>,
}

/// One `[[template]]` resource, confd style.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateResource {
    pub src: PathBuf,
    pub dest: PathBuf,
    /// `{src}` is replaced by the staged file's path. Run through `sh -c`.
    pub check_cmd: Option<String>,
    /// Preferred reload: HAProxy master CLI socket (`haproxy -W -S <socket>`).
    pub haproxy_master_socket: Option<PathBuf>,
    /// Fallback reload for other setups, run through `sh -c`.
    pub reload_cmd: Option<String>,
    /// HAProxy admin (stats) socket for runtime-API changes without reload.
    pub haproxy_admin_socket: Option<PathBuf>,
    /// File mode of `dest`, octal string like "0644".
    pub mode: Option<String>,
    /// Free-form table handed to the template as `vars` (ports, domain, timeouts), so one
    /// template serves several sites without edits. Empty when unset.
    #[serde(default)]
    pub vars: toml::Table,
}

#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub etcd: EtcdConfig,
    pub name: String,
    pub wait_min: Duration,
    pub wait_max: Duration,
    pub listen: Option<SocketAddr>,
    /// Serve the status page on `listen` (`watcher.ui`).
    pub ui: bool,
    pub command_timeout: Duration,
    /// Where instances may point (`allowed_networks`).
    pub policy: Policy,
    pub templates: Vec<TemplateResource>,
    /// `[[hook]]`s for reload, runtime, reject, fail and hold events.
    pub hooks: Vec<super::HookConfig>,
    pub mass_removal: MassRemoval,
    /// Least time between two reloads of one resource.
    pub min_reload_interval: Duration,
    /// How long an emptied service keeps its backend (`empty_backend_grace_s`).
    pub empty_backend_grace: Duration,
    /// DNS names: how long a last good answer outlives failing lookups, and how often
    /// names are looked up again (`dns_stale_s`, `dns_refresh_s`).
    pub dns_stale: Duration,
    pub dns_refresh: Duration,
    /// `state_dir`: the persisted DNS answers live here.
    pub state_dir: PathBuf,
    /// `[acme]`, when enabled (set by `resolve_watcher`).
    pub acme: Option<super::AcmeConfig>,
    /// `certs_dir`: the certificates served, as HAProxy reads them (`watcher::tls`).
    pub certs_dir: PathBuf,
}

impl WatcherOptions {
    /// Validates the merged options and templates into a [`WatcherConfig`], adding
    /// every problem found.
    pub(super) fn resolve(
        &self,
        etcd: EtcdConfig,
        templates: &[TemplateResource],
        problems: &mut Problems,
    ) -> WatcherConfig {
        let name = name_or_hostname(self.name.as_deref(), "--name", problems);
        if !schema::is_valid_name(&name) {
            problems.push(format!(
                "watcher name {name:?}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}"
            ));
        }
        let wait = self.wait.clone().unwrap_or_default();
        let wait_min = at_most_a_day(
            "watcher.wait.min_ms",
            wait.min_ms.unwrap_or(DEFAULT_WAIT_MIN_MS),
            1000,
            problems,
        );
        let wait_max = at_most_a_day(
            "watcher.wait.max_ms",
            wait.max_ms.unwrap_or(DEFAULT_WAIT_MAX_MS.max(wait_min)),
            1000,
            problems,
        );
        if wait_max < wait_min {
            problems.push(format!(
                "watcher.wait: max_ms {wait_max} is below min_ms {wait_min}"
            ));
        }
        let listen = self.listen.as_deref().and_then(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| {
                    problems.push(format!(
                        "watcher.listen {s:?}: expected host:port like 127.0.0.1:9477"
                    ))
                })
                .ok()
        });
        let policy = self
            .policy(problems)
            .with_bind_addresses(bind_addresses(templates))
            .with_confinement(self.confinement(problems));
        check_templates(templates, problems);
        WatcherConfig {
            etcd,
            name,
            wait_min: Duration::from_millis(wait_min),
            wait_max: Duration::from_millis(wait_max),
            ui: self
                .ui
                .unwrap_or_else(|| listen.is_some_and(|a: SocketAddr| a.ip().is_loopback())),
            listen,
            command_timeout: Duration::from_millis(at_least_min_timeout(
                "watcher.command_timeout_ms",
                self.command_timeout_ms
                    .unwrap_or(DEFAULT_COMMAND_TIMEOUT_MS),
                problems,
            )),
            policy,
            templates: templates.to_vec(),
            hooks: Vec::new(),
            mass_removal: self.mass_removal(problems),
            min_reload_interval: Duration::from_millis(at_most_a_day(
                "watcher.min_reload_interval_ms",
                self.min_reload_interval_ms
                    .unwrap_or(DEFAULT_MIN_RELOAD_INTERVAL_MS),
                1000,
                problems,
            )),
            empty_backend_grace: Duration::from_secs(at_most_a_day(
                "watcher.empty_backend_grace_s",
                self.empty_backend_grace_s
                    .unwrap_or(DEFAULT_EMPTY_BACKEND_GRACE_S),
                1,
                problems,
            )),
            dns_stale: Duration::from_secs(at_most_a_day(
                "watcher.dns_stale_s",
                self.dns_stale_s.unwrap_or(DEFAULT_DNS_STALE_S),
                1,
                problems,
            )),
            dns_refresh: Duration::from_secs(self.dns_refresh(problems)),
            state_dir: self.state_dir(problems),
            acme: None,
            certs_dir: self.certs_dir(problems),
        }
    }

    fn certs_dir(&self, problems: &mut Problems) -> PathBuf {
        let dir = self.certs_dir.clone().unwrap_or_else(|| {
            self.state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
                .join("certs")
        });
        if !dir.is_absolute() {
            problems.push(format!(
                "watcher.certs_dir {}: must be an absolute path (like {DEFAULT_STATE_DIR}/certs)",
                dir.display()
            ));
        }
        dir
    }

    fn dns_refresh(&self, problems: &mut Problems) -> u64 {
        let s = self.dns_refresh_s.unwrap_or(DEFAULT_DNS_REFRESH_S);
        if s == 0 {
            problems.push(
                "watcher.dns_refresh_s = 0: must be at least 1 (seconds between two lookups of a name)".into(),
            );
            return 1;
        }
        at_most_a_day("watcher.dns_refresh_s", s, 1, problems)
    }

    fn state_dir(&self, problems: &mut Problems) -> PathBuf {
        let dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !dir.is_absolute() {
            problems.push(format!(
                "watcher.state_dir {}: must be an absolute path (like {DEFAULT_STATE_DIR})",
                dir.display()
            ));
        }
        dir
    }

    fn mass_removal(&self, problems: &mut Problems) -> MassRemoval {
        let table = self.mass_removal.clone().unwrap_or_default();
        let mut pick = |key: &str, nested: bool, flat: bool| {
            if nested && flat {
                problems.push(format!(
                    "watcher: set mass_removal.{key} or mass_removal_{key}, not both"
                ));
            }
        };
        pick(
            "share",
            table.share.is_some(),
            self.mass_removal_share.is_some(),
        );
        pick("min", table.min.is_some(), self.mass_removal_min.is_some());
        pick(
            "per_service_share",
            table.per_service_share.is_some(),
            self.mass_removal_per_service_share.is_some(),
        );
        pick(
            "hold_s",
            table.hold_s.is_some(),
            self.mass_removal_hold_s.is_some(),
        );
        let share = table
            .share
            .or(self.mass_removal_share)
            .unwrap_or(DEFAULT_MASS_REMOVAL_SHARE);
        if !(share > 0.0 && share <= 1.0) {
            problems.push(format!(
                "watcher.mass_removal share = {share}: must be above 0 and at most 1 (0.5 = half the live instances)"
            ));
        }
        let per_service_share = table
            .per_service_share
            .or(self.mass_removal_per_service_share)
            .unwrap_or(1.0);
        if !(per_service_share > 0.0 && per_service_share <= 1.0) {
            problems.push(format!(
                "watcher.mass_removal per_service_share = {per_service_share}: must be above 0 and at most 1 (1 = off)"
            ));
        }
        MassRemoval {
            share,
            per_service_share,
            min: table
                .min
                .or(self.mass_removal_min)
                .unwrap_or(DEFAULT_MASS_REMOVAL_MIN),
            hold: Duration::from_secs(at_most_a_day(
                "watcher.mass_removal.hold_s",
                table
                    .hold_s
                    .or(self.mass_removal_hold_s)
                    .unwrap_or(DEFAULT_MASS_REMOVAL_HOLD_S),
                1,
                problems,
            )),
        }
    }

    /// `services`, `hand_written` and `node_networks`, every bad service name, glob and
    /// network named.
    pub(super) fn confinement(&self, problems: &mut Problems) -> Confinement {
        let globs = |what: &str, list: &[String], problems: &mut Problems| -> Vec<Glob> {
            list.iter()
                .filter_map(|g| {
                    Glob::parse(g)
                        .map_err(|e| problems.push(format!("watcher.{what}: {e}")))
                        .ok()
                })
                .collect()
        };
        let services = match &self.services {
            None => Confinement::default().services().clone(),
            Some(map) => {
                let mut out = BTreeMap::new();
                for (service, list) in map {
                    if service != "*" && !schema::is_valid_service_name(service) {
                        problems.push(format!(
                            "watcher.services: {service:?} is not a service name ([a-z0-9][a-z0-9_.-]{{0,127}}) or \"*\""
                        ));
                    }
                    out.insert(
                        service.clone(),
                        globs(&format!("services.{service:?}"), list, problems),
                    );
                }
                out
            }
        };
        let mut node_networks = Vec::new();
        for (glob, nets) in self.node_networks.iter().flatten() {
            let what = format!("node_networks.{glob:?}");
            let Some(g) = globs("node_networks", std::slice::from_ref(glob), problems).pop() else {
                continue;
            };
            if nets.is_empty() {
                problems.push(format!(
                    "watcher.{what} is empty, so those nodes could route nothing: list their networks, or leave them out of [watcher] services"
                ));
            }
            let mut cidrs = Vec::new();
            for n in nets {
                match n.parse::<Cidr>() {
                    Ok(c) => cidrs.push(c),
                    Err(e) => problems.push(format!("watcher.{what}: {e}")),
                }
            }
            node_networks.push((g, cidrs));
        }
        Confinement::new(services, self.hand_written.unwrap_or(true), node_networks)
    }

    fn policy(&self, problems: &mut Problems) -> Policy {
        let Some(list) = &self.allowed_networks else {
            return Policy::default();
        };
        if list.is_empty() {
            problems.push(
                "watcher.allowed_networks is empty, so nothing could be routed: list networks, or remove it for the default policy".into(),
            );
        }
        let mut nets = Vec::new();
        for s in list {
            match s.parse::<Cidr>() {
                Ok(c) => nets.push(c),
                Err(e) => problems.push(format!("watcher.allowed_networks: {e}")),
            }
        }
        Policy::new(Some(nets))
    }
}

/// The front door's own addresses as far as the config tells: the host part of every
/// `[template.vars]` string whose key contains `bind` (`http_bind = "10.0.0.5:80"`,
/// `bind_ip = "10.0.0.5"`, HAProxy's `ipv4@` prefixes and comma lists too). Wildcards
/// (`*:80`, `0.0.0.0`) add nothing: they are this host's addresses, listed anyway.
fn bind_addresses(templates: &[TemplateResource]) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    for t in templates {
        for (key, value) in &t.vars {
            let Some(value) = value.as_str().filter(|_| key.contains("bind")) else {
                continue;
            };
            for item in value.split(',') {
                let item = item.split_whitespace().next().unwrap_or("");
                let item = item.rsplit_once('@').map_or(item, |(_, a)| a);
                let host = match item.parse::<SocketAddr>() {
                    Ok(sa) => Some(sa.ip()),
                    Err(_) => policy::literal(item)
                        .or_else(|| item.rsplit_once(':').and_then(|(h, _)| policy::literal(h))),
                };
                out.extend(host.filter(|ip| !ip.is_unspecified()));
            }
        }
    }
    out
}

fn check_templates(templates: &[TemplateResource], problems: &mut Problems) {
    if templates.is_empty() {
        problems.push("no [[template]] resource: add one with src, dest and check_cmd".into());
    }
    for (i, t) in templates.iter().enumerate() {
        let n = i + 1;
        if !t.src.is_file() {
            problems.push(format!(
                "template #{n}: src {} does not exist or is not a file",
                t.src.display()
            ));
        }
        match t.dest.parent() {
            Some(d) if d.as_os_str().is_empty() || d.is_dir() => {}
            _ => problems.push(format!(
                "template #{n}: the folder of dest {} does not exist",
                t.dest.display()
            )),
        }
        if t.haproxy_master_socket.is_some() && t.reload_cmd.is_some() {
            problems.push(format!(
                "template #{n}: set haproxy_master_socket or reload_cmd, not both"
            ));
        }
        if t.haproxy_admin_socket.is_some()
            && t.haproxy_master_socket.is_none()
            && t.reload_cmd.is_none()
        {
            problems.push(format!(
                "template #{n}: haproxy_admin_socket needs haproxy_master_socket or reload_cmd too: the runtime API only takes membership changes, and falls back to a reload"
            ));
        }
        if let Some(m) = &t.mode {
            if u32::from_str_radix(m, 8)
                .map(|v| v > 0o7777)
                .unwrap_or(true)
            {
                problems.push(format!(
                    "template #{n}: mode {m:?} is not an octal mode like \"0644\""
                ));
            }
        }
        if let Some(c) = &t.check_cmd {
            if !c.contains("{src}") {
                problems.push(format!(
                    "template #{n}: check_cmd {c:?} does not mention {{src}}, so it would not check the new file"
                ));
            }
        }
    }
    for (i, a) in templates.iter().enumerate() {
        for b in &templates[i + 1..] {
            if a.dest == b.dest {
                problems.push(format!(
                    "two templates write the same dest {}",
                    a.dest.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::config::{resolve_watcher, FileConfig, WatcherArgs};
    use crate::watcher::policy::Policy;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WatcherArgs,
    }

    fn file(dir: &std::path::Path, watcher: &str) -> FileConfig {
        std::fs::write(dir.join("t.tera"), "x").unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            format!("[watcher]\n{watcher}\n[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n"),
        )
        .unwrap();
        FileConfig::load(Some(&path)).unwrap()
    }

    #[test]
    fn the_status_page_is_on_by_default_only_on_a_loopback_listen() {
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let ui = |watcher: &str| {
            resolve_watcher(&file(dir.path(), watcher), &none)
                .unwrap()
                .ui
        };
        assert!(!ui(""));
        assert!(ui(r#"listen = "127.0.0.1:9477""#));
        assert!(ui(r#"listen = "[::1]:9477""#));
        assert!(!ui(r#"listen = "0.0.0.0:9477""#));
        assert!(!ui(r#"listen = "10.1.2.3:9477""#));
        assert!(ui("listen = \"0.0.0.0:9477\"\nui = true"));
        assert!(!ui("listen = \"127.0.0.1:9477\"\nui = false"));
        let flags = Cli::parse_from(["x", "--ui", "false"]).args;
        let f = file(dir.path(), r#"listen = "127.0.0.1:9477""#);
        assert!(!resolve_watcher(&f, &flags).unwrap().ui);
    }

    #[test]
    fn allowed_networks_from_the_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let c = resolve_watcher(&file(dir.path(), ""), &none).unwrap();
        assert_eq!(c.policy, Policy::default());
        let f = file(
            dir.path(),
            r#"allowed_networks = ["127.0.0.0/8", "fd00::/8"]"#,
        );
        let c = resolve_watcher(&f, &none).unwrap();
        assert!(c.policy.check_ip("127.0.0.1".parse().unwrap()).is_ok());
        assert!(c.policy.check_ip("10.0.0.1".parse().unwrap()).is_err());
        // The flag, comma separated, wins over the file.
        let flags = Cli::parse_from(["x", "--allowed-networks", "10.0.0.0/8,192.168.0.0/16"]).args;
        let c = resolve_watcher(&f, &flags).unwrap();
        assert!(c.policy.check_ip("192.168.1.1".parse().unwrap()).is_ok());
        assert!(c.policy.check_ip("127.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn the_front_doors_bind_addresses_come_from_the_template_vars() {
        let t = |vars: &str| super::TemplateResource {
            src: "t".into(),
            dest: "d".into(),
            check_cmd: None,
            haproxy_master_socket: None,
            reload_cmd: None,
            haproxy_admin_socket: None,
            mode: None,
            vars: toml::from_str(vars).unwrap(),
        };
        let got = super::bind_addresses(&[t(r#"http_bind = "192.0.2.80:80"
                 stats_bind = "127.0.0.1:8404"
                 bind_ip = "198.51.100.9"
                 domain = "10.9.9.9"
                 tls_bind = "ipv4@203.0.113.5:443 ssl crt /x.pem,[2001:db8::8]:443"
                 any_bind = "*:80"
                 zero_bind = "0.0.0.0:80"
                 port_bind = ":80""#)]);
        let want: Vec<std::net::IpAddr> = [
            "127.0.0.1",
            "198.51.100.9",
            "192.0.2.80",
            "203.0.113.5",
            "2001:db8::8",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let (mut got, mut want) = (got, want);
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let p = Policy::default().with_bind_addresses(got);
        assert!(p.check_ip("192.0.2.80".parse().unwrap()).is_err());
        assert!(p.check_ip("192.0.2.81".parse().unwrap()).is_ok());
    }

    #[test]
    fn empty_backends_linger_five_minutes_unless_told() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let c = resolve_watcher(&file(dir.path(), ""), &none).unwrap();
        assert_eq!(c.empty_backend_grace, Duration::from_secs(300));
        let f = file(dir.path(), "empty_backend_grace_s = 0");
        assert_eq!(
            resolve_watcher(&f, &none).unwrap().empty_backend_grace,
            Duration::ZERO
        );
    }

    #[test]
    fn mass_removal_from_a_table_or_flat_keys() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let c = resolve_watcher(&file(dir.path(), ""), &none).unwrap();
        assert_eq!(c.mass_removal, super::MassRemoval::default());
        assert!(c.mass_removal.hold >= Duration::from_secs(30));
        let f = file(
            dir.path(),
            "mass_removal = { share = 0.25, min = 3, hold_s = 2 }",
        );
        let m = resolve_watcher(&f, &none).unwrap().mass_removal;
        assert_eq!((m.share, m.min, m.hold), (0.25, 3, Duration::from_secs(2)));
        let f = file(dir.path(), "mass_removal_min = 10\nmass_removal_hold_s = 0");
        let m = resolve_watcher(&f, &none).unwrap().mass_removal;
        assert_eq!((m.share, m.min, m.hold), (0.5, 10, Duration::ZERO));
        for bad in [
            "mass_removal = { share = 1.5 }",
            "mass_removal = { min = 3 }\nmass_removal_min = 4",
        ] {
            let err = resolve_watcher(&file(dir.path(), bad), &none).unwrap_err();
            assert!(err.to_string().contains("mass_removal"), "{bad}: {err}");
        }
    }

    #[test]
    fn confinement_defaults_to_every_node_every_service_and_names_every_bad_entry() {
        use crate::watcher::confine::Confinement;
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let c = resolve_watcher(&file(dir.path(), ""), &none).unwrap();
        assert_eq!(c.policy.confinement(), &Confinement::default());
        assert_eq!(
            c.policy.confinement().services().keys().collect::<Vec<_>>(),
            ["*"]
        );
        let f = file(
            dir.path(),
            r#"services = { pay = ["pay-*"], "*" = ["*"] }
hand_written = false
node_networks = { "web-*" = ["10.1.0.0/16"] }"#,
        );
        let c = resolve_watcher(&f, &none).unwrap();
        assert_ne!(c.policy.confinement(), &Confinement::default());
        let f = file(
            dir.path(),
            r#"services = { "Pay" = ["pay-*"], web = ["web 1", "ok-*"] }
node_networks = { "db-*" = [], "a/b" = ["10.0.0.0/8"], "web-*" = ["10.0.0.1/8"] }"#,
        );
        let err = resolve_watcher(&f, &none).unwrap_err().to_string();
        for named in [
            "\"Pay\"",
            "\"web 1\"",
            "node_networks.\"db-*\" is empty",
            "\"a/b\"",
            "\"10.0.0.1/8\"",
        ] {
            assert!(err.contains(named), "{named} not in {err}");
        }
    }

    #[test]
    fn dns_names_keep_a_failed_answer_five_minutes_and_the_state_dir_is_absolute() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let none = WatcherArgs::default();
        let c = resolve_watcher(&file(dir.path(), ""), &none).unwrap();
        assert_eq!(c.dns_stale, Duration::from_secs(300));
        assert_eq!(c.dns_refresh, Duration::from_secs(30));
        assert_eq!(c.state_dir, std::path::Path::new(super::DEFAULT_STATE_DIR));
        let f = file(
            dir.path(),
            "dns_stale_s = 0\ndns_refresh_s = 2\nstate_dir = \"/srv/w\"",
        );
        let c = resolve_watcher(&f, &none).unwrap();
        assert_eq!(
            (c.dns_stale, c.dns_refresh),
            (Duration::ZERO, Duration::from_secs(2))
        );
        assert_eq!(c.state_dir, std::path::Path::new("/srv/w"));
        let flags = Cli::parse_from(["x", "--state-dir", "/flag"]).args;
        assert_eq!(
            resolve_watcher(&f, &flags).unwrap().state_dir,
            std::path::Path::new("/flag")
        );
        for (bad, key) in [
            ("dns_refresh_s = 0", "dns_refresh_s"),
            ("dns_stale_s = 100000000", "dns_stale_s"),
            ("state_dir = \"state\"", "state_dir"),
        ] {
            let err = resolve_watcher(&file(dir.path(), bad), &none)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn a_bad_network_is_a_problem_naming_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(
            dir.path(),
            r#"allowed_networks = ["10.0.0.0/8", "10.0.0.1/33", "lan"]"#,
        );
        let err = resolve_watcher(&f, &WatcherArgs::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"10.0.0.1/33\"") && err.contains("\"lan\""),
            "{err}"
        );
        let f = file(dir.path(), "allowed_networks = []");
        let err = resolve_watcher(&f, &WatcherArgs::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("allowed_networks is empty"), "{err}");
    }
}
