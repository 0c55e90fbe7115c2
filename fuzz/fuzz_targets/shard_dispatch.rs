//! Fuzz target `shard_dispatch`: see `ckpool_fuzz::bodies::shard_dispatch` for what it drives and asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpool_fuzz::bodies::shard_dispatch(data));
