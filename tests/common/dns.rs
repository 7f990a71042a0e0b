//! A DNS resolver the test controls, and processes that use it.
//!
//! `Dns` answers A queries on UDP port 53 of a loopback address of its own
//! (127.100-199.x.y, from the test's pid: no clash with parallel tests or with a
//! resolver of the machine's), with the addresses the test set last — or with a
//! different answer for the first query and the later ones (`answer_first_then`), or
//! not at all (`silence`), as a resolver that went away. Every other query type gets an
//! empty answer (AAAA: "no IPv6 address"), so libc settles on the A records.
//!
//! `use_resolv_conf` makes a child process (HAProxy, the watcher) look names up there:
//! the child enters a mount namespace of its own before exec and bind-mounts a
//! resolv.conf naming `Dns` over /etc/resolv.conf. The machine's file, and every other
//! process, are untouched. Needs root, as the netns tests do.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
enum Answer {
    Ips(Vec<Ipv4Addr>),
    Silent,
}

#[derive(Default)]
struct Script {
    /// Answers for the next A queries, one each, before `then`.
    next: VecDeque<Answer>,
    then: Option<Answer>,
}

pub struct Dns {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    queries: Arc<AtomicU64>,
    stop: CancellationToken,
}

static N: AtomicU32 = AtomicU32::new(0);

impl Dns {
    /// Starts answering every A query with `ips`.
    pub async fn start(ips: &[Ipv4Addr]) -> Dns {
        super::netns::require_root();
        let pid = std::process::id();
        let ip = Ipv4Addr::new(
            127,
            100 + (pid % 100) as u8,
            (pid / 100 % 256) as u8,
            1 + (N.fetch_add(1, Ordering::Relaxed) % 250) as u8,
        );
        let sock = tokio::net::UdpSocket::bind((ip, 53))
            .await
            .unwrap_or_else(|e| panic!("bind the test resolver on {ip}:53: {e}"));
        let addr = sock.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script {
            next: VecDeque::new(),
            then: Some(Answer::Ips(ips.to_vec())),
        }));
        let queries = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (sc, q, s) = (script.clone(), queries.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let (n, from) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = sock.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                };
                let Some((qtype, question_end)) = question(&buf[..n]) else {
                    continue;
                };
                let answer = if qtype == 1 {
                    q.fetch_add(1, Ordering::Relaxed);
                    let mut sc = sc.lock().unwrap();
                    let then = sc.then.clone();
                    sc.next.pop_front().or(then).unwrap_or(Answer::Silent)
                } else {
                    // Not an A query: silent only when A queries are.
                    let sc = sc.lock().unwrap();
                    match sc.next.front().or(sc.then.as_ref()) {
                        Some(Answer::Silent) | None => Answer::Silent,
                        Some(Answer::Ips(_)) => Answer::Ips(Vec::new()),
                    }
                };
                let Answer::Ips(ips) = answer else { continue };
                let reply = response(&buf[..question_end], &ips);
                let _ = sock.send_to(&reply, from).await;
            }
        });
        Dns {
            addr,
            script,
            queries,
            stop,
        }
    }

    /// Every A query from now on gets `ips`.
    pub fn answer(&self, ips: &[Ipv4Addr]) {
        let mut s = self.script.lock().unwrap();
        s.next.clear();
        s.then = Some(Answer::Ips(ips.to_vec()));
    }

    /// The next A query gets `first`, every later one `then`: a rebinding resolver.
    pub fn answer_first_then(&self, first: &[Ipv4Addr], then: &[Ipv4Addr]) {
        let mut s = self.script.lock().unwrap();
        s.next = VecDeque::from([Answer::Ips(first.to_vec())]);
        s.then = Some(Answer::Ips(then.to_vec()));
    }

    /// No query is answered from now on, as when the resolver is down.
    pub fn silence(&self) {
        let mut s = self.script.lock().unwrap();
        s.next.clear();
        s.then = Some(Answer::Silent);
    }

    /// A queries seen so far.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// A resolv.conf naming this resolver, written into `dir`. One try of one second,
    /// so a silent resolver fails a lookup quickly.
    pub fn resolv_conf(&self, dir: &Path) -> PathBuf {
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            format!(
                "nameserver {}\noptions timeout:1 attempts:1\n",
                self.addr.ip()
            ),
        )
        .expect("write resolv.conf");
        path
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The question of a query: (qtype, end of the question section).
fn question(msg: &[u8]) -> Option<(u16, usize)> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    while *msg.get(i)? != 0 {
        i += 1 + msg[i] as usize;
    }
    i += 1;
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((qtype, i + 4))
}

/// The response to `query` (header and question): `ips` as A records, TTL 0.
fn response(query: &[u8], ips: &[Ipv4Addr]) -> Vec<u8> {
    let mut out = query.to_vec();
    out[2] = 0x80 | (query[2] & 0x01); // QR, RD copied
    out[3] = 0x80; // RA, NOERROR
    out[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
    out[8..12].fill(0); // no authority, no additional (EDNS dropped)
    for ip in ips {
        out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// `cmd`'s process will look host names up through `resolv_conf`: it enters a mount
/// namespace of its own (private, so nothing propagates back) and bind-mounts the file
/// over /etc/resolv.conf before exec.
pub fn use_resolv_conf(cmd: &mut Command, resolv_conf: &Path) {
    use nix::mount::{mount, MsFlags};
    let src = resolv_conf.to_path_buf();
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                Some(src.as_path()),
                "/etc/resolv.conf",
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            Ok(())
        });
    }
}
