//! Which etcd releases let a user past its RBAC role, and what to upgrade to.
//!
//! Least privilege (`portolan auth`) confines a node only as far as etcd enforces its
//! roles. The releases below do not: with nothing but a node's credentials, one nested
//! transaction writes, deletes and reads any key, the lease API lists, reads and keeps
//! alive every other node's lease, and a watch from the node's own prefix shows every
//! key after it. `tests/etcd_rbac_bypass.rs` does exactly that on the installed etcd.
//!
//! The table is pure: `assess` maps a server version (`Status`) to the advisories that
//! apply and the release that fixes all of them. `check` and `watch` do the reading.

use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::config::EtcdConfig;

/// `major.minor.patch`, a pre-release (`3.6.0-rc.1`) sorting below its release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// False for a pre-release: it lacks fixes its release has.
    release: bool,
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Version {
        Version {
            major,
            minor,
            patch,
            release: true,
        }
    }

    /// Parses what etcd's `Status` answers (`3.4.23`, `3.6.0-rc.1`, `v3.5.9`).
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim().trim_start_matches('v');
        // `-pre` marks a pre-release; `+build` is metadata only.
        let end = s.find(['-', '+']).unwrap_or(s.len());
        let (core, pre) = (&s[..end], s[end..].starts_with('-'));
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let (Some(Some(major)), Some(Some(minor)), Some(Some(patch)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Version {
            major,
            minor,
            patch,
            release: !pre,
        })
    }

    fn line(&self) -> (u64, u64) {
        (self.major, self.minor)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.release {
            f.write_str("-pre")?;
        }
        Ok(())
    }
}

/// One published RBAC bypass and the first release of each line that fixes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Advisory {
    pub id: &'static str,
    pub cve: &'static str,
    /// What a node's credentials can do through it.
    pub what: &'static str,
    /// The first fixed release of each line that got a fix, oldest line first. A line
    /// newer than all of these was released fixed; an older line, or one missing in
    /// between, has no fix.
    pub fixed: &'static [Version],
}

/// From the GitHub advisories (github.com/etcd-io/etcd/security/advisories) and etcd's
/// CHANGELOG-3.4/3.5/3.6.
#[rustfmt::skip]
pub const ADVISORIES: &[Advisory] = &[
    Advisory {
        id: "GHSA-rfx7-8w68-q57q",
        cve: "CVE-2026-33343",
        what: "nested transactions skip key permissions: write, delete and read any key",
        fixed: &[Version::new(3, 4, 42), Version::new(3, 5, 28), Version::new(3, 6, 9)],
    },
    Advisory {
        id: "GHSA-q8m4-xhhv-38mg",
        cve: "CVE-2026-33413",
        what: "lease, compaction, alarm and member APIs skip authorization: list, renew and revoke any lease",
        fixed: &[Version::new(3, 4, 42), Version::new(3, 5, 28), Version::new(3, 6, 9)],
    },
    Advisory {
        id: "GHSA-x35m-3gp4-4fh5",
        cve: "CVE-2026-44283",
        what: "puts nested in transactions read any key through prev_kv and attach any lease",
        fixed: &[Version::new(3, 4, 44), Version::new(3, 5, 30), Version::new(3, 6, 11)],
    },
    Advisory {
        id: "GHSA-3p4g-rcw5-8298",
        cve: "CVE-2023-32082",
        what: "lease time-to-live lists the key names on any lease",
        fixed: &[Version::new(3, 4, 26), Version::new(3, 5, 9)],
    },
    Advisory {
        id: "GHSA-xg4h-6gfc-h4m8",
        cve: "CVE-2026-73499",
        what: "a watch from a readable key to the end of the keyspace shows every key after it",
        // 3.4 reached its end of life in May 2026 without this fix.
        fixed: &[Version::new(3, 5, 33), Version::new(3, 6, 14), Version::new(3, 7, 1)],
    },
];

