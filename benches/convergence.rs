//! `cargo bench --bench convergence`: how fast a change in etcd (or in Docker) becomes
//! what HAProxy routes, measured end to end with real etcd, HAProxy, watcher, registrar,
//! containers and HTTP requests on 127.0.0.1, each figure printed beside its target.
//!
//! Rows (`--large` adds 100,000 instances; `--quick` runs fewer changes):
//! - the runtime path and the reload path: one instance put beside a steady one and
//!   deleted again, each write measured on its own; put → first request answered by the
//!   new one, delete → 20 requests in a row miss it (fresh connection per request);
//! - a burst of 1,000 puts: reloads, runtime batches, time until HAProxy runs them all;
//! - 10,000 instances over 1,000 services (a template without health checks, so only
//!   Portolan's costs count): watcher start → first file, one change → HAProxy runs it,
//!   peak RSS, etcd writes in steady state;
//! - Docker: `docker run` → routed and `docker kill` → unrouted, real containers;
//! - wrk through the front door during membership changes and structural reloads.
//!
//! Writes `docs/convergence.json` (every figure, the machine) and `docs/convergence.svg`
//! (the CDF of put → routed, runtime path against reload path).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/machine.rs"]
mod machine;
use machine::machine;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::haproxy::{Backend, FrontDoor, Options};
use common::registrar::{InProcess, Opts, Rig};
use common::*;
use serde_json::json;

struct Row {
    what: String,
    measured: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn row(&mut self, what: &str, measured: String, target: &str, met: Option<bool>) {
        self.rows.push(Row {
            what: what.into(),
            measured,
            target: target.into(),
            met,
        });
    }
}

