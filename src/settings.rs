//! The daemon's settings: the command line, the environment and the config file, read once into
//! typed values with one set of defaults (the config file's, `common::config::Config::default`),
//! which then make the connector's, the stratifier's and the generator's configurations.
//!
//! Precedence where several sources set the same thing: command line, then environment
//! (`POOL_BACKEND`, `POOL_HANDOFF`), then config file.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::address::Network;
use common::config::Config;
use connector::BackendKind;
use generator::{BtcdConfig, GeneratorConfig};
use stratifier::{AgentDiff, ListenerDiff, PoolConfig};
use tracing::warn;

use crate::cli::Cli;
use crate::handoff::Handoff;

/// An error that is the configuration's (or the command line's) fault: the daemon exits 2.
#[derive(Debug)]
pub(crate) struct ConfigError(pub(crate) String);

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the daemon runs as (ckpool's modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A pool on bitcoind templates paying `btcaddress`.
    Pool,
    /// `-B`: a pool where each user mines to the address in their username.
    Solo,
    /// `-p`, or the binary named `ckproxy`.
    Proxy,
    /// `-u`.
    UserProxy,
    /// `-P`, or the binary named `ckpassthrough`.
    Passthrough,
    /// `-N`, or the binary named `cknode`.
    Node,
    /// `-R`, or the binary named `ckredirector`.
    Redirector,
}

impl Mode {
    /// The mode a binary name selects, as ckpool does: `ckproxy`, `ckpassthrough`, `cknode`,
    /// `ckredirector` (the file name of `argv[0]`, directories ignored); `None` for any other name.
    pub(crate) fn from_binary_name(argv0: &str) -> Option<Self> {
        let base = Path::new(argv0).file_name()?.to_str()?;
        [
            ("ckproxy", Self::Proxy),
            ("ckpassthrough", Self::Passthrough),
            ("cknode", Self::Node),
            ("ckredirector", Self::Redirector),
        ]
        .into_iter()
        .find(|(name, _)| base == *name)
        .map(|(_, mode)| mode)
    }

    /// The mode the command line asks for: a mode flag (at most one of `-p -u -P -N -R`), else
    /// the binary's name, else pool mode (solo with `-B`, which no proxy mode takes).
    pub(crate) fn select(cli: &Cli, argv0: &str) -> Result<Self, ConfigError> {
        let flags: Vec<Self> = [
            (cli.proxy, Self::Proxy),
            (cli.userproxy, Self::UserProxy),
            (cli.passthrough, Self::Passthrough),
            (cli.node, Self::Node),
            (cli.redirector, Self::Redirector),
        ]
        .into_iter()
        .filter_map(|(set, mode)| set.then_some(mode))
        .collect();
        let mode = match flags.as_slice() {
            [] => Self::from_binary_name(argv0).unwrap_or(Self::Pool),
            [one] => *one,
            _ => {
                return Err(ConfigError(
                    "-p, -u, -P, -N and -R cannot be combined".into(),
                ));
            }
        };
        match (mode, cli.btcsolo) {
            (Self::Pool, true) => Ok(Self::Solo),
            (Self::Pool, false) => Ok(Self::Pool),
            (other, true) => Err(ConfigError(format!(
                "-B (solo) cannot be combined with {other} mode"
            ))),
            (other, false) => Ok(other),
        }
    }

    /// The instance name when `-n` is not given (ckpool's defaults).
    pub(crate) fn default_name(self) -> &'static str {
        match self {
            Self::Pool | Self::Solo => "ckpool",
            Self::Proxy | Self::UserProxy => "ckproxy",
            Self::Passthrough => "ckpassthrough",
            Self::Node => "cknode",
            Self::Redirector => "ckredirector",
        }
    }

    /// Its name in messages.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pool => "pool",
            Self::Solo => "solo",
            Self::Proxy => "proxy",
            Self::UserProxy => "userproxy",
            Self::Passthrough => "passthrough",
            Self::Node => "node",
            Self::Redirector => "redirector",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stratum listen address.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Listener {
    /// As configured (`host:port`).
    pub(crate) url: String,
    /// What it resolved to.
    pub(crate) addr: SocketAddr,
    /// Its start/minimum difficulty rule.
    pub(crate) diff: ListenerDiff,
    /// Named in `passthroughserver`: clients on it may become passthroughs.
    pub(crate) passthrough: bool,
    /// Named in `nodeserver`: clients on it may become nodes.
    pub(crate) node: bool,
}

