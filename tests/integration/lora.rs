//! LoRA adapters named by a task file, on the real model: the test writes an adapter GGUF
//! for the model's own tensor shapes, and checks that it changes the label scores, that
//! scale 0 leaves them as without an adapter, that a cached prefix is never reused across
//! adapters, and that bad adapter files are refused with the key named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgeact::classify::{Classifier, Request, ScorePath};
use edgeact::model::{Engine, EngineError, PrefixSource};
use edgeact::spec::{SpecError, Task};
use edgeact::util::invalid::Invalid;

use crate::testkit;
use crate::testkit::gguf_writer::{noise, write_gguf, F32Tensor, Meta};

const RANK: u64 = 4;

/// A LoRA adapter for the model at `model`: rank-4 updates of every layer's attention
/// query and value projections, shapes read from the model's GGUF header.
fn write_adapter(model: &Path, out: &Path) {
    let header = edgeact::model::gguf::read_header(model).unwrap();
    let arch = header.architecture().unwrap().to_string();
    let mut tensors = Vec::new();
    for (i, t) in header
        .tensors
        .iter()
        .filter(|t| t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_v.weight"))
        .enumerate()
    {
        // ggml: W has ne = [n_in, n_out]; lora_a ne = [n_in, r], lora_b ne = [r, n_out].
        let (n_in, n_out) = (t.dims[0], t.dims[1]);
        tensors.push(F32Tensor {
            name: format!("{}.lora_a", t.name),
            dims: vec![n_in, RANK],
            data: noise(2 * i as u64 + 1, (n_in * RANK) as usize, 0.1),
        });
        tensors.push(F32Tensor {
            name: format!("{}.lora_b", t.name),
            dims: vec![RANK, n_out],
            data: noise(2 * i as u64 + 2, (RANK * n_out) as usize, 0.1),
        });
    }
    assert!(
        tensors.len() >= 4,
        "no attention tensors found in {}",
        model.display()
    );
    write_gguf(
        out,
        &[
            ("general.architecture", Meta::Str(arch)),
            ("general.type", Meta::Str("adapter".into())),
            ("adapter.type", Meta::Str("lora".into())),
            // alpha = rank: llama.cpp's effective scale (scale * alpha / rank) is the task's.
            ("adapter.lora.alpha", Meta::F32(RANK as f32)),
            ("general.alignment", Meta::U32(32)),
        ],
        &tensors,
    )
    .unwrap();
}

/// The shipped sentiment task with `lora` appended (the path relative to the task file).
fn task_with(dir: &Path, name: &str, lora: &str) -> Result<Task, SpecError> {
    let src = std::fs::read_to_string(testkit::root().join("tasks/sentiment.toml")).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("{src}\n{lora}\n")).unwrap();
    Task::load(&path)
}

const TEXTS: [&str; 4] = [
    "The staff were lovely and the food was excellent.",
    "Terrible service, I waited an hour and left hungry.",
    "It is fine, nothing special.",
    "Broke on the first day, a waste of money.",
];

/// Per input, each label's log-probability, and how the prefix got into the engine.
fn scores(task: Task, prefix_dir: Option<PathBuf>) -> (Vec<BTreeMap<String, f64>>, PrefixSource) {
    let mut cfg = testkit::board();
    cfg.prefix_cache_dir = prefix_dir;
    let cfg = edgeact::spec::config_for_tasks(&cfg, [&task]).unwrap();
    let mut engine = Engine::load(&cfg, 1).expect("engine");
    let c = Classifier::new(&mut engine, task, 0, Some(false), None).unwrap();
    let reqs: Vec<Request> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| Request::text(i.to_string(), (*t).to_string()))
        .collect();
    let out = c
        .classify_many(&mut engine, &reqs, ScorePath::Fast)
        .into_iter()
        .map(|r| {
            r.unwrap()
                .labels
                .into_iter()
                .map(|(k, v)| (k, v.logprob_total))
                .collect()
        })
        .collect();
    (out, c.prefix_source)
}

