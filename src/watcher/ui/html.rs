//! The board as HTML (pure): the fragment inside `<main>`, the same for the first
//! response and for every live update. Every value is escaped by `esc` on the way in:
//! etcd chooses service, node and instance names, tags and the keys left out (a key
//! left out because its name is hostile is shown, by name).

use std::fmt::Write as _;

use super::{Board, Histogram, InstanceRow};

/// `s` as HTML text or a quoted attribute value.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Line breaks would end a server-sent event's `data:` line.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds as "12 s", "3 min", "2 h", "4 d".
fn ago(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// A `<time>` for `at` (seconds since the epoch) that the script keeps relative.
fn since(at: u64, now: u64) -> String {
    format!(
        "<time data-since=\"{at}\">{}</time>",
        ago(now.saturating_sub(at))
    )
}

/// The page's main fragment; at most `per_service` instances drawn per service.
pub(crate) fn board(b: &Board, per_service: usize) -> String {
    let mut h = String::new();
    summary_and_services(&mut h, b, per_service);
    left_out(&mut h, b);
    applies(&mut h, b);
    checks(&mut h, b);
    drift_and_etcd(&mut h, b);
    h
}

fn summary_and_services(h: &mut String, b: &Board, per_service: usize) {
    let now = b.now;
    let _ = write!(
        h,
        "<div class=\"board\" data-now=\"{now}\"><section class=\"summary\"><p>watcher <b>{}</b> · etcd revision <b>{}</b> · HAProxy runs revision <b>{}</b> · {} · {}</p></section>",
        esc(&b.watcher),
        b.revision,
        b.applied_revision,
        if b.etcd_up { "<span class=\"ok\">etcd session up</span>" } else { "<span class=\"bad\">etcd session down: serving the last good config</span>" },
        if b.ready { "ready" } else { "<span class=\"bad\">not ready: no render from etcd yet</span>" },
    );
    for e in &b.errors {
        let _ = write!(h, "<p class=\"error\">{}</p>", esc(e));
    }
    if let Some(hold) = &b.hold {
        let _ = write!(
            h,
            "<section class=\"hold\" id=\"hold\"><h2>Held removals</h2><p><b>{}</b> removed instance(s) kept by the mass-removal guard",
            hold.count
        );
        if let Some(until) = hold.until {
            let _ = write!(
                h,
                ": removed in <b class=\"countdown\" data-until=\"{until}\">{} s</b>",
                until.saturating_sub(now)
            );
        }
        let _ = write!(
            h,
            ".</p><p class=\"note\">{}</p><ul class=\"held\">",
            esc(&hold.confirm)
        );
        for i in &hold.instances {
            let _ = write!(h, "<li>{}</li>", esc(i));
        }
        h.push_str("</ul></section>");
    }

    let count: usize = b.services.iter().map(|s| s.instances.len()).sum();
    let _ = write!(
        h,
        "<section id=\"services\"><h2>Services <small>{} service(s), {count} instance(s)</small></h2>",
        b.services.len()
    );
    if b.services.is_empty() {
        h.push_str("<p class=\"note\">No service in etcd.</p>");
    }
    for s in &b.services {
        let _ = write!(h, "<div class=\"service\"><h3>{}</h3>", esc(&s.name));
        if s.instances.is_empty() {
            h.push_str("<p class=\"note\">No instance: its backend is kept, empty (answering 503), for empty_backend_grace_s.</p></div>");
            continue;
        }
        h.push_str("<table class=\"instances\"><thead><tr><th>instance</th><th>address</th><th>node</th><th>container</th><th>weight</th><th>state</th><th>HAProxy</th><th>health</th><th>seen</th></tr></thead><tbody>");
        for i in s.instances.iter().take(per_service) {
            instance_row(h, i, now);
        }
        h.push_str("</tbody></table>");
        if s.instances.len() > per_service {
            let _ = write!(
                h,
                "<p class=\"note\">… and {} more (all of them in /api/status).</p>",
                s.instances.len() - per_service
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</section>");
}

fn left_out(h: &mut String, b: &Board) {
    h.push_str("<section id=\"left-out\"><h2>Left out</h2>");
    if b.left_out.is_empty() {
        h.push_str("<p class=\"note\">No key is left out.</p>");
    } else {
        h.push_str("<table><thead><tr><th>key</th><th>why</th></tr></thead><tbody>");
        for l in &b.left_out {
            let _ = write!(
                h,
                "<tr><td data-label=\"key\"><code>{}</code></td><td data-label=\"why\">{}</td></tr>",
                esc(&l.key),
                esc(&l.why)
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");
}

fn applies(h: &mut String, b: &Board) {
    let now = b.now;
    h.push_str("<section id=\"applies\"><h2>Last applies</h2>");
    if b.applies.is_empty() {
        h.push_str("<p class=\"note\">Nothing applied yet by this run.</p>");
    } else {
        h.push_str("<table><thead><tr><th>when</th><th>revision</th><th>file</th><th>path</th><th>result</th><th>took</th></tr></thead><tbody>");
        for a in &b.applies {
            let _ = write!(
                h,
                "<tr><td data-label=\"when\">{} ago</td><td data-label=\"revision\">{}</td><td data-label=\"file\">{}</td><td data-label=\"path\">{}</td><td data-label=\"result\" class=\"{}\">{}{}</td><td data-label=\"took\">{} ms</td></tr>",
                since(a.at, now),
                a.revision,
                esc(&a.dest),
                a.path.unwrap_or("-"),
                if matches!(a.result, "rejected" | "failed") { "bad" } else { "ok" },
                a.result,
                a.error.as_deref().map(|e| format!(": {}", esc(e))).unwrap_or_default(),
                a.took_ms
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>");
}

fn checks(h: &mut String, b: &Board) {
    let now = b.now;
    h.push_str("<section id=\"checks\"><h2>Deferred checks</h2>");
    if b.checks.is_empty() {
        h.push_str("<p class=\"note\">No deferred check yet (they follow changes applied through the runtime API).</p>");
    } else {
        h.push_str("<ul>");
        for c in &b.checks {
            let _ = write!(
                h,
                "<li>{} ago: {} <span class=\"{}\">{}</span>{}</li>",
                since(c.at, now),
                esc(&c.dest),
                if c.result == "ok" { "ok" } else { "bad" },
                c.result,
                c.error
                    .as_deref()
                    .map(|e| format!(": {}", esc(e)))
                    .unwrap_or_default()
            );
        }
        h.push_str("</ul>");
    }
    h.push_str("</section>");
}

fn drift_and_etcd(h: &mut String, b: &Board) {
    h.push_str("<section id=\"drift\"><h2>Drift: etcd, the file, HAProxy</h2><ul>");
    for d in &b.drift {
        let _ = write!(h, "<li>{}: ", esc(&d.dest));
        if d.differences.is_empty() && d.error.is_none() {
            h.push_str(if d.haproxy_compared {
                "<span class=\"ok\">in sync</span>"
            } else {
                "<span class=\"ok\">the file is what etcd says</span> (no admin socket: HAProxy's own view is not compared)"
            });
        }
        if let Some(e) = &d.error {
            let _ = write!(h, "<span class=\"bad\">{}</span>", esc(e));
        }
        if !d.differences.is_empty() {
            h.push_str("<ul>");
            for x in &d.differences {
                let _ = write!(h, "<li class=\"bad\">{}</li>", esc(x));
            }
            h.push_str("</ul>");
        }
        h.push_str("</li>");
    }
    h.push_str("</ul></section>");

    h.push_str("<section id=\"etcd\"><h2>etcd endpoints</h2><ul>");
    for e in &b.etcd {
        let (class, word) = match e.healthy {
            Some(true) => ("ok", "answers"),
            Some(false) => ("bad", "does not answer"),
            None => ("note", "not asked yet"),
        };
        let _ = write!(
            h,
            "<li><code>{}</code> <span class=\"{class}\">{word}</span><br><small>{}</small></li>",
            esc(&e.endpoint),
            esc(&e.detail)
        );
    }
    h.push_str("</ul></section>");

    h.push_str("<section id=\"latency\"><h2>Change to live</h2>");
    h.push_str(&histogram_svg(&b.event_to_live));
    h.push_str("</section></div>");
}

fn instance_row(h: &mut String, i: &InstanceRow, now: u64) {
    let mut state = Vec::new();
    if i.draining {
        state.push("<span class=\"warn\">draining</span>");
    }
    if i.held {
        state.push("<span class=\"warn\">held</span>");
    }
    if state.is_empty() {
        state.push("serving");
    }
    let (haproxy, health) = match &i.haproxy {
        None => (
            "<span class=\"note\">no admin socket</span>".to_string(),
            "-".to_string(),
        ),
        Some(r) => (
            format!(
                "<span class=\"{}\">{}</span>",
                if r.state == "ready" { "ok" } else { "warn" },
                esc(&r.state)
            ),
            match r.up {
                Some(true) => "<span class=\"ok\">up</span>".into(),
                Some(false) => "<span class=\"bad\">down</span>".into(),
                None => "-".into(),
            },
        ),
    };
    let tags = if i.tags.is_empty() {
        String::new()
    } else {
        let t: Vec<String> = i
            .tags
            .iter()
            .map(|t| format!("<span class=\"tag\">{}</span>", esc(t)))
            .collect();
        format!(" {}", t.join(" "))
    };
    let container: String = i.container.chars().take(12).collect();
    let _ = write!(
        h,
        "<tr class=\"{}\"><td data-label=\"instance\"><b>{}</b>{tags}</td><td data-label=\"address\"><code>{}</code></td><td data-label=\"node\">{}</td><td data-label=\"container\"><code>{}</code></td><td data-label=\"weight\">{}</td><td data-label=\"state\">{}</td><td data-label=\"HAProxy\">{haproxy}</td><td data-label=\"health\">{health}</td><td data-label=\"seen\">{}</td></tr>",
        if i.draining || i.held { "leaving" } else { "" },
        esc(&i.id),
        esc(&i.addr),
        esc(if i.node.is_empty() { "-" } else { &i.node }),
        esc(if container.is_empty() { "-" } else { &container }),
        i.weight,
        state.join(" "),
        since(i.seen_since, now),
    );
}

/// Bucket bound as text: 1 ms, 16 ms, 1.0 s, +Inf.
fn bound(le: Option<f64>) -> String {
    match le {
        None => "more".into(),
        Some(s) if s < 1.0 => format!("{}", (s * 1000.0).round()),
        Some(s) => format!("{s:.1}s"),
    }
}

/// The histogram as an SVG bar chart: one bar per bucket, its count above it.
fn histogram_svg(hist: &Histogram) -> String {
    if hist.count == 0 {
        return "<p class=\"note\">No change has gone live yet in this run.</p>".into();
    }
    let n = hist.buckets.len().max(1);
    let (w, bar_h, top, bottom) = (24.0_f64, 100.0_f64, 16.0, 30.0);
    let width = w * n as f64;
    let max = hist.buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let mut s = format!(
        "<figure><svg class=\"histogram\" viewBox=\"0 0 {width} {}\" role=\"img\" aria-label=\"event to live histogram\">",
        top + bar_h + bottom
    );
    for (k, (le, count)) in hist.buckets.iter().enumerate() {
        let x = k as f64 * w;
        let hgt = if *count == 0 {
            0.0
        } else {
            (bar_h * *count as f64 / max).max(1.0)
        };
        let y = top + bar_h - hgt;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{hgt:.1}\"><title>≤ {}: {count}</title></rect>",
            x + 2.0,
            w - 4.0,
            bound(*le)
        );
        if *count > 0 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"count\">{count}</text>",
                x + w / 2.0,
                y - 3.0
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\">{}</text>",
            x + w / 2.0,
            top + bar_h + 14.0,
            bound(*le)
        );
    }
    let mean_ms = 1000.0 * hist.sum / hist.count as f64;
    let _ = write!(
        s,
        "</svg><figcaption>From an etcd event's arrival to HAProxy running it (portolan_watcher_event_to_live_seconds), upper bounds in ms: {} change(s), mean {mean_ms:.1} ms.</figcaption></figure>",
        hist.count
    );
    s
}
