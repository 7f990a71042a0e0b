//! `portolan dev`: etcd + HAProxy + registrar + watcher on one machine, started and
//! stopped together.

use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;

pub async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (args, shutdown);
    anyhow::bail!("dev: not implemented yet")
}
