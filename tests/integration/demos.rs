//! Retrieved demonstrations (a task's `[demos]`): each request is shown the pool examples
//! most similar to it, the same way in `classify` and `eval` (one `Classifier` path), and
//! the result names them; the per-request prompt is exactly the fixed prompt with those
//! examples; `tune` offers such candidates.

use std::path::Path;

use edgeact::classify::{Classifier, Request, ScorePath};
use edgeact::spec::Task;

use crate::testkit::{self, edgeact_with_cache as edgeact, stderr};

/// The sentiment task with a pool of the 6 train sentences of each label (the split data of
/// the learned-method tests), 2 of each shown per request by TF-IDF similarity.
fn demo_task(dir: &Path, data: &Path) -> std::path::PathBuf {
    let mut pool = String::new();
    for l in std::fs::read_to_string(data).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["split"] == "train" {
            pool.push_str(&format!(
                "  {{ text = {}, label = {} }},\n",
                v["text"], v["label"]
            ));
        }
    }
    let src = std::fs::read_to_string(testkit::root().join("tasks/sentiment.toml")).unwrap();
    let head = src.split("examples = [").next().unwrap();
    let rest = src.split("examples = [").nth(1).unwrap();
    let after = rest.split_once("\n]").unwrap().1;
    let text =
        format!("{head}examples = [\n{pool}]{after}\n[demos]\nper_label = 2\nby = \"tfidf\"\n");
    let p = dir.join("demos.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_task_with_retrieved_demonstrations_classifies_the_same_in_classify_and_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = crate::learned::split_data(dir.path());
    let task_path = demo_task(dir.path(), &data);
    let task = Task::load(&task_path).unwrap();
    assert_eq!(task.examples.len(), 12);

    // classify: every result names 2 demonstrations of each label.
    let texts = [
        "What a wonderful, friendly place, I loved it.",
        "Terrible service, cold food, never again.",
    ];
    let o = edgeact(
        &[
            "classify",
            "--task",
            task_path.to_str().unwrap(),
            "--batch-size",
            "1",
            texts[0],
            texts[1],
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let classified: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(classified[0]["top_label"], "positive", "{}", classified[0]);
    assert_eq!(classified[1]["top_label"], "negative", "{}", classified[1]);
    for c in &classified {
        let demos: Vec<usize> = serde_json::from_value(c["demos"].clone()).unwrap();
        assert_eq!(demos.len(), 4, "{c}");
        for l in ["positive", "negative"] {
            let n = demos
                .iter()
                .filter(|&&i| task.examples[i]["label"] == l)
                .count();
            assert_eq!(n, 2, "{l} in {demos:?}");
        }
    }

    // eval over the same two texts: the same decisions and demonstrations.
    let eval_data = dir.path().join("two.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .zip(["positive", "negative"])
        .enumerate()
        .map(|(i, (t, l))| {
            serde_json::json!({"id": format!("t{i}"), "text": t, "label": l}).to_string()
        })
        .collect();
    std::fs::write(&eval_data, lines.join("\n") + "\n").unwrap();
    let out_dir = dir.path().join("eval");
    let o = edgeact(
        &[
            "eval",
            "--task",
            task_path.to_str().unwrap(),
            "--data",
            eval_data.to_str().unwrap(),
            "--batch-size",
            "1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(out_dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 2);
    for (p, c) in preds.iter().zip(&classified) {
        assert_eq!(p["predicted"], c["top_label"]);
        assert_eq!(p["demos"], c["demos"]);
        let (a, b) = (
            p["confidence"].as_f64().unwrap(),
            c["confidence"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "eval {a} vs classify {b}");
    }
}

#[test]
fn the_per_request_prompt_is_the_fixed_prompt_with_the_chosen_examples() {
    let dir = tempfile::tempdir().unwrap();
    let data = crate::learned::split_data(dir.path());
    let task = Task::load(&demo_task(dir.path(), &data)).unwrap();
    let mut engine = testkit::engine(2);
    let text = "The waiter was rude and the soup was cold.";
    let req = Request::text("r", text);
    let retrieved = Classifier::new(&mut engine, task.clone(), 0, Some(false), None).unwrap();
    let r = retrieved.classify(&mut engine, &req).unwrap();
    assert_eq!(r.demos.len(), 4);
    // The same examples in the same order as a fixed prefix: the same prompt tokens.
    let mut fixed = task.clone();
    fixed.demos = None;
    fixed.examples = r.demos.iter().map(|&i| task.examples[i].clone()).collect();
    let f = Classifier::new(&mut engine, fixed, 1, Some(false), None).unwrap();
    assert_eq!(
        retrieved.prepare(&engine, &req).unwrap().tokens,
        f.prepare(&engine, &req).unwrap().tokens
    );
    let s = f.classify(&mut engine, &req).unwrap();
    assert!(s.demos.is_empty());
    assert_eq!(r.top_label, s.top_label);
    // Decoded from an empty cache on both sides, the same tokens give the same scores (the
    // fast path differs only by how llama.cpp splits the decodes: within about 0.02 here).
    let naive = |c: &Classifier, engine: &mut edgeact::model::Engine| {
        c.classify_many(engine, std::slice::from_ref(&req), ScorePath::Naive)
            .pop()
            .unwrap()
            .unwrap()
    };
    let (rn, sn) = (naive(&retrieved, &mut engine), naive(&f, &mut engine));
    assert_eq!(rn.demos, r.demos);
    for (l, p) in &rn.scores {
        assert!(
            (p - sn.scores[l]).abs() < 1e-6,
            "{l}: {p} vs {}",
            sn.scores[l]
        );
    }
    // Only the instruction and the query's head are reused: the demonstrations are decoded
    // per request.
    assert!(
        r.tokens.reused < s.tokens.reused,
        "{:?} {:?}",
        r.tokens,
        s.tokens
    );
    assert!(r.tokens.decoded > s.tokens.decoded);
}

#[test]
fn tune_offers_retrieved_demonstrations_as_prompt_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let data = crate::learned::split_data(dir.path());
    let out = dir.path().join("t.toml");
    let o = edgeact(
        &[
            "tune",
            "--task",
            "sentiment",
            "--data",
            data.to_str().unwrap(),
            "--methods",
            "prompt",
            "--shots",
            "2",
            "--per-class",
            "6",
            "--demos",
            "tfidf",
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    for row in [
        "sentiment, 2-shot |",
        "sentiment, 2 of 6 per label retrieved by tfidf |",
        "sentiment, 2 of 6 per label retrieved by tfidf, calibrated |",
    ] {
        assert!(report.contains(row), "{row} missing: {report}");
    }
    // Whatever won reads back as a task.
    Task::load(&out).unwrap();
}
