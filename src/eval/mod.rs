//! Evaluation: labeled JSON lines, K-shot example sets, a task run over them into metrics
//! (accuracy, macro-F1, per-class precision/recall, the confusion matrix, calibration
//! error, coverage when abstaining, latency and tokens/s); and the parts of `tune`,
//! `tune --head` and `bench-accuracy` below the commands (which are in `cmd`).

pub mod baseline;
pub mod feedback;
pub mod learn;
pub mod metrics;
pub mod plots;
pub mod retrain;
pub mod select;
pub mod select_encoder;
pub mod tune;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::classify::input;
use crate::classify::runner::{ModelSource, TaskRunner};
use crate::classify::{Request, ScorePath};
use crate::eval::metrics::Outcome;
use crate::model::FeatureParams;
use crate::spec::{Demos, Task};
use crate::util::jsonl::JsonLines;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {count} examples carry labels task `{task}` does not know: {labels}")]
    UnknownLabels {
        path: PathBuf,
        task: String,
        count: usize,
        labels: String,
    },
    #[error("{path}: no labeled examples{split}")]
    Empty { path: PathBuf, split: String },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("task `{task}`: --shots {shots} needs {shots} train examples of label `{label}`, the data has {found}")]
    Shots {
        task: String,
        shots: usize,
        label: String,
        found: usize,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Plot(#[from] plots::PlotError),
    /// The task (or its head) could not be prepared on the engine.
    #[error(transparent)]
    Setup(#[from] crate::classify::SetupError),
}

/// A labeled example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub request: Request,
    pub label: String,
    pub split: Option<String>,
}

impl Example {
    /// The example's text (the request's `text` field; empty if it has none).
    pub fn text(&self) -> &str {
        self.request
            .fields
            .get(crate::spec::TRUNCATED_FIELD)
            .map_or("", String::as_str)
    }
}

/// The split of a row that names none: by a hash of its fields (FNV-1a; label and split
/// left out), so every command and every run agrees: [`UNSPLIT_SHARES`] of `train`, `dev`
/// and `test` in percent. A user's one labeled file can be tuned on (train, dev) and
/// evaluated (test) without splitting it first.
pub fn split_of_unsplit(fields: &std::collections::BTreeMap<String, String>) -> &'static str {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in fields {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let bucket = h % 100;
    let [(train, _), (dev, _), _] = UNSPLIT_SHARES;
    if bucket < train {
        "train"
    } else if bucket < train + dev {
        "dev"
    } else {
        "test"
    }
}

/// Percent of the rows without a `split` that [`split_of_unsplit`] puts in each split.
pub const UNSPLIT_SHARES: [(u64, &str); 3] = [(70, "train"), (15, "dev"), (15, "test")];

/// Reads `{"text", "label", "split"?, "id"?}` lines; `split` keeps only that split (a row
/// without one is in the split [`split_of_unsplit`] gives it). Over `limit`, an evenly
/// spaced sample is kept (files are often sorted by label, so the first lines would not be
/// representative).
pub fn read_labeled(
    path: &Path,
    split: Option<&str>,
    limit: usize,
) -> Result<Vec<Example>, EvalError> {
    let read_err = |source| EvalError::Write {
        path: path.into(),
        source,
    };
    let mut lines = JsonLines::open(path).map_err(read_err)?;
    let mut out = Vec::new();
    let mut found = std::collections::BTreeMap::new();
    while let Some((line_no, line)) = lines.next_line().map_err(read_err)? {
        let mut req = match input::parse_line(line, line_no) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                return Err(EvalError::Line {
                    path: path.into(),
                    line: line_no,
                    reason: e.to_string(),
                })
            }
        };
        let label = req.fields.remove("label").ok_or_else(|| EvalError::Line {
            path: path.into(),
            line: line_no,
            reason: "no `label`".into(),
        })?;
        let ex_split = req
            .fields
            .remove("split")
            .unwrap_or_else(|| split_of_unsplit(&req.fields).to_string());
        *found.entry(ex_split.clone()).or_insert(0usize) += 1;
        if split.is_some_and(|s| ex_split != s) {
            continue;
        }
        let ex_split = Some(ex_split);
        out.push(Example {
            request: req,
            label,
            split: ex_split,
        });
    }
    if out.len() > limit {
        let n = out.len();
        out = (0..limit).map(|i| out[i * n / limit].clone()).collect();
    }
    if out.is_empty() {
        let present = found
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(EvalError::Empty {
            path: path.into(),
            split: match split {
                Some(s) if !found.is_empty() => {
                    format!(" in split `{s}` (the file's splits: {present})")
                }
                Some(s) => format!(" in split `{s}`"),
                None => String::new(),
            },
        });
    }
    Ok(out)
}

