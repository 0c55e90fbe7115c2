//! Client-side decoders: what a stratum client reads from a pool (the subscribe result,
//! `mining.notify`, `mining.set_difficulty`, `mining.set_extranonce`, `mining.set_version_mask`,
//! `client.reconnect`, the `mining.configure` result and share verdicts).
//!
//! They read any JSON value that implements [`Json`]: this crate's parsed [`Value`] (from
//! [`Parser::parse_message`](super::Parser::parse_message)) and `serde_json::Value`.
//!
//! [`Job`] also carries the work maths a client needs to check or grind shares (coinbase, merkle
//! root, header, share hash).

use std::borrow::Cow;

use simd_json::prelude::*;

use super::Value;
use crate::block;
use crate::hash::{sha256d, sha256d_header};
use crate::merkle::merkle_root_from_branch;

/// Read access to a JSON value, whichever parser made it.
pub trait Json: Sized {
    /// The string, if this is one.
    fn as_text(&self) -> Option<&str>;
    /// The elements, if this is an array.
    fn as_list(&self) -> Option<&[Self]>;
    /// A non-negative integer.
    fn as_uint(&self) -> Option<u64>;
    /// Any number as a float.
    fn as_float(&self) -> Option<f64>;
    /// The boolean, if this is one.
    fn as_boolean(&self) -> Option<bool>;
    /// Whether this is `null`.
    fn is_nil(&self) -> bool;
    /// An object's member.
    fn member(&self, key: &str) -> Option<&Self>;
    /// The value as compact JSON text (for messages).
    fn to_json(&self) -> String;

    /// Element `i` of an array.
    fn at(&self, i: usize) -> Option<&Self> {
        self.as_list().and_then(|a| a.get(i))
    }
}

impl Json for Value<'_> {
    fn as_text(&self) -> Option<&str> {
        self.as_str()
    }
    fn as_list(&self) -> Option<&[Self]> {
        match self {
            Value::Array(a) => Some(a.as_slice()),
            _ => None,
        }
    }
    fn as_uint(&self) -> Option<u64> {
        self.as_u64()
    }
    fn as_float(&self) -> Option<f64> {
        self.cast_f64()
    }
    fn as_boolean(&self) -> Option<bool> {
        self.as_bool()
    }
    fn is_nil(&self) -> bool {
        self.is_null()
    }
    fn member(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn to_json(&self) -> String {
        self.encode()
    }
}

impl Json for serde_json::Value {
    fn as_text(&self) -> Option<&str> {
        self.as_str()
    }
    fn as_list(&self) -> Option<&[Self]> {
        self.as_array().map(Vec::as_slice)
    }
    fn as_uint(&self) -> Option<u64> {
        self.as_u64()
    }
    fn as_float(&self) -> Option<f64> {
        self.as_f64()
    }
    fn as_boolean(&self) -> Option<bool> {
        self.as_bool()
    }
    fn is_nil(&self) -> bool {
        self.is_null()
    }
    fn member(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn to_json(&self) -> String {
        self.to_string()
    }
}

/// Why a message could not be decoded: which field was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub &'static str);

/// A request id as a number (also from a numeric string, as some pools echo it).
pub fn id_u64<V: Json>(id: &V) -> Option<u64> {
    id.as_uint()
        .or_else(|| id.as_text().and_then(|s| s.parse().ok()))
}

/// What a successful `mining.subscribe` result gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// extranonce1.
    pub extranonce1: Vec<u8>,
    /// extranonce2 size in bytes.
    pub nonce2_len: usize,
    /// The session id (the one paired with `mining.notify`, else the first), to resume with.
    pub session: Option<String>,
}

