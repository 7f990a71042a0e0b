//! The folder HAProxy reads the served certificates from (`[watcher] certs_dir`): the
//! watcher's own, 0700, each file 0600 and written whole (staged beside, fsynced,
//! renamed), so a reload never reads half a key.
//!
//! - `<name>.pem`: a served certificate, chain then key (what `crt` takes);
//! - `crt-list`: one line per served certificate, `<file> <domain>…` (SNI filters);
//! - `hosts`: the host names the served certificates cover, one a line (an ACL file:
//!   the default template redirects HTTP to HTTPS for these);
//! - `default.pem`: a self-signed certificate made at the first start and kept, the one
//!   HAProxy answers with when no served one matches (and the one that lets it start
//!   before any exists).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::served::Entry;

pub(crate) const CRT_LIST: &str = "crt-list";
pub(crate) const HOSTS: &str = "hosts";
pub(crate) const DEFAULT: &str = "default.pem";

#[derive(Debug, Clone)]
pub(crate) struct Dir {
    pub(crate) path: PathBuf,
}

impl Dir {
    /// The folder, created 0700 if missing (and made 0700 if it is not), with a default
    /// certificate in it.
    pub(crate) fn prepare(path: &Path) -> std::io::Result<Dir> {
        std::fs::create_dir_all(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        let dir = Dir {
            path: path.to_path_buf(),
        };
        let default = dir.path.join(DEFAULT);
        let usable = std::fs::read_to_string(&default)
            .map(|t| t.contains("PRIVATE KEY") && t.contains("CERTIFICATE"))
            .unwrap_or(false);
        if !usable {
            let (cert, key) = crate::certs::self_signed(&["portolan.invalid"]).map_err(|e| {
                std::io::Error::other(format!("cannot make the default certificate: {e}"))
            })?;
            write_whole(&default, format!("{cert}{key}").as_bytes())?;
        }
        for f in [CRT_LIST, HOSTS] {
            if !dir.path.join(f).exists() {
                write_whole(&dir.path.join(f), b"")?;
            }
        }
        Ok(dir)
    }

    pub(crate) fn crt_list(&self) -> PathBuf {
        self.path.join(CRT_LIST)
    }

    pub(crate) fn hosts(&self) -> PathBuf {
        self.path.join(HOSTS)
    }

    pub(crate) fn default_cert(&self) -> PathBuf {
        self.path.join(DEFAULT)
    }

    /// The etcd values of the certificates served when the folder was last synced
    /// (`<name>.json`), so a restarted watcher keeps serving a name's last good one
    /// while etcd holds a bad one. Unreadable files are skipped: judged again anyway.
    pub(crate) fn saved(&self) -> std::collections::BTreeMap<String, std::sync::Arc<[u8]>> {
        let mut out = std::collections::BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return out;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if let Ok(bytes) = std::fs::read(entry.path()) {
                out.insert(name.to_string(), bytes.into());
            }
        }
        out
    }

    /// The file of certificate `name` (a valid name: no slash, no dot first).
    pub(crate) fn cert(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.pem"))
    }

    /// Makes the folder hold exactly `served`: changed certificates rewritten, those no
    /// longer served removed, the crt-list and hosts files rewritten when they differ.
    pub(crate) fn sync<'a>(
        &self,
        served: impl Iterator<Item = (&'a String, &'a Entry)> + Clone,
    ) -> std::io::Result<()> {
        let mut keep = BTreeSet::new();
        for (name, e) in served.clone() {
            let path = self.cert(name);
            let pem = e.cert.pem();
            keep.insert(format!("{name}.pem"));
            if std::fs::read(&path).ok().as_deref() != Some(pem.as_bytes()) {
                write_whole(&path, pem.as_bytes())?;
            }
            keep.insert(format!("{name}.json"));
            replace_if_changed(&self.path.join(format!("{name}.json")), &e.bytes)?;
        }
        replace_if_changed(&self.crt_list(), crt_list(self, served.clone()).as_bytes())?;
        replace_if_changed(&self.hosts(), hosts(served).as_bytes())?;
        for entry in std::fs::read_dir(&self.path)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".pem") || name.ends_with(".json");
            if ours && name != DEFAULT && !keep.contains(&name) {
                std::fs::remove_file(self.path.join(&name))?;
            }
        }
        Ok(())
    }
}

/// The crt-list line of one served certificate: its file, then its domains as SNI
/// filters.
pub(crate) fn crt_list_line(dir: &Dir, name: &str, e: &Entry) -> String {
    let mut line = dir.cert(name).display().to_string();
    for d in &e.cert.record.domains {
        line.push(' ');
        line.push_str(&d.to_ascii_lowercase());
    }
    line
}

fn crt_list<'a>(dir: &Dir, served: impl Iterator<Item = (&'a String, &'a Entry)>) -> String {
    served
        .map(|(n, e)| crt_list_line(dir, n, e) + "\n")
        .collect()
}

/// Every host name a served certificate covers, lower case, sorted.
pub(crate) fn host_set<'a>(
    served: impl Iterator<Item = (&'a String, &'a Entry)>,
) -> BTreeSet<String> {
    served
        .flat_map(|(_, e)| {
            e.cert
                .record
                .domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        })
        .collect()
}

fn hosts<'a>(served: impl Iterator<Item = (&'a String, &'a Entry)>) -> String {
    host_set(served).into_iter().map(|h| h + "\n").collect()
}

fn replace_if_changed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(());
    }
    write_whole(path, bytes)
}

/// Stage beside `path` (0600), fsync, rename over it, fsync the folder.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = dir.join(format!(".{name}.portolan.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staged)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&staged, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use super::super::served::test_entry as entry;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_folder_is_private_and_holds_exactly_what_is_served() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("certs");
        let dir = Dir::prepare(&path).unwrap();
        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&dir.default_cert()), 0o600);
        let default = std::fs::read(dir.default_cert()).unwrap();
        // The default certificate is kept across restarts.
        let dir = Dir::prepare(&path).unwrap();
        assert_eq!(std::fs::read(dir.default_cert()).unwrap(), default);

        let mut served = BTreeMap::new();
        served.insert("a".to_string(), entry(&["a.example", "*.b.example"]));
        served.insert("c".to_string(), entry(&["c.example"]));
        dir.sync(served.iter()).unwrap();
        assert_eq!(mode(&dir.cert("a")), 0o600);
        assert_eq!(mode(&dir.path.join("a.json")), 0o600);
        assert_eq!(dir.saved().keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(dir.saved()["a"], served["a"].bytes);
        let list = std::fs::read_to_string(dir.crt_list()).unwrap();
        assert_eq!(
            list,
            format!(
                "{} a.example *.b.example\n{} c.example\n",
                dir.cert("a").display(),
                dir.cert("c").display()
            )
        );
        assert_eq!(
            std::fs::read_to_string(dir.hosts()).unwrap(),
            "*.b.example\na.example\nc.example\n"
        );
        served.remove("a");
        dir.sync(served.iter()).unwrap();
        assert!(!dir.cert("a").exists());
        assert!(!dir.path.join("a.json").exists());
        assert!(dir.default_cert().exists());
        assert_eq!(std::fs::read_to_string(dir.hosts()).unwrap(), "c.example\n");
    }
}
