//! A sans-IO stratum client (in progress).
