//! ckload (being written).
#![forbid(unsafe_code)]
