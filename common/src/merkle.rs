//! Merkle branches for stratum (the coinbase is leaf 0) and witness commitments.

/// The merkle branch for leaf 0 given the txids (internal byte order) of every other transaction
/// in block order: the sibling hashes a miner folds the coinbase txid through.
pub fn merkle_branch(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    todo!("helper A {}", txids.len())
}

/// Folds a coinbase txid through a branch from [`merkle_branch`] into the merkle root.
pub fn merkle_root_from_branch(coinbase_txid: &[u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    todo!("helper A {} {}", coinbase_txid.len(), branch.len())
}

/// The merkle root of a full list of leaves (naive reference, also used for the witness root).
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    todo!("helper A {}", leaves.len())
}

/// BIP141 witness commitment hash: sha256d(witness root ‖ nonce), where the witness root is taken
/// over a zero coinbase wtxid followed by `wtxids` (every non-coinbase transaction, in order).
pub fn witness_commitment(wtxids: &[[u8; 32]], witness_nonce: &[u8; 32]) -> [u8; 32] {
    todo!("helper A {} {}", wtxids.len(), witness_nonce.len())
}
