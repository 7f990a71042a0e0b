//! Configuration: one TOML file, environment variables, flags — flag wins.
//!
//! Each section has one home, where each of its options is declared once, as a field
//! that serde reads from the file and clap reads from a flag or a `PORTOLAN_*`
//! environment variable: `etcd.rs` (`[etcd]`), `registrar.rs` (`[registrar]`),
//! `watcher.rs` (`[watcher]` and `[[template]]`), `acme.rs` (`[acme]`).
//!
//! The pipeline: `FileConfig::from_str` (pure) → `load(path)` (I/O) → the command-line
//! layer laid over it field by field ([`layered`]) → `resolve_*` into a validated
//! `EtcdConfig` / `RegistrarConfig` / `WatcherConfig`. `resolve_*` collects every
//! problem before failing, so one run of `portolan check` reports them all.

mod acme;
mod etcd;
mod hook;
mod registrar;
mod watcher;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use self::acme::{AcmeConfig, AcmeOptions, DEFAULT_RENEW_BEFORE_DAYS};
pub use self::etcd::{private_file, EtcdConfig, EtcdOptions, EtcdTls, Secret, DEFAULT_ENDPOINT};
pub use self::hook::{redact_url, HookConfig, HookFormat, HookOptions, HookTarget};
pub use self::registrar::{
    RegistrarConfig, RegistrarOptions, ServiceOptions, DEFAULT_RESYNC_SECS, DEFAULT_STATE_DIR,
    DEFAULT_TTL_SECS,
};
pub use self::watcher::{
    MassRemoval, TemplateResource, WaitOptions, WatcherConfig, WatcherOptions,
    DEFAULT_COMMAND_TIMEOUT_MS, DEFAULT_WAIT_MAX_MS, DEFAULT_WAIT_MIN_MS,
};
use crate::hook::{EventKind, RegistrarEvent, WatcherEvent};
use crate::schema;

/// The registrar's default config file: the one the Debian package ships.
pub const REGISTRAR_CONFIG_PATH: &str = "/etc/portolan/registrar.toml";
/// The watcher's (and `render`'s and `status`'s) default config file, as shipped.
pub const WATCHER_CONFIG_PATH: &str = "/etc/portolan/watcher.toml";

