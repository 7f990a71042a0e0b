//! etcd over TLS with client-certificate auth: the shared connection code (used by the
//! registrar, the watcher and `ls`) talks to a real etcd that demands certificates.
mod common;

use std::time::{Duration, Instant};

use common::pki::{make_pki, tls_etcd};
use common::*;
use portolan::config::EtcdTls;

#[tokio::test]
async fn etcd_connection_and_ls_work_with_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    make_pki(d);
    let (endpoint, _etcd) = tls_etcd(d, true);

    let prefix = unique_prefix("tls");
    let mut cfg = EtcdConfig::local(&endpoint, &prefix);
    cfg.tls = Some(EtcdTls {
        ca_file: d.join("ca.pem"),
        client: Some((d.join("client.pem"), d.join("client.key"))),
    });
    wait_until(
        "the TLS etcd to answer",
        Duration::from_secs(15),
        || async {
            match portolan::etcd::connect(&cfg).await {
                Ok(mut c) => c.status().await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    let mut client = portolan::etcd::connect(&cfg)
        .await
        .expect("connect over TLS");
    let key = format!("{prefix}/services/web/manual-1");
    client
        .put(key.as_str(), "127.0.0.1:9000", None)
        .await
        .expect("put over TLS");

    let ls = |extra: &[&str]| {
        let mut c = portolan_cmd();
        c.args(["ls", "--etcd-endpoints", &endpoint, "--prefix", &prefix]);
        c.args(extra);
        c.output().expect("run portolan ls")
    };
    let ca = d.join("ca.pem").display().to_string();
    let cert = d.join("client.pem").display().to_string();
    let key_file = d.join("client.key").display().to_string();
    let ok = ls(&[
        "--etcd-ca",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key_file,
    ]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("manual-1") && out.contains("127.0.0.1:9000"),
        "{out}"
    );

    // The same through the environment, as a systemd unit would pass it.
    let env = portolan_cmd()
        .args([
            "ls",
            "--json",
            "--etcd-endpoints",
            &endpoint,
            "--prefix",
            &prefix,
        ])
        .env("PORTOLAN_ETCD_CA", &ca)
        .env("PORTOLAN_ETCD_CERT", &cert)
        .env("PORTOLAN_ETCD_KEY", &key_file)
        .output()
        .expect("run portolan ls");
    assert!(
        env.status.success(),
        "{}",
        String::from_utf8_lossy(&env.stderr)
    );
    assert!(String::from_utf8_lossy(&env.stdout).contains("manual-1"));

    // No CA: refused before connecting, saying what to set.
    let no_ca = ls(&[]);
    assert!(!no_ca.status.success());
    assert!(String::from_utf8_lossy(&no_ca.stderr).contains("--etcd-ca"));

    // No client certificate: etcd refuses the handshake; ls fails instead of hanging.
    let t = Instant::now();
    let no_cert = ls(&["--etcd-ca", &ca]);
    assert!(
        !no_cert.status.success(),
        "etcd accepted a client without certificate"
    );
    assert!(t.elapsed() < Duration::from_secs(20));
}
