//! Templates: compile (tera 2) and render from a snapshot. Pure apart from nothing: the
//! caller reads the template file and hands over its text.
//!
//! The context is `services`, `nodes`, `kv` (see `store::StoreSnapshot`), `vars` (the
//! resource's `vars` table from the config file) and `routes` (`watcher::routes`: the
//! services' route options resolved, one owner per route). Each instance carries
//! `server_id`, its server's stable id (`watcher::server_ids`).
//!
//! Draining instances (their container is stopping) reach only templates that mention
//! `draining` outside a `{# comment #}`: such a template decides what a draining
//! instance becomes (the shipped one renders it `disabled`). Any other template — one
//! written before drain existed, a ported confd template — never sees them, so a
//! stopping container leaves rotation whatever the template says (through the runtime
//! API's `del server`, in-flight requests finishing, or a reload). Tera is built with `preserve_order`,
//! so maps iterate in the sorted order the snapshot's `BTreeMap`s give them: equal
//! state renders byte-identical output.
//!
//! `services` and `nodes` were validated by the store; `kv` values were not (anyone
//! with write access to `<prefix>/config/` chooses them), so templates paste one into a
//! config line only through the `haproxy_arg` filter, which refuses anything that could
//! end the line or start a comment.

use std::borrow::Cow;

use std::collections::BTreeMap;
use std::sync::Arc;

use tera::{Context, Kwargs, State, Tera, Value};

use crate::schema::Instance;

use super::routes;
use super::server_ids;
use super::store::StoreSnapshot;

/// A template that failed to compile or render. The message is tera's report, which
/// names the file, line and column and underlines the spot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {name}: {message}")]
pub struct TemplateError {
    pub(crate) name: String,
    pub(crate) message: String,
}

/// One compiled template, named by its file path so errors point at the file.
#[derive(Clone)]
pub struct Template {
    name: String,
    tera: Tera,
    /// The source mentions `draining` (outside comments): it is given draining instances.
    sees_draining: bool,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .finish()
    }
}

impl Template {
    /// Compiles `source`. `name` (the file path) appears in error reports as `name:line:col`.
    pub fn compile(name: &str, source: &str) -> Result<Template, TemplateError> {
        let mut tera = Tera::default();
        // Config files are not HTML: never escape `<`, `&` or quotes.
        tera.autoescape_on(Vec::<&str>::new());
        tera.register_filter("haproxy_arg", haproxy_arg_filter);
        tera.add_raw_template(name, source)
            .map_err(|e| TemplateError {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Template {
            name: name.to_string(),
            tera,
            sees_draining: mentions_draining(source),
        })
    }

    /// Whether draining instances are in this template's `services` (see the module docs).
    pub fn sees_draining(&self) -> bool {
        self.sees_draining
    }

    /// Renders against a context built by `context()`.
    pub fn render(&self, ctx: &Context) -> Result<String, TemplateError> {
        self.tera
            .render(&self.name, ctx)
            .map_err(|e| TemplateError {
                name: self.name.clone(),
                message: e.to_string(),
            })
    }
}

/// True when `source` says `draining` outside `{# … #}` comments: the template asks
/// for draining instances and handles them itself.
fn mentions_draining(source: &str) -> bool {
    let mut rest = source;
    while let Some(start) = rest.find("{#") {
        if rest[..start].contains("draining") {
            return true;
        }
        rest = match rest[start..].find("#}") {
            Some(end) => &rest[start + end + 2..],
            None => "",
        };
    }
    rest.contains("draining")
}

/// The tera context for one resource, draining instances included.
pub fn context(snapshot: &StoreSnapshot, vars: &toml::Table) -> Context {
    InstanceValues::default().context(snapshot, vars)
}

/// `list` without its draining instances, unless `with_draining`.
fn serving(list: &[Arc<Instance>], with_draining: bool) -> Cow<'_, [Arc<Instance>]> {
    if with_draining || !list.iter().any(|i| i.draining) {
        Cow::Borrowed(list)
    } else {
        Cow::Owned(list.iter().filter(|i| !i.draining).cloned().collect())
    }
}