/// The files a subcommand reads when no `--config` is given, first that exists wins:
/// the ones the package ships, for the daemon each belongs to. `ls`, `auth` and `check`
/// serve either host: the watcher's file, else the registrar's.
pub fn default_config_paths(subcommand: &str) -> &'static [&'static str] {
    match subcommand {
        "registrar" => &[REGISTRAR_CONFIG_PATH],
        "watcher" | "render" | "status" => &[WATCHER_CONFIG_PATH],
        "dev" | "completions" | "man" => &[],
        _ => &[WATCHER_CONFIG_PATH, REGISTRAR_CONFIG_PATH],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Problems found while resolving, collected so that all of them are reported at once.
type Problems = Vec<String>;

fn finish<T>(value: T, problems: Problems) -> Result<T, ConfigError> {
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// The file layer: every section as written, nothing defaulted or validated yet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub etcd: EtcdOptions,
    #[serde(default)]
    pub registrar: RegistrarOptions,
    #[serde(default)]
    pub watcher: WatcherOptions,
    #[serde(default)]
    pub template: Vec<TemplateResource>,
    /// `[[service]]`: services of this host that are not containers, for the registrar
    /// (the documented spelling; `[[registrar.service]]` is the same).
    #[serde(default)]
    pub service: Option<Vec<ServiceOptions>>,
    /// `[[hook]]` sections: each daemon takes those for the events it emits.
    #[serde(default)]
    pub hook: Vec<HookOptions>,
    /// `[acme]`: certificates from an ACME CA, for the watcher.
    #[serde(default)]
    pub acme: AcmeOptions,
    /// The top-level sections the file has (`etcd`, `registrar`, `watcher`,
    /// `template`): `portolan check` validates each one that is there.
    #[serde(skip)]
    pub sections: BTreeSet<String>,
    /// Folder the file was read from: relative template paths are resolved against it.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// The registrar's command line: the `[etcd]` and `[registrar]` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistrarArgs {
    #[command(flatten)]
    pub etcd: EtcdOptions,
    #[command(flatten)]
    pub registrar: RegistrarOptions,
}

/// The watcher's command line: the `[etcd]` and `[watcher]` options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WatcherArgs {
    #[command(flatten)]
    pub etcd: EtcdOptions,
    #[command(flatten)]
    pub watcher: WatcherOptions,
}

impl FileConfig {
    /// Parses TOML text. Pure; `origin` only names the file in errors.
    pub fn from_str(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: parse_message(&e, text),
        };
        let mut cfg: FileConfig = toml::from_str(text).map_err(parse_error)?;
        let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        cfg.sections = table.keys().cloned().collect();
        Ok(cfg)
    }

    /// True when the file has this top-level section (`[registrar]`, `[[template]]`, …).
    pub fn has(&self, section: &str) -> bool {
        self.sections.contains(section)
    }

    /// Reads `path`. A missing file is an error only when the user named it; without
    /// one, nothing is read (see [`FileConfig::load_or_default`]).
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        Self::load_or_default(path, &[])
    }

    /// Reads `path`, or without one the first of `defaults` that exists (none: an
    /// empty file layer). A named file that is missing is an error.
    pub fn load_or_default(
        path: Option<&Path>,
        defaults: &[&str],
    ) -> Result<FileConfig, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match defaults.iter().find(|p| Path::new(p).exists()) {
                Some(p) => (PathBuf::from(p), true),
                None => return Ok(FileConfig::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(FileConfig::default())
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let mut cfg = FileConfig::from_str(&text, &path)?;
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        for t in &mut cfg.template {
            for p in [&mut t.src, &mut t.dest].into_iter().chain(
                [&mut t.haproxy_master_socket, &mut t.haproxy_admin_socket]
                    .into_iter()
                    .flatten(),
            ) {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.base_dir = Some(base);
        Ok(cfg)
    }
}

/// A TOML error as the toml crate words it, with the offending line — unless the file
/// holds a password: then the line and column, the crate's words without its quote of
/// the line, and nothing at all from a line holding `password`. The crate quotes the
/// line (an unclosed quote on `password = "…` would print the password) and, for a
/// value of the wrong type, the value; a multi-line string left open quotes whatever
/// line follows it.
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let secret = text.to_ascii_lowercase().contains("password");
    if !secret {
        return e.to_string();
    }
    let Some(span) = e.span() else {
        return "not valid TOML (details not shown: this file holds a password)".into();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let this_line = text[start..].split('\n').next().unwrap_or("");
    let full_line = format!("{}{this_line}", before.rsplit('\n').next().unwrap_or(""));
    let what = if full_line.to_ascii_lowercase().contains("password") {
        "the password line is not valid TOML (a password is a \"quoted string\")".to_string()
    } else {
        // The crate's words without its snippet: a value they quote ("invalid type:
        // integer `5`") starts on this line, which holds no password.
        e.message()
            .lines()
            .next()
            .unwrap_or("not valid TOML")
            .to_string()
    };
    format!(
        "TOML parse error at line {line}, column {column}: {what} (the line is not shown: this file holds a password)"
    )
}

/// `flags` laid over `file`: an option set on the command line or in the environment
/// wins, the file fills in the rest. Works on any section type, so no option has to be
/// listed a second time to be merged.
pub fn layered<T: Serialize + DeserializeOwned + Clone>(file: &T, flags: &T) -> T {
    let (Ok(serde_json::Value::Object(mut merged)), Ok(serde_json::Value::Object(top))) =
        (serde_json::to_value(file), serde_json::to_value(flags))
    else {
        // Only a path that is not UTF-8 fails to serialise: the flag still wins.
        return flags.clone();
    };
    for (k, v) in top {
        if !v.is_null() {
            merged.insert(k, v);
        }
    }
    serde_json::from_value(serde_json::Value::Object(merged)).unwrap_or_else(|_| flags.clone())
}

/// Shortest timeout accepted: below it every check or dial "times out" at once.
const MIN_TIMEOUT_MS: u64 = 100;

/// `ms`, or a problem naming `key` when it is below [`MIN_TIMEOUT_MS`].
/// The longest any duration option may be: one day. Far past any sensible setting, and
/// far below what would overflow a deadline (`Instant` + it), which panics.
const MAX_DURATION_S: u64 = 86_400;

/// `value` (in `unit`s per second: 1 for seconds, 1000 for milliseconds), or a problem
/// naming `key` when it is over a day.
fn at_most_a_day(key: &str, value: u64, per_s: u64, problems: &mut Problems) -> u64 {
    let max = MAX_DURATION_S * per_s;
    if value > max {
        let unit = if per_s == 1 {
            "seconds"
        } else {
            "milliseconds"
        };
        problems.push(format!(
            "{key} = {value}: must be at most {max} ({unit}, one day)"
        ));
        return max;
    }
    value
}

fn at_least_min_timeout(key: &str, ms: u64, problems: &mut Problems) -> u64 {
    if ms < MIN_TIMEOUT_MS {
        problems.push(format!(
            "{key} = {ms}: must be at least {MIN_TIMEOUT_MS} (milliseconds)"
        ));
    }
    at_most_a_day(key, ms, 1000, problems)
}

/// This machine's full host name (`web1.dc1`, not `web1`: the first label alone
/// collides across sites), the default node and watcher name. None when the host name
/// is not a valid name.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| schema::is_valid_name(h) && h != "localhost")
}

/// The name given, or the host name; a problem saying how to name it when neither works.
fn name_or_hostname(given: Option<&str>, flag: &str, problems: &mut Problems) -> String {
    match given.map(str::to_string).or_else(hostname) {
        Some(n) => n,
        None => {
            problems.push(format!(
                "this machine's host name is not usable as a name (empty, \"localhost\" or odd characters): set {flag} NAME"
            ));
            "unnamed".into()
        }
    }
}

/// The `[etcd]` section alone (`ls`, `render`'s connection): nothing else is read.
pub fn resolve_etcd(file: &FileConfig, flags: &EtcdOptions) -> Result<EtcdConfig, ConfigError> {
    let mut problems = Problems::new();
    let etcd = layered(&file.etcd, flags).resolve(&mut problems);
    finish(etcd, problems)
}

/// The `[watcher]` rules of who may route what (`services`, `hand_written`,
/// `node_networks`) alone, for `ls`: a file without them gives the defaults.
pub fn resolve_confinement(
    file: &FileConfig,
) -> Result<crate::watcher::confine::Confinement, ConfigError> {
    let mut problems = Problems::new();
    let c = file.watcher.confinement(&mut problems);
    finish(c, problems)
}

pub fn resolve_registrar(
    file: &FileConfig,
    flags: &RegistrarArgs,
) -> Result<RegistrarConfig, ConfigError> {
    let mut problems = Problems::new();
    let etcd = layered(&file.etcd, &flags.etcd).resolve(&mut problems);
    let mut cfg = layered(&file.registrar, &flags.registrar).resolve(
        etcd,
        file.service.as_deref().unwrap_or_default(),
        &mut problems,
    );
    cfg.hooks = hook::resolve_hooks(
        &file.hook,
        &RegistrarEvent::ALL.map(EventKind::from),
        &mut problems,
    );
    finish(cfg, problems)
}

/// Every `[[hook]]` of the file, against the events of both daemons: what `portolan
/// check` validates (each daemon then takes those for its own events).
pub fn resolve_hooks(file: &FileConfig) -> Result<Vec<HookConfig>, ConfigError> {
    let mut problems = Problems::new();
    let known: Vec<EventKind> = RegistrarEvent::ALL
        .iter()
        .copied()
        .map(EventKind::from)
        .chain(WatcherEvent::ALL.iter().copied().map(EventKind::from))
        .collect();
    let hooks = hook::resolve_hooks(&file.hook, &known, &mut problems);
    finish(hooks, problems)
}

pub fn resolve_watcher(
    file: &FileConfig,
    flags: &WatcherArgs,
) -> Result<WatcherConfig, ConfigError> {
    let mut problems = Problems::new();
    let etcd = layered(&file.etcd, &flags.etcd).resolve(&mut problems);
    let mut cfg =
        layered(&file.watcher, &flags.watcher).resolve(etcd, &file.template, &mut problems);
    cfg.acme = file.acme.resolve(cfg.listen.is_some(), &mut problems);
    if let (Some(_), Some(listen)) = (&cfg.acme, cfg.listen) {
        let server = acme::challenge_server(listen).to_string();
        for t in &mut cfg.templates {
            t.vars
                .entry("acme_challenge_server")
                .or_insert_with(|| server.clone().into());
        }
    }
    cfg.hooks = hook::resolve_hooks(
        &file.hook,
        &WatcherEvent::ALL.map(EventKind::from),
        &mut problems,
    );
    finish(cfg, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn registrar(registrar: RegistrarOptions) -> RegistrarArgs {
        RegistrarArgs {
            registrar,
            ..Default::default()
        }
    }

    #[test]
    fn parses_the_design_example() {
        let text = r#"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
prefix = "/portolan"

[watcher]
name = "lb-1"
wait = { min_ms = 20, max_ms = 500 }

[[template]]
src = "templates/haproxy.cfg.tera"
dest = "/etc/haproxy/haproxy.cfg"
check_cmd = "haproxy -c -f {src}"
haproxy_master_socket = "/run/haproxy-master.sock"
"#;
        let f = FileConfig::from_str(text, Path::new("x.toml")).unwrap();
        assert_eq!(f.template.len(), 1);
        assert_eq!(f.watcher.wait.unwrap().max_ms, Some(500));
    }

    #[test]
    fn the_password_comes_from_a_file_and_never_shows_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret-pw\n").unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let flags = |file: PathBuf| EtcdOptions {
            username: Some("portolan-node-a".into()),
            password_file: Some(file),
            ..Default::default()
        };
        let c = resolve_etcd(&FileConfig::default(), &flags(pw.clone())).unwrap();
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s3cret-pw"));
        assert!(!format!("{c:?}").contains("s3cret-pw"), "{c:?}");
        let file = FileConfig::from_str(
            "[etcd]\nusername = \"u\"\npassword = \"in-the-file\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(!format!("{file:?}").contains("in-the-file"));
        let c = resolve_etcd(&file, &EtcdOptions::default()).unwrap();
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("in-the-file"));

        let missing = dir.path().join("missing");
        let err = resolve_etcd(&FileConfig::default(), &flags(missing))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing") && err.contains("password file"),
            "{err}"
        );
        std::fs::write(&pw, "\n").unwrap();
        let err = resolve_etcd(&FileConfig::default(), &flags(pw))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
        let no_user = EtcdOptions {
            password: Some(Secret::new("x")),
            ..Default::default()
        };
        assert!(resolve_etcd(&FileConfig::default(), &no_user).is_err());
    }

    #[test]
    fn hooks_reach_the_daemon_that_emits_their_events() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "x").unwrap();
        let path = dir.path().join("p.toml");
        let write = |events: &str| {
            std::fs::write(
                &path,
                format!(
                    "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\nreload_cmd = \"true\"\n\
                     [[hook]]\nevents = [{events}]\nurl = \"https://hooks.example/secret\"\nformat = \"slack\"\n"
                ),
            )
            .unwrap();
            FileConfig::load(Some(&path)).unwrap()
        };
        let w = resolve_watcher(&write("\"reload\", \"reject\""), &WatcherArgs::default()).unwrap();
        assert_eq!(w.hooks.len(), 1);
        assert_eq!(w.hooks[0].format, HookFormat::Slack);
        // A hook of the other daemon's events is the other daemon's: not an error.
        let w = resolve_watcher(&write("\"register\""), &WatcherArgs::default()).unwrap();
        assert!(w.hooks.is_empty());
        let r = resolve_registrar(
            &write("\"register\", \"reload\""),
            &RegistrarArgs::default(),
        )
        .unwrap();
        assert_eq!(
            r.hooks[0].events,
            [EventKind::Registrar(crate::hook::RegistrarEvent::Register)]
        );
        let err = resolve_watcher(&write("\"relaod\""), &WatcherArgs::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"relaod\" is not one Portolan emits"),
            "{err}"
        );
    }

    /// Without --config each subcommand reads the file the package ships for its
    /// daemon, and that is the file the units name.
    #[test]
    fn each_subcommand_defaults_to_the_file_the_package_ships() {
        let deb = include_str!("../../packaging/build-deb.sh");
        for (unit, path, sub) in [
            (
                include_str!("../../systemd/portolan-registrar.service"),
                REGISTRAR_CONFIG_PATH,
                "registrar",
            ),
            (
                include_str!("../../systemd/portolan-watcher.service"),
                WATCHER_CONFIG_PATH,
                "watcher",
            ),
        ] {
            assert!(unit.contains(&format!("--config {path} {sub}")), "{sub}");
            assert!(deb.contains(&format!("/etc/portolan/{sub}.toml")), "{sub}");
            assert_eq!(default_config_paths(sub), [path]);
        }
        assert_eq!(default_config_paths("status"), [WATCHER_CONFIG_PATH]);
        assert_eq!(default_config_paths("render"), [WATCHER_CONFIG_PATH]);
        assert_eq!(
            default_config_paths("ls"),
            [WATCHER_CONFIG_PATH, REGISTRAR_CONFIG_PATH]
        );

        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&b, "[etcd]\nprefix = \"/from-b\"\n").unwrap();
        let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
        let f = FileConfig::load_or_default(None, &[a_s, b_s]).unwrap();
        assert_eq!(
            f.etcd.prefix.as_deref(),
            Some("/from-b"),
            "the first that exists"
        );
        let f = FileConfig::load_or_default(None, &[a_s]).unwrap();
        assert!(f.sections.is_empty(), "none exists: nothing read");
        assert!(
            FileConfig::load_or_default(Some(&a), &[b_s]).is_err(),
            "a named file must exist"
        );
    }

    #[test]
    fn a_file_knows_its_sections() {
        let f = FileConfig::from_str(
            "[registrar]\nttl = 5\n[[template]]\nsrc = \"a\"\ndest = \"b\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert!(f.has("registrar") && f.has("template"));
        assert!(!f.has("etcd") && !f.has("watcher"));
    }

    #[test]
    fn flags_fill_in_over_the_file_option_by_option() {
        let file = RegistrarOptions {
            node: Some("filenode".into()),
            ttl: Some(30),
            internal: Some(true),
            ..Default::default()
        };
        let flags = RegistrarOptions {
            node: Some("flagnode".into()),
            internal: Some(false),
            state_dir: Some("/flag".into()),
            ..Default::default()
        };
        let merged = layered(&file, &flags);
        assert_eq!(merged.node.as_deref(), Some("flagnode"));
        assert_eq!(merged.ttl, Some(30));
        assert_eq!(merged.internal, Some(false));
        assert_eq!(merged.state_dir.as_deref(), Some(Path::new("/flag")));
        assert_eq!(merged.resync, None);
    }

    #[test]
    fn unknown_fields_name_the_field() {
        let err = FileConfig::from_str("[etcd]\nendpoint = []\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("endpoint"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
    }

    #[test]
    fn flags_win_over_file() {
        let f = FileConfig::from_str(
            "[etcd]\nprefix = \"/file\"\n[registrar]\nnode = \"filenode\"\nttl = 30\n",
            Path::new("x"),
        )
        .unwrap();
        let o = RegistrarArgs {
            registrar: RegistrarOptions {
                node: Some("flagnode".into()),
                ..Default::default()
            },
            etcd: EtcdOptions {
                endpoints: Some(vec!["http://a:1,http://b:2".into()]),
                ..Default::default()
            },
        };
        let c = resolve_registrar(&f, &o).unwrap();
        assert_eq!(c.node, "flagnode");
        assert_eq!(c.ttl, Duration::from_secs(30));
        assert_eq!(c.etcd.prefix, "/file");
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
    }

    #[test]
    fn collects_every_problem() {
        let o = registrar(RegistrarOptions {
            node: Some("bad node".into()),
            advertise_ip: Some("nope".into()),
            ttl: Some(0),
            ..Default::default()
        });
        let ConfigError::Invalid(p) = resolve_registrar(&FileConfig::default(), &o).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(p.len(), 3, "{p:?}");
    }

    #[test]
    fn only_label_from_file_and_flag() {
        let f = FileConfig::from_str(
            "[registrar]\nonly_label = \"portolan.enable=true\"\n",
            Path::new("x"),
        )
        .unwrap();
        let c = resolve_registrar(&f, &RegistrarArgs::default()).unwrap();
        assert_eq!(c.only_label.as_deref(), Some("portolan.enable=true"));
        let o = registrar(RegistrarOptions {
            only_label: Some("team".into()),
            ..Default::default()
        });
        assert_eq!(
            resolve_registrar(&f, &o).unwrap().only_label.as_deref(),
            Some("team")
        );
        let o = registrar(RegistrarOptions {
            docker_api_version: Some("v1".into()),
            ..Default::default()
        });
        assert!(resolve_registrar(&f, &o).is_err());
        for bad in ["", "=x", "a b=c"] {
            let o = registrar(RegistrarOptions {
                only_label: Some(bad.into()),
                ..Default::default()
            });
            assert!(resolve_registrar(&f, &o).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn template_vars_and_relative_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n\
             haproxy_master_socket = \"master.sock\"\n\
             [template.vars]\ndomain = \"example.org\"\ntcp_ports = { db = 5432 }\n",
        )
        .unwrap();
        let f = FileConfig::load(Some(&path)).unwrap();
        let t = &f.template[0];
        assert_eq!(t.vars["domain"].as_str(), Some("example.org"));
        assert_eq!(t.vars["tcp_ports"]["db"].as_integer(), Some(5432));
        assert_eq!(
            t.haproxy_master_socket.as_deref(),
            Some(dir.path().join("master.sock").as_path())
        );
    }

    #[test]
    fn etcd_tls_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let https = |ca: Option<PathBuf>| RegistrarArgs {
            etcd: EtcdOptions {
                endpoints: Some(vec!["https://127.0.0.1:2379".into()]),
                ca_file: ca,
                ..Default::default()
            },
            ..Default::default()
        };
        let f = FileConfig::default();
        let c = resolve_registrar(&f, &https(Some(ca.clone()))).unwrap();
        assert_eq!(c.etcd.tls.unwrap().ca_file, ca);
        let err = resolve_registrar(&f, &https(None)).unwrap_err().to_string();
        assert!(err.contains("--etcd-ca"), "{err}");
        let err = resolve_registrar(&f, &https(Some(dir.path().join("missing.pem"))))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let mut mixed = https(Some(ca));
        mixed.etcd.endpoints = Some(vec!["http://127.0.0.1:2379".into()]);
        assert!(resolve_registrar(&f, &mixed).is_err());
    }

    #[test]
    fn admin_socket_needs_a_reload_to_fall_back_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "x").unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n\
             haproxy_admin_socket = \"admin.sock\"\n",
        )
        .unwrap();
        let f = FileConfig::load(Some(&path)).unwrap();
        let err = resolve_watcher(&f, &WatcherArgs::default()).unwrap_err();
        assert!(
            err.to_string().contains("haproxy_admin_socket needs"),
            "{err}"
        );
    }

    #[test]
    fn watcher_needs_templates() {
        let err = resolve_watcher(&FileConfig::default(), &WatcherArgs::default()).unwrap_err();
        assert!(err.to_string().contains("[[template]]"));
    }

    #[test]
    fn timeouts_below_100ms_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.tera"), "x").unwrap();
        let path = dir.path().join("p.toml");
        let write = |etcd: &str, watcher: &str| {
            std::fs::write(
                &path,
                format!(
                    "[etcd]\n{etcd}\n[watcher]\n{watcher}\n\
                     [[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n"
                ),
            )
            .unwrap();
            FileConfig::load(Some(&path)).unwrap()
        };
        let o = WatcherArgs::default();
        let f = write("dial_timeout_ms = 0", "command_timeout_ms = 0");
        let err = resolve_watcher(&f, &o).unwrap_err().to_string();
        assert!(err.contains("etcd.dial_timeout_ms = 0"), "{err}");
        assert!(err.contains("watcher.command_timeout_ms = 0"), "{err}");
        let f = write("dial_timeout_ms = 99", "");
        let err = resolve_watcher(&f, &o).unwrap_err().to_string();
        assert!(err.contains("etcd.dial_timeout_ms = 99"), "{err}");
        let f = write("dial_timeout_ms = 100", "command_timeout_ms = 100");
        let c = resolve_watcher(&f, &o).unwrap();
        assert_eq!(c.command_timeout, Duration::from_millis(100));
        assert_eq!(c.etcd.dial_timeout, Duration::from_millis(100));
    }
}
