//! Instances named by a DNS name, against a resolver the test controls (`dns::Dns`,
//! through HAProxy's and the watcher's own libc): HAProxy is handed the addresses the
//! routing policy approved and never the name, so an answer that changes between the
//! watcher's lookup and HAProxy's (DNS rebinding) cannot aim the front door elsewhere; a
//! resolver that stops answering costs nothing for `dns_stale_s`; a restarted watcher
//! renders the last good answers it kept, before its first lookup.
mod common;

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::Dns;
use common::haproxy::{Backend, FrontDoor, Options};
use common::*;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);
const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// (time since the start, the front door's answer).
type Answers = Vec<(Duration, Option<(u16, String)>)>;

/// What the front door answered for a service every 50 ms, and whether the rendered
/// config ever held a given text, until stopped.
struct Prober {
    seen: Arc<Mutex<Answers>>,
    named: Arc<Mutex<bool>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(fd: &FrontDoor, service: &str, never_in_config: &str) -> Prober {
        let (addr, host) = (fd.http_addr(), format!("{service}.test"));
        let (dest, needle) = (fd.dest.clone(), never_in_config.to_string());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let named = Arc::new(Mutex::new(false));
        let stop = CancellationToken::new();
        let (s, n, st) = (seen.clone(), named.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            while !st.is_cancelled() {
                let got = http_get(&addr, &host, "/").await;
                s.lock().unwrap().push((t0.elapsed(), got));
                if std::fs::read_to_string(&dest)
                    .unwrap_or_default()
                    .contains(&needle)
                {
                    *n.lock().unwrap() = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Prober {
            seen,
            named,
            stop,
            task,
        }
    }

    /// (every answer, whether the config ever held the text).
    async fn stop(self) -> (Answers, bool) {
        self.stop.cancel();
        self.task.await.unwrap();
        let seen = self.seen.lock().unwrap().clone();
        let named = *self.named.lock().unwrap();
        (seen, named)
    }
}

fn answered(got: &Option<(u16, String)>) -> String {
    match got {
        Some((s, b)) => format!("{s} {}", b.trim()),
        None => "no answer".into(),
    }
}

async fn front_door(etcd: &Etcd, dns: &Dns, allowed: &str, extra: &str) -> FrontDoor {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dns.resolv_conf(dir.path());
    let fd = FrontDoor::start(
        etcd,
        Options {
            allowed_networks: Some(vec![allowed.into()]),
            watcher_extra: format!("dns_refresh_s = 1\n{extra}"),
            resolv_conf: Some(resolv.clone()),
            ..Default::default()
        },
    )
    .await;
    // The resolv.conf must outlive the processes that bind-mounted it.
    std::mem::forget(dir);
    fd
}

/// The attack: the name answers an allowed address to the first query (the watcher's
/// check) and a denied one — another service on this host, same port — to every later
/// query, which is when HAProxy would look it up, at its check and its reload. The
/// front door never reaches the denied address, its config never holds the name, and
/// the rebinding is refused and named: the instance leaves (an answer naming a denied
/// address is an answer, not a failure to keep the last one for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_rebinding_to_a_denied_address_never_reaches_haproxy() {
    let etcd = Etcd::start().await;
    let real = Backend::start("real").await;
    let port = real.addr.port();
    let secret = Backend::start_on("secret", &format!("127.0.0.2:{port}")).await;
    let dns = Dns::start(&[]).await;
    dns.answer_first_then(&[LOCAL], &[Ipv4Addr::new(127, 0, 0, 2)]);
    let fd = front_door(&etcd, &dns, "127.0.0.1/32", "").await;
    let prober = Prober::start(&fd, "api", "rebind.test");
    let key = fd.service_key("api", "x");
    etcd.put(&key, &format!("api.rebind.test:{port}")).await;
    wait_until("api is routed", T, || async {
        matches!(fd.get("api").await, Some((200, _)))
    })
    .await;
    let routed = fd.dest_text();
    wait_until("the rebinding is refused, naming the key", T, || async {
        fd.log()
            .lines()
            .any(|l| l.contains(&key) && l.contains("127.0.0.2"))
    })
    .await;
    wait_until("the instance has left", T, || async {
        matches!(fd.get("api").await, Some((503, _)))
    })
    .await;
    let (seen, named) = prober.stop().await;
    let secret_hits: Vec<_> = seen
        .iter()
        .filter(|(_, g)| answered(g).contains("secret"))
        .collect();
    assert!(
        secret_hits.is_empty() && secret.hits.load(std::sync::atomic::Ordering::Relaxed) == 0,
        "the front door reached the rebound address: {secret_hits:?}\nconfig:\n{routed}"
    );
    assert!(!named, "HAProxy's config held the host name:\n{routed}");
    assert!(
        routed.contains(&format!("127.0.0.1:{port}")),
        "the approved address is what HAProxy got:\n{routed}"
    );
    assert!(!fd.dest_text().contains(&format!(":{port} ")));
}

/// The resolver stops answering: the instance keeps being routed on its last good
/// answer for `dns_stale_s`, then leaves, named in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_whose_resolver_stops_answering_is_routed_for_dns_stale_s_then_left_out_and_named() {
    const STALE: Duration = Duration::from_secs(4);
    let etcd = Etcd::start().await;
    let real = Backend::start("real").await;
    let port = real.addr.port();
    let dns = Dns::start(&[LOCAL]).await;
    let fd = front_door(&etcd, &dns, "127.0.0.0/8", "dns_stale_s = 4\n").await;
    let key = fd.service_key("api", "x");
    etcd.put(&key, &format!("api.stale.test:{port}")).await;
    wait_until("api is routed", T, || fd.routes_to("api", "real")).await;
    let before = dns.queries();
    dns.silence();
    let silenced = Instant::now();
    let prober = Prober::start(&fd, "api", "stale.test");
    wait_until("two lookups failed", T, || async {
        dns.queries() >= before + 2
    })
    .await;
    let left = wait_until("the instance leaves after dns_stale_s", T, || async {
        matches!(fd.get("api").await, Some((503, _)))
    })
    .await;
    let (seen, named) = prober.stop().await;
    // The last good answer came at most one refresh before the silence.
    let kept_for = STALE - Duration::from_millis(1_500);
    let early: Vec<_> = seen
        .iter()
        .filter(|(t, g)| *t < kept_for && answered(g) != "200 real")
        .collect();
    assert!(
        early.is_empty(),
        "not routed while the last good answer was fresh: {early:?}"
    );
    assert!(
        silenced.elapsed() >= kept_for,
        "left {left:?} after the silence, within dns_stale_s"
    );
    assert!(!named, "the config held the host name");
    let log = fd.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&key) && l.contains("dns_stale_s")),
        "the instance's leaving is named:\n{log}"
    );
}

