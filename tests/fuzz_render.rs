//! Hostile input, property-tested: random keys, values and service names go through
//! decode (the store) → render (the shipped template) → `haproxy -c`. Whatever the input,
//! every accepted instance renders to a config that passes the check, and no input adds
//! a line, a directive or a section beyond the template's own per-service and
//! per-instance lines. The case count is bounded (`PROPTEST_CASES`, default 48) so the
//! suite stays fast; a failure prints the minimal input.

use std::path::PathBuf;

use portolan::watcher::render::{context, Template};
use portolan::watcher::store::Store;
use proptest::prelude::*;

fn template() -> Template {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates/haproxy.cfg.tera");
    let text = std::fs::read_to_string(&src).expect("template");
    Template::compile(&src.display().to_string(), &text).expect("compiles")
}

fn vars() -> toml::Table {
    toml::from_str("drop_privileges = false\ndomain = \"example.test\"").expect("vars")
}

fn render(keys: &[(String, Vec<u8>)]) -> (String, usize, usize) {
    let mut store = Store::new("/p");
    store.reset(keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let snap = store.snapshot();
    let out = template()
        .render(&context(&snap, &vars()))
        .expect("the shipped template renders any snapshot");
    // The snapshot as templates see it: service name → instances.
    let doc = serde_json::to_value(&snap).expect("snapshot serialises");
    let services = doc["services"].as_object().cloned().unwrap_or_default();
    let instances = services
        .values()
        .filter_map(|v| v.as_array())
        .map(Vec::len)
        .sum();
    (out, services.len(), instances)
}

fn lines(text: &str) -> usize {
    text.lines().count()
}

fn sections(text: &str) -> usize {
    const KEYWORDS: &[&str] = &[
        "global",
        "defaults",
        "frontend",
        "backend",
        "listen",
        "resolvers",
        "peers",
        "userlist",
        "http-errors",
        "cache",
        "program",
        "ring",
        "mailers",
    ];
    text.lines()
        .filter(|l| KEYWORDS.contains(&l.split_whitespace().next().unwrap_or("")))
        .count()
}

fn haproxy_check(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&path)
        .output()
        .map_err(|e| format!("run haproxy -c: {e} (apt-get install haproxy)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The template's cost of one service and of one instance, measured on valid input: a
/// hostile input may add exactly these and nothing else.
fn shape() -> (usize, usize, usize, usize) {
    let (empty, _, _) = render(&[]);
    let one = |n: usize| {
        let keys: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| {
                (
                    format!("/p/services/web/i{i}"),
                    format!("10.0.0.{}:80", i + 1).into_bytes(),
                )
            })
            .collect();
        render(&keys).0
    };
    let (one_instance, two_instances) = (one(1), one(2));
    let per_instance = lines(&two_instances) - lines(&one_instance);
    let per_service = lines(&one_instance) - lines(&empty) - per_instance;
    (lines(&empty), sections(&empty), per_service, per_instance)
}

/// Names: mostly plausible, sometimes hostile (spaces, newlines, `#`, quotes, braces,
/// upper case, slashes, very long).
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9][a-z0-9_.-]{0,10}",
        1 => "[A-Za-z0-9 _.#\n\"{}/\\\\-]{0,14}",
        1 => Just("a".repeat(130)),
    ]
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u8..255, 0u8..255, 0u8..255, 1u8..255).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        1 => "fd00::[0-9a-f]{1,4}".prop_map(|h| format!("[{h}]")),
        1 => Just("localhost".to_string()),
        1 => "[0-9a-z.: \n#\\[\\]{}\"-]{0,20}",
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u32..65536).prop_map(|p| p.to_string()),
        1 => "[0-9a-z \n#-]{0,8}",
    ]
}

fn text_value() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 _.:=#\n\"{}\\[\\]-]{0,16}"
}

fn addr() -> impl Strategy<Value = String> {
    (host(), port()).prop_map(|(h, p)| format!("{h}:{p}"))
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A bare host:port, as written by hand.
        2 => addr().prop_map(String::into_bytes),
        // A JSON record with hostile fields.
        3 => (addr(), prop::collection::vec(text_value(), 0..3), any::<u16>(), text_value(), any::<bool>())
            .prop_map(|(addr, tags, weight, node, draining)| {
                serde_json::json!({
                    "addr": addr, "tags": tags, "weight": weight % 300,
                    "node": node, "draining": draining,
                })
                .to_string()
                .into_bytes()
            }),
        // Anything at all.
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (name(), name()).prop_map(|(s, i)| format!("/p/services/{s}/{i}")),
        // Mostly ids of the node's own (`<node>-…`), which confinement admits.
        2 => (name(), name(), name()).prop_map(|(n, s, i)| format!("/p/nodes/{n}/services/{s}/{n}-{i}")),
        1 => (name(), name(), name()).prop_map(|(n, s, i)| format!("/p/nodes/{n}/services/{s}/{i}")),
        1 => "/p/[a-z/ \n]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_keys_and_values_never_add_a_line_and_always_pass_the_check(
        keys in prop::collection::vec((key(), value()), 1..8)
    ) {
        let (base_lines, base_sections, per_service, per_instance) = shape();
        let (out, services, instances) = render(&keys);
        prop_assert_eq!(
            lines(&out),
            base_lines + services * per_service + instances * per_instance,
            "a line was added or lost:\n{}", out
        );
        prop_assert_eq!(sections(&out), base_sections + services, "a section was added:\n{}", out);
        let servers = out.lines().filter(|l| l.trim_start().starts_with("server ")).count();
        prop_assert_eq!(servers, instances);
        prop_assert!(haproxy_check(&out).is_ok(), "haproxy -c refused:\n{}\n{}", haproxy_check(&out).unwrap_err(), out);
    }
}

/// The property above is only as strong as its yardstick: one instance is one line, a
/// service costs its backend section and routing lines, and a hostile value next to a
/// good one is left out while the good one renders.
#[test]
fn the_yardstick_is_sound() {
    let (_, _, per_service, per_instance) = shape();
    assert_eq!(per_instance, 1);
    assert!(per_service >= 2, "{per_service}");
    let (out, services, instances) = render(&[
        ("/p/services/web/a".into(), b"10.0.0.1:80".to_vec()),
        (
            "/p/services/web/b".into(),
            b"10.0.0.2:80\n    bind :9999".to_vec(),
        ),
    ]);
    assert_eq!((services, instances), (1, 1));
    assert!(!out.contains("9999"));
    assert!(haproxy_check(&out).is_ok());
}
