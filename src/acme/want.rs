//! Which certificates the fleet wants, which of them are due, and when a failed one
//! may be tried again. Pure: the issuer feeds it the services, the records under
//! `<prefix>/certs/` and the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// Longest wait between two tries of one certificate.
pub const MAX_RETRY: Duration = Duration::from_secs(6 * 3600);
/// Least wait after the CA said "rate limited".
pub const RATE_LIMITED_RETRY: Duration = Duration::from_secs(3600);

/// One certificate the fleet wants: its record's name and the names it covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub name: String,
    pub domains: Vec<String>,
}

/// What `<prefix>/certs/<name>` holds, as far as planning cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// A readable record: its source and what its leaf certificate says.
    Cert {
        imported: bool,
        /// The leaf's DNS names (SANs), lower case.
        domains: Vec<String>,
        not_before: SystemTime,
        not_after: SystemTime,
    },
    /// Not JSON of the record's shape, or its certificate does not parse.
    Unreadable,
}

/// Why a certificate is ordered now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Missing,
    /// The stored one lacks a name now wanted.
    NotCovering,
    /// Inside its renewal window (or expired).
    Renewal,
    Unreadable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::NotCovering => "not covering",
            Reason::Renewal => "renewal",
            Reason::Unreadable => "unreadable",
        }
    }

    /// A record was there before: the hook says `cert_renewed`, not `cert_issued`.
    pub fn replaces(self) -> bool {
        !matches!(self, Reason::Missing)
    }
}

/// Failures of one certificate so far, and when it may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    pub count: u32,
    pub retry_at: SystemTime,
}

/// The plan of one look: what to order now, what was left alone, when to look again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub due: Vec<(Wanted, Reason)>,
    /// Wanted certificates whose record is an imported one: the operator's, never
    /// overwritten.
    pub imported: Vec<String>,
    /// Due but waiting out a failure's backoff.
    pub backing_off: Vec<String>,
    /// Earliest time something becomes due (a renewal window opens, a backoff ends).
    pub next: Option<SystemTime>,
}

/// A DNS name a public CA certifies by HTTP-01: at least two dot-separated labels of
/// `[a-z0-9-]` (1 to 63, no leading or trailing '-'), 253 bytes at most, lower case.
pub fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').count() >= 2
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// `[a-z0-9][a-z0-9._-]{0,63}`: the rule of a record's name under `<prefix>/certs/`.
pub fn is_cert_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

/// The record name of a certificate whose first name is `domain`: the name itself,
/// `*` spelled `wildcard`; one longer than 64 bytes is cut and given a hash of the
/// whole, so two long names never share a record.
pub fn cert_name(domain: &str) -> String {
    let name = domain.to_ascii_lowercase().replace('*', "wildcard");
    if name.len() <= 64 {
        return name;
    }
    // FNV-1a: stable across builds and versions, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}-{:016x}", name[..47].trim_end_matches(['.', '-']), hash)
}

/// The certificates wanted: one per name, from `<service>.<domain>` for each routed
/// service (when the template sets a `domain`) and the extra `[acme] domains`. A
/// service whose host name is not a DNS name (`_` in it) gets none.
pub fn wanted<'a>(
    services: impl IntoIterator<Item = &'a str>,
    domain: Option<&str>,
    extra: &[String],
) -> Vec<Wanted> {
    let mut names = BTreeSet::new();
    if let Some(d) = domain.map(str::to_ascii_lowercase) {
        for s in services {
            let host = format!("{}.{d}", s.to_ascii_lowercase());
            if is_dns_name(&host) {
                names.insert(host);
            }
        }
    }
    names.extend(extra.iter().filter(|d| is_dns_name(d)).cloned());
    names
        .into_iter()
        .map(|n| Wanted {
            name: cert_name(&n),
            domains: vec![n],
        })
        .collect()
}

/// When a certificate enters its renewal window: `renew_before` before its not_after,
/// but at least a third of its lifetime before.
pub fn renew_at(
    not_before: SystemTime,
    not_after: SystemTime,
    renew_before: Duration,
) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let window = renew_before.min(lifetime / 3);
    not_after.checked_sub(window).unwrap_or(not_before)
}

