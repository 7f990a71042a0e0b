//! A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and a client
//! certificate, made with the openssl command.

use std::path::Path;
use std::process::{Command, Stdio};

use super::{free_port, owned_command, Proc};

/// An etcd serving https on 127.0.0.1 with `dir`'s `server.pem` (from [`make_pki`]);
/// with `client_certs`, it also demands client certificates signed by `ca.pem`.
/// Returns its endpoint and the process (killed on drop). Not waited for: the caller
/// waits with the client config it will use.
pub fn tls_etcd(dir: &Path, client_certs: bool) -> (String, Proc) {
    let (client_port, peer_port) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = owned_command("etcd");
    cmd.current_dir(dir)
        .args(["--name", "tls", "--data-dir", "data"])
        .args([
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("tls={peer}")])
        .args(["--cert-file", "server.pem", "--key-file", "server.key"])
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if client_certs {
        cmd.args(["--trusted-ca-file", "ca.pem", "--client-cert-auth"]);
    }
    (endpoint, Proc::spawn("etcd", &mut cmd))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
pub fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=portolan-test-ca",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    for (name, usage) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), usage).expect("write ext");
        let subj = format!("/CN={name}");
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        let mut req = vec!["req", "-subj", subj.as_str()];
        req.extend(ec);
        req.extend(["-keyout", key.as_str(), "-out", csr.as_str()]);
        openssl(dir, &req);
        let (pem, ext) = (format!("{name}.pem"), format!("{name}.ext"));
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
        );
    }
}
