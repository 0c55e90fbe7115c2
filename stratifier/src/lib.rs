//! Stratifier (being written).
#![forbid(unsafe_code)]
