//! Draining: a container that got its stop signal is going away, but still serves what
//! it has in flight for up to its stop timeout. Its instances stay in etcd marked
//! `draining`, so load balancers send it nothing new, until `die` deletes them.
//!
//! Docker reports `docker stop` as a `kill` event (attribute `signal`, a number) at
//! once, and `die` only when the process exits, up to the stop timeout later. Which
//! `kill` is a stop depends on the container: its own `StopSignal` (SIGTERM unless the
//! image or `--stop-signal` says otherwise), or SIGKILL. Any other signal (`docker kill
//! -s HUP`, a reload) is the application's business and changes nothing.
//!
//! A stop that is not followed by an exit (the application ignored the signal, or it
//! came from `docker kill -s TERM` to a process that traps it) must not leave the
//! instance out of rotation for ever: after the stop timeout and `GIVE_BACK_MARGIN` it
//! is given back. Pure.

use std::time::Duration;

use bollard::models::ContainerInspectResponse;
use nix::sys::signal::Signal;

/// Docker's stop timeout when the container sets none.
pub(crate) const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after its stop timeout a draining container that has not exited is given
/// back: Docker's SIGKILL and the `die` that follows take a moment.
pub(crate) const GIVE_BACK_MARGIN: Duration = Duration::from_secs(2);

/// How a container is stopped, from its `docker inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StopPolicy {
    /// The signal `docker stop` sends first, as a number.
    pub(crate) signal: i32,
    /// How long `docker stop` waits for an exit before SIGKILL.
    pub(crate) timeout: Duration,
}

impl Default for StopPolicy {
    fn default() -> Self {
        StopPolicy {
            signal: Signal::SIGTERM as i32,
            timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
}

impl StopPolicy {
    /// `Config.StopSignal` (a name like `SIGQUIT` or `QUIT`, or a number) and
    /// `Config.StopTimeout`; either missing or unreadable is Docker's default.
    pub(crate) fn of(c: &ContainerInspectResponse) -> StopPolicy {
        let config = c.config.as_ref();
        let default = StopPolicy::default();
        StopPolicy {
            signal: config
                .and_then(|c| c.stop_signal.as_deref())
                .and_then(signal_number)
                .unwrap_or(default.signal),
            timeout: config
                .and_then(|c| c.stop_timeout)
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default.timeout, Duration::from_secs),
        }
    }

    /// How long to wait for an exit after the stop signal before giving it back.
    pub(crate) fn give_back_after(&self) -> Duration {
        self.timeout + GIVE_BACK_MARGIN
    }

    /// Whether a `kill` event's `signal` attribute starts a drain: this container's
    /// stop signal, or SIGKILL. A `kill` without a readable signal counts as a stop
    /// (Docker always sets it; draining a container that lives on only delays its next
    /// request until the give-back).
    pub(crate) fn drains_on(&self, signal: Option<&str>) -> bool {
        match signal.map(signal_number) {
            None | Some(None) => true,
            Some(Some(n)) => n == self.signal || n == Signal::SIGKILL as i32,
        }
    }
}

/// `15`, `TERM`, `SIGTERM`, `sigterm` → 15. None for anything else.
pub(crate) fn signal_number(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).ok().map(|sig| sig as i32);
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().ok().map(|sig| sig as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(config: serde_json::Value) -> StopPolicy {
        let c: ContainerInspectResponse =
            serde_json::from_value(serde_json::json!({ "Config": config })).unwrap();
        StopPolicy::of(&c)
    }

    #[test]
    fn signal_names_and_numbers() {
        for s in ["15", "TERM", "SIGTERM", "sigterm", " SIGTERM "] {
            assert_eq!(signal_number(s), Some(15), "{s}");
        }
        assert_eq!(signal_number("SIGQUIT"), Some(3));
        assert_eq!(signal_number("9"), Some(9));
        for s in ["", "NOPE", "999", "-1", "SIG"] {
            assert_eq!(signal_number(s), None, "{s}");
        }
    }

    #[test]
    fn the_default_stop_is_sigterm_within_ten_seconds() {
        let p = policy(serde_json::json!({}));
        assert_eq!(p, StopPolicy::default());
        assert_eq!(p.signal, 15);
        assert_eq!(p.give_back_after(), Duration::from_secs(12));
        assert_eq!(StopPolicy::of(&ContainerInspectResponse::default()), p);
    }

    #[test]
    fn the_stop_signal_by_name_or_number_and_sigkill_drain() {
        let p = StopPolicy::default();
        for s in ["15", "SIGTERM", "9", "KILL"] {
            assert!(p.drains_on(Some(s)), "{s}");
        }
        assert!(p.drains_on(None));
        assert!(p.drains_on(Some("garbage")));
    }

    #[test]
    fn a_reload_signal_changes_nothing() {
        let p = StopPolicy::default();
        for s in ["1", "SIGHUP", "10", "USR1", "3", "2"] {
            assert!(!p.drains_on(Some(s)), "{s}");
        }
    }

    #[test]
    fn a_custom_stop_signal_replaces_sigterm() {
        let p = policy(serde_json::json!({"StopSignal": "SIGQUIT", "StopTimeout": 3}));
        assert_eq!(p.signal, 3);
        assert_eq!(p.timeout, Duration::from_secs(3));
        assert!(p.drains_on(Some("3")));
        assert!(p.drains_on(Some("9")));
        assert!(
            !p.drains_on(Some("15")),
            "SIGTERM is not this container's stop"
        );
        assert_eq!(policy(serde_json::json!({"StopSignal": "2"})).signal, 2);
        // Unreadable values fall back to Docker's defaults.
        let odd = policy(serde_json::json!({"StopSignal": "SIGNOPE", "StopTimeout": -1}));
        assert_eq!(odd, StopPolicy::default());
    }
}
