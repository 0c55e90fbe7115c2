//! The bodies of ckpool-rs's fuzz targets, shared with the corpus replay test
//! (`tests/fuzz_corpus.rs` in the root package includes these files by path).
//!
//! Each body takes arbitrary bytes, drives one public API with them and asserts what must hold
//! whatever the input; a failed assertion or a panic is a finding.

pub mod bodies;
pub mod reader;
pub mod setup;
