//! This host's own addresses, as the kernel lists them (`getifaddrs(3)`): the default
//! routing policy refuses them, so nothing written to etcd can send the front door
//! back into the load balancer (a request loop, or anything on it bound to 0.0.0.0,
//! docker0's 172.17.0.1 included). Every interface counts, up or down: an address
//! that is down now may be up at the next reload.
//!
//! Read at start and again every `REFRESH` by the source, so an address added later
//! (a new interface, a VIP moving here) is refused within that time.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// How often the source lists the interfaces again.
pub(crate) const REFRESH: Duration = Duration::from_secs(2);

/// Every address of every interface of this host → the interface's name.
pub(crate) fn list() -> std::io::Result<BTreeMap<IpAddr, String>> {
    let mut out = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address.as_ref() else {
            continue;
        };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.entry(ip).or_insert(ifa.interface_name);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_loopback_interface_is_listed() {
        let addrs = super::list().expect("getifaddrs");
        assert!(
            addrs.contains_key(&"127.0.0.1".parse().unwrap()),
            "{addrs:?}"
        );
    }
}
