//! Small utilities with one copy each: process memory, percentiles, wall-clock time, the
//! seeded generator and the "invalid key in a file" error.

pub mod invalid;
pub mod jsonl;
pub mod proc;
pub mod rng;
pub mod stats;
pub mod time;
