//! `ckpmsg`: sends admin commands to a running ckpool-rs and prints the replies.
//!
//! Commands come from the arguments after `--`, or one per line on standard input (lines
//! starting with `#` are comments), as ckpool's ckpmsg reads them.

use std::io::BufRead;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "ckpmsg", version, about = "Send admin commands to ckpool-rs")]
struct Cli {
    /// Instance name.
    #[arg(short = 'n', long = "name", default_value = "ckpool")]
    name: String,
    /// Socket directory (default /tmp/<name>/).
    #[arg(short = 's', long = "sockdir")]
    sockdir: Option<PathBuf>,
    /// Socket name inside the socket directory.
    #[arg(short = 'N', long = "sockname", default_value = "listener")]
    sockname: String,
    /// Reply timeout in seconds.
    #[arg(short = 't', long = "timeout", default_value_t = 30)]
    timeout: u64,
    /// Commands to send (otherwise read from standard input).
    commands: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let sockdir = cli
        .sockdir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/{}", cli.name)));
    let path = sockdir.join(&cli.sockname);
    let mut commands = cli.commands.clone();
    if commands.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading standard input")?;
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                commands.push(line.to_owned());
            }
        }
    }
    for cmd in commands {
        let mut s = UnixStream::connect(&path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(cli.timeout)))?;
        common::admin::write_message(&mut s, cmd.as_bytes())?;
        match common::admin::read_message(&mut s)? {
            Some(reply) => println!("{}", String::from_utf8_lossy(&reply)),
            None => println!("(no reply)"),
        }
    }
    Ok(())
}
