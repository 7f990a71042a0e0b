//! What the issuer keeps in etcd: the certificate record (the contract with the
//! certificate store, `<prefix>/certs/<name>`), the order in progress
//! (`<prefix>/acme/orders/<name>`) and the ACME account (`<prefix>/acme/account`).
//! Pure: keys, JSON shapes and what a leaf certificate says.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::want::Existing;

pub fn cert_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/certs/{name}")
}
pub fn certs_prefix(prefix: &str) -> String {
    format!("{prefix}/certs/")
}
pub fn lock_key(prefix: &str) -> String {
    format!("{prefix}/acme/lock")
}
pub fn account_key(prefix: &str) -> String {
    format!("{prefix}/acme/account")
}
pub fn order_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/acme/orders/{name}")
}
pub fn challenges_prefix(prefix: &str) -> String {
    format!("{prefix}/acme/challenges/")
}
pub fn challenge_key(prefix: &str, token: &str) -> String {
    format!("{prefix}/acme/challenges/{token}")
}

/// `<prefix>/certs/<name>`: what every front door serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// PEM chain, leaf first.
    pub cert: String,
    /// PEM private key of the leaf.
    pub key: String,
    pub domains: Vec<String>,
    /// RFC 3339.
    pub not_after: String,
    /// "acme" (this issuer) or "import" (`portolan certs import`).
    pub source: String,
    /// RFC 3339.
    pub issued_at: String,
}

/// `<prefix>/acme/orders/<name>`: an order the CA has, so a restarted or new issuer
/// finishes it instead of ordering again. `key` is the certificate's private key, made
/// with the order, so a finalize that went through before a crash still matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub url: String,
    pub domains: Vec<String>,
    pub key: String,
    /// The directory the order belongs to: an order of another CA is dropped.
    pub directory: String,
    /// RFC 3339.
    pub created_at: String,
}

/// `<prefix>/acme/account`: the ACME account, for whichever watcher issues.
#[derive(Debug, Serialize, Deserialize)]
pub struct AccountRecord {
    pub directory: String,
    #[serde(default)]
    pub email: Option<String>,
    /// instant-acme's `AccountCredentials` (id, PKCS#8 key, directory).
    pub credentials: serde_json::Value,
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What a leaf certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub domains: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn at(ts: i64) -> SystemTime {
    if ts >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// The first certificate of a PEM chain: its DNS names and validity.
pub fn leaf(chain_pem: &str) -> Result<Leaf, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
        .map_err(|e| format!("no PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let mut domains = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                domains.push(d.to_ascii_lowercase());
            }
        }
    }
    let v = cert.validity();
    Ok(Leaf {
        domains,
        not_before: at(v.not_before.timestamp()),
        not_after: at(v.not_after.timestamp()),
    })
}

/// A stored record as planning sees it: unreadable unless it is the record's JSON
/// with a certificate that parses.
pub fn existing(value: &[u8]) -> Existing {
    let Ok(r) = serde_json::from_slice::<CertRecord>(value) else {
        return Existing::Unreadable;
    };
    match leaf(&r.cert) {
        Ok(l) => Existing::Cert {
            imported: r.source != "acme",
            domains: l.domains,
            not_before: l.not_before,
            not_after: l.not_after,
        },
        // An operator's record is theirs even when broken: the store refuses it.
        Err(_) if r.source != "acme" => Existing::Cert {
            imported: true,
            domains: Vec::new(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
        },
        Err(_) => Existing::Unreadable,
    }
}

/// The record for a chain the CA issued.
pub fn issued(chain: &str, key: &str, now: SystemTime) -> Result<CertRecord, String> {
    let l = leaf(chain)?;
    Ok(CertRecord {
        cert: chain.to_string(),
        key: key.to_string(),
        domains: l.domains,
        not_after: rfc3339(l.not_after),
        source: "acme".into(),
        issued_at: rfc3339(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let k = rcgen::KeyPair::generate().unwrap();
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        (p.self_signed(&k).unwrap().pem(), k.serialize_pem())
    }

    #[test]
    fn a_record_names_the_leafs_names_and_end_and_says_acme() {
        let (cert, key) = self_signed(&["web.example.com", "Www.Example.com"]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let r = issued(&cert, &key, now).unwrap();
        assert_eq!(r.domains, ["web.example.com", "www.example.com"]);
        assert_eq!(r.source, "acme");
        assert_eq!(r.issued_at, "2027-01-15T08:00:00Z");
        // rcgen's default validity ends in 4096.
        assert!(r.not_after.starts_with("4096-01-01"), "{}", r.not_after);
        let json = serde_json::to_value(&r).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["cert", "domains", "issued_at", "key", "not_after", "source"]
        );
        match existing(json.to_string().as_bytes()) {
            Existing::Cert {
                imported, domains, ..
            } => {
                assert!(!imported);
                assert_eq!(domains, ["web.example.com", "www.example.com"]);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn unreadable_records_are_ours_to_replace_but_broken_imports_are_not() {
        assert_eq!(existing(b"not json"), Existing::Unreadable);
        let broken = |source: &str| {
            serde_json::json!({"cert": "junk", "key": "", "domains": [], "not_after": "", "source": source, "issued_at": ""})
                .to_string()
        };
        assert_eq!(existing(broken("acme").as_bytes()), Existing::Unreadable);
        assert!(matches!(
            existing(broken("import").as_bytes()),
            Existing::Cert { imported: true, .. }
        ));
        assert!(leaf("junk").is_err());
    }
}
