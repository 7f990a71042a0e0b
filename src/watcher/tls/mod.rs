//! HTTPS at the front door: the certificates under `<prefix>/certs/`, judged, written
//! to `certs_dir` and applied to every HAProxy through its runtime API.
//!
//! One pass (`Tls::sync`, called by the pass before any resource renders): `served`
//! judges etcd's values (a bad one refused and named, the name's last good one kept);
//! for each resource whose live config loads the crt-list and whose HAProxy's
//! certificates are known, `runtime` sends the difference over the admin socket (a
//! certificate HAProxy itself refuses is refused like a bad one, and the one before it
//! kept); then `files` makes `certs_dir` hold exactly the served set. A resource the
//! runtime API cannot bring in line (no admin socket, unreachable, any other refusal)
//! is told its inputs changed (`Resource::inputs_changed`): its next apply checks the
//! config again (`haproxy -c` loads the certificate files too) before it reloads, so
//! no reload runs onto files no check passed. After a reload a resource's HAProxy runs
//! what `certs_dir` holds (`Tls::reloaded`); until its first one, what it runs is not
//! known and nothing is sent (the first apply of a run always reloads). What was served
//! is kept beside the files (`<name>.json`, the etcd value) and served again at start,
//! so a restart during a refusal keeps the name's last good certificate.
//!
//! Templates see `crt_list`, `default_cert`, `tls_hosts` (paths), `certs` (name,
//! domains, not_after of each served certificate: a template that renders them reloads
//! on each change) and `tls` (per service: `mode` and `hsts`, from the instances'
//! `tls=` and `hsts=` tags).

mod files;
mod runtime;
mod served;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tera::Context;

pub(crate) use served::Event;
use served::{Entry, Served};

use super::apply::Resource;
use super::store::StoreSnapshot;

/// What the template context gets.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct View {
    crt_list: String,
    default_cert: String,
    tls_hosts: String,
    certs: Vec<CertView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
struct CertView {
    name: String,
    domains: Vec<String>,
    /// RFC 3339, the leaf's.
    not_after: String,
}

/// One service's HTTPS labels (`tls=redirect|both|off`, `hsts=<seconds>` tags).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct Labels {
    /// `redirect` (the default): HTTP is redirected to HTTPS once a certificate covers
    /// the host; `both`: served on both; `off`: never redirected.
    mode: &'static str,
    hsts: Option<u64>,
}

/// The labels of each service, from its instances' tags (the first instance, by id,
/// that sets one decides). Pure.
fn labels(snapshot: &StoreSnapshot) -> BTreeMap<&str, Labels> {
    let mut out = BTreeMap::new();
    for (name, list) in &snapshot.services {
        let mut l = Labels {
            mode: "redirect",
            hsts: None,
        };
        let tags = || list.iter().flat_map(|i| i.tags.iter());
        if let Some(m) = tags().find_map(|t| t.strip_prefix("tls=")) {
            l.mode = match m {
                "both" => "both",
                "off" => "off",
                _ => "redirect",
            };
        }
        l.hsts = tags().find_map(|t| t.strip_prefix("hsts=")?.parse().ok());
        out.insert(name.as_str(), l);
    }
    out
}

impl View {
    pub(crate) fn insert_into(&self, ctx: &mut Context, snapshot: &StoreSnapshot) {
        ctx.insert("crt_list", &self.crt_list);
        ctx.insert("default_cert", &self.default_cert);
        ctx.insert("tls_hosts", &self.tls_hosts);
        ctx.insert("certs", &self.certs);
        ctx.insert("tls", &labels(snapshot));
    }
}

pub(crate) struct Tls {
    dir: Option<files::Dir>,
    served: Served,
    /// Per resource: what its HAProxy runs; None until a reload makes it known.
    known: Vec<Option<BTreeMap<String, Entry>>>,
}

/// What one `sync` did, for the sink.
#[derive(Debug, Default)]
pub(crate) struct Synced {
    pub(crate) events: Vec<Event>,
    /// Runtime ops sent, per resource index.
    pub(crate) runtime: Vec<(usize, usize)>,
    /// Resources falling back to a checked reload, and why.
    pub(crate) fallback: Vec<(usize, String)>,
    pub(crate) error: Option<String>,
}

