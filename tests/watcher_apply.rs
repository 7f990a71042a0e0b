//! The watcher's apply path against what goes wrong around it: a lock another user
//! left, a watcher killed between an unconfirmed reload and a refused one, a file
//! refused again and again on the retry timer, an HAProxy master killed mid-reload.
//! Real etcd, real HAProxy, the real binary (or `watcher::run` in this process where a
//! hook receiver has to be handed in).
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::haproxy::{Backend, FrontDoor, Haproxy, HookReceiver, Options};
use common::*;

const T: Duration = Duration::from_secs(20);
/// `nobody` on Debian: the unprivileged user the lock test runs the watcher as.
const NOBODY: u32 = 65534;

/// A template with one line per instance, no HAProxy needed.
const PLAIN: &str =
    "# plain\n{% for name, instances in services %}{% for i in instances %}{{ name }} {{ i.addr }}\n{% endfor %}{% endfor %}";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `portolan <args>` as `nobody` (setpriv), every `PORTOLAN_*` of the test's own
/// environment removed; dies with the test (a uid change clears PDEATHSIG, so setpriv
/// sets it again after the switch).
fn as_nobody(args: &[&str]) -> std::process::Command {
    let mut cmd = owned_command("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--pdeathsig=KILL",
        "--",
    ])
    .arg(portolan_bin())
    .args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PORTOLAN_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A `render --once` run as root leaves a lock the non-root watcher cannot open. The
/// watcher must say which file, whose it is and what to do — and must not claim that
/// the last good file is back, since it touched nothing. Once the lock is gone it goes
/// on, and a later root `render --once` leaves the lock and `dest` usable by the
/// folder's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_left_by_root_is_refused_by_name_and_no_restore_is_claimed() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the watcher as nobody and needs root (run the suite as root)"
    );
    need("setpriv", "util-linux");
    let etcd = Etcd::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    // nobody must reach the folder through the temp dir.
    std::fs::set_permissions(root.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let dir = root.path().join("lb");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let prefix = unique_prefix("lock");
    let dest = dir.join("out.cfg");
    let lock = dir.join(".out.cfg.portolan.lock");
    write(&dir.join("t.tera"), PLAIN);
    let config = dir.join("watcher.toml");
    write(
        &config,
        &format!(
            r#"[etcd]
endpoints = ["{}"]
prefix = "{prefix}"

[watcher]
name = "{}"
wait = {{ min_ms = 20, max_ms = 200 }}
allowed_networks = ["127.0.0.0/8"]

[[template]]
src = "{}"
dest = "{}"
"#,
            etcd.endpoint(),
            unique("lb"),
            dir.join("t.tera").display(),
            dest.display()
        ),
    );
    etcd.put(
        &format!("{prefix}/services/web/a"),
        r#"{"addr":"127.0.0.1:1001"}"#,
    )
    .await;
    // What `render --once` as root left behind: a lock, owner root, mode 0600.
    write(&lock, "");
    std::fs::set_permissions(&lock, PermissionsExt::from_mode(0o600)).unwrap();

    let log_path = root.path().join("watcher.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = as_nobody(&["watcher", "--config", &config.display().to_string()]);
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _watcher = Proc::spawn("portolan watcher as nobody", &mut cmd);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let shown = lock.display().to_string();
    when(T, Duration::from_millis(20), || async {
        log().contains(&format!("cannot open the lock file {shown}"))
    })
    .await
    .unwrap_or_else(|| panic!("the watcher must name the lock it cannot open:\n{}", log()));
    let text = log();
    let line = text
        .lines()
        .find(|l| l.contains("cannot open the lock file"))
        .unwrap();
    assert!(
        line.contains("owner root") && line.contains("mode 0600"),
        "whose lock it is: {line}"
    );
    assert!(
        line.contains(&format!("chown nobody {shown}")) && line.contains(&format!("rm {shown}")),
        "what to do: {line}"
    );
    assert!(
        !text.contains("back in place"),
        "nothing was restored, so nothing may claim it:\n{text}"
    );
    assert!(!dest.exists(), "nothing written under a lock it never took");

    // Do as told: the watcher goes on, on its retry timer.
    std::fs::remove_file(&lock).unwrap();
    wait_until("dest written once the lock is gone", T, || async {
        std::fs::read_to_string(&dest).is_ok_and(|t| t.contains("web 127.0.0.1:1001"))
    })
    .await;

    // Root runs `render --once` again, with a change: the watcher is not wedged again.
    etcd.put(
        &format!("{prefix}/services/web/b"),
        r#"{"addr":"127.0.0.1:1002"}"#,
    )
    .await;
    let out = portolan_cmd()
        .args(["render", "--once", "--config"])
        .arg(&config)
        .output()
        .expect("render --once");
    assert!(
        out.status.success(),
        "render --once as root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (what, path) in [("the lock", &lock), ("dest", &dest)] {
        let md = std::fs::metadata(path).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (NOBODY, NOBODY),
            "{what} after a root render --once keeps the folder's owner"
        );
    }
    etcd.put(
        &format!("{prefix}/services/web/c"),
        r#"{"addr":"127.0.0.1:1003"}"#,
    )
    .await;
    wait_until("the watcher applies the next change", T, || async {
        std::fs::read_to_string(&dest).is_ok_and(|t| t.contains("web 127.0.0.1:1003"))
    })
    .await;
    // A readable lock of root's (0644, as older versions made it) does not wedge it
    // either: flock needs only a read-only open.
    std::os::unix::fs::chown(&lock, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&lock, PermissionsExt::from_mode(0o644)).unwrap();
    etcd.put(
        &format!("{prefix}/services/web/d"),
        r#"{"addr":"127.0.0.1:1004"}"#,
    )
    .await;
    wait_until("applied under root's readable lock", T, || async {
        std::fs::read_to_string(&dest).is_ok_and(|t| t.contains("web 127.0.0.1:1004"))
    })
    .await;
    let text = log();
    assert!(!text.contains("back in place"), "{text}");
}

