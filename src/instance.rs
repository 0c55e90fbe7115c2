//! This instance on the machine: its socket directory, its pid file (ckpool's `-k` handling of
//! an old instance with the same name) and its signals: SIGTERM and SIGINT stop it, SIGHUP
//! reopens the log file (see `crate::logging`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tracing::warn;

use crate::settings::Settings;

/// This instance's claim on its name: the pid file exists while it lives, and it and the admin
/// socket are removed when it is dropped, on every way out.
pub(crate) struct Instance {
    _files: RunFiles,
    /// Set by SIGTERM and SIGINT (and by whoever else wants the daemon to stop).
    pub(crate) shutdown: Arc<AtomicBool>,
}

impl Instance {
    /// Creates the socket directory, deals with an old instance of the same name (refuses to
    /// start beside it unless told to kill it), writes the pid file and installs the SIGTERM and
    /// SIGINT handlers, and the SIGHUP one that reopens the log file.
    pub(crate) fn claim(settings: &Settings) -> anyhow::Result<Self> {
        let sockdir = &settings.sockdir;
        std::fs::create_dir_all(sockdir)
            .with_context(|| format!("creating {}", sockdir.display()))?;
        let pidfile = settings.pidfile();
        manage_old_instance(&pidfile, settings.kill_old)?;
        std::fs::write(&pidfile, format!("{}\n", std::process::id()))
            .context("writing pid file")?;
        let files = RunFiles(vec![pidfile, settings.admin_socket()]);
        let shutdown = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&shutdown))
                .context("installing signal handlers")?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, crate::logging::reopen_flag())
            .context("installing the SIGHUP handler")?;
        Ok(Self {
            _files: files,
            shutdown,
        })
    }
}

/// Files that exist while the daemon runs (pid file, admin socket): removed when dropped.
struct RunFiles(Vec<PathBuf>);

impl Drop for RunFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), error = %e, "cannot remove");
            }
        }
    }
}

/// ckpool's `-k` handling: refuse to start beside a live instance unless asked to kill it.
fn manage_old_instance(pidfile: &Path, kill: bool) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(pidfile) else {
        return Ok(());
    };
    let Some(pid) = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(());
    };
    if pid == rustix::process::getpid() || rustix::process::test_kill_process(pid).is_err() {
        return Ok(());
    }
    if !kill {
        bail!(
            "an instance is already running (pid {}): start with -k to kill it",
            pid.as_raw_nonzero()
        );
    }
    warn!(pid = pid.as_raw_nonzero().get(), "killing the old instance");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if rustix::process::test_kill_process(pid).is_err() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;
    use crate::settings::Mode;

    #[test]
    fn the_pid_file_lives_as_long_as_the_instance() {
        let dir = std::env::temp_dir().join(format!("ckpool-rs-instance-{}", std::process::id()));
        let sockdir = dir.join("sock");
        let cli = Cli::try_parse_from(
            ["ckpool-rs", "-B", "-s"]
                .iter()
                .copied()
                .map(String::from)
                .chain([sockdir.display().to_string()]),
        )
        .expect("command line");
        let file = common::config::parse("{}").expect("config").config;
        let settings = Settings::new(&cli, Mode::Solo, file, &|_| None).expect("settings");
        let instance = Instance::claim(&settings).expect("claim");
        let pid = std::fs::read_to_string(settings.pidfile()).expect("pid file");
        assert_eq!(pid.trim(), std::process::id().to_string());
        // A stand-in for the admin socket, which is removed too.
        std::fs::write(settings.admin_socket(), b"").expect("socket stand-in");
        assert!(!instance.shutdown.load(std::sync::atomic::Ordering::Relaxed));
        drop(instance);
        assert!(!settings.pidfile().exists(), "pid file left");
        assert!(!settings.admin_socket().exists(), "admin socket left");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
