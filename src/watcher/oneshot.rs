//! The watcher's one-shot commands: `portolan render --once [--dry-run]` and
//! `portolan check`. Same store, render and apply path as the loop, run once.

use anyhow::Context as _;

use std::collections::BTreeMap;

use super::confine::Refusal;
use super::haproxy::runtime_plan::{self, RuntimePlan};
use super::policy::Resolution;
use super::render;
use super::resource::{self, Chain, Outcome, Resource};
use super::store::{Store, StoreSnapshot};
use super::{resolve, source};
use crate::config::WatcherConfig;
use crate::etcd;

/// `portolan render --once [--dry-run]`: one list from etcd, the same render and apply
/// path as the watcher. A dry run writes and reloads nothing: it prints the diff to the
/// live file (or the whole file when none exists) and the check's verdict. Returns false
/// when a check failed.
pub async fn render_once(cfg: &WatcherConfig, dry_run: bool) -> anyhow::Result<bool> {
    let (_, snapshot) = snapshot_from_etcd(cfg).await?;
    let mut ok = true;
    for t in &cfg.templates {
        let mut r = Resource::new(t.clone());
        r.assume_running();
        r.load_template().await?;
        r.read_live()
            .await
            .with_context(|| format!("cannot read {}", t.dest.display()))?;
        let rendered = match r.render(&snapshot) {
            Some(result) => result?,
            None => continue,
        };
        if dry_run {
            match r.live() {
                Some(live) if live == rendered.as_bytes() => {
                    println!("# {}: unchanged", t.dest.display());
                }
                Some(live) => {
                    print!("{}", r.diff(&rendered));
                    if t.haproxy_admin_socket.is_some() {
                        print!("{}", runtime_verdict(live, &rendered));
                    }
                }
                None => {
                    println!("# {} (does not exist yet):", t.dest.display());
                    print!("{rendered}");
                }
            }
            if let Some(check) = r.dry_check(&rendered, cfg.command_timeout).await {
                if check.success {
                    println!("# check passed: {}", t.dest.display());
                } else {
                    ok = false;
                    println!(
                        "# check FAILED ({}) for {}:\n{}",
                        check.status,
                        t.dest.display(),
                        check.output
                    );
                }
            }
            continue;
        }
        resource::clean_stale_staging(&t.dest).await.ok();
        match r.apply(&rendered, cfg.command_timeout).await {
            Outcome::Unchanged => println!("{}: unchanged", t.dest.display()),
            Outcome::Written => println!("{}: written", t.dest.display()),
            Outcome::Runtime { applied } => println!(
                "{}: written and applied through the runtime API ({applied}), no reload",
                t.dest.display()
            ),
            Outcome::Reloaded { fallback, .. } => {
                if let Some(why) = fallback {
                    println!("{}: runtime API failed: {}", t.dest.display(), Chain(&why));
                }
                println!("{}: written and reloaded", t.dest.display())
            }
            Outcome::Rejected { check, diff } => {
                ok = false;
                println!(
                    "{}: check failed ({}), file left as it was:\n{}\nDiff (first lines):\n{diff}",
                    t.dest.display(),
                    check.status,
                    check.output
                );
            }
            Outcome::Failed { error, fallback } => anyhow::bail!(
                "{}: {}",
                t.dest.display(),
                resource::failure_report(&error, fallback.as_ref())
            ),
        }
    }
    Ok(ok)
}

/// What the watcher would do with this change: the runtime commands, or why it takes a
/// reload. Comment lines, for `render --dry-run`.
fn runtime_verdict(live: &[u8], rendered: &str) -> String {
    match runtime_plan::plan(&String::from_utf8_lossy(live), rendered) {
        RuntimePlan::Runtime(ops) if ops.is_empty() => {
            "# no server changes: a reload would change nothing HAProxy runs\n".into()
        }
        RuntimePlan::Runtime(ops) => {
            let mut out = format!(
                "# through the runtime API, no reload ({} change(s)):\n",
                ops.len()
            );
            for op in &ops {
                out += &format!("#   {}\n", op.describe());
            }
            out
        }
        RuntimePlan::Reload(why) => format!("# needs a reload: {why}\n"),
    }
}

/// One listing of the prefix, decoded as the watcher decodes it: (revision, snapshot).
/// Keys left out are logged, naming each.
pub(crate) async fn snapshot_from_etcd(
    cfg: &WatcherConfig,
) -> anyhow::Result<(i64, StoreSnapshot)> {
    let (revision, snapshot, _) = listing_from_etcd(cfg).await?;
    Ok((revision, snapshot))
}

/// `snapshot_from_etcd`, with the keys confinement refused (`portolan status`).
pub(crate) async fn listing_from_etcd(
    cfg: &WatcherConfig,
) -> anyhow::Result<(i64, StoreSnapshot, BTreeMap<String, Refusal>)> {
    let mut client = etcd::connect(&cfg.etcd).await.with_context(|| {
        format!(
            "cannot reach etcd at {} (--etcd-endpoints)",
            cfg.etcd.endpoints.join(",")
        )
    })?;
    let dir = format!("{}/", cfg.etcd.prefix);
    let listing = etcd::list_prefix(&mut client, &dir)
        .await
        .with_context(|| format!("cannot list {dir} in etcd"))?;
    let mut store = Store::new(&cfg.etcd.prefix);
    let keys: Vec<(String, &[u8])> = listing
        .kvs
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value()))
        .collect();
    for w in store.reset(keys.iter().map(|(k, v)| (k.as_str(), *v))) {
        tracing::warn!(key = %w.key, "left out of the rendered config: {}", w.rule);
    }
    let (snapshot, refused) = admitted_once(&store, cfg).await;
    Ok((listing.revision, snapshot, refused))
}

/// `portolan check` (and the watcher's start): compiles every template, reporting all
/// broken ones with file:line:col.
pub fn check_templates(cfg: &WatcherConfig) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for t in &cfg.templates {
        let name = t.src.display().to_string();
        match std::fs::read_to_string(&t.src) {
            Ok(text) => {
                if let Err(e) = render::Template::compile(&name, &text) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(format!("template {name}: cannot read: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", problems.join("\n"))
    }
}

/// The snapshot the watcher would render: the routing policy applied, every host name
/// looked up first (there is no background to wait for here).
async fn admitted_once(
    store: &Store,
    cfg: &WatcherConfig,
) -> (StoreSnapshot, BTreeMap<String, Refusal>) {
    let (_, left) = source::admitted(store, &cfg.policy, |_| Resolution::Pending);
    let mut answers = BTreeMap::new();
    for name in left.names {
        let answer = match resolve::resolve(&name, resolve::LOOKUP_TIMEOUT).await {
            Ok(ips) => Resolution::Resolved(ips),
            Err(why) => Resolution::Failed(why),
        };
        answers.insert(name, answer);
    }
    let (snapshot, left) = source::admitted(store, &cfg.policy, |name| {
        answers.get(name).cloned().unwrap_or(Resolution::Pending)
    });
    for (key, rule) in left.keys {
        tracing::warn!(key = %key, "left out of the rendered config: {rule}");
    }
    (snapshot, left.refused)
}
