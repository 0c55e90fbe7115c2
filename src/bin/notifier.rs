//! `notifier`: for bitcoind's `-blocknotify`. Tells a running ckpool-rs that a new block
//! arrived so it fetches a template at once, then exits.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "notifier", version, about = "Tell ckpool-rs about a new block")]
struct Cli {
    /// Instance name.
    #[arg(short = 'n', long = "name", default_value = "ckpool")]
    name: String,
    /// Socket directory (default /tmp/<name>/).
    #[arg(short = 's', long = "sockdir")]
    sockdir: Option<PathBuf>,
    /// Accepted for compatibility with ckpool's notifier (proxy instance); unused.
    #[arg(short = 'p', long = "proxy")]
    proxy: bool,
    /// The block hash bitcoind passes as %s (logged only).
    hash: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sockdir = cli
        .sockdir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/{}", cli.name)));
    let path = sockdir.join("listener");
    let mut s =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    common::admin::write_message(&mut s, b"update")?;
    let _ = common::admin::read_message(&mut s);
    Ok(())
}
