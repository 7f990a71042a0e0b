//! `portolan certs ls | import | rm`: the certificates in etcd, as operators see them
//! (the I/O edge of `certs`; the judging is `check`, the same as every watcher's).
//!
//! `ls` reads `<prefix>/certs/` and the watchers' status keys (`<prefix>/watchers/`),
//! whose `certs_served` says which front door serves which certificate (and until
//! when: a front door serving another expiry serves another version). JSON (stable;
//! fields only ever added):
//!
//! ```json
//! {"certs": [{"name": "web", "domains": ["web.example"], "not_after": "2027-03-01T00:00:00Z",
//!   "days_left": 86, "source": "import", "served_by": ["lb1", "lb2"],
//!   "older_version_at": [], "refused": null}]}
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context as _;
use serde::Serialize;

use super::check::{check, check_record};
use super::record::{is_valid_name, key, CertSource, Record, NAME_RULE};
use crate::config::EtcdConfig;
use crate::etcd;
use crate::schema::WatcherStatus;

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    domains: Vec<String>,
    not_after: Option<String>,
    days_left: Option<i64>,
    source: Option<&'static str>,
    /// Front doors serving this very certificate (same expiry).
    served_by: Vec<String>,
    /// Front doors serving another version under this name (the last good one, while
    /// this one is refused, or one they have not taken yet).
    older_version_at: Vec<String>,
    /// Why every watcher refuses what etcd holds now.
    refused: Option<String>,
}

fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `portolan certs ls [--json]`.
pub async fn ls(cfg: &EtcdConfig, json: bool) -> anyhow::Result<()> {
    let mut client = etcd::connect(cfg).await?;
    let dir = format!("{}/certs/", cfg.prefix);
    let certs = etcd::list_prefix(&mut client, &dir)
        .await
        .with_context(|| format!("cannot list {dir}"))?;
    let wdir = format!("{}/watchers/", cfg.prefix);
    let watchers = etcd::list_prefix(&mut client, &wdir)
        .await
        .with_context(|| format!("cannot list {wdir}"))?;
    let statuses: Vec<WatcherStatus> = watchers
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for kv in &certs.kvs {
        let k = String::from_utf8_lossy(kv.key());
        let name = k.strip_prefix(&dir).unwrap_or(&k).to_string();
        let mut row = Row {
            name: name.clone(),
            domains: Vec::new(),
            not_after: None,
            days_left: None,
            source: None,
            served_by: Vec::new(),
            older_version_at: Vec::new(),
            refused: None,
        };
        let expiry = match check(&name, kv.value(), now) {
            Ok(c) => {
                row.domains = c.record.domains.clone();
                row.not_after = Some(rfc3339(c.not_after));
                row.days_left = Some((c.not_after - unix(now)) / 86_400);
                row.source = Some(c.record.source.as_str());
                Some(c.not_after)
            }
            Err(e) => {
                row.refused = Some(format!("{e} ({})", e.reason.label()));
                None
            }
        };
        for s in &statuses {
            match s.certs_served.get(&name) {
                Some(at) if Some(*at) == expiry => row.served_by.push(s.name.clone()),
                Some(_) => row.older_version_at.push(s.name.clone()),
                None => {}
            }
        }
        rows.push(row);
    }
    if json {
        println!("{}", serde_json::json!({ "certs": rows }));
        return Ok(());
    }
    println!(
        "{:<24} {:<32} {:<21} {:>5} {:<7} SERVED BY",
        "NAME", "DOMAINS", "NOT AFTER", "DAYS", "SOURCE"
    );
    for r in &rows {
        let mut served = r.served_by.join(",");
        if !r.older_version_at.is_empty() {
            served += &format!(" (older version: {})", r.older_version_at.join(","));
        }
        if served.is_empty() {
            served = "-".into();
        }
        println!(
            "{:<24} {:<32} {:<21} {:>5} {:<7} {}",
            r.name,
            r.domains.join(","),
            r.not_after.as_deref().unwrap_or("-"),
            r.days_left.map_or("-".into(), |d| d.to_string()),
            r.source.unwrap_or("-"),
            served
        );
        if let Some(why) = &r.refused {
            println!("  refused: {why}");
        }
    }
    Ok(())
}

