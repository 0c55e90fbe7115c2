//! Stratum v1 work maths for the miner: extranonce2 and version-rolling encodings and the share
//! search. The decoded job ([`Job`]: `mining.notify`, coinbase, merkle root, header) and the
//! prevhash conversions live in `common::stratum::decode` and are re-exported here.
//!
//! Everything here is pure and has no I/O, so the pieces can be unit tested against real blocks.

use common::Target;
use common::hash::sha256d_header;

pub use common::stratum::decode::{
    Job, hash_to_rpc_hex, internal_to_stratum_prevhash, stratum_prevhash_to_internal,
};

/// Extranonce2 for a counter: `len` bytes, big-endian (the counter is truncated to fit; bytes
/// beyond eight are zero).
pub fn extranonce2_bytes(counter: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    extranonce2_into(counter, &mut out);
    out
}

/// [`extranonce2_bytes`] into a buffer of the extranonce2's length.
pub fn extranonce2_into(counter: u64, out: &mut [u8]) {
    let be = counter.to_be_bytes();
    let len = out.len();
    let n = len.min(8);
    out.fill(0);
    if let (Some(dst), Some(src)) = (out.get_mut(len - n..), be.get(8 - n..)) {
        dst.copy_from_slice(src);
    }
}

/// How many distinct extranonce2 values `len` bytes hold (saturating at `u64::MAX`).
pub fn extranonce2_space(len: usize) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        1u64 << (8 * len)
    }
}

/// Version rolling within a negotiated mask.
///
/// Only the mask bits that are clear in the job's version are rolled, and the submitted bits
/// always carry the job version's own mask bits. That way the header version is the same whether
/// the pool computes it as BIP310's `(version & !mask) | (bits & mask)` or as ckpool's
/// `version | bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionRoller {
    version: u32,
    mask: u32,
    free: u32,
}

impl VersionRoller {
    /// A roller for a job version and the negotiated mask (0 disables rolling).
    pub const fn new(version: u32, mask: u32) -> Self {
        Self {
            version,
            mask,
            free: mask & !version,
        }
    }

    /// Number of distinct rolled versions (1 when nothing can roll).
    pub const fn count(&self) -> u64 {
        1u64 << self.free.count_ones()
    }

    /// For rolling counter `n` (< [`Self::count`]): the header version and the version bits to
    /// put in the submit.
    pub fn rolled(&self, n: u64) -> (u32, u32) {
        // Spread the counter's low bits over the free mask positions, lowest first.
        let mut spread = 0u32;
        let mut bit = 0u32;
        let mut free = self.free;
        while free != 0 {
            let lowest = free & free.wrapping_neg();
            if (n >> bit) & 1 == 1 {
                spread |= lowest;
            }
            free &= free - 1;
            bit += 1;
        }
        let header_version = self.version | spread;
        (header_version, header_version & self.mask)
    }
}

/// What a share search looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A hash that meets the share target. One that also meets the network target (a block) is
    /// taken only with `allow_block`; otherwise the search skips it, which is how load runs on
    /// regtest (where half of all hashes are blocks) avoid flooding the node with blocks.
    Valid {
        /// Whether a block solution may be returned.
        allow_block: bool,
    },
    /// A hash that misses the share target and is not a block: a low-difficulty share.
    LowDifficulty,
}

/// Position in a job's search space: the extranonce2 counter and the next nonce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchCursor {
    /// Extranonce2 counter (encoded with [`extranonce2_bytes`]).
    pub extranonce2: u64,
    /// Next nonce to try.
    pub nonce: u32,
}

/// A hash found by [`search_share`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundShare {
    /// Extranonce2 counter of the share.
    pub extranonce2: u64,
    /// Its nonce.
    pub nonce: u32,
    /// The header hash (internal byte order).
    pub hash: [u8; 32],
    /// Whether it meets the network target.
    pub block: bool,
}

/// Why [`search_share`] found nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchMiss {
    /// No hash of the wanted kind exists at these targets (e.g. a valid non-block share when
    /// the share target is at or below the network target).
    Impossible,
    /// The hash budget ran out; the cursor is where the search stopped.
    Budget,
    /// The extranonce2 space is used up.
    Exhausted,
}