/// The tera values of the services' instances, kept from one render to the next.
/// Turning 10,000 instances into tera maps takes ~10 ms, most of a change's cost at that
/// size, and a change touches one service or a few: a service whose instances are the
/// same allocations as last time (snapshots share unchanged ones, `Arc`) reuses its
/// whole list; a changed one reuses the values of its unchanged instances. The cache
/// holds the instances themselves, so an address it compares cannot have been reused
/// by another instance meanwhile.
/// One service's listed instances, their server ids and their tera values.
type Cached = (Vec<Arc<Instance>>, Vec<u32>, Value);

#[derive(Default)]
pub struct InstanceValues {
    /// Service → its listed instances, their server ids, and their values.
    cached: std::collections::HashMap<String, Cached>,
    /// The route conflicts of the last render, so each is logged once.
    conflicts: Vec<routes::Conflict>,
    /// Those of them the render before did not have.
    fresh: Vec<routes::Conflict>,
}

/// What a template sees of one instance: its fields and `server_id`, the stable
/// `id <n>` of its server line (`server_ids`).
#[derive(serde::Serialize)]
struct InstanceValue<'a> {
    #[serde(flatten)]
    instance: &'a Instance,
    server_id: u32,
}

impl InstanceValues {
    /// The tera context for one resource, reusing what is unchanged since the last call
    /// and forgetting services gone since. Draining instances included.
    pub fn context(&mut self, snapshot: &StoreSnapshot, vars: &toml::Table) -> Context {
        self.context_for(snapshot, vars, true)
    }

    /// The context for a template that sees draining instances or does not
    /// (`Template::sees_draining`). A service whose every instance drains stays, empty.
    pub fn context_for(
        &mut self,
        snapshot: &StoreSnapshot,
        vars: &toml::Table,
        with_draining: bool,
    ) -> Context {
        let mut next = std::collections::HashMap::with_capacity(snapshot.services.len());
        let mut services = BTreeMap::new();
        // `route = false` instances (a host's etcd peers): registered to be found, never
        // routed, so templates see them only under `unrouted`.
        let mut unrouted: BTreeMap<&str, Vec<&Instance>> = BTreeMap::new();
        let mut routed_lists: Vec<(&str, Cow<[Arc<Instance>]>)> = Vec::new();
        for (name, all) in &snapshot.services {
            let routed: Cow<[Arc<Instance>]> = if all.iter().all(|i| i.route) {
                Cow::Borrowed(all)
            } else {
                unrouted.insert(
                    name,
                    all.iter().filter(|i| !i.route).map(|i| &**i).collect(),
                );
                Cow::Owned(all.iter().filter(|i| i.route).cloned().collect())
            };
            // A service of unrouted instances only has no backend; an emptied one
            // (kept by linger, no instance at all) keeps its own.
            if routed.is_empty() && !all.is_empty() {
                continue;
            }
            let list = &*serving(&routed, with_draining);
            let old = self.cached.remove(name);
            let value = match old {
                Some((held, sids, v))
                    if held.len() == list.len()
                        && held.iter().zip(list).all(|(a, b)| Arc::ptr_eq(a, b)) =>
                {
                    (sids, v)
                }
                old => {
                    // Ids are settled over the routed instances, draining ones included,
                    // so a server keeps its id whether or not a template sees draining.
                    let ids: std::collections::HashMap<usize, u32> = routed
                        .iter()
                        .map(|i| Arc::as_ptr(i) as usize)
                        .zip(server_ids::assign(routed.iter().map(|i| i.id.as_str())))
                        .collect();
                    let reuse: std::collections::HashMap<usize, (u32, &Value)> = old
                        .as_ref()
                        .and_then(|(held, sids, v)| {
                            Some(held.iter().zip(sids.iter().zip(v.as_array()?)))
                        })
                        .into_iter()
                        .flatten()
                        .map(|(i, (sid, v))| (Arc::as_ptr(i) as usize, (*sid, v)))
                        .collect();
                    let mut sids = Vec::with_capacity(list.len());
                    let values: Vec<Value> = list
                        .iter()
                        .map(|i| {
                            let ptr = Arc::as_ptr(i) as usize;
                            let server_id = ids.get(&ptr).copied().unwrap_or(0);
                            sids.push(server_id);
                            match reuse.get(&ptr) {
                                Some((sid, v)) if *sid == server_id => (*v).clone(),
                                _ => Value::from_serializable(&InstanceValue {
                                    instance: i,
                                    server_id,
                                }),
                            }
                        })
                        .collect();
                    (sids, Value::from(values))
                }
            };
            let (sids, value) = value;
            next.insert(name.clone(), (list.to_vec(), sids, value.clone()));
            services.insert(name.clone(), value);
            routed_lists.push((name, routed));
        }
        self.cached = next;
        let routes = self.routes(&routed_lists, vars);
        let mut ctx = Context::new();
        ctx.insert_value("services", Value::from(services));
        ctx.insert("unrouted", &unrouted);
        ctx.insert("nodes", &snapshot.nodes);
        ctx.insert("kv", &snapshot.kv);
        ctx.insert("vars", vars);
        ctx.insert("routes", &routes);
        ctx
    }

