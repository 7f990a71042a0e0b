//! Hostile input, property-tested: random keys, values and service names go through
//! decode (the store) → render (the shipped template) → `haproxy -c`. Whatever the input,
//! every accepted instance renders to a config that passes the check; no input adds a
//! line, a directive or a section beyond the template's own per-service and per-instance
//! lines; and, read as HAProxy reads it (section, keyword, arguments), each `server`
//! line sits in its service's backend with exactly the arguments its record allows
//! (name, address, weight, `check`, `disabled` when draining) — so an injection on the
//! same line (` backup`) is caught too. Records are mostly valid with hostile fields, so
//! most cases render something. `haproxy -c` runs with `init-addr none`: no DNS. The case
//! count is bounded (`PROPTEST_CASES`, default 128) so the suite stays fast; a failure
//! prints the minimal input.

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

/// The rendered text and the snapshot as templates see it: service → its instances.
fn render_snapshot(
    keys: &[(String, Vec<u8>)],
) -> (String, serde_json::Map<String, serde_json::Value>) {
    let mut store = Store::new("/p");
    store.reset(keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let snap = store.snapshot();
    let out = template()
        .render(&context(&snap, &vars()))
        .expect("the shipped template renders any snapshot");
    let doc = serde_json::to_value(&snap).expect("snapshot serialises");
    let services = doc["services"].as_object().cloned().unwrap_or_default();
    (out, services)
}

fn render(keys: &[(String, Vec<u8>)]) -> (String, usize, usize) {
    let (out, services) = render_snapshot(keys);
    let instances = services
        .values()
        .filter_map(|v| v.as_array())
        .map(Vec::len)
        .sum();
    (out, services.len(), instances)
}

/// One line as HAProxy reads it: the section it is in (its header's words), its keyword
/// and its arguments (whitespace-separated; the template quotes nothing on the lines
/// checked here). Blank lines and comments are not lines.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    section: Vec<String>,
    keyword: String,
    args: Vec<String>,
}

/// Sections start at a section keyword wherever it is indented: HAProxy does not care
/// about indentation, so neither does this.
fn parse(text: &str) -> Vec<Line> {
    let mut section = Vec::new();
    let mut out = Vec::new();
    for raw in text.lines() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let words: Vec<String> = l.split_whitespace().map(String::from).collect();
        if SECTION_KEYWORDS.contains(&words[0].as_str()) {
            section = words.clone();
        }
        out.push(Line {
            section: section.clone(),
            keyword: words[0].clone(),
            args: words[1..].to_vec(),
        });
    }
    out
}

/// The `server` arguments an accepted instance allows, from its fields, each one word.
fn server_args(i: &serde_json::Value) -> Vec<String> {
    let field = |f: &str| {
        i[f].as_str()
            .unwrap_or_else(|| panic!("{f} in {i}"))
            .to_string()
    };
    let mut args = vec![
        field("id"),
        field("addr"),
        "weight".into(),
        i["weight"].as_u64().expect("weight").to_string(),
        "check".into(),
    ];
    if i["draining"].as_bool() == Some(true) {
        args.push("disabled".into());
    }
    args
}

/// Every `server` line is in its service's backend, in the snapshot's order, with
/// exactly the arguments its record allows; no other section holds one. Err names the
/// first line that differs.
fn servers_as_allowed(
    out: &str,
    services: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    let safe = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"_.:-[]".contains(&c))
    };
    let mut want: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for (name, instances) in services {
        for i in instances.as_array().into_iter().flatten() {
            let args = server_args(i);
            if let Some(bad) = args.iter().find(|a| !safe(a)) {
                return Err(format!(
                    "the store accepted {bad:?} into a server line: {i}"
                ));
            }
            want.push((vec!["backend".into(), format!("svc_{name}")], args));
        }
    }
    // `id <n>` after the address: the stable server id, a number in HAProxy's range
    // and unique in its backend (anything else stays in and fails the comparison).
    let mut ids: std::collections::BTreeSet<(Vec<String>, u32)> = Default::default();
    let mut got: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for l in parse(out).into_iter().filter(|l| l.keyword == "server") {
        let mut args = l.args;
        let id = (args.len() > 3 && args[2] == "id")
            .then(|| args[3].parse::<u32>().ok())
            .flatten()
            .filter(|n| (1..=i32::MAX as u32).contains(n));
        if let Some(id) = id {
            if !ids.insert((l.section.clone(), id)) {
                return Err(format!("server id {id} twice in {:?}", l.section));
            }
            args.drain(2..4);
        }
        got.push((l.section, args));
    }
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(&want).position(|(g, w)| g != w);
    Err(match at {
        Some(n) => format!(
            "server line {n}: rendered {:?}, the record allows {:?}",
            got[n], want[n]
        ),
        None => format!(
            "{} server lines rendered, {} instances accepted",
            got.len(),
            want.len()
        ),
    })
}

