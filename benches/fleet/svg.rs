//! `docs/fleet.svg`, written by hand as `benches/convergence.rs` writes its CDF: the
//! whole run on one time axis. Top: writes per second under the fleet's prefix (the
//! bench's watch). Bottom: every timed change → routed, one dot per door. Dashed lines
//! mark where each scenario began, numbered as in the legend.

use std::fmt::Write as _;

use crate::World;

const COLORS: [&str; 2] = ["#1f77b4", "#ff7f0e"];

pub fn timeline(w: &World) -> String {
    let (width, left, right) = (960.0, 60.0, 16.0);
    let (top_y0, top_y1) = (30.0, 200.0);
    let (bot_y0, bot_y1) = (250.0, 430.0);
    let height = 470.0 + 16.0 * w.marks.len() as f64;
    let timeline = w
        .writes
        .timeline
        .lock()
        .map(|t| t.clone())
        .unwrap_or_default();
    let end = (timeline.len() as f64)
        .max(w.samples.iter().map(|s| s.0).fold(0.0, f64::max))
        .max(1.0);
    let x = |t: f64| left + (width - left - right) * (t / end).clamp(0.0, 1.0);
    let wmax = timeline.iter().copied().max().unwrap_or(1).max(1) as f64;
    let ty = |v: f64| top_y1 - (top_y1 - top_y0) * (v / wmax).min(1.0);
    let mut lat: Vec<f64> = w.samples.iter().map(|s| s.2).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let lmax = lat
        .get(((lat.len() as f64 - 1.0) * 0.99).max(0.0) as usize)
        .copied()
        .unwrap_or(1.0)
        .max(1.0)
        * 1.25;
    let ly = |v: f64| bot_y1 - (bot_y1 - bot_y0) * (v / lmax).min(1.0);
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
    );
    // Axes.
    for (y0, y1) in [(top_y0, top_y1), (bot_y0, bot_y1)] {
        let _ = write!(
            out,
            r##"<line x1="{left}" y1="{y0}" x2="{left}" y2="{y1}" stroke="black"/><line x1="{left}" y1="{y1}" x2="{}" y2="{y1}" stroke="black"/>"##,
            width - right
        );
    }
    for i in 0..=4 {
        let v = wmax * i as f64 / 4.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            left - 6.0,
            ty(v) + 4.0
        );
        let v = lmax * i as f64 / 4.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            left - 6.0,
            ly(v) + 4.0
        );
    }
    for i in 0..=8 {
        let t = end * i as f64 / 8.0;
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle">{t:.0}</text>"##,
            x(t),
            bot_y1 + 16.0
        );
    }
    let _ = write!(
        out,
        r##"<text x="{left}" y="{}">etcd writes per second under the fleet's prefix (the bench's watch)</text><text x="{left}" y="{}">change → routed (ms): scripted start → server ready in show servers state, one dot per change and door (a few beyond {lmax:.0} ms sit on the top edge)</text><text x="{}" y="{}" text-anchor="middle">seconds since the cluster started</text>"##,
        top_y0 - 10.0,
        bot_y0 - 10.0,
        (width + left) / 2.0,
        bot_y1 + 32.0
    );
    // Writes per second.
    let points: Vec<String> = timeline
        .iter()
        .enumerate()
        .map(|(s, n)| format!("{:.1},{:.1}", x(s as f64 + 0.5), ty(*n as f64)))
        .collect();
    let _ = write!(
        out,
        r##"<polyline fill="none" stroke="#2ca02c" stroke-width="1.5" points="{}"/>"##,
        points.join(" ")
    );
    // Latencies.
    for (at, door, v) in &w.samples {
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="1.8" fill="{}" fill-opacity="0.6"/>"##,
            x(*at),
            ly(*v),
            COLORS[*door % COLORS.len()]
        );
    }
    for (i, d) in w.doors.iter().enumerate() {
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" fill="{}">● watcher {} + HAProxy</text>"##,
            width - 220.0,
            bot_y0 + 14.0 + 16.0 * i as f64,
            COLORS[i % COLORS.len()],
            d.name
        );
    }
    // Scenario marks.
    for (i, (at, name)) in w.marks.iter().enumerate() {
        let _ = write!(
            out,
            r##"<line x1="{0:.1}" y1="{top_y0}" x2="{0:.1}" y2="{bot_y1}" stroke="#999" stroke-dasharray="4 3"/><text x="{1:.1}" y="{2}" fill="#555">{3}</text>"##,
            x(*at),
            x(*at) + 3.0,
            top_y0 + 12.0,
            i + 1
        );
        let _ = write!(
            out,
            r##"<text x="{left}" y="{}">{}: {name} (at {at:.0} s)</text>"##,
            bot_y1 + 56.0 + 16.0 * i as f64,
            i + 1
        );
    }
    out.push_str("</svg>\n");
    out
}
