//! Thin binary: parse the command line, set up logging and signals, call the library.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use portolan::cli::{Cli, Command};
use portolan::config::{self, FileConfig};
use portolan::{dev, ls, registrar, shutdown, telemetry, watcher};

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_json);
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = || FileConfig::load(cli.config.as_deref());
    match cli.command {
        Command::Registrar(args) => {
            let cfg = config::resolve_registrar(&file()?, &args.overrides())?;
            registrar::run(cfg, shutdown::on_signals()?).await?;
        }
        Command::Watcher(args) => {
            let cfg = config::resolve_watcher(&file()?, &args.overrides())?;
            watcher::check_templates(&cfg)?;
            watcher::run(cfg, shutdown::on_signals()?).await?;
        }
        Command::Render(args) => {
            let overrides = config::WatcherOverrides {
                etcd: args.etcd.overrides(),
                ..Default::default()
            };
            let cfg = config::resolve_watcher(&file()?, &overrides)?;
            if !watcher::render_once(&cfg, args.dry_run).await? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Ls(args) => {
            let overrides = config::RegistrarOverrides {
                etcd: args.etcd.overrides(),
                ..Default::default()
            };
            let cfg = config::resolve_registrar(&file()?, &overrides)?;
            ls::run(&cfg.etcd, args.service.as_deref(), args.json).await?;
        }
        Command::Check => {
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| config::DEFAULT_CONFIG_PATH.into());
            let f = FileConfig::load(Some(&path))?;
            let has_registrar = f.registrar.node.is_some()
                || f.registrar.advertise_ip.is_some()
                || f.template.is_empty();
            if has_registrar {
                config::resolve_registrar(&f, &Default::default())
                    .with_context(|| format!("{}: [registrar]", path.display()))?;
            }
            if !f.template.is_empty() {
                let cfg = config::resolve_watcher(&f, &Default::default())
                    .with_context(|| format!("{}: [watcher]", path.display()))?;
                watcher::check_templates(&cfg)?;
            }
            println!("{}: ok", path.display());
        }
        Command::Dev(args) => {
            dev::run(args, shutdown::on_signals()?).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