/// Every millisecond: the tests' 20 ms poll would round every figure up to it.
async fn when<F, Fut>(limit: Duration, cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    common::when(limit, Duration::from_millis(1), cond).await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99, max) in ms.
fn pcts(samples: &[Duration]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = samples.iter().copied().map(ms).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn pct_text(samples: &[Duration]) -> String {
    let (p50, p99, max) = pcts(samples);
    format!(
        "p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (n={})",
        samples.len()
    )
}

fn mem_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls `service` through the front door until `new` answers (routed) and then until
/// 20 requests in a row miss `old` (unrouted: from the start to the first of those 20).
async fn measure_switch(
    fd: &FrontDoor,
    service: &str,
    old: Option<&str>,
    new: Option<&str>,
    start: Instant,
    limit: Duration,
) -> (Option<Duration>, Option<Duration>) {
    let (mut routed, mut unrouted) = (None, None);
    let mut misses = 0;
    let mut first_miss = None;
    while start.elapsed() < limit
        && (routed.is_none() && new.is_some() || unrouted.is_none() && old.is_some())
    {
        let body = fd.get(service).await.map(|(_, b)| b.trim().to_string());
        let t = start.elapsed();
        if new.is_some() && routed.is_none() && body.as_deref() == new {
            routed = Some(t);
        }
        if let Some(old) = old {
            if body.as_deref() == Some(old) {
                misses = 0;
                first_miss = None;
            } else {
                misses += 1;
                first_miss.get_or_insert(t);
                if misses >= 20 && unrouted.is_none() {
                    unrouted = first_miss;
                }
            }
        }
    }
    (routed, unrouted)
}

/// `n` comings and goings of one instance of `web` beside a steady one (`keep`, so the
/// service always answers): each put is measured until the first request the new
/// instance answers (routed), then its delete, on its own, until 20 requests in a row
/// miss it (unrouted). Two separate writes, two separate samples: a swap in one txn
/// made the first miss of the old instance the first answer of the new one, so the
/// delete row only repeated the put row's samples.
async fn swaps(
    fd: &FrontDoor,
    etcd: &Etcd,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>, usize, u64) {
    let keep = Backend::start("swap-keep").await;
    let comer = Backend::start("swap-new").await;
    etcd.put(&fd.service_key("web", "keep"), &keep.record())
        .await;
    wait_until("web routed", Duration::from_secs(20), || {
        fd.routes_to("web", "swap-keep")
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    let (mut put, mut del, mut lost) = (Vec::new(), Vec::new(), 0);
    for i in 1..=n {
        let key = fd.service_key("web", &format!("i{i}"));
        let start = Instant::now();
        etcd.put(&key, &comer.record()).await;
        let (routed, _) = measure_switch(
            fd,
            "web",
            None,
            Some(&comer.name),
            start,
            Duration::from_secs(10),
        )
        .await;
        let start = Instant::now();
        etcd.delete(&key).await;
        let (_, unrouted) = measure_switch(
            fd,
            "web",
            Some(&comer.name),
            None,
            start,
            Duration::from_secs(10),
        )
        .await;
        match (routed, unrouted) {
            (Some(r), Some(u)) => {
                put.push(r);
                del.push(u);
            }
            _ => lost += 1,
        }
    }
    let reloads = fd.haproxy.reloads().await - reloads;
    (put, del, lost, reloads)
}

async fn runtime_and_reload_paths(r: &mut Report, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let etcd = Etcd::start().await;
    let mut samples = Vec::new();
    for (label, admin) in [("runtime path", true), ("reload path", false)] {
        let fd = FrontDoor::start(
            &etcd,
            Options {
                admin_socket: admin,
                ..Default::default()
            },
        )
        .await;
        let (put, del, lost, reloads) = swaps(&fd, &etcd, n).await;
        let (p50, p99, _) = pcts(&put);
        let (d50, d99, _) = pcts(&del);
        let runtime = label == "runtime path";
        r.row(
            &format!("few instances, {label}: put → routed"),
            pct_text(&put),
            if runtime {
                "p50 ≤ 5 ms, p99 ≤ 20 ms"
            } else {
                "-"
            },
            runtime.then_some(p50 <= 5.0 && p99 <= 20.0),
        );
        r.row(
            &format!("few instances, {label}: delete → unrouted"),
            pct_text(&del),
            if runtime {
                "p50 ≤ 5 ms, p99 ≤ 20 ms"
            } else {
                "-"
            },
            runtime.then_some(d50 <= 5.0 && d99 <= 20.0),
        );
        r.row(
            &format!("few instances, {label}: changes lost / reloads for {n} swaps"),
            format!("{lost} lost, {reloads} reloads"),
            if runtime {
                "0 lost, ≤ 2 reloads"
            } else {
                "0 lost"
            },
            Some(lost == 0 && (!runtime || reloads <= 2)),
        );
        r.json.insert(
            format!("swaps_{}", if runtime { "runtime" } else { "reload" }),
            json!({"put_to_routed_ms": put.iter().copied().map(ms).collect::<Vec<_>>(),
                   "delete_to_unrouted_ms": del.iter().copied().map(ms).collect::<Vec<_>>(),
                   "lost": lost, "reloads": reloads}),
        );
        samples.push(put);
    }
    let reload = samples.pop().unwrap_or_default();
    let runtime = samples.pop().unwrap_or_default();
    (runtime, reload)
}

/// A service with a single instance that restarts `n` times (delete, 503, put back):
/// its backend lingers empty (`empty_backend_grace_s`), so no restart should reload.
async fn restarts(r: &mut Report, n: usize) {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    let b = Backend::start("solo").await;
    let key = fd.service_key("solo", "only");
    etcd.put(&key, &b.record()).await;
    wait_until("solo routed", Duration::from_secs(20), || {
        fd.routes_to("solo", "solo")
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    let mut back = Vec::new();
    for _ in 0..n {
        etcd.delete(&key).await;
        wait_until("solo unrouted", Duration::from_secs(20), || async {
            matches!(fd.get("solo").await, Some((503, _)))
        })
        .await;
        let t = Instant::now();
        etcd.put(&key, &b.record()).await;
        if when(Duration::from_secs(20), || fd.routes_to("solo", "solo"))
            .await
            .is_some()
        {
            back.push(t.elapsed());
        }
    }
    let reloads = fd.haproxy.reloads().await - reloads;
    r.row(
        &format!("single-instance service restarted {n} times: reloads"),
        format!("{reloads} reloads; put back → routed {}", pct_text(&back)),
        "0 reloads",
        Some(reloads == 0),
    );
    r.json.insert(
        "restarts".into(),
        json!({"reloads": reloads, "put_to_routed_ms": back.iter().copied().map(ms).collect::<Vec<_>>()}),
    );
}

async fn burst(r: &mut Report) {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    let b = Backend::start("burst").await;
    etcd.put(&fd.service_key("burst", "seed"), &b.record())
        .await;
    wait_until("burst routed", Duration::from_secs(20), || {
        fd.routes_to("burst", "burst")
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    let mut client = etcd.client().await;
    let start = Instant::now();
    for i in 0..1000 {
        client
            .put(
                fd.service_key("burst", &format!("b{i:04}")),
                b.record(),
                None,
            )
            .await
            .expect("put");
    }
    let written = start.elapsed();
    let ok = eventually(Duration::from_secs(60), || async {
        fd.admin("show servers state svc_burst")
            .await
            .lines()
            .filter(|l| l.contains(" svc_burst "))
            .count()
            == 1001
    })
    .await;
    let took = start.elapsed();
    let reloads = fd.haproxy.reloads().await - reloads;
    let batches = fd
        .metric(r#"portolan_watcher_runtime_updates_total{result="ok"}"#)
        .await
        .unwrap_or(0.0);
    r.row(
        "burst of 1,000 puts: time until HAProxy runs all",
        if ok {
            format!(
                "{:.0} ms (puts written in {:.0} ms); {reloads} reloads, {batches} runtime batches",
                ms(took),
                ms(written)
            )
        } else {
            "not all within 60 s".into()
        },
        "all applied, few reloads",
        Some(ok),
    );
    r.json.insert("burst".into(), json!({"ms": ms(took), "written_ms": ms(written), "reloads": reloads, "runtime_batches": batches, "complete": ok}));
}

/// A watcher over `n` instances in `services` services, with a template without health
/// checks and the runtime API on.
/// `targets`: start → file (ms), one change p50 (ms), peak RSS (MB), one change p99
/// (ms, 0 = none).
async fn scale(r: &mut Report, n: usize, services: usize, targets: (f64, f64, f64, u64)) {
    let etcd = Etcd::start().await;
    let template = "global\n    stats socket {{ vars.admin_socket }} mode 600 level admin\n\
defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\
frontend fe\n    bind {{ vars.http_bind }}\n\
{% for name, list in services %}    use_backend svc_{{ name }} if { req.hdr(host) -m str {{ name }}.test }\n{% endfor %}\
{% for name, list in services %}backend svc_{{ name }}\n{% for i in list %}    server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}";
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            template: Some(template.into()),
            admin_socket: true,
            ..Default::default()
        },
    )
    .await;
    let mut client = etcd.client().await;
    let fill = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    fd.service_key(&format!("s{:05}", i % services), &format!("n{i:06}")),
                    format!(
                        r#"{{"addr":"127.0.0.{}:{}","node":"n","weight":100}}"#,
                        1 + i % 200,
                        1024 + i % 60000
                    ),
                    None,
                )
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("fill txn");
    }
    let filled = fill.elapsed();
    let start = Instant::now();
    fd.start_watcher();
    // Not `wait_for_first_reload`: its 20 s are a test's bound, not this row's.
    let first = when(Duration::from_secs(300), || async {
        fd.haproxy.status().await.is_some_and(|s| s.reloads >= 1)
    })
    .await;
    assert!(first.is_some(), "no first file within 300 s:\n{}", fd.log());
    let first_file = start.elapsed();
    let pid = fd.watcher.as_ref().map(|p| p.pid()).unwrap_or(0);
    let mut changes = Vec::new();
    for i in 0..20 {
        let name = format!("extra{i:02}");
        let t = Instant::now();
        client
            .put(
                fd.service_key("s00001", &name),
                r#"{"addr":"127.0.0.9:9999","node":"n"}"#,
                None,
            )
            .await
            .expect("put");
        let seen = when(Duration::from_secs(30), || async {
            fd.admin("show servers state svc_s00001")
                .await
                .contains(&format!(" {name} "))
        })
        .await;
        if seen.is_some() {
            changes.push(t.elapsed());
        }
        // An isolated change each, as the target means.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rev = |c: &mut etcd_client::Client| {
        let mut c = c.clone();
        async move {
            c.get("/", None)
                .await
                .ok()
                .and_then(|r| r.header().map(|h| h.revision()))
                .unwrap_or(0)
        }
    };
    let before = rev(&mut client).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rev(&mut client).await;
    let peak = mem_kib(pid, "VmHWM:") as f64 / 1024.0;
    let (p50, p99, _) = pcts(&changes);
    let (t_start, t_change, t_rss, t_p99) = targets;
    let label = format!("{n} instances / {services} services");
    r.row(
        &format!("{label}: watcher start → first file"),
        format!(
            "{:.0} ms (etcd filled in {:.1} s)",
            ms(first_file),
            filled.as_secs_f64()
        ),
        &format!("≤ {t_start:.0} ms"),
        Some(ms(first_file) <= t_start),
    );
    r.row(
        &format!("{label}: one change → HAProxy runs it"),
        pct_text(&changes),
        &if t_p99 > 0 {
            format!("p50 ≤ {t_change:.0} ms, p99 ≤ {t_p99} ms")
        } else {
            format!("p50 ≤ {t_change:.0} ms")
        },
        Some(changes.len() == 20 && p50 <= t_change && (t_p99 == 0 || p99 <= t_p99 as f64)),
    );
    r.row(
        &format!("{label}: watcher peak RSS"),
        format!("{peak:.1} MB"),
        &format!("≤ {t_rss:.0} MB"),
        Some(peak <= t_rss),
    );
    r.row(
        &format!("{label}: etcd writes in 5 s of steady state"),
        format!("{}", after - before),
        "0",
        Some(after == before),
    );
    r.json.insert(format!("scale_{n}"), json!({"first_file_ms": ms(first_file), "change_to_running_ms": changes.iter().copied().map(ms).collect::<Vec<_>>(), "peak_rss_mb": peak, "steady_state_writes": after - before}));
}

async fn docker_rows(r: &mut Report, n: usize) {
    let rig = Rig::new("bench").await;
    let fd = FrontDoor::start(&rig.etcd, Options::with_admin_socket()).await;
    let mut cfg = rig.config(&Opts::default());
    cfg.etcd.prefix = fd.prefix.clone();
    let _registrar = InProcess::start(cfg);
    let web = |rig: &Rig| {
        Container::run(
            &rig.run,
            &["-p", "127.0.0.1::8080", "-l", "portolan.service=web"],
            None,
        )
    };
    let keeper = web(&rig);
    let keeper_page = keeper.short_id();
    wait_until("keeper routed", Duration::from_secs(20), || async {
        matches!(fd.get("web").await, Some((200, b)) if b.trim() == keeper_page)
    })
    .await;
    let api = bollard::Docker::connect_with_local_defaults()
        .expect("Docker API")
        .negotiate_version()
        .await
        .expect("Docker API version");
    let (mut started, mut killed, mut kill_calls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let c = web(&rig);
        let t = Instant::now();
        let page = c.short_id();
        let (routed, _) =
            measure_switch(&fd, "web", None, Some(&page), t, Duration::from_secs(10)).await;
        // Through the API, not the CLI: the CLI's own start-up (~250 ms here) is not
        // what is measured.
        let t = Instant::now();
        if let Err(e) = api
            .kill_container(
                &c.id,
                None::<bollard::query_parameters::KillContainerOptions>,
            )
            .await
        {
            panic!("docker kill {}: {e}", c.id);
        }
        // dockerd answers a SIGKILL only once the process is gone.
        kill_calls.push(t.elapsed());
        // Unrouted: HAProxy sends it nothing new (in maintenance or gone). A request
        // already on its way to a dead container hangs until docker-proxy gives up;
        // polling the front door would measure that, not Portolan.
        let mut unrouted = None;
        while t.elapsed() < Duration::from_secs(10) {
            let state = fd.admin("show servers state svc_web").await;
            let enabled = state.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 6 && f[3].contains(&page) && f[6] == "0"
            });
            if !enabled {
                unrouted = Some(t.elapsed());
                break;
            }
        }
        if let (Some(a), Some(b)) = (routed, unrouted) {
            started.push(a);
            killed.push(b);
        }
        let _ = try_docker(&["rm", "-f", &c.id]);
    }
    r.row(
        "Docker: docker run returned → routed",
        pct_text(&started),
        "milliseconds",
        None,
    );
    r.row(
        "Docker: kill API call issued → HAProxy sends it nothing new",
        format!(
            "{} (the call itself: {}, as dockerd answers a SIGKILL once the process is gone)",
            pct_text(&killed),
            pct_text(&kill_calls)
        ),
        "milliseconds",
        None,
    );

    r.json.insert("docker".into(), json!({"run_to_routed_ms": started.iter().copied().map(ms).collect::<Vec<_>>(), "kill_to_unrouted_ms": killed.iter().copied().map(ms).collect::<Vec<_>>()}));
}

async fn under_load(r: &mut Report, changes: usize, structural: usize) {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    let a = Backend::start("load-a").await;
    let b = Backend::start("load-b").await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("web routed", Duration::from_secs(20), || {
        fd.routes_to("web", "load-a")
    })
    .await;
    let url = format!("http://{}/", fd.http_addr());
    let wrk = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            "-c16",
            "-d20s",
            "--latency",
            "-H",
            "Host: web.test",
            &url,
        ])
        .output();
    let driver = async {
        let extra = Backend::start("load-x").await;
        for i in 0..changes {
            let key = fd.service_key("web", &format!("x{}", i % 5));
            if i % 2 == 0 {
                etcd.put(&key, &extra.record()).await;
            } else {
                etcd.delete(&key).await;
            }
            if structural > 0 && i % (changes / structural).max(1) == 0 {
                etcd.put(&fd.service_key(&format!("other{i}"), "o"), &extra.record())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        extra
    };
    let (out, _extra) = tokio::join!(wrk, driver);
    let text =
        String::from_utf8_lossy(&out.expect("run wrk (apt-get install wrk)").stdout).into_owned();
    let grab = |needle: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(needle))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "-".into())
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    let non2xx = text
        .lines()
        .find(|l| l.contains("Non-2xx"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let socket = text
        .lines()
        .find(|l| l.contains("Socket errors"))
        .map(|l| l.trim().to_string());
    let failed = non2xx
        + socket
            .as_ref()
            .map(|s| {
                s.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
    r.row(
        &format!(
            "wrk 20 s, 16 connections, during {changes} membership changes + {structural} reloads"
        ),
        format!(
            "{requests}; {failed} failed; latency {} / {}",
            grab("50%"),
            grab("99%")
        ),
        "0 failed",
        Some(failed == 0 && !requests.is_empty()),
    );
    r.json
        .insert("under_load".into(), json!({"wrk": text, "failed": failed}));
}

/// The CDF of put → routed, one line per path, as an SVG.
fn cdf_svg(series: &[(&str, &str, &[Duration])]) -> String {
    let (w, h, left, bottom) = (640.0, 360.0, 56.0, 40.0);
    // Up to 1.25 × the largest p99, so one outlier does not flatten the curves; the
    // few samples beyond sit on the right edge.
    let max = series.iter().map(|(_, _, s)| pcts(s).1).fold(1.0, f64::max) * 1.25;
    let x = |v: f64| left + (w - left - 16.0) * v.min(max) / max;
    let y = |p: f64| (h - bottom) - (h - bottom - 16.0) * p;
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = write!(
        out,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="16" x2="{left}" y2="{}" stroke="black"/>"##,
        y(0.0),
        w - 16.0,
        y(0.0),
        y(0.0)
    );
    for i in 0..=5 {
        let v = max * i as f64 / 5.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle">{v:.0}</text>"##,
            x(v),
            y(0.0) + 16.0
        );
        let p = i as f64 / 5.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{:.0}%</text><line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            left - 6.0,
            y(p) + 4.0,
            p * 100.0,
            y(p),
            w - 16.0,
            y(p)
        );
    }
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle">etcd put → first request routed to the new instance (ms)</text>"##,
        (w + left) / 2.0,
        h - 6.0
    );
    for (i, (name, color, samples)) in series.iter().enumerate() {
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(k, ms)| format!("{:.1},{:.1}", x(*ms), y((k + 1) as f64 / v.len() as f64)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" fill="{color}">{name} (n={})</text>"##,
            w - 250.0,
            40.0 + 18.0 * i as f64,
            v.len()
        );
    }
    out.push_str("</svg>\n");
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let large = args.iter().any(|a| a == "--large");
    // `--only paths,restart,burst,scale,docker,load`: some rows (the files in docs/ are
    // then left alone unless `paths` ran).
    let only: Option<Vec<String>> = args
        .iter()
        .find_map(|a| a.strip_prefix("--only="))
        .map(|v| v.split(',').map(str::to_string).collect());
    let runs = |row: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == row));
    let mut r = Report::default();
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let on = machine();
    eprintln!("convergence bench on {on}");
    let (runtime, reload) = if runs("paths") {
        runtime_and_reload_paths(&mut r, if quick { 40 } else { 200 }).await
    } else {
        (Vec::new(), Vec::new())
    };
    if runs("restart") {
        restarts(&mut r, 20).await;
    }
    if runs("burst") {
        burst(&mut r).await;
    }
    if runs("scale") {
        scale(&mut r, 10_000, 1_000, (1000.0, 15.0, 20.0, 40)).await;
        if large {
            scale(&mut r, 100_000, 10_000, (10_000.0, 150.0, 150.0, 0)).await;
        }
    }
    if runs("docker") {
        docker_rows(&mut r, if quick { 10 } else { 50 }).await;
    }
    if runs("load") {
        under_load(&mut r, if quick { 200 } else { 1000 }, 20).await;
    }

    let width = r
        .rows
        .iter()
        .map(|x| x.what.chars().count())
        .max()
        .unwrap_or(0);
    println!("Portolan convergence, {when}, {on}\n");
    for row in &r.rows {
        let verdict = match row.met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "",
        };
        println!(
            "{:<width$}  {}  [target: {}] {verdict}",
            row.what, row.measured, row.target
        );
    }
    r.json.insert("machine".into(), json!(on));
    r.json.insert("date".into(), json!(when));
    r.json.insert(
        "rows".into(),
        json!(r.rows.iter().map(|x| json!({"what": x.what, "measured": x.measured, "target": x.target, "met": x.met})).collect::<Vec<_>>()),
    );
    if !runs("paths") {
        println!("\n(--only: docs/ left as it was)");
        return;
    }
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let _ = std::fs::create_dir_all(&docs);
    let _ = std::fs::write(
        docs.join("convergence.json"),
        serde_json::to_string_pretty(&r.json).unwrap_or_default(),
    );
    let _ = std::fs::write(
        docs.join("convergence.svg"),
        cdf_svg(&[
            ("runtime path", "#1f77b4", &runtime),
            ("reload path", "#d62728", &reload),
        ]),
    );
    println!("\nwrote docs/convergence.json and docs/convergence.svg");
}
