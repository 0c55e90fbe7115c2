//! One runner per mode. Pool and solo mode run [`pool::run`]; passthrough mode
//! [`passthrough::run`]; node mode [`node::run`] and redirector mode [`redirector::run`] (both a
//! passthrough with hooks of their own); proxy and userproxy mode [`proxy::run`].

pub(crate) mod node;
pub(crate) mod passthrough;
pub(crate) mod pool;
pub(crate) mod proxy;
pub(crate) mod redirector;

use crate::instance::Instance;
use crate::settings::{ConfigError, Mode, Settings};

/// Runs the daemon in `settings.mode` until `instance.shutdown` is set, and stops it.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    if instance.pending_handover() && !handover_supported(settings.mode) {
        return Err(ConfigError(format!(
            "-H: {} mode cannot take a running instance over yet (pool, solo, passthrough, \
             redirector, node, proxy and userproxy modes can); use -k instead of -H (the running instance's miners reconnect)",
            settings.mode
        ))
        .into());
    }
    match settings.mode {
        Mode::Pool | Mode::Solo => pool::run(settings, instance),
        Mode::Passthrough => passthrough::run(settings, instance),
        Mode::Node => node::run(settings, instance),
        Mode::Redirector => redirector::run(settings, instance),
        Mode::Proxy => proxy::run(settings, instance, false),
        Mode::UserProxy => proxy::run(settings, instance, true),
    }
}

/// Whether a mode hands its connections over on `-H` (the others refuse it: `crate::handover`).
pub(crate) fn handover_supported(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::Pool
            | Mode::Solo
            | Mode::Passthrough
            | Mode::Redirector
            | Mode::Node
            | Mode::Proxy
            | Mode::UserProxy
    )
}