/// The promise across a restart: a reload that was never confirmed, the watcher
/// SIGKILLed, then the next reload refused — `dest` must be the file HAProxy last
/// confirmed (kept in `<dest>.last-good`), not whatever the killed run left, and
/// `haproxy -W` must start on what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_refused_reload_puts_back_the_last_confirmed_file() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut fd = FrontDoor::prepare(
        &etcd,
        Options {
            reload_cmd: Some(String::new()),
            command_timeout_ms: 2000,
            ..Default::default()
        },
    )
    .await;
    // reload_cmd does what `mode` says: reload HAProxy, hang (never confirmed), refuse.
    let mode = fd.dir.path().join("mode");
    let script = fd.dir.path().join("reload.sh");
    write(
        &script,
        &format!(
            "case $(cat {mode}) in\n  ok) kill -USR2 {pid} ;;\n  hang) sleep 30 ;;\n  *) echo 'refused' >&2; exit 1 ;;\nesac\n",
            mode = mode.display(),
            pid = fd.haproxy.master_pid()
        ),
    );
    write(&mode, "ok");
    let cfg = std::fs::read_to_string(&fd.config).unwrap().replace(
        "reload_cmd = \"\"",
        &format!("reload_cmd = \"sh {}\"", script.display()),
    );
    write(&fd.config, &cfg);
    fd.start_watcher();
    fd.wait_for_first_reload().await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;
    let confirmed = std::fs::read(&fd.dest).unwrap();

    // v2's reload hangs: it stays at dest, unconfirmed.
    write(&mode, "hang");
    etcd.put(&fd.service_key("web", "b"), &b.record()).await;
    wait_until("v2's reload timed out", T, || async {
        fd.metric(r#"portolan_watcher_reloads_total{result="failed"}"#)
            .await
            >= Some(1.0)
    })
    .await;
    assert!(fd.dest_text().contains("server b "), "v2 kept at dest");
    fd.kill_watcher();

    // The next reload is refused.
    write(&mode, "refuse");
    fd.start_watcher();
    wait_until("the restarted watcher's reload refused", T, || async {
        fd.metric(r#"portolan_watcher_reloads_total{result="failed"}"#)
            .await
            >= Some(1.0)
    })
    .await;
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&fd.dest).unwrap()),
        String::from_utf8_lossy(&confirmed),
        "dest is the last confirmed file"
    );
    assert!(fd.log().contains("the last good file is back in place"));
    fd.kill_watcher();

    // HAProxy starts on what is left.
    fd.haproxy.kill();
    let sock = fd.dir.path().join("master2.sock");
    let _h = Haproxy::start(&fd.dest, &sock, &fd.dir.path().join("haproxy2.log")).await;
    wait_until("the fresh HAProxy routes web to a", T, || {
        fd.routes_to("web", "a")
    })
    .await;
}