/// Labels in the data the task does not know, listed before any work starts.
pub fn check_labels(task: &Task, data: &[Example], path: &Path) -> Result<(), EvalError> {
    let unknown: BTreeMap<&str, usize> = data
        .iter()
        .filter(|e| task.label_index(&e.label).is_none())
        .fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e.label.as_str()).or_default() += 1;
            m
        });
    if unknown.is_empty() {
        return Ok(());
    }
    Err(EvalError::UnknownLabels {
        path: path.into(),
        task: task.name.clone(),
        count: unknown.values().sum(),
        labels: unknown.keys().copied().collect::<Vec<_>>().join(", "),
    })
}

/// Replaces the task's few-shot examples with `k` per label from `pool` (first ones in file
/// order: deterministic), keeping the labels' order.
pub fn with_shots(task: &Task, pool: &[Example], k: usize) -> Result<Task, EvalError> {
    let mut t = task.clone();
    t.examples.clear();
    let fields = t
        .query
        .fields()
        .iter()
        .map(|f| f.to_string())
        .collect::<BTreeSet<_>>();
    let mut per_label: Vec<Vec<&Example>> = vec![Vec::new(); t.labels.len()];
    for e in pool {
        if let Some(i) = t.label_index(&e.label) {
            if per_label[i].len() < k && fields.iter().all(|f| e.request.fields.contains_key(f)) {
                per_label[i].push(e);
            }
        }
    }
    for (i, exs) in per_label.iter().enumerate() {
        if exs.len() < k {
            return Err(EvalError::Shots {
                task: t.name.clone(),
                shots: k,
                label: t.labels[i].name.clone(),
                found: exs.len(),
            });
        }
    }
    // Interleave labels so no label's examples all sit next to the query.
    for round in 0..k {
        for (i, exs) in per_label.iter().enumerate() {
            let e = exs[round];
            let mut m: BTreeMap<String, String> = e.request.fields.clone();
            m.insert("label".into(), t.labels[i].name.clone());
            t.examples.push(m);
        }
    }
    t.name = format!("{}-{k}shot", task.name);
    Ok(t)
}

/// The task with `[demos]`: its examples replaced by a pool of up to `per_label` examples of
/// each label from `pool` (the first ones in file order; a label with fewer keeps what it
/// has), of which each request is shown its `demos.per_label` most similar.
pub fn with_demos(task: &Task, pool: &[Example], per_label: usize, demos: Demos) -> Task {
    let fields = task
        .query
        .fields()
        .iter()
        .map(|f| f.to_string())
        .collect::<BTreeSet<_>>();
    let mut per: Vec<Vec<&Example>> = vec![Vec::new(); task.labels.len()];
    for e in pool {
        if let Some(i) = task.label_index(&e.label) {
            if per[i].len() < per_label && fields.iter().all(|f| e.request.fields.contains_key(f)) {
                per[i].push(e);
            }
        }
    }
    let mut t = task.clone();
    t.examples.clear();
    // Interleaved, as `with_shots`: pool order breaks ties between equally similar ones.
    for round in 0..per.iter().map(Vec::len).max().unwrap_or(0) {
        for (i, exs) in per.iter().enumerate() {
            if let Some(e) = exs.get(round) {
                let mut m: BTreeMap<String, String> = e.request.fields.clone();
                m.insert("label".into(), t.labels[i].name.clone());
                t.examples.push(m);
            }
        }
    }
    t.demos = Some(demos);
    t.name = format!(
        "{}-{}of{}-{}",
        task.name,
        demos.per_label,
        per_label,
        demos.by.name()
    );
    t
}

/// One candidate's run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRun {
    pub task: String,
    pub template_sha256: String,
    pub calibrated: bool,
    pub metrics: metrics::Metrics,
    pub latency_ms: metrics::LatencySummary,
    pub decoded_tokens_per_s: f64,
    pub classifications_per_s: f64,
}

/// Classifies `data` with `task` on `engine` (prefix slot `slot`), with a progress bar.
/// A task with a `[head]` runs through it (as its file says).
pub fn run<M: ModelSource + ?Sized>(
    engine: &mut M,
    task: Task,
    slot: usize,
    calibrate: Option<bool>,
    data: &[Example],
    batch_size: usize,
    progress: bool,
) -> Result<(EvalRun, Vec<serde_json::Value>), EvalError> {
    let mut runner = TaskRunner::new(
        engine,
        task,
        slot,
        calibrate,
        None,
        None,
        FeatureParams::default(),
    )?;
    run_with(engine, &mut runner, data, batch_size, progress)
}

