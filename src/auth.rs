//! `portolan auth`: least-privilege etcd users, set up once by an operator with etcd's
//! root user.
//!
//! - `add-node NODE`: user and role `portolan-node-NODE`, read-write on
//!   `<prefix>/nodes/NODE/` and nothing else, which is every key a registrar writes
//!   (schema v2). One Docker host's credentials can then neither delete nor redirect
//!   another host's instances, hand-written keys, `config/` or a watcher's status.
//! - `add-watcher NAME`: user and role `portolan-watcher-NAME`, read on the whole
//!   prefix (what a watcher renders from) and read-write on its own status key
//!   `<prefix>/watchers/NAME`. It cannot write a single instance.
//!
//! Each command prints what it did as the equivalent `etcdctl` lines, so an operator
//! can review it or script it without Portolan. Rerunning a command converges: an
//! existing user gets the file's password, an existing role keeps its grants.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use etcd_client::{Client, Permission, PermissionType};

use crate::config::EtcdConfig;
use crate::{etcd, schema};

/// One permission of a role: read or read-write on a key or on every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub write: bool,
    pub key: String,
    pub prefix: bool,
}

/// A user with a role of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub grants: Vec<Grant>,
}

/// What a registrar of `node` needs: its node prefix, read-write.
pub fn node_principal(prefix: &str, node: &str) -> Principal {
    Principal {
        name: format!("portolan-node-{node}"),
        grants: vec![Grant {
            write: true,
            key: schema::node_prefix(prefix, node),
            prefix: true,
        }],
    }
}

/// What watcher `name` needs: read everything under the prefix, write its status key.
pub fn watcher_principal(prefix: &str, name: &str) -> Principal {
    Principal {
        name: format!("portolan-watcher-{name}"),
        grants: vec![
            Grant {
                write: false,
                key: format!("{prefix}/"),
                prefix: true,
            },
            Grant {
                write: true,
                key: schema::watcher_key(prefix, name),
                prefix: false,
            },
        ],
    }
}

/// A watcher that also issues certificates (`add-watcher --issuer`, the ACME issuer
/// of `src/acme`): `watcher_principal`, and read-write on `<prefix>/certs/` and
/// `<prefix>/acme/`. Whoever writes `certs/` chooses what every front door serves.
pub fn issuer_principal(prefix: &str, name: &str) -> Principal {
    let mut p = watcher_principal(prefix, name);
    for dir in ["certs", "acme"] {
        p.grants.push(Grant {
            write: true,
            key: format!("{prefix}/{dir}/"),
            prefix: true,
        });
    }
    p
}

/// The same setup as `etcdctl` commands, for review or scripting.
pub fn etcdctl_lines(p: &Principal, password_file: &Path) -> String {
    let mut out = format!(
        "etcdctl user add {0} --interactive=false < {1}\netcdctl role add {0}\n",
        p.name,
        password_file.display()
    );
    for g in &p.grants {
        out += &format!(
            "etcdctl role grant-permission {} {}{} {}\n",
            p.name,
            if g.write { "readwrite" } else { "read" },
            if g.prefix { " --prefix=true" } else { "" },
            g.key
        );
    }
    out += &format!("etcdctl user grant-role {0} {0}\n", p.name);
    out
}

/// The password in `path` (its first line), or a new random one written there with mode
/// 0600 when the file does not exist. Returns the password and whether it was generated.
pub fn password(path: &Path) -> anyhow::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            crate::config::private_file(path).map_err(anyhow::Error::msg)?;
            let pw = text.lines().next().unwrap_or("").trim_end().to_string();
            anyhow::ensure!(
                !pw.is_empty(),
                "password file {} is empty: put the password on its first line, or remove the file to have one generated",
                path.display()
            );
            Ok((pw, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pw = random_password()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create the password file {}", path.display()))?;
            writeln!(f, "{pw}")
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cannot write the password file {}", path.display()))?;
            Ok((pw, true))
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read the password file {}", path.display()))
        }
    }
}

/// 32 characters from the kernel's CSPRNG (192 bits).
fn random_password() -> anyhow::Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom for a random password")?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

fn already_exists(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("already exists"))
}

