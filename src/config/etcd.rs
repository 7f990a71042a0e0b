//! The `[etcd]` section and its flags: where the cluster is, the key prefix, auth, TLS.
//! Shared by every command that talks to etcd.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{at_least_min_timeout, Problems};
use crate::schema;

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
const DEFAULT_DIAL_TIMEOUT_MS: u64 = 2000;

/// `[etcd]` in the file, `--etcd-*` and `--prefix` on the command line: each option is
/// declared once, here, for both layers.
#[derive(Debug, Clone, Default, Deserialize, Serialize, Args)]
#[serde(deny_unknown_fields)]
pub struct EtcdOptions {
    /// etcd endpoints, comma separated.
    #[arg(
        long = "etcd-endpoints",
        env = "PORTOLAN_ETCD_ENDPOINTS",
        value_name = "URL[,URL…]",
        value_delimiter = ','
    )]
    pub endpoints: Option<Vec<String>>,
    /// Key prefix shared by registrars and watchers [default: /portolan].
    #[arg(long, env = "PORTOLAN_PREFIX", value_name = "PREFIX")]
    pub prefix: Option<String>,
    /// etcd user name (with --etcd-password-file, or the systemd credential etcd-password).
    #[arg(
        long = "etcd-username",
        env = "PORTOLAN_ETCD_USERNAME",
        value_name = "USER"
    )]
    pub username: Option<String>,
    /// File holding the etcd password of --etcd-username (its first line); refused when
    /// its group or others can read it (chmod 600). There is no password flag: a flag
    /// shows in `ps`, and a variable reaches every child process. Under systemd, a credential named `etcd-password` (`LoadCredential=`)
    /// is used when this is unset.
    #[arg(
        long = "etcd-password-file",
        env = "PORTOLAN_ETCD_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// The password itself, in the file only: prefer `password_file`, a file readable by
    /// the daemon's user alone.
    #[arg(skip)]
    pub password: Option<Secret>,
    /// Time to wait for an etcd endpoint to answer a connect, in milliseconds
    /// [default: 2000].
    #[arg(skip)]
    pub dial_timeout_ms: Option<u64>,
    /// PEM CA bundle for https:// etcd endpoints.
    #[arg(long = "etcd-ca", env = "PORTOLAN_ETCD_CA", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key), when etcd requires client certs.
    #[arg(long = "etcd-cert", env = "PORTOLAN_ETCD_CERT", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long = "etcd-key", env = "PORTOLAN_ETCD_KEY", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// A password: kept out of `Debug` output and so out of every log line.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that hands it to etcd.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The systemd credential (`LoadCredential=etcd-password:…`) read when no password
/// file is given.
const CREDENTIAL: &str = "etcd-password";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Normalised: leading slash, no trailing slash.
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub dial_timeout: Duration,
    /// TLS for https:// endpoints; None = plain http.
    pub tls: Option<EtcdTls>,
}

