//! The fuzz targets' checks on stable Rust, so CI runs them: each request decoder `serve`
//! uses (classification, rank, ReAct through `Job::from_json`) and the redactor, over the
//! committed seed corpora (fuzz/corpus/<target>) and seeded random mutations of them.
//! None may panic; each keeps the invariants its fuzz target asserts.

use std::path::PathBuf;

use crate::classify::input::{decode_payload_with, MAX_LINE_BYTES};
use crate::serve::redact::Redactor;
use crate::serve::worker::{Job, TaskKind};
use crate::util::rng::SplitMix64;

/// Mutations of each seed.
const MUTATIONS: usize = 300;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 20, "{target}: {} seeds", seeds.len());
    seeds
}

/// A random edit of `seed`: a flipped byte, a cut, an inserted interesting byte string, a
/// duplicated span, or a splice with another seed.
fn mutate(rng: &mut SplitMix64, seed: &[u8], other: &[u8]) -> Vec<u8> {
    const TOKENS: [&[u8]; 12] = [
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"null",
        b"\\u0000",
        b"\xff",
        b"1e999",
        "０٤".as_bytes(),
    ];
    let mut b = seed.to_vec();
    let mut pick = |n: usize| (rng.next_u64() % (n.max(1) as u64)) as usize;
    for _ in 0..1 + pick(4) {
        let at = pick(b.len() + 1);
        match pick(5) {
            0 if !b.is_empty() => {
                let i = at.min(b.len() - 1);
                b[i] ^= 1 << pick(8);
            }
            1 => b.truncate(at),
            2 => {
                let t = TOKENS[pick(TOKENS.len())];
                b.splice(at..at, t.iter().copied());
            }
            3 if !b.is_empty() => {
                let from = pick(b.len());
                let to = (from + pick(64)).min(b.len());
                let span = b[from..to].to_vec();
                b.splice(at..at, span);
            }
            _ => {
                let cut = pick(other.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&other[cut..]);
            }
        }
    }
    b
}

/// Each seed, then its mutations.
fn inputs(target: &str, seed: u64) -> Vec<Vec<u8>> {
    let seeds = corpus(target);
    let mut rng = SplitMix64::new(seed);
    let mut out = seeds.clone();
    for (i, s) in seeds.iter().enumerate() {
        let other = &seeds[(i + 1) % seeds.len()];
        for _ in 0..MUTATIONS {
            out.push(mutate(&mut rng, s, other));
        }
    }
    out
}

fn check_decoder(target: &str, kind: TaskKind) {
    let (mut ok, mut refused) = (0, 0);
    for data in inputs(target, 16) {
        match decode_payload_with(&data, MAX_LINE_BYTES, |v| Job::from_json(kind, v, "dev-1")) {
            Ok(job) => {
                let same = matches!(
                    (&job, kind),
                    (Job::Classify(_), TaskKind::Classify)
                        | (Job::Rank(_), TaskKind::Rank)
                        | (Job::React(_), TaskKind::React)
                );
                assert!(same, "{:?}", String::from_utf8_lossy(&data));
                assert!(!job.id().is_empty());
                ok += 1;
            }
            Err(e) => {
                assert!(!e.kind().is_empty() && !e.to_string().is_empty());
                refused += 1;
            }
        }
    }
    // The corpus reaches both sides.
    assert!(
        ok > 10 && refused > 10,
        "{target}: {ok} decoded, {refused} refused"
    );
}

#[test]
fn the_classification_decoder_survives_its_corpus_and_mutations() {
    check_decoder("serve_classify", TaskKind::Classify);
}

#[test]
fn the_rank_decoder_survives_its_corpus_and_mutations() {
    check_decoder("serve_rank", TaskKind::Rank);
}

#[test]
fn the_react_decoder_survives_its_corpus_and_mutations() {
    check_decoder("serve_react", TaskKind::React);
}

#[test]
fn the_redactor_survives_its_corpus_and_mutations() {
    let r = Redactor::all_kinds();
    for data in inputs("redactor", 17) {
        let text = String::from_utf8_lossy(&data);
        let once = r.redact(&text);
        for mask in ["[email]", "[phone]", "[card]"] {
            assert!(once.matches(mask).count() >= text.matches(mask).count());
        }
        let payload = r.redact_payload(&text);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let out: serde_json::Value = serde_json::from_str(&payload).expect("still JSON");
            assert_eq!(out.get("id"), v.get("id"), "ids are kept");
        }
    }
}
