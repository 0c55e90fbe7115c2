//! Fuzz target `gbt`: see `ckpool_fuzz::bodies::gbt` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::gbt(data));
