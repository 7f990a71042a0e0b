//! Talking to HAProxy, one file per socket:
//! - `master`: the master CLI (`haproxy -W -S <socket>`): `show proc`, confirmed reloads;
//! - `runtime_plan` (pure): live file + rendered file → runtime ops, or "reload, because …";
//! - `runtime_api`: the admin `stats socket`: sends those ops;
//! - `socket`: the one-command exchange both sockets share.

pub(crate) mod master;
pub(crate) mod runtime_api;
pub(crate) mod runtime_plan;
pub(crate) mod socket;

// Integration tests read the master's reload counter.
pub use master::{show_proc, MasterStatus, ReloadError};