/// The rendered text as `haproxy -c` gets it: servers start unresolved (`init-addr
/// none`), so a DNS name in a record costs no lookup and no network.
fn without_dns(text: &str) -> String {
    const SHIPPED: &str = "init-addr last,libc,none";
    assert!(
        text.contains(SHIPPED),
        "the template's default-server changed: update without_dns"
    );
    text.replace(SHIPPED, "init-addr none")
}

fn lines(text: &str) -> usize {
    text.lines().count()
}

const SECTION_KEYWORDS: &[&str] = &[
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

fn sections(text: &str) -> usize {
    text.lines()
        .filter(|l| SECTION_KEYWORDS.contains(&l.split_whitespace().next().unwrap_or("")))
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

/// Names: mostly valid, sometimes hostile (spaces, newlines, `#`, quotes, braces,
/// upper case, slashes, very long).
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        58 => "[a-z0-9][a-z0-9_.-]{1,10}",
        1 => "[A-Za-z0-9 _.#\n\"{}/\\\\-]{0,14}",
        1 => Just("a".repeat(130)),
    ]
}

/// An address literal (never a DNS name: nothing resolves) and a port.
fn valid_addr() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (1u8..255, 0u8..255, 0u8..255, 1u8..255, 1u32..65536)
            .prop_map(|(a, b, c, d, p)| format!("{a}.{b}.{c}.{d}:{p}")),
        1 => ("fd00::[0-9a-f]{1,4}", 1u32..65536).prop_map(|(h, p)| format!("[{h}]:{p}")),
    ]
}

/// What an attacker appends to a field to smuggle a server option, a directive or a
/// section into the config.
fn injection() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        " backup",
        " weight 0",
        " disabled",
        "\tsend-proxy",
        "\n    bind :9999",
        "\nbackend evil",
        " # comment",
        "\r\n    http-request deny",
        "\u{0}",
        "{{ 1 }}",
    ])
    .prop_map(String::from)
}

/// A tag: valid, and often an HAProxy keyword (free text to a template that pastes it).
fn tag() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => "[A-Za-z0-9_.:=-]{1,12}",
        1 => prop::sample::select(vec!["backup", "disabled", "check", "weight=0", "maxconn=1", "send-proxy"]).prop_map(String::from),
    ]
}

/// A valid record: address literal, tags, weight 0..=256, usually no node (a node-scoped
/// key names it), a container id or none, draining or not.
fn record() -> impl Strategy<Value = serde_json::Value> {
    (
        valid_addr(),
        prop::collection::vec(tag(), 0..4),
        0u32..=256,
        prop_oneof![7 => Just(String::new()), 1 => "[a-z][a-z0-9-]{0,8}"],
        prop_oneof![Just(String::new()), "[0-9a-f]{12}"],
        any::<bool>(),
    )
        .prop_map(|(addr, tags, weight, node, container, draining)| {
            serde_json::json!({
                "addr": addr, "tags": tags, "weight": weight,
                "node": node, "container": container, "draining": draining,
            })
        })
}

/// A valid record with one field made hostile: an injection after it, or a wrong type.
fn hostile_record() -> impl Strategy<Value = serde_json::Value> {
    (record(), 0usize..6, injection()).prop_map(|(mut r, field, inject)| {
        let append = |v: &serde_json::Value| format!("{}{inject}", v.as_str().unwrap_or(""));
        match field {
            0 => r["addr"] = append(&r["addr"]).into(),
            1 => r["node"] = format!("n{inject}").into(),
            2 => r["container"] = format!("abc{inject}").into(),
            3 => r["tags"]
                .as_array_mut()
                .expect("tags")
                .push(format!("t{inject}").into()),
            4 => r["weight"] = format!("100{inject}").into(),
            _ => r["addr"] = format!("10.0.0.1{inject}:80").into(),
        }
        r
    })
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // A bare host:port, as written by hand.
        3 => valid_addr().prop_map(String::into_bytes),
        1 => (valid_addr(), injection()).prop_map(|(a, i)| format!("{a}{i}").into_bytes()),
        // A JSON record: valid, or valid but for one hostile field.
        10 => record().prop_map(|r| r.to_string().into_bytes()),
        3 => hostile_record().prop_map(|r| r.to_string().into_bytes()),
        // Anything at all.
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (name(), name()).prop_map(|(s, i)| format!("/p/services/{s}/{i}")),
        // Mostly ids of the node's own (`<node>-…`), which confinement admits.
        6 => (name(), name(), name()).prop_map(|(n, s, i)| format!("/p/nodes/{n}/services/{s}/{n}-{i}")),
        2 => (name(), name(), name()).prop_map(|(n, s, i)| format!("/p/nodes/{n}/services/{s}/{i}")),
        1 => "/p/[a-z/ \n]{0,20}",
    ]
}

