//! edgeact: an offline language-model agent for small ARM boards.
//!
//! It loads a GGUF model through llama.cpp under a fixed memory budget, renders prompts
//! from task templates, and classifies text by scoring each label's tokens after the
//! prompt, with calibration and abstention; and runs grammar-guarded ReAct loops with
//! local tools ([`react`]).
//!
//! # Layout
//!
//! The data flows top to bottom:
//!
//! - `main.rs`: parses the CLI (clap), builds a validated config, calls [`app`], maps errors
//!   to exit codes in one place.
//! - [`config`]: board profiles (`board-configs/*.toml`) plus CLI overrides, validated into
//!   [`config::EngineConfig`]; errors name the file and the key.
//! - [`gguf`]: reads a GGUF header (metadata, tensor table) without loading weights.
//! - [`budget`]: weights + KV cache + compute + logits, estimated before loading; refuses or
//!   shrinks `n_ctx` with the numbers.
//! - [`task`]: task files: instruction, query template, labels, few-shot examples,
//!   calibration, abstention, input token budget; renders a fixed prefix and a per-request
//!   suffix.
//! - [`engine`]: the only module that touches llama-cpp-2: checks and loads the model,
//!   caches task prefixes in the KV cache, scores labels (prefix reuse, label trie,
//!   micro-batching; and a naive reference path); a second, embeddings context reads
//!   hidden states for the learned head ([`model::FeatureContext`]).
//! - [`scoring`]: pure label-scoring math: label trie, log-softmax, contextual calibration,
//!   abstention.
//! - [`classify`]: one task on an engine: request -> prompt tokens (truncated by policy) ->
//!   scores -> [`classify::ClassifyResult`] with token counts, timings and provenance.
//! - [`input`]: JSON lines into requests, each bad line an error naming the line.
//! - [`eval`]: `edgeact eval`: a task (or candidate templates, K-shot sets) over labeled
//!   data into metrics.json, report.md and plots.
//! - [`tune`]: `edgeact tune`: candidate templates x K-shot sets x calibration on a dev
//!   split; the winner is written as a task file with its measured score.
//! - [`head`]: the learned head on frozen features: feature prompt and pooling, standardizer,
//!   multinomial logistic regression (linfa-logistic), the head file beside a task, and
//!   [`head::TaskRunner`], which classifies a task by label scores, its head, or both.
//! - [`learn`]: `edgeact tune --head`: K examples per label, features (cached on disk), every
//!   pooling x L2 strength scored on dev, the best written as head file + task file.
//! - [`baseline`]: TF-IDF 1-2 grams + logistic regression, the plain baseline.
//! - [`figures`]: `edgeact bench-accuracy`: every method on one data set's test split.
//! - [`metrics`]: evaluation metrics (accuracy, macro-F1, confusion, calibration error) and
//!   the SVG plots of `edgeact eval`.
//! - [`app`]: the modes (`classify`, `plan`, `bench`), from config to output.
//! - [`worker`]: the inference thread that owns the engine and one runner per served task
//!   (classifier, ranker, ReAct loop with its tools); a bounded queue in front of it.
//! - [`react`]: ReAct on the device: task files of `type = "react"`, GBNF step grammars,
//!   the Thought / Action / Observation loop with typed stop reasons behind a generator
//!   trait, allow-listed tools (BM25 knowledge base, calculator, clock, sensor, notify),
//!   retrieve-then-answer `qa`, sessions, and the scenario evaluation. Generation itself is
//!   [`model::Engine::generate`].
//! - [`monitor`]: alert rules over a stream of results (task-file `[monitor]`): sliding
//!   windows per label and key, count / rate / share / jump against a baseline, incidents
//!   `new` / `update` / `end` with evidence, bounded keys (LRU), state saved atomically;
//!   [`monitor::replay`] is `edgeact monitor` (JSON lines through the rules).
//! - [`rank`]: task-file `[rank]`: candidate items scored by P(yes) for a profile written
//!   into the prefix (decoded once), calibrated, sorted, top-k; [`rank::eval`] is
//!   `edgeact rank-eval` (NDCG@k against TF-IDF and random orderings).
//! - [`redact`]: personal data (e-mail, phone, card numbers, configured patterns) masked in
//!   traces, error records and logs before they leave the device; request ids kept.
//! - [`serve`]: the daemon: MQTT (or stdin) in, outcomes recorded in the [`outbox`] before
//!   the request is acknowledged, published until PUBACK; classification results feed the
//!   task's [`monitor`]; topic layout and broker options in [`mqtt`].

pub mod classify;
pub mod cli;
pub mod cmd;
pub mod eval;
pub mod model;
pub mod monitor;
pub mod rank;
pub mod react;
pub mod serve;
pub mod spec;
pub mod util;

/// The layers, lowest first: a module may use modules of lower layers only, never its own
/// layer's siblings or a higher layer, so the import graph between folders has no circle.
/// `layout_tests` checks the sources against it.
pub const LAYERS: &[&[&str]] = &[
    &["util"],
    &["model"],
    &["spec"],
    &["classify"],
    &["rank", "react", "monitor"],
    &["eval"],
    &["serve"],
    &["cmd"],
    &["cli"],
];

#[cfg(test)]
mod layout_tests {
    use super::LAYERS;
    use std::path::Path;

    fn level(folder: &str) -> Option<usize> {
        LAYERS.iter().position(|l| l.contains(&folder))
    }

    /// `crate::<folder>` paths in a file's non-test code, comments left out.
    fn uses(src: &str) -> Vec<String> {
        let code = src.split("#[cfg(test)]").next().unwrap_or("");
        let mut out = Vec::new();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let name: String = line[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        }
        out
    }

    fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                visit(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }

    #[test]
    fn folders_only_use_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        visit(&src, &mut files);
        let mut wrong = Vec::new();
        let mut folders = 0;
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let mut parts = rel.components();
            let top = parts
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .to_string();
            if parts.next().is_none() {
                continue; // lib.rs, main.rs
            }
            folders += 1;
            let from = level(&top).unwrap_or_else(|| panic!("src/{top}/ is not in LAYERS"));
            for used in uses(&std::fs::read_to_string(f).unwrap()) {
                if used == top || !src.join(&used).is_dir() {
                    continue;
                }
                let to = level(&used).unwrap_or_else(|| panic!("src/{used}/ is not in LAYERS"));
                if to >= from {
                    wrong.push(format!("{} uses crate::{used}", rel.display()));
                }
            }
        }
        assert!(folders > 20, "only {folders} files found under src/*/");
        wrong.sort();
        wrong.dedup();
        assert!(
            wrong.is_empty(),
            "imports against the layers:\n{}",
            wrong.join("\n")
        );
    }
}
