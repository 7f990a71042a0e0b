//! Judges a stored certificate before anything serves it (pure: the time is an
//! argument). Every rule that breaks is named, with what to do about it:
//! - the name is a valid file name (`record::is_valid_name`), the value a `Record`;
//! - `cert` is one or more PEM certificates that parse, `key` one PKCS#8 PEM key;
//! - the key is the leaf's (its public key is the leaf's subject public key);
//! - the leaf is valid now (not expired, not yet to come);
//! - the chain is in order, leaf first: each certificate names the next as its issuer
//!   and carries its signature; and it is not cut short: the last one is a CA or
//!   self-signed (a leaf alone from a CA lacks the intermediate clients need);
//! - `domains` is not empty and each is among the leaf's DNS names (RFC 6125, `domain`).

use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use super::domain::covers;
use super::record::{is_valid_name, Record, NAME_RULE};

/// Leeway for a certificate whose validity starts a little after our clock says now
/// (the issuer's clock ahead of ours).
const CLOCK_SKEW_S: i64 = 300;

/// Which rule a refused certificate broke: the `reason` label of
/// `portolan_cert_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Name,
    Json,
    NotPem,
    KeyMismatch,
    Expired,
    NotYetValid,
    Chain,
    Domain,
    /// HAProxy's runtime API refused what passed here (`watcher::tls`).
    Haproxy,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::Name,
        Refusal::Json,
        Refusal::NotPem,
        Refusal::KeyMismatch,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::Chain,
        Refusal::Domain,
        Refusal::Haproxy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Name => "name",
            Refusal::Json => "json",
            Refusal::NotPem => "not_pem",
            Refusal::KeyMismatch => "key_mismatch",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Chain => "chain",
            Refusal::Domain => "domain",
            Refusal::Haproxy => "haproxy",
        }
    }
}

/// A refused certificate: the rule and what broke it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refused {
    pub reason: Refusal,
    pub detail: String,
}

fn refused(reason: Refusal, detail: impl Into<String>) -> Refused {
    Refused {
        reason,
        detail: detail.into(),
    }
}

/// A certificate that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub name: String,
    pub record: Record,
    /// The leaf's notAfter, seconds since the epoch.
    pub not_after: i64,
    /// The leaf's DNS names.
    pub names: Vec<String>,
}

impl Checked {
    /// What HAProxy loads: the chain, then the key.
    pub fn pem(&self) -> String {
        let mut s = self.record.cert.trim_end().to_string();
        s.push('\n');
        s.push_str(self.record.key.trim_end());
        s.push('\n');
        s
    }
}

/// Judges the etcd value of `<prefix>/certs/<name>` at `now`.
pub fn check(name: &str, value: &[u8], now: SystemTime) -> Result<Checked, Refused> {
    if !is_valid_name(name) {
        return Err(refused(
            Refusal::Name,
            format!("name {name:?}: {NAME_RULE}"),
        ));
    }
    let record: Record = serde_json::from_slice(value).map_err(|e| {
        refused(
            Refusal::Json,
            format!("the value is not a certificate record ({{\"cert\", \"key\", \"domains\", \"not_after\", \"source\", \"issued_at\"}}): {e}"),
        )
    })?;
    check_record(name, record, now)
}

