//! Hitless changes under load: wrk through the shipped template's front door while the
//! watcher reloads HAProxy 50 times, or makes 50 membership changes through the runtime
//! API. Zero failed requests allowed.
mod common;

use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options, DOMAIN};
use common::*;

const LOAD: Duration = Duration::from_secs(20);
const CHANGES: u32 = 50;

const NON_200_LUA: &str = r#"
response = function(status, headers, body)
  if status ~= 200 then
    io.stderr:write("NON200 " .. status .. " " .. string.sub(body or "", 1, 100):gsub("\n", " ") .. "\n")
  end
end
"#;

/// "count status body" lines from the Lua script's output.
fn summarize(stderr: &str) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for l in stderr.lines().filter_map(|l| l.strip_prefix("NON200 ")) {
        *counts.entry(l.to_string()).or_insert(0u64) += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n:>6} {k}\n"))
        .collect()
}

/// The counts wrk prints.
#[derive(Debug, Default)]
struct WrkReport {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
}

fn parse_wrk(out: &str) -> WrkReport {
    let mut r = WrkReport::default();
    for line in out.lines().map(str::trim) {
        if line.contains(" requests in ") {
            r.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().unwrap_or(u64::MAX);
        }
    }
    r
}

#[test]
fn wrk_report_parsing() {
    let out = "Running 1s test @ http://x/\n  2 threads and 4 connections\n  1234 requests in 1.00s, 1KB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 7\nRequests/sec: 1234\n";
    let r = parse_wrk(out);
    assert_eq!((r.requests, r.socket_errors, r.non_2xx), (1234, 6, 7));
}

/// `wrk` for `LOAD` against web.<domain>, writing every failed response to stderr.
fn wrk(fd: &FrontDoor) -> impl std::future::Future<Output = std::io::Result<std::process::Output>> {
    let script = fd.dir.path().join("non200.lua");
    std::fs::write(&script, NON_200_LUA).expect("lua script");
    tokio::process::Command::new("wrk")
        .args(["-t2", "-c32", "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(format!("-d{}s", LOAD.as_secs()))
        .args(["-H", &format!("Host: web.{DOMAIN}")])
        .arg(format!("http://{}/", fd.http_addr()))
        .kill_on_drop(true)
        .output()
}

/// Parses wrk's output; on failures prints them and the interesting HAProxy log lines.
fn report(fd: &FrontDoor, out: std::process::Output) -> WrkReport {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = parse_wrk(&stdout);
    if report.non_2xx + report.socket_errors > 0 {
        let failures = summarize(&String::from_utf8_lossy(&out.stderr));
        eprintln!("wrk output:\n{stdout}\nfailed responses (count, status, body):\n{failures}");
        let log = fd.haproxy.log_text();
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| {
                !l.contains("Proxy ") && !l.contains("NOTICE") && !l.contains("exited with code")
            })
            .collect();
        eprintln!("haproxy log (filtered):\n{}", interesting.join("\n"));
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed", Duration::from_secs(30), || async {
        fd.routes_to("web", "a").await || fd.routes_to("web", "b").await
    })
    .await;
    let reloads_before = fd.haproxy.reloads().await;
    let wrk = wrk(&fd);
    let changes = async {
        // Spread the changes over the run, leaving a second at each end.
        let spacing = (LOAD - Duration::from_secs(2)) / CHANGES;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        for i in 0..CHANGES {
            let key = fd.service_key("web", "c");
            if i % 2 == 0 {
                etcd.put(&key, &c.record()).await;
            } else {
                etcd.delete(&key).await;
            }
            tokio::time::sleep_until((start + spacing * (i + 1)).into()).await;
        }
    };
    let (out, ()) = tokio::join!(wrk, changes);
    let report = report(&fd, out.expect("run wrk"));
    let reloads = fd.haproxy.reloads().await - reloads_before;
    eprintln!(
        "watcher load: wrk {}s, {} requests, {} non-2xx, {} socket errors, {} reloads for {} changes",
        LOAD.as_secs(),
        report.requests,
        report.non_2xx,
        report.socket_errors,
        reloads,
        CHANGES
    );
    assert!(report.requests > 1000, "wrk made too few requests");
    assert_eq!(report.non_2xx, 0, "non-2xx responses");
    assert_eq!(report.socket_errors, 0, "socket errors");
    assert!(
        reloads >= (CHANGES as u64) * 9 / 10,
        "only {reloads} reloads for {CHANGES} spaced changes"
    );
    let served_by_c = c.hits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served_by_c > 0, "the instance that came and went was used");
}

