//! Small utilities with one copy each: process memory, percentiles, wall-clock time and the
//! seeded generator.

pub mod proc;
pub mod rng;
pub mod stats;
pub mod time;
