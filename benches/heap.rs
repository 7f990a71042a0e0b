//! `cargo bench --bench heap [-- --instances N]`: where the watcher's bytes go at 10,000
//! instances (or N) over a tenth as many services, phase by phase (a counting allocator: live and peak heap bytes).
//! The store, the snapshot a pass renders, the tera context, the rendered file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use portolan::watcher::render::{context, Template};
use portolan::watcher::store::Store;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

fn mib(b: usize) -> String {
    format!("{:.2} MiB", b as f64 / 1048576.0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // `--instances N` (10,000 by default), a tenth as many services.
    let n: usize = std::env::args()
        .skip_while(|a| a != "--instances")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let services = (n / 10).max(1);
    let kvs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| {
            (
                format!(
                    "/p/nodes/node{n:02}/services/s{:05}/node{n:02}-c{i:06}-8080",
                    i % services,
                    n = i % 50
                ),
                format!(
                    r#"{{"addr":"10.0.{}.{}:{}","node":"node{:02}","container":"{:012x}","port":8080,"tags":["web","v1"],"weight":100}}"#,
                    i / 250 % 250, i % 250, 1024 + i % 60000, i % 50, i
                )
                .into_bytes(),
            )
        })
        .collect();
    let base = LIVE.load(Ordering::Relaxed);
    let mut store = Store::new("/p");
    let w = store.reset(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    assert!(w.is_empty(), "{w:?}");
    drop(kvs);
    let after_store = LIVE.load(Ordering::Relaxed);
    println!("store:    {}", mib(after_store - base));
    PEAK.store(after_store, Ordering::Relaxed);
    let snap = store.snapshot();
    let after_snap = LIVE.load(Ordering::Relaxed);
    println!("snapshot: {}", mib(after_snap - after_store));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.tera");
    let tpl = Template::compile(path, &std::fs::read_to_string(path).unwrap()).unwrap();
    let vars = toml::Table::new();
    let before_ctx = LIVE.load(Ordering::Relaxed);
    PEAK.store(before_ctx, Ordering::Relaxed);
    let ctx = context(&snap, &vars);
    let after_ctx = LIVE.load(Ordering::Relaxed);
    println!("context:  {}", mib(after_ctx - before_ctx));
    let out = tpl.render(&ctx).unwrap();
    let after_render = LIVE.load(Ordering::Relaxed);
    println!(
        "render:   {} kept (the file: {} bytes), peak during render {} above the context",
        mib(after_render - after_ctx),
        out.len(),
        mib(PEAK.load(Ordering::Relaxed) - after_ctx)
    );
    drop(ctx);
    let t = std::time::Instant::now();
    let runs = 20;
    for _ in 0..runs {
        let s = store.snapshot();
        std::hint::black_box(&s);
    }
    println!(
        "time: snapshot {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / runs as f64
    );
    let t = std::time::Instant::now();
    for _ in 0..runs {
        let c = context(&snap, &vars);
        std::hint::black_box(&c);
    }
    println!(
        "time: context {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / runs as f64
    );
    let mut cache = portolan::watcher::render::InstanceValues::default();
    std::hint::black_box(cache.context(&snap, &vars));
    let t = std::time::Instant::now();
    for _ in 0..runs {
        std::hint::black_box(cache.context(&snap, &vars));
    }
    println!(
        "time: context, values reused {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / runs as f64
    );
    let ctx = context(&snap, &vars);
    let t = std::time::Instant::now();
    for _ in 0..runs {
        std::hint::black_box(tpl.render(&ctx).unwrap());
    }
    println!(
        "time: render {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / runs as f64
    );
    println!(
        "total live after the pass: {}",
        mib(LIVE.load(Ordering::Relaxed) - base)
    );
}
