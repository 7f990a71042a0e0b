//! The README and `--help` keep up with the code: every module has its line in the
//! README's map, every flag a help text mentions exists, the README says one thing
//! about how long the suite takes, and the template context it lists is the one
//! templates get.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text.find(heading).unwrap_or_else(|| panic!("no {heading}"));
    let rest = &text[start + heading.len()..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

fn modules(dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.insert(p.file_name().unwrap().to_string_lossy().into_owned());
            modules(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            if !["mod", "lib", "main", "fixtures", "fuzz"].contains(&stem.as_str()) {
                out.insert(stem);
            }
        }
    }
}

#[test]
fn the_readme_map_names_every_module() {
    let text = readme();
    let map = section(&text, "## Developing");
    let mut all = BTreeSet::new();
    modules(&repo().join("src"), &mut all);
    let missing: Vec<_> = all.iter().filter(|m| !map.contains(m.as_str())).collect();
    assert!(
        missing.is_empty(),
        "README's Developing map lacks {missing:?}"
    );
}

/// Every `--flag` any help text mentions is a flag of some command.
#[test]
fn help_texts_mention_only_flags_that_exist() {
    let mut cmd = portolan::cli::Cli::command();
    cmd.build();
    let mut flags = BTreeSet::new();
    let mut helps = Vec::new();
    fn walk(c: &mut clap::Command, flags: &mut BTreeSet<String>, helps: &mut Vec<String>) {
        for a in c.get_arguments() {
            if let Some(l) = a.get_long() {
                flags.insert(format!("--{l}"));
            }
        }
        helps.push(c.render_long_help().to_string());
        for s in c.get_subcommands_mut() {
            walk(s, flags, helps);
        }
    }
    walk(&mut cmd, &mut flags, &mut helps);
    flags.extend(["--help", "--version"].map(String::from));
    let mut unknown = BTreeSet::new();
    for h in &helps {
        for (i, _) in h.match_indices("--") {
            let word: String = h[i..]
                .chars()
                .skip(2)
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let word = word.trim_end_matches('-');
            // `--` alone, or an HAProxy/etcd/docker flag quoted in an example.
            if word.is_empty() || h[..i].ends_with(|c: char| c.is_alphanumeric()) {
                continue;
            }
            let flag = format!("--{word}");
            let foreign = [
                "--prefix",
                "--endpoints",
                "--rm",
                "--client-cert-auth",
                "--max-request-bytes",
            ];
            if !flags.contains(&flag) && !foreign.contains(&flag.as_str()) {
                unknown.insert(flag);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "help mentions flags that do not exist: {unknown:?}"
    );
}

#[test]
fn registrar_help_says_what_a_stop_does() {
    let mut cmd = portolan::cli::Cli::command();
    let help = cmd
        .find_subcommand_mut("registrar")
        .unwrap()
        .render_long_help()
        .to_string();
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        !flat.contains("removed the moment they die, stop, are killed"),
        "{flat}"
    );
    assert!(
        flat.contains("\"draining\": true") && flat.contains("removed when it exits"),
        "{flat}"
    );
}

#[test]
fn the_readme_gives_one_duration_for_the_suite() {
    let text = readme();
    let mut said = BTreeSet::new();
    for (i, _) in text.match_indices("scripts/test.sh") {
        let after = &text[i..(i + 400).min(text.len())];
        if let Some(j) = after.find("(about ") {
            let what: String = after[j + 7..].chars().take_while(|c| *c != ' ').collect();
            said.insert(what);
        }
    }
    assert_eq!(said.len(), 1, "README says the suite takes {said:?}");
}

#[test]
fn the_readme_lists_every_field_templates_get_on_an_instance() {
    let text = readme();
    let start = text
        .find("Template context:")
        .expect("a template context paragraph");
    let para = &text[start..start + text[start..].find("\n\n").unwrap()];
    let inst = portolan::schema::Instance {
        id: "a".into(),
        service: "s".into(),
        addr: "10.0.0.1:80".into(),
        host: "10.0.0.1".into(),
        port: 80,
        host_name: String::new(),
        node: "n".into(),
        container: "c".into(),
        tags: vec![],
        weight: 100,
        draining: false,
        route: true,
        routing: None,
        created: 0,
    };
    let serde_json::Value::Object(fields) = serde_json::to_value(&inst).unwrap() else {
        panic!()
    };
    for f in fields.keys() {
        assert!(
            para.contains(&format!("`{f}`")),
            "README's template context lacks `{f}`"
        );
    }
}

/// The README's top diagram and schema use the v2 layout: a registrar writes under
/// nodes/<node>/, never services/ directly.
#[test]
fn the_diagram_shows_the_v2_key_layout() {
    let text = readme();
    let diagram = &text[text.find("```").unwrap()..];
    let diagram = &diagram[..diagram[3..].find("```").unwrap()];
    assert!(diagram.contains("nodes/<node>/services/"), "{diagram}");
    assert!(
        !diagram.contains("registrar ─put/del─▶ /portolan/services"),
        "{diagram}"
    );
}

/// docs/scaling.md and the README quote the same bench figures: the burst row from
/// docs/convergence.json, and one `haproxy -c` figure for 10,000 servers.
#[test]
fn scaling_and_the_readme_agree_on_the_bench_figures() {
    let scaling = std::fs::read_to_string(repo().join("docs/scaling.md")).unwrap();
    let text = readme();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("docs/convergence.json")).unwrap(),
    )
    .unwrap();
    let burst = &json["burst"];
    let all = format!("{:.0} ms", burst["ms"].as_f64().unwrap());
    let written = format!("{:.0} ms", burst["written_ms"].as_f64().unwrap());
    let reloads = format!("{} reloads", burst["reloads"]);
    for (doc, name) in [(&scaling, "docs/scaling.md"), (&text, "README.md")] {
        let lines: Vec<&str> = doc.lines().filter(|l| l.contains("1,000 puts")).collect();
        assert!(!lines.is_empty(), "{name} quotes no burst");
        let joined = lines.join(" ");
        assert!(
            joined.contains(&all) && joined.contains(&reloads),
            "{name}: {joined} (bench: {all}, {reloads})"
        );
    }
    assert!(
        scaling.contains(&written),
        "docs/scaling.md: puts written in {written}"
    );
    // The README says "486 ms for 10,000 servers in one backend"; scaling.md the same.
    let figure = |doc: &str, after: &str| -> Vec<String> {
        doc.match_indices(after)
            .map(|(i, _)| {
                let before = doc[..i].trim_end();
                let num: String = before
                    .trim_end_matches(" ms")
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_digit() || *c == ',')
                    .collect();
                num.chars().rev().collect()
            })
            .collect()
    };
    let mut said: BTreeSet<String> = BTreeSet::new();
    said.extend(figure(&text, " ms for 10,000 servers in one backend"));
    said.extend(figure(
        &scaling,
        " ms\n   for 10,000 servers in one backend",
    ));
    for l in scaling
        .lines()
        .filter(|l| l.starts_with("| `haproxy -c`, 10,000 servers"))
    {
        said.extend(
            l.split('|')
                .nth(2)
                .map(|c| c.trim().trim_end_matches(" ms").to_string()),
        );
    }
    assert_eq!(
        said.len(),
        1,
        "haproxy -c at 10,000 servers is quoted as {said:?}"
    );
}

/// The convergence bench measures a delete on its own: it no longer deletes and puts
/// in one txn (where the old one's first miss is the new one's first answer).
#[test]
fn the_convergence_bench_measures_deletes_on_their_own() {
    let bench = std::fs::read_to_string(repo().join("benches/convergence.rs")).unwrap();
    let swaps = &bench[bench.find("async fn swaps").unwrap()..];
    let swaps = &swaps[..swaps.find("\n}\n").unwrap()];
    assert!(!swaps.contains("TxnOp::delete"), "{swaps}");
    assert!(swaps.contains("etcd.delete(&key)"), "{swaps}");
}
