//! Pure planning for the runtime fast path: given the file HAProxy runs (`live`) and the
//! freshly rendered one, either the runtime-API ops that make HAProxy run the new file
//! with no reload, or "reload, because …". No I/O: `runtime_api` sends the ops.
//!
//! `plan(live, rendered)` is template-agnostic: it splits both configs into sections and
//! answers `RuntimePlan::Runtime(ops)` only when the sole differences are `server` lines
//! added, removed or changed inside `backend`/`listen` sections present in both, and
//! every server to add can be created by `add server` exactly as the file would create
//! it. Anything else is `RuntimePlan::Reload(reason)`.
//!
//! HAProxy 2.6 facts this relies on (management guide, tried on this machine):
//! - `add server` does not apply `default-server` settings, so the `default-server`
//!   arguments of the governing `defaults` section and of the backend are sent in front
//!   of the server line's own, the order in which the file parser applies them.
//! - A dynamic server pools no idle connection unless `pool-max-conn` and a non-zero
//!   `pool-purge-delay` say so (a file server's pool is unlimited, purged every 5 s):
//!   `pool-max-conn -1 pool-purge-delay 5s` are added unless the line sets them.
//! - `add server` refuses `init-addr` (a dynamic server is always `init-addr none`): it
//!   is dropped when the address is an IP literal, where it has no effect; a host name
//!   would never resolve, so it goes through a reload.
//! - Dynamic servers get ids after the file's, so a balance algorithm that depends on
//!   server ids or order (hashing, `first`) would behave differently after the next
//!   reload: only `roundrobin` and `leastconn` backends take this path.
//! - A server line that gains `disabled` (a draining instance) is `set server … state
//!   maint`: no new request reaches it, the ones in flight finish (maintenance shuts no
//!   session down). In a backend with persistence (`cookie`, `stick …`) it is `state
//!   drain` instead, so clients stuck to it finish their sessions there. Losing
//!   `disabled` is `state ready`. After a reload the file's `disabled` keeps it out.

use super::sections::{parse, Section};
use std::net::IpAddr;

pub(crate) use super::runtime_ops::{AdminState, Command, RuntimeOp};

/// More server changes than this in one batch go through one reload instead: a reload
/// is atomic and costs the same however many servers change.
const MAX_SERVER_CHANGES: usize = 100;

/// What `plan` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RuntimePlan {
    /// Apply these (adds, then weights, then removes) and HAProxy runs `rendered`.
    Runtime(Vec<RuntimeOp>),
    /// Only a reload can make HAProxy run `rendered`; the reason is for the log.
    Reload(String),
}

impl RuntimePlan {
    fn reload(reason: impl Into<String>) -> RuntimePlan {
        RuntimePlan::Reload(reason.into())
    }
}

/// `add server` keywords of HAProxy 2.6 (management guide) with how many arguments each
/// takes; every one was accepted by `add server` on HAProxy 2.6.12 here. `source`/`usesrc`
/// take a variable number and are left out: a line using them reloads. Anything not
/// listed (`cookie`, `resolvers`, `no-check`, `redir`, …: refused by HAProxy) reloads too.
const ADD_SERVER_KEYWORDS: &[(&str, usize)] = &[
    ("agent-addr", 1),
    ("agent-check", 0),
    ("agent-inter", 1),
    ("agent-port", 1),
    ("agent-send", 1),
    ("allow-0rtt", 0),
    ("alpn", 1),
    ("addr", 1),
    ("backup", 0),
    ("ca-file", 1),
    ("check", 0),
    ("check-alpn", 1),
    ("check-proto", 1),
    ("check-send-proxy", 0),
    ("check-sni", 1),
    ("check-ssl", 0),
    ("check-via-socks4", 0),
    ("ciphers", 1),
    ("ciphersuites", 1),
    ("crl-file", 1),
    ("crt", 1),
    ("disabled", 0),
    ("downinter", 1),
    ("enabled", 0),
    ("error-limit", 1),
    ("fall", 1),
    ("fastinter", 1),
    ("force-sslv3", 0),
    ("force-tlsv10", 0),
    ("force-tlsv11", 0),
    ("force-tlsv12", 0),
    ("force-tlsv13", 0),
    ("id", 1),
    ("inter", 1),
    ("maxconn", 1),
    ("maxqueue", 1),
    ("minconn", 1),
    ("no-ssl-reuse", 0),
    ("no-sslv3", 0),
    ("no-tlsv10", 0),
    ("no-tlsv11", 0),
    ("no-tlsv12", 0),
    ("no-tlsv13", 0),
    ("no-tls-tickets", 0),
    ("npn", 1),
    ("observe", 1),
    ("on-error", 1),
    ("on-marked-down", 1),
    ("on-marked-up", 1),
    ("pool-low-conn", 1),
    ("pool-max-conn", 1),
    ("pool-purge-delay", 1),
    ("port", 1),
    ("proto", 1),
    ("proxy-v2-options", 1),
    ("rise", 1),
    ("send-proxy", 0),
    ("send-proxy-v2", 0),
    ("send-proxy-v2-ssl", 0),
    ("send-proxy-v2-ssl-cn", 0),
    ("slowstart", 1),
    ("sni", 1),
    ("ssl", 0),
    ("ssl-max-ver", 1),
    ("ssl-min-ver", 1),
    ("tfo", 0),
    ("tls-tickets", 0),
    ("track", 1),
    ("verify", 1),
    ("verifyhost", 1),
    ("weight", 1),
    ("ws", 1),
];