/// The watcher restarts while the resolver is down: the instance is rendered from the
/// answer kept in the state dir before any lookup, so the front door never stops
/// routing it, and the restart costs the one reload every restart makes — not a second
/// one when the name resolves, and none while its lookups fail. A new service put
/// after the restart is the next reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_watcher_renders_dns_names_from_the_kept_answers_with_no_gap_and_no_extra_reload(
) {
    let etcd = Etcd::start().await;
    let real = Backend::start("real").await;
    let marker = Backend::start("marker").await;
    let port = real.addr.port();
    let dns = Dns::start(&[LOCAL]).await;
    let mut fd = front_door(&etcd, &dns, "127.0.0.0/8", "").await;
    etcd.put(
        &fd.service_key("api", "x"),
        &format!("api.restart.test:{port}"),
    )
    .await;
    wait_until("api is routed", T, || fd.routes_to("api", "real")).await;
    // A refresh after the first answer: the answer has been kept more than once.
    let q = dns.queries();
    wait_until("a refresh", T, || async { dns.queries() >= q + 2 }).await;
    let live = fd.dest_text();

    fd.kill_watcher();
    dns.silence();
    let reloads = fd.haproxy.reloads().await;
    let prober = Prober::start(&fd, "api", "restart.test");
    fd.start_watcher();
    // /healthz answers 200 once the first render from etcd has been applied.
    wait_until("the restarted watcher's first render", T, || async {
        matches!(
            http_get(&fd.metrics_addr(), "x", "/healthz").await,
            Some((200, _))
        )
    })
    .await;
    // Every restart reloads once (HAProxy may run an older file than dest: a previous
    // run may have died between rename and reload); that is the only one.
    assert_eq!(
        fd.haproxy.reloads().await,
        reloads + 1,
        "the file before the restart:\n{live}\nafter:\n{}",
        fd.dest_text()
    );
    assert!(
        fd.routes_to("api", "real").await,
        "the first render after the restart left the DNS-named instance out:\n{}",
        fd.dest_text()
    );
    // Lookups keep failing meanwhile, and cause nothing; a later change is the next reload.
    let q = dns.queries();
    wait_until("two failed lookups", T, || async { dns.queries() >= q + 2 }).await;
    etcd.put(&fd.service_key("marker", "m"), &marker.addr_string())
        .await;
    wait_until("the restarted watcher routes the marker", T, || {
        fd.routes_to("marker", "marker")
    })
    .await;
    assert!(fd.routes_to("api", "real").await);
    assert_eq!(
        fd.haproxy.reloads().await,
        reloads + 2,
        "the marker's reload"
    );
    let (seen, named) = prober.stop().await;
    let gaps: Vec<_> = seen
        .iter()
        .filter(|(_, g)| answered(g) != "200 real")
        .collect();
    assert!(gaps.is_empty(), "a gap across the restart: {gaps:?}");
    assert!(!named, "the config held the host name");
    assert!(fd.dest_text().contains(&format!("127.0.0.1:{port}")));
}
