//! The address this node registers its published ports at when `--advertise-ip` is not
//! set.

use std::net::IpAddr;

use anyhow::Context;

/// The local address the kernel would use to reach the first etcd endpoint: on a
/// multi-homed host that is the interface facing the cluster. A UDP connect sends
/// nothing.
pub(crate) async fn detect(endpoints: &[String]) -> anyhow::Result<IpAddr> {
    let first = endpoints
        .first()
        .context("no etcd endpoint to detect the advertise IP from: set --advertise-ip")?;
    let authority = first
        .split_once("://")
        .map_or(first.as_str(), |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:2379")
    };
    let detect = async {
        let addr = tokio::net::lookup_host(&target)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = tokio::net::UdpSocket::bind(bind).await?;
        socket.connect(addr).await?;
        Ok::<_, std::io::Error>(socket.local_addr()?.ip())
    };
    let ip = detect.await.with_context(|| {
        format!("cannot detect the advertise IP from etcd endpoint {first}: set --advertise-ip")
    })?;
    if ip.is_loopback() {
        tracing::warn!(
            advertise_ip = %ip,
            "advertise IP detected as loopback because etcd is local; other hosts cannot reach it (set --advertise-ip)"
        );
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advertise_ip_is_the_address_facing_etcd() {
        let ip = detect(&["http://127.0.0.1:2379".into()]).await.unwrap();
        assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        let ip = detect(&["127.0.0.1".into()]).await.unwrap();
        assert!(ip.is_loopback());
        assert!(detect(&[]).await.is_err());
    }
}
