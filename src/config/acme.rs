//! `[acme]`: certificates for the fleet from an ACME CA (Let's Encrypt, or a private
//! one such as Pebble), issued by one watcher at a time and kept in etcd.
//!
//! ```toml
//! [acme]
//! enabled = true
//! directory = "https://acme-v02.api.letsencrypt.org/directory"
//! email = "ops@example.com"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;

pub const DEFAULT_RENEW_BEFORE_DAYS: u64 = 30;
pub const DEFAULT_LOCK_TTL_S: u64 = 30;
pub const DEFAULT_RETRY_MIN_S: u64 = 60;

/// `[acme]` as written in the file (file only: no flags).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeOptions {
    /// Take part in issuing [default: false]. Every watcher that has it on answers
    /// HTTP-01 challenges on its front door; one of them at a time (the holder of
    /// `<prefix>/acme/lock`) orders.
    pub enabled: Option<bool>,
    /// The CA's ACME directory URL (https), e.g. Let's Encrypt's
    /// `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory: Option<String>,
    /// Contact address given to the CA with the account (expiry mails).
    pub email: Option<String>,
    /// PEM file of the root that signs the directory's TLS certificate, for a private
    /// ACME CA [default: the system's roots].
    pub ca_file: Option<PathBuf>,
    /// Renew this many days before a certificate's not_after [default: 30], and never
    /// later than a third of its lifetime before (a CA handing out short-lived
    /// certificates is renewed in time, not in a loop).
    pub renew_before_days: Option<u64>,
    /// Names to certify beyond those derived from services (`<service>.<domain>`, with
    /// `domain` from `[template.vars]`), one certificate each.
    pub domains: Option<Vec<String>>,
    /// Seconds the issuer's lease on `<prefix>/acme/lock` lives without a keep-alive:
    /// how long after an issuer dies another one takes over [default: 30].
    pub lock_ttl_s: Option<u64>,
    /// Seconds waited after a failed order before the next try for that certificate,
    /// doubling with each failure up to 6 hours (a CA's rate limit: at least an hour)
    /// [default: 60].
    pub retry_min_s: Option<u64>,
}

/// The validated `[acme]`, present when `enabled`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    pub directory: String,
    pub email: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub renew_before: Duration,
    /// Extra names, lower case, each its own certificate.
    pub domains: Vec<String>,
    pub lock_ttl: Duration,
    pub retry_min: Duration,
}

impl AcmeOptions {
    /// None when off. `listen` is `[watcher] listen`: the challenge answers are served
    /// there, so ACME needs it.
    pub(super) fn resolve(&self, listen: bool, problems: &mut Problems) -> Option<AcmeConfig> {
        if !self.enabled.unwrap_or(false) {
            return None;
        }
        let directory = match &self.directory {
            Some(d) if d.starts_with("https://") && d.len() > "https://".len() => d.clone(),
            Some(d) => {
                problems.push(format!(
                    "acme.directory {d:?}: must be an https:// URL, like https://acme-v02.api.letsencrypt.org/directory"
                ));
                String::new()
            }
            None => {
                problems.push("acme.enabled = true needs acme.directory, the CA's ACME directory URL (Let's Encrypt: https://acme-v02.api.letsencrypt.org/directory)".into());
                String::new()
            }
        };
        if let Some(e) = &self.email {
            let ok = e
                .split_once('@')
                .is_some_and(|(u, h)| !u.is_empty() && h.contains('.'))
                && !e
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == ',');
            if !ok {
                problems.push(format!(
                    "acme.email {e:?}: not a mail address like ops@example.com"
                ));
            }
        }
        if let Some(f) = &self.ca_file {
            if !f.is_file() {
                problems.push(format!(
                    "acme.ca_file {}: does not exist or is not a file (the PEM root of a private ACME CA)",
                    f.display()
                ));
            }
        }
        if !listen {
            problems.push("acme.enabled = true needs [watcher] listen: the watcher answers the CA's HTTP-01 challenges there, behind the front door".into());
        }
        let renew_days = self.renew_before_days.unwrap_or(DEFAULT_RENEW_BEFORE_DAYS);
        if renew_days == 0 || renew_days > 3650 {
            problems.push(format!(
                "acme.renew_before_days = {renew_days}: must be between 1 and 3650"
            ));
        }
        let mut domains = Vec::new();
        for d in self.domains.iter().flatten() {
            let lower = d.to_ascii_lowercase();
            if lower.starts_with("*.") {
                problems.push(format!(
                    "acme.domains: {d:?} is a wildcard, which needs the DNS-01 challenge; only HTTP-01 is supported: list the names"
                ));
            } else if !crate::acme::want::is_dns_name(&lower) {
                problems.push(format!(
                    "acme.domains: {d:?} is not a DNS name (letters, digits, '-', dot-separated labels, at least two)"
                ));
            } else if !domains.contains(&lower) {
                domains.push(lower);
            }
        }
        let lock_ttl = self.lock_ttl_s.unwrap_or(DEFAULT_LOCK_TTL_S);
        if !(2..=3600).contains(&lock_ttl) {
            problems.push(format!(
                "acme.lock_ttl_s = {lock_ttl}: must be between 2 and 3600 (seconds)"
            ));
        }
        let retry_min = self.retry_min_s.unwrap_or(DEFAULT_RETRY_MIN_S);
        if !(1..=86_400).contains(&retry_min) {
            problems.push(format!(
                "acme.retry_min_s = {retry_min}: must be between 1 and 86400 (seconds)"
            ));
        }
        Some(AcmeConfig {
            directory,
            email: self.email.clone(),
            ca_file: self.ca_file.clone(),
            renew_before: Duration::from_secs(renew_days.clamp(1, 3650) * 86_400),
            domains,
            lock_ttl: Duration::from_secs(lock_ttl.clamp(2, 3600)),
            retry_min: Duration::from_secs(retry_min.clamp(1, 86_400)),
        })
    }
}

