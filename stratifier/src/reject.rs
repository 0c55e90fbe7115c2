//! Why a submission was refused: one value per reason, with ckpool's error code and message.

use common::stratum::codes;
use serde::{Serialize, Serializer};

/// A refused `mining.submit`. [`Reject::code`] and [`Reject::message`] are what the miner is
/// told (ckpool's codes and texts); the message also keys the pool's reject counters and the
/// share log's `reject-reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// The client has not subscribed.
    NotSubscribed,
    /// The client has not authorised.
    Unauthorized,
    /// `params` is not an array.
    ParamsNotArray,
    /// Fewer than five parameters.
    InvalidArraySize,
    /// No (or an empty) worker name.
    NoUsername,
    /// No (or an empty) job id.
    NoJobId,
    /// extranonce2 missing or not hex.
    NoNonce2,
    /// ntime missing or not hex.
    NoNtime,
    /// nonce missing or not hex.
    NoNonce,
    /// Version bits unparseable or outside the session's mask.
    InvalidVersionMask,
    /// The worker is not the one authorised on this session.
    WorkerMismatch,
    /// No such live job.
    InvalidJobId,
    /// extranonce2 of the wrong length.
    InvalidNonce2Length,
    /// Solo mode: no coinbase can be built for the user.
    NoCoinbaseForUser,
    /// The job is from before the current block.
    Stale,
    /// ntime before the job's or rolled too far.
    NtimeOutOfRange,
    /// The hash does not meet the share's difficulty.
    AboveTarget,
    /// The same share was accepted before.
    Duplicate,
    /// Not checked: the client sent too many invalid shares in a row, and only one of its
    /// shares in 8 is checked until one is accepted (see `PoolConfig::max_invalid_shares`).
    TooManyInvalid,
}

impl Reject {
    /// The stratum error code sent with the refusal.
    pub const fn code(self) -> i32 {
        match self {
            Self::NotSubscribed => codes::NOT_SUBSCRIBED,
            Self::Unauthorized => codes::UNAUTHORIZED,
            Self::InvalidJobId | Self::Stale => codes::JOB_NOT_FOUND,
            Self::AboveTarget => codes::LOW_DIFFICULTY,
            Self::Duplicate => codes::DUPLICATE,
            Self::ParamsNotArray
            | Self::InvalidArraySize
            | Self::NoUsername
            | Self::NoJobId
            | Self::NoNonce2
            | Self::NoNtime
            | Self::NoNonce
            | Self::InvalidVersionMask
            | Self::WorkerMismatch
            | Self::InvalidNonce2Length
            | Self::NoCoinbaseForUser
            | Self::NtimeOutOfRange
            | Self::TooManyInvalid => codes::OTHER,
        }
    }

    /// The message sent with the refusal (ckpool's text).
    pub const fn message(self) -> &'static str {
        match self {
            Self::NotSubscribed => "Not subscribed",
            Self::Unauthorized => "Unauthorized worker",
            Self::ParamsNotArray => "Params not array",
            Self::InvalidArraySize => "Invalid array size",
            Self::NoUsername => "No username",
            Self::NoJobId => "No job_id",
            Self::NoNonce2 => "No nonce2",
            Self::NoNtime => "No ntime",
            Self::NoNonce => "No nonce",
            Self::InvalidVersionMask => "Invalid version mask",
            Self::WorkerMismatch => "Worker mismatch",
            Self::InvalidJobId => "Invalid JobID",
            Self::InvalidNonce2Length => "Invalid nonce2 length",
            Self::NoCoinbaseForUser => "No coinbase for user",
            Self::Stale => "Stale",
            Self::NtimeOutOfRange => "Ntime out of range",
            Self::AboveTarget => "Above target",
            Self::Duplicate => "Duplicate",
            Self::TooManyInvalid => "Too many invalid shares",
        }
    }

    /// Every reason, for tests and tables.
    pub const ALL: [Self; 19] = [
        Self::NotSubscribed,
        Self::Unauthorized,
        Self::ParamsNotArray,
        Self::InvalidArraySize,
        Self::NoUsername,
        Self::NoJobId,
        Self::NoNonce2,
        Self::NoNtime,
        Self::NoNonce,
        Self::InvalidVersionMask,
        Self::WorkerMismatch,
        Self::InvalidJobId,
        Self::InvalidNonce2Length,
        Self::NoCoinbaseForUser,
        Self::Stale,
        Self::NtimeOutOfRange,
        Self::AboveTarget,
        Self::Duplicate,
        Self::TooManyInvalid,
    ];
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Serialised as its message, as the share log has always written it.
impl Serialize for Reject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages_are_ckpools() {
        let table: Vec<(i32, &str)> = Reject::ALL
            .iter()
            .map(|r| (r.code(), r.message()))
            .collect();
        assert_eq!(
            table,
            [
                (25, "Not subscribed"),
                (24, "Unauthorized worker"),
                (20, "Params not array"),
                (20, "Invalid array size"),
                (20, "No username"),
                (20, "No job_id"),
                (20, "No nonce2"),
                (20, "No ntime"),
                (20, "No nonce"),
                (20, "Invalid version mask"),
                (20, "Worker mismatch"),
                (21, "Invalid JobID"),
                (20, "Invalid nonce2 length"),
                (20, "No coinbase for user"),
                (21, "Stale"),
                (20, "Ntime out of range"),
                (23, "Above target"),
                (22, "Duplicate"),
                (20, "Too many invalid shares"),
            ]
        );
        assert_eq!(
            serde_json::to_string(&Some(Reject::Stale)).ok().as_deref(),
            Some("\"Stale\"")
        );
        assert_eq!(Reject::Duplicate.to_string(), "Duplicate");
    }
}
