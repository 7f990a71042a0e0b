//! Portolan: an etcd-backed control plane with a template-driven HAProxy front door.
//!
//! ```text
//!  dockerd ──events──▶ registrar ──put/del (one lease per host)──▶ etcd <prefix>/services/…
//!                                                                      │ watch
//!  clients ──▶ haproxy ◀──reload (master socket)── watcher ◀───────────┘
//!                          haproxy -c ◀── render (tera) ◀── snapshot
//! ```
//!
//! Map of the crate:
//! - `schema`: the etcd key/value contract (pure).
//! - `config`, `cli`: the TOML file, environment and flags, merged and validated.
//! - `etcd`, `backoff`, `shutdown`, `sd`, `telemetry`: shared edges.
//! - `registrar`: Docker → etcd (`docker`, `selector`, `lease`, `plan`, `probe`).
//! - `watcher`: etcd → HAProxy (`source`, `store`, `render`, `resource`, `runtime`,
//!   `haproxy`, `template_files`, `status`, `metrics`).
//! - `ls`, `dev`: operator commands.

pub(crate) mod backoff;
pub mod cli;
pub mod config;
pub mod dev;
pub mod etcd;
pub mod ls;
pub mod registrar;
pub mod schema;
pub(crate) mod sd;
pub mod shutdown;
pub mod telemetry;
pub mod watcher;
