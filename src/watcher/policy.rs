//! The routing policy: which addresses the front door may send traffic to.
//!
//! Anyone who can write an instance key chooses where HAProxy connects. Left open, a key
//! at 127.0.0.1 would aim the front door at the load balancer itself (its stats page,
//! its admin socket's TCP twin, etcd), and one at 169.254.169.254 at the cloud metadata
//! service. So an instance is routed only when its address passes this policy:
//! `[watcher] allowed_networks` when set (the operator's whole list), else everything
//! but loopback, link-local, unspecified, multicast and broadcast addresses, the cloud
//! metadata services outside link-local (`fd00:ec2::254`, `100.100.100.200`,
//! `168.63.129.16`), the load balancer's own addresses (this host's interfaces, and the
//! front door's bind addresses from the templates' vars), and every IPv6 spelling of a
//! refused IPv4 address (mapped, compatible, NAT64, 6to4).
//!
//! Pure: `check(host, resolution, policy)` decides from the host as written, what it
//! resolved to (the caller resolves, off the render path: `resolve`), and the policy.
//! The host's interface addresses are data too: the caller lists them
//! (`interfaces::list`) and hands them in (`set_host_addresses`).
//! A host HAProxy would read as an address — including the forms libc's `inet_aton`
//! accepts, such as `127.1`, `2130706433` or `0x7f000001` — is judged as that address,
//! never as a name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use super::confine::Confinement;

/// An IPv4 or IPv6 network, `10.0.0.0/8` or `fd00::/8`. Host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Cidr {
        Cidr {
            net: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            len,
        }
    }

    fn v6(s: &str, len: u8) -> Cidr {
        Cidr {
            net: IpAddr::V6(s.parse().expect("a constant IPv6 network")),
            len,
        }
    }

    /// True when `ip` lies in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:127.0.0.1`) is the IPv4 address it maps.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_bits(u32::from(a).into(), 32, self.len)
                    == prefix_bits(u32::from(n).into(), 32, self.len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix_bits(u128::from(a), 128, self.len)
                    == prefix_bits(u128::from(n), 128, self.len)
            }
            _ => false,
        }
    }
}

/// The top `len` bits of a `width`-bit number.
fn prefix_bits(x: u128, width: u8, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        x >> (width - len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (ip, len) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not a network: expected a CIDR like 10.0.0.0/8 or fd00::/8")
        })?;
        let net: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 or IPv6 address"))?;
        let width: u8 = if net.is_ipv4() { 32 } else { 128 };
        let len: u8 = len.parse().ok().filter(|l| *l <= width).ok_or_else(|| {
            format!("{s:?}: prefix length {len:?} is not a number in 0..={width}")
        })?;
        let bits = match net {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let host_mask = if len == width {
            0
        } else {
            (1u128 << (width - len)) - 1
        };
        if bits & host_mask != 0 {
            return Err(format!(
                "{s:?} has host bits set: write the network address (e.g. 10.0.0.0/8)"
            ));
        }
        Ok(Cidr { net, len })
    }
}

/// Where instances may point, and (`confine`) which keys may say so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `[watcher] allowed_networks`; None = the default (see `denied_by_default`).
    allowed: Option<Vec<Cidr>>,
    /// The front door's own bind addresses, from the templates' `vars` (config).
    binds: BTreeSet<IpAddr>,
    /// This host's interface addresses → interface name, as the kernel last listed them
    /// (the caller reads them: `interfaces`).
    host: BTreeMap<IpAddr, String>,
    /// `[watcher] services`, `hand_written`, `node_networks`: judged before the address.
    confinement: Confinement,
}

