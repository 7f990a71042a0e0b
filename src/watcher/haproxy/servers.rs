//! What HAProxy's config and its runtime API say about servers, read into one shape
//! (`View`): a `server` line of a config file, and `show servers state`. Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use super::sections::servers_by_backend;

/// backend → server → its view.
pub(crate) type Views = BTreeMap<String, BTreeMap<String, View>>;

/// Whether a server takes traffic, as far as configuration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Admin {
    Ready,
    Maint,
    Drain,
}

/// One server in one view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct View {
    pub(crate) addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) weight: Option<u32>,
    pub(crate) admin: Admin,
    /// HAProxy's own view (health checks): only in the HAProxy view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) up: Option<bool>,
}

/// The views of a `server NAME ADDR [weight N] [disabled] …` line.
pub(crate) fn view_of_line(line: &str) -> Option<View> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words.get(2)?.to_string();
    let weight = words
        .iter()
        .position(|w| *w == "weight")
        .and_then(|i| words.get(i + 1))
        .and_then(|w| w.parse().ok());
    let admin = if words.contains(&"disabled") {
        Admin::Maint
    } else {
        Admin::Ready
    };
    Some(View {
        addr,
        weight,
        admin,
        up: None,
    })
}

pub(crate) fn views_of_config(text: &str) -> Result<Views, String> {
    Ok(servers_by_backend(text)?
        .into_iter()
        .map(|(b, servers)| {
            let views = servers
                .into_iter()
                .filter_map(|(n, l)| Some((n, view_of_line(&l)?)))
                .collect();
            (b, views)
        })
        .collect())
}

/// Parses `show servers state` (format version 1). Columns, from HAProxy's manual:
/// be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight
/// srv_iweight … srv_port (19th).
pub(crate) fn parse_servers_state(answer: &str) -> Result<Views, String> {
    let mut lines = answer.lines();
    match lines.next().map(str::trim) {
        Some("1") => {}
        other => {
            return Err(format!(
                "show servers state: expected format version 1, got {other:?}"
            ))
        }
    }
    let mut out = Views::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 19 {
            return Err(format!("show servers state: short line {line:?}"));
        }
        let num = |i: usize| {
            f[i].parse::<u32>()
                .map_err(|_| format!("show servers state: field {i} of {line:?} is not a number"))
        };
        let (op, admin_bits, weight, port) = (num(5)?, num(6)?, num(7)?, num(18)?);
        // SRV_ADMF_*: FMAINT 0x01, IMAINT 0x02, CMAINT 0x04, RMAINT 0x20, HMAINT 0x40;
        // FDRAIN 0x08, IDRAIN 0x10.
        let admin = if admin_bits & 0x67 != 0 {
            Admin::Maint
        } else if admin_bits & 0x18 != 0 {
            Admin::Drain
        } else {
            Admin::Ready
        };
        let host = f[4];
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        out.entry(f[1].to_string()).or_default().insert(
            f[3].to_string(),
            View {
                addr,
                weight: Some(weight),
                admin,
                // SRV_ST_RUNNING 2, SRV_ST_STOPPING 3 still count as up.
                up: Some(op >= 2),
            },
        );
    }
    Ok(out)
}
