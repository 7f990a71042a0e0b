//! Connecting to etcd. Both daemons share these options so that a dead or partitioned
//! member is noticed in seconds (HTTP/2 keep-alive), and a member cut off from its
//! cluster answers "no leader" instead of serving stale data (`require_leader`).

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{EtcdConfig, EtcdTls};

/// Upper bound for one unary etcd call. Streams (watch, keep-alive) are not bounded:
/// a gRPC deadline would cut them, so callers wrap unary calls in `call()`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the TLS files named by the config. An unreadable file is an error naming it.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, etcd_client::Error> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            etcd_client::Error::IoError(std::io::Error::new(
                e.kind(),
                format!("cannot read etcd TLS file {}: {e}", path.display()),
            ))
        })
    };
    let mut opts = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
    if let Some((cert, key)) = &tls.client {
        opts = opts.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(opts)
}

/// HTTP/2 ping interval: finds a silently dead etcd connection within ~15 s, and stays
/// above etcd's default `--grpc-keepalive-min-time` of 5 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

pub fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, etcd_client::Error> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.dial_timeout)
        // etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time) with
        // GOAWAY, which killed every watch stream after ~8 s at a 2 s interval.
        .with_keep_alive(KEEPALIVE_INTERVAL, Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        opts = opts
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if let Some(tls) = &cfg.tls {
        opts = opts.with_tls(tls_options(tls)?);
    }
    Ok(opts)
}

/// Connects to the configured endpoints. Fails fast (dial timeout) when none answers;
/// callers own the retry policy.
pub async fn connect(cfg: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let fut = Client::connect(&cfg.endpoints, Some(connect_options(cfg)?));
    match tokio::time::timeout(cfg.dial_timeout + CALL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no etcd endpoint answered: {}", cfg.endpoints.join(",")),
        ))),
    }
}

/// Runs one unary etcd call with `CALL_TIMEOUT`, turning a hang into an error.
pub async fn call<T, F>(fut: F) -> Result<T, etcd_client::Error>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(etcd_client::Error::IoError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "etcd call timed out",
        ))),
    }
}
