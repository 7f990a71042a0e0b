//! Logging setup. Fixed field names across the code base: `service`, `instance`,
//! `container`, `node`, `revision`, `key`.
//!
//! What is logged: `--log-level` (`PORTOLAN_LOG_LEVEL`) when given, else `RUST_LOG`,
//! else `info`; each is a tracing filter (`debug`, `warn,portolan::watcher=debug`).
//! How: `--log-format text|json` (`PORTOLAN_LOG_FORMAT`); JSON is one object a line
//! with the fields flattened, for log shippers.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// What is logged when neither `--log-level` nor `RUST_LOG` says: the libraries under
/// the etcd client are chatty at info.
const DEFAULT_FILTER: &str = "info,h2=warn,tower=warn,hyper=warn";

/// The filter from `--log-level` (wins), else `RUST_LOG`, else the default. A bad
/// `--log-level` is an error naming the flag; a bad `RUST_LOG` too (a typo there would
/// otherwise silently log at another level).
pub fn filter(level: Option<&str>, rust_log: Option<&str>) -> Result<EnvFilter, String> {
    let (text, origin) = match (level, rust_log) {
        (Some(l), _) => (l, "--log-level"),
        (None, Some(r)) if !r.trim().is_empty() => (r, "RUST_LOG"),
        _ => (DEFAULT_FILTER, "the default"),
    };
    EnvFilter::builder().parse(text).map_err(|e| {
        format!(
            "{origin} {text:?} is not a log filter ({e}): use a level (error, warn, info, \
             debug, trace) or directives like \"info,portolan::watcher=debug\""
        )
    })
}

/// Installs the global subscriber. Err only for a bad filter (see [`filter`]).
pub fn init_with(level: Option<&str>, format: LogFormat) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(level, rust_log.as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init: a test or `portolan dev` may have set a subscriber already.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
    };
    Ok(())
}

/// The default setup (`RUST_LOG` or info), for tests and embedders.
pub fn init(json: bool) {
    let format = if json {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    if init_with(None, format).is_err() {
        let _ = init_with(Some("info"), format);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_rust_log_which_wins_over_the_default() {
        let f = filter(Some("debug"), Some("error")).unwrap();
        assert_eq!(f.to_string(), "debug");
        let f = filter(None, Some("warn,portolan=trace")).unwrap();
        assert!(f.to_string().contains("portolan=trace"), "{f}");
        let f = filter(None, None).unwrap();
        assert!(f.to_string().contains("h2=warn"), "{f}");
        let f = filter(None, Some("  ")).unwrap();
        assert!(f.to_string().contains("h2=warn"), "{f}");
    }

    #[test]
    fn a_bad_filter_names_where_it_came_from() {
        let e = filter(Some("loud=verbose=x"), None).unwrap_err();
        assert!(e.contains("--log-level") && e.contains("loud"), "{e}");
        let e = filter(None, Some("[[")).unwrap_err();
        assert!(e.contains("RUST_LOG"), "{e}");
    }
}
