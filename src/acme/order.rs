//! The ACME exchange for one certificate (I/O): the account from etcd (or a new one),
//! the order (resumed from `<prefix>/acme/orders/<name>` when one is in progress),
//! HTTP-01 through `<prefix>/acme/challenges/`, finalize, download.

use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Client, GetOptions, TxnOp};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use super::challenge::Answers;
use super::election::Held;
use super::record::{self, AccountRecord, OrderRecord};
use super::want::Wanted;
use crate::config::AcmeConfig;
use crate::etcd;

/// How long the issuer waits for its own watch to show a challenge it put, before it
/// tells the CA to look: every watcher sees the same etcd revisions, so its own view is
/// a fair sign the others have it too.
const VISIBLE: Duration = Duration::from_secs(10);
/// Then this much more, for the other watchers' watches (a few ms behind in practice).
const SETTLE: Duration = Duration::from_millis(300);
/// Polling of an order until the CA validated it, and until it issued.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// Why one certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("this watcher no longer holds the issuer's lock")]
    NotIssuer,
    #[error("{0}")]
    Other(String),
}

impl Failure {
    /// The CA said "too many": back off for longer.
    pub fn rate_limited(&self) -> bool {
        match self {
            Failure::Acme(instant_acme::Error::Api(p)) => p
                .r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":rateLimited")),
            _ => false,
        }
    }
}

/// The account of `<prefix>/acme/account`, or a new one written there.
pub async fn account(
    cfg: &AcmeConfig,
    etcd_client: &mut Client,
    held: &Held,
    prefix: &str,
) -> Result<Account, Failure> {
    let key = record::account_key(prefix);
    let got = etcd::call(etcd_client.get(key.as_str(), None)).await?;
    if let Some(kv) = got.kvs().first() {
        match serde_json::from_slice::<AccountRecord>(kv.value()) {
            Ok(r) if r.directory == cfg.directory => {
                let creds: AccountCredentials = serde_json::from_value(r.credentials)
                    .map_err(|e| Failure::Other(format!("{key}: credentials unreadable ({e})")))?;
                let http = super::http::Client::new(cfg.ca_file.as_deref())
                    .map_err(|e| Failure::Other(e.to_string()))?;
                return Ok(Account::builder_with_http(Box::new(http))
                    .from_credentials(creds)
                    .await?);
            }
            Ok(r) => tracing::warn!(
                "acme: {key} is an account of {} , not of acme.directory {}: making a new one",
                r.directory,
                cfg.directory
            ),
            Err(e) => tracing::warn!("acme: {key} unreadable ({e}): making a new account"),
        }
    }
    let http = super::http::Client::new(cfg.ca_file.as_deref())
        .map_err(|e| Failure::Other(e.to_string()))?;
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = Account::builder_with_http(Box::new(http))
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await?;
    let rec = AccountRecord {
        directory: cfg.directory.clone(),
        email: cfg.email.clone(),
        credentials: serde_json::to_value(&creds)
            .map_err(|e| Failure::Other(format!("account credentials: {e}")))?,
    };
    let value = serde_json::to_string(&rec).map_err(|e| Failure::Other(e.to_string()))?;
    if !held
        .write(etcd_client, vec![TxnOp::put(key, value, None)])
        .await?
    {
        return Err(Failure::NotIssuer);
    }
    tracing::info!(directory = %cfg.directory, "acme: account created and kept in etcd");
    Ok(account)
}

/// What one call of [`obtain`] did.
pub struct Obtained {
    pub chain: String,
    pub key: String,
    /// The order was picked up from etcd (another issuer's, or before a restart).
    pub resumed: bool,
}

/// Counts for `portolan_acme_orders_total`, reported as they happen.
pub trait Progress: Sync {
    fn order(&self, result: &'static str);
}

/// What every order of one term as issuer shares.
pub struct Session<'a> {
    pub cfg: &'a AcmeConfig,
    pub account: &'a Account,
    pub held: &'a Held,
    pub prefix: &'a str,
    pub answers: &'a Answers,
    pub progress: &'a (dyn Progress + Sync),
}

/// One certificate, from an order in progress or a new one.
pub async fn obtain(
    s: &Session<'_>,
    etcd_client: &mut Client,
    want: &Wanted,
) -> Result<Obtained, Failure> {
    let (mut order, key_pem, was_resumed) = resume_or_order(s, etcd_client, want).await?;
    let tokens = answer_challenges(s, etcd_client, &mut order).await?;
    let result = finish(&mut order, &key_pem, want).await;
    // The answers are of no use once the CA decided.
    let dels: Vec<TxnOp> = tokens
        .iter()
        .map(|t| TxnOp::delete(record::challenge_key(s.prefix, t), None))
        .collect();
    if !dels.is_empty() {
        let _ = s.held.write(etcd_client, dels).await;
    }
    let chain = result?;
    Ok(Obtained {
        chain,
        key: key_pem,
        resumed: was_resumed,
    })
}

