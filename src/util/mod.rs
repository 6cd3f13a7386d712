//! Small utilities with one copy each: process memory, percentiles, wall-clock time, the
//! seeded generator, the "invalid key in a file" error and owner-only files.

pub mod invalid;
pub mod jsonl;
pub mod private;
pub mod proc;
pub mod rng;
pub mod stats;
pub mod time;
