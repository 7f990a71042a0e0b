//! The watcher's one-shot commands: `portolan render --once [--dry-run]` and
//! `portolan check`. Same store, render and apply path as the loop, run once.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;

use super::apply::{Outcome, Resource};
use super::confine::Refusal;
use super::guard::{self, Guard};
use super::haproxy::runtime_plan::{self, RuntimePlan};
use super::policy::Resolution;
use super::render;
use super::report::{self, Scene};
use super::store::{Store, StoreSnapshot};
use super::{resolve, source};
use crate::config::WatcherConfig;
use crate::etcd;

/// How `render --once` runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Once {
    /// Print, write and reload nothing.
    pub dry_run: bool,
    /// Apply a render the mass-removal guard would hold.
    pub force: bool,
}

/// `portolan render --once [--dry-run] [--force]`: one list from etcd, then each
/// resource's own route and executor, as the watcher's loop runs them, reported through
/// the same `report` table (printed instead of logged). A dry run writes and reloads
/// nothing: it prints the diff to the live file (or the whole file when none exists),
/// the runtime commands the watcher would send, and the check's verdict. Returns false
/// when a check failed.
///
/// The mass-removal guard judges the render as the loop's first pass does, against the
/// file HAProxy runs (the first `[[template]]`'s `dest`): a render it would hold is
/// refused, naming what it would remove, unless `force` (a dry run says so and goes on).
/// What it does not share with the loop, and why: a hold has no time to run out in a
/// one-shot run (hence the refusal), and emptied backends do not linger, since no later
/// run of the same process would take them away again; HAProxy is taken to run the file
/// on disk (`Resource::assume_running`: identical bytes cause no reload), and every
/// change is checked before it is applied, since no deferred check runs after it.
pub async fn render_once(cfg: &WatcherConfig, once: Once) -> anyhow::Result<bool> {
    let (_, snapshot) = snapshot_from_etcd(cfg).await?;
    if let Some(refusal) = guarded(cfg, &snapshot).await {
        if once.dry_run || once.force {
            println!("# {refusal}");
        } else {
            anyhow::bail!(
                "{refusal}; nothing was written. If this removal is meant, run again with --force"
            );
        }
    }
    let mut ok = true;
    for t in &cfg.templates {
        let mut r = Resource::open(t.clone(), Duration::ZERO)
            .await
            .with_context(|| format!("cannot read {}", t.dest.display()))?;
        r.assume_running();
        r.load_template().await?;
        r.tls = super::tls::view_of(&cfg.certs_dir, &snapshot.certs);
        let rendered = match r.render(&snapshot) {
            Some(result) => result?,
            None => continue,
        };
        if once.dry_run {
            ok &= dry_run_one(&r, &rendered, cfg.command_timeout).await;
            continue;
        }
        r.clean_stale_staging().await.ok();
        let started = std::time::Instant::now();
        let outcome = r.apply(&rendered, cfg.command_timeout).await;
        let name = r.name();
        let said = report::apply(&outcome, &Scene::of(&r, &name, &snapshot, started));
        if let Outcome::Failed { .. } = outcome {
            anyhow::bail!("{}", said.once);
        }
        ok &= !matches!(outcome, Outcome::Rejected { .. });
        println!("{}", said.once);
    }
    Ok(ok)
}

/// What the mass-removal guard says of `snapshot` against the file HAProxy runs: None
/// when it would apply it, or the removal it would hold, in words.
async fn guarded(cfg: &WatcherConfig, snapshot: &StoreSnapshot) -> Option<String> {
    let dest = &cfg.templates.first()?.dest;
    let live = tokio::fs::read_to_string(dest).await.ok()?;
    let now = std::time::Instant::now();
    let mut guard = Guard::new(&cfg.mass_removal);
    let (_, held) = guard.filter(Some(&guard::seed(&live, snapshot)), snapshot, now);
    let h = held?;
    Some(format!(
        "the mass-removal guard holds this render back: it removes {} instance(s), a drop of {} from the {} that {} routes to ({:.0}%, more than the {:.0}% mass_removal share){}",
        h.count,
        h.drop,
        h.live,
        dest.display(),
        h.percent(),
        cfg.mass_removal.share * 100.0,
        h.service.map(|s| format!(" in service {s}")).unwrap_or_default()
    ))
}

/// Prints what applying `rendered` would change and whether its check passes.
async fn dry_run_one(r: &Resource, rendered: &str, timeout: Duration) -> bool {
    let dest = r.cfg.dest.display();
    match r.live() {
        Some(live) if live == rendered.as_bytes() => println!("# {dest}: unchanged"),
        Some(live) => {
            print!("{}", r.diff(rendered));
            if r.cfg.haproxy_admin_socket.is_some() {
                print!("{}", runtime_verdict(live, rendered));
            }
        }
        None => {
            println!("# {dest} (does not exist yet):");
            print!("{rendered}");
        }
    }
    match r.dry_check(rendered, timeout).await {
        Some(check) if !check.success => {
            println!(
                "# check FAILED ({}) for {dest}:\n{}",
                check.status, check.output
            );
            false
        }
        Some(_) => {
            println!("# check passed: {dest}");
            true
        }
        None => true,
    }
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
    let mut warnings = store.reset(keys.iter().map(|(k, v)| (k.as_str(), *v)));
    warnings.extend(listing.too_large_errors());
    for w in warnings {
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
    let mut policy = cfg.policy.clone();
    match super::interfaces::list() {
        Ok(addrs) => {
            policy.set_host_addresses(addrs);
        }
        Err(e) => tracing::warn!("cannot list this host's addresses (getifaddrs: {e})"),
    }
    let (_, left) = source::admitted(store, &policy, |_| Resolution::Pending);
    let answers: BTreeMap<String, Resolution> = futures_util::stream::iter(left.names)
        .map(|name| async move {
            let answer = match resolve::resolve(&name, resolve::LOOKUP_TIMEOUT).await {
                Ok(ips) => Resolution::Resolved(ips),
                Err(why) => Resolution::Failed(why),
            };
            (name, answer)
        })
        .buffer_unordered(resolve::MAX_IN_FLIGHT)
        .collect()
        .await;
    let (snapshot, left) = source::admitted(store, &policy, |name| {
        answers.get(name).cloned().unwrap_or(Resolution::Pending)
    });
    for (key, rule) in left.keys {
        tracing::warn!(key = %key, "left out of the rendered config: {rule}");
    }
    (snapshot, left.refused)
}
