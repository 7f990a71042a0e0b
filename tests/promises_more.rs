//! README promises that had no test of their own (issue 22, second batch), each against
//! the real parts: `Type=notify` (READY=1 after the first sync, WATCHDOG=1 pings, fed
//! during a long pass) for both daemons, the registrar's `/healthz` without etcd, and
//! hooks (retried, then dropped and counted; `timeout_ms`; a webhook URL never logged).
mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options};
use common::registrar::{Opts, Rig};
use common::*;

const T: Duration = Duration::from_secs(20);

// ---------- systemd notify ----------

/// A `NOTIFY_SOCKET` the test binds, as systemd would: every datagram, in order, on a
/// channel, and all of them kept.
struct NotifySocket {
    path: PathBuf,
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = seen.clone();
        // A thread, not a task: it lives as long as the socket, which the test drops.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                keep.lock().expect("lock").push(msg.clone());
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        NotifySocket { path, rx, seen }
    }

    /// `NOTIFY_SOCKET` and a watchdog of `watchdog` (`WATCHDOG_USEC`, no `WATCHDOG_PID`:
    /// any pid may ping, as with `NotifyAccess=all`).
    fn env(&self, watchdog: Duration) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".into(), self.path.display().to_string()),
            ("WATCHDOG_USEC".into(), watchdog.as_micros().to_string()),
        ]
    }

    /// The next datagram, within `limit`.
    async fn next(&mut self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the datagram carrying `READY=1`; how many `WATCHDOG=1` came before it.
    async fn ready(&mut self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let mut pings = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next(left).await else {
                let seen = self.seen.lock().expect("lock").clone();
                panic!("no READY=1 within {limit:?}; datagrams: {seen:?}");
            };
            if msg.lines().any(|l| l == "READY=1") {
                return pings;
            }
            pings += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }

    /// Waits for `n` more `WATCHDOG=1` pings; the longest gap between two of them.
    async fn pings(&mut self, n: usize, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        let (mut got, mut last, mut gap) = (0, Instant::now(), Duration::ZERO);
        while got < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next(left).await else {
                panic!("{got} of {n} watchdog pings within {limit:?}");
            };
            if msg.lines().any(|l| l == "WATCHDOG=1") {
                if got > 0 {
                    gap = gap.max(last.elapsed());
                }
                got += 1;
                last = Instant::now();
            }
        }
        gap
    }
}

/// `portolan watcher --config <fd.config>` with `env` added, logging to the front
/// door's `watcher.log` as `FrontDoor::start_watcher` does.
fn start_watcher_with(fd: &mut FrontDoor, env: &[(String, String)]) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&fd.watcher_log)
        .expect("watcher log");
    let mut cmd = portolan_cmd();
    cmd.arg("watcher")
        .arg("--config")
        .arg(&fd.config)
        .env(
            "RUST_LOG",
            "debug,h2=info,hyper=info,tower=info,reqwest=info",
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    fd.watcher = Some(Proc::spawn("portolan watcher", &mut cmd));
}

/// Under systemd (`Type=notify`), the watcher says READY=1 only once its first render
/// is live — the file HAProxy runs holds what etcd said — and pings the watchdog at
/// half of `WatchdogSec` from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_says_ready_after_its_first_render_and_keeps_pinging_the_watchdog() {
    const WATCHDOG: Duration = Duration::from_millis(600);
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let mut fd = FrontDoor::prepare(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    let mut notify = NotifySocket::bind(fd.dir.path());
    start_watcher_with(&mut fd, &notify.env(WATCHDOG));

    notify.ready(T).await;
    // Read the moment READY=1 is in: the watcher wrote and reloaded before saying it.
    assert!(
        fd.dest_text().contains("server a "),
        "READY=1 before the first render was live:\n{}",
        fd.dest_text()
    );
    assert!(
        fd.haproxy.reloads().await >= 1,
        "READY=1 before HAProxy reloaded"
    );
    // Pings at WATCHDOG/2 from an idle loop: systemd would kill it after WATCHDOG
    // without one. The gap bound is a generous sanity bound, not a timing claim.
    let gap = notify.pings(6, T).await;
    assert!(
        gap < Duration::from_secs(5),
        "longest gap between watchdog pings: {gap:?}"
    );
    eprintln!("watcher watchdog: longest gap {gap:?} (WATCHDOG_USEC {WATCHDOG:?})");
}

