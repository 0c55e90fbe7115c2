//! SHA-256 and sha256d. The header path uses the `sha2` crate's `compress256` (SHA-NI where the CPU
//! has it, detected at run time) with precomputed padding.

use sha2::block_api::compress256;
use sha2::{Digest, Sha256};

/// Single SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Double SHA-256 of arbitrary data (transactions, coinbases).
pub fn sha256d(data: &[u8]) -> [u8; 32] {
    Sha256::digest(Sha256::digest(data)).into()
}

/// Double SHA-256 of an 80-byte block header: three compressions with fixed padding.
pub fn sha256d_header(header: &[u8; 80]) -> [u8; 32] {
    let (head, tail) = header.split_at(64);
    let mut blocks = [[0u8; 64]; 2];
    blocks[0].copy_from_slice(head);
    blocks[1] = HEADER_TAIL_PAD;
    blocks[1][..16].copy_from_slice(tail);
    let mut state = IV;
    compress256(&mut state, &blocks);
    second_hash(&state)
}

/// Double SHA-256 of exactly 64 bytes (a merkle node: left ‖ right): three compressions.
pub fn sha256d_64(data: &[u8; 64]) -> [u8; 32] {
    let mut state = IV;
    compress256(&mut state, &[*data, PAD_64]);
    second_hash(&state)
}

/// A SHA-256 state over a prefix whose length is a multiple of 64 bytes, plus the unhashed rest
/// of that prefix: cache it per job for `coinb1` and hash only what follows for each share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sha256dMidstate {
    /// Compression state after the whole 64-byte blocks of the prefix.
    state: [u32; 8],
    /// Number of whole blocks already compressed.
    blocks: u64,
    /// The prefix bytes after the last whole block (fewer than 64).
    rest: [u8; 64],
    /// How many bytes of `rest` are used.
    rest_len: usize,
}

impl Sha256dMidstate {
    /// Compresses the whole 64-byte blocks of `prefix` and keeps the rest.
    pub fn new(prefix: &[u8]) -> Self {
        let (blocks, rest) = prefix.as_chunks::<64>();
        let mut state = IV;
        compress256(&mut state, blocks);
        let mut buf = [0u8; 64];
        buf[..rest.len()].copy_from_slice(rest);
        Self {
            state,
            blocks: blocks.len() as u64,
            rest: buf,
            rest_len: rest.len(),
        }
    }

    /// sha256d of the prefix followed by each of `parts`, in order, without allocating.
    pub fn finish(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut state = self.state;
        let mut buf = self.rest;
        let mut used = self.rest_len;
        let mut total = self.blocks * 64 + used as u64;
        for part in parts {
            total += part.len() as u64;
            let mut data = *part;
            while !data.is_empty() {
                let take = data.len().min(64 - used);
                let (now, later) = data.split_at(take);
                buf[used..used + take].copy_from_slice(now);
                used += take;
                data = later;
                if used == 64 {
                    compress256(&mut state, &[buf]);
                    used = 0;
                }
            }
        }
        // Padding: 0x80, zeros, then the bit length as a big-endian u64.
        buf[used] = 0x80;
        buf[used + 1..].fill(0);
        if used >= 56 {
            compress256(&mut state, &[buf]);
            buf = [0u8; 64];
        }
        buf[56..].copy_from_slice(&(total * 8).to_be_bytes());
        compress256(&mut state, &[buf]);
        second_hash(&state)
    }
}

/// The second SHA-256 of sha256d: hashes the 32-byte digest held in `state` as one padded block.
fn second_hash(state: &[u32; 8]) -> [u8; 32] {
    let mut block = PAD_32;
    for (chunk, word) in block.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    let mut out_state = IV;
    compress256(&mut out_state, &[block]);
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(out_state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// SHA-256 initial state (FIPS 180-4 §5.3.3).
const IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// Builds a final padded block for a message whose last `used` bytes go at the start of the
/// block and whose total length is `total_len` bytes.
const fn pad_block(used: usize, total_len: u64) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[used] = 0x80;
    let bits = (total_len * 8).to_be_bytes();
    let mut i = 0;
    while i < 8 {
        b[56 + i] = bits[i];
        i += 1;
    }
    b
}

/// Second block of an 80-byte message: 16 message bytes (filled in per call), then padding.
const HEADER_TAIL_PAD: [u8; 64] = pad_block(16, 80);
/// The padding block that follows a 64-byte message.
const PAD_64: [u8; 64] = pad_block(0, 64);
/// The single block of a 32-byte message: 32 message bytes (filled in per call), then padding.
const PAD_32: [u8; 64] = pad_block(32, 32);

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::consensus::encode::serialize;
    use bitcoin::hashes::Hash;

    fn reference_sha256d(data: &[u8]) -> [u8; 32] {
        let once = Sha256::digest(data);
        Sha256::digest(once).into()
    }

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            hex::encode(sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // sha256d("hello"), a commonly quoted bitcoin test vector.
        assert_eq!(
            hex::encode(sha256d(b"hello")),
            "9595c9df90075148eb06860365df33584b75bff782a510c6cd4883a419833d50"
        );
    }

    #[test]
    fn genesis_header_hash() {
        let genesis = bitcoin::constants::genesis_block(bitcoin::Network::Bitcoin);
        let bytes: [u8; 80] = serialize(&genesis.header).try_into().unwrap();
        let ours = sha256d_header(&bytes);
        assert_eq!(ours, genesis.block_hash().to_byte_array());
        let mut rpc = ours;
        rpc.reverse();
        assert_eq!(
            hex::encode(rpc),
            "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"
        );
        assert_eq!(ours, reference_sha256d(&bytes));
    }

    #[test]
    fn header_and_node_paths_match_digest() {
        let mut header = [0u8; 80];
        for (i, b) in header.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        assert_eq!(sha256d_header(&header), reference_sha256d(&header));
        let mut node = [0u8; 64];
        node.copy_from_slice(&header[..64]);
        assert_eq!(sha256d_64(&node), reference_sha256d(&node));
    }

    #[test]
    fn midstate_matches_sha256d_for_all_split_points() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for total in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 200, 300] {
            let msg = &data[..total];
            let want = reference_sha256d(msg);
            for split in 0..=total {
                let (a, b) = msg.split_at(split);
                let mid = Sha256dMidstate::new(a);
                let third = b.len() / 3;
                let (b1, b2) = b.split_at(third);
                assert_eq!(mid.finish(&[b1, b2]), want, "total {total} split {split}");
                assert_eq!(mid.finish(&[b]), want);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn sha256d_matches_digest(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            proptest::prop_assert_eq!(sha256d(&data), reference_sha256d(&data));
        }
    }
}