/// What to order now.
pub fn plan(
    wanted: &[Wanted],
    existing: &BTreeMap<String, Existing>,
    failures: &BTreeMap<String, Failures>,
    renew_before: Duration,
    now: SystemTime,
) -> Plan {
    let mut p = Plan::default();
    let next = |t: SystemTime, p: &mut Plan| {
        p.next = Some(p.next.map_or(t, |n| n.min(t)));
    };
    for w in wanted {
        let reason = match existing.get(&w.name) {
            None => Some(Reason::Missing),
            Some(Existing::Unreadable) => Some(Reason::Unreadable),
            Some(Existing::Cert { imported: true, .. }) => {
                p.imported.push(w.name.clone());
                None
            }
            Some(Existing::Cert {
                domains,
                not_before,
                not_after,
                ..
            }) => {
                let at = renew_at(*not_before, *not_after, renew_before);
                if !w.domains.iter().all(|d| domains.contains(d)) {
                    Some(Reason::NotCovering)
                } else if now >= at {
                    Some(Reason::Renewal)
                } else {
                    next(at, &mut p);
                    None
                }
            }
        };
        let Some(reason) = reason else { continue };
        match failures.get(&w.name) {
            Some(f) if f.retry_at > now => {
                p.backing_off.push(w.name.clone());
                next(f.retry_at, &mut p);
            }
            _ => p.due.push((w.clone(), reason)),
        }
    }
    p
}

/// How long to wait after the `count`th failure in a row (1 = the first): `min`,
/// doubling, at most [`MAX_RETRY`]; a rate limit waits at least [`RATE_LIMITED_RETRY`].
pub fn retry_delay(count: u32, rate_limited: bool, min: Duration) -> Duration {
    let doubled = min.saturating_mul(1u32 << count.saturating_sub(1).min(20));
    let d = doubled.min(MAX_RETRY);
    if rate_limited {
        d.max(RATE_LIMITED_RETRY)
    } else {
        d
    }
}

