//! Thin binary: parse the command line, set up logging and signals, call the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use portolan::cli::{AuthCommand, CertsCommand, Cli, Command};
use portolan::config::{self, FileConfig};
use portolan::{auth, certs, dev, ls, registrar, shutdown, telemetry, watcher};

fn main() -> ExitCode {
    few_malloc_arenas();
    let cli = Cli::parse();
    if let Err(e) = telemetry::init_with(cli.log_level.as_deref(), cli.log_format()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory
/// freed in one is not reused by another: the async runtime's worker and blocking-pool
/// threads each kept their share of a render's transient maps (measured: 45 MB peak RSS
/// at 10,000 instances with the default, 37 MB with one arena). Two arenas keep the
/// threads from contending for one lock while capping that waste.
fn few_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let defaults = config::default_config_paths(subcommand_name(&cli.command));
    let file = || FileConfig::load_or_default(cli.config.as_deref(), defaults);
    match cli.command {
        Command::Registrar(args) => {
            let cfg = config::resolve_registrar(&file()?, &args)?;
            registrar::run(cfg, stop_on_signals()?).await?;
        }
        Command::Watcher(args) => {
            let cfg = config::resolve_watcher(&file()?, &args)?;
            watcher::check_templates(&cfg)?;
            watcher::run(cfg, stop_on_signals()?).await?;
        }
        Command::Render(args) => {
            let flags = config::WatcherArgs {
                etcd: args.etcd,
                ..Default::default()
            };
            let cfg = config::resolve_watcher(&file()?, &flags)?;
            let once = watcher::Once {
                dry_run: args.dry_run,
                force: args.force,
            };
            if !watcher::render_once(&cfg, once).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status(args) => return Ok(status(file, &args).await),
        Command::Ls(args) => {
            let file = file()?;
            let etcd = config::resolve_etcd(&file, &args.etcd)?;
            let confinement = config::resolve_confinement(&file)?;
            let format = if args.json {
                ls::Format::Json
            } else if args.addrs {
                ls::Format::Addrs { all: args.all }
            } else {
                ls::Format::Table
            };
            ls::run(&etcd, &confinement, args.service.as_deref(), format).await?;
        }
        Command::Check => match &cli.config {
            Some(path) => check(path)?,
            None => {
                // Every shipped file this host has.
                let present: Vec<&str> = defaults
                    .iter()
                    .copied()
                    .filter(|p| std::path::Path::new(p).exists())
                    .collect();
                anyhow::ensure!(
                    !present.is_empty(),
                    "no config file to check: neither {} exists (name one with --config FILE)",
                    defaults.join(" nor ")
                );
                for p in present {
                    check(std::path::Path::new(p))?;
                }
            }
        },
        Command::Auth(cmd) => {
            let (args, principal): (_, fn(&str, &str) -> auth::Principal) = match cmd {
                AuthCommand::AddNode(a) => (a, auth::node_principal),
                AuthCommand::AddWatcher(a) if a.issuer => (a.auth, auth::issuer_principal),
                AuthCommand::AddWatcher(a) => (a.auth, auth::watcher_principal),
            };
            anyhow::ensure!(
                portolan::schema::is_valid_name(&args.name),
                "name {:?}: names match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}",
                args.name
            );
            let etcd = config::resolve_etcd(&file()?, &args.etcd)?;
            let p = principal(&etcd.prefix, &args.name);
            auth::run(&etcd, &p, &args.password_file, args.allow_unsafe_etcd).await?;
        }
        Command::Certs(cmd) => certs_command(cmd, &file()?).await?,
        Command::Dev(args) => {
            dev::run(args, stop_on_signals()?).await?;
        }
        Command::Completions { shell } => completions(shell)?,
        Command::Man { out_dir } => man(out_dir)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `portolan status`: 0 in sync, 1 out of sync, 2 when it cannot tell.
async fn status(
    file: impl FnOnce() -> Result<FileConfig, config::ConfigError>,
    args: &portolan::cli::StatusArgs,
) -> ExitCode {
    // 0 in sync, 1 out of sync, 2 when it cannot tell: a config that does not
    // load or resolve, etcd or HAProxy unreachable. A monitor that pages on 1
    // must not page "drift" for a typo in the file.
    let cfg = match file()
        .map_err(anyhow::Error::from)
        .and_then(|f| Ok(config::resolve_watcher(&f, &args.watcher)?))
    {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match watcher::status(&cfg, args.json).await {
        Ok(true) => {}
        Ok(false) => return ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// `portolan completions SHELL`.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "portolan", &mut script);
    print_quietly(&script)?;
    Ok(())
}

/// `portolan man [--out-dir DIR]`.
fn man(out_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("write man pages into {}", dir.display()))?;
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            print_quietly(&page)?;
        }
    }
    Ok(())
}

/// `portolan certs ls | import | rm`, against the etcd the config file (and flags) name.
async fn certs_command(cmd: CertsCommand, file: &FileConfig) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Ls { etcd, json } => {
            certs::operator::ls(&config::resolve_etcd(file, &etcd)?, json).await
        }
        CertsCommand::Import {
            name,
            cert,
            key,
            domains,
            etcd,
        } => {
            let etcd = config::resolve_etcd(file, &etcd)?;
            certs::operator::import(&etcd, &name, &cert, &key, domains).await
        }
        CertsCommand::Rm { name, etcd } => {
            certs::operator::rm(&config::resolve_etcd(file, &etcd)?, &name).await
        }
    }
}

/// The subcommand's name as typed, for its default config file.
fn subcommand_name(c: &Command) -> &'static str {
    match c {
        Command::Registrar(_) => "registrar",
        Command::Watcher(_) => "watcher",
        Command::Render(_) => "render",
        Command::Status(_) => "status",
        Command::Ls(_) => "ls",
        Command::Check => "check",
        Command::Auth(_) => "auth",
        Command::Certs(_) => "certs",
        Command::Dev(_) => "dev",
        Command::Completions { .. } => "completions",
        Command::Man { .. } => "man",
    }
}

/// Writes to stdout; a reader that went away (`portolan man | head`) is not an error.
fn print_quietly(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// The shutdown token of every daemon: the first SIGTERM/SIGINT asks for a clean stop;
/// a second one exits at once, for a stop that hangs.
fn stop_on_signals() -> std::io::Result<tokio_util::sync::CancellationToken> {
    let token = shutdown::on_signals()?;
    let first = token.clone();
    tokio::spawn(async move {
        first.cancelled().await;
        if shutdown::next_signal().await.is_ok() {
            tracing::warn!("second signal received, exiting now");
            std::process::exit(130);
        }
    });
    Ok(token)
}

/// `portolan check`: validates every section the file has, with the same code the
/// daemons run, and compiles its templates. Touches nothing.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let f = FileConfig::load(Some(path))?;
    let at = |section: &str| format!("{}: {section}", path.display());
    config::resolve_etcd(&f, &Default::default()).with_context(|| at("[etcd]"))?;
    if f.has("registrar") || f.has("service") {
        config::resolve_registrar(&f, &Default::default()).with_context(|| at("[registrar]"))?;
    }
    // Each daemon reads the [[hook]] sections for its own events, whatever else the
    // file has: check them against every event either daemon emits.
    if f.has("hook") {
        config::resolve_hooks(&f).with_context(|| at("[[hook]]"))?;
    }
    if f.has("watcher") || f.has("template") {
        let cfg =
            config::resolve_watcher(&f, &Default::default()).with_context(|| at("[watcher]"))?;
        watcher::check_templates(&cfg)?;
    }
    println!("{}: ok", path.display());
    Ok(())
}