/// The fast path under load: the same 50 changes go through the runtime API, so HAProxy
/// reloads nothing, and no request fails. Also measures put → first request served by
/// the new instance (wrk's traffic is the probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_runtime_changes_under_load_reload_nothing_and_fail_no_request() {
    use std::sync::atomic::Ordering::Relaxed;
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed to a and b", Duration::from_secs(30), || async {
        fd.routes_to("web", "a").await && fd.routes_to("web", "b").await
    })
    .await;
    let reloads_before = fd.haproxy.reloads().await;
    let runtime = r#"portolan_watcher_runtime_updates_total{result="ok"}"#;
    let runtime_before = fd.metric(runtime).await.unwrap_or(0.0);
    let wrk = wrk(&fd);
    let changes = async {
        let spacing = (LOAD - Duration::from_secs(2)) / CHANGES;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        let mut routed = Vec::new();
        for i in 0..CHANGES {
            let key = fd.service_key("web", "c");
            if i % 2 == 0 {
                let hits = c.hits.load(Relaxed);
                let put = Instant::now();
                etcd.put(&key, &c.record()).await;
                while c.hits.load(Relaxed) == hits {
                    assert!(put.elapsed() < Duration::from_secs(10), "c never served");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                routed.push(put.elapsed());
            } else {
                etcd.delete(&key).await;
            }
            tokio::time::sleep_until((start + spacing * (i + 1)).into()).await;
        }
        routed
    };
    let (out, mut routed) = tokio::join!(wrk, changes);
    let report = report(&fd, out.expect("run wrk"));
    let reloads = fd.haproxy.reloads().await - reloads_before;
    let applied = fd.metric(runtime).await.unwrap_or(0.0) - runtime_before;
    routed.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "watcher load (runtime API): wrk {}s, {} requests, {} non-2xx, {} socket errors, {} reloads, {} runtime applies for {} changes",
        LOAD.as_secs(),
        report.requests,
        report.non_2xx,
        report.socket_errors,
        reloads,
        applied,
        CHANGES
    );
    eprintln!(
        "watcher latency (runtime API): put→routed median={:.1} ms max={:.1} ms (n={})",
        ms(routed[routed.len() / 2]),
        ms(routed[routed.len() - 1]),
        routed.len()
    );
    // The runtime API's own share, from the watcher's log lines (adds only).
    let mut api: Vec<f64> = fd
        .log()
        .lines()
        .filter(|l| l.contains("(+1 -0 ~0 servers)"))
        .filter_map(|l| {
            let head = l.split(" ms of it in the runtime API").next()?;
            head.rsplit(' ').next()?.parse().ok()
        })
        .collect();
    api.sort_by(f64::total_cmp);
    if let (Some(mid), Some(max)) = (api.get(api.len() / 2), api.last()) {
        eprintln!(
            "watcher runtime API commands (add, enable health, enable server): median={mid:.2} ms max={max:.2} ms (n={})",
            api.len()
        );
    }
    assert!(report.requests > 1000, "wrk made too few requests");
    assert_eq!(report.non_2xx, 0, "non-2xx responses");
    assert_eq!(report.socket_errors, 0, "socket errors");
    assert_eq!(reloads, 0, "membership changes must not reload HAProxy");
    assert_eq!(
        applied, CHANGES as f64,
        "every change went through the runtime API"
    );
    assert!(!fd.dest_text().contains("server c "), "the file follows");
    assert!(fd.dest_is_valid());
}
