//! `edgeact tune` choosing among the learned methods on dev, `eval` running the winner, and
//! one scorer everywhere: `serve` (stdin mode) gives what `classify` gives for a task with a
//! stack, and both say which method decided.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::testkit;

fn edgeact(args: &[&str], cache: &Path) -> Output {
    Command::new(testkit::bin())
        .args(args)
        .current_dir(testkit::root())
        .env_remove("RUST_LOG")
        .env("EDGEACT_CACHE", cache)
        .stdin(Stdio::null())
        .output()
        .expect("spawn edgeact")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// The 40 obvious sentences with splits: 6 per label to train, the rest dev.
fn split_data(dir: &Path) -> std::path::PathBuf {
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

fn tune(dir: &Path, data: &Path, methods: &str, out: &str) -> String {
    let task = dir.join(out);
    let o = edgeact(
        &[
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
        ],
        dir,
    );
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
        "stack, last pooling",
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
        .args(["serve", "--task", task.to_str().unwrap()])
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
