//! The share check itself: rebuild the coinbase and header from a submission and hash them.
//! Pure and allocation-free given a reusable coinbase buffer.

use common::{block, hash, merkle};

/// Inputs of one share.
#[derive(Debug, Clone, Copy)]
pub struct ShareInput<'a> {
    /// Coinbase bytes before extranonce1.
    pub coinb1: &'a [u8],
    /// extranonce1 of the session.
    pub enonce1: &'a [u8],
    /// extranonce2 from the miner.
    pub enonce2: &'a [u8],
    /// Coinbase bytes after extranonce2.
    pub coinb2: &'a [u8],
    /// Merkle branch of the job.
    pub branch: &'a [[u8; 32]],
    /// Header version with rolled bits applied.
    pub version: u32,
    /// Previous block hash, internal order.
    pub prev_hash: &'a [u8; 32],
    /// ntime from the miner.
    pub ntime: u32,
    /// nBits of the job.
    pub bits: u32,
    /// Nonce from the miner.
    pub nonce: u32,
}

/// Result of hashing a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareHash {
    /// The header.
    pub header: [u8; 80],
    /// sha256d of the header, internal byte order.
    pub hash: [u8; 32],
}

/// Builds the coinbase into `scratch` (cleared first), folds the merkle branch, builds and hashes
/// the header.
pub fn hash_share(input: &ShareInput<'_>, scratch: &mut Vec<u8>) -> ShareHash {
    scratch.clear();
    scratch.extend_from_slice(input.coinb1);
    scratch.extend_from_slice(input.enonce1);
    scratch.extend_from_slice(input.enonce2);
    scratch.extend_from_slice(input.coinb2);
    let txid = hash::sha256d(scratch);
    let root = merkle::merkle_root_from_branch(&txid, input.branch);
    let header = block::header(
        input.version,
        input.prev_hash,
        &root,
        input.ntime,
        input.bits,
        input.nonce,
    );
    ShareHash {
        header,
        hash: hash::sha256d_header(&header),
    }
}

/// Applies rolled version bits: `(version & !mask) | (bits & mask)`.
pub const fn roll_version(version: u32, bits: u32, mask: u32) -> u32 {
    (version & !mask) | (bits & mask)
}
