//! A task whose learned scorer reads no model (a stack of TF-IDF and/or sentence-encoder
//! blocks) runs without the model's weights: `plan` leaves them out of the estimate and
//! says so, `classify -v` says on stderr that they were not loaded, and the results are
//! the ones the loaded engine gives (same labels, probabilities and provenance).

use std::path::{Path, PathBuf};

use edgeact::classify::runner::TaskRunner;
use edgeact::classify::{Request, ScorePath};
use edgeact::model::FeatureParams;
use edgeact::spec::Task;

use crate::learned::{split_data, tune_args};
use crate::testkit::{self, edgeact_with_cache as edgeact, stderr};

/// `edgeact tune` over the sentiment task with `methods`; the task file it wrote.
fn tuned(dir: &Path, methods: &str) -> PathBuf {
    let data = split_data(dir);
    let task = dir.join("t.toml");
    let o = edgeact(&tune_args(&data, methods, &task), dir);
    assert!(o.status.success(), "{}", stderr(&o));
    task
}

/// A result as JSON without its timings (the only field that differs between two runs).
fn without_timings(r: &edgeact::classify::ClassifyResult) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap();
    v.as_object_mut().unwrap().remove("timings_ms");
    v
}

const TEXTS: [&str; 4] = [
    "I loved every minute of it, wonderful.",
    "Terrible service, I want my money back.",
    "It was fine.",
    "The worst purchase I have ever made, broken on arrival",
];

/// The task's results on the loaded engine and on the model only planned, compared.
fn same_results_without_the_weights(task_path: &Path) {
    let task = Task::load(task_path).unwrap();
    let cfg = edgeact::spec::config_for_tasks(&testkit::board(), [&task]).unwrap();
    assert!(!cfg.load_weights, "{} reads the model", task_path.display());
    let mut planned = edgeact::model::planned_info(&cfg, 1).unwrap();
    let mut engine = testkit::engine(1);
    let setup = FeatureParams::default();
    let mut on_engine =
        TaskRunner::new(&mut engine, task.clone(), 0, None, None, None, setup).unwrap();
    let mut unloaded = TaskRunner::new(&mut planned, task, 0, None, None, None, setup).unwrap();
    assert!(!unloaded.needs_engine());
    let reqs: Vec<Request> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| Request::text(i.to_string(), t.to_string()))
        .collect();
    let want = on_engine.classify_many(&mut engine, &reqs, ScorePath::Fast);
    let got = unloaded.classify_many(&mut planned, &reqs, ScorePath::Fast);
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        let (w, g) = (w.as_ref().unwrap(), g.as_ref().unwrap());
        assert_eq!(without_timings(w), without_timings(g));
    }
}

/// `plan` and `classify -v` on the task: what a user sees.
fn says_the_weights_were_not_loaded(dir: &Path, task_path: &Path) {
    let task = task_path.to_str().unwrap();
    let o = edgeact(&["plan", "--task", task], dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["load_weights"], false, "{plan}");
    let detail = plan["estimate"].as_str().unwrap();
    assert!(detail.contains("model weights not loaded"), "{detail}");
    assert!(!detail.contains("KV cache"), "{detail}");
    // The weights alone are over 200 MiB; the encoder (when counted) about 100.
    assert!(plan["estimate_mib"].as_u64().unwrap() < 200, "{plan}");

    let mut args = vec!["classify", "-v", "--task", task];
    args.extend(TEXTS);
    let o = edgeact(&args, dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model weights not loaded"), "{err}");
    assert!(!err.contains("model loaded"), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), TEXTS.len());
    for r in &lines {
        assert!(r["label"].is_string() || r["abstained"] == true, "{r}");
        // Provenance still names the model the board names (its checksum checked).
        assert_eq!(r["provenance"]["model"], "gemma-3-270m-q4_k_m.gguf", "{r}");
        assert_eq!(r["provenance"]["model_sha256"].as_str().unwrap().len(), 64);
    }
}

#[test]
fn a_tfidf_stack_runs_without_the_weights_and_gives_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let task = tuned(dir.path(), "tfidf");
    same_results_without_the_weights(&task);
    says_the_weights_were_not_loaded(dir.path(), &task);
}

#[test]
fn an_encoder_stack_runs_without_the_weights_and_gives_the_same_results() {
    let enc = testkit::root()
        .join("models")
        .join(edgeact::encoder::ENCODER_DIR);
    if !enc.join("model.safetensors").exists() {
        println!(
            "skipped: {} missing (run scripts/fetch-model --encoder)",
            enc.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let task = tuned(dir.path(), "encoder");
    let stack = std::fs::read_to_string(dir.path().join("t.stack.json")).unwrap();
    let stack: serde_json::Value = serde_json::from_str(&stack).unwrap();
    assert!(
        stack["stack"]["encoder"].is_object(),
        "not an encoder stack"
    );
    same_results_without_the_weights(&task);
    says_the_weights_were_not_loaded(dir.path(), &task);
}
