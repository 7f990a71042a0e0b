//! Portolan: an etcd-backed control plane with a template-driven HAProxy front door.
//!
//! ```text
//!  dockerd ──events──▶ registrar ──put/del on one lease per host──▶ etcd <prefix>/
//!                                   nodes/<node>                      │   nodes/<node>/services/<svc>/<id>
//!                                   nodes/<node>/services/<svc>/<id>  │   services/<svc>/<id> (hand-written)
//!                                                                     │   config/…, watchers/<name>
//!                                                              watch  ▼
//!  clients ──▶ haproxy ◀──admin socket: add/del/set server── watcher: store → effective → render
//!                 ▲     ◀──master socket: confirmed reload──          → route → execute → report
//!                 └────────── haproxy -c (before any reload; in the background after a runtime change)
//! ```
//!
//! Map of the crate, one role a module:
//! - `schema`: the etcd key/value contract, v2 node-scoped keys beside v1 (pure).
//! - `config`: the TOML file, environment and flags, one home per section
//!   (`config/{etcd,registrar,watcher,hook}.rs`), merged and validated.
//! - `cli`: the command line's shape; every section's options come from `config`.
//! - `etcd`: connecting (keep-alive, TLS, auth), bounded calls, paged prefix listings.
//! - `backoff`: retry delays and the timer helpers reconnect loops share.
//! - `shutdown`: the cancellation token signals cancel; `sd`: systemd notify and watchdog.
//! - `telemetry`: logging setup with fixed field names; `endpoint`: the `/metrics` and
//!   `/healthz` HTTP endpoint both daemons serve (and the watcher's status page).
//! - `registrar`: Docker → etcd. `mod.rs` is the loop → `pass` (one sync: reconcile or
//!   apply the difference) → `plan` (desired vs actual → key ops; pure) → `session` (the
//!   etcd session: lease, read-back, transactions). Beside them: `docker` (events,
//!   inspect), `containers` (what each registers), `selector/{labels,ports,service}`
//!   (labels → registrations, ports → addresses; pure), `probe` (HTTP/TCP probes),
//!   `lease` (grant, reuse, keep-alive), `drain` (stop signals and give-back deadlines),
//!   `announce` (hook events from key ops), `watch` (our own keys, repaired when
//!   touched), `advertise` (detecting the advertise IP).
//! - `watcher`: etcd → HAProxy. `mod.rs` is the loop → `pass`: `source` (list + watch;
//!   `confine`: who may route what, `policy`: where to, `dns_names`: a name at the
//!   addresses approved for it) → `store` (snapshot; pure) → `effective` (`guard`: the mass-removal
//!   hold, `linger`: emptied backends kept; pure) → `render` (tera; pure) → `apply`
//!   (`route`: which path, pure; the executor; `dest`: the crash-safe file; `command`:
//!   check and reload commands) → `report` (outcome → log, metrics, hooks, status; pure)
//!   → `sink`. Beside them: `deferred` (checks off the latency path), `resolve` (names
//!   looked up off the render path), `interfaces` (this host's own addresses),
//!   `haproxy/{master (master socket), runtime_plan (config diff → runtime ops; pure),
//!   runtime_api (admin socket), sections and servers (reading configs and `show servers
//!   state`; pure), socket}`, `template_files` (notify), `status` (own etcd key),
//!   `metrics`, `oneshot` (`render --once`, template checks), `drift` (`portolan status`),
//!   `ui` (the status page: fed by the loop through a watch channel, served on `listen`).
//! - `acme`: certificates for the fleet from an ACME CA: `want` (which are wanted and
//!   due; pure), `record` (the etcd records), `election` (one issuer at a time),
//!   `order` (the ACME exchange), `challenge` (the HTTP-01 answers every watcher serves).
//! - `hook`: event hooks (webhooks, commands), delivered off the daemons' loops.
//! - `ls`, `dev`, `auth`: operator commands (`auth`: least-privilege etcd users).

/// `portolan --version`: the package version and, when built from a git checkout, the
/// revision (`0.1.0 (git 0123456789ab)`); build.rs works it out.
pub const VERSION: &str = env!("PORTOLAN_VERSION");

#[cfg(test)]
#[path = "../build/revision.rs"]
#[allow(dead_code)] // head_files is build.rs's alone.
mod revision;

#[cfg(test)]
mod version_tests {
    use super::revision::{git_revision, version_string};

    #[test]
    fn the_version_names_the_git_revision_when_there_is_one() {
        assert_eq!(
            version_string("1.2.3", Some("0123456789ab")),
            "1.2.3 (git 0123456789ab)"
        );
        assert_eq!(version_string("1.2.3", None), "1.2.3");
    }

    #[test]
    fn outside_a_git_checkout_there_is_no_revision_and_no_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(git_revision(dir.path()), None);
        // A folder inside a checkout that is not its top (a tarball unpacked there)
        // takes no revision either.
        let inner = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        assert_eq!(git_revision(&inner), None);
    }
}

pub mod acme;
pub mod auth;
pub(crate) mod backoff;
pub mod certs;
pub mod cli;
pub mod config;
pub mod dev;
pub(crate) mod endpoint;
pub mod etcd;
pub mod hook;
pub mod ls;
pub mod registrar;
pub mod schema;
pub(crate) mod sd;
pub mod shutdown;
pub mod telemetry;
pub mod watcher;
