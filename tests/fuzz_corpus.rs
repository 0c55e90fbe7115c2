//! Replays the fuzz corpus: every file of `fuzz/corpus/<target>/` and
//! `fuzz/artifacts-fixed/<target>/` through the same body the cargo-fuzz target runs, on stable
//! and without libFuzzer, so that a crash once found and fixed stays fixed.
//!
//! The bodies live in `fuzz/src/` and are included here by path (the fuzz crate is outside the
//! workspace); see `fuzz/README.md`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    unreachable_pub,
    reason = "test code: the fuzz bodies are shared with fuzz/ and assert by panicking"
)]

#[path = "../fuzz/src/bodies.rs"]
mod bodies;
#[path = "../fuzz/src/reader.rs"]
mod reader;
#[path = "../fuzz/src/setup.rs"]
mod setup;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Runs `body` over every input of `target`; fails naming each input that panics.
fn replay(target: &str, body: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs: Vec<PathBuf> = Vec::new();
    for dir in ["corpus", "artifacts-fixed"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            assert_ne!(dir, "corpus", "no fuzz/corpus/{target}/");
            continue;
        };
        inputs.extend(entries.map(|e| e.unwrap().path()));
    }
    inputs.sort();
    assert!(!inputs.is_empty(), "the corpus of {target} is empty");
    let failed: Vec<String> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            catch_unwind(AssertUnwindSafe(|| body(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs fail:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

#[test]
fn stratum_line() {
    replay("stratum_line", bodies::stratum_line);
}

#[test]
fn shard_dispatch() {
    replay("shard_dispatch", bodies::shard_dispatch);
}

#[test]
fn submit() {
    replay("submit", bodies::submit);
}

#[test]
fn gbt() {
    replay("gbt", bodies::gbt);
}

#[test]
fn admin_frame() {
    replay("admin_frame", bodies::admin_frame);
}

#[test]
fn rpc_reply() {
    replay("rpc_reply", bodies::rpc_reply);
}

#[test]
fn passthrough_frame() {
    replay("passthrough_frame", bodies::passthrough_frame);
}

#[test]
fn config() {
    replay("config", bodies::config);
}

/// The replay fails when a body fails: a corpus is no test if every input passes vacuously.
#[test]
fn a_failing_input_is_reported() {
    let result = catch_unwind(|| bodies::config(br#"{"mindiff": 10, "startdiff": 1}"#));
    assert!(result.is_ok(), "a valid config passes");
    let result = catch_unwind(|| replay("config", |_| panic!("planted failure")));
    let message = result.expect_err("a failing body fails the replay");
    let text = message
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(text.contains("ckpool.conf.example"), "{text}");
}
