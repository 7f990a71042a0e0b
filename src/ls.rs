//! `portolan ls`: services and instances from etcd, as a table or JSON.

use crate::config::EtcdConfig;

pub async fn run(etcd: &EtcdConfig, service: Option<&str>, json: bool) -> anyhow::Result<()> {
    let _ = (etcd, service, json);
    anyhow::bail!("ls: not implemented yet")
}