impl Advisory {
    pub fn affects(&self, v: Version) -> bool {
        if let Some(fix) = self.fixed.iter().find(|f| f.line() == v.line()) {
            return v < *fix;
        }
        // Lines without an entry: newer than every fixed line → released fixed.
        !self.fixed.iter().all(|f| f.line() < v.line())
    }

    /// The first release of `line` free of this advisory, if the line has one.
    fn first_fixed_in(&self, line: (u64, u64)) -> Option<Version> {
        if let Some(f) = self.fixed.iter().find(|f| f.line() == line) {
            return Some(*f);
        }
        self.fixed
            .iter()
            .all(|f| f.line() < line)
            .then_some(Version::new(line.0, line.1, 0))
    }
}

/// What a server version means for least privilege.
#[derive(Debug, PartialEq, Eq)]
pub enum Assessment {
    /// No known bypass.
    Safe(Version),
    /// A node's credentials reach past its role. `upgrade_to`: the first release of
    /// the same line free of all of them, or of the next line that has one.
    Bypassable {
        version: Version,
        advisories: Vec<&'static Advisory>,
        upgrade_to: Version,
    },
    /// The version does not parse: treated as bypassable.
    Unknown(String),
}

impl Assessment {
    pub fn bypassable(&self) -> bool {
        !matches!(self, Assessment::Safe(_))
    }
}

/// The lines any advisory names, oldest first: where an upgrade can go.
fn lines() -> Vec<(u64, u64)> {
    let mut l: Vec<_> = ADVISORIES
        .iter()
        .flat_map(|a| a.fixed.iter().map(Version::line))
        .collect();
    l.sort_unstable();
    l.dedup();
    l
}

/// The first release free of every advisory on `line`, if the line has one.
fn safe_release_of(line: (u64, u64)) -> Option<Version> {
    ADVISORIES
        .iter()
        .map(|a| a.first_fixed_in(line))
        .try_fold(Version::new(line.0, line.1, 0), |acc, f| Some(acc.max(f?)))
}

pub fn assess(version: &str) -> Assessment {
    let Some(v) = Version::parse(version) else {
        return Assessment::Unknown(version.to_string());
    };
    let advisories: Vec<&Advisory> = ADVISORIES.iter().filter(|a| a.affects(v)).collect();
    if advisories.is_empty() {
        return Assessment::Safe(v);
    }
    let upgrade_to = safe_release_of(v.line())
        .or_else(|| {
            lines()
                .into_iter()
                .filter(|l| *l > v.line())
                .find_map(safe_release_of)
        })
        // Past every listed line: the newest line's fix (not reached with this table).
        .unwrap_or(Version::new(v.major, v.minor + 1, 0));
    Assessment::Bypassable {
        version: v,
        advisories,
        upgrade_to,
    }
}

/// One sentence for a log line or an error: the version, the advisories, the upgrade.
pub fn describe(endpoint: &str, a: &Assessment) -> String {
    match a {
        Assessment::Safe(v) => {
            format!("etcd at {endpoint} runs {v}: no known RBAC bypass")
        }
        Assessment::Unknown(s) => format!(
            "etcd at {endpoint} reports version {s:?}, which Portolan cannot place: treat its RBAC as bypassable until it runs a known fixed release"
        ),
        Assessment::Bypassable {
            version,
            advisories,
            upgrade_to,
        } => {
            let list: Vec<String> = advisories
                .iter()
                .map(|a| format!("{} ({})", a.id, a.what))
                .collect();
            let same_line = upgrade_to.line() == version.line();
            format!(
                "etcd at {endpoint} runs {version}: etcd's RBAC there does not confine a node's or a watcher's user: {}; upgrade etcd to {upgrade_to} or later{}",
                list.join("; "),
                if same_line {
                    String::new()
                } else {
                    format!(
                        " ({}.{} has no release that fixes all of them)",
                        version.major, version.minor
                    )
                }
            )
        }
    }
}

/// What one endpoint answered.
#[derive(Debug)]
pub struct EndpointVersion {
    pub endpoint: String,
    /// The assessment, or why the endpoint did not answer `Status`.
    pub result: Result<Assessment, String>,
}