/// Everything the daemon was told, typed and checked.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// What it runs as.
    pub(crate) mode: Mode,
    /// Instance name.
    pub(crate) name: String,
    /// The config file read.
    pub(crate) config_path: PathBuf,
    /// Socket directory: admin socket `listener`, pid file `main.pid`.
    pub(crate) sockdir: PathBuf,
    /// `-g`: the group given the socket directory and sockets.
    pub(crate) group: Option<String>,
    /// No periodic status line.
    pub(crate) quiet: bool,
    /// Write the share log.
    pub(crate) log_shares: bool,
    /// Kill a running instance of the same name (`-k`).
    pub(crate) kill_old: bool,
    /// Take the listeners and connections over from a running instance of the same name (`-H`).
    pub(crate) handover: bool,
    /// I/O backend.
    pub(crate) backend: BackendKind,
    /// How connector threads hand events to the stratifier.
    pub(crate) handoff: Handoff,
    /// Connector threads.
    pub(crate) threads: usize,
    /// Stratum listeners, `serverurl` then the `listendiff` addresses not in it.
    pub(crate) listeners: Vec<Listener>,
    /// The config file's validated contents.
    pub(crate) file: Config,
}

/// Reads an environment variable (a parameter so tests need not touch the process environment).
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub(crate) fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

impl Settings {
    /// Reads the config file the command line names (default `<name>.conf`) and makes the
    /// settings; logs the file's warnings.
    pub(crate) fn load(cli: &Cli, mode: Mode, env: Env<'_>) -> Result<Self, ConfigError> {
        let path = config_path(cli, mode);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        let loaded = common::config::parse(&text)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        for w in &loaded.warnings {
            warn!("{}: {w}", path.display());
        }
        Self::new(cli, mode, loaded.config, env)
    }

    /// The settings from a command line, a mode and a parsed config file.
    pub(crate) fn new(
        cli: &Cli,
        mode: Mode,
        file: Config,
        env: Env<'_>,
    ) -> Result<Self, ConfigError> {
        let name = instance_name(cli, mode).to_owned();
        let config_path = config_path(cli, mode);
        let sockdir = cli
            .sockdir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/{name}")));

        let handoff_name = first_of(cli.handoff.as_deref(), env, "POOL_HANDOFF", &file.handoff);
        let handoff = Handoff::from_name(&handoff_name).ok_or_else(|| {
            ConfigError(format!(
                "handoff {handoff_name} is not one of inline, queue"
            ))
        })?;
        let io = first_of(cli.io.as_deref(), env, "POOL_BACKEND", &file.io);
        let backend: BackendKind = io.parse().map_err(|_| {
            ConfigError(format!("io backend {io} is not one of auto, uring, epoll"))
        })?;

        if mode == Mode::Pool && file.btcaddress.is_none() {
            return Err(ConfigError(
                "pool mode needs a btcaddress in the config".into(),
            ));
        }
        let threads = file
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let listeners = listeners(&file)?;
        Ok(Self {
            mode,
            name,
            config_path,
            sockdir,
            group: cli.group.clone(),
            quiet: cli.quiet,
            log_shares: cli.log_shares,
            kill_old: cli.killold,
            handover: cli.handover,
            backend,
            handoff,
            threads,
            listeners,
            file,
        })
    }

    /// The pid file's path.
    pub(crate) fn pidfile(&self) -> PathBuf {
        self.sockdir.join("main.pid")
    }

    /// The admin socket's path.
    pub(crate) fn admin_socket(&self) -> PathBuf {
        self.sockdir.join("listener")
    }

    /// Log, stats and share-log root.
    pub(crate) fn logdir(&self) -> &Path {
        &self.file.logdir
    }

    /// How often the stats files are rewritten.
    pub(crate) fn statsupdate(&self) -> Duration {
        self.file.statsupdate
    }

