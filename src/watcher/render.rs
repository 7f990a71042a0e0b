//! Templates: compile (tera 2) and render from a snapshot. Pure apart from nothing: the
//! caller reads the template file and hands over its text.
//!
//! The context is `services`, `nodes`, `kv` (see `store::StoreSnapshot`) and `vars` (the
//! resource's `vars` table from the config file). Tera is built with `preserve_order`,
//! so maps iterate in the sorted order the snapshot's `BTreeMap`s give them: equal
//! state renders byte-identical output.

use tera::{Context, Tera};

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
        tera.add_raw_template(name, source)
            .map_err(|e| TemplateError {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Template {
            name: name.to_string(),
            tera,
        })
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

/// The tera context for one resource.
pub fn context(snapshot: &StoreSnapshot, vars: &toml::Table) -> Context {
    let mut ctx = Context::new();
    ctx.insert("services", &snapshot.services);
    ctx.insert("nodes", &snapshot.nodes);
    ctx.insert("kv", &snapshot.kv);
    ctx.insert("vars", vars);
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::decode_instance;

    fn snap(instances: &[(&str, &str, &str)]) -> StoreSnapshot {
        let mut s = StoreSnapshot::default();
        for (svc, id, addr) in instances {
            let i = decode_instance("k", svc, id, addr.as_bytes()).unwrap();
            s.services.entry(svc.to_string()).or_default().push(i);
        }
        for v in s.services.values_mut() {
            v.sort_by(|a, b| a.id.cmp(&b.id));
        }
        s
    }

    const TPL: &str = "{% for name, instances in services %}backend {{ name }}\n\
{% for i in instances %}  server {{ i.id }} {{ i.addr }} weight {{ i.weight }}\n{% endfor %}\
{% endfor %}domain {{ vars.domain | default(value=\"localhost\") }}\n";

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
    fn syntax_error_names_file_and_line() {
        let err =
            Template::compile("/etc/t/haproxy.cfg.tera", "line one\n{% for x in %}\n").unwrap_err();
        assert!(
            err.message.contains("/etc/t/haproxy.cfg.tera:2:"),
            "{}",
            err.message
        );
    }

    #[test]
    fn render_error_names_file_and_line() {
        let t = Template::compile("t.tera", "ok\n{{ nope.field }}\n").unwrap();
        let err = t
            .render(&context(&StoreSnapshot::default(), &toml::Table::new()))
            .unwrap_err();
        assert!(err.message.contains("t.tera:2:"), "{}", err.message);
    }
}
