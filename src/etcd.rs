//! Connecting to etcd. Both daemons share these options so that a dead or partitioned
//! member is noticed in seconds (HTTP/2 keep-alive), and a member cut off from its
//! cluster answers "no leader" instead of serving stale data (`require_leader`).

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::config::{EtcdConfig, EtcdTls};

pub mod advisory;

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
            .with_user(user.clone(), password.expose())
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

/// True when etcd says the lease does not exist (expired, revoked, or etcd lost its
/// data). etcd 3.4 answers `LeaseTimeToLive` of such a lease with this error; later
/// versions with a TTL of -1.
pub fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// Keys per page of [`list_prefix`] at most: a page of instance records (~250 bytes)
/// is then ~250 KiB.
const LIST_PAGE: i64 = 1000;

/// Bytes a page of [`list_prefix`] aims at: the next page takes as many keys as the
/// last page's average size fits in this.
const PAGE_BYTES: usize = 1024 * 1024;

/// Largest gRPC message a listing or a watch decodes (tonic's default is 4 MiB). etcd
/// takes requests up to `--max-request-bytes`, 1.5 MiB by default, so any one key and
/// value fits, with room for an operator's larger setting; pages aim far below it.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Everything under a prefix, read at one revision.
#[derive(Debug, Default)]
pub struct Listing {
    /// The revision every page was read at: watch from `revision + 1` for no gap.
    pub revision: i64,
    /// Identifies the cluster: a different id after a reconnect means etcd was replaced.
    pub cluster_id: u64,
    pub kvs: Vec<etcd_client::KeyValue>,
    /// Keys whose single key and value exceed [`MAX_MESSAGE`]: left out of `kvs`.
    pub too_large: Vec<String>,
}

impl Listing {
    /// `too_large`, as the schema errors that name them.
    pub fn too_large_errors(&self) -> Vec<crate::schema::SchemaError> {
        self.too_large
            .iter()
            .map(|key| crate::schema::SchemaError {
                key: key.clone(),
                rule: format!(
                    "key and value are over the {} MiB a listing decodes",
                    MAX_MESSAGE >> 20
                ),
            })
            .collect()
    }
}

/// True when a response was refused for its size: by our decoder past [`MAX_MESSAGE`]
/// (gRPC OUT_OF_RANGE, "decoded message length too large") or by etcd's gRPC server
/// (RESOURCE_EXHAUSTED, "trying to send message larger than max"). By code number:
/// tonic is not a direct dependency.
fn is_too_large(e: &etcd_client::Error) -> bool {
    const RESOURCE_EXHAUSTED: i32 = 8;
    const OUT_OF_RANGE: i32 = 11;
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code() as i32, OUT_OF_RANGE | RESOURCE_EXHAUSTED))
}

/// The next page's key count: as many as the last page's average key and value fit in
/// [`PAGE_BYTES`], between 1 and [`LIST_PAGE`].
fn next_limit(keys: usize, bytes: usize) -> i64 {
    if keys == 0 {
        return LIST_PAGE;
    }
    let fit = PAGE_BYTES.saturating_mul(keys) / bytes.max(1);
    (fit as i64).clamp(1, LIST_PAGE)
}

/// Lists every key under `prefix`, all at the revision of the first page, so the
/// listing is one consistent snapshot however large it is. Pages are bounded by count
/// ([`LIST_PAGE`]) and by bytes: each page is sized from the last one's average
/// ([`PAGE_BYTES`]), a page refused for its size is retried at an eighth of the keys,
/// and a single key too large to decode at all is named in `too_large` and skipped. So
/// no value a writer can put makes the listing fail. Each page is one [`call`].
pub async fn list_prefix(client: &mut Client, prefix: &str) -> Result<Listing, etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let end = prefix_end(prefix.as_bytes());
    let mut listing = Listing::default();
    let mut from = prefix.as_bytes().to_vec();
    let mut limit = LIST_PAGE;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if listing.revision > 0 {
            opts = opts.with_revision(listing.revision);
        }
        let mut resp = match call(kv.get(from.clone(), Some(opts.clone()))).await {
            Ok(r) => r,
            Err(e) if is_too_large(&e) && limit > 1 => {
                limit = (limit / 8).max(1);
                continue;
            }
            Err(e) if is_too_large(&e) => {
                // One key alone is too large: name it (keys only) and go past it.
                let r = call(kv.get(from.clone(), Some(opts.with_keys_only()))).await?;
                let Some(first) = r.kvs().first() else {
                    return Err(e);
                };
                listing
                    .too_large
                    .push(String::from_utf8_lossy(first.key()).into_owned());
                if listing.revision == 0 {
                    if let Some(h) = r.header() {
                        listing.revision = h.revision();
                        listing.cluster_id = h.cluster_id();
                    }
                }
                if !r.more() {
                    return Ok(listing);
                }
                from = first.key().to_vec();
                from.push(0);
                continue;
            }
            Err(e) => return Err(e),
        };
        if listing.revision == 0 {
            if let Some(h) = resp.header() {
                listing.revision = h.revision();
                listing.cluster_id = h.cluster_id();
            }
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        let bytes: usize = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
        limit = next_limit(kvs.len(), bytes);
        match kvs.last() {
            Some(last) if more => {
                // The next page starts just after the last key of this one.
                from = last.key().to_vec();
                from.push(0);
            }
            _ => {
                listing.kvs.extend(kvs);
                return Ok(listing);
            }
        }
        listing.kvs.extend(kvs);
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's range end
/// for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_takes_as_many_keys_as_the_last_pages_average_fits_in_a_mib() {
        // Instance records: the full count.
        assert_eq!(next_limit(1000, 250_000), LIST_PAGE);
        // Three 1.4 MiB values among small ones: one key a page.
        assert_eq!(next_limit(5, 3 * 1_468_006 + 800), 1);
        assert_eq!(next_limit(10, 10 * 64 * 1024), 16);
        assert_eq!(next_limit(0, 0), LIST_PAGE);
    }

    #[test]
    fn a_prefix_range_ends_just_past_the_prefix() {
        assert_eq!(prefix_end(b"/p/"), b"/p0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
