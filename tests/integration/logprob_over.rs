//! One-token labels scored over the labels (their tied output rows, no vocabulary-wide
//! logits row) against the full-vocabulary path, on the real model: same labels, same label
//! probabilities, batched and one at a time, with and without calibration; labels of
//! several tokens normalized at each branch against the naive path's full rows.

use std::path::Path;

use edgeact::classify::{Classifier, Prepared, Request, ScorePath};
use edgeact::model::scoring::{softmax, LogprobOver};
use edgeact::model::{Engine, ScoreJob, ScoreOut};
use edgeact::spec::Task;

use crate::testkit;

/// The 40 sentences of tests/data/sentiment-obvious.jsonl.
fn texts() -> Vec<Request> {
    std::fs::read_to_string(testkit::root().join("tests/data/sentiment-obvious.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Request::text(v["id"].as_str().unwrap(), v["text"].as_str().unwrap())
        })
        .collect()
}

fn lps(o: &ScoreOut) -> Vec<f64> {
    o.labels.iter().map(|l| l.total).collect()
}

fn top(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Every job of `prepared` over `over`, all in one call (micro-batched) or one per call.
fn score(
    engine: &mut Engine,
    c: &Classifier,
    prepared: &[Prepared],
    over: LogprobOver,
    batched: bool,
) -> Vec<ScoreOut> {
    let jobs: Vec<ScoreJob> = prepared
        .iter()
        .map(|p| ScoreJob {
            prefix: Some(0),
            tokens: &p.tokens,
            trie: c.trie(),
            pruning: None,
            logprob_over: over,
        })
        .collect();
    if batched {
        engine.score(&jobs).unwrap()
    } else {
        jobs.iter()
            .map(|j| engine.score(std::slice::from_ref(j)).unwrap().remove(0))
            .collect()
    }
}

#[test]
fn one_token_labels_over_labels_match_the_vocabulary_path() {
    let mut engine = testkit::engine(1);
    assert_eq!(
        engine.label_rows_unavailable(),
        None,
        "Gemma 3 ties its output"
    );
    let c = Classifier::new(
        &mut engine,
        testkit::task("sentiment"),
        0,
        Some(false),
        None,
    )
    .unwrap();
    assert!(
        c.trie().decoded.is_empty(),
        "sentiment labels are one token"
    );
    let reqs = texts();
    assert!(reqs.len() >= 40);
    let prepared: Vec<Prepared> = reqs
        .iter()
        .map(|r| c.prepare(&engine, r).unwrap())
        .collect();
    let mut worst = 0.0f64;
    for batched in [true, false] {
        let before = engine.decode_counts();
        let labels = score(&mut engine, &c, &prepared, LogprobOver::Labels, batched);
        let work = engine.decode_counts().since(&before);
        let vocab = score(&mut engine, &c, &prepared, LogprobOver::Vocab, batched);
        assert_eq!(work.rows as usize, prepared.len(), "one row a request");
        if batched {
            // 40 requests in groups of 32 and 8: several per decode, so the rows' order
            // in the tapped hidden states is exercised.
            assert!(labels.iter().any(|o| o.batch_jobs == 32), "not batched");
        }
        for (i, (l, v)) in labels.iter().zip(&vocab).enumerate() {
            assert_eq!(l.logprob_over, LogprobOver::Labels);
            assert_eq!(v.logprob_over, LogprobOver::Vocab);
            // Normalized over the labels: their probabilities sum to 1.
            let mass: f64 = lps(l).iter().map(|x| x.exp()).sum();
            assert!((mass - 1.0).abs() < 1e-9, "request {i}: mass {mass}");
            // Over the vocabulary they leave room for every other token.
            let vmass: f64 = lps(v).iter().map(|x| x.exp()).sum();
            assert!(vmass < 1.0);
            assert_eq!(top(&lps(l)), top(&lps(v)), "request {i}: top label differs");
            let d = max_abs_diff(&softmax(&lps(l)), &softmax(&lps(v)));
            assert!(
                d < 1e-3,
                "request {i} (batched {batched}): label probabilities differ by {d}"
            );
            worst = worst.max(d);
            assert_eq!(l.decoded_tokens, v.decoded_tokens);
        }
    }
    eprintln!("max |label prob, over labels - over vocab|: {worst:.2e}");
}

/// Through the classifier: the task key chooses the path, results say which one ran,
/// and probabilities, calibration and decisions agree.
#[test]
fn results_say_what_logprobs_are_normalized_over() {
    let mut engine = testkit::engine(1);
    let reqs: Vec<Request> = texts().into_iter().take(12).collect();
    let mut by_over = Vec::new();
    for over in [LogprobOver::Labels, LogprobOver::Vocab] {
        let mut task = testkit::task("sentiment");
        task.logprob_over = over;
        // Calibrated: the content-free prior is measured on the same path. The same slot
        // both times: llama.cpp rounds differently where the cells sit in the KV cache
        // (about 0.01 in label probability), which is not what this compares.
        let c = Classifier::new(&mut engine, task, 0, Some(true), None).unwrap();
        let results: Vec<_> = c
            .classify_many(&mut engine, &reqs, ScorePath::Fast)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for r in &results {
            assert_eq!(r.logprob_over, over);
            let json = serde_json::to_value(r).unwrap();
            let name = match over {
                LogprobOver::Labels => "labels",
                LogprobOver::Vocab => "vocab",
            };
            assert_eq!(json["logprob_over"], name);
        }
        by_over.push(results);
    }
    for (l, v) in by_over[0].iter().zip(&by_over[1]) {
        assert_eq!(l.top_label, v.top_label);
        assert_eq!(l.abstained, v.abstained);
        for (k, p) in &l.scores {
            assert!(
                (p - v.scores[k]).abs() < 1e-3,
                "{k}: {p} vs {}",
                v.scores[k]
            );
        }
    }
}

/// Labels of several tokens over the labels: each row normalized over the tokens that
/// continue a label there, computed from the label rows alone, agrees with the full logits
/// rows of the naive path normalized the same way; the labels' probabilities sum to 1; the
/// tokens that follow with certainty are not decoded.
#[test]
fn multi_token_labels_over_labels_match_full_rows_normalized_at_each_branch() {
    let mut engine = testkit::engine(1);
    let src = "instruction = \"Say what the customer writes about.\"\nquery = \"Customer: {text}\\nTopic:\"\n\
               labels = [\
                 { name = \"arrival\", text = \" card arrival\" },\
                 { name = \"broken\", text = \" card not working\" },\
                 { name = \"refund\", text = \" refund request\" },\
                 { name = \"praise\", text = \" praise for the staff\" },\
                 { name = \"complaint\", text = \" complaint about the staff\" },\
                 { name = \"other\", text = \" other\" }]\n";
    let task = Task::parse(src, Path::new("topic.toml"), "topic").unwrap();
    assert_eq!(task.logprob_over, LogprobOver::Labels, "the default");
    let c = Classifier::new(&mut engine, task, 0, Some(false), None).unwrap();
    assert!(!c.trie().decoded.is_empty(), "multi-token labels");
    let prepared: Vec<Prepared> = texts()
        .iter()
        .take(12)
        .map(|r| c.prepare(&engine, r).unwrap())
        .collect();
    let mut worst = 0.0f64;
    for batched in [true, false] {
        let labels = score(&mut engine, &c, &prepared, LogprobOver::Labels, batched);
        let vocab = score(&mut engine, &c, &prepared, LogprobOver::Vocab, batched);
        for ((p, l), v) in prepared.iter().zip(&labels).zip(&vocab) {
            assert_eq!(l.logprob_over, LogprobOver::Labels);
            let mass: f64 = l.labels.iter().map(|x| x.total.exp()).sum();
            assert!(
                (mass - 1.0).abs() < 1e-6,
                "over the labels they sum to 1: {mass}"
            );
            assert!(
                l.decoded_tokens < v.decoded_tokens,
                "certain tokens are not decoded: {} vs {}",
                l.decoded_tokens,
                v.decoded_tokens
            );
            let naive = engine
                .score_naive(&p.tokens, c.trie(), None, LogprobOver::Labels)
                .unwrap();
            let (probs, reference) = (softmax(&lps(l)), softmax(&lps(&naive)));
            worst = worst.max(max_abs_diff(&probs, &reference));
            // The same top label, unless the reference has two within the rounding.
            let (a, b) = (top(&lps(l)), top(&lps(&naive)));
            assert!(
                a == b || (reference[a] - reference[b]).abs() < 0.05,
                "{a} vs {b}"
            );
        }
    }
    // The naive path decodes every label from an empty sequence: llama.cpp's kernels round
    // differently there (0.1-0.7 nats on these labels over the vocabulary too, see
    // `Engine::score_naive`), and over the labels the mass sits on few labels.
    eprintln!("max |label prob, fast - naive| over labels: {worst:.2e}");
    assert!(worst < 0.1, "{worst}");
    // In one decode with a job over the vocabulary, the full logits rows are read for both
    // (as on an engine without label rows): the job over the labels is normalized the same.
    let job = |over| ScoreJob {
        prefix: Some(0),
        tokens: &prepared[0].tokens,
        trie: c.trie(),
        pruning: None,
        logprob_over: over,
    };
    let alone = engine.score(&[job(LogprobOver::Labels)]).unwrap().remove(0);
    let mixed = engine
        .score(&[job(LogprobOver::Labels), job(LogprobOver::Vocab)])
        .unwrap();
    assert_eq!(mixed[0].logprob_over, LogprobOver::Labels);
    assert_eq!(mixed[1].logprob_over, LogprobOver::Vocab);
    let d = max_abs_diff(&softmax(&lps(&alone)), &softmax(&lps(&mixed[0])));
    assert!(d < 0.05, "label rows vs full rows over the labels: {d}");
    let mass: f64 = mixed[0].labels.iter().map(|x| x.total.exp()).sum();
    assert!((mass - 1.0).abs() < 1e-6, "{mass}");
    let r = c
        .classify(&mut engine, &Request::text("1", "My new card never came."))
        .unwrap();
    assert_eq!(r.logprob_over, LogprobOver::Labels);
    let mass: f64 = r.labels.values().map(|l| l.logprob_total.exp()).sum();
    assert!((mass - 1.0).abs() < 1e-6, "{mass}");
}