/// A pass that takes longer than `WatchdogSec` (here a check that sleeps 3 s) keeps the
/// watchdog fed while it runs: pings arrive before the READY=1 that ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_first_pass_keeps_the_watchdog_fed() {
    const WATCHDOG: Duration = Duration::from_millis(600);
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            check_cmd: "sleep 3; haproxy -c -q -f {src}".into(),
            ..Default::default()
        },
    )
    .await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    let mut notify = NotifySocket::bind(fd.dir.path());
    start_watcher_with(&mut fd, &notify.env(WATCHDOG));
    let during = notify.ready(T).await;
    // ~10 pings fit in 3 s at 300 ms; an unfed loop sends one or two before the pass.
    assert!(
        during >= 5,
        "only {during} watchdog ping(s) before READY=1 during a 3 s check"
    );
    eprintln!("watcher watchdog: {during} pings during a 3 s first pass");
}

/// The registrar says READY=1 once its first reconcile wrote this host's containers to
/// etcd, and pings the watchdog from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrar_says_ready_after_its_first_sync_and_keeps_pinging_the_watchdog() {
    const WATCHDOG: Duration = Duration::from_millis(600);
    let rig = Rig::new("reg-notify").await;
    let c = rig.container(&[]);
    let mut notify = NotifySocket::bind(rig.state.path());
    let env = notify.env(WATCHDOG);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let _registrar = rig.spawn_with_env(&Opts::default(), &env);

    notify.ready(T).await;
    // Read after READY=1 arrived: the write it reports came before it.
    assert!(
        rig.value(&rig.image_key(&c)).await.is_some(),
        "READY=1 before the running container was registered: {:?}",
        rig.services().await
    );
    assert!(rig.value(&rig.node_key()).await.is_some(), "no node key");
    let gap = notify.pings(6, T).await;
    assert!(
        gap < Duration::from_secs(5),
        "longest gap between watchdog pings: {gap:?}"
    );
    eprintln!("registrar watchdog: longest gap {gap:?} (WATCHDOG_USEC {WATCHDOG:?})");
}

// ---------- the registrar's /healthz ----------

/// `/healthz` answers 503 naming etcd while etcd is gone (registrations may be stale),
/// and 200 again once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registrars_healthz_is_503_while_etcd_is_gone_and_200_once_it_is_back() {
    let mut rig = Rig::new("reg-healthz").await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _registrar = rig.start(&Opts {
        toml: Some(format!("[registrar]\nlisten = \"{addr}\"\n")),
        ..Default::default()
    });
    let health = || async { http_get(&addr, "registrar", "/healthz").await };
    wait_until("healthz 200", T, || async {
        matches!(health().await, Some((200, _)))
    })
    .await;

    rig.etcd.stop();
    wait_until("healthz 503 without etcd", T, || async {
        matches!(health().await, Some((503, body)) if body.contains("etcd"))
    })
    .await;
    rig.etcd.restart().await;
    wait_until("healthz 200 with etcd back", T, || async {
        matches!(health().await, Some((200, _)))
    })
    .await;
}

// ---------- hooks ----------

/// Per connection: when it was accepted, and when it was closed (None: still open).
type Attempts = Arc<Mutex<Vec<(Instant, Option<Instant>)>>>;

/// A hook target that accepts and never answers. For every connection: when it was
/// accepted and when the client gave up on it (EOF).
struct Silent {
    port: u16,
    attempts: Attempts,
}

impl Silent {
    async fn start() -> Silent {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let attempts: Attempts = Arc::default();
        let log = attempts.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let n = {
                    let mut a = log.lock().expect("lock");
                    a.push((Instant::now(), None));
                    a.len() - 1
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(k) if k > 0) {}
                    log.lock().expect("lock")[n].1 = Some(Instant::now());
                });
            }
        });
        Silent { port, attempts }
    }

    fn attempts(&self) -> Vec<(Instant, Option<Instant>)> {
        self.attempts.lock().expect("lock").clone()
    }
}

