//! One runner per mode. Pool and solo mode run [`pool::run`], passthrough mode
//! [`passthrough::run`], node mode [`node::run`] (a passthrough with checks of its own), proxy
//! mode [`proxy::run`]; userproxy and redirector have none yet.

pub(crate) mod node;
pub(crate) mod passthrough;
pub(crate) mod pool;
pub(crate) mod proxy;

use crate::instance::Instance;
use crate::settings::{ConfigError, Mode, Settings};

/// Whether `mode` has a runner: checked before the config file is read, so that the error
/// names what is missing rather than a config key.
pub(crate) fn check_implemented(mode: Mode) -> Result<(), ConfigError> {
    match mode {
        Mode::Pool | Mode::Solo | Mode::Passthrough | Mode::Proxy | Mode::Node => Ok(()),
        Mode::UserProxy | Mode::Redirector => Err(ConfigError(format!(
            "{mode} mode is not implemented yet (only pool, solo, proxy, passthrough and node mode are)"
        ))),
    }
}

/// Runs the daemon in `settings.mode` until `instance.shutdown` is set, and stops it.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    check_implemented(settings.mode)?;
    match settings.mode {
        Mode::Pool | Mode::Solo => pool::run(settings, instance),
        Mode::Passthrough => passthrough::run(settings, &instance.shutdown),
        Mode::Proxy => proxy::run(settings, &instance.shutdown),
        Mode::Node => node::run(settings, &instance.shutdown),
        Mode::UserProxy | Mode::Redirector => {
            Err(ConfigError(format!("{} mode has no runner", settings.mode)).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pool_solo_proxy_passthrough_and_node_are_implemented() {
        assert!(check_implemented(Mode::Pool).is_ok());
        assert!(check_implemented(Mode::Solo).is_ok());
        assert!(check_implemented(Mode::Passthrough).is_ok());
        assert!(check_implemented(Mode::Proxy).is_ok());
        assert!(check_implemented(Mode::Node).is_ok());
        for mode in [Mode::UserProxy, Mode::Redirector] {
            let err = check_implemented(mode).expect_err("not implemented");
            assert!(
                err.0
                    .starts_with(&format!("{mode} mode is not implemented")),
                "{err}"
            );
        }
    }
}
