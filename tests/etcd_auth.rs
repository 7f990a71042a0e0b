//! etcd with authentication on: the password comes from a file (or a systemd
//! credential), never from a flag or a variable, and never shows in a log line.
mod common;

use std::time::Duration;

use common::*;

/// An etcd with a root user and auth enabled.
async fn etcd_with_auth(root_password: &str) -> Etcd {
    let etcd = Etcd::start().await;
    let mut c = etcd.client().await;
    c.user_add("root", root_password, None)
        .await
        .expect("user add");
    c.user_grant_role("root", "root").await.expect("grant root");
    c.auth_enable().await.expect("auth enable");
    etcd
}

fn ls(ep: &str, prefix: &str) -> std::process::Command {
    let mut cmd = portolan_cmd();
    cmd.args([
        "--config",
        "/dev/null",
        "ls",
        "--etcd-endpoints",
        ep,
        "--prefix",
        prefix,
    ])
    .env("RUST_LOG", "debug");
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn the_password_comes_from_a_file_and_appears_nowhere() {
    let secret = "pw-7f3a9c1e-not-in-any-log";
    let etcd = etcd_with_auth(secret).await;
    let ep = etcd.endpoint();
    let prefix = unique_prefix("auth");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("etcd-password");
    write_private(&pw, format!("{secret}\n"));

    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(&pw)
        .output()
        .expect("run ls");
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains(secret) && !text(&out.stdout).contains(secret),
        "{stderr}"
    );
    assert!(
        stderr.contains("plain http://") && stderr.contains(&ep),
        "no warning naming the http:// endpoint: {stderr}"
    );

    // A systemd credential stands in for the file.
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("etcd-password"), secret).unwrap();
    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root"])
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .expect("run ls");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Without the password etcd refuses, and says so.
    let out = ls(&ep, &prefix).output().expect("run ls");
    assert!(
        !out.status.success(),
        "etcd with auth answered without credentials"
    );

    // No way to put the password where `ps` or a child process would see it.
    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root", "--etcd-password", secret])
        .output()
        .expect("run ls");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--etcd-password"),
        "{}",
        text(&out.stderr)
    );
    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root"])
        .env("PORTOLAN_ETCD_PASSWORD", secret)
        .output()
        .expect("run ls");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "PORTOLAN_ETCD_PASSWORD was read");
    assert!(stderr.contains("--etcd-password-file"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");

    // A wrong password is an error naming what to fix, not a hang.
    write_private(&pw, "wrong");
    let started = std::time::Instant::now();
    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(&pw)
        .output()
        .expect("run ls");
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A client logged in as `user`.
async fn login(ep: &str, user: &str, password: &str) -> etcd_client::Client {
    etcd_client::Client::connect(
        [ep],
        Some(etcd_client::ConnectOptions::new().with_user(user, password)),
    )
    .await
    .unwrap_or_else(|e| panic!("log in as {user}: {e}"))
}

fn denied(r: Result<impl std::fmt::Debug, etcd_client::Error>, what: &str) {
    match r {
        Err(e) => assert!(
            e.to_string().contains("permission denied"),
            "{what}: refused, but not for permissions: {e}"
        ),
        Ok(v) => panic!("{what}: allowed ({v:?})"),
    }
}

#[tokio::test]
async fn auth_makes_users_that_can_touch_only_their_own_keys() {
    let root_pw = "root-pw-for-the-test";
    let etcd = etcd_with_auth(root_pw).await;
    let ep = etcd.endpoint();
    let prefix = unique_prefix("rbac");
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pw");
    write_private(&root_file, root_pw);
    let auth = |args: &[&str]| {
        let out = portolan_cmd()
            .args(["--config", "/dev/null", "auth"])
            .args(args)
            // The roles' top-level confinement is what this test shows; the etcd it
            // runs on may be one whose RBAC nested transactions bypass
            // (tests/etcd_rbac_bypass.rs).
            .arg("--allow-unsafe-etcd")
            .args(["--etcd-endpoints", &ep, "--prefix", &prefix])
            .args(["--etcd-username", "root", "--etcd-password-file"])
            .arg(&root_file)
            .output()
            .expect("run portolan auth");
        assert!(out.status.success(), "auth {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let node_pw = dir.path().join("web1.pw");
    let printed = auth(&[
        "add-node",
        "web1",
        "--password-file",
        node_pw.to_str().unwrap(),
    ]);
    assert!(
        printed.contains(&format!(
            "etcdctl role grant-permission portolan-node-web1 readwrite --prefix=true {prefix}/nodes/web1/"
        )),
        "{printed}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node_pw).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a generated password file must be private");
    let node_secret = std::fs::read_to_string(&node_pw)
        .unwrap()
        .trim()
        .to_string();
    // Run again: converges, same password.
    auth(&[
        "add-node",
        "web1",
        "--password-file",
        node_pw.to_str().unwrap(),
    ]);
    let watcher_pw = dir.path().join("lb1.pw");
    auth(&[
        "add-watcher",
        "lb1",
        "--password-file",
        watcher_pw.to_str().unwrap(),
    ]);
    let watcher_secret = std::fs::read_to_string(&watcher_pw)
        .unwrap()
        .trim()
        .to_string();

    // Keys that exist already, written by root: another node's, a hand-written one, config.
    let mut root = login(&ep, "root", root_pw).await;
    for k in [
        "nodes/web2/services/web/web2-aaaaaaaaaaaa-80",
        "services/web/manual",
        "config/x",
    ] {
        root.put(format!("{prefix}/{k}"), "10.0.0.9:80", None)
            .await
            .expect("root put");
    }

    let mut node = login(&ep, "portolan-node-web1", &node_secret).await;
    let own = format!("{prefix}/nodes/web1/services/web/web1-bbbbbbbbbbbb-80");
    let lease = node
        .lease_grant(10, None)
        .await
        .expect("a node may take a lease")
        .id();
    node.put(
        own.as_str(),
        r#"{"addr":"10.0.0.5:32768"}"#,
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("a node writes its own instance");
    node.put(format!("{prefix}/nodes/web1/node"), "{}", None)
        .await
        .expect("a node writes its own record");
    node.get(
        format!("{prefix}/nodes/web1/"),
        Some(etcd_client::GetOptions::new().with_prefix()),
    )
    .await
    .expect("a node reads its own keys");
    for k in [
        "nodes/web2/services/web/web2-aaaaaaaaaaaa-80",
        "nodes/web10/node",
        "nodes/web2/node",
        "services/web/manual",
        "services/web/new",
        "config/x",
        "watchers/lb1",
    ] {
        let key = format!("{prefix}/{k}");
        denied(
            node.put(key.as_str(), "10.0.0.66:80", None).await,
            &format!("node puts {k}"),
        );
        denied(
            node.delete(key.as_str(), None).await,
            &format!("node deletes {k}"),
        );
    }
    denied(
        node.delete(
            format!("{prefix}/"),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await,
        "node deletes the whole prefix",
    );

    let mut watcher = login(&ep, "portolan-watcher-lb1", &watcher_secret).await;
    let all = watcher
        .get(
            format!("{prefix}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("a watcher reads the tree");
    assert!(all.kvs().len() >= 5, "{}", all.kvs().len());
    let lease = watcher.lease_grant(10, None).await.expect("lease").id();
    watcher
        .put(
            format!("{prefix}/watchers/lb1"),
            "{}",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("a watcher writes its status key");
    for k in [
        &own[prefix.len() + 1..],
        "services/web/new",
        "config/x",
        "watchers/lb2",
    ] {
        let key = format!("{prefix}/{k}");
        denied(
            watcher.put(key.as_str(), "10.0.0.66:80", None).await,
            &format!("watcher puts {k}"),
        );
    }
    // Nothing above changed what root wrote.
    let manual = root
        .get(format!("{prefix}/services/web/manual"), None)
        .await
        .unwrap();
    assert_eq!(manual.kvs()[0].value(), b"10.0.0.9:80");
}

/// The printed etcdctl lines are real commands: run for another node, they make a role
/// with the same permissions as `portolan auth` made.
#[tokio::test]
async fn the_printed_etcdctl_lines_do_the_same() {
    need("etcdctl", "etcd-client");
    let root_pw = "root-pw-2";
    let etcd = etcd_with_auth(root_pw).await;
    let ep = etcd.endpoint();
    let prefix = unique_prefix("lines");
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pw");
    write_private(&root_file, root_pw);
    let pw = dir.path().join("a.pw");
    let out = portolan_cmd()
        .args([
            "--config",
            "/dev/null",
            "auth",
            "add-node",
            "node-a",
            "--allow-unsafe-etcd",
            "--password-file",
        ])
        .arg(&pw)
        .args(["--etcd-endpoints", &ep, "--prefix", &prefix])
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(&root_file)
        .output()
        .expect("run portolan auth");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script: String = text(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("etcdctl "))
        .map(|l| format!("{}\n", l.replace("node-a", "node-b")))
        .collect();
    let run = std::process::Command::new("sh")
        .arg("-ec")
        .arg(&script)
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &ep)
        .env("ETCDCTL_USER", format!("root:{root_pw}"))
        .output()
        .expect("run etcdctl");
    assert!(run.status.success(), "{script}\n{}", text(&run.stderr));
    let mut root = login(&ep, "root", root_pw).await;
    let perms = |r: etcd_client::RoleGetResponse| {
        r.permissions()
            .iter()
            .map(|p| {
                (
                    p.get_type(),
                    String::from_utf8_lossy(p.key()).replace("node-b", "node-a"),
                    String::from_utf8_lossy(p.range_end()).replace("node-b", "node-a"),
                )
            })
            .collect::<Vec<_>>()
    };
    let a = perms(root.role_get("portolan-node-node-a").await.unwrap());
    let b = perms(root.role_get("portolan-node-node-b").await.unwrap());
    assert_eq!(a, b);
    assert_eq!(a.len(), 1);
    // The same password logs both users in.
    let secret = std::fs::read_to_string(&pw).unwrap().trim().to_string();
    login(&ep, "portolan-node-node-b", &secret).await;
}
