//! `portolan status`: is HAProxy running what etcd says?
//!
//! Three views of every backend's servers, compared by backend and server name:
//! - etcd: the template rendered from etcd now, exactly as the watcher would render it;
//! - the file: `dest` on disk, what the next reload or restart will load;
//! - HAProxy: `show servers state` on the admin socket, what it runs at this moment
//!   (runtime-API changes, a hand-made `set server … state maint`, a server added by
//!   hand all show here and nowhere else).
//!
//! Every difference is one line naming the server. A server that HAProxy's own health
//! checks mark down is not a difference: that is HAProxy doing its job. `compare` is
//! pure; `run` does the reading.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use super::apply::Resource;
use super::haproxy::servers::{parse_servers_state, views_of_config, Admin, View};
use super::haproxy::socket::exchange;
use super::oneshot::listing_from_etcd;
use crate::config::WatcherConfig;
use crate::etcd;
use crate::schema::{self, WatcherStatus};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Row {
    pub(crate) etcd: Option<View>,
    pub(crate) file: Option<View>,
    /// None: not running in HAProxy (or no admin socket to ask).
    pub(crate) haproxy: Option<View>,
}

/// backend → server → its three views.
pub(crate) type Backends = BTreeMap<String, BTreeMap<String, Row>>;

/// Lines the config's `addr` and HAProxy's agree on: a name the file gives is resolved
/// by HAProxy, so only compare literal addresses.
fn same_addr(file: &str, running: &str) -> bool {
    file == running
        || file
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_err())
}

/// Puts the views side by side and names every difference.
pub(crate) fn compare(
    etcd: &str,
    file: &str,
    haproxy: Option<&str>,
) -> Result<(Backends, Vec<String>), String> {
    let etcd = views_of_config(etcd).map_err(|e| format!("the render from etcd: {e}"))?;
    let file = views_of_config(file).map_err(|e| format!("the file: {e}"))?;
    let running = haproxy.map(parse_servers_state).transpose()?;
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    for views in [Some(&etcd), Some(&file), running.as_ref()]
        .into_iter()
        .flatten()
    {
        for (b, servers) in views {
            for s in servers.keys() {
                names.insert((b.clone(), s.clone()));
            }
        }
    }
    let get = |v: &BTreeMap<String, BTreeMap<String, View>>, b: &str, s: &str| {
        v.get(b).and_then(|m| m.get(s)).cloned()
    };
    let mut backends = Backends::new();
    let mut diffs = Vec::new();
    for (b, s) in names {
        let row = Row {
            etcd: get(&etcd, &b, &s),
            file: get(&file, &b, &s),
            haproxy: running.as_ref().and_then(|r| get(r, &b, &s)),
        };
        let id = format!("{b}/{s}");
        match (&row.etcd, &row.file) {
            (Some(_), None) => diffs.push(format!("{id}: in etcd, not in the file (the watcher has not written it yet, or its last apply failed)")),
            (None, Some(_)) => diffs.push(format!("{id}: in the file, no longer in etcd")),
            (Some(e), Some(f)) if e != f => diffs.push(format!(
                "{id}: etcd says {}, the file {}",
                describe(e),
                describe(f)
            )),
            _ => {}
        }
        if running.is_some() {
            match (&row.file, &row.haproxy) {
                (Some(_), None) => diffs.push(format!("{id}: in the file, but HAProxy does not run it")),
                (None, Some(_)) => diffs.push(format!(
                    "{id}: HAProxy runs it, but the file does not have it (added by hand on the admin socket?)"
                )),
                (Some(f), Some(h)) => {
                    if !same_addr(&f.addr, &h.addr) {
                        diffs.push(format!("{id}: the file says {}, HAProxy runs {}", f.addr, h.addr));
                    }
                    if f.weight.is_some() && f.weight != h.weight {
                        diffs.push(format!(
                            "{id}: the file says weight {}, HAProxy runs weight {}",
                            f.weight.unwrap_or_default(),
                            h.weight.unwrap_or_default()
                        ));
                    }
                    if !same_admin(f.admin, h.admin) {
                        // The fix puts HAProxy where the file says, never the reverse:
                        // `ready` would undo a drain the file asks for.
                        let to = match f.admin {
                            Admin::Ready => "ready",
                            Admin::Maint | Admin::Drain => "maint",
                        };
                        diffs.push(format!(
                            "{id}: HAProxy has it in {}, the file says {} (`set server {id} state {to}` on the admin socket undoes a manual change)",
                            admin_word(h.admin),
                            admin_word(f.admin)
                        ));
                    }
                }
                (None, None) => {}
            }
        }
        backends.entry(b).or_default().insert(s, row);
    }
    Ok((backends, diffs))
}

