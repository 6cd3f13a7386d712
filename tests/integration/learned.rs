//! `edgeact tune` choosing among the learned methods on dev, `eval` running the winner, and
//! one scorer everywhere: `serve` (stdin mode) gives what `classify` gives for a task with a
//! stack, and both say which method decided.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::testkit::{self, edgeact_with_cache as edgeact, stderr};

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// The 40 obvious sentences with splits: 6 per label to train, the rest dev (also used by
/// the `learn` tests).
pub(crate) fn split_data(dir: &Path) -> std::path::PathBuf {
    let src = std::fs::read_to_string(testkit::root().join("tests/data/sentiment-obvious.jsonl"))
        .unwrap();
    let mut per_label = std::collections::HashMap::new();
    let mut data = String::new();
    for l in src.lines() {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let n = per_label
            .entry(v["label"].as_str().unwrap().to_string())
            .or_insert(0);
        *n += 1;
        v["split"] = if *n <= 6 { "train" } else { "dev" }.into();
        data.push_str(&format!("{v}\n"));
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, data).unwrap();
    p
}

/// The arguments of `edgeact tune` on the sentiment task over `data`, 8 per label (6 are
/// there), last-token pooling and alpha 1, writing `task` (also used by the `learn` tests).
pub(crate) fn tune_args<'a>(data: &'a Path, methods: &'a str, task: &'a Path) -> Vec<&'a str> {
    vec![
        "tune",
        "--task",
        "sentiment",
        "--data",
        data.to_str().unwrap(),
        "--methods",
        methods,
        "--per-class",
        "8",
        "--pooling",
        "last",
        "--alpha",
        "1",
        "--out",
        task.to_str().unwrap(),
    ]
}

fn tune(dir: &Path, data: &Path, methods: &str, out: &str) -> String {
    let task = dir.join(out);
    let o = edgeact(&tune_args(data, methods, &task), dir);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    // 6 per label in the train split: fewer than 8, used as they are and said so.
    assert!(report.contains("fewer than 8"), "{report}");
    report
}

