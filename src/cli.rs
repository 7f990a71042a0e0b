//! The command line (clap). Every option can also come from a `PORTOLAN_*` environment
//! variable or the TOML file given with `--config`; precedence is flag > env > file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::EtcdOptions;
pub use crate::config::{RegistrarArgs, WatcherArgs};
pub use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "portolan",
    version = crate::VERSION,
    about = "Keep an HAProxy front door in step with the Docker containers behind it, through etcd.",
    long_about = concat!(
        "Portolan keeps an HAProxy front door in step with the containers behind it.\n\n",
        "  registrar  runs on every Docker host and writes each running container's\n",
        "             host:port into etcd under <prefix>/nodes/<node>/services/…,\n",
        "             on a lease, so a dead host disappears by itself.\n",
        "  watcher    runs beside HAProxy, watches that prefix, renders templates,\n",
        "             validates the result with `haproxy -c`, swaps it in atomically and\n",
        "             reloads HAProxy without dropping a request.\n\n",
        "Inspect and fix the state with plain etcdctl:\n",
        "  etcdctl get --prefix /portolan/services/\n",
        "  etcdctl put /portolan/services/web/manual-1 10.0.0.9:80\n\n",
        "Try everything on one machine with `portolan dev`."
    ),
    after_help = "Every option can also be set in the config file (--config; default: the \
file the package ships, /etc/portolan/registrar.toml for registrar, \
/etc/portolan/watcher.toml for watcher, render and status, the first of the two that \
exists for ls, auth and check) or as an environment variable PORTOLAN_<OPTION>; a flag \
wins over the environment, which wins over the file."
)]
pub struct Cli {
    /// TOML config file [default, read if it exists: /etc/portolan/registrar.toml for
    /// registrar; /etc/portolan/watcher.toml for watcher, render and status; the first of
    /// the two for ls, auth and check].
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "PORTOLAN_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// What to log: a level (error, warn, info, debug, trace) or tracing directives
    /// ("info,portolan::watcher=debug") [default: RUST_LOG, else info].
    #[arg(long, global = true, env = "PORTOLAN_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log as plain text or as JSON lines (one object a line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "PORTOLAN_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    /// Same as --log-format json (kept for existing units and scripts).
    #[arg(long, global = true, env = "PORTOLAN_LOG_JSON", hide = true)]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch the local Docker daemon and keep this node's containers registered in etcd.
    ///
    /// Each published port of a running container becomes
    /// <prefix>/nodes/<node>/services/<service>/<node>-<container id>-<port> with a JSON record
    /// {"addr":"<advertise-ip>:<host port>",...}, attached to this registrar's lease.
    /// A port published on one host IP (-p 10.0.0.5::80) is registered with that IP only
    /// when it is --advertise-ip or lies in --advertise-networks; any other (docker0's
    /// -p 172.17.0.1::80, a bridge) is skipped with a warning. One published only on
    /// loopback (-p 127.0.0.1::80) is skipped with a warning unless --advertise-ip is
    /// loopback too. Every key lies under <prefix>/nodes/<node>/, so
    /// the node's etcd user needs no other access (see `portolan auth`); a second
    /// registrar with a node name already held by a live one refuses to start.
    /// A container that gets its stop signal (docker stop, or docker kill with SIGKILL
    /// or its StopSignal) is marked "draining": true at once, so watchers send it no new
    /// request while in-flight ones finish, and is removed when it exits (given back if
    /// it does not exit within its stop timeout + 2 s); any other signal changes
    /// nothing. One that dies, is paused or turns unhealthy is removed at once; a lost
    /// host is removed by lease expiry after --ttl seconds.
    ///
    /// Container labels (registrator's environment variables in brackets work as fallback):
    ///
    ///   portolan.service=NAME          service name [SERVICE_NAME]; default: the Compose
    ///                                  service (com.docker.compose.service), else the
    ///                                  image's base name; lower-cased; "-<port>" is
    ///                                  appended when the container publishes several ports
    ///   portolan.port.<p>.service=NAME name for container port <p> [SERVICE_<p>_NAME]
    ///   portolan.ignore=true           do not register [SERVICE_IGNORE]
    ///   portolan.tags=a,b              tags [SERVICE_TAGS]
    ///   portolan.weight=N              HAProxy weight 0..256 [default: 100]
    ///   portolan.check.http=/path      probe: GET /path on the registered address, 2xx/3xx
    ///                                  is a success
    ///   portolan.check.tcp=true        probe: connect to the registered address; a
    ///                                  connection closed at once (docker-proxy with a
    ///                                  dead backend) is a failure
    ///   portolan.check.interval=5s     time between probes [default: 5s]
    ///   portolan.check.timeout=2s      one probe's time limit [default: 2s]
    ///   portolan.check.fall=3          failures in a row that deregister [default: 3]
    ///   portolan.check.rise=2          successes in a row that re-register [default: 2]
    ///
    /// Every portolan.<x> label can be set for one port as portolan.port.<p>.<x>. Durations
    /// take ms, s or m ("500ms", "5s"; a bare number is seconds). A probed container is
    /// registered after its first successful probe. A container with a Docker HEALTHCHECK
    /// is registered only while it is healthy. A label with a bad value is logged as a
    /// warning naming the container and the label, and that container is not registered.
    #[command(verbatim_doc_comment)]
    Registrar(RegistrarArgs),
    /// Watch etcd, render templates, check them with haproxy -c, swap and reload HAProxy.
    ///
    /// Reads the [[template]] resources of --config. The first change after a quiet
    /// spell is applied at once; changes that arrive while an apply is in flight are
    /// batched into the next one. A config that fails its check never goes live.
    /// The file HAProxy last confirmed is kept in <dest>.last-good and put back when a
    /// reload is refused, also after a restart; a master that exits mid-reload fails
    /// the reload at once. `reject` and `fail` hooks fire once per distinct file.
    /// Template edits are picked up at once; SIGHUP re-reads templates and renders again.
    /// Removals that would drop the live instances more than [watcher]
    /// mass_removal.share below their peak of the last mass_removal.hold_s (etcd
    /// emptied, a wrong prefix, a delete loop, a wave of expiring leases; judged at start
    /// too, against the file HAProxy runs) are held for hold_s (default 60 s), loudly;
    /// SIGUSR1 confirms it at once.
    /// An instance at a DNS name is rendered at the addresses its lookup gave and the
    /// routing policy approved, one server each, never the name; a name whose lookups
    /// fail keeps its last good answer for [watcher] dns_stale_s (default 300 s), and
    /// answers are kept in --state-dir so a restart renders them before its first lookup.
    ///
    /// A minimal config file (all keys: README, "Watcher configuration"):
    ///
    ///   [etcd]
    ///   endpoints = ["http://127.0.0.1:2379"]
    ///   [[template]]
    ///   src = "/usr/share/portolan/templates/haproxy.cfg.tera"
    ///   dest = "/etc/haproxy/haproxy.cfg"
    ///   check_cmd = "haproxy -c -f {src}"          # {src} = the staged file
    ///   haproxy_master_socket = "/run/haproxy-master.sock"
    ///   [template.vars]
    ///   domain = "example.com"                       # Host: <service>.example.com
    #[command(verbatim_doc_comment)]
    Watcher(WatcherArgs),
    /// Render the templates once from etcd and write them (or print them with --dry-run).
    ///
    /// Like `confd -onetime`. With --dry-run nothing is written or reloaded: the output
    /// is printed with the check result, and the exit code is non-zero when the check fails.
    /// It takes the running watcher's lock beside dest; run as root, what it makes there
    /// goes to the folder's owner and group, so the watcher is never locked out.
    Render(RenderArgs),
    /// Is HAProxy running what etcd says? Compares etcd, the file on disk and HAProxy.
    ///
    /// For each backend of each [[template]] of --config: what etcd says (the template
    /// rendered from etcd now), what the file on disk says, and what HAProxy runs
    /// (`show servers state` on the template's haproxy_admin_socket), with the watcher's
    /// last apply from its status key. Exit codes: 0 when all three agree; 1 when they
    /// do not, with one "difference:" line naming each server that differs (a manual
    /// `set server … state maint`, a server added by hand, a file behind etcd, …); 2
    /// when it cannot tell (a config file missing or invalid, etcd or HAProxy
    /// unreachable), with the reason on stderr.
    /// A server HAProxy's health checks mark down is shown, not counted as a difference.
    /// An instance key the watcher refuses (a node's key naming an id not its own, a
    /// service or network the node may not use, a server name another key holds) is a
    /// "refused:" line naming the key and the rule.
    /// --json prints {in_sync, etcd_revision, watcher, templates: [{dest, backends}],
    /// differences, refused: [{key, reason, rule}]}.
    Status(StatusArgs),
    /// List services and their instances from etcd.
    ///
    /// One row per instance: SERVICE INSTANCE ADDR NODE CONTAINER LEASE WEIGHT TAGS.
    /// LEASE is what etcd knows about the key's life: seconds left out of the lease TTL
    /// (`7s/10s`; a live registrar refreshes at a third of the TTL), `-` for a key without
    /// lease (written by hand: it stays until deleted), `expired` for a lease that ran out
    /// while reading. A key the watcher would skip is reported on stderr with the rule it
    /// breaks, and so is a key it would refuse: a node's key whose id does not start with
    /// "<node>-", one whose server name another key holds (the hand-written key keeps
    /// it), and — judged by the [watcher] section of --config, when there is one — a
    /// node outside the service's `services` globs or its `node_networks`, a hand-written
    /// key with `hand_written = false`. --json prints a stable document for scripts:
    /// {prefix, revision, services: {name: [instance…]}, skipped: [{key, reason}],
    /// refused: [{key, reason, rule}]}. --addrs prints one host:port a line and nothing
    /// else, for the instances that serve (--all: every one). An instance registered
    /// with route = false has "route": false in the JSON. While an instance drains (its container got
    /// its stop signal) the table has a last column STATE (up/draining) and the JSON
    /// instance "draining": true.
    Ls(LsArgs),
    /// Validate a config file and compile its templates, without touching anything.
    ///
    /// The systemd units run this in ExecStartPre so a broken config never starts a daemon.
    Check,
    /// Set up least-privilege etcd users, once, with etcd's root user.
    ///
    /// Every key a registrar writes lies under <prefix>/nodes/<node>/, so each Docker host
    /// gets a user that may write exactly that prefix, and each watcher one that reads the
    /// tree and writes only its status key. Operators keep writing hand-written instances
    /// (<prefix>/services/…) and <prefix>/config/ as root or a user of their own; write
    /// access to config/ is control over the load balancer.
    ///
    ///   portolan auth add-node web1 --password-file /etc/portolan/web1.pw \
    ///       --etcd-username root --etcd-password-file /root/etcd-root.pw
    ///
    /// A password file that does not exist is generated (mode 0600); one its group or
    /// others can read is refused (chmod 600 it). Each command prints what it did as
    /// etcdctl lines. An etcd whose RBAC a user can bypass (every 3.4, 3.5 below 3.5.33,
    /// 3.6 below 3.6.14, 3.7.0) is refused unless --allow-unsafe-etcd.
    #[command(verbatim_doc_comment, subcommand)]
    Auth(AuthCommand),
    /// The certificates every front door serves over HTTPS, kept in etcd under
    /// <prefix>/certs/<name>.
    ///
    /// Each watcher checks a certificate before it serves it (the PEM parses, the key is
    /// the leaf's, the leaf is valid now, the chain runs leaf first with each
    /// certificate issued by the next, the domains are among the leaf's names) and
    /// applies it through HAProxy's runtime API, with no reload. A bad one is refused
    /// and named (log, portolan_cert_rejected_total, the reject hook, status), and the
    /// name's last good one stays served. Whoever can read <prefix>/certs/ holds the
    /// private keys: run etcd with TLS and auth (`portolan auth`).
    #[command(verbatim_doc_comment, subcommand)]
    Certs(CertsCommand),
    /// Start a one-machine stack to try Portolan: etcd, HAProxy, a registrar and a watcher.
    ///
    /// Needs etcd, haproxy and a running Docker Engine on this machine. Everything it
    /// starts listens on 127.0.0.1 and is stopped with Ctrl-C.
    Dev(DevArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell.
    ///
    ///   portolan completions bash > /etc/bash_completion.d/portolan
    ///   portolan completions zsh  > "${fpath[1]}/_portolan"
    ///   portolan completions fish > ~/.config/fish/completions/portolan.fish
    #[command(verbatim_doc_comment)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), built from this command line; with --out-dir, write
    /// portolan.1 and one page a subcommand (portolan-watcher.1, …) there instead.
    ///
    /// The Debian package installs these under /usr/share/man/man1.
    Man {
        /// Folder to write every page into.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

impl Cli {
    /// The log format asked for: --log-format, or the old --log-json.
    pub fn log_format(&self) -> LogFormat {
        if self.log_json {
            LogFormat::Json
        } else {
            self.log_format
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub etcd: EtcdOptions,
    /// Render one time and exit (the only mode; kept for confd users' muscle memory).
    #[arg(long, default_value_t = true)]
    pub once: bool,
    /// Print what would be written (and the check result); write and reload nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply a render that the mass-removal guard would hold back (it removes more than
    /// mass_removal.share of the instances the file on disk routes to): without it such
    /// a render is refused, naming what it would remove.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// Only this service.
    pub service: Option<String>,
    #[command(flatten)]
    pub etcd: EtcdOptions,
    /// Print JSON instead of a table, for scripts.
    #[arg(long, conflicts_with = "addrs")]
    pub json: bool,
    /// Print only the host:port of the instances that serve, one a line (e.g. to
    /// bootstrap a cluster from `portolan ls etcd-peers --addrs`): neither draining nor
    /// on an expired lease; `route = false` services are listed.
    #[arg(long)]
    pub addrs: bool,
    /// With --addrs: list draining and expired instances too.
    #[arg(long, requires = "addrs")]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Port of the HTTP front door on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Port of the HAProxy stats page on 127.0.0.1.
    #[arg(long, default_value_t = 8404)]
    pub stats_port: u16,
    /// Client port of the private etcd on 127.0.0.1.
    #[arg(long, default_value_t = 23790)]
    pub etcd_port: u16,
    /// Domain for Host-header routing: <service>.<domain>.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Keep the temporary folder (etcd data, rendered config) after stopping.
    #[arg(long)]
    pub keep: bool,
    /// Register only containers carrying this label (KEY or KEY=VALUE), as
    /// `portolan registrar --only-label`; by default every container with a published port.
    #[arg(long, value_name = "KEY[=VALUE]")]
    pub only_label: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CertsCommand {
    /// Name, domains, expiry, days left, source and the front doors serving each (from
    /// the watchers' status keys); a certificate every watcher refuses says why.
    Ls {
        #[command(flatten)]
        etcd: EtcdOptions,
        /// Print JSON instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Store a certificate under NAME ([a-z0-9][a-z0-9._-]{0,63}) after the watchers'
    /// own checks; a bad one is refused with the reason and nothing is written.
    /// Importing under an existing NAME renews it: every front door swaps it at run time.
    Import {
        name: String,
        /// PEM chain, leaf first, each certificate followed by its issuer.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The leaf's private key, PEM, unencrypted PKCS#8 (BEGIN PRIVATE KEY).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Host names to serve it for (SNI), each among the certificate's names
        /// [default: the certificate's DNS names].
        #[arg(long, value_name = "NAME[,NAME…]", value_delimiter = ',')]
        domains: Option<Vec<String>>,
        #[command(flatten)]
        etcd: EtcdOptions,
    },
    /// Delete certificate NAME: every front door stops serving it (no reload).
    Rm {
        name: String,
        #[command(flatten)]
        etcd: EtcdOptions,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuthCommand {
    /// User and role portolan-node-NODE: read-write on <prefix>/nodes/NODE/ only.
    AddNode(AuthArgs),
    /// User and role portolan-watcher-NAME: read on <prefix>/ (certs/ included: the
    /// watcher serves the private keys there), read-write on <prefix>/watchers/NAME;
    /// with --issuer read-write on <prefix>/certs/ and <prefix>/acme/ too.
    AddWatcher(WatcherAuthArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WatcherAuthArgs {
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Also let this watcher write certificates (<prefix>/certs/) and the ACME state
    /// (<prefix>/acme/): for the watchers that may issue; `portolan certs import` runs
    /// with such a user (or root).
    #[arg(long)]
    pub issuer: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// The node or watcher name, as given to the daemon (--node, --name).
    pub name: String,
    /// The new user's password: read from FILE (mode 0600 or 0400: one its group or
    /// others can read is refused), or generated into it (mode 0600) when FILE does not
    /// exist. Give the daemon the same file (--etcd-password-file).
    #[arg(long = "password-file", id = "user_password_file", value_name = "FILE")]
    pub password_file: PathBuf,
    /// Set the user up even though etcd runs a release whose RBAC a user can bypass
    /// (nested transactions, the lease API, open-ended watches: below 3.5.33 on 3.5,
    /// 3.6.14 on 3.6, 3.7.1 on 3.7, and every 3.4). Without it, such an etcd is refused
    /// with the advisory and the release to upgrade to. With it, the role still keeps
    /// honest software to its keys, but a hostile holder of the credentials reaches
    /// every key and lease.
    #[arg(long)]
    pub allow_unsafe_etcd: bool,
    /// How to reach etcd as its root user (--etcd-username root --etcd-password-file …).
    #[command(flatten)]
    pub etcd: EtcdOptions,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub watcher: WatcherArgs,
    /// Print JSON instead of a table, for scripts and monitoring.
    #[arg(long)]
    pub json: bool,
}