impl EndpointVersion {
    pub fn bypassable(&self) -> bool {
        matches!(&self.result, Ok(a) if a.bypassable())
    }

    pub fn describe(&self) -> String {
        match &self.result {
            Ok(a) => describe(&self.endpoint, a),
            Err(e) => format!("etcd at {}: cannot read its version ({e})", self.endpoint),
        }
    }
}

/// Asks every configured endpoint for its server version (`Status`), each on its own
/// connection: a cluster mid-upgrade has members of two versions.
pub async fn check(cfg: &EtcdConfig) -> Vec<EndpointVersion> {
    let mut out = Vec::new();
    for endpoint in &cfg.endpoints {
        let one = EtcdConfig {
            endpoints: vec![endpoint.clone()],
            ..cfg.clone()
        };
        let result = async {
            let mut c = super::connect(&one).await.map_err(|e| e.to_string())?;
            let status = super::call(c.status()).await.map_err(|e| e.to_string())?;
            Ok(assess(status.version()))
        }
        .await;
        out.push(EndpointVersion {
            endpoint: endpoint.clone(),
            result,
        });
    }
    out
}

/// Registers `gauge` as `etcd_rbac_bypassable` in `registry` (prefix `portolan`): the
/// same name in both daemons.
pub fn register(registry: &mut prometheus_client::registry::Registry, gauge: &Gauge) {
    registry.register(
        "etcd_rbac_bypassable",
        "1 while an etcd endpoint runs a release whose RBAC a user can bypass (see the log for the advisory and the release to upgrade to)",
        gauge.clone(),
    );
}

/// How often a daemon re-reads the versions once every endpoint answered: an etcd
/// upgraded (or downgraded) under a running daemon shows within this.
const RECHECK: Duration = Duration::from_secs(600);
/// First retry while an endpoint does not answer; doubled up to [`RECHECK`].
const RETRY: Duration = Duration::from_secs(5);

