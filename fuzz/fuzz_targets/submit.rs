//! Fuzz target `submit`: see `ckpool_fuzz::bodies::submit` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::submit(data));