/// The failure record after one more failure at `now`.
pub fn failed(
    before: Option<Failures>,
    rate_limited: bool,
    min: Duration,
    now: SystemTime,
) -> Failures {
    let count = before.map_or(1, |f| f.count.saturating_add(1));
    Failures {
        count,
        retry_at: now + retry_delay(count, rate_limited, min),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + DAY * days as u32 + Duration::from_secs(1_700_000_000)
    }

    fn cert(domains: &[&str], from: u64, to: u64) -> Existing {
        Existing::Cert {
            imported: false,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            not_before: t(from),
            not_after: t(to),
        }
    }

    fn want(name: &str) -> Wanted {
        Wanted {
            name: name.into(),
            domains: vec![name.into()],
        }
    }

    #[test]
    fn a_service_wants_its_host_name_and_extras_add_their_own() {
        let w = wanted(
            ["web", "api", "bad_name"],
            Some("Example.COM"),
            &["shop.example.org".into(), "web.example.com".into()],
        );
        let names: Vec<_> = w.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            ["api.example.com", "shop.example.org", "web.example.com"]
        );
        assert_eq!(w[0].domains, ["api.example.com"]);
    }

    #[test]
    fn without_a_domain_services_want_nothing() {
        // (The template's default domain, localhost, is not a domain a CA certifies:
        // the issuer passes a domain only when the template vars set one.)
        assert!(wanted(["web"], None, &[]).is_empty());
        assert_eq!(wanted(["web"], None, &["a.b".into()]).len(), 1);
    }

    #[test]
    fn record_names_follow_the_rule() {
        for (domain, name) in [
            ("web.example.com", "web.example.com"),
            ("*.example.com", "wildcard.example.com"),
        ] {
            assert_eq!(cert_name(domain), name);
            assert!(is_cert_name(name));
        }
        let long = format!("{}.example.com", "a".repeat(60));
        let other = format!("{}.example.org", "a".repeat(60));
        assert!(is_cert_name(&cert_name(&long)), "{}", cert_name(&long));
        assert_ne!(cert_name(&long), cert_name(&other));
        for bad in ["", "-x", "Web", "a/b", &"a".repeat(65)] {
            assert!(!is_cert_name(bad), "{bad}");
        }
    }

    #[test]
    fn dns_names() {
        for good in ["a.b", "web.example.com", "x-1.y2.z"] {
            assert!(is_dns_name(good), "{good}");
        }
        for bad in [
            "localhost",
            "a..b",
            "-a.b",
            "a-.b",
            "A.b",
            "a_b.c",
            "a b.c",
            "",
        ] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }

    #[test]
    fn which_certificates_are_due() {
        let rb = 30 * DAY;
        let now = t(100);
        let cases: &[(&str, Option<Existing>, Option<Reason>)] = &[
            ("no record: ordered", None, Some(Reason::Missing)),
            (
                "unreadable: ordered again",
                Some(Existing::Unreadable),
                Some(Reason::Unreadable),
            ),
            ("fresh, covering: left", Some(cert(&["w.e"], 90, 180)), None),
            (
                "covering another name only",
                Some(cert(&["x.e"], 90, 180)),
                Some(Reason::NotCovering),
            ),
            (
                "29 days left of 90: renewed",
                Some(cert(&["w.e"], 39, 129)),
                Some(Reason::Renewal),
            ),
            (
                "31 days left of 90: left",
                Some(cert(&["w.e"], 41, 131)),
                None,
            ),
            (
                "expired: renewed",
                Some(cert(&["w.e"], 0, 90)),
                Some(Reason::Renewal),
            ),
            // A 9-day certificate: renewed 3 days before its end, not 30 (a loop).
            (
                "short-lived, 4 of 9 days left: left",
                Some(cert(&["w.e"], 95, 104)),
                None,
            ),
            (
                "short-lived, 2 of 9 days left: renewed",
                Some(cert(&["w.e"], 93, 102)),
                Some(Reason::Renewal),
            ),
        ];
        for (what, existing, reason) in cases {
            let ex: BTreeMap<_, _> = existing
                .iter()
                .map(|e| ("w.e".to_string(), e.clone()))
                .collect();
            let p = plan(&[want("w.e")], &ex, &BTreeMap::new(), rb, now);
            assert_eq!(p.due.first().map(|d| d.1), *reason, "{what}");
        }
    }

    #[test]
    fn an_imported_certificate_is_never_replaced() {
        let ex = BTreeMap::from([(
            "w.e".to_string(),
            Existing::Cert {
                imported: true,
                domains: vec![],
                not_before: t(0),
                not_after: t(1),
            },
        )]);
        let p = plan(&[want("w.e")], &ex, &BTreeMap::new(), 30 * DAY, t(100));
        assert!(p.due.is_empty());
        assert_eq!(p.imported, ["w.e"]);
    }

    #[test]
    fn the_next_look_is_at_the_earliest_window_or_retry() {
        let ex = BTreeMap::from([("a.e".to_string(), cert(&["a.e"], 90, 180))]);
        let fails = BTreeMap::from([(
            "b.e".to_string(),
            Failures {
                count: 1,
                retry_at: t(101),
            },
        )]);
        let p = plan(&[want("a.e"), want("b.e")], &ex, &fails, 30 * DAY, t(100));
        assert!(p.due.is_empty());
        assert_eq!(p.backing_off, ["b.e"]);
        assert_eq!(p.next, Some(t(101)));
        // Once the retry time has come, it is due again.
        let p = plan(&[want("b.e")], &ex, &fails, 30 * DAY, t(101));
        assert_eq!(p.due, vec![(want("b.e"), Reason::Missing)]);
        // And the renewal window of a.e opens at 150.
        let p = plan(&[want("a.e")], &ex, &fails, 30 * DAY, t(100));
        assert_eq!(p.next, Some(t(150)));
    }

    #[test]
    fn failures_back_off_doubling_and_rate_limits_wait_an_hour() {
        let m = Duration::from_secs(60);
        assert_eq!(retry_delay(1, false, m), m);
        assert_eq!(retry_delay(2, false, m), 2 * m);
        assert_eq!(retry_delay(4, false, m), 8 * m);
        assert_eq!(retry_delay(40, false, m), MAX_RETRY);
        assert_eq!(retry_delay(1, true, m), RATE_LIMITED_RETRY);
        assert_eq!(retry_delay(u32::MAX, true, m), MAX_RETRY);
        let now = t(0);
        let f = failed(None, false, m, now);
        assert_eq!((f.count, f.retry_at), (1, now + m));
        let f = failed(Some(f), false, m, now);
        assert_eq!((f.count, f.retry_at), (2, now + 2 * m));
    }
}
