//! Instances named by a DNS name, as HAProxy gets them: one entry per address the
//! routing policy approved, never the name. Pure.
//!
//! HAProxy resolves a name it is given on its own, at every check and reload, and may
//! get another answer than the one the policy judged (DNS rebinding). So the snapshot
//! templates render holds, for an instance at `name:port`, one entry per approved IP:
//! `addr` = `ip:port`, `host` = the IP, `host_name` = the name, and `id` = a server name
//! of its own, `server_name(id, ip)`: the same for the same instance and address at
//! every render and after a restart, a valid name by `schema::is_valid_name`, so a
//! template's `server {{ i.id }} {{ i.addr }}` gives one server per address. An entry
//! whose server name another entry of its service already has is never merged with
//! it: the DNS-named instance is left out, and named.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::store::StoreSnapshot;
use crate::schema::Instance;

/// The server name of instance `id` at `ip`: `<id>_<ip>`, an IPv6 address's colons
/// written as `-` (`api-1_10.0.0.5`, `api-1_fd00--5`). Within the schema's 128
/// characters: a longer id is cut and a hash of the whole id keeps it apart from the
/// other ids cut the same.
pub fn server_name(id: &str, ip: IpAddr) -> String {
    let token = ip.to_string().replace(':', "-");
    let name = format!("{id}_{token}");
    if name.len() <= 128 {
        return name;
    }
    // FNV-1a: stable across builds and restarts, unlike std's hasher.
    let hash = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    let keep = 128 - token.len() - 1 - 9;
    format!("{}-{hash:08x}_{token}", &id[..keep])
}

/// A DNS-named instance left out: (service, instance id, the rule).
pub type Refused = (String, String, String);

/// `snapshot` with every instance whose host is in `approved` replaced by its entries,
/// one per approved address. The caller has left out every other DNS-named instance.
/// Each service's list stays sorted by `id`.
pub fn expand(
    mut snapshot: StoreSnapshot,
    approved: &BTreeMap<String, Vec<IpAddr>>,
) -> (StoreSnapshot, Vec<Refused>) {
    let mut refused = Vec::new();
    for (service, list) in snapshot.services.iter_mut() {
        if !list.iter().any(|i| approved.contains_key(&i.host)) {
            continue;
        }
        let (named, literal): (Vec<_>, Vec<_>) = std::mem::take(list)
            .into_iter()
            .partition(|i| approved.contains_key(&i.host));
        let mut taken: BTreeSet<String> = literal.iter().map(|i| i.id.clone()).collect();
        let mut out = literal;
        for inst in named {
            let entries: Vec<Instance> = approved[&inst.host]
                .iter()
                .map(|ip| Instance {
                    id: server_name(&inst.id, *ip),
                    addr: SocketAddr::new(*ip, inst.port).to_string(),
                    host: ip.to_string(),
                    host_name: inst.host.clone(),
                    ..(*inst).clone()
                })
                .collect();
            if let Some(clash) = entries.iter().find(|e| taken.contains(&e.id)) {
                refused.push((
                    service.clone(),
                    inst.id.clone(),
                    format!(
                        "its server name {:?} (for {} at {}) is another instance's: left out rather than merged",
                        clash.id, inst.host, clash.host
                    ),
                ));
                continue;
            }
            for e in entries {
                taken.insert(e.id.clone());
                out.push(Arc::new(e));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        *list = out;
    }
    snapshot.services.retain(|_, l| !l.is_empty());
    (snapshot, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema;
    use crate::watcher::store::Store;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn store(keys: &[(&str, &str)]) -> Store {
        let mut s = Store::new("/p");
        let w = s.reset(keys.iter().map(|(k, v)| (*k, v.as_bytes())));
        assert!(w.is_empty(), "{w:?}");
        s
    }

    #[test]
    fn a_name_becomes_one_entry_per_approved_address_and_haproxy_never_sees_it() {
        let s = store(&[
            ("/p/services/api/dns-1", "api.internal:8080"),
            ("/p/services/api/b", "10.0.0.9:80"),
        ]);
        let approved = BTreeMap::from([(
            "api.internal".to_string(),
            vec![ip("10.0.0.20"), ip("fd00::5")],
        )]);
        let (snap, refused) = expand(s.snapshot(), &approved);
        assert!(refused.is_empty());
        let api: Vec<_> = snap.services["api"]
            .iter()
            .map(|i| {
                (
                    i.id.as_str(),
                    i.addr.as_str(),
                    i.host.as_str(),
                    i.host_name.as_str(),
                )
            })
            .collect();
        assert_eq!(
            api,
            [
                ("b", "10.0.0.9:80", "10.0.0.9", ""),
                (
                    "dns-1_10.0.0.20",
                    "10.0.0.20:8080",
                    "10.0.0.20",
                    "api.internal"
                ),
                ("dns-1_fd00--5", "[fd00::5]:8080", "fd00::5", "api.internal"),
            ]
        );
        assert!(api.iter().all(|(id, ..)| schema::is_valid_name(id)));
    }

    #[test]
    fn server_names_are_stable_valid_and_apart_for_long_ids() {
        assert_eq!(server_name("x", ip("10.0.0.1")), "x_10.0.0.1");
        assert_eq!(server_name("x", ip("::ffff:10.0.0.1")), "x_--ffff-10.0.0.1");
        let long_a = "a".repeat(128);
        let long_b = format!("{}b", "a".repeat(127));
        let v6 = ip("fd00:1:2:3:4:5:6:7");
        let (a, b) = (server_name(&long_a, v6), server_name(&long_b, v6));
        assert!(
            schema::is_valid_name(&a) && schema::is_valid_name(&b),
            "{a} {b}"
        );
        assert_ne!(a, b);
        assert_eq!(a, server_name(&long_a, v6), "the same at every render");
    }

    #[test]
    fn a_server_name_another_instance_has_leaves_the_dns_named_one_out() {
        let s = store(&[
            ("/p/services/api/x", "api.internal:80"),
            ("/p/services/api/x_10.0.0.1", "10.0.0.7:80"),
        ]);
        let approved = BTreeMap::from([("api.internal".to_string(), vec![ip("10.0.0.1")])]);
        let (snap, refused) = expand(s.snapshot(), &approved);
        assert_eq!(snap.services["api"].len(), 1);
        assert_eq!(snap.services["api"][0].addr, "10.0.0.7:80");
        assert_eq!(refused.len(), 1);
        assert_eq!((refused[0].0.as_str(), refused[0].1.as_str()), ("api", "x"));
    }
}