impl Tls {
    /// `certs_dir` prepared (0700, a default certificate); a folder that cannot be is
    /// warned about, and the templates then see no certificate paths.
    pub(crate) fn open(certs_dir: &Path, resources: usize) -> Tls {
        let dir = match files::Dir::prepare(certs_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(
                    "cannot prepare watcher.certs_dir {} ({e}): no certificate is served; make it a folder the watcher can write",
                    certs_dir.display()
                );
                None
            }
        };
        let mut served = Served::default();
        if let Some(d) = &dir {
            served.seed(&d.saved(), SystemTime::now());
        }
        Tls {
            dir,
            served,
            known: vec![None; resources],
        }
    }

    pub(crate) fn view(&self) -> Option<Arc<View>> {
        let dir = self.dir.as_ref()?;
        Some(Arc::new(View {
            crt_list: dir.crt_list().display().to_string(),
            default_cert: dir.default_cert().display().to_string(),
            tls_hosts: dir.hosts().display().to_string(),
            certs: self
                .served
                .served()
                .iter()
                .map(|(name, e)| CertView {
                    name: name.clone(),
                    domains: e.cert.record.domains.clone(),
                    not_after: rfc3339(e.cert.not_after),
                })
                .collect(),
        }))
    }

    /// Served certificates: name → the leaf's expiry (seconds since the epoch).
    pub(crate) fn served(&self) -> BTreeMap<String, i64> {
        self.served
            .served()
            .iter()
            .map(|(n, e)| (n.clone(), e.cert.not_after))
            .collect()
    }

    pub(crate) fn refused(&self) -> BTreeMap<String, String> {
        self.served
            .refused()
            .map(|(n, r)| (n.clone(), format!("{} ({})", r.detail, r.reason.label())))
            .collect()
    }

    /// Judges `certs` at `now` and brings every HAProxy and `certs_dir` in line (see
    /// the module docs).
    pub(crate) async fn sync(
        &mut self,
        certs: &BTreeMap<String, Arc<[u8]>>,
        resources: &mut [Resource],
        timeout: Duration,
    ) -> Synced {
        let mut out = Synced::default();
        let Some(dir) = self.dir.clone() else {
            return out;
        };
        out.events = self.served.judge(certs, SystemTime::now());
        let list = dir.crt_list().display().to_string();
        for (i, r) in resources.iter_mut().enumerate() {
            let uses = r.live().is_some_and(|b| contains(b, list.as_bytes()));
            let Some(known) = self.known.get_mut(i) else {
                continue;
            };
            if !uses {
                *known = None;
                continue;
            }
            let Some(k) = known.as_mut() else { continue };
            let sock = r.cfg.haproxy_admin_socket.clone();
            // A certificate HAProxy refuses is taken out and the plan made again: at
            // most once per certificate.
            for _ in 0..=certs.len() {
                let ops = runtime::plan(k, self.served.served());
                if ops.is_empty() {
                    break;
                }
                let Some(sock) = &sock else {
                    out.fallback.push((i, "no haproxy_admin_socket".into()));
                    *known = None;
                    r.inputs_changed();
                    break;
                };
                match runtime::apply(sock, &dir, k, self.served.served(), &ops, timeout).await {
                    Ok(n) => {
                        out.runtime.push((i, n));
                        break;
                    }
                    Err(runtime::Failure::Cert { name, answer }) => {
                        out.events
                            .extend(self.served.haproxy_refused(&name, &answer));
                    }
                    Err(runtime::Failure::Other(why)) => {
                        out.fallback.push((i, why));
                        *known = None;
                        r.inputs_changed();
                        break;
                    }
                }
            }
        }
        // Reads, fsyncs and renames: off the loop's runtime threads.
        let served: Vec<(String, Entry)> = self
            .served
            .served()
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        let writer = dir.clone();
        let written =
            tokio::task::spawn_blocking(move || writer.sync(served.iter().map(|(n, e)| (n, e))))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            out.error = Some(format!(
                "cannot write the certificates to watcher.certs_dir {}: {e}",
                dir.path.display()
            ));
            for (i, r) in resources.iter_mut().enumerate() {
                self.known[i] = None;
                r.inputs_changed();
            }
        }
        let view = self.view();
        for r in resources.iter_mut() {
            r.tls = view.clone();
        }
        out
    }

    /// Resource `i`'s HAProxy reloaded: it runs what `certs_dir` holds now.
    pub(crate) fn reloaded(&mut self, i: usize) {
        if let Some(k) = self.known.get_mut(i) {
            *k = Some(self.served.served().clone());
        }
    }
}

