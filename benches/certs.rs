//! `cargo bench --bench certs`: certificate put in etcd → served by HAProxy, as a new
//! TLS handshake sees it, through a real etcd, watcher (runtime API) and HAProxy on
//! 127.0.0.1. Two rows: a renewal (`set`/`commit ssl cert`) and an addition under a new
//! name (`new ssl cert` … `add ssl crt-list`, plus the redirect's hosts entry). A fresh
//! connection is opened every millisecond until the new certificate answers; the reload
//! count is checked unchanged at the end. `--quick`: 10 of each instead of 50.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options, DOMAIN};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

struct Ca {
    root_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench root");
    let root = params.self_signed(&key).unwrap();
    Ca {
        root_pem: root.pem(),
        params,
        key,
    }
}

/// (leaf DER, etcd value) for `host`.
fn leaf(ca: &Ca, host: &str) -> (Vec<u8>, String) {
    let key = KeyPair::generate().unwrap();
    let p = CertificateParams::new(vec![host.to_string()]).unwrap();
    let cert = p
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    let value = serde_json::json!({
        "cert": format!("{}{}", cert.pem(), ca.root_pem), "key": key.serialize_pem(),
        "domains": [host], "not_after": "", "source": "import", "issued_at": "",
    });
    (cert.der().to_vec(), value.to_string())
}

async fn served(port: u16, host: &str) -> Option<Vec<u8>> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c = reqwest::Client::builder()
        .resolve(host, addr)
        .tls_info(true)
        .danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let r = c.get(format!("https://{host}:{port}/")).send().await.ok()?;
    Some(
        r.extensions()
            .get::<reqwest::tls::TlsInfo>()?
            .peer_certificate()?
            .to_vec(),
    )
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(
    etcd: &Etcd,
    fd: &FrontDoor,
    ca: &Ca,
    n: usize,
    host: impl Fn(usize) -> String,
    name: impl Fn(usize) -> String,
) -> Vec<f64> {
    let mut ms = Vec::new();
    for i in 0..n {
        let h = host(i);
        let (der, value) = leaf(ca, &h);
        let key = format!("{}/certs/{}", fd.prefix, name(i));
        let start = Instant::now();
        etcd.put(&key, &value).await;
        let port = fd.https_port;
        let took = common::when(Duration::from_secs(10), Duration::from_millis(1), || {
            let (h, der) = (h.clone(), der.clone());
            async move { served(port, &h).await.is_some_and(|d| d == der) }
        })
        .await
        .map(|_| start.elapsed())
        .expect("the certificate was not served within 10 s");
        ms.push(took.as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    ms
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // Only under `cargo bench`: a test runner listing every target (`cargo nextest run
    // --all-targets`) runs this binary too, and must get no output from it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 10 } else { 50 };
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    let backend = Backend::start("web").await;
    etcd.put(&fd.service_key("web", "1"), &backend.record())
        .await;
    wait_until("web routed", Duration::from_secs(20), || {
        fd.routes_to("web", "web")
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    let ca = ca();
    let web = format!("web.{DOMAIN}");
    let renew = measure(&etcd, &fd, &ca, n, |_| web.clone(), |_| "web".into()).await;
    let add = measure(
        &etcd,
        &fd,
        &ca,
        n,
        |i| format!("a{i}.{DOMAIN}"),
        |i| format!("a{i}"),
    )
    .await;
    let after = fd.haproxy.reloads().await;
    println!("| certificate put → served by a new handshake | p50 | p99 | max | n |");
    println!("| --- | --- | --- | --- | --- |");
    for (what, v) in [
        ("renewal (same name)", &renew),
        ("addition (new name)", &add),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            pct(v, 0.5),
            pct(v, 0.99),
            v[v.len() - 1],
            v.len()
        );
    }
    println!(
        "targets: p50 ≤ 20 ms, p99 ≤ 50 ms; HAProxy reloads during the run: {}",
        after - reloads
    );
}
