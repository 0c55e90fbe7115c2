//! One runner per mode. Pool and solo mode run [`pool::run`], passthrough mode
//! [`passthrough::run`], redirector mode [`redirector::run`] (a passthrough with a watch),
//! proxy and userproxy mode [`proxy::run`]; node has none yet.

pub(crate) mod passthrough;
pub(crate) mod pool;
pub(crate) mod proxy;
pub(crate) mod redirector;

use crate::instance::Instance;
use crate::settings::{ConfigError, Mode, Settings};

/// Whether `mode` has a runner: checked before the config file is read, so that the error
/// names what is missing rather than a config key.
pub(crate) fn check_implemented(mode: Mode) -> Result<(), ConfigError> {
    match mode {
        Mode::Pool
        | Mode::Solo
        | Mode::Passthrough
        | Mode::Redirector
        | Mode::Proxy
        | Mode::UserProxy => Ok(()),
        Mode::Node => Err(ConfigError(format!(
            "{mode} mode is not implemented yet (only pool, solo, proxy, userproxy, passthrough and redirector mode are)"
        ))),
    }
}

/// Runs the daemon in `settings.mode` until `instance.shutdown` is set, and stops it.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    check_implemented(settings.mode)?;
    match settings.mode {
        Mode::Pool | Mode::Solo => pool::run(settings, instance),
        Mode::Passthrough => passthrough::run(settings, &instance.shutdown),
        Mode::Redirector => redirector::run(settings, &instance.shutdown),
        Mode::Proxy => proxy::run(settings, &instance.shutdown, false),
        Mode::UserProxy => proxy::run(settings, &instance.shutdown, true),
        Mode::Node => Err(ConfigError(format!("{} mode has no runner", settings.mode)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_node_is_not_implemented() {
        assert!(check_implemented(Mode::Pool).is_ok());
        assert!(check_implemented(Mode::Solo).is_ok());
        assert!(check_implemented(Mode::Passthrough).is_ok());
        assert!(check_implemented(Mode::Redirector).is_ok());
        assert!(check_implemented(Mode::Proxy).is_ok());
        assert!(check_implemented(Mode::UserProxy).is_ok());
        {
            let mode = Mode::Node;
            let err = check_implemented(mode).expect_err("not implemented");
            assert!(
                err.0
                    .starts_with(&format!("{mode} mode is not implemented")),
                "{err}"
            );
        }
    }
}