/// Backend directives that make clients persist on a server: draining one of its
/// servers must let them finish there (`state drain`), not cut them off (`maint`).
const PERSISTENCE: &[&str] = &[
    "cookie",
    "stick",
    "stick-table",
    "stick-store-request",
    "stick-store-response",
];

/// Balance algorithms whose behaviour does not depend on server ids or order.
const ORDER_FREE_BALANCE: &[&str] = &["roundrobin", "leastconn"];

/// Decides how HAProxy, running `live`, can be made to run `rendered`.
pub(crate) fn plan(live: &str, rendered: &str) -> RuntimePlan {
    let (old, new) = match (parse(live), parse(rendered)) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => return RuntimePlan::Reload(e),
    };
    if old.len() != new.len() {
        return RuntimePlan::reload("sections were added or removed");
    }
    let mut ops = Ops::default();
    for (o, n) in old.iter().zip(&new) {
        if let Err(why) = backend_ops(o, n, &new, &mut ops) {
            return RuntimePlan::Reload(why);
        }
    }
    let Ops {
        adds,
        weights,
        states,
        replaces,
        removes,
    } = ops;
    let changes = adds.len() + weights.len() + states.len() + replaces.len() / 2 + removes.len();
    if changes > MAX_SERVER_CHANGES {
        return RuntimePlan::reload(format!(
            "{changes} server changes in one batch (one reload is cheaper beyond {MAX_SERVER_CHANGES})"
        ));
    }
    // New servers first, so a backend whose instance is replaced never runs empty.
    let mut ops = adds;
    ops.extend(weights);
    ops.extend(states);
    ops.extend(replaces);
    ops.extend(removes);
    RuntimePlan::Runtime(ops)
}

/// The ops of one plan, by kind: applied adds first, so a backend whose instance is
/// replaced never runs empty.
#[derive(Default)]
struct Ops {
    adds: Vec<RuntimeOp>,
    weights: Vec<RuntimeOp>,
    states: Vec<RuntimeOp>,
    replaces: Vec<RuntimeOp>,
    removes: Vec<RuntimeOp>,
}

/// The ops that take section `o` (live) to `n` (rendered; `new` is its whole file), or
/// why only a reload can.
fn backend_ops<'a>(
    o: &Section<'a>,
    n: &Section<'a>,
    new: &[Section<'a>],
    ops: &mut Ops,
) -> Result<(), String> {
    if o.header != n.header {
        return Err(format!("section `{}` became `{}`", o.header, n.header));
    }
    if o.lines != n.lines {
        let kind = if n.header.is_empty() {
            "the lines before the first section"
        } else {
            n.header
        };
        return Err(format!("`{kind}` changed beyond its server lines"));
    }
    if o.servers == n.servers {
        return Ok(());
    }
    let mut words = n.header.split_whitespace();
    let backend = match (words.next(), words.next(), words.next()) {
        (Some(_), Some(name), None) => name,
        _ => return Err(format!("`{}` names no plain backend", n.header)),
    };
    // The last `balance` wins, the backend's over its defaults section's.
    let balance = n
        .directives("balance")
        .last()
        .or_else(|| n.defaults.and_then(|d| new[d].directives("balance").last()))
        .and_then(|w| w.first().copied())
        .unwrap_or("roundrobin");
    if !ORDER_FREE_BALANCE.contains(&balance) {
        return Err(format!(
            "backend {backend} balances with `{balance}`, which depends on server order"
        ));
    }
    // `default-server` lines add up, the defaults section's first.
    let mut defaults_args: Vec<&str> = Vec::new();
    for section in n.defaults.map(|d| &new[d]).into_iter().chain([n]) {
        defaults_args.extend(section.directives("default-server").flatten());
    }
    for name in o.servers.keys() {
        if !n.servers.contains_key(name) {
            ops.removes.push(RuntimeOp::Remove {
                backend: backend.into(),
                server: (*name).into(),
            });
        }
    }
    let persistent = n
        .defaults
        .map(|d| &new[d])
        .into_iter()
        .chain([n])
        .any(|s| PERSISTENCE.iter().any(|k| s.directives(k).next().is_some()));
    let (adds_before, replaces_before) = (ops.adds.len(), ops.replaces.len());
    for (name, line) in &n.servers {
        let Some(old_line) = o.servers.get(name) else {
            match add(backend, line, &defaults_args) {
                Ok(op) => ops.adds.push(op),
                Err(why) => return Err(why),
            }
            continue;
        };
        if old_line != line {
            changed_server(
                backend,
                name,
                old_line,
                line,
                persistent,
                &defaults_args,
                ops,
            )?;
        }
    }
    let (adds, replaces) = (
        &mut ops.adds[adds_before..],
        &mut ops.replaces[replaces_before..],
    );
    finish_adds(backend, o, n, adds, replaces)
}