fn max_diff(a: &[BTreeMap<String, f64>], b: &[BTreeMap<String, f64>]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().map(move |(k, v)| (v - y[k]).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn adapter_changes_scores_scale_zero_does_not_and_prefixes_are_keyed_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = testkit::board().model_path;
    write_adapter(&model, &dir.path().join("adapter.gguf"));
    let on = task_with(
        dir.path(),
        "on",
        "[lora]\npath = \"adapter.gguf\"\nscale = 1.0",
    )
    .unwrap();
    let off = task_with(
        dir.path(),
        "off",
        "[lora]\npath = \"adapter.gguf\"\nscale = 0.0",
    )
    .unwrap();
    let plain = testkit::task("sentiment");
    let lora = on.lora.clone().unwrap();
    assert!(lora.path.is_absolute() && lora.path.ends_with("adapter.gguf"));
    assert_eq!(lora.scale, 1.0);
    // Written back by `tune`, the task names the same adapter.
    let round = Task::parse(&on.to_toml(), &dir.path().join("elsewhere/x.toml"), "x").unwrap();
    assert_eq!(round.lora, on.lora);

    let prefixes = dir.path().join("prefix");
    let (with_adapter, src1) = scores(on.clone(), Some(prefixes.clone()));
    assert_eq!(src1, PrefixSource::Decoded);
    // Same prompt, no adapter, same prefix cache: the adapter's saved prefix is not reused.
    let (base, src2) = scores(plain, Some(prefixes.clone()));
    assert_eq!(
        src2,
        PrefixSource::Decoded,
        "a prefix saved under the adapter was reused"
    );
    let (scaled_0, src3) = scores(off, Some(prefixes.clone()));
    assert_eq!(
        src3,
        PrefixSource::Decoded,
        "a prefix saved under another scale was reused"
    );
    // The adapter's own prefix is found again, and gives its scores.
    let (again, src4) = scores(on, Some(prefixes));
    assert_eq!(src4, PrefixSource::Loaded);

    let changed = max_diff(&with_adapter, &base);
    let zero = max_diff(&scaled_0, &base);
    let reloaded = max_diff(&again, &with_adapter);
    eprintln!("max |Δ log p|: adapter vs none {changed:.4}, scale 0 vs none {zero:.6}, reloaded prefix {reloaded:.6}");
    assert!(
        changed > 0.05,
        "the adapter did not change the scores ({changed})"
    );
    assert!(zero < 1e-3, "scale 0 changed the scores by {zero}");
    assert!(
        reloaded < 0.05,
        "the reloaded prefix gave other scores ({reloaded})"
    );
}

#[test]
fn bad_adapters_are_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let key_of = |r: Result<Task, SpecError>| match r {
        Err(SpecError::Invalid(Invalid { key, reason, .. })) => (key, reason),
        other => panic!("expected an invalid-key error, got {other:?}"),
    };
    let (key, reason) = key_of(task_with(
        dir.path(),
        "a",
        "[lora]\npath = \"missing.gguf\"",
    ));
    assert_eq!(key, "lora.path");
    assert!(reason.contains("does not exist"), "{reason}");

    std::fs::write(dir.path().join("zip.gguf"), b"PK\x03\x04 not a gguf").unwrap();
    let (key, reason) = key_of(task_with(dir.path(), "b", "[lora]\npath = \"zip.gguf\""));
    assert_eq!(key, "lora.path");
    assert!(reason.contains("not a GGUF file"), "{reason}");

    // A GGUF file that is a model, not an adapter.
    write_gguf(
        &dir.path().join("model.gguf"),
        &[("general.architecture", Meta::Str("gemma3".into()))],
        &[],
    )
    .unwrap();
    let (key, reason) = key_of(task_with(dir.path(), "c", "[lora]\npath = \"model.gguf\""));
    assert_eq!(key, "lora.path");
    assert!(reason.contains("not a LoRA adapter"), "{reason}");

    let (key, _) = key_of(task_with(
        dir.path(),
        "d",
        "[lora]\npath = \"model.gguf\"\nscale = nan",
    ));
    assert_eq!(key, "lora.scale");

    // An adapter for another architecture: refused before llama.cpp sees it.
    write_gguf(
        &dir.path().join("llama.gguf"),
        &[
            ("general.architecture", Meta::Str("llama".into())),
            ("general.type", Meta::Str("adapter".into())),
            ("adapter.type", Meta::Str("lora".into())),
        ],
        &[],
    )
    .unwrap();
    let other = task_with(dir.path(), "e", "[lora]\npath = \"llama.gguf\"").unwrap();
    let plain = testkit::task("sentiment");
    // Two tasks with different adapters cannot share one engine.
    assert!(matches!(
        edgeact::spec::lora_for_tasks([&plain, &other]),
        Err(EngineError::Lora { .. })
    ));
    let cfg = edgeact::spec::config_for_tasks(&testkit::board(), [&other]).unwrap();
    match Engine::load(&cfg, 1) {
        Err(EngineError::Lora { reason, .. }) => {
            assert!(reason.contains("architecture"), "{reason}")
        }
        Err(e) => panic!("expected a LoRA error, got {e}"),
        Ok(_) => panic!("an adapter for llama loaded on gemma3"),
    }
}