/// A daemon's check: warns at start (and on every change) for each endpoint whose
/// RBAC is bypassable, and keeps `gauge` (`portolan_etcd_rbac_bypassable`) at 1 while
/// any endpoint that answered is.
pub async fn watch(cfg: EtcdConfig, gauge: Gauge, shutdown: CancellationToken) {
    let mut said: std::collections::BTreeMap<String, String> = Default::default();
    let mut retry = RETRY;
    loop {
        let found = check(&cfg).await;
        let mut unanswered = false;
        for e in &found {
            let line = e.describe();
            if said.get(&e.endpoint) == Some(&line) {
                continue;
            }
            match &e.result {
                Ok(a) if a.bypassable() => {
                    tracing::warn!(endpoint = %e.endpoint, "{line}; least privilege does not hold (portolan_etcd_rbac_bypassable 1)")
                }
                Ok(_) => tracing::info!(endpoint = %e.endpoint, "{line}"),
                Err(_) => {
                    unanswered = true;
                    tracing::debug!(endpoint = %e.endpoint, "{line}; retrying");
                    continue;
                }
            }
            said.insert(e.endpoint.clone(), line);
        }
        if found.iter().any(|e| e.result.is_ok()) {
            gauge.set(i64::from(found.iter().any(EndpointVersion::bypassable)));
        }
        let wait = if unanswered {
            retry = (retry * 2).min(RECHECK);
            retry / 2
        } else {
            retry = RETRY;
            RECHECK
        };
        if !crate::backoff::sleep_or_stop(wait, &shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_parse_as_etcd_reports_them() {
        assert_eq!(v("3.4.23"), Version::new(3, 4, 23));
        assert_eq!(v("v3.5.9"), Version::new(3, 5, 9));
        assert!(v("3.6.0-rc.1") < Version::new(3, 6, 0));
        assert!(v("3.6.0-rc.1") > Version::new(3, 5, 99));
        assert_eq!(v("3.6.9+build-1"), Version::new(3, 6, 9));
        for bad in ["", "3.4", "3.4.x", "3.4.1.2", "not-a-version"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    /// version → bypassable?, upgrade to.
    #[test]
    fn each_line_is_safe_from_its_first_release_that_fixes_every_advisory() {
        let table: &[(&str, Option<&str>)] = &[
            ("3.3.27", Some("3.5.33")),
            ("3.4.0", Some("3.5.33")),
            ("3.4.23", Some("3.5.33")),
            // 3.4 never got GHSA-xg4h-6gfc-h4m8's fix.
            ("3.4.44", Some("3.5.33")),
            ("3.5.0-alpha.0", Some("3.5.33")),
            ("3.5.9", Some("3.5.33")),
            ("3.5.32", Some("3.5.33")),
            ("3.5.33", None),
            ("3.5.40", None),
            ("3.6.0", Some("3.6.14")),
            ("3.6.13", Some("3.6.14")),
            ("3.6.14", None),
            ("3.7.0", Some("3.7.1")),
            ("3.7.1", None),
            ("3.8.0", None),
            ("4.0.0", None),
        ];
        for (version, want) in table {
            let got = match assess(version) {
                Assessment::Safe(_) => None,
                Assessment::Bypassable { upgrade_to, .. } => Some(upgrade_to.to_string()),
                Assessment::Unknown(s) => panic!("{s}"),
            };
            assert_eq!(got.as_deref(), *want, "{version}");
        }
    }

    #[test]
    fn each_advisory_has_its_own_fixed_release_per_line() {
        let ids = |s: &str| match assess(s) {
            Assessment::Bypassable { advisories, .. } => {
                advisories.iter().map(|a| a.id).collect::<Vec<_>>()
            }
            _ => vec![],
        };
        // The installed etcd: every one of them.
        assert_eq!(
            ids("3.4.23"),
            [
                "GHSA-rfx7-8w68-q57q",
                "GHSA-q8m4-xhhv-38mg",
                "GHSA-x35m-3gp4-4fh5",
                "GHSA-3p4g-rcw5-8298",
                "GHSA-xg4h-6gfc-h4m8"
            ]
        );
        assert_eq!(
            ids("3.4.42"),
            ["GHSA-x35m-3gp4-4fh5", "GHSA-xg4h-6gfc-h4m8"]
        );
        assert_eq!(
            ids("3.5.28"),
            ["GHSA-x35m-3gp4-4fh5", "GHSA-xg4h-6gfc-h4m8"]
        );
        assert_eq!(ids("3.5.30"), ["GHSA-xg4h-6gfc-h4m8"]);
        assert_eq!(
            ids("3.6.8"),
            [
                "GHSA-rfx7-8w68-q57q",
                "GHSA-q8m4-xhhv-38mg",
                "GHSA-x35m-3gp4-4fh5",
                "GHSA-xg4h-6gfc-h4m8"
            ]
        );
        // CVE-2023-32082 was fixed before 3.6 was released.
        assert!(!ids("3.6.0").contains(&"GHSA-3p4g-rcw5-8298"));
        assert!(ids("3.5.8").contains(&"GHSA-3p4g-rcw5-8298"));
        assert!(!ids("3.5.9").contains(&"GHSA-3p4g-rcw5-8298"));
    }

    #[test]
    fn the_message_names_the_advisories_and_the_release_to_upgrade_to() {
        let m = describe("http://etcd-1:2379", &assess("3.4.23"));
        assert!(
            m.starts_with("etcd at http://etcd-1:2379 runs 3.4.23: "),
            "{m}"
        );
        assert!(
            m.contains("GHSA-rfx7-8w68-q57q (nested transactions"),
            "{m}"
        );
        assert!(
            m.contains("upgrade etcd to 3.5.33 or later (3.4 has no release"),
            "{m}"
        );
        let m = describe("e", &assess("3.6.10"));
        assert!(
            m.contains("upgrade etcd to 3.6.14 or later") && !m.contains("has no release"),
            "{m}"
        );
        assert!(assess("garbage").bypassable());
        assert!(!assess("3.6.14").bypassable());
    }
}