/// Settles what the servers added to `backend` (its live section `o`, rendered `n`)
/// carry beyond their lines: a dynamic cookie when the backend's cookie is, and an
/// `id` no live server of another name still holds.
fn finish_adds(
    backend: &str,
    o: &Section<'_>,
    n: &Section<'_>,
    adds: &mut [RuntimeOp],
    replaces: &mut [RuntimeOp],
) -> Result<(), String> {
    // Adds run before removes: an added server whose `id` a live server of another
    // name still holds would be refused (a rare renumbering, see `server_ids`).
    let held: std::collections::HashMap<&str, &str> = o
        .servers
        .iter()
        .filter_map(|(name, line)| Some((server_id(line)?, *name)))
        .collect();
    let dynamic = n.directives("cookie").any(|w| w.contains(&"dynamic"));
    for op in adds.iter_mut().chain(replaces.iter_mut()) {
        if let RuntimeOp::Add { dynamic_cookie, .. } = op {
            *dynamic_cookie = dynamic;
        }
    }
    for op in adds.iter().chain(replaces.iter()) {
        if let RuntimeOp::Add { server, args, .. } = op {
            let id = args
                .iter()
                .position(|a| a == "id")
                .and_then(|i| args.get(i + 1));
            if let Some(holder) = id.and_then(|id| held.get(id.as_str())) {
                if holder != server {
                    return Err(format!(
                        "{backend}/{server} takes id {} which {backend}/{holder} holds until it is removed",
                        id.map(String::as_str).unwrap_or("")
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The value after `id` in a server line, if it has one.
fn server_id(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().skip(3).position(|w| *w == "id")? + 3;
    words.get(at + 1).copied()
}

/// The ops for server `name` of `backend`, whose line changed from `old_line` to `line`.
fn changed_server(
    backend: &str,
    name: &str,
    old_line: &str,
    line: &str,
    persistent: bool,
    defaults_args: &[&str],
    ops: &mut Ops,
) -> Result<(), String> {
    // In or out of rotation, and whatever else changed with it.
    let (was_disabled, old_rest) = without_disabled(old_line);
    let (disabled, rest) = without_disabled(line);
    let state_op = (was_disabled != disabled).then(|| RuntimeOp::State {
        backend: backend.into(),
        server: name.into(),
        state: match (disabled, persistent) {
            (false, _) => AdminState::Ready,
            (true, false) => AdminState::Maint,
            (true, true) => AdminState::Drain,
        },
    });
    if state_op.is_some() && old_rest == rest {
        ops.states.extend(state_op);
        return Ok(());
    }
    match weight_change(&old_rest, &rest) {
        Some(weight) => {
            ops.weights.push(RuntimeOp::Weight {
                backend: backend.into(),
                server: name.into(),
                weight: weight.into(),
            });
            ops.states.extend(state_op);
        }
        // A replacement is created as the new line says, `disabled` included.
        None => match add(backend, line, defaults_args) {
            Ok(op) => {
                ops.replaces.push(RuntimeOp::Remove {
                    backend: backend.into(),
                    server: name.into(),
                });
                ops.replaces.push(op);
            }
            Err(why) => return Err(why),
        },
    }
    Ok(())
}

/// Whether a server line says `disabled` (after its name and address), and the line
/// without it.
fn without_disabled(line: &str) -> (bool, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let head = words.len().min(3);
    let disabled = words[head..].contains(&"disabled");
    let kept: Vec<&str> = words[..head]
        .iter()
        .chain(words[head..].iter().filter(|w| **w != "disabled"))
        .copied()
        .collect();
    (disabled, kept.join(" "))
}

/// The new weight when `old` and `new` differ only in the value after `weight`.
fn weight_change<'a>(old: &str, new: &'a str) -> Option<&'a str> {
    let (o, n): (Vec<&str>, Vec<&str>) = (
        old.split_whitespace().collect(),
        new.split_whitespace().collect(),
    );
    if o.len() != n.len() {
        return None;
    }
    let mut weight = None;
    for (i, (a, b)) in o.iter().zip(&n).enumerate() {
        if a == b {
            continue;
        }
        // The value sits at index 4 at the earliest: `server <name> <addr> weight <n>`.
        if i >= 4 && n[i - 1] == "weight" && o[i - 1] == "weight" && weight.is_none() {
            weight = Some(*b);
        } else {
            return None;
        }
    }
    weight.filter(|w| w.parse::<u32>().is_ok())
}

/// The `add server` op creating the server of `line` as the file would.
fn add(backend: &str, line: &str, defaults_args: &[&str]) -> Result<RuntimeOp, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (name, addr) = match words.as_slice() {
        [_, name, addr, ..] => (*name, *addr),
        _ => return Err(format!("server line `{line}` has no address")),
    };
    // The CLI splits on spaces and `;` and knows no quoting the way the file does.
    let special = |w: &&&str| w.contains(['"', '\'', '\\', '#', ';']);
    if let Some(w) = words.iter().chain(defaults_args).find(special) {
        return Err(format!(
            "`{w}` in the server line of {backend}/{name} needs quoting the CLI does not do"
        ));
    }
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip_literal = host.parse::<IpAddr>().is_ok();
    let mut args = Vec::new();
    let (mut check, mut agent, mut enable) = (false, false, true);
    let all: Vec<&str> = defaults_args.iter().chain(&words[3..]).copied().collect();
    let mut i = 0;
    while i < all.len() {
        let kw = all[i];
        if kw == "init-addr" {
            if !ip_literal {
                return Err(format!(
                    "{backend}/{name}: {addr} is not an IP address and a dynamic server never resolves names"
                ));
            }
            i += 2;
            continue;
        }
        let Some((_, arity)) = ADD_SERVER_KEYWORDS.iter().find(|(k, _)| *k == kw) else {
            return Err(format!(
                "{backend}/{name}: `{kw}` is not accepted by `add server` in HAProxy 2.6"
            ));
        };
        if i + arity >= all.len() {
            return Err(format!("{backend}/{name}: `{kw}` lacks its argument"));
        }
        match kw {
            "check" => check = true,
            "agent-check" => agent = true,
            "disabled" => enable = false,
            "enabled" => enable = true,
            _ => {}
        }
        args.extend(all[i..=i + arity].iter().map(|w| w.to_string()));
        i += 1 + arity;
    }
    if !ip_literal {
        return Err(format!(
            "{backend}/{name}: {addr} is not an IP address and a dynamic server never resolves names"
        ));
    }
    // A file server pools idle connections (no limit, purged every 5 s by default); a
    // dynamic one keeps none unless told both, so it would open a connection per request.
    for (kw, file_default) in [("pool-max-conn", "-1"), ("pool-purge-delay", "5s")] {
        if !args.iter().any(|a| a == kw) {
            args.extend([kw.to_string(), file_default.to_string()]);
        }
    }
    Ok(RuntimeOp::Add {
        backend: backend.into(),
        server: name.into(),
        addr: addr.into(),
        args,
        check,
        agent,
        enable,
        dynamic_cookie: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watcher::haproxy::runtime_ops::{DELETED, REGISTERED};

    const BASE: &str = "\
# generated
global
    log stderr format short local0 notice
    stats socket /run/admin.sock mode 600 level admin

defaults
    mode http
    default-server inter 2s fall 3 observe layer4 init-addr last,libc,none

frontend http-in
    bind *:80
    use_backend svc_web if { var(txn.host) -m str web.test }

backend svc_web
    balance roundrobin
    server a 10.0.0.1:80 weight 100 check
    server b 10.0.0.2:80 weight 100 check
";

    fn with(servers: &str) -> String {
        BASE.replace(
            "    server a 10.0.0.1:80 weight 100 check\n    server b 10.0.0.2:80 weight 100 check\n",
            servers,
        )
    }

    fn reason(p: RuntimePlan) -> String {
        match p {
            RuntimePlan::Reload(why) => why,
            RuntimePlan::Runtime(ops) => panic!("expected a reload, got {ops:?}"),
        }
    }

    fn runtime(p: RuntimePlan) -> Vec<RuntimeOp> {
        match p {
            RuntimePlan::Runtime(ops) => ops,
            RuntimePlan::Reload(why) => panic!("expected runtime ops, got a reload: {why}"),
        }
    }

    #[test]
    fn identical_configs_need_nothing() {
        assert_eq!(plan(BASE, BASE), RuntimePlan::Runtime(vec![]));
        // Comments and blank lines do not change what HAProxy runs.
        let commented = BASE.replace("# generated", "# generated again\n\n");
        assert_eq!(plan(BASE, &commented), RuntimePlan::Runtime(vec![]));
    }

    #[test]
    fn an_added_server_carries_the_default_server_arguments_without_init_addr() {
        let new = with(
            "    server a 10.0.0.1:80 weight 100 check\n    server b 10.0.0.2:80 weight 100 check\n    server c 10.0.0.3:80 weight 50 check\n",
        );
        let ops = runtime(plan(BASE, &new));
        assert_eq!(
            ops,
            vec![RuntimeOp::Add {
                backend: "svc_web".into(),
                server: "c".into(),
                addr: "10.0.0.3:80".into(),
                args: "inter 2s fall 3 observe layer4 weight 50 check pool-max-conn -1 pool-purge-delay 5s"
                    .split(' ')
                    .map(String::from)
                    .collect(),
                check: true,
                agent: false,
                enable: true,
                dynamic_cookie: false,
            }]
        );
    }

    #[test]
    fn removals_weights_and_replacements() {
        let new = with(
            "    server a 10.0.0.1:80 weight 7 check\n    server b 10.0.0.9:80 weight 100 check\n",
        );
        let ops = runtime(plan(BASE, &new));
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(
            ops[0],
            RuntimeOp::Weight {
                backend: "svc_web".into(),
                server: "a".into(),
                weight: "7".into()
            }
        );
        assert!(matches!(&ops[1], RuntimeOp::Remove { server, .. } if server == "b"));
        assert!(
            matches!(&ops[2], RuntimeOp::Add { server, addr, .. } if server == "b" && addr == "10.0.0.9:80")
        );

        let ops = runtime(plan(
            BASE,
            &with("    server b 10.0.0.2:80 weight 100 check\n"),
        ));
        assert_eq!(
            ops,
            vec![RuntimeOp::Remove {
                backend: "svc_web".into(),
                server: "a".into()
            }]
        );
        // Emptying a backend keeps the section: still a runtime change.
        assert_eq!(runtime(plan(BASE, &with(""))).len(), 2);
    }

    /// `add server` takes the line's `id` as it is (HAProxy 2.6 accepts it), so a server
    /// added at run time keeps the id the file gives it at the next reload.
    #[test]
    fn an_added_server_keeps_its_stable_id() {
        let old = with("    server a 10.0.0.1:80 id 11 weight 100 check\n");
        let new = with(
            "    server a 10.0.0.1:80 id 11 weight 100 check\n    server c 10.0.0.3:80 id 33 weight 100 check\n",
        );
        let ops = runtime(plan(&old, &new));
        let RuntimeOp::Add { args, .. } = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!(args[6..10], ["id", "33", "weight", "100"]);
        assert!(ops[0].commands()[0]
            .text
            .starts_with("add server svc_web/c 10.0.0.3:80 inter 2s fall 3 observe layer4 id 33 "));
        // A weight change beside an id is still a weight change.
        // In a backend of dynamic cookies, the new server gets its cookie computed.
        let sticky = |s: &str| {
            s.replace(
                "    balance roundrobin\n",
                "    balance roundrobin\n    cookie c insert indirect nocache dynamic\n    dynamic-cookie-key k\n",
            )
        };
        let ops = runtime(plan(&sticky(&old), &sticky(&new)));
        let texts: Vec<String> = ops[0].commands().into_iter().map(|c| c.text).collect();
        assert_eq!(
            texts[1], "enable dynamic-cookie backend svc_web",
            "{texts:?}"
        );
        let heavier = with("    server a 10.0.0.1:80 id 11 weight 5 check\n");
        assert!(
            matches!(&runtime(plan(&old, &heavier))[0], RuntimeOp::Weight { weight, .. } if weight == "5")
        );
    }

    /// Adds run before removes, so a new server taking the id of one that leaves in
    /// the same batch would be refused by HAProxy: that batch reloads instead.
    #[test]
    fn an_added_server_whose_id_another_still_holds_reloads() {
        let old = with("    server a 10.0.0.1:80 id 11 weight 100 check\n");
        let new = with("    server c 10.0.0.3:80 id 11 weight 100 check\n");
        let why = reason(plan(&old, &new));
        assert!(
            why.contains("svc_web/c takes id 11 which svc_web/a holds"),
            "{why}"
        );
        // The same server replaced (its address changed) keeps its id: runtime.
        let moved = with("    server a 10.0.0.9:80 id 11 weight 100 check\n");
        assert_eq!(runtime(plan(&old, &moved)).len(), 2);
    }

    fn state(server: &str, state: AdminState) -> RuntimeOp {
        RuntimeOp::State {
            backend: "svc_web".into(),
            server: server.into(),
            state,
        }
    }

    #[test]
    fn a_draining_server_leaves_rotation_through_the_runtime_api_and_comes_back() {
        let drained = with(
            "    server a 10.0.0.1:80 weight 100 check\n    server b 10.0.0.2:80 weight 100 check disabled\n",
        );
        assert_eq!(
            runtime(plan(BASE, &drained)),
            vec![state("b", AdminState::Maint)]
        );
        assert_eq!(
            runtime(plan(&drained, BASE)),
            vec![state("b", AdminState::Ready)]
        );
        // Draining and reweighted in one batch: both, no replacement.
        let both = drained.replace("b 10.0.0.2:80 weight 100", "b 10.0.0.2:80 weight 5");
        let ops = runtime(plan(BASE, &both));
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], RuntimeOp::Weight { weight, .. } if weight == "5"));
        assert_eq!(ops[1], state("b", AdminState::Maint));
        // A new address while draining is a replacement, created disabled.
        let moved = drained.replace("10.0.0.2:80", "10.0.0.9:80");
        let ops = runtime(plan(BASE, &moved));
        assert!(
            matches!(&ops[1], RuntimeOp::Add { enable: false, .. }),
            "{ops:?}"
        );
    }

    #[test]
    fn a_backend_with_persistence_drains_instead_of_maintenance() {
        for directive in [
            "cookie SRV insert indirect nocache",
            "stick on src",
            "stick-table type ip size 1k",
        ] {
            let sticky = BASE.replace(
                "    balance roundrobin\n",
                &format!("    balance roundrobin\n    {directive}\n"),
            );
            let drained = sticky.replace(
                "b 10.0.0.2:80 weight 100 check",
                "b 10.0.0.2:80 weight 100 check disabled",
            );
            assert_eq!(
                runtime(plan(&sticky, &drained)),
                vec![state("b", AdminState::Drain)],
                "{directive}"
            );
        }
        // Persistence set in the defaults section counts too.
        let sticky = BASE.replace("    mode http\n", "    mode http\n    cookie SRV insert\n");
        let drained = sticky.replace(
            "b 10.0.0.2:80 weight 100 check",
            "b 10.0.0.2:80 weight 100 check disabled",
        );
        assert_eq!(
            runtime(plan(&sticky, &drained)),
            vec![state("b", AdminState::Drain)]
        );
    }

    #[test]
    fn adds_come_before_removes() {
        let new = with("    server z 10.0.0.26:80 weight 100 check\n");
        let ops = runtime(plan(BASE, &new));
        assert!(matches!(ops[0], RuntimeOp::Add { .. }), "{ops:?}");
        assert!(matches!(ops[2], RuntimeOp::Remove { .. }), "{ops:?}");
    }

    #[test]
    fn anything_beyond_server_lines_reloads() {
        let peers = format!("{BASE}\npeers p\n    server x 10.0.0.1:1024\n");
        let new_backend = "backend svc_api\n    server x 10.0.0.1:1\n\nbackend svc_web";
        #[rustfmt::skip]
        let cases = [
            // A new backend (new service), and the frontend rule that goes with it.
            (BASE.to_string(), BASE.replace("backend svc_web", new_backend), "sections were added"),
            (BASE.into(), BASE.replace("bind *:80", "bind *:81"), "`frontend http-in` changed"),
            (BASE.into(), BASE.replace("mode http", "mode tcp"), "`defaults` changed"),
            (BASE.into(), BASE.replace("level admin", "level operator"), "`global` changed"),
            // A server line in a section that is not a backend.
            (peers.clone(), peers.replace("10.0.0.1:1024", "10.0.0.2:1024"), "`peers p` changed"),
        ];
        for (old, new, why) in cases {
            let got = reason(plan(&old, &new));
            assert!(got.contains(why), "{got}, expected {why}");
        }
    }

    #[test]
    fn servers_the_cli_cannot_create_reload() {
        let added = |line: &str| {
            plan(
                BASE,
                &with(&format!(
                    "    server a 10.0.0.1:80 weight 100 check\n    server b 10.0.0.2:80 weight 100 check\n    {line}\n"
                )),
            )
        };
        for (line, why) in [
            ("server c db.internal:80 check", "not an IP address"),
            ("server c 10.0.0.3:80 cookie c1", "`cookie` is not accepted"),
            ("server c 10.0.0.3:80 source 10.0.0.100", "`source` is not"),
            ("server c 10.0.0.3:80 weight", "lacks its argument"),
            ("server c \"10.0.0.3:80\"", "needs quoting"),
        ] {
            let got = reason(added(line));
            assert!(got.contains(why), "{line}: {got}");
        }
        let ops = runtime(added(
            "server c [fd00::3]:80 disabled agent-check agent-port 9",
        ));
        assert!(matches!(
            &ops[0],
            RuntimeOp::Add {
                check: false,
                agent: true,
                enable: false,
                ..
            }
        ));
    }

    #[test]
    fn order_dependent_balance_reloads_and_defaults_balance_counts() {
        let add_c = |cfg: &str| {
            cfg.replace(
                "    server b 10.0.0.2:80 weight 100 check\n",
                "    server b 10.0.0.2:80 weight 100 check\n    server c 10.0.0.3:80\n",
            )
        };
        let hashed = BASE.replace("balance roundrobin", "balance source");
        assert!(reason(plan(&hashed, &add_c(&hashed))).contains("`source`"));
        let inherited = BASE
            .replace("    balance roundrobin\n", "")
            .replace("    mode http\n", "    mode http\n    balance first\n");
        assert!(reason(plan(&inherited, &add_c(&inherited))).contains("`first`"));
        let leastconn = BASE.replace("balance roundrobin", "balance leastconn");
        assert_eq!(runtime(plan(&leastconn, &add_c(&leastconn))).len(), 1);
    }

    #[test]
    fn default_server_lines_add_up() {
        let two = BASE.replace(
            "    balance roundrobin\n",
            "    balance roundrobin\n    default-server rise 5\n    default-server maxconn 9\n",
        );
        let new = two.replace(
            "    server b 10.0.0.2:80 weight 100 check\n",
            "    server b 10.0.0.2:80 weight 100 check\n    server c 10.0.0.3:80\n",
        );
        let ops = runtime(plan(&two, &new));
        let RuntimeOp::Add { args, .. } = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!(
            args.join(" "),
            "inter 2s fall 3 observe layer4 rise 5 maxconn 9 pool-max-conn -1 pool-purge-delay 5s"
        );
    }

    #[test]
    fn large_batches_reload() {
        let many: String = (0..=MAX_SERVER_CHANGES)
            .map(|i| format!("    server s{i} 10.1.0.{}:{} check\n", i % 250, 1000 + i))
            .collect();
        assert!(matches!(plan(BASE, &with(&many)), RuntimePlan::Reload(_)));
    }

    #[test]
    fn the_shipped_golden_config_is_understood() {
        let golden = include_str!("../../../tests/golden/haproxy.cfg");
        assert_eq!(plan(golden, golden), RuntimePlan::Runtime(vec![]));
        let fewer = golden.replace(
            "    server host-b-0123456789ab-8080 10.0.0.6:32769 id 1143396666 weight 50 check\n",
            "",
        );
        assert_eq!(runtime(plan(golden, &fewer)).len(), 1);
        // api's dns-1 is a host name: removing a server is fine, adding one like it is not.
        let more = golden.replace(
            "    server manual-1 10.0.0.9:80 id 1785994721 weight 100 check\n",
            "    server manual-1 10.0.0.9:80 id 1785994721 weight 100 check\n    server dns-2 api2.internal:8080 id 2 weight 100 check\n",
        );
        assert!(matches!(plan(golden, &more), RuntimePlan::Reload(_)));
    }

    #[test]
    fn each_op_is_the_admin_commands_an_operator_would_type() {
        let texts = |op: &RuntimeOp| {
            op.commands()
                .into_iter()
                .map(|c| (c.text, c.expect))
                .collect::<Vec<_>>()
        };
        let add = RuntimeOp::Add {
            backend: "svc_web".into(),
            server: "c".into(),
            addr: "10.0.0.3:80".into(),
            args: vec!["weight".into(), "5".into(), "check".into()],
            check: true,
            agent: true,
            enable: true,
            dynamic_cookie: false,
        };
        assert_eq!(
            texts(&add),
            [
                (
                    "add server svc_web/c 10.0.0.3:80 weight 5 check".to_string(),
                    REGISTERED
                ),
                ("enable health svc_web/c".into(), ""),
                ("enable agent svc_web/c".into(), ""),
                ("enable server svc_web/c".into(), ""),
            ]
        );
        assert!(add.repool().is_empty());
        assert_eq!(
            add.describe(),
            "add server svc_web/c 10.0.0.3:80 weight 5 check; enable health svc_web/c; \
             enable agent svc_web/c; enable server svc_web/c"
        );
        // Checks off and `disabled`: added, and nothing enabled.
        let parked = RuntimeOp::Add {
            backend: "svc_web".into(),
            server: "c".into(),
            addr: "10.0.0.3:80".into(),
            args: vec!["weight".into(), "5".into(), "check".into()],
            check: false,
            agent: false,
            enable: false,
            dynamic_cookie: false,
        };
        assert_eq!(
            parked.describe(),
            "add server svc_web/c 10.0.0.3:80 weight 5 check (stays in maintenance)"
        );
        let remove = RuntimeOp::Remove {
            backend: "svc_web".into(),
            server: "a".into(),
        };
        assert_eq!(
            texts(&remove),
            [
                ("set server svc_web/a state maint".to_string(), ""),
                ("del server svc_web/a".into(), DELETED),
            ]
        );
        assert_eq!(
            remove.describe(),
            "set server svc_web/a state maint; del server svc_web/a (while it still has \
             connections: set server svc_web/a state drain; set server svc_web/a state maint; \
             del again)"
        );
        let weight = RuntimeOp::Weight {
            backend: "svc_web".into(),
            server: "a".into(),
            weight: "7".into(),
        };
        assert_eq!(
            texts(&weight),
            [("set server svc_web/a weight 7".to_string(), "")]
        );
        assert_eq!(weight.describe(), "set server svc_web/a weight 7");
        for (admin, word) in [
            (AdminState::Ready, "ready"),
            (AdminState::Maint, "maint"),
            (AdminState::Drain, "drain"),
        ] {
            let op = state("a", admin);
            assert_eq!(
                texts(&op),
                [(format!("set server svc_web/a state {word}"), "")]
            );
            assert!(op.repool().is_empty());
        }
    }

    #[test]
    fn a_batch_counts_every_kind_of_change_and_a_replacement_once() {
        // Live: 12 servers. Rendered: 3 reweighted, 3 drained, 3 moved (a replacement:
        // a remove and an add, one change), 3 removed, and `adds` new ones.
        let line = |name: String, addr: String, rest: &str| {
            format!("    server {name} {addr} weight 100 check{rest}\n")
        };
        let live: String = (0..12)
            .map(|k| line(format!("l{k}"), format!("10.2.0.{k}:80"), ""))
            .collect();
        let rendered = |adds: usize| {
            let mut out = String::new();
            for k in 0..3 {
                out += &line(format!("l{k}"), format!("10.2.0.{k}:80"), "")
                    .replace("weight 100", "weight 5");
            }
            for k in 3..6 {
                out += &line(format!("l{k}"), format!("10.2.0.{k}:80"), " disabled");
            }
            for k in 6..9 {
                out += &line(format!("l{k}"), format!("10.3.0.{k}:80"), "");
            }
            for k in 0..adds {
                out += &line(format!("n{k}"), format!("10.1.0.{k}:80"), "");
            }
            with(&out)
        };
        // 88 adds + 3 + 3 + 3 + 3 = 100 changes: still the runtime path.
        let ops = runtime(plan(&with(&live), &rendered(88)));
        assert_eq!(ops.len(), 88 + 3 + 3 + 2 * 3 + 3);
        // One more: a reload, and the reason says how many.
        let why = reason(plan(&with(&live), &rendered(89)));
        assert!(why.starts_with("101 server changes"), "{why}");
    }

    #[test]
    fn only_the_value_after_weight_changing_is_a_weight_change() {
        let old = with("    server a 10.0.0.1:80 weight 100 maxconn 10 check\n");
        // Another number changed: the server is replaced, not reweighted.
        let ops = runtime(plan(
            &old,
            &with("    server a 10.0.0.1:80 weight 100 maxconn 20 check\n"),
        ));
        assert!(
            matches!(&ops[..], [RuntimeOp::Remove { .. }, RuntimeOp::Add { args, .. }]
                if args.windows(2).any(|w| w == ["maxconn", "20"])),
            "{ops:?}"
        );
        // `weight` turned into a garbled `weight weight 7`: not a weight of 7.
        let why = reason(plan(
            &with("    server a 10.0.0.1:80 weight 100 check\n"),
            &with("    server a 10.0.0.1:80 weight weight 7\n"),
        ));
        assert!(why.contains("`7` is not accepted"), "{why}");
    }

    #[test]
    fn a_servers_enabled_overrides_a_default_server_disabled() {
        let parked = |servers: &str| {
            with(servers).replace(
                "default-server inter 2s",
                "default-server disabled inter 2s",
            )
        };
        let one = "    server a 10.0.0.1:80 weight 100 check\n";
        let ops = runtime(plan(
            &parked(one),
            &parked(&format!("{one}    server c 10.0.0.3:80 enabled check\n")),
        ));
        assert!(
            matches!(&ops[..], [RuntimeOp::Add { enable: true, .. }]),
            "{ops:?}"
        );
        let ops = runtime(plan(
            &parked(one),
            &parked(&format!("{one}    server c 10.0.0.3:80 check\n")),
        ));
        assert!(
            matches!(&ops[..], [RuntimeOp::Add { enable: false, .. }]),
            "{ops:?}"
        );
    }
}