/// A hook whose target never answers: each attempt ends after `timeout_ms`, the event
/// is tried 4 times with backoff, then dropped and counted in
/// `portolan_watcher_hook_events_total{result="dropped"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_never_answers_is_tried_four_times_of_timeout_ms_then_dropped_and_counted() {
    const TIMEOUT: Duration = Duration::from_millis(700);
    let etcd = Etcd::start().await;
    let silent = Silent::start().await;
    let mut fd = FrontDoor::prepare(&etcd, Options::default()).await;
    let cfg = std::fs::read_to_string(&fd.config).expect("config");
    std::fs::write(
        &fd.config,
        format!(
            "{cfg}\n[[hook]]\nevents = [\"reload\"]\nurl = \"http://127.0.0.1:{}/hook\"\ntimeout_ms = {}\n",
            silent.port,
            TIMEOUT.as_millis()
        ),
    )
    .expect("config");
    start_watcher_with(&mut fd, &[]);
    fd.wait_for_first_reload().await;
    let dropped = r#"portolan_watcher_hook_events_total{result="dropped"}"#;
    wait_until("the reload event dropped", T, || async {
        fd.metric(dropped).await == Some(1.0)
    })
    .await;
    let attempts = silent.attempts();
    assert_eq!(
        attempts.len(),
        4,
        "one event, four attempts: {attempts:?}\n{}",
        fd.log()
    );
    for (i, (start, end)) in attempts.iter().enumerate() {
        let end = end.unwrap_or_else(|| panic!("attempt {i} still open after the drop"));
        let lasted = end - *start;
        // Sanity bounds: not cut short, and not left to a default far beyond timeout_ms.
        assert!(
            lasted >= TIMEOUT.mul_f64(0.8) && lasted < TIMEOUT + Duration::from_secs(2),
            "attempt {i} lasted {lasted:?} with timeout_ms {TIMEOUT:?}"
        );
    }
    assert_eq!(
        fd.metric(r#"portolan_watcher_hook_events_total{result="delivered"}"#)
            .await,
        Some(0.0)
    );
    assert!(
        fd.log().contains("hook failed 4 times: event dropped"),
        "{}",
        fd.log()
    );
}

/// A webhook URL is a secret (Slack's carry the token in the path): a hook that fails
/// every way it can — refused, unanswered — logs its host and never its user, password,
/// path or query, even at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_never_prints_a_webhook_urls_secret_parts() {
    let etcd = Etcd::start().await;
    let silent = Silent::start().await;
    let refused = free_port();
    let mut fd = FrontDoor::prepare(&etcd, Options::default()).await;
    let cfg = std::fs::read_to_string(&fd.config).expect("config");
    std::fs::write(
        &fd.config,
        format!(
            r#"{cfg}
[[hook]]
events = ["reload"]
url = "http://hookuser:PASSWORD-refused@127.0.0.1:{refused}/services/PATH-refused?token=QUERY-refused"
timeout_ms = 300

[[hook]]
events = ["reload"]
url = "http://hookuser:PASSWORD-silent@127.0.0.1:{}/services/PATH-silent?token=QUERY-silent"
timeout_ms = 300
"#,
            silent.port
        ),
    )
    .expect("config");
    start_watcher_with(&mut fd, &[]);
    fd.wait_for_first_reload().await;
    // The marker: both hooks gave up, so every line about them is written.
    wait_until("both hooks' events dropped", T, || async {
        fd.metric(r#"portolan_watcher_hook_events_total{result="dropped"}"#)
            .await
            == Some(2.0)
    })
    .await;
    let log = fd.log();
    assert!(
        log.contains("hook delivery failed"),
        "debug lines of the attempts are in the log:\n{log}"
    );
    assert!(log.contains("127.0.0.1"), "the host is named:\n{log}");
    for secret in ["hookuser", "PASSWORD", "PATH-", "QUERY-", "token="] {
        assert!(
            !log.contains(secret),
            "the log shows {secret:?} of a webhook URL:\n{log}"
        );
    }
}