    /// The read-only HTTP listener's address (`webserver`), `None` when it is off.
    pub(crate) fn webserver(&self) -> Option<&str> {
        self.file.webserver.as_deref()
    }

    /// For each listener, whether clients on it may become nodes.
    pub(crate) fn node_listeners(&self) -> Arc<[bool]> {
        self.listeners.iter().map(|l| l.node).collect()
    }

    /// For each listener, whether clients on it may become passthroughs.
    pub(crate) fn passthrough_listeners(&self) -> Arc<[bool]> {
        self.listeners.iter().map(|l| l.passthrough).collect()
    }

    /// The connector's configuration.
    pub(crate) fn connector(&self) -> connector::Config {
        connector::Config {
            listen: self.listeners.iter().map(|l| l.addr).collect(),
            threads: self.threads,
            max_line: self.file.maxlinelength,
            backend: self.backend,
            pin: self.file.pin,
            max_conns: self.file.maxclients,
            max_conns_per_ip: self.file.maxclientsperip,
            max_outbound_total: self.file.maxoutbound,
            idle_timeout: self.file.idletimeout,
            pause_reads_at: self.file.pausereads,
            stall_timeout: self.file.stalltimeout,
            ..connector::Config::default()
        }
    }

    /// The generator's configuration.
    pub(crate) fn generator(&self) -> GeneratorConfig {
        GeneratorConfig {
            btcd: self
                .file
                .btcd
                .iter()
                .map(|b| BtcdConfig {
                    url: b.url.clone(),
                    auth: b.auth.clone(),
                    pass: b.pass.clone(),
                    cookie: b.cookie.clone(),
                    notify: b.notify,
                })
                .collect(),
            blockpoll: self.file.blockpoll,
            update_interval: self.file.update_interval,
            zmqblock: self.file.zmqblock.clone(),
            // Every block candidate is written here (fsynced) before it is submitted, and what is
            // still pending at start-up is submitted again.
            block_dir: Some(self.file.logdir.join("blocks")),
            ..GeneratorConfig::default()
        }
    }

    /// The stratifier's configuration, once the node has said which `network` it is on (the
    /// addresses are checked against it).
    pub(crate) fn pool(&self, network: Network) -> Result<PoolConfig, ConfigError> {
        let f = &self.file;
        let payout = match (&f.btcaddress, self.mode) {
            (Some(a), Mode::Pool) => Some(
                common::address::script_for_address(a, network)
                    .map_err(|e| ConfigError(format!("btcaddress {a}: {e} for {network:?}")))?,
            ),
            _ => None,
        };
        let donation = match (f.donation > 0.0, &f.donaddress) {
            (true, Some(a)) => Some((
                f.donation,
                common::address::script_for_address(a, network)
                    .map_err(|e| ConfigError(format!("donaddress {a}: {e} for {network:?}")))?,
            )),
            (true, None) => {
                warn!("donation is set but donaddress is not: no donation output");
                None
            }
            _ => None,
        };
        let mut p = PoolConfig::new(network, payout);
        p.solo = self.mode == Mode::Solo;
        p.coinbase.btcsig = f.btcsig.as_bytes().to_vec();
        p.coinbase.nonce1_len = f.nonce1length;
        p.coinbase.nonce2_len = f.nonce2length;
        p.coinbase.donation = donation;
        p.version_mask = f.version_mask;
        p.mindiff = f.mindiff;
        p.startdiff = f.startdiff;
        p.maxdiff = f.maxdiff;
        p.listener_diff = self.listeners.iter().map(|l| l.diff).collect();
        p.agent_diff = f
            .useragentdiff
            .iter()
            .map(|r| AgentDiff {
                pattern: r.pattern.clone(),
                min: r.mindiff,
            })
            .collect();
        p.diff_pow2 = f.diffpow2;
        p.update_interval = f.update_interval;
        p.auth_timeout = f.authtimeout;
        p.max_parked = f.maxparked;
        p.max_invalid_shares = f.maxinvalidshares;
        p.stats_idle = f.statsidle;
        p.max_users_per_ip = f.maxusersperip;
        p.name.clone_from(&self.name);
        Ok(p)
    }
}

fn instance_name(cli: &Cli, mode: Mode) -> &str {
    cli.name.as_deref().unwrap_or(mode.default_name())
}

