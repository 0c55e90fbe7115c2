//! Block headers and full block assembly.

use crate::template::TemplateTx;

/// Serialises an 80-byte header. Hashes are in internal byte order.
pub fn header(
    version: u32,
    prev_hash: &[u8; 32],
    merkle_root: &[u8; 32],
    ntime: u32,
    bits: u32,
    nonce: u32,
) -> [u8; 80] {
    todo!("helper A {version} {} {} {ntime} {bits} {nonce}", prev_hash.len(), merkle_root.len())
}

/// Serialises a whole block: header, transaction count, coinbase, then the template's
/// transactions. With `witness`, the coinbase is written in segwit form with the single 32-byte
/// zero witness reserved value that its commitment assumes.
pub fn assemble(header: &[u8; 80], coinbase: &[u8], witness: bool, txs: &[TemplateTx]) -> Vec<u8> {
    todo!("helper A {} {} {witness} {}", header.len(), coinbase.len(), txs.len())
}
