//! Golden files: the shipped templates rendered from a fixed snapshot, byte for byte,
//! and every golden output accepted by `haproxy -c`. `UPDATE_GOLDEN=1` rewrites them.

use std::path::{Path, PathBuf};

use portolan::watcher::render::{context, Template};
use portolan::watcher::store::Store;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A snapshot with two services, a hand-written bare address, a DNS name, an IPv6
/// address, a weight, and keys that must be left out.
fn store() -> Store {
    let mut s = Store::new("/portolan");
    let warnings = s.reset([
        (
            "/portolan/services/web/host-a-3f2a9c1b7d10-8080",
            &br#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":["v2"],"weight":100}"#[..],
        ),
        (
            "/portolan/services/web/host-b-0123456789ab-8080",
            br#"{"addr":"10.0.0.6:32769","node":"host-b","weight":50}"#,
        ),
        ("/portolan/services/api/manual-1", b"10.0.0.9:80"),
        ("/portolan/services/api/dns-1", b"api.internal:8080"),
        ("/portolan/services/db/v6", b"[fd00::5]:5432"),
        ("/portolan/services/web/evil", b"10.0.0.7:80\n    bind :9999"),
        ("/portolan/services/bad name/x", b"10.0.0.8:80"),
        ("/portolan/config/ignored", b"raw"),
    ]);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    s
}

fn check_golden(template: &str, vars: &str, golden: &str) {
    let src = root().join("templates").join(template);
    let text = std::fs::read_to_string(&src).expect("template");
    let t = Template::compile(&src.display().to_string(), &text).expect("compiles");
    let vars: toml::Table = toml::from_str(vars).expect("vars");
    let out = t
        .render(&context(&store().snapshot(), &vars))
        .expect("renders");
    // Equal state renders byte-identical output.
    assert_eq!(out, t.render(&context(&store().snapshot(), &vars)).unwrap());
    assert!(!out.contains("9999") && !out.contains("bad name"), "{out}");

    let path = root().join("tests/golden").join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &out).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(
        out,
        want,
        "{} differs; UPDATE_GOLDEN=1 rewrites it",
        path.display()
    );
    haproxy_check(&path);
}

fn haproxy_check(path: &Path) {
    let out = std::process::Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(path)
        .output()
        .expect("run haproxy -c");
    assert!(
        out.status.success(),
        "haproxy -c {}:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn http_template_golden() {
    check_golden(
        "haproxy.cfg.tera",
        r#"
domain = "example.org"
http_bind = "127.0.0.1:8080"
stats_bind = "127.0.0.1:8404"
http_check = "/healthz"
"#,
        "haproxy.cfg",
    );
}

#[test]
fn http_template_defaults_golden() {
    check_golden("haproxy.cfg.tera", "", "haproxy-defaults.cfg");
}

#[test]
fn tcp_template_golden() {
    check_golden(
        "haproxy-tcp.cfg.tera",
        r#"
bind_ip = "127.0.0.1"
tcp_ports = { db = 15432, api = 18080, none = 18081 }
"#,
        "haproxy-tcp.cfg",
    );
}
