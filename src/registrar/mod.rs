//! The registrar: keeps this node's running containers registered in etcd.

pub mod selector;

use tokio_util::sync::CancellationToken;

use crate::config::RegistrarConfig;

/// Runs until `shutdown` is cancelled. Never returns because a stream closed.
pub async fn run(cfg: RegistrarConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (cfg, shutdown);
    anyhow::bail!("registrar: not implemented yet")
}
