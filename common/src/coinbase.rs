//! Coinbase transaction building, split around the extranonce slot as stratum needs it.
//!
//! The coinbase is serialised without witness data (its txid form). `coinb1` ends just before
//! extranonce1, `coinb2` starts just after extranonce2.

/// One output of the coinbase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxOutput {
    /// Value in satoshis.
    pub value: u64,
    /// Output script.
    pub script: Vec<u8>,
}

/// What goes into a coinbase.
#[derive(Clone, Debug)]
pub struct CoinbaseSpec<'a> {
    /// Block height, encoded as BIP34 requires, exactly as Bitcoin Core serialises it
    /// (`CScript() << height`: OP_1..OP_16 for 1..16, a minimal push otherwise).
    pub height: u64,
    /// `coinbaseaux.flags` bytes, pushed after the height when not empty.
    pub flags: &'a [u8],
    /// Extra bytes pushed after the flags (a per-template random element), may be empty.
    pub extra: &'a [u8],
    /// Length of extranonce1 in bytes.
    pub nonce1_len: usize,
    /// Length of extranonce2 in bytes.
    pub nonce2_len: usize,
    /// Pool tag pushed after the extranonce (e.g. `ckpool-rs`).
    pub tag: &'a [u8],
    /// Operator signature (`btcsig`), pushed after the tag when not empty; the builder truncates
    /// it so the scriptSig stays within 100 bytes.
    pub btcsig: &'a [u8],
    /// Outputs in order (generation output first).
    pub outputs: &'a [TxOutput],
    /// Full witness commitment output script (`6a24aa21a9ed…`), added as a last zero-value output.
    pub witness_commitment: Option<&'a [u8]>,
}

/// A coinbase split around the extranonce slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coinbase {
    /// Bytes before extranonce1.
    pub coinb1: Vec<u8>,
    /// Bytes after extranonce2.
    pub coinb2: Vec<u8>,
}

/// Why a coinbase could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CoinbaseError {
    /// The scriptSig would exceed 100 bytes even without the signature.
    #[error("coinbase scriptSig would be {0} bytes, more than 100")]
    ScriptSigTooLong(usize),
    /// No outputs.
    #[error("coinbase has no outputs")]
    NoOutputs,
}

/// Builds a coinbase.
///
/// The scriptSig is: BIP34 height, push(flags) and push(extra) when not empty, one byte equal to
/// `nonce1_len + nonce2_len` (a push opcode covering the extranonce when that sum is at most 75),
/// the extranonce slot, push(tag) when not empty, then push(btcsig) when not empty, truncated so
/// the scriptSig is at most 100 bytes.
pub fn build(spec: &CoinbaseSpec<'_>) -> Result<Coinbase, CoinbaseError> {
    if spec.outputs.is_empty() {
        return Err(CoinbaseError::NoOutputs);
    }
    let height = bip34_height(spec.height);
    let nonce_len = spec.nonce1_len.saturating_add(spec.nonce2_len);
    let fixed = [
        height.len(),
        push_len(spec.flags),
        push_len(spec.extra),
        1,
        nonce_len,
        push_len(spec.tag),
    ]
    .iter()
    .fold(0usize, |acc, n| acc.saturating_add(*n));
    if fixed > MAX_SCRIPT_SIG {
        return Err(CoinbaseError::ScriptSigTooLong(fixed));
    }
    let room = MAX_SCRIPT_SIG - fixed;
    let mut sig_len = spec.btcsig.len().min(room);
    while sig_len > 0 && push_len(spec.btcsig.get(..sig_len).unwrap_or_default()) > room {
        sig_len -= 1;
    }
    let btcsig = spec.btcsig.get(..sig_len).unwrap_or_default();
    let script_len = fixed + push_len(btcsig);

    let mut coinb1 = Vec::with_capacity(42 + script_len - nonce_len);
    coinb1.extend_from_slice(&1u32.to_le_bytes());
    coinb1.push(1);
    coinb1.extend_from_slice(&[0u8; 32]);
    coinb1.extend_from_slice(&u32::MAX.to_le_bytes());
    coinb1.push(u8::try_from(script_len).unwrap_or(u8::MAX));
    coinb1.extend_from_slice(&height);
    push(&mut coinb1, spec.flags);
    push(&mut coinb1, spec.extra);
    coinb1.push(u8::try_from(nonce_len).unwrap_or(u8::MAX));

    let outputs_len: usize = spec
        .outputs
        .iter()
        .map(|o| 9 + o.script.len())
        .sum::<usize>()
        + spec.witness_commitment.map_or(0, |w| 9 + w.len());
    let mut coinb2 = Vec::with_capacity(script_len + outputs_len + 20);
    push(&mut coinb2, spec.tag);
    push(&mut coinb2, btcsig);
    coinb2.extend_from_slice(&u32::MAX.to_le_bytes());
    let count = spec.outputs.len() + usize::from(spec.witness_commitment.is_some());
    write_compact_size(&mut coinb2, count as u64);
    for output in spec.outputs {
        write_output(&mut coinb2, output.value, &output.script);
    }
    if let Some(script) = spec.witness_commitment {
        write_output(&mut coinb2, 0, script);
    }
    coinb2.extend_from_slice(&0u32.to_le_bytes());
    Ok(Coinbase { coinb1, coinb2 })
}

