//! Fuzz target `config`: see `ckpool_fuzz::bodies::config` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::config(data));
