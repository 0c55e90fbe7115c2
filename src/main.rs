//! `ckpool-rs`: the daemon. Wiring only: it reads the command line and the configuration into
//! [`settings::Settings`], starts logging, claims the instance's name ([`instance::Instance`]:
//! old instance, pid file, signals) and hands over to the mode's runner ([`modes`]).

mod admin;
mod cli;
mod handoff;
mod handover;
mod instance;
mod journal;
mod links;
mod logging;
mod modes;
mod relay;
mod settings;
mod sharelog;
mod status;
mod web;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info, warn};

use crate::cli::Cli;
use crate::instance::Instance;
use crate::settings::{ConfigError, Mode, Settings};

/// Exit code for configuration errors.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept until the end, so that the error below reaches the log file too.
    let mut log = None;
    let code = match run(cli, &mut log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("ckpool-rs: {e:#}");
            match e.downcast_ref::<ConfigError>() {
                Some(_) => ExitCode::from(EXIT_CONFIG),
                None => ExitCode::FAILURE,
            }
        }
    };
    drop(log);
    code
}

fn run(cli: Cli, log: &mut Option<logging::LogGuard>) -> anyhow::Result<()> {
    let argv0 = std::env::args().next().unwrap_or_default();
    let mode = Mode::select(&cli, &argv0)?;
    if cli.daemonise && std::env::var_os("CKPOOL_RS_DAEMONISED").is_none() {
        return daemonise(&argv0);
    }
    // With -D the daemon's stderr is /dev/null: it logs to the file only.
    let daemonised = std::env::var_os("CKPOOL_RS_DAEMONISED").is_some();
    *log = logging::init(cli.loglevel, !daemonised);
    let settings = Settings::load(&cli, mode, &settings::process_env)?;
    logging::open_file(settings.logdir().join(format!("{}.log", settings.name)));
    info!(mode = %settings.mode, name = %settings.name, config = %settings.config_path.display(), "starting");
    match connector::raise_nofile_limit() {
        Ok(n) => info!(nofile = n, "open files limit raised to the hard limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
    let instance = Instance::claim(&settings)?;
    modes::run(&settings, &instance)
}

/// `-D`: runs this program again detached (its own process group, no terminal, stdio to
/// /dev/null), under the same `argv[0]` (which may select the mode), and returns, so the parent
/// exits.
fn daemonise(argv0: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating own executable")?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "-D" && a != "--daemonise")
        .collect();
    let child = std::process::Command::new(exe)
        .arg0(argv0)
        .args(args)
        .env("CKPOOL_RS_DAEMONISED", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    println!("ckpool-rs daemonised, pid {}", child.id());
    Ok(())
}
