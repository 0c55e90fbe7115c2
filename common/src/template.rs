//! Block templates: the parts of a `getblocktemplate` answer the pool uses.
//!
//! Hashes are stored in internal byte order (as serialised in blocks), not the reversed hex order
//! that RPC prints.

use serde_json::Value;

/// One transaction of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateTx {
    /// Raw transaction bytes as the node serialises them (with witness data where it has any).
    pub data: Vec<u8>,
    /// Transaction id (hash without witness), internal byte order.
    pub txid: [u8; 32],
    /// Witness transaction id, internal byte order; equals `txid` for a transaction without witness.
    pub wtxid: [u8; 32],
}

/// A parsed block template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Block version the node asks for.
    pub version: u32,
    /// Hash of the block this one builds on, internal byte order.
    pub prev_hash: [u8; 32],
    /// Compact network target (`bits`).
    pub bits: u32,
    /// The node's current time for the block header.
    pub curtime: u32,
    /// Height of the block being built.
    pub height: u64,
    /// Total value (subsidy plus fees) the coinbase may pay, in satoshis.
    pub coinbase_value: u64,
    /// `coinbaseaux.flags` bytes (often empty).
    pub coinbase_flags: Vec<u8>,
    /// Transactions in template order.
    pub transactions: Vec<TemplateTx>,
    /// `default_witness_commitment`: the whole output script (`6a24aa21a9ed…`) if present.
    pub default_witness_commitment: Option<Vec<u8>>,
    /// The `rules` array (e.g. `csv`, `!segwit`, `taproot`, `!signet`).
    pub rules: Vec<String>,
}

/// Why a template could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// A required field is absent or has the wrong JSON type.
    #[error("getblocktemplate field {0} missing or of the wrong type")]
    Field(&'static str),
    /// A field holds malformed hex or a value out of range.
    #[error("getblocktemplate field {0} is malformed")]
    Malformed(&'static str),
}

impl Template {
    /// A template without transactions at height 1000, version 0x20000000, curtime 1,700,000,000
    /// and a 50 BTC coinbase, on `prev_hash` with `bits`: for tests and benchmarks.
    #[doc(hidden)]
    pub fn empty(prev_hash: [u8; 32], bits: u32) -> Self {
        Self {
            version: 0x2000_0000,
            prev_hash,
            bits,
            curtime: 1_700_000_000,
            height: 1000,
            coinbase_value: 50_0000_0000,
            coinbase_flags: Vec::new(),
            transactions: Vec::new(),
            default_witness_commitment: None,
            rules: Vec::new(),
        }
    }

    /// Parses the `result` object of `getblocktemplate`.
    pub fn from_gbt(v: &Value) -> Result<Self, TemplateError> {
        let version = v
            .get("version")
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .ok_or(TemplateError::Field("version"))?;
        let prev_hash = hash_field(v, "previousblockhash")?;
        let bits_hex = v
            .get("bits")
            .and_then(Value::as_str)
            .ok_or(TemplateError::Field("bits"))?;
        let bits =
            u32::from_str_radix(bits_hex, 16).map_err(|_| TemplateError::Malformed("bits"))?;
        let curtime = v
            .get("curtime")
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .ok_or(TemplateError::Field("curtime"))?;
        let height = v
            .get("height")
            .and_then(Value::as_u64)
            .ok_or(TemplateError::Field("height"))?;
        let coinbase_value = v
            .get("coinbasevalue")
            .and_then(Value::as_u64)
            .ok_or(TemplateError::Field("coinbasevalue"))?;
        let coinbase_flags = match v.get("coinbaseaux").and_then(|a| a.get("flags")) {
            Some(Value::String(s)) => {
                hex::decode(s).map_err(|_| TemplateError::Malformed("coinbaseaux.flags"))?
            }
            _ => Vec::new(),
        };
        let txs = match v.get("transactions") {
            Some(Value::Array(a)) => a.as_slice(),
            None => &[],
            Some(_) => return Err(TemplateError::Field("transactions")),
        };
        let mut transactions = Vec::with_capacity(txs.len());
        for tx in txs {
            let data = tx
                .get("data")
                .and_then(Value::as_str)
                .ok_or(TemplateError::Field("transactions[].data"))?;
            let data =
                hex::decode(data).map_err(|_| TemplateError::Malformed("transactions[].data"))?;
            // Core gives `txid` and `hash` (wtxid); older nodes and some forks give only `hash`.
            let txid = match tx.get("txid") {
                Some(_) => hash_field(tx, "txid")?,
                None => hash_field(tx, "hash")?,
            };
            let wtxid = match tx.get("hash") {
                Some(_) => hash_field(tx, "hash")?,
                None => txid,
            };
            transactions.push(TemplateTx { data, txid, wtxid });
        }
        let default_witness_commitment = match v.get("default_witness_commitment") {
            Some(Value::String(s)) => Some(
                hex::decode(s)
                    .map_err(|_| TemplateError::Malformed("default_witness_commitment"))?,
            ),
            _ => None,
        };
        let rules = match v.get("rules") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            version,
            prev_hash,
            bits,
            curtime,
            height,
            coinbase_value,
            coinbase_flags,
            transactions,
            default_witness_commitment,
            rules,
        })
    }

    /// Whether the template carries segwit transactions or a witness commitment to honour.
    pub fn has_witness_commitment(&self) -> bool {
        self.default_witness_commitment.is_some()
    }
}

/// Reads a 64-hex-digit hash field (RPC byte order) and returns it in internal byte order.
fn hash_field(v: &Value, name: &'static str) -> Result<[u8; 32], TemplateError> {
    let s = v
        .get(name)
        .and_then(Value::as_str)
        .ok_or(TemplateError::Field(name))?;
    parse_rpc_hash(s).ok_or(TemplateError::Malformed(name))
}

/// Parses a hash as RPC prints it (reversed hex) into internal byte order.
pub fn parse_rpc_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    out.reverse();
    Some(out)
}

/// Formats an internal-order hash the way RPC prints it (reversed hex).
pub fn rpc_hash_hex(h: &[u8; 32]) -> String {
    let mut r = *h;
    r.reverse();
    hex::encode(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str) -> Value {
        let path = format!("{}/../testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v.get("result").cloned().unwrap_or(v)
    }

    #[test]
    fn parses_core_segwit_template() {
        let t = Template::from_gbt(&load("core-regtest-gbt-12tx-segwit.json")).unwrap();
        assert_eq!(t.height, 111);
        assert_eq!(t.transactions.len(), 12);
        assert!(t.default_witness_commitment.is_some());
        assert!(t.transactions.iter().any(|tx| tx.txid != tx.wtxid));
    }

    #[test]
    fn missing_fields_are_errors() {
        let v: Value = serde_json::json!({"version": 1});
        assert_eq!(
            Template::from_gbt(&v),
            Err(TemplateError::Field("previousblockhash"))
        );
    }

    #[test]
    fn rpc_hash_round_trip() {
        let s = "00000000000000000001a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
        assert_eq!(rpc_hash_hex(&parse_rpc_hash(s).unwrap()), s);
    }
}
