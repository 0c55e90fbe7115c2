//! Merkle branches for stratum (the coinbase is leaf 0) and witness commitments.

use crate::hash::{sha256d, sha256d_64};

/// The merkle branch for leaf 0 given the txids (internal byte order) of every other transaction
/// in block order: the sibling hashes a miner folds the coinbase txid through.
pub fn merkle_branch(txids: &[[u8; 32]]) -> Vec<[u8; 32]> {
    let mut branch = Vec::new();
    // The current level without its first element (the node on the coinbase's path).
    let mut level = txids.to_vec();
    while let Some((&sibling, rest)) = level.split_first() {
        branch.push(sibling);
        // `rest` holds the level's nodes from index 2 on; pair them, duplicating an odd last one.
        level = rest
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => hash_pair(left, right),
                [single] => hash_pair(single, single),
                _ => [0u8; 32],
            })
            .collect();
    }
    branch
}

/// Folds a coinbase txid through a branch from [`merkle_branch`] into the merkle root.
pub fn merkle_root_from_branch(coinbase_txid: &[u8; 32], branch: &[[u8; 32]]) -> [u8; 32] {
    let mut root = *coinbase_txid;
    for sibling in branch {
        root = hash_pair(&root, sibling);
    }
    root
}

/// The merkle root of a full list of leaves (naive reference, also used for the witness root).
///
/// An empty list gives 32 zero bytes, as Bitcoin Core does.
pub fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [left, right] => hash_pair(left, right),
                [single] => hash_pair(single, single),
                _ => [0u8; 32],
            })
            .collect();
    }
    level.first().copied().unwrap_or([0u8; 32])
}

/// BIP141 witness commitment hash: sha256d(witness root ‖ nonce), where the witness root is taken
/// over a zero coinbase wtxid followed by `wtxids` (every non-coinbase transaction, in order).
pub fn witness_commitment(wtxids: &[[u8; 32]], witness_nonce: &[u8; 32]) -> [u8; 32] {
    let mut leaves = Vec::with_capacity(wtxids.len() + 1);
    leaves.push([0u8; 32]);
    leaves.extend_from_slice(wtxids);
    let root = merkle_root(&leaves);
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(&root);
    buf[32..].copy_from_slice(witness_nonce);
    sha256d(&buf)
}

/// The witness commitment output script: `OP_RETURN` pushing `aa21a9ed` ‖ commitment.
pub fn witness_commitment_script(commitment: &[u8; 32]) -> Vec<u8> {
    let mut script = Vec::with_capacity(38);
    script.extend_from_slice(&WITNESS_COMMITMENT_PREFIX);
    script.extend_from_slice(commitment);
    script
}

/// Start of a witness commitment output script: `OP_RETURN`, push 36, `aa21a9ed`.
pub const WITNESS_COMMITMENT_PREFIX: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];

/// sha256d(left ‖ right), one merkle node.
fn hash_pair(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(left);
    buf[32..].copy_from_slice(right);
    sha256d_64(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn leaf(i: u8) -> [u8; 32] {
        [i; 32]
    }

    #[test]
    fn small_trees() {
        assert_eq!(merkle_root(&[]), [0u8; 32]);
        assert_eq!(merkle_root(&[leaf(1)]), leaf(1));
        assert_eq!(merkle_branch(&[]), Vec::<[u8; 32]>::new());
        assert_eq!(merkle_root_from_branch(&leaf(9), &[]), leaf(9));
        let two = merkle_root(&[leaf(0), leaf(1)]);
        assert_eq!(two, hash_pair(&leaf(0), &leaf(1)));
        // Three leaves: the last one is paired with itself.
        let three = merkle_root(&[leaf(0), leaf(1), leaf(2)]);
        assert_eq!(
            three,
            hash_pair(
                &hash_pair(&leaf(0), &leaf(1)),
                &hash_pair(&leaf(2), &leaf(2))
            )
        );
        assert_eq!(
            merkle_branch(&[leaf(1), leaf(2)]),
            vec![leaf(1), hash_pair(&leaf(2), &leaf(2))]
        );
    }

    #[test]
    fn matches_bitcoin_crate() {
        use bitcoin::hashes::Hash;
        let leaves: Vec<[u8; 32]> = (0..13u8).map(|i| crate::hash::sha256(&[i])).collect();
        let theirs = bitcoin::merkle_tree::calculate_root(
            leaves.iter().map(|l| bitcoin::Txid::from_byte_array(*l)),
        )
        .unwrap();
        assert_eq!(merkle_root(&leaves), theirs.to_byte_array());
    }

    proptest! {
        #[test]
        fn branch_folds_to_naive_root(
            coinbase in any::<[u8; 32]>(),
            txids in proptest::collection::vec(any::<[u8; 32]>(), 0..40),
        ) {
            let branch = merkle_branch(&txids);
            let mut all = vec![coinbase];
            all.extend_from_slice(&txids);
            prop_assert_eq!(merkle_root_from_branch(&coinbase, &branch), merkle_root(&all));
            // The branch has one entry per tree level.
            let levels = (usize::BITS - txids.len().leading_zeros()) as usize;
            prop_assert_eq!(branch.len(), levels);
        }
    }
}
