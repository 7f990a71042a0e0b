//! Network namespaces as hosts, for tests that need several machines on one.
//!
//! A `Netns` is one "host": a named network namespace (`ip netns add`), deleted on drop
//! after every process still inside it has been killed by PID, so a panicking test
//! leaves nothing behind. A `Switch` is a namespace of its own holding bridges; `plug`
//! joins a host to one of them with a veth pair created directly between the two
//! namespaces, so the machine's own namespace never sees an interface, an address or a
//! packet of the test bed. Names are `pt-<pid>-<n>-<role>`: `remove_leftovers` deletes
//! the namespaces of test processes that died without cleaning up (their pid is gone).
//!
//! A socket belongs to the namespace of the thread that created it, whatever thread
//! uses it later: `in_netns` runs a closure on a short-lived thread that joined a
//! namespace (to bind a listener "on" a host), and `enter` moves the calling thread for
//! good (a `#[tokio::test]` runs its whole current-thread runtime on the test thread, so
//! every socket the test then opens, etcd clients included, is inside the bed).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::owned_command;

/// Every namespace name of this scheme starts so.
pub const NAME_PREFIX: &str = "pt-";

/// Runs `ip <args>`; panics with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Fails the test unless it can build namespaces: root and iproute2.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test builds network namespaces and must run as root (CI does); \
         run it with sudo, e.g. `sudo -E cargo nextest run --test multihost`"
    );
    super::need("ip", "iproute2");
    super::need("iptables", "iptables");
}

/// Names in use, from `ip netns list` ("name" or "name (id: 3)").
fn list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The pid in `pt-<pid>-…`, if the name follows the scheme.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(NAME_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Deletes the namespaces (and the processes inside them) that an earlier test process
/// left behind when it was killed before its guards ran. A namespace whose owner is
/// still alive belongs to a test running right now and is left alone.
pub fn remove_leftovers() {
    for name in list() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            eprintln!(
                "removing leftover network namespace {name} (its test process {pid} is gone)"
            );
            delete(&name);
        }
    }
}

/// Kills every process inside `name` by PID, then deletes it (its veths go with it).
fn delete(name: &str) {
    for _ in 0..3 {
        let pids = Command::new("ip")
            .args(["netns", "pids", name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add <name>` with its loopback up.
    pub fn add(name: &str) -> Netns {
        assert!(
            name.starts_with(NAME_PREFIX),
            "netns {name} breaks the naming scheme"
        );
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip netns exec <ns> <program>`: a command running inside the namespace, killed
    /// when the test process dies (`ip netns exec` execs the program, so the child's
    /// PID is the program's own, and SIGSTOP or SIGKILL by PID reach it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = owned_command("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a short command inside the namespace; panics with its stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name));
        assert!(
            out.status.success(),
            "{program} {} in {} failed: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Moves the calling thread into this namespace for good.
    pub fn enter(&self) {
        enter_path(&self.path());
    }

    /// Runs `f` on a fresh thread inside this namespace: the sockets it creates belong
    /// to the namespace, whichever thread uses them afterwards.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns_path(self.path(), f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// The namespace the test process started in (the machine's own), opened before any
/// thread leaves it.
static ROOT: OnceLock<File> = OnceLock::new();

fn root() -> &'static File {
    ROOT.get_or_init(|| File::open("/proc/thread-self/ns/net").expect("open own netns"))
}

/// Moves the calling thread back to the machine's own namespace, where sockets reach
/// Docker's networks.
pub fn enter_root() {
    setns(root(), Path::new("(the machine's namespace)"));
}

fn in_netns_path<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        enter_path(&path);
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Moves the calling thread into the namespace at `path` for good.
pub fn enter_path(path: &Path) {
    root();
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    setns(&file, path);
}

fn setns(file: &File, what: &Path) {
    // setns(CLONE_NEWNET) affects the calling thread only and is allowed in a
    // multi-threaded process.
    let rc = unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns({}): {}",
        what.display(),
        std::io::Error::last_os_error()
    );
}

/// A namespace holding bridges that hosts plug into: the bed's network equipment.
pub struct Switch {
    pub ns: Netns,
}

impl Switch {
    pub fn add(name: &str, bridges: &[&str]) -> Switch {
        let ns = Netns::add(name);
        for br in bridges {
            ns.ip(&["link", "add", br, "type", "bridge"]);
            ns.ip(&["link", "set", br, "up"]);
        }
        Switch { ns }
    }

    /// Joins `host` to `bridge` with a veth pair: `port` on the switch side, `ifname`
    /// with `cidr` (e.g. "10.213.1.21/24") on the host side, both up.
    pub fn plug(&self, bridge: &str, port: &str, host: &Netns, ifname: &str, cidr: &str) {
        self.ns.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", &host.name,
        ]);
        self.ns.ip(&["link", "set", port, "master", bridge, "up"]);
        host.ip(&["addr", "add", cidr, "dev", ifname]);
        host.ip(&["link", "set", ifname, "up"]);
    }

    /// Takes a switch port down (the cable pulled) or up again.
    pub fn set_port(&self, port: &str, up: bool) {
        self.ns
            .ip(&["link", "set", port, if up { "up" } else { "down" }]);
    }
}
