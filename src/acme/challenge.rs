//! HTTP-01 answers: `<prefix>/acme/challenges/<token>` holds the key authorization
//! the CA expects at `/.well-known/acme-challenge/<token>`. Every watcher with ACME on
//! watches that prefix and answers from its view on `[watcher] listen`; the default
//! template sends the path there from its front door, so the CA may reach any load
//! balancer of the fleet, whichever watcher issues.
//!
//! Why a backend to the watcher rather than an HAProxy map filled through the runtime
//! API: it needs no admin socket, no map file to keep in step across reloads, and the
//! answer comes from the same etcd view whatever HAProxy's state.
//!
//! Whoever can write the prefix chooses what the front doors answer on that one path:
//! only values that look like a key authorization are served, for tokens of the ACME
//! alphabet, bounded in size and number.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use crate::config::EtcdConfig;

/// The path prefix the CA asks under.
pub const PATH: &str = "/.well-known/acme-challenge/";
/// Longest token served (Let's Encrypt's are 43 characters).
pub const MAX_TOKEN: usize = 128;
/// Longest key authorization served (token '.' 43-character thumbprint).
pub const MAX_VALUE: usize = 256;
/// Most challenges held at once; past it, new ones are ignored (warned).
pub const MAX_CHALLENGES: usize = 1024;

/// `[A-Za-z0-9_-]{1,128}`: base64url, RFC 8555's token alphabet.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TOKEN
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// A key authorization for `token`: `<token>.<thumbprint>`, both base64url.
pub fn is_key_authorization(token: &str, value: &str) -> bool {
    value.len() <= MAX_VALUE
        && value
            .split_once('.')
            .is_some_and(|(t, thumb)| t == token && is_token(thumb))
}

/// The challenges a watcher answers: token → key authorization.
#[derive(Debug, Clone, Default)]
pub struct Answers(Arc<RwLock<BTreeMap<String, String>>>);

impl Answers {
    /// The answer for a request path, when it is a challenge path of a known token.
    pub fn answer(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(PATH)?;
        if !is_token(token) {
            return None;
        }
        self.0.read().ok()?.get(token).cloned()
    }

    pub fn has(&self, token: &str) -> bool {
        self.0.read().is_ok_and(|m| m.contains_key(token))
    }

    /// Applies one key's value (None: deleted). Refused values are logged and dropped.
    pub fn apply(&self, token: &str, value: Option<&[u8]>) {
        let Ok(mut m) = self.0.write() else { return };
        let Some(v) = value else {
            m.remove(token);
            return;
        };
        let v = std::str::from_utf8(v).unwrap_or("");
        if !is_token(token) || !is_key_authorization(token, v) {
            tracing::warn!(
                token = %token.chars().take(MAX_TOKEN).collect::<String>(),
                "acme/challenges: not a token ([A-Za-z0-9_-], at most {MAX_TOKEN}) with its key authorization (<token>.<thumbprint>, at most {MAX_VALUE} bytes): not served"
            );
            m.remove(token);
            return;
        }
        if m.len() >= MAX_CHALLENGES && !m.contains_key(token) {
            tracing::warn!(
                "acme/challenges: {MAX_CHALLENGES} challenges held already; this one is not served"
            );
            return;
        }
        m.insert(token.to_string(), v.to_string());
    }

    fn replace(&self, all: BTreeMap<String, Vec<u8>>) {
        if let Ok(mut m) = self.0.write() {
            m.clear();
        }
        for (t, v) in all {
            self.apply(&t, Some(&v));
        }
    }
}

/// Keeps `answers` in step with `<prefix>/acme/challenges/` until `shutdown`: a list,
/// then a watch from its revision; re-listed after any error.
pub async fn watch(etcd: EtcdConfig, answers: Answers, shutdown: CancellationToken) {
    let prefix = super::record::challenges_prefix(&etcd.prefix);
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&etcd, &prefix, &answers) => r,
        };
        if let Err(e) = r {
            tracing::warn!("acme challenges: etcd watch of {prefix} ended ({e}); again shortly");
        }
        if !crate::backoff::sleep_or_stop(backoff.next_delay(), &shutdown).await {
            return;
        }
    }
}

async fn session(etcd: &EtcdConfig, prefix: &str, answers: &Answers) -> anyhow::Result<()> {
    let mut client = crate::etcd::connect(etcd).await?;
    let got = crate::etcd::call(
        client.get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(MAX_CHALLENGES as i64),
            ),
        ),
    )
    .await?;
    let rev = got.header().map_or(0, |h| h.revision());
    let token = |k: &[u8]| {
        String::from_utf8_lossy(k)
            .strip_prefix(prefix)
            .unwrap_or("")
            .to_string()
    };
    answers.replace(
        got.kvs()
            .iter()
            .map(|kv| (token(kv.key()), kv.value().to_vec()))
            .collect(),
    );
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            anyhow::bail!("watch canceled (compacted?)");
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => answers.apply(&token(kv.key()), Some(kv.value())),
                EventType::Delete => answers.apply(&token(kv.key()), None),
            }
        }
    }
    anyhow::bail!("watch stream closed")
}

#[cfg(test)]
mod tests {
    use super::*;

    const THUMB: &str = "9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI";

    #[test]
    fn only_acme_tokens_with_their_key_authorization_are_served() {
        let a = Answers::default();
        a.apply("tok-1_A", Some(format!("tok-1_A.{THUMB}").as_bytes()));
        assert_eq!(
            a.answer("/.well-known/acme-challenge/tok-1_A"),
            Some(format!("tok-1_A.{THUMB}"))
        );
        let refused: &[(&str, String)] = &[
            ("tok", "other.thumb".into()),                     // another token's
            ("tok", "tok.thumb\nSet-Cookie: x".into()),        // a header injected
            ("tok", format!("tok.{}", "a".repeat(MAX_VALUE))), // too long
            ("../etc", format!("../etc.{THUMB}")),             // not a token
            ("t%2F", format!("t%2F.{THUMB}")),                 // encoded slash
            ("<b>", format!("<b>.{THUMB}")),                   // markup
        ];
        for (token, value) in refused {
            a.apply(token, Some(value.as_bytes()));
            assert!(!a.has(token), "{token} {value:?} was taken");
            assert_eq!(a.answer(&format!("{PATH}{token}")), None);
        }
        a.apply("tok-1_A", None);
        assert_eq!(a.answer("/.well-known/acme-challenge/tok-1_A"), None);
        assert_eq!(a.answer("/other/tok-1_A"), None);
    }

    #[test]
    fn a_refused_value_takes_back_an_earlier_good_one() {
        let a = Answers::default();
        a.apply("t", Some(format!("t.{THUMB}").as_bytes()));
        a.apply("t", Some(b"junk"));
        assert!(!a.has("t"));
    }

    #[test]
    fn the_number_held_is_bounded() {
        let a = Answers::default();
        for i in 0..MAX_CHALLENGES + 5 {
            let t = format!("t{i}");
            a.apply(&t, Some(format!("{t}.{THUMB}").as_bytes()));
        }
        assert_eq!(a.0.read().unwrap().len(), MAX_CHALLENGES);
    }
}