fn keys() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec((key(), value()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hostile_keys_and_values_never_add_a_line_or_an_argument_and_always_pass_the_check(
        keys in keys()
    ) {
        let (base_lines, base_sections, per_service, per_instance) = shape();
        let (out, services) = render_snapshot(&keys);
        let instances: usize = services.values().filter_map(|v| v.as_array()).map(Vec::len).sum();
        prop_assert_eq!(
            lines(&out),
            base_lines + services.len() * per_service + instances * per_instance,
            "a line was added or lost:\n{}", out
        );
        prop_assert_eq!(sections(&out), base_sections + services.len(), "a section was added:\n{}", out);
        if let Err(e) = servers_as_allowed(&out, &services) {
            prop_assert!(false, "{}\n{}", e, out);
        }
        let checked = without_dns(&out);
        prop_assert!(haproxy_check(&checked).is_ok(), "haproxy -c refused:\n{}\n{}", haproxy_check(&checked).unwrap_err(), out);
    }
}

/// The generators make cases worth checking: most keys render an instance, while the
/// hostile ones still come up often.
#[test]
fn generated_records_are_mostly_valid_with_hostile_fields() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut total, mut accepted, mut hostile) = (0, 0, 0);
    for _ in 0..300 {
        let case = keys().new_tree(&mut runner).expect("case").current();
        let (_, _, instances) = render(&case);
        total += case.len();
        accepted += instances;
        hostile += case
            .iter()
            .filter(|(k, v)| {
                let v = String::from_utf8_lossy(v);
                [
                    " backup",
                    " weight 0",
                    " disabled",
                    "send-proxy",
                    " # ",
                    "\\n",
                    "\\r",
                    "\\u0000",
                    "{{",
                ]
                .iter()
                .any(|i| v.contains(i) || k.contains(i))
            })
            .count();
    }
    eprintln!(
        "generated keys: {total}, rendered as instances: {accepted}, with an injection: {hostile}"
    );
    assert!(
        accepted * 2 > total,
        "only {accepted} of {total} generated keys were accepted"
    );
    assert!(
        hostile * 10 > total,
        "only {hostile} of {total} generated keys carry an injection"
    );
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
    assert!(haproxy_check(&without_dns(&out)).is_ok());

    // The per-line oracle sees what a line count cannot: an option on the same line, a
    // server moved to another section, a lost `disabled`.
    let (out, services) = render_snapshot(&[(
        "/p/services/web/a".into(),
        br#"{"addr":"10.0.0.1:80","draining":true}"#.to_vec(),
    )]);
    assert_eq!(servers_as_allowed(&out, &services), Ok(()));
    let line = out
        .lines()
        .find(|l| l.starts_with("    server a 10.0.0.1:80 id "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.ends_with(" weight 100 check disabled"), "{out}");
    let id = line.split_whitespace().nth(4).unwrap();
    for (bad, why) in [
        (format!("{line} backup"), "backup"),
        (line.replace(" disabled", ""), "disabled lost"),
        (format!("backend other\n{line}"), "section"),
        (
            line.replace(&format!(" id {id} "), " id 0 "),
            "id out of range",
        ),
        (
            line.replace(&format!(" id {id} "), " id x "),
            "id not a number",
        ),
    ] {
        let tampered = out.replace(line, &bad);
        assert_eq!(
            lines(&tampered) - lines(&out),
            usize::from(why == "section"),
            "{why}"
        );
        assert!(
            servers_as_allowed(&tampered, &services).is_err(),
            "{why} not seen"
        );
    }
}