/// The file's admin state and HAProxy's agree. A `disabled` line (a draining instance)
/// is out of rotation: HAProxy's `maint` is that, and so is `drain`, which is how the
/// watcher takes it out in a backend with persistence (a sticky client finishes there).
fn same_admin(file: Admin, running: Admin) -> bool {
    file == running || (file == Admin::Maint && running == Admin::Drain)
}

fn admin_word(a: Admin) -> &'static str {
    match a {
        Admin::Ready => "ready",
        Admin::Maint => "maintenance",
        Admin::Drain => "drain",
    }
}

fn describe(v: &View) -> String {
    let mut s = v.addr.clone();
    if let Some(w) = v.weight {
        s += &format!(" weight {w}");
    }
    if v.admin != Admin::Ready {
        s += &format!(" {}", admin_word(v.admin));
    }
    s
}

#[derive(Debug, Serialize)]
struct TemplateReport {
    dest: String,
    admin_socket: Option<String>,
    backends: Backends,
}

#[derive(Debug, Serialize)]
struct Report {
    in_sync: bool,
    etcd_revision: i64,
    watcher: Option<WatcherStatus>,
    templates: Vec<TemplateReport>,
    differences: Vec<String>,
    /// An endpoint runs an etcd whose RBAC a user can bypass (`etcd::advisory`); apart
    /// from `in_sync`.
    etcd_rbac_bypassable: bool,
    /// One line per such endpoint: version, advisories, release to upgrade to.
    etcd_rbac_warnings: Vec<String>,
    /// Instance keys confinement refuses (`confine`): in etcd, never rendered.
    refused: Vec<RefusedKey>,
    /// Certificates stored vs served by this watcher (`certs::operator::compare`);
    /// apart from `in_sync`.
    certificates: String,
}

#[derive(Debug, Serialize)]
struct RefusedKey {
    key: String,
    reason: &'static str,
    rule: String,
}

fn cell(v: &Option<View>, with_health: bool) -> String {
    match v {
        None => "-".into(),
        Some(v) => {
            let mut s = describe(v);
            if with_health && v.up == Some(false) {
                s += " (down: health check)";
            }
            s
        }
    }
}

