//! `edgeact learn`: corrections appended to a tuned task's feedback log, the learned model
//! refitted with the parameters `tune` chose, and swapped in only when its dev macro-F1 is
//! not lower. A TF-IDF task (no model pass) and a head on the real model.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::learned::{split_data, tune_args};
use crate::testkit;

fn edgeact(args: &[&str], dir: &Path) -> Output {
    let state = dir.join("state");
    testkit::edgeact(
        args,
        &[("EDGEACT_CACHE", dir), ("EDGEACT_STATE_DIR", &state)],
        b"",
    )
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tune(dir: &Path, data: &Path, methods: &str, out: &str) -> PathBuf {
    let task = dir.join(out);
    let o = edgeact(&tune_args(data, methods, &task), dir);
    assert!(o.status.success(), "{}", text(&o));
    task
}

fn learn(dir: &Path, task: &Path, feedback: Option<&Path>) -> Output {
    let mut args = vec!["learn", "--task", task.to_str().unwrap()];
    if let Some(f) = feedback {
        args.extend(["--feedback", f.to_str().unwrap()]);
    }
    edgeact(&args, dir)
}

fn corrections(dir: &Path, name: &str, rows: &[(&str, &str)]) -> PathBuf {
    let p = dir.join(name);
    let body: String = rows
        .iter()
        .map(|(t, l)| {
            format!(
                "{}\n",
                serde_json::json!({"task": "sentiment", "text": t, "label": l})
            )
        })
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

/// Corrections that agree with the dev rows' words.
const HELPFUL: [(&str, &str); 6] = [
    (
        "Absolutely wonderful, friendly and delicious, I loved it.",
        "positive",
    ),
    (
        "Perfect, spotless, great value, highly recommended.",
        "positive",
    ),
    (
        "Fantastic experience, the staff were kind and helpful.",
        "positive",
    ),
    (
        "Terrible, broken and rude, a complete waste of money.",
        "negative",
    ),
    ("Awful, dirty and slow, I want a refund.", "negative"),
    (
        "The worst service ever, cold food and a rude waiter.",
        "negative",
    ),
];

#[test]
fn tfidf_learns_from_corrections_swaps_when_not_worse_and_keeps_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let data = split_data(dir.path());
    let task = tune(dir.path(), &data, "tfidf", "t.toml");
    let written = std::fs::read_to_string(&task).unwrap();
    assert!(
        written.contains("[train]")
            && written.contains("train_split = \"train\"")
            && written.contains("dev_split = \"dev\""),
        "{written}"
    );

    // Nothing kept yet: nothing to learn, nothing written.
    let o = learn(dir.path(), &task, None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing to learn"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&task).unwrap(), written);

    // A bad record: nothing is kept, the line and the label are named.
    let bad = corrections(
        dir.path(),
        "bad.jsonl",
        &[("fine", "positive"), ("meh", "neutral")],
    );
    let o = learn(dir.path(), &task, Some(&bad));
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("line 2") && e.contains("unknown label `neutral`"),
        "{e}"
    );
    let log = dir.path().join("state/feedback-sentiment.jsonl");
    assert!(!log.exists());

    let good = corrections(dir.path(), "good.jsonl", &HELPFUL);
    let o = learn(dir.path(), &task, Some(&good));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("feedback: 6 new, 6 kept"), "{out}");
    assert!(out.contains("6 corrections added"), "{out}");
    assert!(out.contains("swapped in the new model"), "{out}");
    let retrained = std::fs::read_to_string(&task).unwrap();
    assert!(retrained.contains("n_feedback = 6"), "{retrained}");
    assert!(retrained.contains("[train]"), "{retrained}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The same file again adds nothing.
    let o = learn(dir.path(), &task, Some(&good));
    assert!(text(&o).contains("feedback: 0 new, 6 kept"), "{}", text(&o));

    // Corrections that contradict the data make dev worse: the files stay as they were.
    let flipped: Vec<(&str, &str)> = (0..40)
        .map(|i| {
            if i % 2 == 0 {
                (
                    "wonderful great perfect loved delicious friendly",
                    "negative",
                )
            } else {
                ("terrible awful rude broken worst dirty", "positive")
            }
        })
        .collect();
    // Distinct texts, so none supersedes another.
    let owned: Vec<(String, &str)> = flipped
        .iter()
        .enumerate()
        .map(|(i, (t, l))| (format!("{t} {i}"), *l))
        .collect();
    let rows: Vec<(&str, &str)> = owned.iter().map(|(t, l)| (t.as_str(), *l)).collect();
    let harmful = corrections(dir.path(), "harmful.jsonl", &rows);
    let before = (
        std::fs::read(&task).unwrap(),
        std::fs::read(dir.path().join("t.stack.json")).unwrap(),
    );
    let o = learn(dir.path(), &task, Some(&harmful));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("kept the old model"), "{out}");
    let after = (
        std::fs::read(&task).unwrap(),
        std::fs::read(dir.path().join("t.stack.json")).unwrap(),
    );
    assert!(
        before == after,
        "files changed although the old model was kept"
    );
}

