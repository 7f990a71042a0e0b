//! instant-acme's HTTP client over the reqwest the watcher already has for webhooks
//! (rustls, the system's roots, plus `[acme] ca_file` for a private CA): no second
//! HTTP stack or TLS verifier in the tree.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};

/// Bound on one exchange with the CA.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client(reqwest::Client);

impl Client {
    /// A client trusting the system's roots, and `ca_file`'s certificates when given.
    pub fn new(ca_file: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let mut b = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("portolan/", env!("CARGO_PKG_VERSION")))
            // The directory and its URLs are the CA's; no redirects are needed.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(f) = ca_file {
            let pem = std::fs::read(f).map_err(|e| {
                anyhow::anyhow!("acme.ca_file {}: cannot read it ({e})", f.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                anyhow::anyhow!("acme.ca_file {}: not PEM certificates ({e})", f.display())
            })?;
            if certs.is_empty() {
                anyhow::bail!(
                    "acme.ca_file {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    f.display()
                );
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        Ok(Client(b.build()?))
    }
}

impl HttpClient for Client {
    fn request(
        &self,
        req: hyper::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = match body.collect().await {
                Ok(b) => b.to_bytes(),
                Err(never) => match never {},
            };
            let req = reqwest::Request::try_from(hyper::Request::from_parts(parts, body))
                .map_err(|e| Error::Other(Box::new(e)))?;
            let resp = client
                .execute(req)
                .await
                .map_err(|e| Error::Other(Box::new(e)))?;
            Ok(BytesResponse::from(hyper::Response::<reqwest::Body>::from(
                resp,
            )))
        })
    }
}
