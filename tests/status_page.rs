//! The watcher's status page in a real browser: headless Chromium over the DevTools
//! protocol against a real watcher, etcd and HAProxy. The page is opened once and never
//! reloaded: what changes in etcd must reach it over its event stream.
mod common;

use std::time::Duration;

use common::cdp::Browser;
use common::haproxy::{Backend, FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(20);

/// Values from etcd that would run as script if the page pasted them as HTML. The
/// schema refuses each of these keys, so the page shows them as left out — by name.
const HOSTILE: &[(&str, &str)] = &[
    ("services/<script>window.__xss=1</script>/a", "service name"),
    (
        "nodes/<img src=x onerror=window.__xss=2>/services/web/b",
        "node name",
    ),
    ("services/web/<svg onload=window.__xss=3>", "instance id"),
];

/// Waits until `expr` (JavaScript, evaluated in the page) is true.
async fn until(b: &Browser, what: &str, expr: &str) {
    let page = &b.page;
    wait_until(what, T, || async { page.eval(expr).await == true }).await;
}

/// JavaScript: the text of the row of instance `id`, or "".
fn row(id: &str) -> String {
    format!(
        "(Array.from(document.querySelectorAll('#services tr')).find(r => r.querySelector('td b') && r.querySelector('td b').textContent === '{id}') || {{innerText: ''}}).innerText"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_follows_the_fleet_live_in_a_real_browser() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let mut fd = FrontDoor::start(
        &etcd,
        Options {
            admin_socket: true,
            watcher_extra: "mass_removal = { share = 0.5, min = 5, hold_s = 120 }".into(),
            ..Default::default()
        },
    )
    .await;
    for i in 0..6 {
        etcd.put(&fd.service_key("web", &format!("w{i}")), &a.record())
            .await;
    }
    let hostile_tag = a.record().replace(r#""t""#, r#""<b>tag</b>""#);
    etcd.put(&fd.service_key("web", "tagged"), &hostile_tag)
        .await;
    for (key, _) in HOSTILE {
        etcd.put(&format!("{}/{key}", fd.prefix), &a.record()).await;
    }
    let fd_ref = &fd;
    wait_until("w0..w5 routed", T, || async {
        fd_ref.admin_state("svc_web", "w5").await == Some(0)
    })
    .await;

    // With JavaScript off the page is the server's snapshot: the instances are in the
    // HTML itself, and the JSON it is drawn from says the same.
    let (status, html) = http_get(&fd.metrics_addr(), "x", "/").await.expect("GET /");
    assert_eq!(status, 200);
    assert!(
        html.contains("<b>w5</b>") && html.contains("<noscript>"),
        "{html}"
    );
    let (_, json) = http_get(&fd.metrics_addr(), "x", "/api/status")
        .await
        .expect("GET /api/status");
    let board: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(board["services"][0]["name"], "web", "{json}");

    let b = tokio::time::timeout(Duration::from_secs(60), Browser::start())
        .await
        .expect("Chromium started within 60 s");
    b.viewport(1100, 900, false).await;
    let url = format!("http://{}/", fd.metrics_addr());
    b.open(&url).await;
    until(&b, "the page lists the instances", "['w0','w1','w2','w3','w4','w5'].every(id => document.querySelector('#services').innerText.includes(id))").await;
    until(
        &b,
        "the stream is live",
        "document.body.getAttribute('data-stream') === 'live'",
    )
    .await;
    until(
        &b,
        "HAProxy's view of w0",
        &format!(
            "{}.includes('ready') && {}.includes('up')",
            row("w0"),
            row("w0")
        ),
    )
    .await;
    // Set once: a reload of the page would forget it.
    b.page.eval("window.__loadedOnce = 42; true").await;

    // A container starts: its instance appears.
    let c = Backend::start("c").await;
    etcd.put(&fd.service_key("web", "new1"), &c.record()).await;
    until(
        &b,
        "new1 appears",
        &format!("{}.includes('serving')", row("new1")),
    )
    .await;
    // It gets its stop signal: draining, out of HAProxy's rotation.
    etcd.put(&fd.service_key("web", "new1"), &c.draining_record())
        .await;
    until(
        &b,
        "new1 shows draining",
        &format!(
            "{}.includes('draining') && /maint|drain/.test({})",
            row("new1"),
            row("new1")
        ),
    )
    .await;
    // It exits: gone.
    etcd.delete(&fd.service_key("web", "new1")).await;
    until(&b, "new1 is gone", &format!("{} === ''", row("new1"))).await;

    // Hostile names render as text, and none of them ran.
    for (key, what) in HOSTILE {
        let literal = serde_json::to_string(&format!("{}/{key}", fd.prefix)).unwrap();
        until(
            &b,
            &format!("the hostile {what} shows as text"),
            &format!("document.querySelector('#left-out').innerText.includes({literal})"),
        )
        .await;
    }
    until(
        &b,
        "the hostile tag shows as text",
        "document.querySelector('#left-out').innerText.includes('<b>tag</b>')",
    )
    .await;
    assert_eq!(b.page.eval("typeof window.__xss").await, "undefined");
    assert_eq!(b.page.eval("document.querySelectorAll('#board img, #board script, #left-out b, #board svg[onload]').length").await, 0);

    // A mass removal is held: its countdown shows, and counts down.
    for i in 0..6 {
        etcd.delete(&fd.service_key("web", &format!("w{i}"))).await;
    }
    until(
        &b,
        "the hold shows",
        "!!document.querySelector('#hold .countdown')",
    )
    .await;
    let left = |v: serde_json::Value| {
        v.as_str()
            .and_then(|s| s.trim_end_matches(" s").parse::<u64>().ok())
    };
    let first = left(
        b.page
            .eval("document.querySelector('#hold .countdown').textContent")
            .await,
    )
    .expect("a countdown in seconds");
    assert!(first > 60 && first <= 120, "{first}");
    until(
        &b,
        "the countdown counts down",
        &format!("parseInt(document.querySelector('#hold .countdown').textContent) < {first}"),
    )
    .await;
    until(&b, "the held instances are listed", "document.querySelector('#hold').innerText.includes('web/w3') && document.querySelector('#hold').innerText.includes('USR1')").await;
    until(
        &b,
        "the histogram is drawn",
        "document.querySelectorAll('#latency svg rect').length > 0",
    )
    .await;

    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let shot = fd.dir.path().join("status-page.png");
    std::fs::write(&shot, &png).unwrap();
    if std::env::var_os("PORTOLAN_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/status-page.png"),
            &png,
        )
        .unwrap();
    }

    // Readable at 360 px: nothing wider than the screen.
    b.viewport(360, 740, true).await;
    until(
        &b,
        "no horizontal scroll at 360 px",
        "document.documentElement.scrollWidth <= 360",
    )
    .await;

    // Never reloaded, and no console error so far.
    assert_eq!(b.page.eval("window.__loadedOnce").await, 42);
    assert_eq!(b.errors(), Vec::<String>::new());

    // The watcher goes away: the page says its stream is cut.
    fd.kill_watcher();
    until(&b, "the page shows the cut", "document.body.getAttribute('data-stream') === 'cut' && !document.getElementById('cut').hidden").await;
    b.close().await;
}