/// Decodes a subscribe `result`: `[[[method, id]…] or [method, id], "<enonce1>", <n2len>]`.
pub fn subscribe_result<V: Json>(result: &V) -> Result<Subscribed, DecodeError> {
    let extranonce1 = result
        .at(1)
        .and_then(Json::as_text)
        .and_then(|s| hex::decode(s).ok())
        .ok_or(DecodeError("extranonce1 is not hex"))?;
    let nonce2_len = result
        .at(2)
        .and_then(Json::as_uint)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(DecodeError("extranonce2 size is not a number"))?;
    Ok(Subscribed {
        extranonce1,
        nonce2_len,
        session: result.at(0).and_then(session_from_subscriptions),
    })
}

/// The session id in a subscribe reply's first element: the id paired with `mining.notify`,
/// else the first pair's id. Accepts `[[method, id], …]` and a bare `[method, id]`.
pub fn session_from_subscriptions<V: Json>(subs: &V) -> Option<String> {
    let list = subs.as_list()?;
    let id_of = |p: &V| p.at(1).and_then(Json::as_text).map(str::to_owned);
    if list.first().is_some_and(|p| p.as_list().is_some()) {
        list.iter()
            .find(|p| p.at(0).and_then(Json::as_text) == Some("mining.notify"))
            .and_then(id_of)
            .or_else(|| list.first().and_then(id_of))
    } else {
        id_of(subs)
    }
}

/// A difficulty given as a number or a numeric string.
pub fn difficulty_value<V: Json>(v: &V) -> Option<f64> {
    v.as_float()
        .or_else(|| v.as_text().and_then(|s| s.trim().parse().ok()))
}

/// The difficulty of `mining.set_difficulty` params.
pub fn set_difficulty<V: Json>(params: &V) -> Result<f64, DecodeError> {
    params
        .at(0)
        .and_then(difficulty_value)
        .filter(|d| d.is_finite() && *d > 0.0)
        .ok_or(DecodeError("difficulty is not a positive number"))
}

/// extranonce1 and extranonce2 size from `mining.set_extranonce` params.
pub fn set_extranonce<V: Json>(params: &V) -> Result<(Vec<u8>, usize), DecodeError> {
    let en1 = params
        .at(0)
        .and_then(Json::as_text)
        .and_then(|s| hex::decode(s).ok())
        .ok_or(DecodeError("extranonce1 is not hex"))?;
    let n2 = params
        .at(1)
        .and_then(Json::as_uint)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(DecodeError("extranonce2 size is not a number"))?;
    Ok((en1, n2))
}

/// The mask of `mining.set_version_mask` params.
pub fn set_version_mask<V: Json>(params: &V) -> Result<u32, DecodeError> {
    params
        .at(0)
        .and_then(Json::as_text)
        .and_then(super::hex_u32)
        .ok_or(DecodeError("version mask is not hex"))
}

/// The version-rolling mask a `mining.configure` result grants (`None`: refused). A pool that
/// says yes without a mask grants `requested`.
pub fn configure_result<V: Json>(result: &V, requested: u32) -> Option<u32> {
    if result.member("version-rolling")?.as_boolean() != Some(true) {
        return None;
    }
    match result.member("version-rolling.mask") {
        None => Some(requested),
        Some(m) => m.as_text().and_then(super::hex_u32).map(|g| g & requested),
    }
}

/// Where `client.reconnect` sends the client (every part optional: bare `[]` means this pool).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reconnect {
    /// Host name or address.
    pub host: Option<String>,
    /// Port (a number or a numeric string).
    pub port: Option<u16>,
    /// Seconds to wait before reconnecting.
    pub wait_secs: Option<u64>,
}

/// Decodes `client.reconnect` params `[host?, port?, wait?]`.
pub fn reconnect<V: Json>(params: &V) -> Reconnect {
    let num = |v: &V| {
        v.as_uint()
            .or_else(|| v.as_text().and_then(|s| s.trim().parse().ok()))
    };
    Reconnect {
        host: params
            .at(0)
            .and_then(Json::as_text)
            .filter(|h| !h.is_empty())
            .map(str::to_owned),
        port: params
            .at(1)
            .and_then(num)
            .and_then(|p| u16::try_from(p).ok()),
        wait_secs: params.at(2).and_then(num),
    }
}

