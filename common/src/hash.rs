//! SHA-256 and sha256d. The header path uses the `sha2` crate's `compress256` (SHA-NI where the CPU
//! has it, detected at run time) with precomputed padding.

/// Single SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    todo!("helper A: {}", data.len())
}

/// Double SHA-256 of arbitrary data (transactions, coinbases).
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    todo!("helper A: {}", data.len())
}

/// Double SHA-256 of an 80-byte block header: three compressions with fixed padding.
pub fn sha256d_header(header: &[u8; 80]) -> [u8; 32] {
    todo!("helper A: {}", header.len())
}