/// What the default policy refuses, and why, in the words of the warning.
fn denied_by_default() -> Vec<(Cidr, &'static str)> {
    vec![
        (Cidr::v4(127, 0, 0, 0, 8), "loopback"),
        (Cidr::v6("::1", 128), "loopback"),
        // Cloud metadata services (169.254.169.254) live here.
        (Cidr::v4(169, 254, 0, 0, 16), "link-local"),
        (Cidr::v6("fe80::", 10), "link-local"),
        // Linux connects 0.0.0.0 to the local host; the rest of 0/8 is not routable.
        (Cidr::v4(0, 0, 0, 0, 8), "unspecified"),
        (Cidr::v6("::", 128), "unspecified"),
        (Cidr::v4(224, 0, 0, 0, 4), "multicast"),
        (Cidr::v6("ff00::", 8), "multicast"),
        (Cidr::v4(255, 255, 255, 255, 32), "broadcast"),
        // Metadata services outside link-local: they hand out the host's credentials.
        (
            Cidr::v6("fd00:ec2::254", 128),
            "the AWS instance metadata service (IPv6)",
        ),
        (
            Cidr::v4(100, 100, 100, 200, 32),
            "the Alibaba Cloud metadata service",
        ),
        (
            Cidr::v4(168, 63, 129, 16, 32),
            "the Azure platform endpoint (WireServer)",
        ),
    ]
}

/// The IPv4 address an IPv6 one stands for, and the name of that spelling: mapped
/// (`::ffff:a.b.c.d`, the kernel connects to the IPv4 address), compatible
/// (`::a.b.c.d`, deprecated but still parsed), NAT64 (`64:ff9b::a.b.c.d`, a NAT64
/// gateway connects to it) and 6to4 (`2002:aabb:ccdd::`, a 6to4 relay does).
fn embedded_v4(ip: IpAddr) -> Option<(Ipv4Addr, &'static str)> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some((v4, "an IPv4-mapped"));
    }
    let bits = u128::from(v6);
    match bits >> 32 {
        0 => return Some((Ipv4Addr::from(bits as u32), "an IPv4-compatible")),
        0x0064_ff9b_0000_0000_0000_0000 => {
            return Some((Ipv4Addr::from(bits as u32), "a NAT64 (64:ff9b::/96)"))
        }
        _ => {}
    }
    (bits >> 112 == 0x2002).then(|| (Ipv4Addr::from((bits >> 80) as u32), "a 6to4 (2002::/16)"))
}

impl Policy {
    /// `allowed_networks`; None for the default policy.
    pub fn new(allowed: Option<Vec<Cidr>>) -> Policy {
        Policy {
            allowed,
            ..Policy::default()
        }
    }

    /// The front door's bind addresses (refused by the default policy).
    pub fn with_bind_addresses(mut self, binds: impl IntoIterator<Item = IpAddr>) -> Policy {
        self.binds = binds.into_iter().map(|ip| ip.to_canonical()).collect();
        self
    }

    /// This host's interface addresses (address → interface), refused by the default
    /// policy; replaces the last set. True when it changed.
    pub fn set_host_addresses(&mut self, host: BTreeMap<IpAddr, String>) -> bool {
        let host: BTreeMap<IpAddr, String> = host
            .into_iter()
            .map(|(ip, name)| (ip.to_canonical(), name))
            .collect();
        let changed = host != self.host;
        self.host = host;
        changed
    }