    /// The route conflicts of the last render (`routes::Conflict`).
    pub(crate) fn conflicts(&self) -> &[routes::Conflict] {
        &self.conflicts
    }

    /// The conflicts the last render found that the one before did not.
    pub(crate) fn fresh_conflicts(&self) -> &[routes::Conflict] {
        &self.fresh
    }

    /// Route ownership for `routes` in the context (`watcher::routes`): the
    /// `<service>.<domain>` hosts use `vars.domain`; a service may listen only on a port
    /// `vars.listen_ports` opens and the template does not bind itself (`http_bind`,
    /// `https_bind`, `sni_bind`, `stats_bind`). A conflict is logged once, when it
    /// appears.
    fn routes(
        &mut self,
        routed: &[(&str, Cow<[Arc<Instance>]>)],
        vars: &toml::Table,
    ) -> routes::Routes {
        let domain = vars
            .get("domain")
            .and_then(|v| v.as_str())
            .unwrap_or("localhost")
            .to_ascii_lowercase();
        let reserved: Vec<u16> = [
            ("http_bind", "*:80"),
            ("https_bind", ""),
            ("sni_bind", ""),
            ("stats_bind", "127.0.0.1:8404"),
        ]
        .iter()
        .filter_map(|(var, default)| {
            let bind = vars.get(*var).and_then(|v| v.as_str()).unwrap_or(default);
            bind.rsplit_once(':')?.1.parse().ok()
        })
        .collect();
        let ports = routes::ListenPorts {
            reserved,
            open: listen_ports(vars),
        };
        let routes = routes::resolve(routed.iter().map(|(n, l)| (*n, &**l)), &domain, &ports);
        self.fresh = routes
            .conflicts
            .iter()
            .filter(|c| !self.conflicts.contains(c))
            .cloned()
            .collect();
        for c in &self.fresh {
            tracing::warn!(service = %c.service, "{c}");
        }
        self.conflicts = routes.conflicts.clone();
        routes
    }
}

/// `vars.listen_ports`: ports (`5432`) and ranges (`"6000-6100"`) services may listen
/// on; anything else in the list is ignored with a warning. Missing: none.
fn listen_ports(vars: &toml::Table) -> Vec<(u16, u16)> {
    let Some(list) = vars.get("listen_ports") else {
        return Vec::new();
    };
    let items = list
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(std::slice::from_ref(list));
    let mut out = Vec::new();
    for item in items {
        let range = match item {
            toml::Value::Integer(n) => u16::try_from(*n).ok().map(|p| (p, p)),
            toml::Value::String(s) => s
                .split_once('-')
                .and_then(|(lo, hi)| Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))),
            _ => None,
        };
        match range {
            Some((lo, hi)) if lo >= 1 && lo <= hi => out.push((lo, hi)),
            _ => tracing::warn!(
                key = "template.vars.listen_ports",
                "{item} is not a port or a range like \"6000-6100\": ignored"
            ),
        }
    }
    out
}

/// Longest value `haproxy_arg` passes: a config argument, not a document.
const MAX_ARG: usize = 256;

