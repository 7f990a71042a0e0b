//! Certificate changes through HAProxy's runtime API (the admin `stats socket`), so a
//! new, renewed or removed certificate needs no reload. HAProxy 2.6 commands
//! (management guide, "new ssl cert" and after; answers tried on this machine):
//! - add: `new ssl cert <file>`, `set ssl cert <file> <<` + PEM, `commit ssl cert
//!   <file>`, `add ssl crt-list <list> <<` + `<file> <domain>…`;
//! - renew: `set ssl cert` + `commit ssl cert` (new handshakes get the new one, open
//!   connections keep theirs);
//! - remove: `del ssl crt-list <list> <file>`, `del ssl cert <file>`;
//! - the hosts ACL file (HTTP → HTTPS redirects): `add acl <file> <host>`, `del acl`.
//!
//! `<file>` is the name HAProxy knows the certificate by: its path in `certs_dir`, as the
//! crt-list on disk names it, so a later reload loads the same thing from the file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::files::{self, Dir};
use super::served::Entry;
use crate::watcher::haproxy::socket;

/// One step of bringing an HAProxy's certificates in line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    DelHost(String),
    Remove { name: String },
    Renew { name: String },
    Add { name: String },
    AddHost(String),
}

/// What HAProxy runs (`known`: name → etcd value) → the served set (pure). Removals
/// first, so a host moving from one certificate to another is never served by both.
pub(crate) fn plan(known: &BTreeMap<String, Entry>, served: &BTreeMap<String, Entry>) -> Vec<Op> {
    let mut ops = Vec::new();
    let known_hosts = files::host_set(known.iter());
    let hosts = files::host_set(served.iter());
    ops.extend(known_hosts.difference(&hosts).cloned().map(Op::DelHost));
    ops.extend(
        known
            .keys()
            .filter(|n| !served.contains_key(*n))
            .map(|n| Op::Remove { name: n.clone() }),
    );
    for (name, e) in served {
        match known.get(name) {
            Some(k) if k.bytes == e.bytes => {}
            Some(_) => ops.push(Op::Renew { name: name.clone() }),
            None => ops.push(Op::Add { name: name.clone() }),
        }
    }
    ops.extend(hosts.difference(&known_hosts).cloned().map(Op::AddHost));
    ops
}

/// Why the runtime API did not carry the change.
#[derive(Debug)]
pub(crate) enum Failure {
    /// HAProxy refused this certificate itself (`set`/`commit ssl cert`): it is not
    /// served, and nothing else needs to change.
    Cert { name: String, answer: String },
    /// Anything else (socket unreachable, the config uses no such crt-list, …): a
    /// checked reload of the files on disk makes HAProxy whole.
    Other(String),
}

/// Sends `ops` in order, keeping `known` (what HAProxy runs) up to date op by op;
/// stops at the first refusal.
pub(crate) async fn apply(
    sock: &Path,
    dir: &Dir,
    known: &mut BTreeMap<String, Entry>,
    served: &BTreeMap<String, Entry>,
    ops: &[Op],
    timeout: Duration,
) -> Result<usize, Failure> {
    let list = dir.crt_list().display().to_string();
    let hosts = dir.hosts().display().to_string();
    for op in ops {
        match op {
            Op::DelHost(h) => {
                send(
                    sock,
                    &format!("del acl {hosts} {h}"),
                    |a| a.is_empty() || a.contains("not found"),
                    timeout,
                )
                .await?
            }
            Op::AddHost(h) => {
                send(
                    sock,
                    &format!("add acl {hosts} {h}"),
                    str::is_empty,
                    timeout,
                )
                .await?
            }
            Op::Remove { name } => {
                let file = dir.cert(name).display().to_string();
                send(
                    sock,
                    &format!("del ssl crt-list {list} {file}"),
                    |a| a.contains("deleted"),
                    timeout,
                )
                .await?;
                send(
                    sock,
                    &format!("del ssl cert {file}"),
                    |a| a.contains("deleted"),
                    timeout,
                )
                .await?;
                known.remove(name);
            }
            Op::Renew { name } | Op::Add { name } => {
                let Some(e) = served.get(name) else { continue };
                let file = dir.cert(name).display().to_string();
                let add = matches!(op, Op::Add { .. });
                if add {
                    send(
                        sock,
                        &format!("new ssl cert {file}"),
                        |a| a.contains("New empty certificate store"),
                        timeout,
                    )
                    .await?;
                }
                if let Err(f) = store(sock, name, &file, e, timeout).await {
                    // Nothing half-made is left behind: the transaction, and the empty
                    // store of an addition.
                    let _ =
                        socket::exchange(sock, &format!("abort ssl cert {file}"), timeout).await;
                    if add {
                        let _ =
                            socket::exchange(sock, &format!("del ssl cert {file}"), timeout).await;
                    }
                    return Err(f);
                }
                if add {
                    let line = files::crt_list_line(dir, name, e);
                    send(
                        sock,
                        &format!("add ssl crt-list {list} <<\n{line}\n"),
                        |a| a.contains("Success!"),
                        timeout,
                    )
                    .await?;
                }
                known.insert(name.clone(), e.clone());
            }
        }
    }
    Ok(ops.len())
}

/// `set ssl cert` with the PEM, then `commit ssl cert`: a refusal of either is the
/// certificate's.
async fn store(
    sock: &Path,
    name: &str,
    file: &str,
    e: &Entry,
    timeout: Duration,
) -> Result<(), Failure> {
    let refused = |answer: String| Failure::Cert {
        name: name.to_string(),
        answer,
    };
    let pem = e.cert.pem();
    let a = exchange(
        sock,
        &format!("set ssl cert {file} <<\n{}\n", pem.trim_end()),
        timeout,
    )
    .await?;
    if !a.contains("Transaction") {
        return Err(refused(a));
    }
    let a = exchange(sock, &format!("commit ssl cert {file}"), timeout).await?;
    if !a.contains("Success!") {
        return Err(refused(a));
    }
    Ok(())
}

async fn exchange(sock: &Path, cmd: &str, timeout: Duration) -> Result<String, Failure> {
    socket::exchange(sock, cmd, timeout)
        .await
        .map(|a| a.trim().to_string())
        .map_err(|e| {
            Failure::Other(format!(
                "HAProxy admin socket {} did not answer: {e}",
                sock.display()
            ))
        })
}

async fn send(
    sock: &Path,
    cmd: &str,
    ok: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Result<(), Failure> {
    let answer = exchange(sock, cmd, timeout).await?;
    if ok(&answer) {
        Ok(())
    } else {
        let shown = cmd.lines().next().unwrap_or(cmd);
        Err(Failure::Other(format!(
            "HAProxy refused `{shown}`: {answer}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::served::test_entry as entry;

    #[test]
    fn removals_go_first_and_hosts_follow_their_certificates() {
        let a = entry(&["a.example"]);
        let b = entry(&["b.example"]);
        let b2 = entry(&["b.example", "c.example"]);
        let known: BTreeMap<_, _> = [("a".to_string(), a), ("b".to_string(), b)].into();
        let served: BTreeMap<_, _> = [
            ("b".to_string(), b2),
            ("d".to_string(), entry(&["d.example"])),
        ]
        .into();
        assert_eq!(
            plan(&known, &served),
            [
                Op::DelHost("a.example".into()),
                Op::Remove { name: "a".into() },
                Op::Renew { name: "b".into() },
                Op::Add { name: "d".into() },
                Op::AddHost("c.example".into()),
                Op::AddHost("d.example".into()),
            ]
        );
        assert_eq!(plan(&served, &served), []);
    }
}
