//! edgeact: an offline language-model agent for small ARM boards.
//!
//! It loads a GGUF model through llama.cpp under a fixed memory budget, renders prompts
//! from task files, classifies text by scoring each label's tokens after the prompt (with
//! calibration, abstention and optional learned heads), ranks items, runs grammar-guarded
//! ReAct loops with local tools, raises incidents from a stream of results, and serves all
//! of it over MQTT (or stdin) with a durable outbox.
//!
//! # Layout
//!
//! One folder per layer, lowest first; a folder uses only the folders above it in this
//! list ([`LAYERS`], checked by a unit test), so there is no import circle.
//!
//! - [`util`]: one copy of each small utility: the seeded generator, percentiles, wall-clock
//!   milliseconds, process memory, and [`util::invalid::Invalid`] (a bad key in a file).
//! - [`model`]: the only user of llama-cpp-2. Board profiles and the engine config
//!   ([`model::config`]), GGUF headers ([`model::gguf`]), the memory budget
//!   ([`model::budget`]), label-scoring math ([`model::scoring`]), and the [`model::Engine`]:
//!   load + checksum, prefix cache, scoring, generation, hidden-state features.
//! - [`encoder`] (same layer as `model`): a small sentence encoder (all-MiniLM-L6-v2, pure
//!   Rust BERT from safetensors) as one more feature source for the learned scorers.
//! - [`spec`]: task files: one loader ([`spec::TaskFile`]: classify | rank | react), the
//!   query template, the ReAct step format and tool schemas; one [`spec::SpecError`].
//! - [`classify`]: one task on an engine: request -> prompt -> label scores -> result with
//!   its provenance; JSON-lines input; the learned head on frozen features.
//! - [`rank`], [`react`], [`monitor`]: the other applications: ranking by P(yes); the ReAct
//!   loop, its tools, knowledge base, sessions and scenarios; alert rules over results.
//! - [`eval`]: metrics and plots, labeled data sets, tuning, head training, the TF-IDF
//!   baseline.
//! - [`serve`]: the daemon, `serve::run(cfg, shutdown)`: a pure state machine (events in,
//!   actions out) apart from the rumqttc loop and stdio; the inference worker thread; the
//!   outbox; wire messages and redaction.
//! - [`cmd`]: one file per subcommand, each run from a validated config; [`cmd::AppError`].
//! - [`cli`]: clap's raw arguments, their resolution into those configs with the product
//!   defaults ([`cli::defaults`]), and the one mapping of errors to exit codes.
//!
//! `main.rs` only parses, calls [`cli::run`] and maps the error to an exit code. Tests:
//! unit tests beside the code (pure logic, no model); `tests/integration` is the one
//! integration harness (real model, real Mosquitto), sharing `tests/testkit` with
//! `examples/`.

pub mod classify;
pub mod cli;
pub mod cmd;
pub mod encoder;
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
    &["model", "encoder"],
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