/// `portolan certs import NAME --cert F --key F [--domains a,b]`: the same checks as
/// every watcher's, before anything is written; the domains default to the leaf's
/// DNS names.
pub async fn import(
    cfg: &EtcdConfig,
    name: &str,
    cert: &Path,
    key_file: &Path,
    domains: Option<Vec<String>>,
) -> anyhow::Result<()> {
    anyhow::ensure!(is_valid_name(name), "NAME {name:?}: {NAME_RULE}");
    let read = |p: &Path, flag: &str| {
        std::fs::read_to_string(p).with_context(|| format!("cannot read {flag} {}", p.display()))
    };
    let now = SystemTime::now();
    let mut record = Record {
        cert: read(cert, "--cert")?,
        key: read(key_file, "--key")?,
        domains: domains.unwrap_or_default(),
        not_after: String::new(),
        source: CertSource::Import,
        issued_at: rfc3339(unix(now)),
    };
    if record.domains.is_empty() {
        // The leaf's own names: judged once without domains to learn them.
        let names = match check_record(name, record.clone(), now) {
            Err(e) if e.reason == super::Refusal::Domain => leaf_names(&record.cert),
            Err(e) => anyhow::bail!("refused, nothing was written: {e} ({})", e.reason.label()),
            Ok(c) => c.names,
        };
        record.domains = names;
    }
    let checked = check_record(name, record, now)
        .map_err(|e| anyhow::anyhow!("refused, nothing was written: {e} ({})", e.reason.label()))?;
    let mut record = checked.record;
    record.not_after = rfc3339(checked.not_after);
    let mut client = etcd::connect(cfg).await?;
    let k = key(&cfg.prefix, name);
    let value = serde_json::to_string(&record)?;
    etcd::call(client.put(k.as_str(), value, None))
        .await
        .with_context(|| format!("cannot write {k}"))?;
    println!(
        "{k}: {} until {} (every watcher serves it within milliseconds, no reload)",
        record.domains.join(","),
        record.not_after
    );
    Ok(())
}

/// The leaf's DNS names (empty when it does not parse; the check names why).
fn leaf_names(pem: &str) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Some(Ok(p)) = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).next() else {
        return Vec::new();
    };
    let Ok(leaf) = p.parse_x509() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                out.push(d.to_string());
            }
        }
    }
    out
}

/// `portolan certs rm NAME`.
pub async fn rm(cfg: &EtcdConfig, name: &str) -> anyhow::Result<()> {
    let mut client = etcd::connect(cfg).await?;
    let k = key(&cfg.prefix, name);
    let deleted = etcd::call(client.delete(k.as_str(), None))
        .await
        .with_context(|| format!("cannot delete {k}"))?
        .deleted();
    anyhow::ensure!(
        deleted > 0,
        "{k} does not exist (portolan certs ls lists the names)"
    );
    println!("{k} deleted: the watchers stop serving it");
    Ok(())
}

/// Served vs stored, for `portolan status`: (stored and valid, served by this watcher,
/// names stored but not served, names served but not stored as such).
pub(crate) fn compare(
    stored: &BTreeMap<String, std::sync::Arc<[u8]>>,
    served: &BTreeMap<String, i64>,
) -> String {
    let now = SystemTime::now();
    let valid: BTreeMap<&String, i64> = stored
        .iter()
        .filter_map(|(n, v)| check(n, v, now).ok().map(|c| (n, c.not_after)))
        .collect();
    let mut lines = vec![format!(
        "certificates: {} stored ({} valid), {} served",
        stored.len(),
        valid.len(),
        served.len()
    )];
    for (n, at) in &valid {
        match served.get(*n) {
            None => lines.push(format!("  {n}: stored, not served yet")),
            Some(s) if s != at => lines.push(format!("  {n}: an older version is served")),
            Some(_) => {}
        }
    }
    for n in stored.keys().filter(|n| !valid.contains_key(n)) {
        let why = check(n, &stored[n], now)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        lines.push(format!("  {n}: refused: {why}"));
    }
    lines.join("\n")
}