/// Creates (or updates) the user and its role in etcd.
pub async fn apply(client: &mut Client, p: &Principal, password: &str) -> anyhow::Result<()> {
    let what = |step: &str| {
        format!("etcd {step} for {} (are you etcd's root user? --etcd-username root --etcd-password-file FILE)", p.name)
    };
    match etcd::call(client.user_add(p.name.as_str(), password, None)).await {
        Ok(_) => {}
        Err(e) if already_exists(&e) => {
            etcd::call(client.user_change_password(p.name.as_str(), password))
                .await
                .with_context(|| what("user change-password"))?;
        }
        Err(e) => return Err(e).with_context(|| what("user add")),
    }
    match etcd::call(client.role_add(p.name.as_str())).await {
        Ok(_) => {}
        Err(e) if already_exists(&e) => {}
        Err(e) => return Err(e).with_context(|| what("role add")),
    }
    for g in &p.grants {
        let kind = if g.write {
            PermissionType::Readwrite
        } else {
            PermissionType::Read
        };
        let mut perm = Permission::new(kind, g.key.as_str());
        if g.prefix {
            perm = perm.with_prefix();
        }
        etcd::call(client.role_grant_permission(p.name.as_str(), perm))
            .await
            .with_context(|| what("role grant-permission"))?;
    }
    etcd::call(client.user_grant_role(p.name.as_str(), p.name.as_str()))
        .await
        .with_context(|| what("user grant-role"))?;
    Ok(())
}

/// Refuses, unless `allow_unsafe`, when any endpoint runs an etcd whose RBAC a user
/// can bypass (`etcd::advisory`): a role made there would confine nothing.
async fn refuse_unsafe_etcd(
    etcd_cfg: &EtcdConfig,
    p: &Principal,
    allow_unsafe: bool,
) -> anyhow::Result<()> {
    let found = etcd::advisory::check(etcd_cfg).await;
    for e in found.iter().filter(|e| e.result.is_err()) {
        eprintln!(
            "warning: {}: check that it runs a fixed release too",
            e.describe()
        );
    }
    let unsafe_lines: Vec<String> = found
        .iter()
        .filter(|e| e.bypassable())
        .map(|e| e.describe())
        .collect();
    if unsafe_lines.is_empty() {
        return Ok(());
    }
    if allow_unsafe {
        for l in &unsafe_lines {
            eprintln!(
                "warning: {l}. Setting up {} anyway (--allow-unsafe-etcd): it keeps honest software in its lane, not a hostile host",
                p.name
            );
        }
        return Ok(());
    }
    anyhow::bail!(
        "refusing to set up {}: {}. A role made there confines nothing. Upgrade etcd, or pass --allow-unsafe-etcd to set the user up anyway, knowing that its credentials reach every key and lease",
        p.name,
        unsafe_lines.join("; ")
    )
}

/// `portolan auth add-node|add-watcher`: sets up `p` and prints what it did.
pub async fn run(
    etcd_cfg: &EtcdConfig,
    p: &Principal,
    password_file: &Path,
    allow_unsafe_etcd: bool,
) -> anyhow::Result<()> {
    refuse_unsafe_etcd(etcd_cfg, p, allow_unsafe_etcd).await?;
    let (pw, generated) = password(password_file)?;
    let endpoints = etcd_cfg.endpoints.join(",");
    let mut client = etcd::connect(etcd_cfg)
        .await
        .with_context(|| format!("cannot reach etcd at {endpoints} (--etcd-endpoints URL)"))?;
    apply(&mut client, p, &pw).await?;
    println!(
        "# etcd user and role {} set up; password {} {}",
        p.name,
        if generated {
            "generated into"
        } else {
            "read from"
        },
        password_file.display()
    );
    print!("{}", etcdctl_lines(p, password_file));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_may_write_its_own_prefix_and_nothing_else() {
        let p = node_principal("/portolan", "web1");
        assert_eq!(p.name, "portolan-node-web1");
        assert_eq!(
            p.grants,
            vec![Grant {
                write: true,
                key: "/portolan/nodes/web1/".into(),
                prefix: true
            }]
        );
        // The trailing slash matters: a prefix grant on "/portolan/nodes/web1" would
        // also cover node "web10".
        assert!(p.grants[0].key.ends_with('/'));
    }

    #[test]
    fn a_watcher_reads_everything_and_writes_its_status_key() {
        let p = watcher_principal("/portolan", "lb-1");
        let lines = etcdctl_lines(&p, Path::new("/etc/portolan/lb-1.pw"));
        assert_eq!(
            lines,
            "etcdctl user add portolan-watcher-lb-1 --interactive=false < /etc/portolan/lb-1.pw\n\
             etcdctl role add portolan-watcher-lb-1\n\
             etcdctl role grant-permission portolan-watcher-lb-1 read --prefix=true /portolan/\n\
             etcdctl role grant-permission portolan-watcher-lb-1 readwrite /portolan/watchers/lb-1\n\
             etcdctl user grant-role portolan-watcher-lb-1 portolan-watcher-lb-1\n"
        );
    }

    #[test]
    fn a_missing_password_file_is_generated_private_and_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        let (a, generated) = password(&f).unwrap();
        assert!(generated && a.len() == 32, "{a}");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, generated) = password(&f).unwrap();
        assert!(!generated);
        assert_eq!(a, b);
        assert_ne!(a, password(&dir.path().join("other")).unwrap().0);
        std::fs::write(&f, "\n").unwrap();
        assert!(password(&f).unwrap_err().to_string().contains("empty"));
    }
}
