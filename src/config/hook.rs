//! `[[hook]]` sections: who hears about registrations and reloads, and how.
//!
//! ```toml
//! [[hook]]
//! events = ["register", "deregister"]
//! url = "https://hooks.slack.com/services/T000/B000/XXXX"
//! format = "slack"
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;
use crate::hook::{EventKind, RegistrarEvent, WatcherEvent};

const DEFAULT_HOOK_TIMEOUT_MS: u64 = 5000;

/// One `[[hook]]` as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookOptions {
    /// Which events it hears about, by name.
    #[serde(default)]
    pub events: Vec<String>,
    /// POST each event as JSON to this http(s) URL. A secret: never logged whole.
    pub url: Option<String>,
    /// Run this program with the event's JSON on standard input: ["argv0", "arg", …].
    pub command: Option<Vec<String>>,
    /// "json" (default): one JSON object per event; "slack": Slack's incoming-webhook
    /// shape, `{"text": "…"}`.
    pub format: Option<String>,
    /// Time limit of one delivery attempt, in milliseconds [default: 5000].
    pub timeout_ms: Option<u64>,
}

/// Where a hook delivers.
#[derive(Clone, PartialEq, Eq)]
pub enum HookTarget {
    Url(String),
    Command(Vec<String>),
}

impl std::fmt::Debug for HookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HookTarget::Url(u) => write!(f, "Url({})", redact_url(u)),
            HookTarget::Command(argv) => write!(f, "Command({argv:?})"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookFormat {
    Json,
    Slack,
}

/// A validated hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    pub events: Vec<EventKind>,
    pub target: HookTarget,
    pub format: HookFormat,
    pub timeout: Duration,
}

/// `scheme://host[:port]/…`: enough to say where a webhook goes without its secret path
/// or credentials.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}/…")
}

/// Validates the `[[hook]]` sections and keeps, for a daemon that emits `known`
/// events, the hooks that hear any of them (restricted to those). One file can serve a
/// host running both daemons: a hook of the other daemon's events is not an error, an
/// event that neither emits is.
pub(super) fn resolve_hooks(
    hooks: &[HookOptions],
    known: &[EventKind],
    problems: &mut Problems,
) -> Vec<HookConfig> {
    let names = |all: &mut dyn Iterator<Item = &'static str>| all.collect::<Vec<_>>().join(", ");
    let mut out = Vec::new();
    for (i, h) in hooks.iter().enumerate() {
        let n = i + 1;
        let before = problems.len();
        if h.events.is_empty() {
            problems.push(format!(
                "hook #{n}: events is empty: name what it hears, e.g. events = [\"{}\"]",
                known[0].as_str()
            ));
        }
        let mut events = Vec::new();
        for e in &h.events {
            match EventKind::parse(e) {
                Some(kind) if known.contains(&kind) => events.push(kind),
                Some(_) => {}
                None => problems.push(format!(
                    "hook #{n}: event {e:?} is not one Portolan emits (the registrar: {}; the watcher: {})",
                    names(&mut RegistrarEvent::ALL.iter().map(|e| e.as_str())),
                    names(&mut WatcherEvent::ALL.iter().map(|e| e.as_str())),
                )),
            }
        }
        let target = match (&h.url, &h.command) {
            (Some(u), None) => {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    problems.push(format!(
                        "hook #{n}: url {} must start with http:// or https://",
                        redact_url(u)
                    ));
                }
                Some(HookTarget::Url(u.clone()))
            }
            (None, Some(argv)) if !argv.is_empty() && !argv[0].is_empty() => {
                Some(HookTarget::Command(argv.clone()))
            }
            (None, Some(_)) => {
                problems.push(format!("hook #{n}: command is empty: command = [\"/usr/local/bin/notify\", \"--flag\"]"));
                None
            }
            _ => {
                problems.push(format!(
                    "hook #{n}: set exactly one of url = \"https://…\" or command = [\"argv\", …]"
                ));
                None
            }
        };
        let format = match h.format.as_deref() {
            None | Some("json") => HookFormat::Json,
            Some("slack") => HookFormat::Slack,
            Some(other) => {
                problems.push(format!(
                    "hook #{n}: format {other:?}: expected \"json\" or \"slack\""
                ));
                HookFormat::Json
            }
        };
        let timeout_ms = h.timeout_ms.unwrap_or(DEFAULT_HOOK_TIMEOUT_MS);
        if !(100..=60_000).contains(&timeout_ms) {
            problems.push(format!(
                "hook #{n}: timeout_ms = {timeout_ms}: must be between 100 and 60000"
            ));
        }
        if let (Some(target), true, false) = (target, problems.len() == before, events.is_empty()) {
            out.push(HookConfig {
                events,
                target,
                format,
                timeout: Duration::from_millis(timeout_ms),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_url_is_shown_without_its_secret() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/XXXX"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            redact_url("http://user:pw@10.0.0.1:8080/x?token=1"),
            "http://10.0.0.1:8080/…"
        );
        let t = HookTarget::Url("https://h.example/secret-path".into());
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn every_problem_of_a_hook_is_named() {
        let mut p = Problems::new();
        let hooks = vec![
            HookOptions {
                events: vec!["register".into()],
                url: Some("https://h.example/x".into()),
                format: Some("slack".into()),
                ..Default::default()
            },
            HookOptions {
                events: vec!["relaod".into()],
                url: Some("ftp://x".into()),
                command: None,
                format: Some("xml".into()),
                timeout_ms: Some(0),
            },
            HookOptions {
                events: vec!["register".into()],
                ..Default::default()
            },
        ];
        let known = RegistrarEvent::ALL.map(EventKind::from);
        let ok = resolve_hooks(&hooks, &known, &mut p);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].format, HookFormat::Slack);
        let all = p.join("\n");
        for needle in [
            "\"relaod\" is not one Portolan emits",
            "ftp",
            "\"xml\"",
            "timeout_ms = 0",
            "hook #3: set exactly one",
        ] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
    }
}