#[test]
fn a_head_on_the_real_model_is_refitted_and_still_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = split_data(dir.path());
    let task = tune(dir.path(), &data, "head", "h.toml");
    let good = corrections(dir.path(), "good.jsonl", &HELPFUL);
    let o = learn(dir.path(), &task, Some(&good));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("fitting head"), "{out}");
    assert!(
        out.contains("swapped in the new model") || out.contains("kept the old model"),
        "{out}"
    );
    let o = edgeact(
        &[
            "classify",
            "--task",
            task.to_str().unwrap(),
            "Terrible service, cold food, never again.",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["provenance"]["method"], "head", "{v}");
    assert_eq!(v["top_label"], "negative", "{v}");
}

#[test]
fn a_task_without_a_learned_method_is_refused_before_anything_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let good = corrections(dir.path(), "good.jsonl", &HELPFUL);
    let o = learn(dir.path(), Path::new("sentiment"), Some(&good));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no [head]"), "{}", text(&o));
    assert!(!dir.path().join("state").exists());
}

/// `serve` with a head task: feedback on `<prefix>/feedback` is validated (an error record
/// for a bad one), kept on disk, and after `--retrain-after` corrections the head is
/// refitted in the background (features from the inference thread) and the stats say
/// whether it was swapped in or kept; requests are answered throughout.
#[test]
fn serve_takes_feedback_retrains_in_the_background_and_reports_it_in_stats() {
    use crate::testkit::broker::Broker;
    use crate::testkit::daemon::Daemon;
    use crate::testkit::probe::{wait_online, Probe};

    let dir = tempfile::tempdir().unwrap();
    let data = split_data(dir.path());
    let task = tune(dir.path(), &data, "head", "h.toml");
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-fb", &["edgeact/fb/#"]);
    let mut daemon = Daemon::start(
        &broker,
        "fb",
        dir.path(),
        &["--task", task.to_str().unwrap(), "--retrain-after", "3"],
    );
    wait_online(&probe, "edgeact/fb");

    probe.publish(
        "edgeact/fb/feedback",
        r#"{"id":"f0","task":"sentiment","text":"so so","label":"neutral"}"#,
    );
    probe.wait_for(60, "an error record for the unknown label", |g| {
        g.iter()
            .any(|m| m.topic == "edgeact/fb/errors" && m.json()["error"]["kind"] == "unknown_label")
    });
    let err = probe.on("edgeact/fb/errors")[0].json();
    assert_eq!(err["id"], "f0", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("its labels: positive, negative"),
        "{err}"
    );

    for (i, (text, label)) in HELPFUL.iter().take(3).enumerate() {
        let f = serde_json::json!({"id": format!("f{}", i + 1), "task": "sentiment", "text": text, "label": label});
        probe.publish("edgeact/fb/feedback", f.to_string());
    }
    // A request while the retrain may run: answered.
    probe.publish(
        "edgeact/fb/sentiment/request",
        r#"{"id":"r1","text":"Terrible service, cold food, never again."}"#,
    );
    probe.wait_for(300, "stats reporting the retrain", |g| {
        g.iter().any(|m| {
            m.topic == "edgeact/fb/stats"
                && m.json()["feedback"]["last_retrain"]["outcome"].is_string()
        })
    });
    let stats = probe
        .on("edgeact/fb/stats")
        .iter()
        .map(|m| m.json())
        .rfind(|s| s["feedback"]["last_retrain"]["outcome"].is_string())
        .unwrap();
    let fb = &stats["feedback"];
    assert_eq!(fb["received_total"], 3, "{stats}");
    assert_eq!(fb["rejected_total"], 1, "{stats}");
    let last = &fb["last_retrain"];
    let outcome = last["outcome"].as_str().unwrap();
    assert!(
        outcome == "swapped" || outcome == "kept",
        "{stats}\n{}",
        daemon.log()
    );
    assert!(
        last["dev_macro_f1_old"].is_f64() && last["dev_macro_f1_new"].is_f64(),
        "{stats}"
    );
    assert_eq!(last["n_feedback"], 3, "{stats}");
    if outcome == "swapped" {
        assert_eq!(fb["applied_total"], 3, "{stats}");
        let written = std::fs::read_to_string(&task).unwrap();
        assert!(written.contains("edgeact serve"), "{written}");
    }
    let result = probe
        .on("edgeact/fb/sentiment/result")
        .first()
        .map(|m| m.json())
        .expect("the request was answered");
    assert_eq!(result["label"], "negative", "{result}");

    // Kept on disk, owner-only, before the acknowledgement.
    let log = dir.path().join("fb/feedback-sentiment.jsonl");
    let kept = std::fs::read_to_string(&log).unwrap();
    assert_eq!(kept.lines().count(), 3, "{kept}");
    assert!(daemon.terminate().success(), "{}", daemon.log());
}