/// Searches `job` from `cursor` for a hash of the wanted kind, trying at most `budget` hashes.
///
/// The cursor advances past every hash tried (nonce first, then extranonce2), so successive
/// searches never return the same share. `hashes` is increased by the hashes computed.
#[expect(
    clippy::too_many_arguments,
    reason = "one pure function over the whole share input"
)]
pub fn search_share(
    job: &Job,
    extranonce1: &[u8],
    nonce2_len: usize,
    version: u32,
    share_target: &Target,
    want: Want,
    cursor: &mut SearchCursor,
    budget: u64,
    hashes: &mut u64,
) -> Result<FoundShare, SearchMiss> {
    let net = Target::from_compact(job.nbits);
    match want {
        Want::Valid { allow_block: false } if share_target.0 <= net.0 => {
            return Err(SearchMiss::Impossible);
        }
        Want::LowDifficulty if share_target.0.max(net.0) == Target::MAX.0 => {
            return Err(SearchMiss::Impossible);
        }
        _ => {}
    }
    let space = extranonce2_space(nonce2_len);
    if cursor.extranonce2 >= space {
        return Err(SearchMiss::Exhausted);
    }
    let mut en2 = extranonce2_bytes(cursor.extranonce2, nonce2_len);
    let mut header = job.header(&job.merkle_root(extranonce1, &en2), version, 0);
    for _ in 0..budget {
        let nonce = cursor.nonce;
        header[76..80].copy_from_slice(&nonce.to_le_bytes());
        let hash = sha256d_header(&header);
        *hashes += 1;
        let found = FoundShare {
            extranonce2: cursor.extranonce2,
            nonce,
            hash,
            block: net.is_met_by(&hash),
        };
        // Advance past this hash before judging it.
        match cursor.nonce.checked_add(1) {
            Some(n) => cursor.nonce = n,
            None => {
                cursor.nonce = 0;
                cursor.extranonce2 += 1;
                if cursor.extranonce2 >= space {
                    return Err(SearchMiss::Exhausted);
                }
                en2 = extranonce2_bytes(cursor.extranonce2, nonce2_len);
                header = job.header(&job.merkle_root(extranonce1, &en2), version, 0);
            }
        }
        let meets = share_target.is_met_by(&hash);
        let wanted = match want {
            Want::Valid { allow_block } => meets && (allow_block || !found.block),
            Want::LowDifficulty => !meets && !found.block,
        };
        if wanted {
            return Ok(found);
        }
    }
    Err(SearchMiss::Budget)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use serde_json::json;

    fn regtest_job() -> Job {
        Job::from_notify_params(&json!([
            "1",
            GENESIS_STRATUM,
            "02000000010000000000000000000000000000000000000000000000000000000000000000ffffffff0a5108",
            format!("ffffffff0100f2052a01000000160014{}00000000", "00".repeat(20)),
            [],
            "20000000",
            "207fffff",
            "5f5e1000",
            true
        ]))
        .unwrap()
    }

    #[test]
    fn share_search_at_regtest_difficulties() {
        let job = regtest_job();
        let en1 = [1, 2, 3, 4];
        let net = Target::from_compact(job.nbits);
        let min_diff = common::Difficulty::MIN.target();
        let mut cursor = SearchCursor::default();
        let mut hashes = 0;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let f = search_share(
                &job,
                &en1,
                4,
                job.version,
                &min_diff,
                Want::Valid { allow_block: false },
                &mut cursor,
                1000,
                &mut hashes,
            )
            .unwrap();
            assert!(!f.block && min_diff.is_met_by(&f.hash) && !net.is_met_by(&f.hash));
            let en2 = extranonce2_bytes(f.extranonce2, 4);
            assert_eq!(job.share_hash(&en1, &en2, job.version, f.nonce), f.hash);
            assert!(seen.insert((f.extranonce2, f.nonce)));
        }
        // About two hashes per share: half of regtest hashes are blocks.
        assert!(hashes < 50 * 6, "{hashes} hashes for 50 shares");
        // A low-difficulty share at 2^-32 needs a hash in the top 2^-16 of the range.
        let f = search_share(
            &job,
            &en1,
            4,
            job.version,
            &min_diff,
            Want::LowDifficulty,
            &mut cursor,
            1 << 24,
            &mut hashes,
        )
        .unwrap();
        assert!(!min_diff.is_met_by(&f.hash) && !f.block);
        // At the network difficulty every share is a block.
        let net_diff = net;
        assert_eq!(
            search_share(
                &job,
                &en1,
                4,
                job.version,
                &net_diff,
                Want::Valid { allow_block: false },
                &mut cursor,
                100,
                &mut hashes
            ),
            Err(SearchMiss::Impossible)
        );
        let f = search_share(
            &job,
            &en1,
            4,
            job.version,
            &net_diff,
            Want::Valid { allow_block: true },
            &mut cursor,
            1000,
            &mut hashes,
        )
        .unwrap();
        assert!(f.block);
        assert_eq!(
            search_share(
                &job,
                &en1,
                4,
                job.version,
                &Target::MAX,
                Want::LowDifficulty,
                &mut cursor,
                100,
                &mut hashes
            ),
            Err(SearchMiss::Impossible)
        );
        let mut tiny = SearchCursor::default();
        assert_eq!(
            search_share(
                &job,
                &en1,
                4,
                job.version,
                &common::Difficulty::ONE.target(),
                Want::Valid { allow_block: false },
                &mut tiny,
                10,
                &mut hashes
            ),
            Err(SearchMiss::Impossible)
        );
    }

    #[test]
    fn share_search_wraps_nonce_into_extranonce2() {
        let job = regtest_job();
        let mut cursor = SearchCursor {
            extranonce2: 0,
            nonce: u32::MAX,
        };
        let mut hashes = 0;
        let f = search_share(
            &job,
            &[0; 4],
            1,
            job.version,
            &Target::MAX,
            Want::Valid { allow_block: true },
            &mut cursor,
            10,
            &mut hashes,
        )
        .unwrap();
        assert_eq!((f.extranonce2, f.nonce), (0, u32::MAX));
        assert_eq!(
            cursor,
            SearchCursor {
                extranonce2: 1,
                nonce: 0
            }
        );
        let mut end = SearchCursor {
            extranonce2: 255,
            nonce: u32::MAX,
        };
        let _ = search_share(
            &job,
            &[0; 4],
            1,
            job.version,
            &Target::MAX,
            Want::Valid { allow_block: true },
            &mut end,
            10,
            &mut hashes,
        );
        assert_eq!(
            search_share(
                &job,
                &[0; 4],
                1,
                job.version,
                &Target::MAX,
                Want::Valid { allow_block: true },
                &mut end,
                10,
                &mut hashes
            ),
            Err(SearchMiss::Exhausted)
        );
    }

    /// Genesis hash in stratum's word-swapped form (computed independently with Python).
    const GENESIS_STRATUM: &str =
        "0a8ce26f72b3f1b646a2a6c14ff763ae65831e939c085ae10019d66800000000";

    #[test]
    fn simple_word_swap() {
        let mut s = String::new();
        for i in 0u8..32 {
            s.push_str(&format!("{i:02x}"));
        }
        let internal = stratum_prevhash_to_internal(&s).unwrap();
        assert_eq!(&internal[..8], &[3, 2, 1, 0, 7, 6, 5, 4]);
        assert_eq!(&internal[28..], &[31, 30, 29, 28]);
    }

    #[test]
    fn extranonce2_encoding() {
        assert_eq!(hex::encode(extranonce2_bytes(1, 4)), "00000001");
        assert_eq!(hex::encode(extranonce2_bytes(0x1_0000_0102, 4)), "00000102");
        assert_eq!(
            hex::encode(extranonce2_bytes(0xabcd, 10)),
            "0000000000000000abcd"
        );
        assert!(extranonce2_bytes(5, 0).is_empty());
        assert_eq!(extranonce2_space(0), 1);
        assert_eq!(extranonce2_space(4), 1 << 32);
        assert_eq!(extranonce2_space(8), u64::MAX);
    }

    #[test]
    fn version_rolling_stays_inside_mask() {
        let r = VersionRoller::new(0x2000_0000, 0x1fff_e000);
        assert_eq!(r.count(), 1 << 16);
        assert_eq!(r.rolled(0), (0x2000_0000, 0));
        assert_eq!(r.rolled(1), (0x2000_2000, 0x2000));
        assert_eq!(r.rolled(3), (0x2000_6000, 0x6000));
        let (v, bits) = r.rolled(0xffff);
        assert_eq!(v, 0x3fff_e000);
        assert_eq!(bits, 0x1fff_e000);
        // A job version that already has a mask bit set: both pool formulas agree.
        let r = VersionRoller::new(0x2000_4000, 0x1fff_e000);
        assert_eq!(r.count(), 1 << 15);
        for n in [0, 1, 2, 77, 0x7fff] {
            let (v, bits) = r.rolled(n);
            assert_eq!(bits & !0x1fff_e000, 0);
            assert_eq!(v, (0x2000_4000 & !0x1fff_e000) | (bits & 0x1fff_e000));
            assert_eq!(v, 0x2000_4000 | bits);
        }
        assert_eq!(VersionRoller::new(0x2000_0000, 0).count(), 1);
        assert_eq!(
            VersionRoller::new(0x2000_0000, 0).rolled(0),
            (0x2000_0000, 0)
        );
    }
}