/// `value` made safe as one argument of one HAProxy config line: only
/// `[A-Za-z0-9_.:/@%+=,*~\[\]-]` and spaces pass, and a value with spaces is
/// double-quoted (none of the characters HAProxy treats specially inside quotes —
/// `\`, `$`, `"`, `'` — can occur). Empty stays empty (there is nothing to paste, and
/// templates test for it). Err: the rule broken.
pub fn haproxy_arg(value: &str) -> Result<Cow<'_, str>, String> {
    if value.len() > MAX_ARG {
        return Err(format!("the value is longer than {MAX_ARG} bytes"));
    }
    // `%[expr]` is a sample expression wherever HAProxy takes a log-format string
    // (`%[env(NAME)]` reads its environment): never a plain value.
    if value.contains("%[") {
        return Err(
            "\"%[\" is not allowed: HAProxy would evaluate it as a sample expression".into(),
        );
    }
    let ok = |c: char| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '_' | '.'
                    | ':'
                    | '/'
                    | '@'
                    | '%'
                    | '+'
                    | '='
                    | ','
                    | '*'
                    | '~'
                    | '['
                    | ']'
                    | '-'
                    | ' '
            )
    };
    if let Some(bad) = value.chars().find(|c| !ok(*c)) {
        return Err(format!(
            "{bad:?} is not allowed: values must match [A-Za-z0-9_.:/@%+=,*~[] -]"
        ));
    }
    if value.contains(' ') {
        Ok(Cow::Owned(format!("\"{value}\"")))
    } else {
        Ok(Cow::Borrowed(value))
    }
}