fn table(report: &Report) -> String {
    let mut rows = vec![[
        "BACKEND".to_string(),
        "SERVER".into(),
        "ETCD".into(),
        "FILE".into(),
        "HAPROXY".into(),
    ]];
    for t in &report.templates {
        for (b, servers) in &t.backends {
            for (s, r) in servers {
                rows.push([
                    b.clone(),
                    s.clone(),
                    cell(&r.etcd, false),
                    cell(&r.file, false),
                    if t.admin_socket.is_some() {
                        cell(&r.haproxy, true)
                    } else {
                        "?".into()
                    },
                ]);
            }
        }
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn last_apply(w: &Option<WatcherStatus>, name: &str) -> String {
    match w {
        None => {
            format!("watcher {name}: no status key (not running, or under another name: --name)")
        }
        Some(w) => last_apply_line(w, schema::unix_now()),
    }
}

/// The last apply's path, result and age, then the last reload's when it is another
/// (a runtime change after it): the apply is what `status` is asked about. A record of
/// an older watcher has only the reload's.
fn last_apply_line(w: &WatcherStatus, now: u64) -> String {
    let ago = |t: Option<u64>| {
        t.map(|t| format!(", {}s ago", now.saturating_sub(t)))
            .unwrap_or_default()
    };
    let (result, at) = match (w.last_apply_result, w.last_apply_at) {
        (Some(r), at) => (r.as_str(), at),
        (None, _) => (
            w.last_reload_result
                .map_or("nothing applied yet", |r| r.as_str()),
            w.last_reload_at,
        ),
    };
    let reload = match (w.last_reload_result, w.last_reload_at) {
        (Some(r), Some(t)) if w.last_apply_at.is_some_and(|a| a != t) => {
            format!("; last reload {}{}", r.as_str(), ago(Some(t)))
        }
        (None, _) if w.last_apply_at.is_some() => "; no reload yet".to_string(),
        _ => String::new(),
    };
    format!(
        "watcher {}: last apply at etcd revision {} via {}, {result}{}{reload}{}",
        w.name,
        w.revision,
        w.last_apply_path.map_or("-", |p| p.as_str()),
        ago(at),
        w.last_error
            .as_deref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default(),
    ) + &w
        .route_conflicts
        .iter()
        .map(|c| format!("\n  route conflict: {c}"))
        .collect::<String>()
}

/// `portolan status`: prints the comparison; true when etcd, the files and HAProxy agree.
pub async fn run(cfg: &WatcherConfig, json: bool) -> anyhow::Result<bool> {
    let (revision, snapshot, refused) = listing_from_etcd(cfg).await?;
    let mut client = etcd::connect(&cfg.etcd).await?;
    let key = schema::watcher_key(&cfg.etcd.prefix, &cfg.name);
    let watcher = etcd::call(client.get(key.as_str(), None))
        .await
        .with_context(|| format!("cannot read {key}"))?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<WatcherStatus>(kv.value()).ok());
    let timeout = cfg.command_timeout.min(Duration::from_secs(5));
    let mut templates = Vec::new();
    let mut differences = Vec::new();
    for t in &cfg.templates {
        let mut r = Resource::open(t.clone(), Duration::ZERO).await?;
        r.load_template().await?;
        r.tls = super::tls::view_of(&cfg.certs_dir, &snapshot.certs);
        let rendered = match r.render(&snapshot) {
            Some(result) => result?,
            None => continue,
        };
        let file = std::fs::read_to_string(&t.dest)
            .with_context(|| format!("cannot read {}", t.dest.display()))?;
        let running = match &t.haproxy_admin_socket {
            Some(sock) => Some(
                exchange(sock, "show servers state", timeout)
                    .await
                    .with_context(|| format!("HAProxy's admin socket {} did not answer (is HAProxy running with it?)", sock.display()))?,
            ),
            None => None,
        };
        let (backends, diffs) = compare(&rendered, &file, running.as_deref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", t.dest.display()))?;
        differences.extend(diffs.into_iter().map(|d| {
            if cfg.templates.len() > 1 {
                format!("{}: {d}", t.dest.display())
            } else {
                d
            }
        }));
        templates.push(TemplateReport {
            dest: t.dest.display().to_string(),
            admin_socket: t
                .haproxy_admin_socket
                .as_ref()
                .map(|p| p.display().to_string()),
            backends,
        });
    }
    let rbac: Vec<String> = etcd::advisory::check(&cfg.etcd)
        .await
        .iter()
        .filter(|e| e.bypassable())
        .map(|e| e.describe())
        .collect();
    let certificates = crate::certs::operator::compare(
        &snapshot.certs,
        &watcher
            .as_ref()
            .map(|w| w.certs_served.clone())
            .unwrap_or_default(),
    );
    let report = Report {
        in_sync: differences.is_empty(),
        etcd_revision: revision,
        watcher,
        templates,
        differences,
        etcd_rbac_bypassable: !rbac.is_empty(),
        etcd_rbac_warnings: rbac,
        refused: refused
            .into_iter()
            .map(|(key, r)| RefusedKey {
                key,
                reason: r.reason.label(),
                rule: r.rule,
            })
            .collect(),
        certificates,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, &cfg.name);
    }
    Ok(report.in_sync)
}

/// The report as an operator reads it in a terminal.
fn print_report(report: &Report, watcher: &str) {
    print!("{}", table(report));
    println!(
        "etcd revision {}; {}",
        report.etcd_revision,
        last_apply(&report.watcher, watcher)
    );
    for w in &report.etcd_rbac_warnings {
        println!("warning: {w}: least privilege does not hold");
    }
    for t in report.templates.iter().filter(|t| t.admin_socket.is_none()) {
        println!(
            "{}: no haproxy_admin_socket, so HAProxy's own view is not shown",
            t.dest
        );
    }
    if report.in_sync {
        println!("in sync: etcd, the file and HAProxy agree");
    }
    for d in &report.differences {
        println!("difference: {d}");
    }
    for r in &report.refused {
        println!("refused: {}: {}", r.key, r.rule);
    }
    println!("{}", report.certificates);
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "global\n  daemon\nbackend web\n  balance roundrobin\n  server a 10.0.0.1:80 weight 100\n  server b 10.0.0.2:80 weight 100\n";

    fn state(rows: &[(&str, &str, &str, u32, u32, u32)]) -> String {
        let mut s = String::from("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n");
        for (i, (b, n, ip, op, admin, w)) in rows.iter().enumerate() {
            s += &format!(
                "3 {b} {i} {n} {ip} {op} {admin} {w} {w} 10 6 3 4 6 0 0 0 - 80 - 0 0 - - 0\n"
            );
        }
        s
    }

    #[test]
    fn three_views_that_agree_have_no_difference() {
        let s = state(&[
            ("web", "a", "10.0.0.1", 2, 0, 100),
            ("web", "b", "10.0.0.2", 0, 0, 100),
        ]);
        let (backends, diffs) = compare(CFG, CFG, Some(&s)).unwrap();
        assert_eq!(diffs, Vec::<String>::new());
        // A server down by health check is HAProxy working, not drift.
        assert_eq!(
            backends["web"]["b"].haproxy.as_ref().unwrap().up,
            Some(false)
        );
    }

    #[test]
    fn a_manual_maintenance_and_a_hand_added_server_are_named() {
        let s = state(&[
            ("web", "a", "10.0.0.1", 2, 0x01, 100),
            ("web", "b", "10.0.0.2", 2, 0, 100),
            ("web", "x", "10.0.0.9", 2, 0, 1),
        ]);
        let (_, diffs) = compare(CFG, CFG, Some(&s)).unwrap();
        assert_eq!(diffs.len(), 2, "{diffs:?}");
        assert!(
            diffs[0].starts_with("web/a: HAProxy has it in maintenance"),
            "{diffs:?}"
        );
        assert!(
            diffs[1].starts_with("web/x: HAProxy runs it, but the file does not have it"),
            "{diffs:?}"
        );
    }

    /// In a sticky backend the watcher drains a stopping instance with `state drain`
    /// while the file says `disabled`: that is the file obeyed, not drift, and no fix
    /// may suggest `state ready` for it. A server the file has out but HAProxy runs
    /// ready is drift, fixed by putting it out again.
    #[test]
    fn a_drain_in_a_sticky_backend_is_not_drift() {
        let file = CFG.replace("10.0.0.1:80 weight 100", "10.0.0.1:80 weight 100 disabled");
        let drained = state(&[
            ("web", "a", "10.0.0.1", 2, 0x08, 100),
            ("web", "b", "10.0.0.2", 2, 0, 100),
        ]);
        let (_, diffs) = compare(&file, &file, Some(&drained)).unwrap();
        assert_eq!(diffs, Vec::<String>::new());
        let ready = state(&[
            ("web", "a", "10.0.0.1", 2, 0, 100),
            ("web", "b", "10.0.0.2", 2, 0, 100),
        ]);
        let (_, diffs) = compare(&file, &file, Some(&ready)).unwrap();
        assert_eq!(diffs.len(), 1, "{diffs:?}");
        assert!(
            diffs[0].contains("`set server web/a state maint`"),
            "{diffs:?}"
        );
        assert!(!diffs[0].contains("state ready"), "{diffs:?}");
        // The file says ready, HAProxy drains: drift, and `ready` is its fix.
        let (_, diffs) = compare(CFG, CFG, Some(&drained)).unwrap();
        assert!(diffs[0].contains("state ready"), "{diffs:?}");
    }

    /// A runtime change after a reload: the line shows the runtime apply's result and
    /// age, not the reload's (it used to show the reload's as the last apply's).
    #[test]
    fn the_last_apply_line_is_the_last_applys() {
        let mut w = WatcherStatus {
            name: "lb".into(),
            revision: 7,
            ..Default::default()
        };
        w.record_apply(
            Some(schema::ReloadResult::Failed),
            Some(schema::ApplyPath::Reload),
            true,
            1000,
        );
        w.record_apply(None, Some(schema::ApplyPath::Runtime), false, 1090);
        assert_eq!(
            last_apply_line(&w, 1100),
            "watcher lb: last apply at etcd revision 7 via runtime, ok, 10s ago; last reload failed, 100s ago"
        );
        // Only runtime applies so far.
        let mut fresh = WatcherStatus {
            name: "lb".into(),
            ..Default::default()
        };
        fresh.record_apply(None, Some(schema::ApplyPath::Runtime), false, 50);
        assert_eq!(
            last_apply_line(&fresh, 53),
            "watcher lb: last apply at etcd revision 0 via runtime, ok, 3s ago; no reload yet"
        );
        // Route conflicts the watcher found, one line each.
        fresh.route_conflicts = vec!["service b is refused host x.example.com: service a claimed it first (its oldest instance is older)".into()];
        assert!(last_apply_line(&fresh, 53).ends_with(
            "no reload yet\n  route conflict: service b is refused host x.example.com: service a claimed it first (its oldest instance is older)"
        ));
        // A render its check refused is an apply that ended `rejected`.
        fresh.record_apply(Some(schema::ReloadResult::Rejected), None, true, 60);
        assert!(last_apply_line(&fresh, 60).contains("via runtime, rejected, 0s ago"));
        // An older watcher's record: the reload's, as before.
        let old: WatcherStatus = serde_json::from_str(
            r#"{"name":"lb","revision":3,"last_reload_at":10,"last_reload_result":"ok","last_apply_path":"reload","last_error":null}"#,
        )
        .unwrap();
        assert_eq!(
            last_apply_line(&old, 12),
            "watcher lb: last apply at etcd revision 3 via reload, ok, 2s ago"
        );
    }

    #[test]
    fn a_file_behind_etcd_is_named() {
        let etcd =
            CFG.replace("10.0.0.2:80", "10.0.0.3:80") + "  server c 10.0.0.4:80 weight 100\n";
        let (_, diffs) = compare(&etcd, CFG, None).unwrap();
        assert_eq!(
            diffs,
            vec![
                "web/b: etcd says 10.0.0.3:80 weight 100, the file 10.0.0.2:80 weight 100".to_string(),
                "web/c: in etcd, not in the file (the watcher has not written it yet, or its last apply failed)".to_string(),
            ]
        );
    }

    #[test]
    fn a_drained_server_and_ipv6_addresses_parse() {
        let s = state(&[("web", "a", "fd00::1", 2, 0x08, 50)]);
        let v = &parse_servers_state(&s).unwrap()["web"]["a"];
        assert_eq!(v.admin, Admin::Drain);
        assert_eq!(v.addr, "[fd00::1]:80");
        assert_eq!(v.weight, Some(50));
        assert!(parse_servers_state("2\n").is_err());
    }
}
