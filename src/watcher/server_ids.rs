//! Stable HAProxy server ids: every server line the shipped templates render carries
//! `id <n>`, derived from its server name alone, so it is the same across renders,
//! watcher restarts and HAProxy reloads. Pure.
//!
//! Why: HAProxy 2.6 checks a backend's servers for duplicate names pairwise unless they
//! carry explicit ids (10,000 servers: ~2 s of `haproxy -c` without, ~0.1 s with; see
//! `cargo bench --bench server_ids`), and a consistent-hash ring keyed on ids does not
//! move across reloads when the ids do not.
//!
//! The id is FNV-1a (64 bit) of the server name, folded into HAProxy's id range
//! `1..=MAX_ID`. Two names of one backend that fold onto the same id (at 10,000 servers
//! about a 2 % chance that any pair does) are settled by the backend's server order
//! (instances sorted by id): the first keeps it, the next takes the following free id.
//! Deterministic for equal backends; a new server that collides with an existing one
//! and sorts before it moves the existing one's id (a replace on the runtime path).

/// HAProxy parses a server id into an `int` and wants it positive.
pub const MAX_ID: u32 = i32::MAX as u32;

/// FNV-1a, 64 bit: fixed, small, and the same in every build (std's hasher is not
/// promised to be).
fn fnv1a(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The id `name` takes when nothing else in its backend folds onto it.
pub fn preferred(name: &str) -> u32 {
    // 1..=MAX_ID; the modulo bias over 2^64 is negligible.
    (fnv1a(name) % u64::from(MAX_ID)) as u32 + 1
}

/// The ids of one backend's servers, in the order given (the backend's server order).
pub fn assign<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<u32> {
    let names = names.into_iter();
    let mut taken = std::collections::HashSet::with_capacity(names.size_hint().0);
    names
        .map(|name| {
            let mut id = preferred(name);
            while !taken.insert(id) {
                id = next(id);
            }
            id
        })
        .collect()
}

/// The id probed after `id`, wrapping at the top of the range.
fn next(id: u32) -> u32 {
    if id == MAX_ID {
        1
    } else {
        id + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_depends_on_the_name_alone_and_lies_in_haproxys_range() {
        // Pinned: a changed hash would renumber every server of every deployment.
        assert_eq!(
            preferred("a"),
            (0xaf63_dc4c_8601_ec8c_u64 % u64::from(MAX_ID)) as u32 + 1
        );
        assert_eq!(assign(["b", "a"]), assign(["b", "a"]));
        assert_eq!(
            assign(["a"])[0],
            assign(["z", "a"])[1],
            "neighbours do not matter"
        );
        for n in 0..10_000 {
            let id = preferred(&format!("host-{n}-3f2a9c1b7d10-8080"));
            assert!((1..=MAX_ID).contains(&id), "{id}");
        }
    }

    #[test]
    fn names_that_fold_onto_one_id_get_distinct_ids_first_come_first_kept() {
        let names: Vec<String> = (0..20_000).map(|n| format!("s{n}")).collect();
        let ids = assign(names.iter().map(String::as_str));
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // A name repeated (a collision by construction): the first keeps its id, the
        // second takes the next one, wrapping at the top of the range.
        let p = preferred("x");
        assert_eq!(assign(["x", "x"]), [p, next(p)]);
    }

    #[test]
    fn collisions_wrap_at_the_top_of_the_range() {
        assert_eq!(next(MAX_ID), 1);
        assert_eq!(next(1), 2);
    }
}