/// Judges a record at `now` (`portolan certs import` checks with this before writing).
pub fn check_record(name: &str, record: Record, now: SystemTime) -> Result<Checked, Refused> {
    if !is_valid_name(name) {
        return Err(refused(
            Refusal::Name,
            format!("name {name:?}: {NAME_RULE}"),
        ));
    }
    let pems = certificates(&record.cert)?;
    let chain = pems
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse_x509().map_err(|e| {
                refused(
                    Refusal::NotPem,
                    format!(
                        "certificate {} of the chain does not parse as X.509: {e}",
                        i + 1
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = &chain[0];
    key_matches(&record.key, &chain)?;
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = leaf.validity();
    let not_after = validity.not_after.timestamp();
    if not_after <= now {
        return Err(refused(
            Refusal::Expired,
            format!(
                "the certificate expired at {} ({} s ago): renew it",
                validity.not_after,
                now - not_after
            ),
        ));
    }
    if validity.not_before.timestamp() > now + CLOCK_SKEW_S {
        return Err(refused(
            Refusal::NotYetValid,
            format!("the certificate is valid only from {}", validity.not_before),
        ));
    }
    chain_in_order(&chain)?;
    let names = dns_names(leaf);
    if record.domains.is_empty() {
        return Err(refused(
            Refusal::Domain,
            format!(
                "domains is empty: list the host names it serves (the certificate's names: {})",
                names.join(", ")
            ),
        ));
    }
    for d in &record.domains {
        if !names.iter().any(|n| covers(n, d)) {
            return Err(refused(
                Refusal::Domain,
                format!(
                    "domain {d:?} is not among the certificate's names ({}): it would fail every client's check",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ),
            ));
        }
    }
    Ok(Checked {
        name: name.to_string(),
        record,
        not_after,
        names,
    })
}

fn certificates(text: &str) -> Result<Vec<Pem>, Refused> {
    let mut out = Vec::new();
    for (i, p) in Pem::iter_from_buffer(text.as_bytes()).enumerate() {
        let p = p.map_err(|e| {
            refused(
                Refusal::NotPem,
                format!(
                    "cert: PEM block {} does not read ({e}): is the file cut short?",
                    i + 1
                ),
            )
        })?;
        if p.label != "CERTIFICATE" {
            return Err(refused(
                Refusal::NotPem,
                format!(
                    "cert: PEM block {} is a {:?}, not a CERTIFICATE (the key goes in key)",
                    i + 1,
                    p.label
                ),
            ));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(refused(
            Refusal::NotPem,
            "cert holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(out)
}

fn key_matches(key: &str, chain: &[X509Certificate]) -> Result<(), Refused> {
    let label = key
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"));
    match label {
        Some("PRIVATE KEY") => {}
        Some(other @ ("RSA PRIVATE KEY" | "EC PRIVATE KEY")) => {
            return Err(refused(
                Refusal::NotPem,
                format!(
                "key is a {other}; convert it to PKCS#8: openssl pkcs8 -topk8 -nocrypt -in key.pem"
            ),
            ))
        }
        Some(other) => {
            return Err(refused(
                Refusal::NotPem,
                format!("key is a {other:?}, not an unencrypted PRIVATE KEY (PKCS#8)"),
            ))
        }
        None => {
            return Err(refused(
                Refusal::NotPem,
                "key holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
            ))
        }
    }
    let pair = rcgen::KeyPair::from_pem(key).map_err(|e| {
        refused(
            Refusal::NotPem,
            format!("key does not read as an RSA, ECDSA (P-256, P-384) or Ed25519 PKCS#8 key: {e}"),
        )
    })?;
    let is_for =
        |c: &X509Certificate| pair.public_key_raw() == &*c.public_key().subject_public_key.data;
    let leaf = &chain[0];
    if !is_for(leaf) {
        if let Some(i) = chain.iter().position(is_for) {
            return Err(refused(
                Refusal::Chain,
                format!(
                    "chain out of order: the key is certificate {}'s ({}); put the leaf first, then each issuer",
                    i + 1,
                    chain[i].subject()
                ),
            ));
        }
        return Err(refused(
            Refusal::KeyMismatch,
            format!(
                "key is not the certificate's: the leaf ({}) was issued for another key",
                leaf.subject()
            ),
        ));
    }
    Ok(())
}

fn chain_in_order(chain: &[X509Certificate]) -> Result<(), Refused> {
    for (i, pair) in chain.windows(2).enumerate() {
        let (child, parent) = (&pair[0], &pair[1]);
        if child.issuer() != parent.subject()
            || child.verify_signature(Some(parent.public_key())).is_err()
        {
            return Err(refused(
                Refusal::Chain,
                format!(
                    "chain out of order: certificate {} ({}) is not issued by certificate {} ({}); put the leaf first, then each issuer",
                    i + 1,
                    child.subject(),
                    i + 2,
                    parent.subject()
                ),
            ));
        }
    }
    let last = chain.last().expect("certificates() returns one at least");
    let self_signed = last.issuer() == last.subject();
    if !self_signed && !last.is_ca() {
        return Err(refused(
            Refusal::Chain,
            format!(
                "chain cut short: {} is issued by {}, which is not in the chain; append the intermediate certificate(s) after the leaf",
                last.subject(),
                last.issuer()
            ),
        ));
    }
    Ok(())
}

fn dns_names(leaf: &X509Certificate) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::record::CertSource;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::time::Duration;

    /// A CA, an intermediate it signed, and helpers to issue leaves.
    struct Pki {
        root: (rcgen::Certificate, KeyPair),
        inter: (rcgen::Certificate, KeyPair),
    }

    fn ca(
        name: &str,
        signer: Option<(&CertificateParams, &KeyPair)>,
    ) -> (rcgen::Certificate, KeyPair, CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = match signer {
            None => p.self_signed(&key).unwrap(),
            Some((sp, sk)) => p.signed_by(&key, &Issuer::from_params(sp, sk)).unwrap(),
        };
        (cert, key, p)
    }

    fn pki() -> (Pki, CertificateParams) {
        let (root, root_key, root_params) = ca("Test Root", None);
        let (inter, inter_key, inter_params) =
            ca("Test Intermediate", Some((&root_params, &root_key)));
        (
            Pki {
                root: (root, root_key),
                inter: (inter, inter_key),
            },
            inter_params,
        )
    }

    fn leaf(
        names: &[&str],
        issuer: (&CertificateParams, &KeyPair),
        days: (i64, i64),
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(days.0);
        p.not_after = now + time::Duration::days(days.1);
        let cert = p
            .signed_by(&key, &Issuer::from_params(issuer.0, issuer.1))
            .unwrap();
        (cert, key)
    }

    fn record(cert: String, key: String, domains: &[&str]) -> Record {
        Record {
            cert,
            key,
            domains: domains.iter().map(|s| s.to_string()).collect(),
            not_after: String::new(),
            source: CertSource::Import,
            issued_at: String::new(),
        }
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn a_good_chain_passes_and_says_when_it_ends() {
        let (pki, inter_params) = pki();
        let (l, k) = leaf(
            &["a.example", "*.b.example"],
            (&inter_params, &pki.inter.1),
            (-1, 30),
        );
        let chain = format!("{}{}", l.pem(), pki.inter.0.pem());
        let ok = check_record(
            "a",
            record(
                chain,
                k.serialize_pem(),
                &["a.example", "x.b.example", "*.b.example"],
            ),
            now(),
        )
        .unwrap();
        assert_eq!(ok.names, ["a.example", "*.b.example"]);
        let left = ok.not_after - now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((29 * 86400..=30 * 86400).contains(&left), "{left}");
        assert!(ok.pem().ends_with("-----END PRIVATE KEY-----\n"));
        // With the root too, and through JSON.
        let full = format!("{}{}{}", l.pem(), pki.inter.0.pem(), pki.root.0.pem());
        let json = serde_json::to_vec(&record(full, k.serialize_pem(), &["a.example"])).unwrap();
        assert!(check("a", &json, now()).is_ok());
    }

    #[test]
    fn a_self_signed_certificate_alone_passes() {
        let (c, k) = crate::certs::self_signed(&["localhost"]).unwrap();
        assert!(check_record("d", record(c, k, &["localhost"]), now()).is_ok());
    }

    #[test]
    fn each_bad_certificate_is_refused_with_the_rule_it_broke() {
        let (pki, inter_params) = pki();
        let (l, k) = leaf(&["a.example"], (&inter_params, &pki.inter.1), (-1, 30));
        let (_, other_key) = leaf(&["a.example"], (&inter_params, &pki.inter.1), (-1, 30));
        let (old, old_key) = leaf(&["a.example"], (&inter_params, &pki.inter.1), (-60, -1));
        let (later, later_key) = leaf(&["a.example"], (&inter_params, &pki.inter.1), (2, 30));
        let (inter, ip) = (pki.inter.0.pem(), &l.pem());
        let good_key = k.serialize_pem();
        let cut = &ip[..ip.len() / 2];
        let table: Vec<(&str, &str, Record, Refusal)> = vec![
            (
                "bad name",
                "A/b",
                record(format!("{ip}{inter}"), good_key.clone(), &["a.example"]),
                Refusal::Name,
            ),
            (
                "not PEM",
                "a",
                record("hello".into(), good_key.clone(), &["a.example"]),
                Refusal::NotPem,
            ),
            (
                "cut PEM",
                "a",
                record(cut.into(), good_key.clone(), &["a.example"]),
                Refusal::NotPem,
            ),
            (
                "key in cert",
                "a",
                record(good_key.clone(), good_key.clone(), &["a.example"]),
                Refusal::NotPem,
            ),
            (
                "no key",
                "a",
                record(format!("{ip}{inter}"), "".into(), &["a.example"]),
                Refusal::NotPem,
            ),
            (
                "key mismatch",
                "a",
                record(
                    format!("{ip}{inter}"),
                    other_key.serialize_pem(),
                    &["a.example"],
                ),
                Refusal::KeyMismatch,
            ),
            (
                "expired",
                "a",
                record(
                    format!("{}{inter}", old.pem()),
                    old_key.serialize_pem(),
                    &["a.example"],
                ),
                Refusal::Expired,
            ),
            (
                "not yet valid",
                "a",
                record(
                    format!("{}{inter}", later.pem()),
                    later_key.serialize_pem(),
                    &["a.example"],
                ),
                Refusal::NotYetValid,
            ),
            (
                "wrong domain",
                "a",
                record(format!("{ip}{inter}"), good_key.clone(), &["b.example"]),
                Refusal::Domain,
            ),
            (
                "wildcard too deep",
                "a",
                record(format!("{ip}{inter}"), good_key.clone(), &["*.a.example"]),
                Refusal::Domain,
            ),
            (
                "no domains",
                "a",
                record(format!("{ip}{inter}"), good_key.clone(), &[]),
                Refusal::Domain,
            ),
            (
                "truncated chain",
                "a",
                record(ip.clone(), good_key.clone(), &["a.example"]),
                Refusal::Chain,
            ),
            (
                "wrong order",
                "a",
                record(format!("{inter}{ip}"), good_key.clone(), &["a.example"]),
                Refusal::Chain,
            ),
            (
                "root before intermediate",
                "a",
                record(
                    format!("{ip}{}{inter}", pki.root.0.pem()),
                    good_key.clone(),
                    &["a.example"],
                ),
                Refusal::Chain,
            ),
        ];
        for (what, name, rec, want) in table {
            match check_record(name, rec, now()) {
                Ok(_) => panic!("{what}: passed"),
                Err(e) => assert_eq!(e.reason, want, "{what}: {e}"),
            }
        }
        // Wrong order where the key is the first certificate's: the key check names it.
        let e = check_record(
            "a",
            record(
                format!("{inter}{ip}"),
                pki.inter.1.serialize_pem(),
                &["a.example"],
            ),
            now(),
        )
        .unwrap_err();
        assert_eq!(e.reason, Refusal::Chain, "{e}");
    }

    #[test]
    fn a_value_that_is_not_a_record_is_refused_as_json() {
        let e = check("a", b"{\"cert\": 1}", now()).unwrap_err();
        assert_eq!(e.reason, Refusal::Json);
        assert!(e.detail.contains("certificate record"), "{e}");
    }

    #[test]
    fn expiry_is_judged_at_the_time_given() {
        let (pki, inter_params) = pki();
        let (l, k) = leaf(&["a.example"], (&inter_params, &pki.inter.1), (-1, 30));
        let rec = record(
            format!("{}{}", l.pem(), pki.inter.0.pem()),
            k.serialize_pem(),
            &["a.example"],
        );
        assert!(check_record("a", rec.clone(), now() + Duration::from_secs(29 * 86400)).is_ok());
        let e = check_record("a", rec, now() + Duration::from_secs(31 * 86400)).unwrap_err();
        assert_eq!(e.reason, Refusal::Expired);
    }
}