/// [`run`], also returning every example's label probabilities (see [`run_probs`]).
pub fn run_task_probs<M: ModelSource + ?Sized>(
    engine: &mut M,
    task: Task,
    calibrate: Option<bool>,
    data: &[Example],
    batch_size: usize,
    progress: bool,
) -> Result<(EvalRun, Vec<Vec<f64>>), EvalError> {
    let mut runner = TaskRunner::new(
        engine,
        task,
        0,
        calibrate,
        None,
        None,
        FeatureParams::default(),
    )?;
    run_probs(engine, &mut runner, data, batch_size, progress).map(|(r, _, p)| (r, p))
}

/// [`run`] with a task prepared by the caller (say, with another method).
pub fn run_with<M: ModelSource + ?Sized>(
    engine: &mut M,
    classifier: &mut TaskRunner,
    data: &[Example],
    batch_size: usize,
    progress: bool,
) -> Result<(EvalRun, Vec<serde_json::Value>), EvalError> {
    run_probs(engine, classifier, data, batch_size, progress).map(|(r, p, _)| (r, p))
}

/// A run, its prediction records and every example's label probabilities.
pub type RunWithProbs = (EvalRun, Vec<serde_json::Value>, Vec<Vec<f64>>);

/// [`run_with`], also returning every example's label probabilities (task label order;
/// zeros for an example that failed): the stack's prompt block is fitted on them.
pub fn run_probs<M: ModelSource + ?Sized>(
    engine: &mut M,
    classifier: &mut TaskRunner,
    data: &[Example],
    batch_size: usize,
    progress: bool,
) -> Result<RunWithProbs, EvalError> {
    let labels: Vec<String> = classifier
        .task()
        .labels
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let bar = if progress {
        indicatif::ProgressBar::new(data.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(classifier.task().name.clone());
    let mut outcomes = Vec::with_capacity(data.len());
    let mut lat = Vec::with_capacity(data.len());
    let mut decoded = 0usize;
    let mut predictions = Vec::with_capacity(data.len());
    let started = Instant::now();
    for chunk in data.chunks(batch_size.max(1)) {
        let reqs: Vec<Request> = chunk.iter().map(|e| e.request.clone()).collect();
        let t = Instant::now();
        let results = classifier.classify_many(engine, &reqs, ScorePath::Fast);
        let per = t.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
        for (ex, res) in chunk.iter().zip(results) {
            // Labels were checked up front.
            let gold = classifier.task().label_index(&ex.label).unwrap_or(0);
            match res {
                Ok(r) => {
                    let predicted = classifier.task().label_index(&r.top_label).unwrap_or(0);
                    decoded += r.tokens.decoded;
                    lat.push(per);
                    let mut record = json!({
                        "id": r.id, "gold": ex.label, "predicted": r.top_label,
                        "confidence": r.confidence, "abstained": r.abstained,
                    });
                    // Retrieved demonstrations: which examples this request was shown.
                    if !r.demos.is_empty() {
                        record["demos"] = json!(r.demos);
                    }
                    predictions.push(record);
                    outcomes.push(Outcome {
                        gold,
                        predicted,
                        confidence: r.confidence,
                        abstained: r.abstained,
                        probs: labels
                            .iter()
                            .map(|l| r.scores.get(l).copied().unwrap_or(0.0))
                            .collect(),
                    });
                }
                Err(e) => {
                    // Counted as wrong with zero confidence (an extra "#n" class in the
                    // confusion matrix), and listed in predictions.jsonl.
                    predictions.push(
                        json!({"id": ex.request.id, "gold": ex.label, "error": e.to_string()}),
                    );
                    outcomes.push(Outcome {
                        gold,
                        predicted: labels.len(),
                        confidence: 0.0,
                        abstained: true,
                        probs: vec![0.0; labels.len()],
                    });
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let probs = outcomes.iter().map(|o| o.probs.clone()).collect();
    let run = EvalRun {
        task: classifier.task().name.clone(),
        template_sha256: classifier.template_sha256(),
        calibrated: classifier.calibrating(),
        metrics: metrics::evaluate(&labels, &outcomes, 10),
        latency_ms: metrics::latency_summary(&lat),
        decoded_tokens_per_s: decoded as f64 / secs,
        classifications_per_s: data.len() as f64 / secs,
    };
    Ok((run, predictions, probs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        Task::parse(
            "instruction = \"x\"\nquery = \"Review: {text}\\nSentiment:\"\nlabels = [{ name = \"pos\", text = \" positive\" }, { name = \"neg\", text = \" negative\" }]\n",
            Path::new("t.toml"),
            "t",
        )
        .unwrap()
    }

    fn ex(text: &str, label: &str) -> Example {
        Example {
            request: Request::text("1", text),
            label: label.into(),
            split: Some("train".into()),
        }
    }

    #[test]
    fn unknown_labels_are_listed_up_front() {
        let data = vec![
            ex("a", "pos"),
            ex("b", "neutral"),
            ex("c", "neutral"),
            ex("d", "mixed"),
        ];
        let e = check_labels(&task(), &data, Path::new("d.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 examples") && e.contains("mixed, neutral"),
            "{e}"
        );
        assert!(check_labels(&task(), &data[..1], Path::new("d.jsonl")).is_ok());
    }

    #[test]
    fn shots_are_balanced_interleaved_and_deterministic() {
        let pool = vec![
            ex("p1", "pos"),
            ex("p2", "pos"),
            ex("n1", "neg"),
            ex("p3", "pos"),
            ex("n2", "neg"),
        ];
        let t = with_shots(&task(), &pool, 2).unwrap();
        let got: Vec<(&str, &str)> = t
            .examples
            .iter()
            .map(|e| (e["text"].as_str(), e["label"].as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("p1", "pos"), ("n1", "neg"), ("p2", "pos"), ("n2", "neg")]
        );
        let e = with_shots(&task(), &pool, 3).unwrap_err().to_string();
        assert!(e.contains("`neg`") && e.contains("has 2"), "{e}");
    }

    #[test]
    fn a_demo_pool_takes_what_each_label_has_and_runs_as_demos() {
        let pool = vec![
            ex("p1", "pos"),
            ex("p2", "pos"),
            ex("n1", "neg"),
            ex("p3", "pos"),
        ];
        let d = Demos {
            per_label: 1,
            by: crate::spec::DemoSimilarity::Tfidf,
        };
        let t = with_demos(&task(), &pool, 2, d);
        let got: Vec<&str> = t.examples.iter().map(|e| e["text"].as_str()).collect();
        assert_eq!(got, vec!["p1", "n1", "p2"], "neg has one: it keeps it");
        assert_eq!(t.demos, Some(d));
        // The task file written for it reads back with the same pool and choice.
        let back = Task::parse(&t.to_toml(), Path::new("b.toml"), "b").unwrap();
        assert_eq!(back.demos, Some(d));
        assert_eq!(back.examples, t.examples);
        assert_eq!(back.template_sha256(), t.template_sha256());
        let mut other = t.clone();
        other.demos = Some(Demos { per_label: 2, ..d });
        assert_ne!(other.template_sha256(), t.template_sha256());
    }

    #[test]
    fn reads_splits_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"text\":\"a\",\"label\":\"pos\",\"split\":\"train\"}\n{\"text\":\"b\",\"label\":\"neg\",\"split\":\"test\"}\n{\"text\":\"c\",\"label\":\"neg\",\"split\":\"test\"}\n",
        )
        .unwrap();
        assert_eq!(read_labeled(&p, Some("test"), 10).unwrap().len(), 2);
        let two = read_labeled(&p, None, 2).unwrap();
        assert_eq!(two.len(), 2);
        // An evenly spaced sample, not the first lines.
        assert_eq!(
            (two[0].label.as_str(), two[1].label.as_str()),
            ("pos", "neg")
        );
        assert!(matches!(
            read_labeled(&p, Some("dev"), 10),
            Err(EvalError::Empty { .. })
        ));
        let e = read_labeled(&p, Some("dev"), 10).unwrap_err().to_string();
        assert!(
            e.contains("split `dev` (the file's splits: test 2, train 1)"),
            "{e}"
        );
        std::fs::write(&p, "{\"text\":\"a\"}\n").unwrap();
        assert!(read_labeled(&p, None, 10)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn rows_without_a_split_are_split_by_their_text_the_same_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let mut text = String::new();
        for i in 0..2000 {
            text.push_str(&format!("{{\"text\":\"message {i}\",\"label\":\"a\"}}\n"));
        }
        // One row keeps the split it names.
        text.push_str("{\"text\":\"message 0\",\"label\":\"b\",\"split\":\"dev\"}\n");
        std::fs::write(&p, text).unwrap();
        let count = |s: &str| read_labeled(&p, Some(s), usize::MAX).unwrap();
        let (train, dev, test) = (count("train"), count("dev"), count("test"));
        assert_eq!(train.len() + dev.len() + test.len(), 2001);
        for (rows, want) in [(&train, 1400.0), (&dev, 300.0), (&test, 300.0)] {
            let n = rows.len() as f64;
            assert!(
                (n - want).abs() < want * 0.15,
                "{n} rows, about {want} wanted"
            );
        }
        assert!(dev.iter().any(|e| e.label == "b"));
        // The same rows every time, and a split disjoint from the others.
        assert_eq!(count("dev"), dev);
        let ids = |rows: &[Example]| -> std::collections::BTreeSet<String> {
            rows.iter()
                .map(|e| e.request.fields["text"].clone())
                .collect()
        };
        assert!(ids(&train).is_disjoint(&ids(&test)));
        assert_eq!(train[0].split.as_deref(), Some("train"));
    }
}
