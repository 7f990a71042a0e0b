//! Which certificate each name serves (pure: the time is an argument).
//!
//! A new value under `certs/<name>` is judged (`certs::check`) once; a good one
//! replaces what the name served, a bad one is refused and named while the name keeps
//! serving its last good certificate (none, if it never had one). A served
//! certificate that expires meanwhile goes; a name deleted from etcd goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::certs::{self, Checked, Refusal, Refused};

/// A served certificate and the etcd value it came from.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) bytes: Arc<[u8]>,
    pub(crate) cert: Arc<Checked>,
}

/// What changed in one `judge`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Added(String),
    Renewed(String),
    Removed(String),
    /// `kept`: the name still serves its last good certificate.
    Refused {
        name: String,
        refused: Refused,
        kept: bool,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Served {
    served: BTreeMap<String, Entry>,
    /// The value last refused for each name, and why: judged once, reported once.
    refused: BTreeMap<String, (Arc<[u8]>, Refused)>,
    /// The entry each renewal replaced in this judge, for `haproxy_refused`.
    replaced: BTreeMap<String, Entry>,
}

impl Served {
    pub(crate) fn served(&self) -> &BTreeMap<String, Entry> {
        &self.served
    }

    pub(crate) fn refused(&self) -> impl Iterator<Item = (&String, &Refused)> {
        self.refused.iter().map(|(n, (_, r))| (n, r))
    }

    /// Brings the served set in line with etcd's values at `now`.
    pub(crate) fn judge(
        &mut self,
        raw: &BTreeMap<String, Arc<[u8]>>,
        now: SystemTime,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        self.replaced.clear();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let expired: Vec<String> = self
            .served
            .iter()
            .filter(|(_, e)| e.cert.not_after <= secs)
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            self.served.remove(&name);
            events.push(Event::Removed(name));
        }
        for (name, bytes) in raw {
            if self.served.get(name).is_some_and(|e| e.bytes == *bytes) {
                // etcd holds the served value again: no refusal stands.
                self.refused.remove(name);
                continue;
            }
            if self.refused.get(name).is_some_and(|(b, _)| b == bytes) {
                continue;
            }
            match certs::check(name, bytes, now) {
                Ok(cert) => {
                    self.refused.remove(name);
                    let entry = Entry {
                        bytes: bytes.clone(),
                        cert: Arc::new(cert),
                    };
                    match self.served.insert(name.clone(), entry) {
                        Some(old) => {
                            self.replaced.insert(name.clone(), old);
                            events.push(Event::Renewed(name.clone()));
                        }
                        None => events.push(Event::Added(name.clone())),
                    }
                }
                Err(refused) => {
                    self.refused
                        .insert(name.clone(), (bytes.clone(), refused.clone()));
                    events.push(Event::Refused {
                        name: name.clone(),
                        refused,
                        kept: self.served.contains_key(name),
                    });
                }
            }
        }
        let gone: Vec<String> = self
            .served
            .keys()
            .filter(|n| !raw.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.served.remove(&name);
            events.push(Event::Removed(name));
        }
        self.refused.retain(|n, _| raw.contains_key(n));
        events
    }

    /// At start: what the last run served (`files::Dir::saved`), judged now and taken
    /// as served silently, so the first `judge` keeps a name's last good certificate
    /// while etcd holds a bad one (and removes what etcd no longer has).
    pub(crate) fn seed(&mut self, saved: &BTreeMap<String, Arc<[u8]>>, now: SystemTime) {
        for (name, bytes) in saved {
            if let Ok(cert) = certs::check(name, bytes, now) {
                self.served.insert(
                    name.clone(),
                    Entry {
                        bytes: bytes.clone(),
                        cert: Arc::new(cert),
                    },
                );
            }
        }
    }

    /// HAProxy refused the certificate `name` serves now (its own parser is stricter
    /// than ours somewhere): it is refused like a bad one, and the certificate it
    /// replaced in the last `judge`, if any, is served again.
    pub(crate) fn haproxy_refused(&mut self, name: &str, answer: &str) -> Option<Event> {
        let entry = self.served.remove(name)?;
        let refused = Refused {
            reason: Refusal::Haproxy,
            detail: format!("HAProxy refused it: {answer}"),
        };
        self.refused
            .insert(name.to_string(), (entry.bytes, refused.clone()));
        let kept = match self.replaced.remove(name) {
            Some(old) => {
                self.served.insert(name.to_string(), old);
                true
            }
            None => false,
        };
        Some(Event::Refused {
            name: name.to_string(),
            refused,
            kept,
        })
    }
}