// ---------- drain: a custom StopSignal, a registrar restarted mid-drain ----------

/// True while the registered record of `key` says draining.
async fn draining(rig: &Rig, key: &str) -> bool {
    rig.value(key)
        .await
        .is_some_and(|v| common::registrar::record(&v).draining)
}

/// A container whose `StopSignal` is SIGUSR1 drains on SIGUSR1 — what `docker stop`
/// sends it — and not on SIGTERM, which for it is just another signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_stop_signal_drains_and_sigterm_then_does_not() {
    let rig = Rig::new("reg-stopsig").await;
    let _registrar = rig.start(&Opts::default());
    // PID 1 with no handler: neither signal ends it, so each `kill` is only an event.
    let c = Container::run(
        &rig.run,
        &[
            "-p",
            "127.0.0.1::8080",
            "--stop-signal",
            "SIGUSR1",
            "--stop-timeout",
            "2",
        ],
        Some(&["sh", "-c", "/bin/serve & wait"]),
    );
    let key = rig.image_key(&c);
    rig.wait_value(&key, T).await;
    let events = common::registrar::DockerEvents::start(&rig.run);
    let before = rig.kvs().await[&key].mod_revision;
    docker(&["kill", "-s", "TERM", &c.id]);
    events.wait_for(&c.id, "kill").await;
    // The marker is registered after the registrar saw the TERM's kill event.
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    assert_eq!(
        rig.kvs().await[&key].mod_revision,
        before,
        "SIGTERM rewrote the record of a container whose stop signal is SIGUSR1"
    );
    assert!(!draining(&rig, &key).await);

    docker(&["kill", "-s", "USR1", &c.id]);
    wait_until("SIGUSR1 drains it", T, || draining(&rig, &key)).await;
}

/// A registrar SIGKILLed while a container drains, and started again, keeps the drain
/// it finds in etcd: the stopping container does not go back into rotation until its
/// stop timeout (+ 2 s) has passed again, counted from the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registrar_restarted_mid_drain_keeps_the_drain_then_gives_it_back() {
    const STOP_TIMEOUT: u64 = 8;
    // A registrar replays Docker's events of the last 2 s at start (no gap between its
    // list and its watch), which would find the `kill` again: restart later than that,
    // so only what etcd holds can carry the drain over.
    const REPLAY: Duration = Duration::from_secs(3);
    let rig = Rig::new("reg-middrain").await;
    let mut registrar = rig.spawn(&Opts::default());
    let c = Container::run(
        &rig.run,
        &[
            "-p",
            "127.0.0.1::8080",
            "--stop-timeout",
            &STOP_TIMEOUT.to_string(),
        ],
        Some(&["sh", "-c", "trap '' TERM; /bin/serve & wait"]),
    );
    let key = rig.image_key(&c);
    rig.wait_value(&key, T).await;
    docker(&["kill", "-s", "TERM", &c.id]);
    wait_until("draining", T, || draining(&rig, &key)).await;
    let killed = Instant::now();
    // Still draining all along: the first registrar does not give it back early.
    while killed.elapsed() < REPLAY {
        assert!(draining(&rig, &key).await, "given back before the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    registrar.sigkill();
    let restarted = Instant::now();
    let _registrar = rig.spawn(&Opts::default());
    // The marker is registered by the new registrar, after its first reconcile.
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    assert!(
        draining(&rig, &key).await,
        "the restarted registrar put a stopping container back into rotation"
    );
    wait_until("given back", T, || async {
        rig.value(&key).await.is_some() && !draining(&rig, &key).await
    })
    .await;
    let took = restarted.elapsed();
    eprintln!("mid-drain restart: given back {took:?} after the restart (stop timeout {STOP_TIMEOUT} s + 2 s)");
    assert!(
        took >= Duration::from_secs(STOP_TIMEOUT),
        "given back {took:?} after the restart, before the stop timeout"
    );
}