/// The `haproxy_arg` filter: `{{ kv.maxconn | haproxy_arg }}`. A refused value renders
/// as nothing, with a warning naming the `kv` path(s) holding it.
fn haproxy_arg_filter(value: Value, _: Kwargs, state: &State) -> Value {
    let text = match value.as_str() {
        Some(s) => s.to_string(),
        None if value.is_number() || value.as_bool().is_some() => value.to_string(),
        None => String::new(),
    };
    match haproxy_arg(&text) {
        Ok(arg) => Value::from(arg.into_owned()),
        Err(rule) => {
            let paths: Vec<String> = state
                .get::<Value>("kv")
                .ok()
                .flatten()
                .and_then(|kv| {
                    kv.as_map().map(|m| {
                        m.iter()
                            .filter(|(_, v)| v.as_str() == Some(text.as_str()))
                            .map(|(k, _)| format!("config/{k}"))
                            .collect()
                    })
                })
                .unwrap_or_default();
            let key = if paths.is_empty() {
                "(not a kv value)".to_string()
            } else {
                paths.join(", ")
            };
            tracing::warn!(
                key = %key,
                "haproxy_arg refused {text:?}, rendered as nothing: {rule}"
            );
            Value::from("")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::decode_instance;

    fn snap(instances: &[(&str, &str, &str)]) -> StoreSnapshot {
        let mut s = StoreSnapshot::default();
        for (svc, id, addr) in instances {
            let i = decode_instance("k", svc, id, addr.as_bytes()).unwrap();
            s.services
                .entry(svc.to_string())
                .or_default()
                .push(std::sync::Arc::new(i));
        }
        for v in s.services.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        s
    }

    #[test]
    fn reused_instance_values_render_what_fresh_ones_do() {
        let t = Template::compile("t", TPL).unwrap();
        let vars = toml::Table::new();
        let mut cache = InstanceValues::default();
        let first = snap(&[
            ("web", "a", "10.0.0.1:80"),
            ("web", "b", "10.0.0.2:80"),
            ("api", "c", "10.0.0.3:80"),
        ]);
        assert_eq!(
            t.render(&cache.context(&first, &vars)).unwrap(),
            t.render(&context(&first, &vars)).unwrap()
        );
        // b changes, c goes, d comes; a is the same allocation as before.
        let mut next = snap(&[("web", "b", "10.0.0.9:80"), ("db", "d", "10.0.0.4:80")]);
        let web = next.services.get_mut("web").unwrap();
        web.insert(0, first.services["web"][0].clone());
        let cached = t.render(&cache.context(&next, &vars)).unwrap();
        assert_eq!(cached, t.render(&context(&next, &vars)).unwrap());
        assert!(cached.contains("server b 10.0.0.9:80") && !cached.contains(" c "));
        let mut kept: Vec<&String> = cache.cached.keys().collect();
        kept.sort();
        assert_eq!(
            kept,
            ["db", "web"],
            "only what the last snapshot holds is kept"
        );
        // Nothing changed since: the whole lists are reused, the output is the same.
        assert_eq!(t.render(&cache.context(&next, &vars)).unwrap(), cached);
    }

    /// Every server carries `server_id`: the stable id its line renders, the same from
    /// a fresh context and a reused one, whatever else joins the backend.
    #[test]
    fn server_ids_are_stable_and_reach_the_template() {
        let t = Template::compile(
            "t",
            "{% for i in services.web %}{{ i.id }}={{ i.server_id }} {% endfor %}",
        )
        .unwrap();
        let vars = toml::Table::new();
        let one = snap(&[("web", "a", "10.0.0.1:80")]);
        let a = server_ids::preferred("a");
        assert_eq!(t.render(&context(&one, &vars)).unwrap(), format!("a={a} "));
        let mut cache = InstanceValues::default();
        cache.context(&one, &vars);
        let mut two = snap(&[("web", "b", "10.0.0.2:80")]);
        two.services
            .get_mut("web")
            .unwrap()
            .insert(0, one.services["web"][0].clone());
        let b = server_ids::preferred("b");
        let want = format!("a={a} b={b} ");
        assert_eq!(t.render(&cache.context(&two, &vars)).unwrap(), want);
        assert_eq!(t.render(&context(&two, &vars)).unwrap(), want);
        let shipped =
            Template::compile("d", include_str!("../../templates/haproxy.cfg.tera")).unwrap();
        let out = shipped.render(&context(&two, &vars)).unwrap();
        assert!(
            out.contains(&format!("server a 10.0.0.1:80 id {a} weight 100 check")),
            "{out}"
        );
    }

    const TPL: &str = "{% for name, instances in services %}backend {{ name }}\n\
{% for i in instances %}  server {{ i.id }} {{ i.addr }} weight {{ i.weight }}\n{% endfor %}\
{% endfor %}domain {{ vars.domain | default(value=\"localhost\") }}\n";

    /// `route = false` (a `[[service]]` such as a host's etcd peers) is never routed:
    /// not in `services`, so no template renders it unless it reads `unrouted`.
    #[test]
    fn unrouted_instances_are_left_out_of_services() {
        let mut s = snap(&[("web", "a", "10.0.0.1:80")]);
        for (svc, id, addr, route) in [
            ("etcd-peers", "p1", "10.0.0.7:2380", false),
            ("web", "b", "10.0.0.8:2380", false),
            ("web", "c", "10.0.0.9:80", true),
        ] {
            let mut i = decode_instance("k", svc, id, addr.as_bytes()).unwrap();
            i.route = route;
            s.services
                .entry(svc.into())
                .or_default()
                .push(std::sync::Arc::new(i));
        }
        // An emptied service that linger keeps (no instance at all) keeps its backend.
        s.services.insert("lingering".into(), Vec::new());
        let vars = toml::Table::new();
        let plain = Template::compile("t", TPL).unwrap();
        for out in [
            plain.render(&context(&s, &vars)).unwrap(),
            plain
                .render(&InstanceValues::default().context(&s, &vars))
                .unwrap(),
        ] {
            assert!(
                !out.contains("etcd-peers") && !out.contains("server b "),
                "{out}"
            );
            assert!(
                out.contains("server a ") && out.contains("server c "),
                "{out}"
            );
            assert!(out.contains("backend lingering"), "{out}");
        }
        let default =
            Template::compile("d", include_str!("../../templates/haproxy.cfg.tera")).unwrap();
        let mut v = toml::Table::new();
        v.insert("domain".into(), "example.com".into());
        let out = default.render(&context(&s, &v)).unwrap();
        assert!(
            !out.contains("etcd-peers") && !out.contains(":2380"),
            "{out}"
        );
        let tcp =
            Template::compile("t", include_str!("../../templates/haproxy-tcp.cfg.tera")).unwrap();
        let mut v = toml::Table::new();
        let mut ports = toml::Table::new();
        ports.insert("etcd-peers".into(), 2380.into());
        v.insert("tcp_ports".into(), ports.into());
        let out = tcp.render(&context(&s, &v)).unwrap();
        // The listener the operator named stays; no server behind it.
        assert!(!out.contains("10.0.0.7:2380"), "{out}");
        let listed = Template::compile(
            "u",
            "{% for name, l in unrouted %}{{ name }}={% for i in l %}{{ i.addr }} {% endfor %};{% endfor %}",
        )
        .unwrap();
        assert_eq!(
            listed.render(&context(&s, &vars)).unwrap(),
            "etcd-peers=10.0.0.7:2380 ;web=10.0.0.8:2380 ;"
        );
    }

    #[test]
    fn renders_sorted_and_deterministic() {
        let t = Template::compile("t.tera", TPL).unwrap();
        let mut services = Vec::new();
        for n in 0..40 {
            services.push((
                format!("svc{n:02}"),
                format!("i{n}"),
                format!("10.0.0.{n}:80"),
            ));
        }
        let s = snap(
            &services
                .iter()
                .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
                .collect::<Vec<_>>(),
        );
        let vars = toml::Table::new();
        let a = t.render(&context(&s, &vars)).unwrap();
        for _ in 0..5 {
            assert_eq!(a, t.render(&context(&s, &vars)).unwrap());
        }
        let first = a.find("backend svc00").unwrap();
        let last = a.find("backend svc39").unwrap();
        assert!(first < last, "services render in name order");
        assert!(a.ends_with("domain localhost\n"));
    }

    #[test]
    fn vars_reach_the_template_and_nothing_is_escaped() {
        let t = Template::compile("t.tera", "{{ vars.domain }} {{ vars.s }}").unwrap();
        let vars: toml::Table =
            toml::from_str("domain = \"example.org\"\ns = \"a<b & 'c'\"").unwrap();
        let out = t
            .render(&context(&StoreSnapshot::default(), &vars))
            .unwrap();
        assert_eq!(out, "example.org a<b & 'c'");
    }

    #[test]
    fn haproxy_arg_passes_plain_values_quotes_spaces_and_refuses_the_rest() {
        assert_eq!(haproxy_arg("4096").unwrap(), "4096");
        assert_eq!(haproxy_arg("*:80").unwrap(), "*:80");
        assert_eq!(haproxy_arg("[::]:443").unwrap(), "[::]:443");
        assert_eq!(haproxy_arg("/healthz").unwrap(), "/healthz");
        assert_eq!(haproxy_arg("front door").unwrap(), "\"front door\"");
        for bad in [
            "x\n    bind :9999",
            "x\r",
            "a#b",
            "a\tb",
            "\"q\"",
            "'q'",
            "${HOME}",
            "a\\b",
            "é",
            "\u{7}",
        ] {
            assert!(haproxy_arg(bad).is_err(), "{bad:?}");
        }
        assert!(haproxy_arg(&"a".repeat(MAX_ARG + 1)).is_err());
        assert_eq!(haproxy_arg("").unwrap(), "", "nothing to paste, no warning");
    }

    /// `%[env(...)]`, `%[req.hdr(x)]`: in a log-format or `http-response set-header`
    /// argument HAProxy evaluates sample expressions, reading its environment (where
    /// secrets live) or the request. A `config/` value must not smuggle one in.
    #[test]
    fn haproxy_arg_refuses_sample_expressions() {
        for bad in ["%[env(ETCD_PASSWORD)]", "x%[src]", "%[", "a %[ b"] {
            let err = haproxy_arg(bad).unwrap_err();
            assert!(err.contains("%["), "{bad}: {err}");
        }
        // A lone % (percent-encoded paths, "50%") is still a plain value.
        assert_eq!(haproxy_arg("/a%20b").unwrap(), "/a%20b");
        assert_eq!(haproxy_arg("[::1]:80").unwrap(), "[::1]:80");
    }

    #[test]
    fn the_filter_renders_a_refused_kv_value_as_nothing() {
        let t = Template::compile(
            "t.tera",
            "global\n    maxconn {{ kv.maxconn | haproxy_arg }}\n    description {{ kv.d | haproxy_arg }}\n    n {{ vars.n | haproxy_arg }}\n",
        )
        .unwrap();
        let mut s = StoreSnapshot::default();
        s.kv.insert("maxconn".into(), "x\n    bind :9999".into());
        s.kv.insert("d".into(), "edge lb".into());
        let vars: toml::Table = toml::from_str("n = 3").unwrap();
        let out = t.render(&context(&s, &vars)).unwrap();
        assert_eq!(
            out,
            "global\n    maxconn \n    description \"edge lb\"\n    n 3\n"
        );
        // The pattern the shipped templates document, on a key that is not there.
        let t = Template::compile(
            "t.tera",
            "{%- set m = kv.nope | haproxy_arg %}{% if m %}maxconn {{ m }}{% endif %}.",
        )
        .unwrap();
        assert_eq!(t.render(&context(&s, &vars)).unwrap(), ".");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err =
            Template::compile("/etc/t/haproxy.cfg.tera", "line one\n{% for x in %}\n").unwrap_err();
        let message = &err.message;
        assert!(message.contains("/etc/t/haproxy.cfg.tera:2:"), "{message}");
    }

    #[test]
    fn render_error_names_file_and_line() {
        let t = Template::compile("t.tera", "ok\n{{ nope.field }}\n").unwrap();
        let err = t
            .render(&context(&StoreSnapshot::default(), &toml::Table::new()))
            .unwrap_err();
        assert!(err.message.contains("t.tera:2:"), "{}", err.message);
    }

    fn draining_snapshot() -> StoreSnapshot {
        let mut s = snap(&[("web", "a", "10.0.0.1:80"), ("web", "b", "10.0.0.2:80")]);
        let b = s.services.get_mut("web").unwrap();
        let mut stopping = (*b[1]).clone();
        stopping.draining = true;
        b[1] = std::sync::Arc::new(stopping);
        s
    }

    #[test]
    fn a_template_that_ignores_draining_never_sees_a_draining_instance() {
        let old = "{# a template from before drain #}{% for i in services.web %}server {{ i.id }} {{ i.addr }}\n{% endfor %}";
        let t = Template::compile("old.tera", old).unwrap();
        assert!(!t.sees_draining());
        let mut values = InstanceValues::default();
        let ctx = values.context_for(&draining_snapshot(), &toml::Table::new(), t.sees_draining());
        assert_eq!(t.render(&ctx).unwrap(), "server a 10.0.0.1:80\n");
        // A comment that merely says the word does not count as asking.
        let commented = "{# draining? #}{% for i in services.web %}{{ i.id }} {% endfor %}";
        assert!(!Template::compile("c.tera", commented)
            .unwrap()
            .sees_draining());
    }

    #[test]
    fn a_template_that_mentions_draining_decides_itself() {
        let src = "{% for i in services.web %}{{ i.id }}{% if i.draining %} disabled{% endif %}\n{% endfor %}";
        let t = Template::compile("new.tera", src).unwrap();
        assert!(t.sees_draining());
        let mut values = InstanceValues::default();
        let ctx = values.context_for(&draining_snapshot(), &toml::Table::new(), t.sees_draining());
        assert_eq!(t.render(&ctx).unwrap(), "a\nb disabled\n");
        let shipped = std::fs::read_to_string("templates/haproxy.cfg.tera").unwrap();
        assert!(Template::compile("shipped", &shipped)
            .unwrap()
            .sees_draining());
        let tcp = std::fs::read_to_string("templates/haproxy-tcp.cfg.tera").unwrap();
        assert!(Template::compile("tcp", &tcp).unwrap().sees_draining());
    }

    #[test]
    fn a_service_whose_every_instance_drains_stays_empty_for_a_template_that_ignores_it() {
        let mut s = draining_snapshot();
        for i in s.services.get_mut("web").unwrap() {
            let mut d = (**i).clone();
            d.draining = true;
            *i = std::sync::Arc::new(d);
        }
        let t = Template::compile(
            "x",
            "{% for n, l in services %}{{ n }}={{ l | length }}{% endfor %}",
        )
        .unwrap();
        let ctx = InstanceValues::default().context_for(&s, &toml::Table::new(), false);
        assert_eq!(t.render(&ctx).unwrap(), "web=0");
    }
}