/// Whether a reply accepted: `result` is `true`.
pub fn accepted<V: Json>(result: &V) -> bool {
    result.as_boolean() == Some(true)
}

/// A reject reason from a reply's `error` and ckpool's `reject-reason`: `error` as
/// `[code, msg, …]`, a string or an object with `message`, else `reject-reason`, else `"unknown"`.
pub fn reject_reason<V: Json>(error: Option<&V>, reject_reason: Option<&str>) -> Cow<'static, str> {
    let from_error = match error {
        None => None,
        Some(e) if e.is_nil() => None,
        Some(e) => Some(if let Some(a) = e.as_list() {
            match a.get(1).and_then(Json::as_text) {
                Some(s) => s.to_owned(),
                None => e.to_json(),
            }
        } else if let Some(s) = e.as_text() {
            s.to_owned()
        } else if let Some(m) = e.member("message") {
            m.as_text().map_or_else(|| e.to_json(), str::to_owned)
        } else {
            e.to_json()
        }),
    };
    match (from_error, reject_reason) {
        (Some(s), _) => Cow::Owned(s),
        (None, Some(r)) => Cow::Owned(r.to_owned()),
        (None, None) => Cow::Borrowed("unknown"),
    }
}

/// One job from a `mining.notify`, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The pool's job id, echoed in submits.
    pub job_id: String,
    /// Previous block hash in internal byte order.
    pub prev_hash: [u8; 32],
    /// Coinbase part before extranonce1.
    pub coinb1: Vec<u8>,
    /// Coinbase part after extranonce2.
    pub coinb2: Vec<u8>,
    /// Merkle branch (internal byte order hashes) the coinbase txid is folded through.
    pub branch: Vec<[u8; 32]>,
    /// Block version from the template.
    pub version: u32,
    /// Compact network target.
    pub nbits: u32,
    /// Block time.
    pub ntime: u32,
    /// Whether the pool asked to drop older work.
    pub clean: bool,
}

fn hex_field_u32<V: Json>(v: &V, what: &'static str) -> Result<u32, DecodeError> {
    v.as_text()
        .and_then(super::hex_u32)
        .ok_or(DecodeError(what))
}

fn hex_field<V: Json>(v: &V, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    v.as_text()
        .and_then(|s| hex::decode(s).ok())
        .ok_or(DecodeError(what))
}

