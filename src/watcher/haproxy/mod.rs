//! Talking to HAProxy, one file per socket:
//! - `master`: the master CLI (`haproxy -W -S <socket>`): `show proc`, confirmed reloads;
//! - `runtime_plan` (pure): live file + rendered file → runtime ops, or "reload, because …";
//! - `runtime_ops` (pure): one such op and the admin-socket commands that carry it out;
//! - `runtime_api`: the admin `stats socket`: sends those ops;
//! - `sections` (pure): a config file read into sections and server lines;
//! - `servers` (pure): server lines and `show servers state` read into one shape;
//! - `socket`: the one-command exchange both sockets share;
//! - here: what a check's output says is wrong (`first_error_line`).

pub(crate) mod master;
pub(crate) mod runtime_api;
pub(crate) mod runtime_ops;
pub(crate) mod runtime_plan;
pub(crate) mod sections;
pub(crate) mod servers;
pub(crate) mod socket;

// Integration tests read the master's reload counter.
pub use master::{show_proc, MasterStatus, ReloadError};

/// The line of a check's output that says what is wrong: HAProxy prints notices (its
/// version, its path) before its first `[ALERT]`.
pub(crate) fn first_error_line(output: &str) -> &str {
    let mut lines = output.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.clone().next().unwrap_or("");
    lines
        .find(|l| l.contains("[ALERT]") || l.to_ascii_lowercase().contains("error"))
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reject_is_summed_up_by_the_first_alert() {
        let out = "[NOTICE]   (1) : haproxy version is 2.6.12\n[NOTICE]   (1) : path to executable is /usr/sbin/haproxy\n[ALERT]    (1) : config : parsing [x.cfg:8] : balance only supports 'roundrobin'\n[ALERT]    (1) : config : Fatal errors found in configuration.";
        assert_eq!(
            first_error_line(out),
            "[ALERT]    (1) : config : parsing [x.cfg:8] : balance only supports 'roundrobin'"
        );
        assert_eq!(first_error_line("\nmissing ok\n"), "missing ok");
        assert_eq!(first_error_line(""), "");
    }
}
