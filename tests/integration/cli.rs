//! The `edgeact` binary end to end on the real model: results, and a clear error (and exit
//! code) for each kind of bad input, with the good lines of a batch still classified.

use std::process::Output;

use crate::testkit::{self, stderr};

fn edgeact(args: &[&str], stdin: Option<&[u8]>) -> Output {
    testkit::edgeact(args, &[], stdin.unwrap_or_default())
}

fn lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn classifies_texts_with_full_result_records() {
    let o = edgeact(
        &[
            "classify",
            "The staff were kind and the food was great",
            "Rude staff and cold food, never again",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = lines(&o);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["label"], "positive");
    assert_eq!(r[1]["label"], "negative");
    for x in &r {
        for key in [
            "id",
            "confidence",
            "margin",
            "scores",
            "abstained",
            "tokens",
            "timings_ms",
            "provenance",
        ] {
            assert!(!x[key].is_null(), "missing {key} in {x}");
        }
        let p = &x["provenance"];
        assert_eq!(
            p["model_sha256"],
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        );
        assert_eq!(p["board"], "x86-dev");
        assert_eq!(p["task"], "sentiment");
        assert_eq!(p["template_sha256"].as_str().unwrap().len(), 16);
        let sum: f64 = x["scores"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert!(x["tokens"]["reused"].as_u64().unwrap() > 0);
    }
    // Quiet by default: no llama.cpp loader lines on stderr.
    assert!(stderr(&o).trim().is_empty(), "stderr: {}", stderr(&o));
}

#[test]
fn chinese_from_stdin_and_abstention() {
    let o = edgeact(
        &["classify", "--task", "sentiment-zh"],
        Some("{\"id\":\"a1\",\"text\":\"非常高兴\"}\n".as_bytes()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = lines(&o);
    assert_eq!(r[0]["id"], "a1");
    assert_eq!(r[0]["label"], "positive");

    // With an abstain threshold no result can meet, the label is withheld but explained.
    let o = edgeact(
        &["classify", "--min-confidence", "1.0", "It was fine I guess"],
        None,
    );
    assert!(o.status.success());
    let r = lines(&o);
    assert_eq!(r[0]["abstained"], true);
    assert!(r[0]["label"].is_null());
    assert!(r[0]["top_label"].is_string());
}

#[test]
fn batch_keeps_going_past_bad_lines() {
    let mut input = Vec::new();
    input.extend_from_slice(b"{\"id\":\"ok1\",\"text\":\"Wonderful hotel, lovely staff\"}\n");
    input.extend_from_slice(b"{\"id\":\"bad-utf8\",\"text\":\"caf\xff\"}\n");
    input.extend_from_slice(b"{\"id\":\"broken\", \"text\": \n");
    input.extend_from_slice(b"{\"id\":\"empty\",\"text\":\"   \"}\n");
    input.extend_from_slice(b"{\"id\":\"notext\"}\n");
    input.extend_from_slice(b"{\"id\":\"ok2\",\"text\":\"Awful, it broke in a day\"}\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.jsonl");
    std::fs::write(&path, &input).unwrap();
    let o = edgeact(&["classify", "--input", path.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let r = lines(&o);
    assert_eq!(r.len(), 6, "one record per input line");
    let by_line = |n: u64| {
        r.iter()
            .find(|x| x["line"] == n)
            .unwrap_or_else(|| panic!("no record for line {n}"))
    };
    assert_eq!(by_line(2)["error"]["kind"], "invalid_utf8");
    assert_eq!(by_line(3)["error"]["kind"], "invalid_json");
    assert_eq!(by_line(4)["error"]["kind"], "empty_text");
    assert_eq!(by_line(4)["id"], "empty");
    assert!(by_line(5)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`text`"));
    let ok: Vec<_> = r.iter().filter(|x| x["error"].is_null()).collect();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[0]["id"], "ok1");
    assert_eq!(ok[0]["label"], "positive");
    assert_eq!(ok[1]["label"], "negative");
    assert!(
        stderr(&o).contains("2 of 6") || stderr(&o).contains("4 of 6"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn model_and_config_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, "this is not a model").unwrap();
    let bad_board = dir.path().join("bad.toml");
    std::fs::write(
        &bad_board,
        "memory_budget_mib = 1024\nmodel_path = \"m.gguf\"\nthreads = 0\n",
    )
    .unwrap();
    let cases: Vec<(Vec<String>, i32, Vec<&str>)> = vec![
        (
            vec!["--model".into(), "/nonexistent/m.gguf".into()],
            3,
            vec!["/nonexistent/m.gguf", "does not exist"],
        ),
        (
            vec!["--model".into(), not_gguf.display().to_string()],
            3,
            vec!["is not a GGUF file"],
        ),
        (
            vec!["--model-sha256".into(), "0".repeat(64)],
            3,
            vec!["sha256", "expected 0000"],
        ),
        (
            vec!["--memory-budget-mib".into(), "100".into()],
            3,
            vec!["memory_budget_mib is 100", "needs"],
        ),
        (
            vec!["--task".into(), "no-such-task".into()],
            2,
            vec!["unknown task `no-such-task`"],
        ),
        (
            vec!["--board".into(), "no-such-board".into()],
            2,
            vec!["unknown board `no-such-board`"],
        ),
        (
            vec!["--board".into(), bad_board.display().to_string()],
            2,
            vec!["bad.toml", "`threads`"],
        ),
    ];
    for (extra, code, needles) in cases {
        let mut args = vec!["classify".to_string()];
        args.extend(extra.clone());
        args.push("some text".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = edgeact(&argv, None);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{extra:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{extra:?}: expected one line, got: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{extra:?}: `{n}` not in: {err}");
        }
        assert!(o.stdout.is_empty());
    }
}

/// `tune --methods ...,encoder` without the encoder beside the model stops at once with one
/// line naming the folder and the fetch, before any candidate runs.
#[test]
fn tune_with_the_encoder_missing_says_so_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::write(&model, "not read: the check comes first").unwrap();
    let o = edgeact(
        &[
            "tune",
            "--task",
            "sentiment",
            "--data",
            "/nonexistent.jsonl",
            "--methods",
            "tfidf,encoder",
            "--model",
            model.to_str().unwrap(),
        ],
        None,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("all-MiniLM-L6-v2") && err.contains("fetch-model --encoder"),
        "{err}"
    );
}

#[test]
fn plan_prints_the_estimate_without_loading() {
    let o = edgeact(
        &[
            "plan",
            "--board",
            "rpi4",
            "--model",
            "models/gemma-3-270m-q4_k_m.gguf",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["board"], "rpi4");
    assert!(v["estimate_mib"].as_u64().unwrap() <= v["memory_budget_mib"].as_u64().unwrap());
    // rpi4 returns 16 logits rows a decode: 16 one-token-label requests, or 8 with branches.
    assert_eq!(v["requests_per_decode"]["one_token_labels"], 16);
    assert_eq!(v["requests_per_decode"]["longer_labels"], 8);
}

#[test]
fn eval_writes_metrics_consistent_with_its_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("eval");
    let o = edgeact(
        &[
            "eval",
            "--task",
            "sentiment",
            "--data",
            "tests/data/sentiment-obvious.jsonl",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    let preds: Vec<serde_json::Value> = std::fs::read_to_string(out_dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 40);
    let correct = preds.iter().filter(|p| p["gold"] == p["predicted"]).count();
    assert!((m["accuracy"].as_f64().unwrap() - correct as f64 / 40.0).abs() < 1e-12);
    let total: u64 = m["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 40);
    for key in ["macro_f1", "ece", "per_class", "coverage", "latency_ms"] {
        assert!(!m[key].is_null(), "metrics.json lacks {key}");
    }
    for svg in ["confusion.svg", "reliability.svg"] {
        let s = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(
            s.contains("<svg") && s.trim_end().ends_with("</svg>"),
            "{svg}"
        );
    }
    assert!(std::fs::read_to_string(out_dir.join("report.md"))
        .unwrap()
        .contains("confusion.svg"));

    // Labels the task does not know are listed before any work, exit 2.
    let o = edgeact(
        &[
            "eval",
            "--task",
            "city-event",
            "--data",
            "tests/data/sentiment-obvious.jsonl",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("negative, positive"), "{}", stderr(&o));
}

/// The 40 obvious sentences with splits: 6 per label to train, the rest dev; written to
/// `dir`/d.jsonl.
fn split_sentiment_data(dir: &std::path::Path) -> std::path::PathBuf {
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
    let data_path = dir.join("d.jsonl");
    std::fs::write(&data_path, data).unwrap();
    data_path
}

/// `edgeact tune --head` on `data_path`, writing `dir`/s-head.toml and its head file;
/// returns the head file's JSON.
fn tune_head(dir: &std::path::Path, data_path: &std::path::Path) -> serde_json::Value {
    let task_path = dir.join("s-head.toml");
    let o = edgeact(
        &[
            "tune",
            "--head",
            "--task",
            "sentiment",
            "--data",
            data_path.to_str().unwrap(),
            "--per-class",
            "6",
            "--pooling",
            "last,mean",
            "--alpha",
            "1",
            "--no-feature-cache",
            "--out",
            task_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(
        report.contains("| last | 1 |") && report.contains("| mean | 1 |"),
        "{report}"
    );
    let head: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("s-head.head.json")).unwrap()).unwrap();
    assert_eq!(head["labels"], serde_json::json!(["positive", "negative"]));
    assert_eq!(head["n_embd"], 640);
    assert_eq!(
        head["model_sha256"],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    );
    let task = std::fs::read_to_string(&task_path).unwrap();
    assert!(
        task.contains("[head]") && task.contains("s-head.head.json"),
        "{task}"
    );
    head
}

#[test]
fn tune_head_trains_saves_and_classifies_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data_path = split_sentiment_data(dir.path());
    let task_path = dir.path().join("s-head.toml");
    let head = tune_head(dir.path(), &data_path);

    // The written task classifies through its head, and eval runs it.
    let o = edgeact(
        &[
            "classify",
            "--task",
            task_path.to_str().unwrap(),
            "What a wonderful, friendly place, I loved it.",
            "Terrible service, cold food, never again.",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = lines(&o);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["top_label"], "positive", "{}", r[0]);
    assert_eq!(r[1]["top_label"], "negative", "{}", r[1]);
    assert_eq!(
        r[0]["tokens"]["reused"], 0,
        "the head path reads features, not labels"
    );
    let out_dir = dir.path().join("eval");
    let o = edgeact(
        &[
            "eval",
            "--task",
            task_path.to_str().unwrap(),
            "--data",
            data_path.to_str().unwrap(),
            "--split",
            "dev",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["n"], 28);
    assert!(m["accuracy"].as_f64().unwrap() >= 0.75, "{}", m["accuracy"]);

    // --method both combines head and label scores; a head from another model is refused.
    let o = edgeact(
        &[
            "classify",
            "--task",
            task_path.to_str().unwrap(),
            "--method",
            "both",
            "Absolutely delicious, best meal in years.",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lines(&o)[0]["top_label"], "positive");
    let mut h = head.clone();
    h["model_sha256"] = "00".repeat(32).into();
    std::fs::write(dir.path().join("s-head.head.json"), h.to_string()).unwrap();
    let o = edgeact(
        &["classify", "--task", task_path.to_str().unwrap(), "fine"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("trained on the hidden states of model 0000"),
        "{}",
        stderr(&o)
    );
}

/// A CPU build asked to offload says so in one warning and classifies on the CPU, with the
/// same result as without the flag.
#[test]
fn gpu_layers_on_a_cpu_build_falls_back_with_a_log_line() {
    let text = "Rude staff and cold food, never again";
    let plain = edgeact(&["classify", "--no-prefix-cache", text], None);
    let asked = edgeact(
        &["classify", "--no-prefix-cache", "--gpu-layers", "99", text],
        None,
    );
    assert!(asked.status.success(), "{}", stderr(&asked));
    let err = stderr(&asked);
    assert!(
        err.contains("gpu_layers = 99 but this build has no GPU backend")
            && err.contains("running all layers on the CPU"),
        "no fallback line: {err}"
    );
    assert!(!stderr(&plain).contains("gpu_layers"), "{}", stderr(&plain));
    let (a, b) = (&lines(&plain)[0], &lines(&asked)[0]);
    assert_eq!(a["label"], b["label"]);
    assert_eq!(a["scores"], b["scores"]);
}

/// `quantize` writes a model of another type that loads and classifies, prints what a board
/// config needs, and refuses to overwrite a file or take an unknown type (exit 2).
#[test]
fn quantize_writes_a_model_that_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_0.gguf");
    let out_s = out.to_str().unwrap();
    let o = edgeact(&["quantize", "--type", "q4_0", "--out", out_s], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["type"], "q4_0");
    let bytes = std::fs::metadata(&out).unwrap().len();
    assert_eq!(report["output_bytes"], bytes);
    assert_eq!(report["output_sha256"].as_str().unwrap().len(), 64);
    assert!(!dir.path().join("q4_0.gguf.part").exists());
    let o = edgeact(
        &[
            "classify",
            "--model",
            out_s,
            "The staff were kind and the food was great",
            "Rude staff and cold food, never again",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Requantizing a 4-bit model costs accuracy (docs/benchmarks.md), so only that it
    // loads and scores is checked here, not which label wins.
    let r = lines(&o);
    assert_eq!(r.len(), 2);
    for x in &r {
        let label = x["label"].as_str().unwrap();
        assert!(["positive", "negative"].contains(&label), "{x}");
        let p: f64 = ["positive", "negative"]
            .iter()
            .map(|l| x["labels"][*l]["prob"].as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-6, "{x}");
    }
    let again = edgeact(&["quantize", "--type", "q4_0", "--out", out_s], None);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let bad = edgeact(&["quantize", "--type", "q3", "--out", "x.gguf"], None);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("unknown type `q3`"),
        "{}",
        stderr(&bad)
    );
}
