//! Certificates kept in etcd for the whole fleet: `<prefix>/certs/<name>`, one JSON
//! `Record` each (written by `portolan certs import` or the ACME issuer, `src/acme`).
//!
//! Pure but for `operator`: no I/O, no clock (the time is an argument). `record` is the value's shape and
//! the name rule; `check` judges a record before anything serves it (the PEM parses,
//! the key matches the leaf, the leaf is not expired, each certificate is issued by the
//! next, the domains are among the leaf's names); `domain` is RFC 6125 name matching;
//! `generate` makes the self-signed default certificate HAProxy starts with; `operator`
//! is the I/O edge, `portolan certs ls | import | rm`.
//!
//! Whoever can read `<prefix>/certs/` holds the private keys: the watchers' and the
//! issuer's etcd users may, node users may not (`auth`).

mod check;
mod domain;
mod generate;
pub mod operator;
mod record;

pub use check::{check, Checked, Refusal, Refused};
pub use domain::covers;
pub use generate::self_signed;
pub use record::{is_valid_name, key, CertSource, Record, NAME_RULE};
