//! Ops files are first-class: the systemd units pass `systemd-analyze verify` and an
//! offline security review, they call the CLI as it parses, the HAProxy drop-in really
//! gives the watcher a master socket, the Vagrantfile validates, every shell script
//! passes shellcheck, and the Debian package holds what it should.
//!
//! No systemd runs as PID 1 here and /usr/bin/portolan is not installed, so the units
//! are checked inside a throwaway image directory (`--root`): the host's stock units
//! (for targets and haproxy.service), the built binary where ExecStart points, and the
//! units where the package puts them.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use clap::Parser;
use common::*;
use portolan::cli::{Cli, Command as Sub};
use portolan::config::FileConfig;

const UNITS: [&str; 2] = ["portolan-registrar.service", "portolan-watcher.service"];
const DROP_IN: &str = "systemd/haproxy.service.d/portolan.conf";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd`, asserts it succeeded, returns stdout.
fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn copy_file(from: &Path, to: &Path) {
    fs::create_dir_all(to.parent().unwrap()).unwrap();
    fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A systemd unit file as (section, key, value) triples, in order.
fn parse_unit(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn values(unit: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    unit.iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn one(unit: &[(String, String, String)], section: &str, key: &str) -> String {
    let v = values(unit, section, key);
    assert_eq!(v.len(), 1, "[{section}] {key}= should appear once: {v:?}");
    v[0].clone()
}

fn words(unit: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    values(unit, section, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect()
}

/// A throwaway image directory laid out like an installed Debian system.
struct SystemdRoot {
    dir: tempfile::TempDir,
}

impl SystemdRoot {
    fn new() -> SystemdRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let host_units = Path::new("/lib/systemd/system");
        assert!(
            host_units.join("multi-user.target").exists(),
            "systemd's units are missing: apt-get install systemd (scripts/test-env.sh)"
        );
        assert!(
            host_units.join("haproxy.service").exists(),
            "haproxy.service is missing: apt-get install haproxy (scripts/test-env.sh)"
        );
        copy_dir(host_units, &root.join("usr/lib/systemd/system"));
        for (link, target) in [("lib", "usr/lib"), ("bin", "usr/bin"), ("sbin", "usr/sbin")] {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
        // Every binary an Exec line of the checked units names must exist in the image.
        copy_file(&portolan_bin(), &root.join("usr/bin/portolan"));
        copy_file(
            Path::new("/usr/sbin/haproxy"),
            &root.join("usr/sbin/haproxy"),
        );
        copy_file(Path::new("/bin/kill"), &root.join("usr/bin/kill"));
        // Where the package installs them.
        let units = root.join("usr/lib/systemd/system");
        for u in UNITS {
            copy_file(&repo().join("systemd").join(u), &units.join(u));
        }
        copy_file(
            &repo().join(DROP_IN),
            &units.join("haproxy.service.d/portolan.conf"),
        );
        SystemdRoot { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn analyze(&self, args: &[&str]) -> Output {
        // --man=no: verify would otherwise run `man` for every Documentation= page, and a
        // fresh machine has no man pages (haproxy.service names haproxy(1)).
        run(Command::new("systemd-analyze")
            .args(args)
            .arg("--man=no")
            .arg(format!("--root={}", self.path().display())))
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let root = SystemdRoot::new();
    let out = root.analyze(&[
        "verify",
        "portolan-registrar.service",
        "portolan-watcher.service",
        "haproxy.service",
    ]);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{}",
        text(&out.stderr)
    );
    // Unknown keys and bad values are only warnings to verify: allow none.
    assert_eq!(
        text(&out.stderr).trim(),
        "",
        "systemd-analyze verify warned"
    );

    // The same check sees a broken unit in this image: a bad value and a binary that
    // is not there.
    let broken = read("systemd/portolan-registrar.service")
        .replace("ProtectSystem=strict", "ProtectSystem=stricter")
        .replace(
            "ExecStart=/usr/bin/portolan ",
            "ExecStart=/usr/bin/portolan-missing ",
        );
    fs::write(
        root.path()
            .join("usr/lib/systemd/system/portolan-broken.service"),
        broken,
    )
    .unwrap();
    let out = root.analyze(&["verify", "portolan-broken.service"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "verify accepted a broken unit");
    assert!(stderr.contains("stricter"), "{stderr}");
    assert!(stderr.contains("/usr/bin/portolan-missing"), "{stderr}");
}

#[test]
fn units_pass_an_offline_security_review() {
    let root = SystemdRoot::new();
    // Exposure 0.0 (locked down) .. 10.0 (unsafe); "OK" is below 5. --threshold is x10.
    for (unit, max_exposure) in [
        ("portolan-registrar.service", 20),
        ("portolan-watcher.service", 25),
    ] {
        let out = root.analyze(&[
            "security",
            "--offline=true",
            &format!("--threshold={max_exposure}"),
            unit,
        ]);
        assert!(
            out.status.success(),
            "{unit}: exposure above {}:\n{}",
            max_exposure as f64 / 10.0,
            text(&out.stdout)
        );
        let out = root.analyze(&["security", "--offline=true", "--json=short", unit]);
        let checks: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("security --json");
        let set: BTreeMap<&str, bool> = checks
            .iter()
            .map(|c| {
                (
                    c["json_field"].as_str().unwrap(),
                    c["set"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        for field in [
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectKernelLogs",
            "ProtectControlGroups",
            "RestrictNamespaces_user",
            "RestrictSUIDSGID",
            "LockPersonality",
            "SystemCallArchitectures",
            "CapabilityBoundingSet_CAP_SYS_ADMIN",
            "CapabilityBoundingSet_CAP_SET_UID_GID_PCAP",
            "CapabilityBoundingSet_CAP_DAC_FOWNER_IPC_OWNER",
            "RestrictAddressFamilies_AF_PACKET",
        ] {
            assert_eq!(
                set.get(field),
                Some(&true),
                "{unit}: systemd's review says {field} is not locked down"
            );
        }
    }
}

#[test]
fn units_call_the_cli_as_it_parses() {
    for (unit_name, role) in [
        ("portolan-registrar.service", "registrar"),
        ("portolan-watcher.service", "watcher"),
    ] {
        let unit = parse_unit(&read(&format!("systemd/{unit_name}")));
        let config = format!("/etc/portolan/{role}.toml");

        // systemd 252 rejects Type=notify-reload; READY=1 comes from the main process.
        assert_eq!(one(&unit, "Service", "Type"), "notify", "{unit_name}");
        assert_eq!(one(&unit, "Service", "NotifyAccess"), "main", "{unit_name}");
        assert!(
            one(&unit, "Service", "WatchdogSec").ends_with('s'),
            "{unit_name}"
        );
        assert_eq!(
            one(&unit, "Service", "Restart"),
            "on-failure",
            "{unit_name}"
        );
        assert_eq!(
            one(&unit, "Install", "WantedBy"),
            "multi-user.target",
            "{unit_name}"
        );

        let pre = one(&unit, "Service", "ExecStartPre");
        let cli = Cli::try_parse_from(pre.split_whitespace())
            .unwrap_or_else(|e| panic!("{unit_name} ExecStartPre {pre:?}: {e}"));
        assert!(matches!(cli.command, Sub::Check), "{pre}");
        assert_eq!(cli.config.as_deref(), Some(Path::new(&config)), "{pre}");

        let start = one(&unit, "Service", "ExecStart");
        assert!(start.starts_with("/usr/bin/portolan "), "{start}");
        let cli = Cli::try_parse_from(start.split_whitespace())
            .unwrap_or_else(|e| panic!("{unit_name} ExecStart {start:?}: {e}"));
        match (role, &cli.command) {
            ("registrar", Sub::Registrar(_)) | ("watcher", Sub::Watcher(_)) => {}
            _ => panic!("{unit_name} starts {:?}", cli.command),
        }
        assert_eq!(cli.config.as_deref(), Some(Path::new(&config)), "{start}");

        for (key, expected) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectControlGroups", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(one(&unit, "Service", key), expected, "{unit_name} {key}");
        }
        let families = words(&unit, "Service", "RestrictAddressFamilies");
        for f in ["AF_UNIX", "AF_INET", "AF_INET6"] {
            assert!(families.iter().any(|x| x == f), "{unit_name}: {families:?}");
        }
    }

    let registrar = parse_unit(&read("systemd/portolan-registrar.service"));
    assert_eq!(one(&registrar, "Service", "User"), "portolan");
    assert_eq!(one(&registrar, "Service", "SupplementaryGroups"), "docker");
    assert!(words(&registrar, "Service", "ReadWritePaths").contains(&"/var/lib/portolan".into()));
    assert_eq!(one(&registrar, "Service", "StateDirectory"), "portolan");
    assert!(words(&registrar, "Unit", "After").contains(&"docker.service".into()));
    // The registrar's state dir in the example config is the one the unit may write.
    let reg_cfg = FileConfig::from_str(
        &read("systemd/etc/portolan/registrar.toml"),
        Path::new("registrar.toml"),
    )
    .expect("example registrar.toml parses");
    assert_eq!(
        reg_cfg.registrar.state_dir.as_deref(),
        Some(Path::new("/var/lib/portolan"))
    );

    let watcher = parse_unit(&read("systemd/portolan-watcher.service"));
    // Least privilege: the watcher is not root, and its user is the group HAProxy's
    // master socket is given to.
    assert_eq!(one(&watcher, "Service", "User"), "portolan-watcher");
    assert!(read(DROP_IN).contains(",group,portolan-watcher"));
    assert!(read("packaging/postinst").contains(
        "adduser --system --group --quiet --home /nonexistent --no-create-home portolan-watcher"
    ));
    assert!(words(&watcher, "Unit", "After").contains(&"haproxy.service".into()));
    assert!(words(&watcher, "Unit", "Wants").contains(&"haproxy.service".into()));
    // Every dest folder of the example config is writable under ProtectSystem=strict.
    let w_cfg = FileConfig::from_str(
        &read("systemd/etc/portolan/watcher.toml"),
        Path::new("watcher.toml"),
    )
    .expect("example watcher.toml parses");
    let writable = words(&watcher, "Service", "ReadWritePaths");
    assert!(!w_cfg.template.is_empty());
    for t in &w_cfg.template {
        let dir = t.dest.parent().unwrap().to_string_lossy().to_string();
        assert!(writable.contains(&dir), "{dir} not in {writable:?}");
        assert_eq!(
            t.src,
            Path::new("/usr/share/portolan/templates/haproxy.cfg.tera")
        );
        let check = t.check_cmd.as_deref().unwrap();
        assert!(check.contains("{src}"));
        // -q would hide HAProxy's reasons from the log, the reject hook and --dry-run.
        assert!(!check.contains(" -q"), "{check}");
        // The runtime API is on: the template opens the socket the watcher talks to.
        let admin = t
            .haproxy_admin_socket
            .as_deref()
            .expect("haproxy_admin_socket set");
        assert_eq!(
            t.vars.get("admin_socket").and_then(|v| v.as_str()),
            admin.to_str(),
            "the template's admin_socket is the watcher's haproxy_admin_socket"
        );
        assert_eq!(
            t.vars.get("admin_socket_group").and_then(|v| v.as_str()),
            Some("portolan-watcher")
        );
    }
    assert_eq!(w_cfg.watcher.listen.as_deref(), Some("127.0.0.1:9477"));
}

#[test]
fn example_registrar_config_passes_portolan_check() {
    let cfg = repo().join("systemd/etc/portolan/registrar.toml");
    let out = must(portolan_cmd().arg("check").arg("--config").arg(&cfg));
    assert_eq!(out.trim(), format!("{}: ok", cfg.display()));
    // And check really checks: an unknown key is refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("registrar.toml");
    fs::write(
        &bad,
        read("systemd/etc/portolan/registrar.toml").replace("ttl = 10", "tll = 10"),
    )
    .unwrap();
    let out = run(portolan_cmd().arg("check").arg("--config").arg(&bad));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("tll"), "{}", text(&out.stderr));
}

/// `check` validates every section a file has: a bad `[registrar]` value is refused
/// even when the file also has `[[template]]` resources, and the error names the section.
#[test]
fn check_validates_every_section_of_a_combined_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("t.tera"), "global\n").unwrap();
    let cfg = dir.path().join("both.toml");
    let write = |ttl: u64| {
        fs::write(
            &cfg,
            format!(
                "[registrar]\nttl = {ttl}\n\n[[template]]\nsrc = \"t.tera\"\ndest = \"out.cfg\"\n"
            ),
        )
        .unwrap()
    };
    write(0);
    let out = run(portolan_cmd().arg("check").arg("--config").arg(&cfg));
    assert!(!out.status.success(), "ttl = 0 passed check");
    let err = text(&out.stderr);
    assert!(
        err.contains("[registrar]") && err.contains("ttl 0"),
        "{err}"
    );
    write(10);
    let out = must(portolan_cmd().arg("check").arg("--config").arg(&cfg));
    assert_eq!(out.trim(), format!("{}: ok", cfg.display()));
}

/// The name of this process's group.
fn own_group() -> String {
    nix::unistd::Group::from_gid(nix::unistd::getegid())
        .ok()
        .flatten()
        .map(|g| g.name)
        .expect("the test's group has a name")
}

/// The drop-in's ExecStart, run for real (paths moved into a temp dir): HAProxy comes
/// up in master-worker mode with a root-only master socket that takes `reload` and
/// confirms it in `show proc`, which is what the watcher relies on.
#[tokio::test]
async fn haproxy_drop_in_gives_the_watcher_its_master_socket() {
    let unit = parse_unit(&read(DROP_IN));
    let starts = values(&unit, "Service", "ExecStart");
    assert_eq!(
        starts.len(),
        2,
        "ExecStart= must be reset, then set once: {starts:?}"
    );
    assert_eq!(starts[0], "", "the first ExecStart= clears Debian's");
    let exec = &starts[1];
    assert!(exec.starts_with("/usr/sbin/haproxy -Ws "), "{exec}");
    assert!(!exec.contains("$EXTRAOPTS"), "{exec}");

    // The socket the watcher's example config expects.
    let w_cfg = FileConfig::from_str(
        &read("systemd/etc/portolan/watcher.toml"),
        Path::new("watcher.toml"),
    )
    .unwrap();
    let socket = w_cfg.template[0]
        .haproxy_master_socket
        .clone()
        .expect("example sets haproxy_master_socket");
    assert!(
        exec.contains(&format!("-S {},", socket.display())),
        "{exec} vs {}",
        socket.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("haproxy.cfg");
    fs::write(
        &cfg,
        format!(
            "global\n  log stderr local0\ndefaults\n  mode http\n  timeout connect 1s\n  \
             timeout client 5s\n  timeout server 5s\nfrontend fe\n  bind 127.0.0.1:{port}\n  \
             http-request return status 200 content-type text/plain string up\n"
        ),
    )
    .unwrap();
    let sock = dir.path().join("master.sock");
    let line = exec
        .replace("$CONFIG", cfg.to_str().unwrap())
        .replace("$PIDFILE", dir.path().join("haproxy.pid").to_str().unwrap())
        .replace(socket.to_str().unwrap(), sock.to_str().unwrap())
        // The package creates portolan-watcher; this machine may not have it. The
        // test's own group stands in, and the socket must end up in it.
        .replace(
            ",group,portolan-watcher",
            &format!(",group,{}", own_group()),
        );
    let argv: Vec<&str> = line.split_whitespace().collect();
    let mut cmd = owned_command(argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut haproxy = Proc::spawn("haproxy", &mut cmd);

    async fn master(sock: &Path, command: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let talk = async {
            let mut s = tokio::net::UnixStream::connect(sock).await.ok()?;
            s.write_all(format!("{command}\n").as_bytes()).await.ok()?;
            // Half-close: the master CLI answers and hangs up once our side is done.
            s.shutdown().await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            Some(out)
        };
        tokio::time::timeout(Duration::from_secs(3), talk)
            .await
            .ok()
            .flatten()
    }
    fn reloads(show_proc: &str) -> Option<u32> {
        let master_line = show_proc.lines().find(|l| l.contains("master"))?;
        master_line.split_whitespace().nth(2)?.parse().ok()
    }

    wait_until(
        "the master socket to answer",
        Duration::from_secs(10),
        || async {
            master(&sock, "show proc")
                .await
                .is_some_and(|o| o.contains("worker"))
        },
    )
    .await;
    assert!(haproxy.alive());
    let meta = fs::metadata(&sock).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "master socket mode {mode:o}");
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&meta),
        nix::unistd::getegid().as_raw(),
        "the master socket belongs to the watcher's group"
    );
    let before = reloads(&master(&sock, "show proc").await.unwrap()).expect("reload count");
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(
        http_get(&addr, "x", "/")
            .await
            .map(|(s, b)| (s, b.trim().to_string())),
        Some((200, "up".to_string()))
    );

    master(&sock, "reload").await;
    wait_until(
        "show proc to count the reload",
        Duration::from_secs(10),
        || async {
            match master(&sock, "show proc").await {
                Some(o) => reloads(&o) == Some(before + 1) && o.contains("[failed: 0]"),
                None => false,
            }
        },
    )
    .await;
    assert_eq!(
        http_get(&addr, "x", "/").await.map(|(s, _)| s),
        Some(200),
        "serving after the reload"
    );
    haproxy.kill();
}

/// `vagrant validate` of the Vagrantfile in `cwd`, keeping Vagrant's own files
/// (VAGRANT_HOME, the .vagrant folder) in `scratch` rather than in the repository.
fn vagrant_validate(cwd: &Path, scratch: &Path) -> Command {
    let mut cmd = Command::new("vagrant");
    cmd.arg("validate")
        // Providers (VirtualBox, libvirt) cannot run here and need not: -p checks
        // everything but the provider blocks, offline.
        .arg("--ignore-provider")
        .env("VAGRANT_CWD", cwd)
        .env("VAGRANT_HOME", scratch.join("home"))
        .env("VAGRANT_DOTFILE_PATH", scratch.join("dot"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1")
        .env("VAGRANT_NO_COLOR", "1");
    cmd
}

#[test]
fn vagrant_validate_passes_offline() {
    let scratch = tempfile::tempdir().unwrap();
    let out = must(&mut vagrant_validate(
        &repo().join("vagrant"),
        scratch.path(),
    ));
    assert!(out.contains("Vagrantfile validated successfully."), "{out}");
    for machine in ["etcd-1", "etcd-2", "etcd-3", "docker-1", "docker-2", "lb-1"] {
        assert!(
            out.contains(&format!("==> {machine}:")),
            "{machine} missing:\n{out}"
        );
    }
    let vagrantfile = read("vagrant/Vagrantfile");
    for script in ["etcd.sh", "install-portolan.sh", "docker-host.sh", "lb.sh"] {
        assert!(
            vagrantfile.contains(&format!("provision/{script}")),
            "{script}"
        );
    }
    // The scripts install what this repository ships, from where it ships it (the
    // template comes from the watcher's work, the binary from `cargo build --release`).
    let install = read("vagrant/provision/install-portolan.sh");
    for shipped in [
        "systemd/portolan-registrar.service",
        "systemd/portolan-watcher.service",
        "systemd/haproxy.service.d/portolan.conf",
        "packaging/postinst",
    ] {
        assert!(install.contains(shipped), "install-portolan.sh: {shipped}");
        assert!(repo().join(shipped).exists(), "{shipped} does not exist");
    }
    for built in ["templates/haproxy.cfg.tera", "target/release/portolan"] {
        assert!(install.contains(built), "install-portolan.sh: {built}");
    }

    // validate really reads the provisioning: a missing script fails it.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("vagrant"), dir.path());
    fs::remove_file(dir.path().join("provision/lb.sh")).unwrap();
    let out = run(&mut vagrant_validate(dir.path(), scratch.path()));
    assert!(!out.status.success(), "validate passed without lb.sh");
    assert!(
        text(&out.stdout).contains("lb.sh") || text(&out.stderr).contains("lb.sh"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["vagrant/provision", "scripts", "packaging"] {
        for entry in fs::read_dir(repo().join(dir)).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".sh") || ["postinst", "prerm", "postrm"].contains(&name.as_str()) {
                files.push(p);
            }
        }
    }
    files.push(repo().join(".ci/run"));
    files.sort();
    assert!(files.len() >= 12, "{files:?}");
    let out = run(Command::new("shellcheck")
        .arg("--external-sources")
        .args(&files)
        .current_dir(repo()));
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // And shellcheck does find things.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.sh");
    fs::write(&bad, "#!/bin/sh\nrm -rf $1/*\n").unwrap();
    let out = run(Command::new("shellcheck").arg(&bad));
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("SC2086"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn debian_package_holds_binary_units_template_and_conffiles() {
    let out_dir = tempfile::tempdir().unwrap();
    let stdout = must(
        Command::new("bash")
            .arg(repo().join("packaging/build-deb.sh"))
            .arg("--bin")
            .arg(portolan_bin())
            .arg("--out")
            .arg(out_dir.path())
            // The test binary is large; xz would only cost time here.
            .args(["--compression", "gzip"]),
    );
    let version = env!("CARGO_PKG_VERSION");
    let arch = must(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();
    let deb = out_dir
        .path()
        .join(format!("portolan_{version}_{arch}.deb"));
    assert_eq!(stdout.trim(), deb.to_str().unwrap());

    let field = |name: &str| must(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "portolan");
    assert_eq!(field("Version").trim(), version);
    assert_eq!(field("Architecture").trim(), arch);
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>=") && depends.contains("adduser"),
        "{depends}"
    );

    let conffiles = must(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    );
    assert_eq!(
        conffiles,
        "/etc/portolan/registrar.toml\n/etc/portolan/watcher.toml\n"
    );
    let postinst = must(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("postinst"));
    assert!(postinst.contains("install -d -m 0750 -o portolan -g portolan /var/lib/portolan"));
    assert!(postinst.contains("adduser --system"));

    // Every file, with its mode and owner.
    let listing = must(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let entries: BTreeMap<String, (String, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[5].trim_start_matches('.').to_string(),
                (f[0].to_string(), f[1].to_string()),
            )
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/portolan", "-rwxr-xr-x"),
        (
            "/lib/systemd/system/portolan-registrar.service",
            "-rw-r--r--",
        ),
        ("/lib/systemd/system/portolan-watcher.service", "-rw-r--r--"),
        (
            "/lib/systemd/system/haproxy.service.d/portolan.conf",
            "-rw-r--r--",
        ),
        (
            "/usr/share/portolan/templates/haproxy.cfg.tera",
            "-rw-r--r--",
        ),
        ("/etc/portolan/registrar.toml", "-rw-r--r--"),
        ("/etc/portolan/watcher.toml", "-rw-r--r--"),
        ("/usr/share/doc/portolan/copyright", "-rw-r--r--"),
        ("/usr/share/man/man1/portolan.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/portolan-watcher.1.gz", "-rw-r--r--"),
        ("/usr/share/man/man1/portolan-registrar.1.gz", "-rw-r--r--"),
    ] {
        match entries.get(path) {
            Some((m, owner)) => {
                assert_eq!(m, mode, "{path}");
                assert_eq!(owner, "root/root", "{path}");
            }
            None => panic!("{path} is not in the package:\n{listing}"),
        }
    }

    // Unpacked: the binary runs, the units are the repository's, and the example
    // configs pass `portolan check` against the packaged template.
    let root = tempfile::tempdir().unwrap();
    must(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(root.path()),
    );
    let r = root.path();
    let v = must(Command::new(r.join("usr/bin/portolan")).arg("--version"));
    assert!(
        v.trim() == format!("portolan {version}")
            || v.trim().starts_with(&format!("portolan {version} (git ")),
        "{v}"
    );
    for u in UNITS {
        assert_eq!(
            fs::read_to_string(r.join("lib/systemd/system").join(u)).unwrap(),
            read(&format!("systemd/{u}"))
        );
    }
    assert_eq!(
        fs::read_to_string(r.join("usr/share/portolan/templates/haproxy.cfg.tera")).unwrap(),
        read("templates/haproxy.cfg.tera")
    );
    let in_root = |p: &str| r.join(p.trim_start_matches('/'));
    fs::create_dir_all(in_root("/etc/haproxy")).unwrap();
    let watcher_toml = fs::read_to_string(in_root("/etc/portolan/watcher.toml"))
        .unwrap()
        .replace(
            "\"/usr/share/portolan/",
            &format!("\"{}/", in_root("/usr/share/portolan").display()),
        )
        .replace(
            "\"/etc/haproxy/",
            &format!("\"{}/", in_root("/etc/haproxy").display()),
        );
    fs::write(in_root("/etc/portolan/watcher.toml"), watcher_toml).unwrap();
    for role in ["registrar", "watcher"] {
        let cfg = in_root(&format!("/etc/portolan/{role}.toml"));
        let out = must(
            Command::new(r.join("usr/bin/portolan"))
                .arg("check")
                .arg("--config")
                .arg(&cfg),
        );
        assert!(out.contains(": ok"), "{role}: {out}");
    }
}

/// The configs the provisioning writes are ones portolan accepts, and the load
/// balancer's template resource is the shipped example's.
#[test]
fn vagrant_provisioning_writes_valid_configs() {
    let lib = repo().join("vagrant/provision/lib.sh");
    let endpoints = "http://192.168.56.11:2379,http://192.168.56.12:2379,http://192.168.56.13:2379";
    let render = |call: &str| {
        must(
            Command::new("bash")
                .arg("-c")
                .arg(format!(". \"$0\"; {call}"))
                .arg(&lib),
        )
    };

    let dir = tempfile::tempdir().unwrap();
    let reg_path = dir.path().join("registrar.toml");
    fs::write(
        &reg_path,
        render(&format!(
            "registrar_toml docker-1 192.168.56.21 {endpoints}"
        )),
    )
    .unwrap();
    must(portolan_cmd().arg("check").arg("--config").arg(&reg_path));
    let reg = portolan::config::resolve_registrar(
        &FileConfig::load(Some(&reg_path)).unwrap(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(reg.node, "docker-1");
    assert_eq!(reg.advertise_ip, Some("192.168.56.21".parse().unwrap()));
    assert_eq!(reg.etcd.endpoints, endpoints.split(',').collect::<Vec<_>>());
    assert_eq!(reg.etcd.prefix, "/portolan");

    let lb = FileConfig::from_str(
        &render(&format!("watcher_toml lb-1 {endpoints}")),
        Path::new("watcher.toml"),
    )
    .expect("lb watcher.toml parses");
    let example = FileConfig::from_str(
        &read("systemd/etc/portolan/watcher.toml"),
        Path::new("watcher.toml"),
    )
    .unwrap();
    assert_eq!(lb.template, example.template);
    assert_eq!(lb.watcher.name.as_deref(), Some("lb-1"));
    assert_eq!(
        lb.etcd.endpoints,
        Some(endpoints.split(',').map(String::from).collect())
    );

    // The Vagrantfile hands the provisioning exactly these three etcd members.
    let vagrantfile = read("vagrant/Vagrantfile");
    for ip in ["192.168.56.11", "192.168.56.12", "192.168.56.13"] {
        assert!(vagrantfile.contains(&format!("\"{ip}\"")), "{ip}");
    }
}