/// A checked entry for a self-signed certificate of `domains`, as tests need one.
#[cfg(test)]
pub(crate) fn test_entry(domains: &[&str]) -> Entry {
    use crate::certs::{CertSource, Record};
    let (cert, key) = crate::certs::self_signed(domains).unwrap();
    let r = Record {
        cert,
        key,
        domains: domains.iter().map(|s| s.to_string()).collect(),
        not_after: String::new(),
        source: CertSource::Import,
        issued_at: String::new(),
    };
    let bytes: Arc<[u8]> = serde_json::to_vec(&r).unwrap().into();
    let cert = crate::certs::check("x", &bytes, std::time::SystemTime::now()).unwrap();
    Entry {
        bytes,
        cert: Arc::new(cert),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{CertSource, Record};
    use std::time::Duration;

    fn value(names: &[&str], domains: &[&str]) -> Arc<[u8]> {
        let (cert, key) = certs::self_signed(names).unwrap();
        let r = Record {
            cert,
            key,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            not_after: String::new(),
            source: CertSource::Import,
            issued_at: String::new(),
        };
        serde_json::to_vec(&r).unwrap().into()
    }

    fn raw(entries: &[(&str, &Arc<[u8]>)]) -> BTreeMap<String, Arc<[u8]>> {
        entries
            .iter()
            .map(|(n, v)| (n.to_string(), (*v).clone()))
            .collect()
    }

    #[test]
    fn a_bad_renewal_is_refused_and_the_last_good_certificate_stays_served() {
        let now = SystemTime::now();
        let mut s = Served::default();
        let good = value(&["a.example"], &["a.example"]);
        assert_eq!(
            s.judge(&raw(&[("a", &good)]), now),
            [Event::Added("a".into())]
        );
        let bad = value(&["a.example"], &["b.example"]);
        let ev = s.judge(&raw(&[("a", &bad)]), now);
        assert!(
            matches!(&ev[..], [Event::Refused { name, kept: true, refused }] if name == "a" && refused.reason == Refusal::Domain),
            "{ev:?}"
        );
        assert_eq!(s.served()["a"].bytes, good);
        // Judged once: the same bad value again says nothing.
        assert_eq!(s.judge(&raw(&[("a", &bad)]), now), []);
        // The good value back in etcd: no refusal stands.
        assert_eq!(s.judge(&raw(&[("a", &good)]), now), []);
        assert_eq!(s.refused().count(), 0);
        s.judge(&raw(&[("a", &bad)]), now);
        let renewed = value(&["a.example"], &["a.example"]);
        assert_eq!(
            s.judge(&raw(&[("a", &renewed)]), now),
            [Event::Renewed("a".into())]
        );
        assert_eq!(s.refused().count(), 0);
        assert_eq!(s.judge(&raw(&[]), now), [Event::Removed("a".into())]);
        assert!(s.served().is_empty());
    }

    #[test]
    fn after_a_restart_the_last_good_certificate_stays_served_under_a_bad_value() {
        let now = SystemTime::now();
        let good = value(&["a.example"], &["a.example"]);
        let bad: Arc<[u8]> = b"{}".to_vec().into();
        let mut s = Served::default();
        s.seed(&raw(&[("a", &good), ("gone", &good)]), now);
        let ev = s.judge(&raw(&[("a", &bad)]), now);
        assert!(
            matches!(&ev[..], [Event::Refused { kept: true, .. }, Event::Removed(g)] if g == "gone"),
            "{ev:?}"
        );
        assert_eq!(s.served()["a"].bytes, good);
    }

    #[test]
    fn a_bad_first_value_serves_nothing_and_breaks_no_other_name() {
        let now = SystemTime::now();
        let mut s = Served::default();
        let good = value(&["a.example"], &["a.example"]);
        let junk: Arc<[u8]> = b"not json".to_vec().into();
        let ev = s.judge(&raw(&[("a", &good), ("b", &junk)]), now);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(matches!(&ev[1], Event::Refused { name, kept: false, .. } if name == "b"));
        assert_eq!(s.served().keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn what_haproxy_refuses_goes_and_the_certificate_it_replaced_comes_back() {
        let now = SystemTime::now();
        let mut s = Served::default();
        let v1 = value(&["a.example"], &["a.example"]);
        let v2 = value(&["a.example"], &["a.example"]);
        s.judge(&raw(&[("a", &v1)]), now);
        s.judge(&raw(&[("a", &v2)]), now);
        let ev = s.haproxy_refused("a", "unable to load").unwrap();
        assert!(matches!(ev, Event::Refused { kept: true, .. }));
        assert_eq!(s.served()["a"].bytes, v1);
        assert_eq!(s.judge(&raw(&[("a", &v2)]), now), []);
    }

    #[test]
    fn a_served_certificate_goes_when_it_expires() {
        let now = SystemTime::now();
        let mut s = Served::default();
        let v = value(&["a.example"], &["a.example"]);
        s.judge(&raw(&[("a", &v)]), now);
        // rcgen's default validity ends in 4096.
        let later = UNIX_EPOCH + Duration::from_secs(67_090_118_400);
        assert_eq!(
            s.judge(&raw(&[("a", &v)]), later)[0],
            Event::Removed("a".into())
        );
    }
}
