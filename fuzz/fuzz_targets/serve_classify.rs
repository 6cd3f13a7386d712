//! Fuzz target: a request payload for a `type = "classify"` task, decoded as `edgeact serve`
//! decodes it (`decode_payload_with` and `Job::from_json`). Either a job of that kind
//! with an id, or a refusal with a kind and a message for the error record; never a panic.
//! Seeds: fuzz/corpus/serve_classify (also run on stable Rust by `serve::decode_tests`).

#![no_main]

use edgeact::classify::input::{decode_payload_with, MAX_LINE_BYTES};
use edgeact::serve::worker::{Job, TaskKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode_payload_with(data, MAX_LINE_BYTES, |v| {
        Job::from_json(TaskKind::Classify, v, "dev-1")
    }) {
        Ok(job) => {
            assert!(matches!(job, Job::Classify(_)), "a job of another kind");
            assert!(!job.id().is_empty(), "a job without an id");
        }
        Err(e) => assert!(!e.kind().is_empty() && !e.to_string().is_empty()),
    }
});