    /// This policy with `confinement` in place of the default one.
    pub fn with_confinement(self, confinement: Confinement) -> Policy {
        Policy {
            confinement,
            ..self
        }
    }

    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// Ok, or the rule `ip` breaks.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let Some(nets) = &self.allowed else {
            return self.check_default(ip);
        };
        if nets.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        Err(format!(
            "{ip} is outside [watcher] allowed_networks ({})",
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// The default policy: `ip` is refused when it, or the IPv4 address it spells, is on
    /// the deny list or an address of the load balancer itself.
    fn check_default(&self, ip: IpAddr) -> Result<(), String> {
        let why = match (self.denied(ip), embedded_v4(ip)) {
            (Some(what), _) => format!("{ip} is {what}"),
            (None, Some((v4, form))) => match self.denied(IpAddr::V4(v4)) {
                Some(what) => format!("{ip} is {form} spelling of {v4}, which is {what}"),
                None => return Ok(()),
            },
            (None, None) => return Ok(()),
        };
        Err(format!(
            "{why}, which the default routing policy refuses; list the networks your \
             backends live in under [watcher] allowed_networks to route it"
        ))
    }

    /// What `ip` is, when the default policy denies it as written.
    fn denied(&self, ip: IpAddr) -> Option<String> {
        if let Some((net, what)) = denied_by_default()
            .into_iter()
            .find(|(n, _)| n.contains(ip))
        {
            return Some(format!("{what} ({net})"));
        }
        let ip = ip.to_canonical();
        if let Some(name) = self.host.get(&ip) {
            return Some(format!(
                "this host's own address (interface {name}): the front door would route to itself"
            ));
        }
        self.binds
            .contains(&ip)
            .then(|| "a front door bind address (a [template.vars] *bind* value)".to_string())
    }
}

/// What a host name resolved to, as far as the caller knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Not looked up yet.
    Pending,
    /// The last lookup failed (or timed out), with the reason.
    Failed(String),
    Resolved(Vec<IpAddr>),
}

/// The verdict on one instance's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Left out: the rule it broke.
    Denied(String),
    /// Left out until its name resolves: why it has not.
    Unresolved(String),
    /// Left out until the first lookup answers (milliseconds; not worth a warning).
    Pending,
}

/// Judges `host` (an IP address or DNS name, as `schema::Addr` accepts it). For a name,
/// `resolution` is what it resolved to: it is routed only when every address it
/// resolves to is allowed, since HAProxy may connect to any of them.
pub fn check(host: &str, resolution: &Resolution, policy: &Policy) -> Verdict {
    if let Some(ip) = literal(host) {
        return match policy.check_ip(ip) {
            Ok(()) => Verdict::Allowed,
            Err(rule) if ip.to_string() == host => Verdict::Denied(rule),
            Err(rule) => Verdict::Denied(format!("host {host:?} means {ip}: {rule}")),
        };
    }
    match resolution {
        Resolution::Pending => Verdict::Pending,
        Resolution::Failed(why) => Verdict::Unresolved(format!(
            "host name {host:?} does not resolve ({why}); retried in the background"
        )),
        Resolution::Resolved(ips) if ips.is_empty() => Verdict::Unresolved(format!(
            "host name {host:?} resolves to no address; retried in the background"
        )),
        Resolution::Resolved(ips) => {
            for ip in ips {
                if let Err(rule) = policy.check_ip(*ip) {
                    return Verdict::Denied(format!("host name {host:?} resolves to {rule}"));
                }
            }
            Verdict::Allowed
        }
    }
}

/// The address `host` denotes without DNS: an IPv4 or IPv6 literal, or one of the
/// IPv4 forms libc's `inet_aton` (and so HAProxy's resolver) accepts. None = a name.
pub fn literal(host: &str) -> Option<IpAddr> {
    let h = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    h.parse::<IpAddr>()
        .ok()
        .or_else(|| inet_aton(h).map(IpAddr::V4))
}

/// `inet_aton(3)`: one to four parts separated by dots, each decimal, octal (leading
/// `0`) or hex (`0x`); the last part fills the remaining bytes: `127.1` is 127.0.0.1,
/// `2130706433` and `0x7f000001` and `017700000001` are too.
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts.iter().map(|p| aton_part(p)).collect::<Option<_>>()?;
    let (last, head) = nums.split_last()?;
    if head.iter().any(|n| *n > 0xff) {
        return None;
    }
    let rest_bits = 8 * (4 - head.len() as u32);
    if *last >= 1u64 << rest_bits {
        return None;
    }
    let mut v: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        v |= n << (24 - 8 * i as u32);
    }
    Some(Ipv4Addr::from((v | last) as u32))
}

