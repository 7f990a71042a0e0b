//! The self-signed certificate the watcher serves when no stored one matches: HAProxy
//! needs one certificate to start a `bind … ssl`, before etcd holds any.

/// (cert PEM, key PEM) of a fresh self-signed certificate for `names` (ECDSA P-256).
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portolan default certificate");
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