/// The view a one-shot render (`render --once`, `portolan status`) gives templates:
/// the running watcher's `certs_dir` when it has one (None otherwise: no certificate
/// paths, so a template's HTTPS part stays out), with the certificates of `certs`
/// valid now. Reads, never writes.
pub(crate) fn view_of(certs_dir: &Path, certs: &BTreeMap<String, Arc<[u8]>>) -> Option<Arc<View>> {
    let dir = files::Dir {
        path: certs_dir.to_path_buf(),
    };
    if !dir.crt_list().exists() || !dir.default_cert().exists() {
        return None;
    }
    let mut served = Served::default();
    served.judge(certs, SystemTime::now());
    Tls {
        dir: Some(dir),
        served,
        known: Vec::new(),
    }
    .view()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_tags_its_https_labels_and_redirect_is_the_default() {
        let mut s = StoreSnapshot::default();
        let inst = |svc: &str, id: &str, tags: &str| {
            let v = format!(r#"{{"addr":"10.0.0.1:80","tags":[{tags}]}}"#);
            std::sync::Arc::new(
                crate::schema::decode_owned("k", svc, id, None, v.as_bytes()).unwrap(),
            )
        };
        s.services.insert("a".into(), vec![inst("a", "1", "")]);
        s.services.insert(
            "b".into(),
            vec![inst("b", "1", r#""tls=both","hsts=31536000""#)],
        );
        s.services.insert(
            "c".into(),
            vec![inst("c", "1", r#""x""#), inst("c", "2", r#""tls=off""#)],
        );
        let l = labels(&s);
        assert_eq!(
            l["a"],
            Labels {
                mode: "redirect",
                hsts: None
            }
        );
        assert_eq!(
            l["b"],
            Labels {
                mode: "both",
                hsts: Some(31_536_000)
            }
        );
        assert_eq!(l["c"].mode, "off");
    }
}

#[cfg(test)]
mod template_tests {
    use super::*;
    use crate::watcher::render::{InstanceValues, Template};

    fn shipped() -> Template {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/templates/haproxy.cfg.tera");
        Template::compile("haproxy.cfg.tera", &std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn snapshot() -> StoreSnapshot {
        let mut s = StoreSnapshot::default();
        for (svc, tags) in [("web", r#""hsts=600""#), ("plain", r#""tls=both""#)] {
            let v = format!(r#"{{"addr":"10.0.0.1:80","tags":[{tags}]}}"#);
            let i = crate::schema::decode_owned("k", svc, "1", None, v.as_bytes()).unwrap();
            s.services.insert(svc.into(), vec![Arc::new(i)]);
        }
        s
    }

    #[test]
    fn the_default_template_binds_https_redirects_covered_hosts_and_sets_hsts() {
        let tmp = tempfile::tempdir().unwrap();
        let tls = Tls::open(&tmp.path().join("certs"), 1);
        let s = snapshot();
        let mut vars = toml::Table::new();
        vars.insert("https_bind".into(), "127.0.0.1:8443".into());
        vars.insert("domain".into(), "example.test".into());
        let mut ctx = InstanceValues::default().context_for(&s, &vars, false);
        tls.view().unwrap().insert_into(&mut ctx, &s);
        let out = shipped().render(&ctx).unwrap();
        let dir = tmp.path().join("certs").display().to_string();
        assert!(out.contains(&format!("bind 127.0.0.1:8443 ssl crt {dir}/default.pem crt-list {dir}/crt-list alpn h2,http/1.1")), "{out}");
        assert!(
            out.contains("acl portolan_tls_exempt var(txn.host) -m str plain.example.test"),
            "{out}"
        );
        assert!(
            !out.contains("-m str web.example.test\n    http-request redirect"),
            "{out}"
        );
        assert!(
            out.contains(
                "http-response set-header Strict-Transport-Security \"max-age=600\" if { ssl_fc }"
            ),
            "{out}"
        );
        if let Ok(p) = std::env::var("PORTOLAN_TLS_TEMPLATE_OUT") {
            std::fs::write(p, &out).unwrap();
        }
        // Without a certs_dir (a one-shot render with no watcher's): no HTTPS at all.
        let ctx = InstanceValues::default().context_for(&s, &vars, false);
        let out = shipped().render(&ctx).unwrap();
        assert!(!out.contains("ssl"), "{out}");
        // https_bind = "off": none either.
        vars.insert("https_bind".into(), "off".into());
        let mut ctx = InstanceValues::default().context_for(&s, &vars, false);
        tls.view().unwrap().insert_into(&mut ctx, &s);
        assert!(!shipped().render(&ctx).unwrap().contains("crt-list"));
    }
}
