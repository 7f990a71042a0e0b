//! `cargo bench --bench watcher_render`: render and `haproxy -c` cost of the shipped
//! template at growing sizes (services × instances). Plain timing, no harness: the
//! numbers tell whether a batch's render or its check dominates an apply. The last
//! column checks the same file with every server's `id <n>` taken out: HAProxy 2.6
//! compares a backend's server names pairwise unless they carry ids.

use std::time::{Duration, Instant};

use portolan::watcher::render::{context, Template};
use portolan::watcher::store::Store;

fn store(services: usize, per: usize) -> Store {
    let mut s = Store::new("/portolan");
    let kvs: Vec<(String, Vec<u8>)> = (0..services)
        .flat_map(|i| {
            (0..per).map(move |j| {
                (
                    format!("/portolan/services/svc{i:05}/node-{j:03}"),
                    format!("10.{}.{}.{}:{}", i / 250, i % 250, j % 250, 8000 + j).into_bytes(),
                )
            })
        })
        .collect();
    let warnings = s.reset(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    assert!(warnings.is_empty());
    s
}

fn main() {
    // `cargo bench` passes --bench. Test runners (`cargo test --all-targets`, nextest's
    // `--list`) also start this binary: it holds no tests, so it says nothing and exits.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.tera");
    let text = std::fs::read_to_string(path).expect("template");
    let tpl = Template::compile(path, &text).expect("compiles");
    let vars: toml::Table = toml::from_str("http_bind = \"127.0.0.1:18080\"").expect("vars");
    let dir = std::env::temp_dir().join(format!("portolan-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    println!(
        "{:>9} {:>9} {:>10} {:>12} {:>12} {:>20}",
        "services", "instances", "bytes", "render", "haproxy -c", "haproxy -c (no ids)"
    );
    for (services, per) in [(10, 1), (100, 10), (1000, 10), (1, 10_000), (1, 20_000)] {
        let s = store(services, per);
        let snap = s.snapshot();
        let ctx = context(&snap, &vars);
        let runs = 5;
        let start = Instant::now();
        let mut out = String::new();
        for _ in 0..runs {
            out = tpl.render(&ctx).expect("render");
        }
        let render = start.elapsed() / runs;
        let (check, ok) = haproxy_check(&dir.join("bench.cfg"), &out);
        let (no_ids, ok_no_ids) = haproxy_check(&dir.join("no-ids.cfg"), &without_ids(&out));
        println!(
            "{services:>9} {:>9} {:>10} {:>12} {:>12} {:>20}{}",
            services * per,
            out.len(),
            fmt(render),
            fmt(check),
            fmt(no_ids),
            if ok && ok_no_ids {
                ""
            } else {
                "  (check failed)"
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fmt(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `haproxy -c` of `text` written to `file`: how long, and whether it passed.
fn haproxy_check(file: &std::path::Path, text: &str) -> (Duration, bool) {
    std::fs::write(file, text).expect("write");
    let start = Instant::now();
    let ok = std::process::Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(file)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (start.elapsed(), ok)
}

/// `text` with the ` id <n>` of every server line taken out.
fn without_ids(text: &str) -> String {
    text.lines()
        .map(
            |l| match (l.trim_start().starts_with("server "), l.find(" id ")) {
                (true, Some(at)) => {
                    let rest = &l[at + 4..];
                    let end = rest.find(' ').unwrap_or(rest.len());
                    format!("{}{}\n", &l[..at], &rest[end..])
                }
                _ => format!("{l}\n"),
            },
        )
        .collect()
}
