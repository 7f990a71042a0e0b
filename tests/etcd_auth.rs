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
    std::fs::write(&pw, format!("{secret}\n")).unwrap();

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
    std::fs::write(&pw, "wrong").unwrap();
    let started = std::time::Instant::now();
    let out = ls(&ep, &prefix)
        .args(["--etcd-username", "root", "--etcd-password-file"])
        .arg(&pw)
        .output()
        .expect("run ls");
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(20));
}
