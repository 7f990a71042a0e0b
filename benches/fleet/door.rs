//! One front door: HAProxy (master socket, runtime API on) and a `portolan watcher`
//! process rendering it from the fleet's prefix on all three etcd members. Both are
//! child processes owned by guards that kill them by PID on drop (`common::Proc`).
//!
//! The template has no health checks, so only Portolan's costs count (as the
//! convergence bench's scale rows): one backend per service, one server per instance.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::haproxy::{bootstrap_config, Haproxy};
use crate::common::{free_port, portolan_cmd, Proc};
use crate::host::Server;

const TEMPLATE: &str = "global\n    stats socket {{ vars.admin_socket }} mode 600 level admin\n\
defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\
frontend fe\n    bind {{ vars.http_bind }}\n\
{% for name, list in services %}    use_backend svc_{{ name }} if { req.hdr(host) -m str {{ name }}.test }\n{% endfor %}\
{% for name, list in services %}backend svc_{{ name }}\n{% for i in list %}    server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}";

pub struct Door {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub admin_sock: PathBuf,
    pub metrics_port: u16,
    pub haproxy: Haproxy,
    pub watcher: Option<Proc>,
    config: PathBuf,
    log: PathBuf,
}

impl Door {
    /// HAProxy on a bootstrap config, then the watcher; `guard` is the watcher's
    /// `mass_removal` table (empty: the defaults).
    pub async fn start(name: &str, endpoints: &[String], prefix: &str, guard: &str) -> Door {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("haproxy.cfg.tera"), TEMPLATE).expect("template");
        let dest = dir.path().join("haproxy.cfg");
        let http_port = free_port();
        std::fs::write(&dest, bootstrap_config(http_port)).expect("bootstrap config");
        let haproxy = Haproxy::start(
            &dest,
            &dir.path().join("master.sock"),
            &dir.path().join("haproxy.log"),
        )
        .await;
        let admin_sock = dir.path().join("admin.sock");
        let metrics_port = free_port();
        let config = dir.path().join("portolan.toml");
        let guard = if guard.is_empty() {
            String::new()
        } else {
            format!("mass_removal = {{ {guard} }}")
        };
        let toml = format!(
            r#"[etcd]
endpoints = {endpoints:?}
prefix = "{prefix}"

[watcher]
name = "{name}"
listen = "127.0.0.1:{metrics_port}"
wait = {{ min_ms = 20, max_ms = 500 }}
state_dir = {state:?}
allowed_networks = ["127.0.0.0/8"]
{guard}

[[template]]
src = "haproxy.cfg.tera"
dest = "haproxy.cfg"
check_cmd = "haproxy -c -f {{src}}"
haproxy_master_socket = {master:?}
haproxy_admin_socket = {admin:?}

[template.vars]
http_bind = "127.0.0.1:{http_port}"
admin_socket = {admin:?}
"#,
            state = dir.path().join("watcher-state").display().to_string(),
            master = dir.path().join("master.sock").display().to_string(),
            admin = admin_sock.display().to_string(),
        );
        std::fs::write(&config, toml).expect("watcher config");
        let mut d = Door {
            name: name.to_string(),
            log: dir.path().join("watcher.log"),
            dir,
            admin_sock,
            metrics_port,
            haproxy,
            watcher: None,
            config,
        };
        d.start_watcher();
        d
    }

    fn start_watcher(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("watcher log");
        let mut cmd = portolan_cmd();
        cmd.arg("watcher")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.watcher = Some(Proc::spawn("portolan watcher", &mut cmd));
    }

    pub fn watcher_pid(&self) -> i32 {
        self.watcher.as_ref().map(Proc::pid).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What HAProxy routes to: see `servers_at`.
    pub async fn servers(&self, backend: Option<&str>) -> Option<BTreeSet<Server>> {
        servers_at(&self.admin_sock, backend).await
    }
}

/// One runtime API command on `sock`; None when HAProxy does not answer within 5 s
/// (during a reload the socket moves to the new worker).
pub async fn admin(sock: &Path, cmd: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(sock).await.ok()?;
        s.write_all(format!("{cmd}\n").as_bytes()).await.ok()?;
        s.shutdown().await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// The servers HAProxy routes to, as (backend, server, ip:port), from `show servers
/// state` (of one backend, or all): those in maintenance (admin state not 0) left out.
/// None when HAProxy does not answer.
pub async fn servers_at(sock: &Path, backend: Option<&str>) -> Option<BTreeSet<Server>> {
    let cmd = match backend {
        Some(b) => format!("show servers state {b}"),
        None => "show servers state".to_string(),
    };
    let text = admin(sock, &cmd).await?;
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state … srv_port
        // (the 19th field).
        if f.len() > 18 && f[6] == "0" {
            out.insert((
                f[1].to_string(),
                f[3].to_string(),
                format!("{}:{}", f[4], f[18]),
            ));
        }
    }
    Some(out)
}
