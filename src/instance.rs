//! This instance on the machine: its socket directory, its pid file (ckpool's `-k` handling of
//! an old instance with the same name, or `-H` taking it over) and its signals: SIGTERM and SIGINT stop it, SIGHUP
//! reopens the log file (see `crate::logging`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use parking_lot::Mutex;
use tracing::warn;

use crate::settings::{ConfigError, Settings};

/// This instance's claim on its name: the pid file exists while it lives, and it and the admin
/// socket are removed when it is dropped, on every way out (unless the instance handed itself
/// over: then they are the new instance's).
pub(crate) struct Instance {
    files: RunFiles,
    /// `-H` found a live instance: this one takes it over ([`crate::handover`]) and claims the
    /// files only once that is done ([`Instance::take_over`]).
    pending_handover: bool,
    /// Set by SIGTERM and SIGINT (and by whoever else wants the daemon to stop).
    pub(crate) shutdown: Arc<AtomicBool>,
}

impl Instance {
    /// Creates the socket directory, deals with an old instance of the same name (refuses to
    /// start beside it unless told to kill it or to take it over), writes the pid file (not yet
    /// when taking over) and installs the SIGTERM and SIGINT handlers, and the SIGHUP one that
    /// reopens the log file.
    pub(crate) fn claim(settings: &Settings) -> anyhow::Result<Self> {
        let sockdir = &settings.sockdir;
        prepare_sockdir(sockdir, settings.group.as_deref())?;
        let pidfile = settings.pidfile();
        let pending_handover = match live_old_instance(&pidfile) {
            Some(_) if settings.handover => true,
            Some(pid) => {
                kill_old_instance(pid, settings.kill_old)?;
                false
            }
            None => {
                if settings.handover {
                    warn!("-H: no running instance to take over; starting normally");
                }
                false
            }
        };
        let instance = Self {
            files: RunFiles {
                paths: Mutex::new(Vec::new()),
                disowned: AtomicBool::new(false),
            },
            pending_handover,
            shutdown: Arc::new(AtomicBool::new(false)),
        };
        if !pending_handover {
            instance.take_over(settings)?;
        }
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&instance.shutdown))
                .context("installing signal handlers")?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, crate::logging::reopen_flag())
            .context("installing the SIGHUP handler")?;
        Ok(instance)
    }

    /// Whether this instance is to take a running one over (`-H` found it alive).
    pub(crate) fn pending_handover(&self) -> bool {
        self.pending_handover
    }

    /// Writes the pid file and takes charge of it and the admin socket (removed on drop). Done by
    /// [`Instance::claim`], or after a handover by the instance that took over.
    pub(crate) fn take_over(&self, settings: &Settings) -> anyhow::Result<()> {
        let pidfile = settings.pidfile();
        std::fs::write(&pidfile, format!("{}\n", std::process::id()))
            .context("writing pid file")?;
        let admin = settings.admin_socket();
        let others = crate::admin::OTHER_SOCKETS.map(|n| admin.with_file_name(n));
        *self.files.paths.lock() = [pidfile, admin].into_iter().chain(others).collect();
        Ok(())
    }

    /// This instance handed itself over: the pid file and the admin socket are the new
    /// instance's, and are left in place on drop.
    pub(crate) fn disown(&self) {
        self.files.disowned.store(true, Ordering::Relaxed);
    }
}

/// Creates the socket directory as ckpool does: mode 0770, group `group` (`-g`, a name or a
/// number) when given. Refuses (a [`ConfigError`], exit 2) a directory that exists and belongs
/// to another user, even when run as root: its sockets could be someone else's.
fn prepare_sockdir(dir: &Path, group: Option<&str>) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let gid = group.map(group_id).transpose()?;
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let me = rustix::process::geteuid().as_raw();
            if meta.uid() != me {
                return Err(ConfigError(format!(
                    "socket directory {} belongs to uid {}, not to this user (uid {me}); \
                     choose another with -s or -n",
                    dir.display(),
                    meta.uid()
                ))
                .into());
            }
            if !meta.is_dir() {
                return Err(ConfigError(format!("{} is not a directory", dir.display())).into());
            }
        }
        Err(_) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o770))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(dir, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", dir.display()))?;
    }
    Ok(())
}

/// A group's id from its name or number (`-g`).
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| ConfigError(format!("-g {group:?}: not a group name")))?;
    let mut grp = std::mem::MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the right type and `buf.len()` is the size of
    // `buf`; getgrnam_r writes the entry into `grp` and `buf` and sets `found` to `grp` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            grp.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(ConfigError(format!("-g {group}: no such group")).into());
    }
    // SAFETY: getgrnam_r succeeded and `found` points at `grp`, which it filled in.
    Ok(unsafe { (*found).gr_gid })
}

/// Files that exist while the daemon runs (pid file, admin socket): removed when dropped, unless
/// disowned.
struct RunFiles {
    paths: Mutex<Vec<PathBuf>>,
    disowned: AtomicBool,
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        if self.disowned.load(Ordering::Relaxed) {
            return;
        }
        for path in self.paths.lock().iter() {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), error = %e, "cannot remove");
            }
        }
    }
}

/// The live instance named in the pid file, if there is one (not this process).
fn live_old_instance(pidfile: &Path) -> Option<rustix::process::Pid> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)?;
    (pid != rustix::process::getpid() && rustix::process::test_kill_process(pid).is_ok())
        .then_some(pid)
}

/// ckpool's `-k` handling: refuse to start beside a live instance unless asked to kill it.
fn kill_old_instance(pid: rustix::process::Pid, kill: bool) -> anyhow::Result<()> {
    if !kill {
        bail!(
            "an instance is already running (pid {}): start with -k to kill it or -H to take it over",
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