impl EtcdConfig {
    /// A config for tests and `portolan dev`: one endpoint, given prefix.
    pub fn local(endpoint: &str, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![endpoint.to_string()],
            prefix: schema::normalize_prefix(prefix).expect("valid prefix"),
            username: None,
            password: None,
            dial_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// Files for TLS to etcd. Read at connect time, so renewed certificates are picked up
/// on the next reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Ok when `path` cannot be read by its group or others (a missing file is left to the
/// read that follows). A password file others can read is refused, as ssh refuses such
/// a private key: the secret may already be out, and a daemon that quietly used it
/// would hide that.
pub fn private_file(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Err(format!(
            "password file {0} has mode {1:04o}: its group or others can read it, so it is refused; run chmod 600 {0} (and rotate the password if others could read it)",
            path.display(),
            m.permissions().mode() & 0o7777
        )),
        _ => Ok(()),
    }
}

impl EtcdOptions {
    /// Validates the merged options into an [`EtcdConfig`], adding every problem found.
    pub(super) fn resolve(&self, problems: &mut Problems) -> EtcdConfig {
        let endpoints: Vec<String> = self
            .endpoints
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()])
            .iter()
            .flat_map(|e| e.split(','))
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            problems.push("etcd endpoints: none given (--etcd-endpoints http://HOST:2379)".into());
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) && e.contains("://") {
                problems.push(format!(
                    "etcd endpoint {e:?}: use http://host:port or https://host:port"
                ));
            }
        }
        let raw_prefix = self.prefix.as_deref().unwrap_or(schema::DEFAULT_PREFIX);
        let prefix = schema::normalize_prefix(raw_prefix).unwrap_or_else(|e| {
            problems.push(format!("etcd prefix: {e}"));
            schema::DEFAULT_PREFIX.to_string()
        });
        let password = self.resolve_password(problems);
        // A refused or unreadable file is its own problem, not a missing password.
        if self.username.is_some() != (password.is_some() || self.password_file.is_some()) {
            problems.push(
                "etcd auth: a username needs a password and a password a username (--etcd-username with --etcd-password-file)"
                    .into(),
            );
        }
        if password.is_some() {
            for e in endpoints.iter().filter(|e| e.starts_with("http://")) {
                tracing::warn!(
                    endpoint = %e,
                    "etcd password sent over plain http:// to {e}: anyone on the path can read it; use https:// with [etcd] ca_file"
                );
            }
        }
        let tls = self.resolve_tls(&endpoints, problems);
        EtcdConfig {
            endpoints,
            prefix,
            username: self.username.clone(),
            password,
            dial_timeout: Duration::from_millis(at_least_min_timeout(
                "etcd.dial_timeout_ms",
                self.dial_timeout_ms.unwrap_or(DEFAULT_DIAL_TIMEOUT_MS),
                problems,
            )),
            tls,
        }
    }

    /// The password from `password_file`, the file's `password`, or the systemd
    /// credential, in that order.
    fn resolve_password(&self, problems: &mut Problems) -> Option<Secret> {
        if std::env::var_os("PORTOLAN_ETCD_PASSWORD").is_some() {
            problems.push(
                "PORTOLAN_ETCD_PASSWORD is not read (a variable reaches every child process): put the password in a file readable only by this daemon and pass --etcd-password-file FILE".into(),
            );
        }
        if self.password_file.is_some() && self.password.is_some() {
            problems.push("etcd: set password_file or password, not both".into());
        }
        let file = self.password_file.clone().or_else(|| {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
            let path = PathBuf::from(dir).join(CREDENTIAL);
            (self.password.is_none() && path.is_file()).then_some(path)
        });
        // systemd's credentials are private by construction; a file named here must be.
        if let Some(path) = &self.password_file {
            if let Err(e) = private_file(path) {
                problems.push(e);
                return None;
            }
        }
        match file {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => match text.lines().next().map(str::trim_end) {
                    Some(line) if !line.is_empty() => Some(Secret::new(line)),
                    _ => {
                        problems.push(format!(
                            "etcd password file {} is empty: its first line is the password",
                            path.display()
                        ));
                        None
                    }
                },
                Err(e) => {
                    problems.push(format!(
                        "cannot read the etcd password file {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
            None => self.password.clone(),
        }
    }

    fn resolve_tls(&self, endpoints: &[String], problems: &mut Problems) -> Option<EtcdTls> {
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        for path in [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
        {
            if !path.is_file() {
                problems.push(format!("etcd TLS file {} does not exist", path.display()));
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(
                "etcd TLS: cert_file and key_file go together (--etcd-cert, --etcd-key)".into(),
            );
        }
        match &self.ca_file {
            None if https > 0 => {
                problems.push(
                    "etcd endpoints use https:// but no CA is given: set [etcd] ca_file or --etcd-ca"
                        .into(),
                );
                None
            }
            None => {
                if self.cert_file.is_some() {
                    problems.push("etcd TLS: a client certificate needs ca_file (--etcd-ca) and https:// endpoints".into());
                }
                None
            }
            Some(ca_file) => {
                if https != endpoints.len() {
                    problems.push("etcd TLS: with ca_file every endpoint must be https://".into());
                }
                Some(EtcdTls {
                    ca_file: ca_file.clone(),
                    client: self.cert_file.clone().zip(self.key_file.clone()),
                })
            }
        }
    }
}