/// The BIP34 height push as Bitcoin Core serialises `CScript() << height`.
pub fn bip34_height(height: u64) -> Vec<u8> {
    match height {
        0 => vec![0x00],
        // OP_1 .. OP_16
        1..=16 => vec![0x50 + height as u8],
        _ => {
            // A minimal little-endian script number; a set top bit needs a zero sign byte.
            let bytes = height.to_le_bytes();
            let used = 8 - (height.leading_zeros() as usize / 8);
            let mut out = Vec::with_capacity(used + 2);
            out.push(0);
            out.extend_from_slice(bytes.get(..used).unwrap_or(&bytes));
            if out.last().is_some_and(|b| b & 0x80 != 0) {
                out.push(0);
            }
            out[0] = (out.len() - 1) as u8;
            out
        }
    }
}

/// Appends a Bitcoin compact size (varint) to `out`.
pub fn write_compact_size(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=0xfc => out.push(n as u8),
        0xfd..=0xffff => {
            out.push(0xfd);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xfe);
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        _ => {
            out.push(0xff);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

/// Largest coinbase scriptSig consensus allows.
const MAX_SCRIPT_SIG: usize = 100;

/// Bytes a push of `data` takes in a script (0 for empty data, which is not pushed).
fn push_len(data: &[u8]) -> usize {
    match data.len() {
        0 => 0,
        n @ 1..=75 => 1 + n,
        n @ 76..=0xff => 2 + n,
        n @ 0x100..=0xffff => 3 + n,
        n => 5usize.saturating_add(n),
    }
}

/// Appends a minimal push of `data` (nothing for empty data).
fn push(out: &mut Vec<u8>, data: &[u8]) {
    let n = data.len();
    match n {
        0 => return,
        1..=75 => out.push(n as u8),
        76..=0xff => {
            out.push(0x4c);
            out.push(n as u8);
        }
        0x100..=0xffff => {
            out.push(0x4d);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        _ => {
            out.push(0x4e);
            out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        }
    }
    out.extend_from_slice(data);
}

/// Appends one transaction output.
fn write_output(out: &mut Vec<u8>, value: u64, script: &[u8]) {
    out.extend_from_slice(&value.to_le_bytes());
    write_compact_size(out, script.len() as u64);
    out.extend_from_slice(script);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::Transaction;
    use bitcoin::consensus::deserialize;
    use proptest::prelude::*;

    fn p2wpkh_output(value: u64) -> TxOutput {
        let mut script = vec![0x00, 0x14];
        script.extend_from_slice(&[0x11; 20]);
        TxOutput { value, script }
    }

    fn spec<'a>(height: u64, outputs: &'a [TxOutput]) -> CoinbaseSpec<'a> {
        CoinbaseSpec {
            height,
            flags: &[],
            extra: &[],
            nonce1_len: 4,
            nonce2_len: 8,
            tag: b"ckpool-rs",
            btcsig: b"test sig",
            outputs,
            witness_commitment: None,
        }
    }

    fn join(cb: &Coinbase, en1: &[u8], en2: &[u8]) -> Vec<u8> {
        [cb.coinb1.as_slice(), en1, en2, cb.coinb2.as_slice()].concat()
    }

    fn core_height_script(height: u64) -> Vec<u8> {
        bitcoin::script::Builder::new()
            .push_int(i64::try_from(height).unwrap())
            .into_script()
            .into_bytes()
    }

    #[test]
    fn bip34_encodings() {
        assert_eq!(bip34_height(0), [0x00]);
        assert_eq!(bip34_height(1), [0x51]);
        assert_eq!(bip34_height(16), [0x60]);
        assert_eq!(bip34_height(17), [0x01, 0x11]);
        assert_eq!(bip34_height(127), [0x01, 0x7f]);
        assert_eq!(bip34_height(128), [0x02, 0x80, 0x00]);
        assert_eq!(bip34_height(255), [0x02, 0xff, 0x00]);
        assert_eq!(bip34_height(256), [0x02, 0x00, 0x01]);
        assert_eq!(bip34_height(500_000), [0x03, 0x20, 0xa1, 0x07]);
        assert_eq!(bip34_height(2_442_185), [0x03, 0xc9, 0x43, 0x25]);
        assert_eq!(bip34_height(0x80_0000), [0x04, 0x00, 0x00, 0x80, 0x00]);
        assert_eq!(
            bip34_height(u64::MAX),
            [0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]
        );
    }

    #[test]
    fn layout_and_decode() {
        let outputs = [p2wpkh_output(5_000_000_000)];
        let mut commitment = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
        commitment.extend_from_slice(&[0x42; 32]);
        let mut s = spec(500_000, &outputs);
        s.flags = b"\x01\x02";
        s.extra = b"rnd";
        s.witness_commitment = Some(&commitment);
        let cb = build(&s).unwrap();
        let mut expect1 = hex::decode(
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff",
        )
        .unwrap();
        let script_len = 4 + 3 + 4 + 1 + 12 + 10 + 9;
        expect1.push(script_len);
        expect1.extend_from_slice(&[
            0x03, 0x20, 0xa1, 0x07, 0x02, 0x01, 0x02, 0x03, b'r', b'n', b'd', 12,
        ]);
        assert_eq!(hex::encode(&cb.coinb1), hex::encode(&expect1));
        assert!(
            cb.coinb2
                .starts_with(b"\x09ckpool-rs\x08test sig\xff\xff\xff\xff\x02")
        );
        assert!(cb.coinb2.ends_with(&[0, 0, 0, 0]));

        let raw = join(&cb, &[1, 2, 3, 4], &[5, 6, 7, 8, 9, 10, 11, 12]);
        let tx: Transaction = deserialize(&raw).unwrap();
        assert!(tx.is_coinbase());
        assert_eq!(tx.input.len(), 1);
        let sig = tx.input[0].script_sig.as_bytes();
        assert_eq!(sig.len(), usize::from(script_len));
        assert!(sig.starts_with(&core_height_script(500_000)));
        assert_eq!(tx.output.len(), 2);
        assert_eq!(tx.output[0].value.to_sat(), 5_000_000_000);
        assert_eq!(
            tx.output[0].script_pubkey.as_bytes(),
            outputs[0].script.as_slice()
        );
        assert_eq!(tx.output[1].value.to_sat(), 0);
        assert_eq!(tx.output[1].script_pubkey.as_bytes(), commitment.as_slice());
        assert_eq!(tx.lock_time.to_consensus_u32(), 0);
        assert_eq!(tx.input[0].sequence.0, u32::MAX);
        // The extranonce appears as one push in the script.
        let pushes: Vec<Vec<u8>> = tx.input[0]
            .script_sig
            .instructions()
            .map(|i| i.unwrap().push_bytes().unwrap().as_bytes().to_vec())
            .collect();
        assert_eq!(pushes[3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(pushes[4], b"ckpool-rs");
        assert_eq!(pushes[5], b"test sig");
    }

    #[test]
    fn txid_matches_bitcoin_crate() {
        use bitcoin::hashes::Hash;
        let outputs = [p2wpkh_output(1), p2wpkh_output(2)];
        let cb = build(&spec(17, &outputs)).unwrap();
        let raw = join(&cb, &[0; 4], &[0xff; 8]);
        let tx: Transaction = deserialize(&raw).unwrap();
        assert_eq!(
            crate::hash::sha256d(&raw),
            tx.compute_txid().to_byte_array()
        );
        assert_eq!(bitcoin::consensus::serialize(&tx), raw);
    }

    #[test]
    fn btcsig_is_truncated_to_100_bytes() {
        let outputs = [p2wpkh_output(1)];
        let long = [b'x'; 200];
        let mut s = spec(2_442_185, &outputs);
        s.btcsig = &long;
        let cb = build(&s).unwrap();
        let raw = join(&cb, &[0; 4], &[0; 8]);
        let tx: Transaction = deserialize(&raw).unwrap();
        assert_eq!(tx.input[0].script_sig.len(), 100);
        // Exactly at the limit with a PUSHDATA1 signature.
        s.nonce1_len = 0;
        s.nonce2_len = 0;
        s.tag = &[];
        let cb = build(&s).unwrap();
        let tx: Transaction = deserialize(&join(&cb, &[], &[])).unwrap();
        let sig = tx.input[0].script_sig.as_bytes();
        assert!(sig.len() == 100 || sig.len() == 99, "{}", sig.len());
        assert!(tx.input[0].script_sig.instructions().all(|i| i.is_ok()));
    }

    #[test]
    fn errors() {
        let outputs = [p2wpkh_output(1)];
        assert_eq!(build(&spec(1, &[])), Err(CoinbaseError::NoOutputs));
        let big = [0u8; 90];
        let mut s = spec(1, &outputs);
        s.extra = &big;
        assert_eq!(
            build(&s),
            Err(CoinbaseError::ScriptSigTooLong(1 + 92 + 1 + 12 + 10))
        );
        s.nonce2_len = usize::MAX;
        assert!(matches!(build(&s), Err(CoinbaseError::ScriptSigTooLong(_))));
    }

    #[test]
    fn compact_sizes() {
        for n in [
            0u64,
            1,
            0xfc,
            0xfd,
            0xffff,
            0x1_0000,
            0xffff_ffff,
            0x1_0000_0000,
            u64::MAX,
        ] {
            let mut ours = Vec::new();
            write_compact_size(&mut ours, n);
            let theirs = bitcoin::consensus::serialize(&bitcoin::VarInt(n));
            assert_eq!(ours, theirs, "{n}");
        }
    }

    proptest! {
        #[test]
        fn height_encoding_matches_core(height in 0u64..=(i64::MAX as u64)) {
            prop_assert_eq!(bip34_height(height), core_height_script(height));
        }

        #[test]
        fn coinbase_decodes_with_height(
            height in prop_oneof![0u64..300, 0u64..100_000_000],
            en1 in proptest::collection::vec(any::<u8>(), 0..9),
            en2 in proptest::collection::vec(any::<u8>(), 0..17),
            sig in proptest::collection::vec(any::<u8>(), 0..120),
            value in any::<u64>(),
        ) {
            let outputs = [p2wpkh_output(value)];
            let mut s = spec(height, &outputs);
            s.nonce1_len = en1.len();
            s.nonce2_len = en2.len();
            s.btcsig = &sig;
            let cb = build(&s).unwrap();
            let raw = join(&cb, &en1, &en2);
            let tx: Transaction = deserialize(&raw).unwrap();
            prop_assert!(tx.is_coinbase());
            let script = tx.input[0].script_sig.as_bytes();
            prop_assert!(script.len() <= 100 && script.len() >= 2);
            prop_assert!(script.starts_with(&core_height_script(height)));
            prop_assert_eq!(tx.output[0].value.to_sat(), value);
        }
    }
}