impl Job {
    /// Decodes the params array of a `mining.notify`:
    /// `[job_id, prevhash, coinb1, coinb2, [branch…], version, nbits, ntime, clean]`.
    pub fn from_notify_params<V: Json>(params: &V) -> Result<Self, DecodeError> {
        let p = params
            .as_list()
            .ok_or(DecodeError("params is not an array"))?;
        let [
            job_id,
            prev,
            coinb1,
            coinb2,
            branch,
            version,
            nbits,
            ntime,
            clean,
            ..,
        ] = p
        else {
            return Err(DecodeError("params has fewer than 9 entries"));
        };
        let job_id = match (job_id.as_text(), job_id.as_uint()) {
            (Some(s), _) => s.to_owned(),
            (None, Some(n)) => n.to_string(),
            _ => return Err(DecodeError("job_id is not a string")),
        };
        let prev_hash = prev
            .as_text()
            .and_then(stratum_prevhash_to_internal)
            .ok_or(DecodeError("prevhash is not 64 hex digits"))?;
        let branch = branch
            .as_list()
            .ok_or(DecodeError("merkle branch is not an array"))?
            .iter()
            .map(|h| {
                h.as_text()
                    .and_then(super::hex_exact::<32>)
                    .ok_or(DecodeError("merkle branch entry is not 32 bytes of hex"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let clean = if clean.is_nil() {
            false
        } else if let Some(b) = clean.as_boolean() {
            b
        } else if let Some(n) = clean.as_uint() {
            n != 0
        } else {
            return Err(DecodeError("clean is not a boolean"));
        };
        Ok(Self {
            job_id,
            prev_hash,
            coinb1: hex_field(coinb1, "coinb1 is not hex")?,
            coinb2: hex_field(coinb2, "coinb2 is not hex")?,
            branch,
            version: hex_field_u32(version, "version is not 1-8 hex digits")?,
            nbits: hex_field_u32(nbits, "nbits is not 1-8 hex digits")?,
            ntime: hex_field_u32(ntime, "ntime is not 1-8 hex digits")?,
            clean,
        })
    }

    /// The previous block hash as bitcoind's RPC prints it.
    pub fn prevhash_rpc(&self) -> String {
        hash_to_rpc_hex(&self.prev_hash)
    }

    /// The full coinbase: coinb1 ‖ extranonce1 ‖ extranonce2 ‖ coinb2.
    pub fn coinbase(&self, extranonce1: &[u8], extranonce2: &[u8]) -> Vec<u8> {
        let mut cb = Vec::with_capacity(
            self.coinb1.len() + extranonce1.len() + extranonce2.len() + self.coinb2.len(),
        );
        cb.extend_from_slice(&self.coinb1);
        cb.extend_from_slice(extranonce1);
        cb.extend_from_slice(extranonce2);
        cb.extend_from_slice(&self.coinb2);
        cb
    }

    /// Merkle root (internal byte order) for the given extranonces.
    pub fn merkle_root(&self, extranonce1: &[u8], extranonce2: &[u8]) -> [u8; 32] {
        let txid = sha256d(&self.coinbase(extranonce1, extranonce2));
        merkle_root_from_branch(&txid, &self.branch)
    }

    /// The 80-byte header for a merkle root, the (possibly rolled) version and a nonce.
    pub fn header(&self, merkle_root: &[u8; 32], version: u32, nonce: u32) -> [u8; 80] {
        block::header(
            version,
            &self.prev_hash,
            merkle_root,
            self.ntime,
            self.nbits,
            nonce,
        )
    }

    /// The header hash (internal byte order) for the given submit fields, as a pool recomputes it.
    pub fn share_hash(
        &self,
        extranonce1: &[u8],
        extranonce2: &[u8],
        version: u32,
        nonce: u32,
    ) -> [u8; 32] {
        let root = self.merkle_root(extranonce1, extranonce2);
        sha256d_header(&self.header(&root, version, nonce))
    }
}

/// Converts stratum's word-swapped prevhash (each 4-byte group byte-reversed) to internal order.
/// `None` unless the input is exactly 64 hex digits.
pub fn stratum_prevhash_to_internal(hex_str: &str) -> Option<[u8; 32]> {
    let mut out = super::hex_exact::<32>(hex_str)?;
    for word in out.chunks_exact_mut(4) {
        word.reverse();
    }
    Some(out)
}

/// Converts an internal-order hash to stratum's word-swapped prevhash hex.
pub fn internal_to_stratum_prevhash(hash: &[u8; 32]) -> String {
    let mut out = Vec::with_capacity(64);
    super::write::write_prevhash(&mut out, hash);
    String::from_utf8(out).unwrap_or_default()
}

/// An internal-order hash as bitcoind's RPC prints it (byte-reversed hex).
pub fn hash_to_rpc_hex(hash: &[u8; 32]) -> String {
    let mut out = *hash;
    out.reverse();
    hex::encode(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use serde_json::json;

    const GENESIS_RPC: &str = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f";
    /// Genesis hash in stratum's word-swapped form (computed independently with Python).
    const GENESIS_STRATUM: &str =
        "0a8ce26f72b3f1b646a2a6c14ff763ae65831e939c085ae10019d66800000000";
    const GENESIS_COINBASE: &str = "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff001d0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e206272696e6b206f66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a01000000434104678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef38c4f35504e51ec112de5c384df7ba0b8d578a4c702b6bf11d5fac00000000";

    fn rpc_to_internal(rpc: &str) -> [u8; 32] {
        let mut h: [u8; 32] = hex::decode(rpc).unwrap().try_into().unwrap();
        h.reverse();
        h
    }

    fn simd(v: &serde_json::Value) -> Value<'static> {
        let mut text = v.to_string().into_bytes();
        simd_json::to_borrowed_value(&mut text)
            .unwrap()
            .into_static()
    }

    #[test]
    fn prevhash_word_swap_round_trips() {
        let internal = rpc_to_internal(GENESIS_RPC);
        assert_eq!(
            stratum_prevhash_to_internal(GENESIS_STRATUM),
            Some(internal)
        );
        assert_eq!(internal_to_stratum_prevhash(&internal), GENESIS_STRATUM);
        assert_eq!(hash_to_rpc_hex(&internal), GENESIS_RPC);
        assert_eq!(stratum_prevhash_to_internal("00"), None);
        assert_eq!(stratum_prevhash_to_internal(&"zz".repeat(32)), None);
    }

    /// The genesis block rebuilt from a notify that splits its coinbase around the extranonces.
    #[test]
    fn genesis_from_notify() {
        let cb = hex::decode(GENESIS_COINBASE).unwrap();
        let (coinb1, rest) = cb.split_at(60);
        let (en1, rest) = rest.split_at(4);
        let (en2, coinb2) = rest.split_at(4);
        let notify = json!([
            "abc",
            "00".repeat(32),
            hex::encode(coinb1),
            hex::encode(coinb2),
            [],
            "00000001",
            "1d00ffff",
            "495fab29",
            true
        ]);
        let job = Job::from_notify_params(&notify).unwrap();
        assert_eq!(job.job_id, "abc");
        assert!(job.clean);
        assert_eq!(
            (job.version, job.nbits, job.ntime),
            (1, 0x1d00_ffff, 0x495f_ab29)
        );
        assert_eq!(job.coinbase(en1, en2), cb);
        let root = job.merkle_root(en1, en2);
        assert_eq!(
            hash_to_rpc_hex(&root),
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
        );
        let header = job.header(&root, 1, 2_083_236_893);
        assert_eq!(&header[..4], &[1, 0, 0, 0]);
        assert_eq!(&header[76..], &2_083_236_893u32.to_le_bytes());
        let hash = job.share_hash(en1, en2, 1, 2_083_236_893);
        assert_eq!(hash_to_rpc_hex(&hash), GENESIS_RPC);
        // The same from this crate's parser.
        assert_eq!(Job::from_notify_params(&simd(&notify)).unwrap(), job);
    }

    #[test]
    fn notify_errors_are_reported() {
        let base = |i: usize, v: serde_json::Value| {
            let mut p = json!([
                "a",
                GENESIS_STRATUM,
                "",
                "",
                [],
                "20000000",
                "207fffff",
                "00000000",
                false
            ]);
            p[i] = v;
            p
        };
        assert!(Job::from_notify_params(&json!("x")).is_err());
        assert!(Job::from_notify_params(&json!(["a", "b"])).is_err());
        assert!(Job::from_notify_params(&base(1, json!("00"))).is_err());
        assert!(Job::from_notify_params(&base(4, json!(["0011"]))).is_err());
        assert!(Job::from_notify_params(&base(5, json!("2000000g"))).is_err());
        assert!(Job::from_notify_params(&base(8, json!("yes"))).is_err());
        let job = Job::from_notify_params(&base(0, json!(17))).unwrap();
        assert_eq!(job.job_id, "17");
        assert_eq!(job.prevhash_rpc(), GENESIS_RPC);
        assert!(!job.clean);
        assert!(Job::from_notify_params(&base(8, json!(null))).is_ok_and(|j| !j.clean));
        assert!(Job::from_notify_params(&base(8, json!(1))).is_ok_and(|j| j.clean));
    }

    #[test]
    fn subscribe_results_in_all_shapes() {
        let r = json!([
            [["mining.set_difficulty", "d1"], ["mining.notify", "n1"]],
            "ed42126b",
            8
        ]);
        assert_eq!(subscribe_result(&r), subscribe_result(&simd(&r)));
        assert_eq!(
            subscribe_result(&r).unwrap(),
            Subscribed {
                extranonce1: vec![0xed, 0x42, 0x12, 0x6b],
                nonce2_len: 8,
                session: Some("n1".into())
            }
        );
        let bare = json!([["mining.notify", "x"], "00", 4]);
        assert_eq!(subscribe_result(&bare).unwrap().session, Some("x".into()));
        let none = json!([[], "", 4]);
        assert_eq!(subscribe_result(&none).unwrap().session, None);
        assert!(subscribe_result(&json!("Initialising")).is_err());
        assert!(subscribe_result(&json!([[], "zz", 4])).is_err());
        assert!(subscribe_result(&json!([[], "00", -1])).is_err());
    }

    #[test]
    fn notifications() {
        assert_eq!(set_difficulty(&json!([512])), Ok(512.0));
        assert_eq!(set_difficulty(&json!(["0.5"])), Ok(0.5));
        assert_eq!(
            set_difficulty(&json!([2.3283064365386963e-10])),
            Ok(2.3283064365386963e-10)
        );
        assert!(set_difficulty(&json!([null])).is_err());
        assert!(set_difficulty(&json!([0])).is_err());
        assert!(set_difficulty(&json!([])).is_err());
        assert_eq!(set_extranonce(&json!(["00ab", 6])), Ok((vec![0, 0xab], 6)));
        assert!(set_extranonce(&json!(["0g", 6])).is_err());
        assert!(set_extranonce(&json!(["00"])).is_err());
        assert_eq!(set_version_mask(&json!(["1fffe000"])), Ok(0x1fff_e000));
        assert!(set_version_mask(&json!([5])).is_err());
        assert_eq!(reconnect(&json!([])), Reconnect::default());
        assert_eq!(
            reconnect(&json!(["pool.example", "3334", 5])),
            Reconnect {
                host: Some("pool.example".into()),
                port: Some(3334),
                wait_secs: Some(5)
            }
        );
        assert_eq!(reconnect(&json!(["h", 70000])).port, None);
    }

    #[test]
    fn configure_results() {
        let m = 0x1fff_e000;
        assert_eq!(
            configure_result(
                &json!({"version-rolling": true, "version-rolling.mask": "1fffe000"}),
                0xffff_ffff
            ),
            Some(m)
        );
        assert_eq!(
            configure_result(
                &json!({"version-rolling": true, "version-rolling.mask": "ffffffff"}),
                m
            ),
            Some(m)
        );
        assert_eq!(
            configure_result(&json!({"version-rolling": true}), m),
            Some(m)
        );
        assert_eq!(
            configure_result(&json!({"version-rolling": false}), m),
            None
        );
        assert_eq!(
            configure_result(
                &json!({"version-rolling": true, "version-rolling.mask": 5}),
                m
            ),
            None
        );
        assert_eq!(configure_result(&json!(null), m), None);
    }

    #[test]
    fn reject_reasons_in_all_shapes() {
        let r = |v: serde_json::Value| {
            reject_reason(
                v.get("error"),
                v.get("reject-reason").and_then(|r| r.as_str()),
            )
            .into_owned()
        };
        assert_eq!(
            r(json!({"result": false, "error": [23, "Above target", null]})),
            "Above target"
        );
        assert_eq!(
            r(json!({"result": false, "error": null, "reject-reason": "Stale"})),
            "Stale"
        );
        assert_eq!(
            r(json!({"error": "-3:method not found"})),
            "-3:method not found"
        );
        assert_eq!(
            r(json!({"result": null, "error": {"code": 21, "message": "Job not found"}})),
            "Job not found"
        );
        assert_eq!(r(json!({"result": false, "error": [21]})), "[21]");
        assert_eq!(r(json!({"result": false, "error": null})), "unknown");
        assert!(accepted(&json!(true)));
        assert!(!accepted(&json!("true")));
        assert_eq!(id_u64(&json!(5)), Some(5));
        assert_eq!(id_u64(&json!("6")), Some(6));
        assert_eq!(id_u64(&json!(null)), None);
    }
}
