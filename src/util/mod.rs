//! Small utilities with one copy each: process memory, percentiles, time, the seeded
//! generator and the JSON-lines reader.

pub mod proc;
pub mod stats;
