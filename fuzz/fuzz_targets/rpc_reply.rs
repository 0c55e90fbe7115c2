//! Fuzz target `rpc_reply`: see `ckpool_fuzz::bodies::rpc_reply` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::rpc_reply(data));