/// The order in progress for `want` (stored in etcd by this or an earlier issuer, and
/// still alive at the CA), or a new one, stored with its certificate's key before
/// anything else happens. Answers the order, the key's PEM and whether it was resumed.
async fn resume_or_order(
    s: &Session<'_>,
    etcd_client: &mut Client,
    want: &Wanted,
) -> Result<(instant_acme::Order, String, bool), Failure> {
    let Session {
        cfg,
        account,
        held,
        prefix,
        progress,
        ..
    } = *s;
    let okey = record::order_key(prefix, &want.name);
    let stored = etcd::call(etcd_client.get(okey.as_str(), None))
        .await?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<OrderRecord>(kv.value()).ok())
        .filter(|r| r.domains == want.domains && r.directory == cfg.directory);
    let mut resumed = None;
    if let Some(r) = stored {
        match account.order(r.url.clone()).await {
            Ok(mut o) => {
                if matches!(o.state().status, OrderStatus::Invalid) {
                    tracing::info!(cert = %want.name, "acme: the stored order went invalid: a new one");
                } else {
                    tracing::info!(cert = %want.name, order = %r.url, "acme: resuming the order in progress");
                    progress.order("resumed");
                    resumed = Some((o, r.key));
                }
            }
            Err(e) => {
                tracing::info!(cert = %want.name, "acme: the stored order is gone ({e}): a new one")
            }
        }
    }
    let was_resumed = resumed.is_some();
    let (order, key_pem) = match resumed {
        Some(pair) => pair,
        None => {
            let ids: Vec<Identifier> = want.domains.iter().cloned().map(Identifier::Dns).collect();
            let order = account.new_order(&NewOrder::new(&ids)).await?;
            progress.order("created");
            let key = rcgen::KeyPair::generate()
                .map_err(|e| Failure::Other(format!("key: {e}")))?
                .serialize_pem();
            let rec = OrderRecord {
                url: order.url().to_string(),
                domains: want.domains.clone(),
                key: key.clone(),
                directory: cfg.directory.clone(),
                created_at: record::rfc3339(SystemTime::now()),
            };
            let value = serde_json::to_string(&rec).map_err(|e| Failure::Other(e.to_string()))?;
            if !held
                .write(etcd_client, vec![TxnOp::put(okey.as_str(), value, None)])
                .await?
            {
                return Err(Failure::NotIssuer);
            }
            tracing::info!(cert = %want.name, order = %order.url(), "acme: ordered");
            (order, key)
        }
    };
    Ok((order, key_pem, was_resumed))
}

/// Puts the answer to each pending HTTP-01 challenge of `order` in etcd, waits (bounded)
/// until this watcher's own view serves them, then tells the CA to look. Answers the
/// tokens put, to remove once the CA decided.
async fn answer_challenges(
    s: &Session<'_>,
    etcd_client: &mut Client,
    order: &mut instant_acme::Order,
) -> Result<Vec<String>, Failure> {
    let Session {
        held,
        prefix,
        answers,
        ..
    } = *s;
    let mut tokens = Vec::new();
    if matches!(order.state().status, OrderStatus::Pending) {
        let mut ready = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(a) = authorizations.next().await {
            let mut authz = a?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Failure::Other(format!(
                        "authorization for {} is {other:?}",
                        authz.identifier()
                    )))
                }
            }
            let challenge = authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| Failure::Other("the CA offers no http-01 challenge".into()))?;
            let token = challenge.token.clone();
            let value = challenge.key_authorization().as_str().to_string();
            if !super::challenge::is_token(&token)
                || !super::challenge::is_key_authorization(&token, &value)
            {
                return Err(Failure::Other(format!(
                    "the CA's token {token:?} is not of the ACME alphabet"
                )));
            }
            ready.push((token, value, challenge.url.clone()));
        }
        for (token, value, _) in &ready {
            let k = record::challenge_key(prefix, token);
            if !held
                .write(etcd_client, vec![TxnOp::put(k, value.as_str(), None)])
                .await?
            {
                return Err(Failure::NotIssuer);
            }
            tokens.push(token.clone());
        }
        let deadline = Instant::now() + VISIBLE;
        while !tokens.iter().all(|t| answers.has(t)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(SETTLE).await;
        // Tell the CA to look, challenge by challenge (the handles borrow the order).
        let mut authorizations = order.authorizations();
        while let Some(a) = authorizations.next().await {
            let mut authz = a?;
            if !matches!(authz.status, AuthorizationStatus::Pending) {
                continue;
            }
            if let Some(mut c) = authz.challenge(ChallengeType::Http01) {
                c.set_ready().await?;
            }
        }
    }
    Ok(tokens)
}

/// Waits for the CA's validation, finalizes with a CSR of `key_pem`, downloads.
async fn finish(
    order: &mut instant_acme::Order,
    key_pem: &str,
    want: &Wanted,
) -> Result<String, Failure> {
    if matches!(order.state().status, OrderStatus::Pending) {
        let status = order.poll_ready(&POLL).await?;
        if status != OrderStatus::Ready {
            return Err(Failure::Other(format!("the order went {status:?}")));
        }
    }
    if matches!(order.state().status, OrderStatus::Ready) {
        let key = rcgen::KeyPair::from_pem(key_pem)
            .map_err(|e| Failure::Other(format!("the order's key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(want.domains.clone())
            .map_err(|e| Failure::Other(format!("CSR: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| Failure::Other(format!("CSR: {e}")))?;
        order.finalize_csr(csr.der()).await?;
    }
    Ok(order.poll_certificate(&POLL).await?)
}

/// Every record under `<prefix>/certs/`, by name.
pub async fn stored_certs(
    client: &mut Client,
    prefix: &str,
) -> Result<std::collections::BTreeMap<String, Vec<u8>>, etcd_client::Error> {
    let p = record::certs_prefix(prefix);
    let got = etcd::call(client.get(p.as_str(), Some(GetOptions::new().with_prefix()))).await?;
    Ok(got
        .kvs()
        .iter()
        .filter_map(|kv| {
            let k = String::from_utf8_lossy(kv.key());
            let name = k.strip_prefix(&p)?;
            Some((name.to_string(), kv.value().to_vec()))
        })
        .collect())
}
