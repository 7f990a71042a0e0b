//! Hitless reloads under load: wrk through the shipped template's front door while the
//! watcher reloads HAProxy 50 times. Zero failed requests allowed.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed", Duration::from_secs(15), || async {
        fd.routes_to("web", "a").await || fd.routes_to("web", "b").await
    })
    .await;
    let reloads_before = fd.haproxy.reloads().await;
    // Every failed response is written to wrk's stderr, so a failure says what it was.
    let script = fd.dir.path().join("non200.lua");
    std::fs::write(&script, NON_200_LUA).expect("lua script");

    let wrk = tokio::process::Command::new("wrk")
        .args(["-t2", "-c32", "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(format!("-d{}s", LOAD.as_secs()))
        .args(["-H", &format!("Host: web.{DOMAIN}")])
        .arg(format!("http://{}/", fd.http_addr()))
        .kill_on_drop(true)
        .output();
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
    let out = out.expect("run wrk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = parse_wrk(&stdout);
    let failures = summarize(&String::from_utf8_lossy(&out.stderr));
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
    if report.non_2xx + report.socket_errors > 0 {
        eprintln!("failed responses (count, status, body):\n{failures}");
        let log = fd.haproxy.log_text();
        let interesting: Vec<&str> = log
            .lines()
            .filter(|l| {
                !l.contains("Proxy ") && !l.contains("NOTICE") && !l.contains("exited with code")
            })
            .collect();
        eprintln!("haproxy log (filtered):\n{}", interesting.join("\n"));
    }
    assert!(
        report.requests > 1000,
        "wrk made too few requests:\n{stdout}"
    );
    assert_eq!(report.non_2xx, 0, "non-2xx responses:\n{stdout}");
    assert_eq!(report.socket_errors, 0, "socket errors:\n{stdout}");
    assert!(
        reloads >= (CHANGES as u64) * 9 / 10,
        "only {reloads} reloads for {CHANGES} spaced changes"
    );
    let served_by_c = c.hits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served_by_c > 0, "the instance that came and went was used");
}