/// A file that is refused (`reject`) or whose reload fails (`fail`) is retried on the
/// backoff timer, each time logged and counted — but its hook fires once, and again
/// only for a different file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_and_fail_hooks_fire_once_per_distinct_file_across_retries() {
    use portolan::config::{HookConfig, HookFormat, HookTarget};
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let receiver = HookReceiver::start().await;
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("certificate-present");
    write(&flag, "");
    let fd = FrontDoor::prepare(
        &etcd,
        Options {
            check_cmd: format!("test -e '{}' && haproxy -c -q -f {{src}}", flag.display()),
            template_extra: "\n{{ kv.extra | default(value=\"\") }}\n".into(),
            ..Default::default()
        },
    )
    .await;
    let file = portolan::config::FileConfig::load(Some(&fd.config)).expect("config");
    let mut cfg = portolan::config::resolve_watcher(&file, &Default::default()).expect("valid");
    cfg.hooks = vec![HookConfig {
        events: portolan::hook::WatcherEvent::ALL
            .map(portolan::hook::EventKind::from)
            .to_vec(),
        target: HookTarget::Url(receiver.url.clone()),
        format: HookFormat::Json,
        timeout: Duration::from_secs(2),
    }];
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn(portolan::watcher::run(cfg, stop.clone()));
    fd.wait_for_first_reload().await;
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("web routed to a", T, || fd.routes_to("web", "a")).await;

    // reject: what the check needs goes missing; the same file is refused on every retry.
    std::fs::remove_file(&flag).unwrap();
    etcd.put(&fd.service_key("web", "b1"), &a.record()).await;
    wait_until("three retries refused", T, || async {
        fd.metric("portolan_watcher_check_failures_total").await >= Some(4.0)
    })
    .await;
    // A different file: its reject is ordered after any the retries would have sent.
    etcd.put(&fd.service_key("web", "b2"), &a.record()).await;
    wait_until("the second file's reject", T, || async {
        receiver.events("reject").len() >= 2
    })
    .await;
    let retries = fd.metric("portolan_watcher_check_failures_total").await;
    eprintln!("check failures logged and counted: {retries:?}; reject hooks: 2");
    assert_eq!(
        receiver.events("reject").len(),
        2,
        "one per distinct file: {:?}",
        receiver.events("reject")
    );

    // fail: a port in use passes the check and fails only when HAProxy loads the file.
    write(&flag, "");
    wait_until("b2 routed once the check passes", T, || async {
        fd.dest_text().contains("server b2 ")
    })
    .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap().port();
    let extra = format!("frontend extra\n    bind 127.0.0.1:{port}");
    etcd.put(&format!("{}/config/extra", fd.prefix), &extra)
        .await;
    let failed = r#"portolan_watcher_reloads_total{result="failed"}"#;
    wait_until("three retries failed", T, || async {
        fd.metric(failed).await >= Some(4.0)
    })
    .await;
    etcd.put(&fd.service_key("web", "b3"), &a.record()).await;
    wait_until("the second file's fail", T, || async {
        receiver.events("fail").len() >= 2
    })
    .await;
    eprintln!(
        "failed reloads logged and counted: {:?}; fail hooks: 2",
        fd.metric(failed).await
    );
    assert_eq!(
        receiver.events("fail").len(),
        2,
        "one per distinct file: {:?}",
        receiver.events("fail")
    );
    stop.cancel();
    watcher.await.unwrap().expect("clean stop");
    drop(taken);
}

/// HAProxy's master killed while it loads a new file: the master socket is gone for
/// good, and the reload fails at once (naming the master) instead of after the whole
/// `command_timeout_ms`; `dest` is left a file HAProxy can start on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_master_is_killed_fails_fast() {
    let etcd = Etcd::start().await;
    let a = Backend::start("a").await;
    let marks = tempfile::tempdir().unwrap();
    let (armed, checked, loading) = (
        marks.path().join("armed"),
        marks.path().join("checked"),
        marks.path().join("loading"),
    );
    // Loaded by `haproxy -c` and by the master at each reload: once armed, the load
    // after a passed check (a reload) announces itself and takes 5 s.
    let lua = marks.path().join("slow.lua");
    write(
        &lua,
        &format!(
            "local function there(p) local f = io.open(p, 'r'); if f then f:close() end; return f ~= nil end\n\
             if there('{armed}') and there('{checked}') then\n  io.open('{loading}', 'w'):close()\n  os.execute('sleep 5')\nend\n",
            armed = armed.display(),
            checked = checked.display(),
            loading = loading.display()
        ),
    );
    let mut fd = FrontDoor::start(
        &etcd,
        Options {
            check_cmd: format!("haproxy -c -q -f {{src}} && touch '{}'", checked.display()),
            template_extra: format!("\nglobal\n    lua-load {}\n", lua.display()),
            ..Default::default()
        },
    )
    .await;
    write(&armed, "");
    let _ = std::fs::remove_file(&checked);
    etcd.put(&fd.service_key("web", "a"), &a.record()).await;
    wait_until("HAProxy's master loads the new file", T, || async {
        loading.exists()
    })
    .await;
    fd.haproxy.kill();
    let took = when(T, Duration::from_millis(5), || async {
        fd.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("reload"))
    })
    .await
    .unwrap_or_else(|| panic!("no failed reload in the log:\n{}", fd.log()));
    let log = fd.log();
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("reload"))
        .unwrap();
    eprintln!("master killed mid-reload → failure logged in {took:?}: {line}");
    assert!(
        line.contains("master") && line.contains("exited"),
        "says the master is gone: {line}"
    );
    assert!(
        took < Duration::from_secs(5),
        "failed fast, not at the 10 s command timeout: {took:?}"
    );
    assert!(fd.dest_is_valid(), "dest is a file HAProxy can start on");
}
