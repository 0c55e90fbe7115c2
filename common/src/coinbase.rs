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
pub fn build(spec: &CoinbaseSpec<'_>) -> Result<Coinbase, CoinbaseError> {
    todo!("helper A {}", spec.height)
}

/// The BIP34 height push as Bitcoin Core serialises `CScript() << height`.
pub fn bip34_height(height: u64) -> Vec<u8> {
    todo!("helper A {height}")
}