fn aton_part(p: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() || digits.len() > 12 || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn host(addrs: &[(&str, &str)]) -> BTreeMap<IpAddr, String> {
        addrs.iter().map(|(a, n)| (ip(a), n.to_string())).collect()
    }

    #[test]
    fn inet_aton_reads_every_form_libc_reads() {
        for form in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "017700000001",
            "0177.0.0.1",
            "0x7f.1",
        ] {
            assert_eq!(inet_aton(form), Some(Ipv4Addr::LOCALHOST), "{form}");
        }
        assert_eq!(
            inet_aton("169.254.43518"),
            Some(Ipv4Addr::new(169, 254, 169, 254))
        );
        assert_eq!(inet_aton("0"), Some(Ipv4Addr::UNSPECIFIED));
        for name in [
            "",
            "web",
            "app.internal",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.256",
            "1.16777216",
            "4294967296",
            "08",
            "0x",
            "1..2",
            "127.1.",
            "1e3",
        ] {
            assert_eq!(inet_aton(name), None, "{name}");
        }
    }

    #[test]
    fn the_default_policy_refuses_the_load_balancer_itself_and_metadata() {
        let p = Policy::default();
        let none = Resolution::Pending;
        for host in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "017700000001",
            "127.255.255.254",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            assert!(
                matches!(check(host, &none, &p), Verdict::Denied(_)),
                "{host}: {:?}",
                check(host, &none, &p)
            );
        }
        for host in ["10.0.0.1", "192.168.1.1", "8.8.8.8", "fd00::5", "10.1"] {
            assert_eq!(check(host, &none, &p), Verdict::Allowed, "{host}");
        }
        let Verdict::Denied(rule) = check("127.1", &none, &p) else {
            unreachable!()
        };
        assert!(
            rule.contains("127.0.0.1") && rule.contains("loopback"),
            "{rule}"
        );
        assert!(rule.contains("allowed_networks"), "{rule}");
    }

    /// Every spelling of a denied address that reaches it: cloud metadata services
    /// outside link-local, and IPv4 addresses written as IPv6 (mapped, compatible,
    /// NAT64, 6to4), which the kernel or a NAT64 gateway turns back into the IPv4 one.
    #[test]
    fn the_default_policy_refuses_every_spelling_of_metadata_and_loopback() {
        let p = Policy::default();
        let none = Resolution::Pending;
        for (host, why) in [
            ("fd00:ec2::254", "AWS"),
            ("[fd00:ec2::254]", "AWS"),
            ("100.100.100.200", "Alibaba"),
            ("168.63.129.16", "Azure"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:a9fe:a9fe", "link-local"),
            ("::ffff:100.100.100.200", "Alibaba"),
            ("::127.0.0.1", "loopback"),
            ("::7f00:1", "loopback"),
            ("::169.254.169.254", "link-local"),
            ("::168.63.129.16", "Azure"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::169.254.169.254", "link-local"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::100.100.100.200", "Alibaba"),
            ("64:ff9b::0.0.0.0", "unspecified"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("2002:7f00:1::", "loopback"),
        ] {
            match check(host, &none, &p) {
                Verdict::Denied(rule) => assert!(rule.contains(why), "{host}: {rule}"),
                v => panic!("{host} admitted: {v:?}"),
            }
        }
        // An IPv6 address that embeds an allowed IPv4 one is judged as that one.
        for host in [
            "64:ff9b::a00:1",
            "::ffff:10.0.0.1",
            "2002:a00:1::1",
            "fd00:ec2::1",
        ] {
            assert_eq!(check(host, &none, &p), Verdict::Allowed, "{host}");
        }
        let Verdict::Denied(rule) = check("64:ff9b::a9fe:a9fe", &none, &p) else {
            unreachable!()
        };
        assert!(
            rule.contains("169.254.169.254") && rule.contains("NAT64"),
            "{rule}"
        );
    }

    #[test]
    fn the_default_policy_refuses_the_load_balancers_own_addresses() {
        let own = host(&[
            ("10.0.2.15", "eth0"),
            ("172.17.0.1", "docker0"),
            ("2001:db8::5", "eth0"),
        ]);
        let mut p = Policy::default().with_bind_addresses([ip("192.0.2.80")]);
        p.set_host_addresses(own);
        let none = Resolution::Pending;
        for (host, why) in [
            ("10.0.2.15", "this host's own address (interface eth0)"),
            ("172.17.0.1", "this host's own address (interface docker0)"),
            ("2001:db8::5", "this host's own address"),
            ("::ffff:172.17.0.1", "this host's own address"),
            ("64:ff9b::ac11:1", "this host's own address"),
            ("::172.17.0.1", "this host's own address"),
            ("192.0.2.80", "front door"),
        ] {
            match check(host, &none, &p) {
                Verdict::Denied(rule) => assert!(rule.contains(why), "{host}: {rule}"),
                v => panic!("{host} admitted: {v:?}"),
            }
        }
        assert_eq!(check("10.0.2.16", &none, &p), Verdict::Allowed);
        // A name that resolves to one of them is refused too.
        let r = Resolution::Resolved(vec![ip("172.17.0.1")]);
        assert!(matches!(
            check("docker0.example", &r, &p),
            Verdict::Denied(_)
        ));
        // A new interface address is refused once the policy hears of it.
        assert!(p.set_host_addresses(host(&[("10.0.2.16", "eth1")])));
        assert!(matches!(check("10.0.2.16", &none, &p), Verdict::Denied(_)));
        assert_eq!(check("10.0.2.15", &none, &p), Verdict::Allowed);
        // allowed_networks is the operator's whole list, as documented.
        let mut p = Policy::new(Some(vec!["10.0.0.0/8".parse().unwrap()]));
        p.set_host_addresses(host(&[("10.0.2.15", "eth0")]));
        assert_eq!(check("10.0.2.15", &none, &p), Verdict::Allowed);
    }

    #[test]
    fn a_name_is_judged_by_every_address_it_resolves_to() {
        let p = Policy::default();
        let r = |ips: &[&str]| Resolution::Resolved(ips.iter().map(|s| ip(s)).collect());
        assert_eq!(
            check("app.internal", &r(&["10.0.0.1"]), &p),
            Verdict::Allowed
        );
        assert!(matches!(
            check("localhost", &r(&["127.0.0.1", "::1"]), &p),
            Verdict::Denied(rule) if rule.contains("localhost") && rule.contains("loopback")
        ));
        assert!(matches!(
            check("mixed.example", &r(&["10.0.0.1", "169.254.169.254"]), &p),
            Verdict::Denied(_)
        ));
        assert_eq!(
            check("app.internal", &Resolution::Pending, &p),
            Verdict::Pending
        );
        assert!(matches!(
            check("app.internal", &Resolution::Failed("timed out".into()), &p),
            Verdict::Unresolved(why) if why.contains("timed out")
        ));
        assert!(matches!(
            check("app.internal", &r(&[]), &p),
            Verdict::Unresolved(_)
        ));
    }

    #[test]
    fn allowed_networks_is_the_whole_list() {
        let p = Policy::new(Some(vec![
            "127.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]));
        let none = Resolution::Pending;
        assert_eq!(check("127.0.0.1", &none, &p), Verdict::Allowed);
        assert_eq!(check("127.1", &none, &p), Verdict::Allowed);
        assert_eq!(check("fd00::5", &none, &p), Verdict::Allowed);
        assert!(matches!(
            check("10.0.0.1", &none, &p),
            Verdict::Denied(rule) if rule.contains("outside [watcher] allowed_networks (127.0.0.0/8, fd00::/8)")
        ));
        assert!(matches!(
            check("169.254.169.254", &none, &p),
            Verdict::Denied(_)
        ));
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")) && !c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let v6: Cidr = "fe80::/10".parse().unwrap();
        assert!(v6.contains(ip("febf::1")) && !v6.contains(ip("fec0::1")));
        assert_eq!(
            " 192.168.0.0/16 ".parse::<Cidr>().unwrap().to_string(),
            "192.168.0.0/16"
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "x/8",
            "::/129",
            "10.0.0.0/-1",
            "",
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(bad.trim()), "{err}");
        }
    }
}