#[test]
fn tune_chooses_a_learned_method_and_serve_runs_it_as_classify_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = split_data(dir.path());

    // All learned methods: one row each on the same dev rows, the winner written.
    let report = tune(dir.path(), &data, "tfidf,head,stack", "all.toml");
    for m in [
        "tfidf, words (the baseline",
        "head, last pooling",
        // The stack on the best head's layers: `stack, last pooling` or `stack, layers 12, ...`.
        "last pooling, weight",
    ] {
        assert!(report.contains(m), "{m} missing: {report}");
    }
    let written = std::fs::read_to_string(dir.path().join("all.toml")).unwrap();
    assert!(
        written.contains("[head]") && written.contains("dev_macro_f1"),
        "{written}"
    );
    let eval_dir = dir.path().join("eval");
    let o = edgeact(
        &[
            "eval",
            "--task",
            dir.path().join("all.toml").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--split",
            "dev",
            "--out",
            eval_dir.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(eval_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["n"], 28);

    // The stack alone (features from the cache filled above), then classify and serve.
    tune(dir.path(), &data, "stack", "stack.toml");
    assert!(dir.path().join("stack.stack.json").exists());
    let task = dir.path().join("stack.toml");
    let texts = [
        "What a wonderful, friendly place, I loved it.",
        "Terrible service, cold food, never again.",
    ];
    let o = edgeact(
        &[
            "classify",
            "--task",
            task.to_str().unwrap(),
            // One request per decode on both sides: a stack may carry the prompt's label
            // scores, and llama.cpp rounds a batched decode a little differently.
            "--batch-size",
            "1",
            texts[0],
            texts[1],
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let classified = json_lines(&o.stdout);
    assert_eq!(classified[0]["provenance"]["method"], "stack");
    assert_eq!(classified[0]["top_label"], "positive", "{}", classified[0]);
    assert_eq!(classified[1]["top_label"], "negative", "{}", classified[1]);

    let mut child = Command::new(testkit::bin())
        .current_dir(testkit::root())
        .env("EDGEACT_CACHE", dir.path())
        .args([
            "serve",
            "--batch-size",
            "1",
            "--task",
            task.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for (i, t) in texts.iter().enumerate() {
            let line = serde_json::json!({"id": format!("r{i}"), "text": t});
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let served = json_lines(&out.stdout);
    assert_eq!(served.len(), 2);
    for (s, c) in served.iter().zip(&classified) {
        assert_eq!(s["provenance"]["method"], "stack", "{s}");
        assert_eq!(s["top_label"], c["top_label"]);
        for l in ["positive", "negative"] {
            let (a, b) = (
                s["scores"][l].as_f64().unwrap(),
                c["scores"][l].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-6, "{l}: serve {a} vs classify {b}");
        }
    }
}

/// A stack with the prompt block runs the task's prompt as well: `tune` offers it when the
/// prompt candidates ran, and `classify` decides by the stack over the prompt's scores (the
/// trace says `stack`, the prompt's label tokens were scored). `serve` runs the same
/// `TaskRunner` (checked for stacks above).
#[test]
fn a_stack_with_the_prompt_block_reads_the_prompt_scores_everywhere() {
    use edgeact::classify::linear::LrParams;
    use edgeact::classify::stack::{StackFile, StackModel, StackParams};
    use edgeact::classify::tfidf::TextParams;

    let dir = tempfile::tempdir().unwrap();
    let data = split_data(dir.path());
    let o = edgeact(
        &[
            "tune",
            "--task",
            "sentiment",
            "--data",
            data.to_str().unwrap(),
            "--methods",
            "prompt,stack",
            "--shots",
            "0",
            "--per-class",
            "8",
            "--alpha",
            "1",
            "--pooling",
            "last",
            "--out",
            dir.path().join("p.toml").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    // Own examples are not train texts: that prompt may feed the stack; its rows follow.
    assert!(report.contains("prompt block: sentiment"), "{report}");
    assert!(report.contains("prompt weight 1, alpha 1"), "{report}");

    // A stack whose only informative block is the prompt's (the words are one constant
    // text): it must follow the prompt, which gets these obvious sentences right.
    let labels = vec!["positive".to_string(), "negative".to_string()];
    let texts = ["x"; 4];
    let y = [0, 1, 0, 1];
    let probs: Vec<Vec<f64>> = y
        .iter()
        .map(|&c| {
            if c == 0 {
                vec![0.9, 0.1]
            } else {
                vec![0.1, 0.9]
            }
        })
        .collect();
    let p = StackParams {
        dense: None,
        text: Some(TextParams::words()),
        prompt: Some(1.0),
        lr: LrParams::default(),
    };
    let m = StackModel::fit_blocks(&texts, &[], &probs, &y, 2, &p).unwrap();
    StackFile::new(labels, None, 0, m)
        .save(&dir.path().join("s.stack.json"))
        .unwrap();
    let base = std::fs::read_to_string(testkit::root().join("tasks/sentiment.toml")).unwrap();
    let task = dir.path().join("s.toml");
    std::fs::write(
        &task,
        format!("{base}\n[head]\nfile = \"s.stack.json\"\nmethod = \"stack\"\n"),
    )
    .unwrap();
    let texts = [
        "What a wonderful, friendly place, I loved it.",
        "Terrible service, cold food, never again.",
    ];
    let o = edgeact(
        &[
            "classify",
            "--task",
            task.to_str().unwrap(),
            texts[0],
            texts[1],
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let classified = json_lines(&o.stdout);
    for (r, want) in classified.iter().zip(["positive", "negative"]) {
        assert_eq!(r["provenance"]["method"], "stack", "{r}");
        assert_eq!(r["top_label"], want, "{r}");
        // The prompt's pass was run: its label tokens were scored.
        assert!(r["tokens"]["scored"].as_u64().unwrap() > 0, "{r}");
    }
}