/// Where the front door sends `/.well-known/acme-challenge/`: the watcher's `listen`,
/// a wildcard address spelled as loopback (HAProxy and the watcher share the host).
/// Templates see it as `vars.acme_challenge_server` unless the file sets that var.
pub fn challenge_server(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut a = listen;
    match a.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into())
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            a.set_ip(std::net::Ipv6Addr::LOCALHOST.into())
        }
        _ => {}
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml_text: &str, listen: bool) -> Result<Option<AcmeConfig>, Vec<String>> {
        let o: AcmeOptions = toml::from_str(toml_text).map_err(|e| vec![e.to_string()])?;
        let mut p = Vec::new();
        let c = o.resolve(listen, &mut p);
        if p.is_empty() {
            Ok(c)
        } else {
            Err(p)
        }
    }

    #[test]
    fn the_challenge_server_is_the_listen_address_wildcards_as_loopback() {
        for (listen, server) in [
            ("0.0.0.0:9477", "127.0.0.1:9477"),
            ("[::]:9477", "[::1]:9477"),
            ("10.0.0.5:9477", "10.0.0.5:9477"),
        ] {
            assert_eq!(
                challenge_server(listen.parse().unwrap()).to_string(),
                server
            );
        }
    }

    #[test]
    fn off_unless_enabled() {
        assert_eq!(resolve("", true), Ok(None));
        assert_eq!(
            resolve("enabled = false\ndirectory = \"x\"", true),
            Ok(None)
        );
    }

    #[test]
    fn lets_encrypt_in_three_keys_with_the_defaults() {
        let c = resolve(
            "enabled = true\ndirectory = \"https://acme-v02.api.letsencrypt.org/directory\"\nemail = \"ops@example.com\"",
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.renew_before, Duration::from_secs(30 * 86_400));
        assert_eq!(c.lock_ttl, Duration::from_secs(30));
        assert_eq!(c.retry_min, Duration::from_secs(60));
        assert!(c.domains.is_empty());
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let err = resolve(
            "enabled = true\ndirectory = \"http://ca\"\nemail = \"nobody\"\nrenew_before_days = 0\ndomains = [\"*.example.com\", \"bad name\", \"Shop.Example.com\"]\nlock_ttl_s = 1\nretry_min_s = 0\nca_file = \"/nonexistent/root.pem\"",
            false,
        )
        .unwrap_err();
        let all = err.join("\n");
        for key in [
            "acme.directory",
            "acme.email",
            "acme.renew_before_days",
            "wildcard",
            "\"bad name\" is not a DNS name",
            "acme.lock_ttl_s",
            "acme.retry_min_s",
            "acme.ca_file",
            "[watcher] listen",
        ] {
            assert!(all.contains(key), "{key} missing from:\n{all}");
        }
        assert_eq!(err.len(), 9, "{all}");
    }

    #[test]
    fn a_missing_directory_says_where_to_find_one() {
        let err = resolve("enabled = true", true).unwrap_err();
        assert!(err[0].contains("needs acme.directory"), "{err:?}");
    }

    #[test]
    fn names_are_lower_cased_and_deduplicated() {
        let c = resolve(
            "enabled = true\ndirectory = \"https://ca/dir\"\ndomains = [\"Shop.Example.com\", \"shop.example.com\"]",
            true,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.domains, vec!["shop.example.com".to_string()]);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = resolve("enabled = true\nrenew_days = 3", true).unwrap_err();
        assert!(err[0].contains("renew_days"), "{err:?}");
    }
}
