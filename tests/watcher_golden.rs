//! Golden files: the shipped templates rendered from a fixed snapshot, byte for byte,
//! and every golden output accepted by `haproxy -c`. The tests only compare: they never
//! write a golden file. `scripts/update-golden.sh` regenerates them after a deliberate
//! template change (with `PORTOLAN_GOLDEN_OUT=DIR` the tests save what they rendered in
//! DIR, which the script copies over `tests/golden/` for review in the diff).

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use portolan::watcher::dns_names;
use portolan::watcher::render::{context, Template};
use portolan::watcher::store::{Store, StoreSnapshot};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the watcher renders from `store`: the DNS name `api.internal` as the policy
/// approved it, at two addresses (one server each, never the name).
fn rendered(store: &Store) -> StoreSnapshot {
    let answers = BTreeMap::from([(
        "api.internal".to_string(),
        vec!["10.0.0.20".parse().unwrap(), "fd00::20".parse().unwrap()],
    )]);
    let (snapshot, refused) = dns_names::expand(store.snapshot(), &answers);
    assert!(refused.is_empty(), "{refused:?}");
    snapshot
}

/// A snapshot with two services, a hand-written bare address, a DNS name, an IPv6
/// address, a weight, and keys that must be left out.
fn store() -> Store {
    store_plus(&[])
}

/// `store()` with more keys.
fn store_plus(more: &[(&'static str, &'static [u8])]) -> Store {
    let mut s = Store::new("/portolan");
    let mut keys: Vec<(&str, &[u8])> = vec![
        (
            "/portolan/services/web/host-a-3f2a9c1b7d10-8080",
            &br#"{"addr":"10.0.0.5:32768","node":"host-a","container":"3f2a9c1b7d10","port":8080,"tags":["v2"],"weight":100}"#[..],
        ),
        (
            "/portolan/services/web/host-b-0123456789ab-8080",
            br#"{"addr":"10.0.0.6:32769","node":"host-b","weight":50}"#,
        ),
        ("/portolan/services/api/manual-1", b"10.0.0.9:80"),
        // Its container got its stop signal: out of rotation, in-flight requests finish.
        (
            "/portolan/services/api/manual-2",
            br#"{"addr":"10.0.0.10:80","draining":true}"#,
        ),
        ("/portolan/services/api/dns-1", b"api.internal:8080"),
        ("/portolan/services/db/v6", b"[fd00::5]:5432"),
        ("/portolan/services/web/evil", b"10.0.0.7:80\n    bind :9999"),
        ("/portolan/services/bad name/x", b"10.0.0.8:80"),
        ("/portolan/config/ignored", b"raw"),
    ];
    keys.extend_from_slice(more);
    let warnings = s.reset(keys);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    s
}

fn check_golden(template: &str, vars: &str, golden: &str) {
    check_golden_with(template, "", store, vars, golden);
}

