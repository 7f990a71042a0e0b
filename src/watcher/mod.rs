//! The watcher: etcd → tera → haproxy -c → atomic swap → confirmed reload.

use tokio_util::sync::CancellationToken;

use crate::config::WatcherConfig;

/// Runs until `shutdown` is cancelled.
pub async fn run(cfg: WatcherConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (cfg, shutdown);
    anyhow::bail!("watcher: not implemented yet")
}

/// `portolan render --once [--dry-run]`. Returns false when a check failed.
pub async fn render_once(cfg: &WatcherConfig, dry_run: bool) -> anyhow::Result<bool> {
    let _ = (cfg, dry_run);
    anyhow::bail!("render: not implemented yet")
}

/// `portolan check`: compiles every template of the config. Pure apart from reading files.
pub fn check_templates(cfg: &WatcherConfig) -> anyhow::Result<()> {
    let _ = cfg;
    Ok(())
}
