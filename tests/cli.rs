//! The command line as a new user meets it: `--version` names the build, logging is
//! chosen by flag, completions and man pages come from the same definition as
//! `--help`, exit codes are the documented ones, and `--help` tells the truth.
mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn portolan(args: &[&str]) -> Output {
    run(portolan_cmd().args(args))
}

fn stdout_of(args: &[&str]) -> String {
    let out = portolan(args);
    assert!(
        out.status.success(),
        "portolan {args:?}: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn version_names_the_git_revision_of_a_checkout() {
    let v = stdout_of(&["--version"]);
    let pkg = env!("CARGO_PKG_VERSION");
    let head = run(Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo()));
    if head.status.success() {
        let rev = text(&head.stdout).trim().to_string();
        assert_eq!(v.trim(), format!("portolan {pkg} (git {rev})"));
    } else {
        // Built from a tarball: the package version alone.
        assert_eq!(v.trim(), format!("portolan {pkg}"));
    }
}

#[test]
fn completions_for_bash_zsh_and_fish_know_the_subcommands_and_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout_of(&["completions", shell]);
        for word in [
            "registrar",
            "watcher",
            "status",
            "log-level",
            "etcd-endpoints",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("portolan.bash");
    std::fs::write(&bash, stdout_of(&["completions", "bash"])).unwrap();
    let out = run(Command::new("bash").arg("-n").arg(&bash));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!portolan(&["completions", "tcsh"]).status.success());
}

#[test]
fn the_man_pages_come_from_the_command_line() {
    let page = stdout_of(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH portolan 1"),
        "{page}"
    );
    assert!(page.contains(".TH portolan 1"), "{page}");
    assert!(page.contains("log\\-format"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    stdout_of(&["man", "--out-dir", out.to_str().unwrap()]);
    for p in [
        "portolan.1",
        "portolan-watcher.1",
        "portolan-registrar.1",
        "portolan-status.1",
    ] {
        let page = std::fs::read_to_string(out.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(page.contains(".TH"), "{p}");
    }
    // The watcher's page carries its options.
    let w = std::fs::read_to_string(out.join("portolan-watcher.1")).unwrap();
    assert!(
        w.contains("mass\\-removal") || w.contains("template"),
        "{w}"
    );
}

#[test]
fn log_format_json_and_log_level_are_flags() {
    // A connection to a closed port logs at debug from the gRPC stack: with
    // --log-level debug --log-format json every stderr line that is a log line is a
    // JSON object with a level.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = portolan(&[
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "ls",
        "--etcd-endpoints",
        &endpoint,
    ]);
    let err = text(&out.stderr);
    let logs: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        logs.iter().any(|l| l["level"] == "DEBUG"),
        "no debug JSON line in:\n{err}"
    );
    // info is the default: no debug line without the flag.
    let out = run(portolan_cmd().env_remove("RUST_LOG").args([
        "--log-format",
        "json",
        "ls",
        "--etcd-endpoints",
        &endpoint,
    ]));
    assert!(
        !text(&out.stderr).contains("\"DEBUG\""),
        "{}",
        text(&out.stderr)
    );
    // A bad filter is refused by name, exit 2, before anything runs.
    let out = portolan(&["--log-level", "chatty=very=much", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--log-level"),
        "{}",
        text(&out.stderr)
    );
    let out = run(portolan_cmd().env("RUST_LOG", "[[").args(["ls"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("RUST_LOG"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn status_exits_2_when_it_cannot_tell_and_help_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let out = portolan(&["status", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("missing.toml"),
        "{}",
        text(&out.stderr)
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[watcher]\nnmae = \"lb\"\n").unwrap();
    let out = portolan(&["status", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("nmae"), "{}", text(&out.stderr));
    // Valid TOML, no [[template]]: the watcher's config does not resolve.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "[etcd]\n").unwrap();
    let out = portolan(&["status", "--config", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    let help = stdout_of(&["status", "--help"]);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for promise in [
        "0 when all three agree",
        "1 when they do not",
        "2 when it cannot tell",
    ] {
        assert!(
            flat.contains(promise),
            "status --help lacks {promise:?}:\n{help}"
        );
    }
}

/// A file with only `[etcd]` and a broken `[[hook]]` is one the registrar refuses at
/// start: check refuses it too, naming the hook.
#[test]
fn check_validates_hooks_whatever_else_the_file_has() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    let check = |hook: &str| {
        std::fs::write(
            &cfg,
            format!("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\n[[hook]]\n{hook}\n"),
        )
        .unwrap();
        portolan(&["check", "--config", cfg.to_str().unwrap()])
    };
    for (bad, named) in [
        (
            "events = [\"register\"]\nurl = \"ftp://hooks.example/x\"",
            "hook #1: url",
        ),
        (
            "events = [\"regster\"]\ncommand = [\"/bin/true\"]",
            "\"regster\"",
        ),
        ("events = [\"reload\"]", "exactly one of url"),
        (
            "events = [\"register\"]\ncommand = [\"/bin/true\"]\ntimeout_ms = 5",
            "timeout_ms",
        ),
    ] {
        let out = check(bad);
        assert!(!out.status.success(), "check passed {bad:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(named) && err.contains("[[hook]]"),
            "{bad:?}: {err}"
        );
    }
    let out = check("events = [\"register\", \"reload\"]\ncommand = [\"/bin/true\"]");
    assert!(out.status.success(), "{}", text(&out.stderr));
}
