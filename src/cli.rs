//! The daemon's command line, compatible with ckpool's flags.

use std::path::PathBuf;

use clap::Parser;

/// Command line, compatible with ckpool's flags. [`crate::settings::Settings`] turns it and the
/// config file into the daemon's settings.
#[derive(Debug, Default, Parser)]
#[command(
    name = "ckpool-rs",
    version,
    about = "A bitcoin mining pool server in the spirit of ckpool"
)]
pub(crate) struct Cli {
    /// Solo mode: each user mines to the address given as their username.
    #[arg(short = 'B', long = "btcsolo")]
    pub(crate) btcsolo: bool,
    /// Config file (default: <name>.conf in the current directory).
    #[arg(short = 'c', long = "config")]
    pub(crate) config: Option<PathBuf>,
    /// Daemonise: detach and run in the background.
    #[arg(short = 'D', long = "daemonise")]
    pub(crate) daemonise: bool,
    /// Group for the unix sockets (accepted for compatibility).
    #[arg(short = 'g', long = "group")]
    pub(crate) group: Option<String>,
    /// Take over a running instance's listeners and connections without disconnecting anyone
    /// (starts normally, with a warning, when none is running).
    #[arg(short = 'H', long = "handover")]
    pub(crate) handover: bool,
    /// Kill a running instance with the same name.
    #[arg(short = 'k', long = "killold")]
    pub(crate) killold: bool,
    /// Log every share to <logdir>/<height>/<job>.sharelog.
    #[arg(short = 'L', long = "log-shares")]
    pub(crate) log_shares: bool,
    /// Log level 0-7 as syslog (default 5, notice). RUST_LOG overrides it.
    #[arg(short = 'l', long = "loglevel", default_value_t = 5)]
    pub(crate) loglevel: u8,
    /// Instance name (process name, default config, socket directory). Default: ckpool, or
    /// ckproxy, ckpassthrough, cknode, ckredirector in those modes.
    #[arg(short = 'n', long = "name")]
    pub(crate) name: Option<String>,
    /// Node mode: a passthrough with its own bitcoind. Also selected by running the binary as
    /// `cknode`.
    #[arg(short = 'N', long = "node")]
    pub(crate) node: bool,
    /// Passthrough mode: every miner over one upstream connection. Also selected by running the binary as
    /// `ckpassthrough`.
    #[arg(short = 'P', long = "passthrough")]
    pub(crate) passthrough: bool,
    /// Proxy mode: work from the upstream pools of the `proxy` array. Also selected by running the binary as `ckproxy`.
    #[arg(short = 'p', long = "proxy")]
    pub(crate) proxy: bool,
    /// Quiet: no periodic status line.
    #[arg(short = 'q', long = "quiet")]
    pub(crate) quiet: bool,
    /// Redirector mode: a passthrough that sends miners to a `redirecturl` entry once a share
    /// of theirs is accepted upstream. Also selected by running the binary as
    /// `ckredirector`.
    #[arg(short = 'R', long = "redirector")]
    pub(crate) redirector: bool,
    /// Socket directory (default /tmp/<name>/).
    #[arg(short = 's', long = "sockdir")]
    pub(crate) sockdir: Option<PathBuf>,
    /// User proxy mode: proxy mode with an upstream connection of its own for each user.
    #[arg(short = 'u', long = "userproxy")]
    pub(crate) userproxy: bool,
    /// I/O backend: auto (io_uring where the kernel allows it, else epoll), uring or epoll.
    /// Overrides the config's "io" and the POOL_BACKEND environment variable.
    #[arg(long = "io")]
    pub(crate) io: Option<String>,
    /// How connector threads hand events to the stratifier: inline (the stratifier runs on the
    /// connector thread) or queue (batches through a queue to a stratifier thread per connector
    /// thread, on the same CPU). Overrides the config's "handoff" and the POOL_HANDOFF
    /// environment variable.
    #[arg(long = "handoff")]
    pub(crate) handoff: Option<String>,
}
