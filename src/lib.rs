//! Portolan: an etcd-backed control plane with a template-driven HAProxy front door.
//!
//! ```text
//!  dockerd ──events──▶ registrar ──put/del (one lease per host)──▶ etcd <prefix>/services/…
//!                                                                      │ watch
//!  clients ──▶ haproxy ◀──reload (master socket)── watcher ◀───────────┘
//!                          haproxy -c ◀── render (tera) ◀── snapshot
//! ```
//!
//! Map of the crate, one role a module:
//! - `schema`: the etcd key/value contract, v2 node-scoped keys beside v1 (pure).
//! - `config`: the TOML file, environment and flags, one home per section
//!   (`config/{etcd,registrar,watcher}.rs`), merged and validated.
//! - `cli`: the command line's shape; every section's options come from `config`.
//! - `etcd`: connecting (keep-alive, TLS, auth), bounded calls, paged prefix listings.
//! - `backoff`: retry delays and the timer helpers reconnect loops share.
//! - `shutdown`: the cancellation token signals cancel; `sd`: systemd notify and watchdog.
//! - `telemetry`: logging setup with fixed field names; `endpoint`: the `/metrics` and
//!   `/healthz` HTTP endpoint both daemons serve.
//! - `registrar`: Docker → etcd. `docker` (events, inspect), `containers` (what each
//!   registers), `selector/{labels,ports}` (labels → registrations, ports → addresses;
//!   pure), `probe` (HTTP/TCP probes), `plan` (desired vs actual → key ops; pure),
//!   `session` (the etcd session: lease, read-back, transactions), `lease` (grant, reuse,
//!   keep-alive), `pass` (one sync: reconcile or apply the difference), `advertise`
//!   (detecting the advertise IP), `drain` (stop signals
//!   and give-back deadlines), `events` (hook events from key ops), `watch` (our own
//!   keys, repaired when touched); `mod.rs` is the loop.
//! - `watcher`: etcd → HAProxy. `source` (list + watch), `store` (snapshot; pure),
//!   `render` (tera; pure), `guard` (the mass-removal hold; pure), `policy` and
//!   `resolve` (where instances may point; names resolved off the render path),
//!   `resource` (stage, check, swap, reload, the last good file, the lock), `haproxy/{master
//!   (master socket), runtime_plan (config diff → runtime ops; pure), runtime_api (admin
//!   socket), socket}`, `template_files` (notify), `status` (own etcd key), `metrics`,
//!   `oneshot` (`render --once`, template checks), `inspect` (`portolan status`);
//!   `mod.rs` is the loop.
//! - `hook`: event hooks (webhooks, commands), delivered off the daemons' loops.
//! - `ls`, `dev`, `auth`: operator commands (`auth`: least-privilege etcd users).

pub mod auth;
pub(crate) mod backoff;
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