/// `-c`, else `<name>.conf` in the current directory.
fn config_path(cli: &Cli, mode: Mode) -> PathBuf {
    cli.config
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.conf", instance_name(cli, mode))))
}

/// The command line's value, else the environment's, else the config file's.
fn first_of(cli: Option<&str>, env: Env<'_>, key: &str, file: &str) -> String {
    cli.map(str::to_owned)
        .or_else(|| env(key))
        .unwrap_or_else(|| file.to_owned())
}

/// The listen addresses (`serverurl`, then each `listendiff`, `passthroughserver` and
/// `nodeserver` address it lacks) with their rules.
fn listeners(f: &Config) -> Result<Vec<Listener>, ConfigError> {
    let mut urls = f.serverurl.clone();
    for url in f
        .listendiff
        .iter()
        .map(|r| &r.url)
        .chain(&f.passthroughserver)
        .chain(&f.nodeserver)
    {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    urls.into_iter()
        .map(|url| {
            let addr = url
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    ConfigError(format!("serverurl {url} does not resolve to an address"))
                })?;
            let diff = match f.listendiff.iter().find(|r| r.url == url) {
                Some(r) => ListenerDiff {
                    start: r.startdiff,
                    min: r.mindiff,
                },
                // ckpool's rule: ports above 4000 start at and never go below `highdiff` (opt-in
                // here: only when the file sets `highdiff`).
                None if f.highdiff_ports && addr.port() > 4000 => ListenerDiff {
                    start: Some(f.startdiff.max(f.highdiff)),
                    min: Some(f.highdiff),
                },
                None => ListenerDiff::default(),
            };
            let passthrough = f.passthroughserver.contains(&url);
            let node = f.nodeserver.contains(&url);
            Ok(Listener {
                url,
                addr,
                diff,
                passthrough,
                node,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use common::Difficulty;

    use super::*;

    const PAYOUT: &str = "14BMjogz69qe8hk9thyzbmR5pg34mVKB1e";
    const DONATE: &str = "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa";

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ckpool-rs").chain(args.iter().copied()))
            .expect("command line")
    }

    fn file(json: &str) -> Config {
        common::config::parse(json).expect("config").config
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn settings(args: &[&str], json: &str) -> Settings {
        let cli = cli(args);
        let mode = Mode::select(&cli, "ckpool-rs").expect("mode");
        Settings::new(&cli, mode, file(json), &no_env).expect("settings")
    }

    fn diff(d: f64) -> Difficulty {
        Difficulty::from_f64(d).expect("difficulty")
    }

    #[test]
    fn binary_names_select_ckpools_modes() {
        for (argv0, mode) in [
            ("ckproxy", Some(Mode::Proxy)),
            ("/usr/local/bin/ckpassthrough", Some(Mode::Passthrough)),
            ("./cknode", Some(Mode::Node)),
            ("ckredirector", Some(Mode::Redirector)),
            ("ckpool", None),
            ("ckpool-rs", None),
            ("/opt/ckproxy/ckpool-rs", None),
            ("ckproxy2", None),
            ("", None),
        ] {
            assert_eq!(Mode::from_binary_name(argv0), mode, "{argv0}");
        }
        let plain = cli(&[]);
        assert_eq!(Mode::select(&plain, "ckpool-rs").ok(), Some(Mode::Pool));
        assert_eq!(Mode::select(&plain, "/bin/cknode").ok(), Some(Mode::Node));
        assert_eq!(Mode::select(&cli(&["-B"]), "ckpool").ok(), Some(Mode::Solo));
        // A flag wins over the name; two mode flags, or -B with a proxy mode, are refused.
        assert_eq!(
            Mode::select(&cli(&["-u"]), "ckproxy").ok(),
            Some(Mode::UserProxy)
        );
        assert!(Mode::select(&cli(&["-p", "-P"]), "ckpool-rs").is_err());
        assert!(Mode::select(&cli(&["-B"]), "ckproxy").is_err());
        assert_eq!(Mode::Passthrough.default_name(), "ckpassthrough");
    }

    #[test]
    fn name_config_and_sockdir_follow_the_mode() {
        let c = cli(&[]);
        let s = Settings::new(&c, Mode::Solo, file("{}"), &no_env).expect("settings");
        assert_eq!(s.name, "ckpool");
        assert_eq!(s.config_path, PathBuf::from("ckpool.conf"));
        assert_eq!(s.pidfile(), PathBuf::from("/tmp/ckpool/main.pid"));
        let s = Settings::new(&c, Mode::Proxy, file("{}"), &no_env).expect("settings");
        assert_eq!(s.name, "ckproxy");
        let s = settings(&["-B", "-n", "x", "-s", "/run/x", "-c", "y.conf"], "{}");
        assert_eq!(
            (s.name.as_str(), s.admin_socket(), s.config_path),
            (
                "x",
                PathBuf::from("/run/x/listener"),
                PathBuf::from("y.conf")
            )
        );
    }

    #[test]
    fn pool_mode_needs_a_btcaddress() {
        let c = cli(&[]);
        let err = Settings::new(&c, Mode::Pool, file("{}"), &no_env).expect_err("refused");
        assert!(err.0.contains("btcaddress"), "{err}");
        let s = settings(&[], &format!(r#"{{"btcaddress": "{PAYOUT}"}}"#));
        let p = s.pool(Network::Bitcoin).expect("pool config");
        assert!(!p.solo);
        assert_eq!(
            p.payout,
            Some(common::address::script_for_address(PAYOUT, Network::Bitcoin).expect("script"))
        );
        // On another network the address is refused.
        assert!(s.pool(Network::Regtest).is_err());
        // Solo mode pays no configured address even when one is set.
        let s = settings(&["-B"], &format!(r#"{{"btcaddress": "{PAYOUT}"}}"#));
        let p = s.pool(Network::Bitcoin).expect("pool config");
        assert!(p.solo && p.payout.is_none());
    }

    #[test]
    fn passthroughserver_addresses_are_listened_on_and_flagged() {
        let s = settings(
            &["-B"],
            r#"{"serverurl": ["127.0.0.1:3333", "127.0.0.1:3334"],
                "passthroughserver": ["127.0.0.1:3334", "127.0.0.1:3335"],
                "nodeserver": ["127.0.0.1:3336", "127.0.0.1:3333"]}"#,
        );
        let urls: Vec<(&str, bool)> = s
            .listeners
            .iter()
            .map(|l| (l.url.as_str(), l.passthrough))
            .collect();
        assert_eq!(
            urls,
            [
                ("127.0.0.1:3333", false),
                ("127.0.0.1:3334", true),
                ("127.0.0.1:3335", true),
                ("127.0.0.1:3336", false)
            ]
        );
        assert_eq!(&*s.passthrough_listeners(), &[false, true, true, false]);
        assert_eq!(&*s.node_listeners(), &[true, false, false, true]);
        assert_eq!(s.connector().listen.len(), 4);
    }

    #[test]
    fn listener_difficulties_and_highdiff_ports() {
        // Without `highdiff` in the file, ports above 4000 are ordinary.
        let s = settings(
            &["-B"],
            r#"{"serverurl": ["127.0.0.1:3333", "127.0.0.1:4334"]}"#,
        );
        assert!(
            s.listeners
                .iter()
                .all(|l| l.diff == ListenerDiff::default())
        );

        let s = settings(
            &["-B"],
            r#"{"serverurl": ["127.0.0.1:3333", "127.0.0.1:4334", "127.0.0.1:5000"],
                "startdiff": 42, "highdiff": 1000,
                "listendiff": [{"url": "127.0.0.1:5000", "startdiff": 64, "mindiff": 8},
                               {"url": "127.0.0.1:6000", "mindiff": 2}]}"#,
        );
        let urls: Vec<&str> = s.listeners.iter().map(|l| l.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "127.0.0.1:3333",
                "127.0.0.1:4334",
                "127.0.0.1:5000",
                "127.0.0.1:6000"
            ],
            "listendiff addresses missing from serverurl are added, in order"
        );
        let rules: Vec<ListenerDiff> = s.listeners.iter().map(|l| l.diff).collect();
        assert_eq!(
            rules,
            [
                ListenerDiff::default(),
                // highdiff port: starts at and never goes below highdiff.
                ListenerDiff {
                    start: Some(diff(1000.0)),
                    min: Some(diff(1000.0))
                },
                // An explicit rule wins over the highdiff rule.
                ListenerDiff {
                    start: Some(diff(64.0)),
                    min: Some(diff(8.0))
                },
                ListenerDiff {
                    start: None,
                    min: Some(diff(2.0))
                },
            ]
        );
        let p = s.pool(Network::Bitcoin).expect("pool config");
        assert_eq!(p.listener_diff, rules);
        let c = s.connector();
        assert_eq!(
            c.listen,
            s.listeners.iter().map(|l| l.addr).collect::<Vec<_>>()
        );
        assert_eq!(c.listen[3].port(), 6000);
    }

    #[test]
    fn unresolvable_listen_address_is_a_config_error() {
        let c = cli(&["-B"]);
        let err = Settings::new(
            &c,
            Mode::Solo,
            file(r#"{"serverurl": "no-port-here"}"#),
            &no_env,
        )
        .expect_err("refused");
        assert!(err.0.contains("no-port-here"), "{err}");
    }

    #[test]
    fn donation_needs_an_address_on_the_nodes_network() {
        let s = settings(
            &[],
            &format!(r#"{{"btcaddress": "{PAYOUT}", "donation": 2, "donaddress": "{DONATE}"}}"#),
        );
        let p = s.pool(Network::Bitcoin).expect("pool config");
        let (pct, script) = p.coinbase.donation.expect("a donation output");
        assert_eq!(pct, 2.0);
        assert_eq!(
            script,
            common::address::script_for_address(DONATE, Network::Bitcoin).expect("script")
        );
        // Without donaddress: no donation output (and a warning).
        let s = settings(
            &[],
            &format!(r#"{{"btcaddress": "{PAYOUT}", "donation": 2}}"#),
        );
        assert!(
            s.pool(Network::Bitcoin)
                .expect("pool")
                .coinbase
                .donation
                .is_none()
        );
        // A donation address for another network is refused.
        let s = settings(
            &["-B"],
            &format!(r#"{{"donation": 1, "donaddress": "{DONATE}"}}"#),
        );
        let err = s.pool(Network::Regtest).expect_err("refused");
        assert!(err.0.contains("donaddress"), "{err}");
    }

    #[test]
    fn backend_and_handoff_precedence_cli_then_env_then_file() {
        let json = r#"{"io": "uring", "handoff": "queue"}"#;
        let env = |k: &str| match k {
            "POOL_BACKEND" => Some("epoll".to_owned()),
            "POOL_HANDOFF" => Some("inline".to_owned()),
            _ => None,
        };
        let from = |args: &[&str], env: Env<'_>| {
            let c = cli(args);
            Settings::new(&c, Mode::Solo, file(json), env).expect("settings")
        };
        let s = from(&[], &no_env);
        assert_eq!((s.backend, s.handoff), (BackendKind::Uring, Handoff::Queue));
        let s = from(&[], &env);
        assert_eq!(
            (s.backend, s.handoff),
            (BackendKind::Epoll, Handoff::Inline)
        );
        let s = from(&["--io", "auto", "--handoff", "queue"], &env);
        assert_eq!((s.backend, s.handoff), (BackendKind::Auto, Handoff::Queue));
        assert_eq!(s.connector().backend, BackendKind::Auto);
        // A bad value from any source is a config error naming it.
        let bad_env = |k: &str| (k == "POOL_HANDOFF").then(|| "spin".to_owned());
        let c = cli(&[]);
        let err = Settings::new(&c, Mode::Solo, file(json), &bad_env).expect_err("refused");
        assert_eq!(err.0, "handoff spin is not one of inline, queue");
        let c = cli(&["--io", "kqueue"]);
        let err = Settings::new(&c, Mode::Solo, file(json), &no_env).expect_err("refused");
        assert!(err.0.contains("kqueue"), "{err}");
    }

    #[test]
    fn file_values_reach_the_three_configs() {
        let s = settings(
            &["-B", "-L", "-q", "-k"],
            r#"{"btcd": [{"url": "127.0.0.1:18443", "auth": "u", "pass": "p", "notify": true}],
                "blockpoll": 250, "update_interval": 20, "zmqblock": null,
                "threads": 3, "maxlinelength": 4096, "maxclients": 10, "pin": false,
                "maxclientsperip": 4, "maxoutbound": 256, "idletimeout": 90,
                "pausereads": 128, "stalltimeout": 12,
                "btcsig": "/sig/", "nonce1length": 6, "nonce2length": 4,
                "mindiff": 2, "startdiff": 4, "maxdiff": 64, "diffpow2": true,
                "version_mask": "1fff0000", "authtimeout": 7,
                "maxparked": 500, "maxinvalidshares": 40, "statsidle": 7200, "maxusersperip": 9,
                "useragentdiff": [{"match": "NiceHash", "mindiff": 512}]}"#,
        );
        assert!(s.log_shares && s.quiet && s.kill_old);
        let g = s.generator();
        assert_eq!(g.btcd.len(), 1);
        assert_eq!(
            (
                g.btcd[0].url.as_str(),
                g.btcd[0].auth.as_str(),
                g.btcd[0].notify
            ),
            ("127.0.0.1:18443", "u", true)
        );
        assert_eq!(g.blockpoll, Duration::from_millis(250));
        assert_eq!(g.update_interval, Duration::from_secs(20));
        assert_eq!(g.zmqblock, None);
        assert_eq!(g.block_dir, Some(s.logdir().join("blocks")));
        assert_eq!(g.shutdown_grace, GeneratorConfig::default().shutdown_grace);

        let c = s.connector();
        assert_eq!(
            (c.threads, c.max_line, c.max_conns, c.pin),
            (3, 4096, Some(10), false)
        );
        assert_eq!(
            (c.max_conns_per_ip, c.max_outbound_total, c.idle_timeout),
            (Some(4), 256 << 20, Some(Duration::from_secs(90)))
        );
        assert_eq!(
            (c.pause_reads_at, c.stall_timeout),
            (Some(128 << 10), Some(Duration::from_secs(12)))
        );

        let p = s.pool(Network::Bitcoin).expect("pool config");
        assert_eq!(p.coinbase.btcsig, b"/sig/");
        assert_eq!((p.coinbase.nonce1_len, p.coinbase.nonce2_len), (6, 4));
        assert_eq!(
            (p.mindiff, p.startdiff, p.maxdiff),
            (diff(2.0), diff(4.0), Some(diff(64.0)))
        );
        assert!(p.diff_pow2);
        assert_eq!(p.version_mask, 0x1fff_0000);
        assert_eq!(p.auth_timeout, Duration::from_secs(7));
        assert_eq!(
            (p.max_parked, p.max_invalid_shares, p.stats_idle),
            (500, 40, Duration::from_secs(7200))
        );
        assert_eq!(p.max_users_per_ip, 9);
        assert_eq!(p.update_interval, Duration::from_secs(20));
        assert_eq!(p.agent_diff[0].pattern, "nicehash");
        assert_eq!(p.name, "ckpool");
    }

    #[test]
    fn defaults_come_from_the_config_file_schema() {
        let s = settings(&["-B"], "{}");
        let d = Config::default();
        let p = s.pool(Network::Bitcoin).expect("pool config");
        assert_eq!(
            (p.mindiff, p.startdiff, p.maxdiff),
            (d.mindiff, d.startdiff, d.maxdiff)
        );
        assert_eq!(p.coinbase.nonce2_len, d.nonce2length);
        assert_eq!(p.auth_timeout, d.authtimeout);
        assert_eq!(
            (p.max_parked, p.max_invalid_shares, p.stats_idle),
            (d.maxparked, d.maxinvalidshares, d.statsidle)
        );
        assert_eq!(p.max_users_per_ip, d.maxusersperip);
        assert_eq!(s.generator().blockpoll, d.blockpoll);
        assert_eq!(s.generator().zmqblock, d.zmqblock);
        assert_eq!(s.connector().max_line, d.maxlinelength);
        assert_eq!(s.connector().listen[0].port(), 3333);
        assert_eq!((s.backend, s.handoff), (BackendKind::Auto, Handoff::Inline));
    }
}
