//! The value under `<prefix>/certs/<name>`, shared with the ACME issuer (`src/acme`),
//! which writes the same shape: `{"cert", "key", "domains", "not_after", "source",
//! "issued_at"}`.

use serde::{Deserialize, Serialize};

/// Where a certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    Acme,
    Import,
}

impl CertSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CertSource::Acme => "acme",
            CertSource::Import => "import",
        }
    }
}

/// One certificate as stored. `not_after` and `issued_at` are RFC 3339 and informative:
/// what the watcher goes by is the leaf's own validity (`check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// PEM chain, leaf first, each certificate issued by the next.
    pub cert: String,
    /// PEM private key of the leaf (PKCS#8, `BEGIN PRIVATE KEY`).
    pub key: String,
    /// Host names served with it (HAProxy's SNI filters): each among the leaf's names.
    pub domains: Vec<String>,
    pub not_after: String,
    pub source: CertSource,
    pub issued_at: String,
}

pub const NAME_RULE: &str = "certificate names must match [a-z0-9][a-z0-9._-]{0,63}";

/// `[a-z0-9][a-z0-9._-]{0,63}`: the name is a file name in `certs_dir` too, so never
/// `.`, `..` or anything with a slash.
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// The etcd key of certificate `name`.
pub fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}/certs/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lower_case_file_names() {
        for ok in ["a", "www.example.com", "0-x_y", &"a".repeat(64)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            "_a",
            "A",
            "a/b",
            "a b",
            &"a".repeat(65),
            "é",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_record_reads_and_writes_the_shared_shape() {
        let json = r#"{"cert":"C","key":"K","domains":["a.example"],"not_after":"2030-01-01T00:00:00Z","source":"acme","issued_at":"2029-10-01T00:00:00Z"}"#;
        let r: Record = serde_json::from_str(json).unwrap();
        assert_eq!(r.source, CertSource::Acme);
        assert_eq!(serde_json::to_string(&r).unwrap(), json);
    }
}
