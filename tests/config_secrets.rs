//! Config files as an attacker or a careless operator would leave them, through the
//! `portolan` binary: a secret in a file that does not parse, a password file others
//! can read, a duration far too large.
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

/// `portolan check --config FILE`: (success, stdout + stderr).
fn check(config: &Path) -> (bool, String) {
    let out = portolan_cmd()
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run portolan check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A TOML syntax error on the `password =` line (an unclosed quote, a stray word, the
/// wrong type, a multi-line string left open) names the file and the line, and never
/// prints the password.
#[test]
fn a_syntax_error_on_the_password_line_does_not_print_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "Hunter2-xq9-s3cr3t";
    for (n, (text, line)) in [
        (
            format!("[etcd]\nusername = \"root\"\npassword = \"{secret}\n"),
            3,
        ),
        (format!("[etcd]\npassword = \"{secret}\" x\n"), 2),
        (
            format!("[etcd]\nusername = \"u\"\npassword = {secret}\n"),
            3,
        ),
        (format!("[etcd]\nPassword = '{secret}\n"), 2),
        (
            format!("[etcd]\nusername = \"u\"\npassword = \"\"\"\n{secret}\n"),
            3,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("bad{n}.toml"));
        std::fs::write(&path, &text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{text}: {out}");
        assert!(!out.contains(secret), "{text}: the secret leaked:\n{out}");
        assert!(
            !out.contains("s3cr3t"),
            "{text}: part of the secret leaked:\n{out}"
        );
        assert!(out.contains(&path.display().to_string()), "{out}");
        assert!(out.contains("line"), "{out}");
        if n < 4 {
            assert!(out.contains(&format!("line {line}")), "{text}: {out}");
        }
    }
    // Without a password in the file the offending line is still shown, to help.
    let path = dir.path().join("plain.toml");
    std::fs::write(&path, "[etcd]\nprefix = \"/x\n").unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("prefix = \"/x") && out.contains("line 2"),
        "{out}"
    );
}

/// A password file readable by its group or others is refused, as ssh refuses such a
/// key: the message names the file and says `chmod 600`. 0600 and 0400 are fine.
#[test]
fn a_password_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("etcd.pw");
    std::fs::write(&pw, "Hunter2-xq9\n").unwrap();
    let config = dir.path().join("portolan.toml");
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\nca_file = \"{0}\"\nusername = \"u\"\npassword_file = \"{1}\"\n",
            pw.display(),
            pw.display()
        ),
    )
    .unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        let (ok, out) = check(&config);
        assert!(!ok, "{mode:o}: {out}");
        assert!(
            out.contains(&pw.display().to_string()) && out.contains("chmod 600"),
            "{mode:o}: {out}"
        );
        assert!(!out.contains("Hunter2"), "{out}");
    }
    for mode in [0o600, 0o400] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        let (ok, out) = check(&config);
        assert!(ok, "{mode:o}: {out}");
    }
}

/// A duration far too large is an error naming the key, never a panic (an Instant plus
/// it overflows) — at `portolan check` and at start.
#[test]
fn a_huge_duration_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.tera"), "x").unwrap();
    let huge = i64::MAX;
    for (section, line, key) in [
        (
            "watcher",
            format!("mass_removal = {{ hold_s = {huge} }}"),
            "hold_s",
        ),
        (
            "watcher",
            format!("empty_backend_grace_s = {huge}"),
            "empty_backend_grace_s",
        ),
        (
            "watcher",
            format!("command_timeout_ms = {huge}"),
            "command_timeout_ms",
        ),
        (
            "watcher",
            format!("min_reload_interval_ms = {huge}"),
            "min_reload_interval_ms",
        ),
        (
            "watcher",
            format!("wait = {{ min_ms = {huge}, max_ms = {huge} }}"),
            "min_ms",
        ),
        (
            "etcd",
            format!("dial_timeout_ms = {huge}"),
            "dial_timeout_ms",
        ),
        ("registrar", format!("resync = {huge}"), "resync"),
    ] {
        let path = dir.path().join("c.toml");
        let mut sections = vec![
            ("etcd", String::new()),
            ("registrar", "node = \"n\"\n".to_string()),
            ("watcher", "name = \"w\"\n".to_string()),
        ];
        for (name, text) in &mut sections {
            if *name == section {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let body: String = sections
            .iter()
            .map(|(name, text)| format!("[{name}]\n{text}"))
            .collect::<String>()
            + "[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n";
        std::fs::write(&path, &body).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{line}: accepted: {out}");
        assert!(!out.contains("panicked"), "{line}: {out}");
        assert!(
            out.contains(key) && out.contains("at most"),
            "{line}: {out}"
        );
    }
}
