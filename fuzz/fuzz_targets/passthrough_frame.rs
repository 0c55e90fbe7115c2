//! Fuzz target `passthrough_frame`: see `ckpool_fuzz::bodies::passthrough_frame` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::passthrough_frame(data));
