//! Fuzz target `stratum_line`: see `ckpool_fuzz::bodies::stratum_line` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::stratum_line(data));
