//! An HAProxy config file read into sections (pure): each section's header, its other
//! lines, and for backends its `server` lines by name — what the runtime planner
//! compares and `portolan status` reads.

use std::collections::BTreeMap;

/// Section keywords of HAProxy 2.6: a line starting with one opens a new section.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
];

/// One section: its header, its other lines (trimmed, comments and blank lines left
/// out: they do not change what HAProxy runs) and, for backends, its servers by name.
#[derive(Debug)]
pub(crate) struct Section<'a> {
    pub(crate) header: &'a str,
    pub(crate) lines: Vec<&'a str>,
    /// `server` lines of a `backend`/`listen` section, by name.
    pub(crate) servers: BTreeMap<&'a str, &'a str>,
    /// Index of the `defaults` section in force for this one.
    pub(crate) defaults: Option<usize>,
}

impl Section<'_> {
    pub(crate) fn kind(&self) -> &str {
        self.header.split_whitespace().next().unwrap_or("")
    }

    pub(crate) fn has_servers(&self) -> bool {
        matches!(self.kind(), "backend" | "listen")
    }

    /// Words after `keyword`, for every line starting with it, in file order.
    pub(crate) fn directives<'s>(
        &'s self,
        keyword: &'s str,
    ) -> impl Iterator<Item = Vec<&'s str>> + 's {
        self.lines.iter().filter_map(move |l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(keyword)).then(|| w.collect())
        })
    }
}

/// Splits a config into sections; the lines before the first section are section 0.
pub(crate) fn parse(text: &str) -> Result<Vec<Section<'_>>, String> {
    let mut sections: Vec<Section> = vec![Section {
        header: "",
        lines: Vec::new(),
        servers: BTreeMap::new(),
        defaults: None,
    }];
    let mut defaults = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if SECTIONS.contains(&first) {
            if first == "defaults" {
                defaults = Some(sections.len());
            }
            sections.push(Section {
                header: line,
                lines: Vec::new(),
                servers: BTreeMap::new(),
                defaults,
            });
            continue;
        }
        let Some(section) = sections.last_mut() else {
            continue;
        };
        if first == "server" && section.has_servers() {
            let name = line.split_whitespace().nth(1).unwrap_or("");
            if section.servers.insert(name, line).is_some() {
                return Err(format!(
                    "server {name} appears twice in `{}`",
                    section.header
                ));
            }
        } else {
            section.lines.push(line);
        }
    }
    Ok(sections)
}

/// The `server` lines of every backend (and listen) section of a config, by backend
/// and server name: what a file says HAProxy should run.
pub(crate) fn servers_by_backend(
    text: &str,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    Ok(parse(text)?
        .iter()
        .filter(|s| s.has_servers())
        .filter_map(|s| {
            let name = s.header.split_whitespace().nth(1)?;
            let servers = s
                .servers
                .iter()
                .map(|(n, l)| (n.to_string(), l.to_string()))
                .collect();
            Some((name.to_string(), servers))
        })
        .collect())
}