/// `template` (with `extra` appended) rendered from `store()`, against `golden`.
fn check_golden_with(template: &str, extra: &str, store: fn() -> Store, vars: &str, golden: &str) {
    let src = root().join("templates").join(template);
    let text = std::fs::read_to_string(&src).expect("template") + extra;
    let t = Template::compile(&src.display().to_string(), &text).expect("compiles");
    let vars: toml::Table = toml::from_str(vars).expect("vars");
    let out = t
        .render(&context(&rendered(&store()), &vars))
        .expect("renders");
    // Equal state renders byte-identical output.
    assert_eq!(out, t.render(&context(&rendered(&store()), &vars)).unwrap());
    assert!(!out.contains("9999") && !out.contains("bad name"), "{out}");
    // HAProxy is never handed a name to resolve itself.
    assert!(!out.contains("api.internal"), "{out}");
    // Only the draining instance is out of rotation.
    for line in out
        .lines()
        .filter(|l| l.trim_start().starts_with("server "))
    {
        assert_eq!(
            line.ends_with(" disabled"),
            line.contains("manual-2"),
            "{line}"
        );
    }

    let path = root().join("tests/golden").join(golden);
    // For scripts/update-golden.sh: what was rendered, saved outside tests/golden/.
    if let Some(dir) = std::env::var_os("PORTOLAN_GOLDEN_OUT") {
        let saved = Path::new(&dir).join(golden);
        std::fs::write(&saved, &out)
            .unwrap_or_else(|e| panic!("cannot save {}: {e}", saved.display()));
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (scripts/update-golden.sh writes it)",
            path.display()
        )
    });
    assert_eq!(
        out,
        want,
        "{} differs from what the template renders; if the change is meant, run scripts/update-golden.sh and review the diff",
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

/// A `kv` value carrying a newline and a `bind` line, beside harmless ones.
fn store_with_kv() -> Store {
    store_plus(&[
        ("/portolan/config/description", b"x\n    bind :9999"),
        ("/portolan/config/comment", b"ok # bind :9999"),
        ("/portolan/config/timeout", b"45s"),
        ("/portolan/config/motto", b"edge lb"),
    ])
}

/// A template that uses `kv` the documented way: through `haproxy_arg`, and only when
/// it let the value through. The injected value adds no line, and the file still
/// passes `haproxy -c`.
#[test]
fn injected_kv_values_add_no_line_golden() {
    let extra = r#"
backend kv_example
{%- set description = kv.description | haproxy_arg %}
{%- if description %}
    description {{ description }}
{%- endif %}
{%- set comment = kv.comment | haproxy_arg %}
{%- if comment %}
    description {{ comment }}
{%- endif %}
{%- set motto = kv.motto | haproxy_arg %}
{%- if motto %}
    description {{ motto }}
{%- endif %}
    timeout server {{ kv.timeout | haproxy_arg }}
"#;
    check_golden_with(
        "haproxy.cfg.tera",
        extra,
        store_with_kv,
        "",
        "haproxy-kv.cfg",
    );
    let golden = std::fs::read_to_string(root().join("tests/golden/haproxy-kv.cfg")).unwrap();
    let section = &golden[golden.find("backend kv_example").unwrap()..];
    assert_eq!(
        section,
        "backend kv_example\n    description \"edge lb\"\n    timeout server 45s\n"
    );
    assert_eq!(
        golden.matches("bind ").count(),
        2,
        "front door and stats only"
    );
}

/// Workers drop root by default (golden files above); `drop_privileges = false`, as the
/// tests and `portolan dev` set it, keeps them root on temp paths.
#[test]
fn privileges_are_dropped_unless_drop_privileges_is_false() {
    for template in ["haproxy.cfg.tera", "haproxy-tcp.cfg.tera"] {
        let src = root().join("templates").join(template);
        let text = std::fs::read_to_string(&src).expect("template");
        let t = Template::compile(&src.display().to_string(), &text).expect("compiles");
        let render = |vars: &str| {
            t.render(&context(
                &rendered(&store()),
                &toml::from_str(vars).unwrap(),
            ))
            .unwrap()
        };
        let dropped = render("");
        for line in [
            "\n    user haproxy\n",
            "\n    group haproxy\n",
            "\n    chroot /var/lib/haproxy\n",
        ] {
            assert!(dropped.contains(line), "{template}: {line:?} missing");
        }
        let root_kept = render("drop_privileges = false");
        assert!(
            !root_kept.contains("user haproxy") && !root_kept.contains("chroot"),
            "{template}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.cfg");
        std::fs::write(&path, root_kept).unwrap();
        haproxy_check(&path);
    }
}

/// Every route option (README "Routing") beside the plain services: extra hosts and a
/// wildcard, a path with strip, the per-service options, a TCP listen port, SNI
/// passthrough, a contested host (the older service keeps it) and hand-written
/// records whose route fields try to inject a line (refused whole, named).
fn store_with_routes() -> Store {
    let mut s = Store::new("/portolan");
    let keys: Vec<(&str, &[u8], i64)> = vec![
        ("/portolan/services/shop/s1", br#"{"addr":"10.0.1.1:80","route":{"hosts":["example.com","www.example.com","*.shop.example.com"],"balance":"leastconn","sticky":"cookie","check_path":"/healthz","timeout_server":"45s","maxconn":100}}"#, 10),
        ("/portolan/services/api/a1", br#"{"addr":"10.0.1.2:80","route":{"hosts":["example.com"],"path":"/api","strip_prefix":true,"default_host":false,"allow":["10.0.0.0/8","192.168.0.0/16"]}}"#, 11),
        ("/portolan/services/apiv2/b1", br#"{"addr":"10.0.1.3:80","route":{"hosts":["example.com"],"path":"/api/v2","default_host":false}}"#, 12),
        ("/portolan/services/late/l1", br#"{"addr":"10.0.1.4:80","route":{"hosts":["www.example.com"]}}"#, 20),
        ("/portolan/services/pg/p1", br#"{"addr":"10.0.1.5:5432","route":{"mode":"tcp","listen":15432,"allow":["10.0.0.0/8"]}}"#, 13),
        ("/portolan/services/db/d1", br#"{"addr":"10.0.1.6:443","route":{"mode":"tcp","sni":["db.example.com","*.db.example.com"],"balance":"source"}}"#, 14),
        ("/portolan/services/plain/x", b"10.0.1.7:80", 15),
        ("/portolan/services/evil/e1", b"{\"addr\":\"10.0.1.8:80\",\"route\":{\"path\":\"/x\\n    bind :9999\"}}", 16),
        ("/portolan/services/evil/e2", br#"{"addr":"10.0.1.9:80","route":{"allow":["0.0.0.0/0 #"]}}"#, 17),
    ];
    let warnings = s.reset_created(keys);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings.iter().any(|w| w.rule.contains("route.path")),
        "{warnings:?}"
    );
    assert!(
        warnings.iter().any(|w| w.rule.contains("route.allow")),
        "{warnings:?}"
    );
    s
}

#[test]
fn http_template_routes_golden() {
    let src = root().join("templates/haproxy.cfg.tera");
    let text = std::fs::read_to_string(&src).expect("template");
    let t = Template::compile(&src.display().to_string(), &text).expect("compiles");
    let vars: toml::Table = toml::from_str(
        "domain = \"example.org\"\nhttp_bind = \"127.0.0.1:8080\"\nhttps_bind = \"127.0.0.1:8443\"\ntcp_bind_ip = \"127.0.0.1\"\nlisten_ports = [\"15000-15999\"]\ndrop_privileges = false",
    )
    .unwrap();
    let out = t
        .render(&context(&store_with_routes().snapshot(), &vars))
        .expect("renders");
    assert!(!out.contains("9999") && !out.contains("0.0.0.0/0"), "{out}");
    // www.example.com was shop's first: late keeps only its default host.
    assert!(
        out.contains("use_backend svc_shop if { var(txn.host) -m str www.example.com }"),
        "{out}"
    );
    assert!(
        !out.contains("use_backend svc_late if { var(txn.host) -m str www.example.com }"),
        "{out}"
    );
    let golden = "haproxy-routes.cfg";
    if let Some(dir) = std::env::var_os("PORTOLAN_GOLDEN_OUT") {
        std::fs::write(Path::new(&dir).join(golden), &out).unwrap();
    }
    let path = root().join("tests/golden").join(golden);
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        out,
        want,
        "{} differs; scripts/update-golden.sh",
        path.display()
    );
    haproxy_check(&path);
}
