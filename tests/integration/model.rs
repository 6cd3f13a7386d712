//! Integration tests on the real model (Gemma 3 270M Q4_K_M, fetched by scripts/fetch-model):
//! label scoring paths against the naive reference, accuracy on a labeled set, calibration,
//! truncation and the token budget.

use std::collections::BTreeMap;
use std::path::Path;

use edgeact::classify::{Classifier, Prepared, RecordError, Request, ScorePath};
use edgeact::model::scoring::{softmax, LogprobOver, Pruning};
use edgeact::model::{Engine, ScoreJob, ScoreOut};
use edgeact::spec::Task;

use crate::testkit;

/// A BANKING77-style task with many multi-token labels, more label branches than the
/// engine has work sequences, so the label trie is scored in several passes.
/// Long only because it is a table: one line per label name.
fn intent_task() -> Task {
    let names = [
        "activate my card",
        "age limit",
        "apple pay or google pay",
        "atm support",
        "automatic top up",
        "balance not updated after bank transfer",
        "balance not updated after cheque or cash deposit",
        "beneficiary not allowed",
        "cancel transfer",
        "card about to expire",
        "card acceptance",
        "card arrival",
        "card delivery estimate",
        "card linking",
        "card not working",
        "card payment fee charged",
        "card payment not recognised",
        "card payment wrong exchange rate",
        "card swallowed",
        "cash withdrawal charge",
        "cash withdrawal not recognised",
        "change pin",
        "compromised card",
        "contactless not working",
        "country support",
        "declined card payment",
        "declined cash withdrawal",
        "declined transfer",
        "direct debit payment not recognised",
        "disposable card limits",
        "edit personal details",
        "exchange charge",
        "exchange rate",
        "exchange via app",
        "extra charge on statement",
        "failed transfer",
        "fiat currency support",
        "get disposable virtual card",
        "get physical card",
        "getting spare card",
        "getting virtual card",
        "lost or stolen card",
        "lost or stolen phone",
        "order physical card",
        "passcode forgotten",
        "pending card payment",
        "pending cash withdrawal",
        "pending top up",
        "pending transfer",
        "pin blocked",
        "receiving money",
        "refund not showing up",
        "request refund",
    ];
    let labels: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                "{{ name = \"{}\", text = \" {}\" }}",
                n.replace(' ', "_"),
                n
            )
        })
        .collect();
    let src = format!(
        "instruction = \"Name the customer's banking intent.\"\nquery = \"Customer: {{text}}\\nIntent:\"\nlabels = [{}]\n\
         examples = [{{ text = \"Where is my new card?\", label = \"card_arrival\" }}, {{ text = \"I forgot my PIN\", label = \"change_pin\" }}]\n",
        labels.join(", ")
    );
    Task::parse(&src, Path::new("intent.toml"), "intent").expect("intent task")
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The fast path (prefix reuse + label trie + micro-batching) must agree with the naive
/// path (every label decoded from an empty sequence) for single-token, mixed (Chinese) and
/// many multi-token labels. llama.cpp's CPU kernels round differently with batch size and KV
/// cell layout (measured: up to 0.3 nats on unlikely labels), so the check is on label
/// probabilities and on log-likelihoods of the labels that matter; a wrong KV mask or trie
/// position moves multi-token labels by whole nats and fails it.
#[test]
fn fast_paths_match_naive_reference() {
    let mut engine = testkit::engine(3);
    let tasks = [
        (
            testkit::task("city-event"),
            vec![
                "Huge flames in the tower block",
                "The river flooded the square",
            ],
        ),
        (
            testkit::task("sentiment-zh"),
            vec!["非常高兴", "太糟糕了，再也不来了"],
        ),
        (
            intent_task(),
            vec![
                "I still have not received my card",
                "my card got eaten by the machine",
            ],
        ),
    ];
    for (slot, (task, texts)) in tasks.into_iter().enumerate() {
        let name = task.name.clone();
        let c = Classifier::new(&mut engine, task, slot, Some(false), None).unwrap();
        let reqs: Vec<Request> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Request::text(i.to_string(), *t))
            .collect();
        let prepared: Vec<_> = reqs
            .iter()
            .map(|r| c.prepare(&engine, r).unwrap())
            .collect();
        let jobs: Vec<ScoreJob> = prepared
            .iter()
            .map(|p| ScoreJob {
                prefix: Some(slot),
                tokens: &p.tokens,
                trie: c.trie(),
                pruning: None,
                logprob_over: LogprobOver::Vocab,
            })
            .collect();
        let batched = engine.score(&jobs).unwrap();
        for (p, b) in prepared.iter().zip(&batched) {
            check_prompt_against_naive(&mut engine, &c, slot, &name, p, b);
        }
        if name == "intent" {
            assert!(
                c.trie().n_branches > 16,
                "intent labels should need several branch passes"
            );
        }
    }
}

/// The label log-likelihoods of a scoring.
fn label_lps(o: &ScoreOut) -> Vec<f64> {
    o.labels.iter().map(|l| l.total).collect()
}

/// One prompt of [`fast_paths_match_naive_reference`]: its micro-batched scoring `b`, and
/// alone, and pruned, against the naive path.
fn check_prompt_against_naive(
    engine: &mut Engine,
    c: &Classifier,
    slot: usize,
    name: &str,
    p: &Prepared,
    b: &ScoreOut,
) {
    assert_eq!(b.reused_tokens, c.prefix_len(), "{name}: prefix not reused");
    let single = engine
        .score(&[ScoreJob {
            prefix: Some(slot),
            tokens: &p.tokens,
            trie: c.trie(),
            pruning: None,
            logprob_over: LogprobOver::Vocab,
        }])
        .unwrap();
    let naive = engine
        .score_naive(&p.tokens, c.trie(), None, LogprobOver::Vocab)
        .unwrap();
    let lp = label_lps;
    let probs = softmax(&lp(&naive));
    for (path, out) in [("micro-batched", b), ("single", &single[0])] {
        let d_prob = max_abs_diff(&softmax(&lp(out)), &probs);
        let d_lp = lp(out)
            .iter()
            .zip(lp(&naive))
            .zip(&probs)
            .filter(|(_, &p)| p > 0.01)
            .map(|((a, b), _)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{name} {path}: max |prob - naive| {d_prob:.4}, max |logprob - naive| (p>1%) {d_lp:.3}"
        );
        assert!(
            d_prob < 0.05,
            "{name} {path}: label probabilities differ from naive by {d_prob}"
        );
        assert!(
            d_lp < 0.5,
            "{name} {path}: label log-likelihoods differ from naive by {d_lp}"
        );
    }
    check_pruned_against_naive(engine, c, slot, name, p, &naive, &single[0]);
    // The naive path decodes the prompt once per label: far more tokens.
    assert!(naive.decoded_tokens >= c.trie().paths.len() * (p.tokens.len() - 1));
    assert!(
        b.decoded_tokens * 4 < naive.decoded_tokens,
        "{name}: {} vs {}",
        b.decoded_tokens,
        naive.decoded_tokens
    );
}

/// Pruned search: the same top label as the naive path; finished labels agree with it,
/// unfinished ones carry an upper bound; fewer tokens decoded than `single` (unpruned).
fn check_pruned_against_naive(
    engine: &mut Engine,
    c: &Classifier,
    slot: usize,
    name: &str,
    p: &Prepared,
    naive: &ScoreOut,
    single: &ScoreOut,
) {
    let lp = label_lps;
    let pruning = Pruning {
        margin_nats: 3.0,
        per_token: false,
    };
    let pruned = engine
        .score(&[ScoreJob {
            prefix: Some(slot),
            tokens: &p.tokens,
            trie: c.trie(),
            pruning: Some(pruning),
            logprob_over: LogprobOver::Vocab,
        }])
        .unwrap()
        .remove(0);
    let argmax = |v: Vec<f64>| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    assert_eq!(
        argmax(lp(&pruned)),
        argmax(lp(naive)),
        "{name}: pruning changed the top label"
    );
    for (l, n) in pruned.labels.iter().zip(&naive.labels) {
        if l.pruned {
            assert!(
                l.total >= n.total - 0.5,
                "{name}: a bound below the label's score"
            );
        } else if n.total > lp(naive).into_iter().fold(f64::MIN, f64::max) - 3.0 {
            assert!(
                (l.total - n.total).abs() < 0.5,
                "{name}: {} vs {}",
                l.total,
                n.total
            );
        }
    }
    let n_pruned = pruned.labels.iter().filter(|l| l.pruned).count();
    eprintln!(
        "{name} pruned: {n_pruned} of {} labels left unfinished, {} vs {} tokens decoded",
        pruned.labels.len(),
        pruned.decoded_tokens,
        single.decoded_tokens
    );
    if name == "intent" {
        assert!(n_pruned > 0, "intent: nothing pruned at a 3-nat margin");
        assert!(pruned.decoded_tokens < single.decoded_tokens);
    }
}

fn labeled(path: &str) -> Vec<(Request, String)> {
    std::fs::read_to_string(testkit::root().join(path))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                Request::text(v["id"].as_str().unwrap(), v["text"].as_str().unwrap()),
                v["label"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn accuracy(engine: &mut Engine, c: &Classifier, data: &[(Request, String)]) -> f64 {
    let reqs: Vec<Request> = data.iter().map(|(r, _)| r.clone()).collect();
    let mut correct = 0;
    for (chunk, gold) in reqs.chunks(8).zip(data.chunks(8)) {
        for (res, (_, g)) in c
            .classify_many(engine, chunk, ScorePath::Fast)
            .into_iter()
            .zip(gold)
        {
            correct += usize::from(&res.unwrap().top_label == g);
        }
    }
    correct as f64 / data.len() as f64
}

/// 40 obvious sentiment sentences written for this test (tests/data/sentiment-obvious.jsonl).
/// Measured here: 4-shot uncalibrated 1.000, calibrated 1.000; zero-shot uncalibrated 0.775,
/// calibrated 0.950 (see README). The floors sit a little under what was measured.
#[test]
fn accuracy_on_obvious_sentiment_and_calibration() {
    let data = labeled("tests/data/sentiment-obvious.jsonl");
    let mut engine = testkit::engine(4);
    let few = testkit::task("sentiment");
    let mut zero = few.clone();
    zero.examples.clear();
    zero.name = "sentiment-zero-shot".into();
    let mut acc = BTreeMap::new();
    for (slot, (task, cal)) in [(&few, false), (&few, true), (&zero, false), (&zero, true)]
        .into_iter()
        .enumerate()
    {
        let c = Classifier::new(&mut engine, task.clone(), slot, Some(cal), None).unwrap();
        assert_eq!(c.prior().is_some(), cal);
        let a = accuracy(&mut engine, &c, &data);
        eprintln!("{} calibrated={cal}: accuracy {a:.3}", task.name);
        acc.insert((task.examples.len(), cal), a);
    }
    assert!(acc[&(4, false)] >= 0.9, "{acc:?}");
    assert!(acc[&(4, true)] >= 0.9, "{acc:?}");
    // Zero-shot, the base model is biased towards one label; calibration must repair it.
    assert!(acc[&(0, true)] >= 0.85, "{acc:?}");
    assert!(
        acc[&(0, true)] > acc[&(0, false)],
        "calibration did not help zero-shot: {acc:?}"
    );
}

/// Single-token labels need no branch sequences, so one decode holds as many requests as
/// the board has work sequences and logits rows (32 on x86-dev, not 16): 40 requests take
/// two decodes, one logits row each, and get the labels and scores they get one at a time
/// (within the rounding llama.cpp's kernels show across batch sizes).
#[test]
fn single_token_labels_fill_a_decode_with_the_same_results() {
    let data = labeled("tests/data/sentiment-obvious.jsonl");
    let mut engine = testkit::engine(1);
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
        "sentiment labels are one token each"
    );
    assert_eq!(engine.jobs_per_decode_for(c.trie()), 32);
    assert_eq!(
        engine.jobs_per_decode(),
        16,
        "multi-token label sets keep half for branches"
    );
    let prepared: Vec<Prepared> = data
        .iter()
        .map(|(r, _)| c.prepare(&engine, r).unwrap())
        .collect();
    let jobs: Vec<ScoreJob> = prepared
        .iter()
        .map(|p| ScoreJob {
            prefix: Some(0),
            tokens: &p.tokens,
            trie: c.trie(),
            pruning: None,
            logprob_over: LogprobOver::Vocab,
        })
        .collect();
    let before = engine.decode_counts();
    let batched = engine.score(&jobs).unwrap();
    let work = engine.decode_counts().since(&before);
    assert_eq!((work.decodes, work.rows), (2, 40), "{work:?}");
    let suffix: usize = prepared
        .iter()
        .map(|p| p.tokens.len() - c.prefix_len())
        .sum();
    assert_eq!(
        work.tokens as usize, suffix,
        "only the suffixes are decoded"
    );
    assert!(batched
        .iter()
        .all(|b| b.batch_jobs == 32 || b.batch_jobs == 8));
    // The grouping before: 16 a decode.
    let by16: Vec<ScoreOut> = jobs
        .chunks(16)
        .flat_map(|c| engine.score(c).unwrap())
        .collect();
    let singles: Vec<ScoreOut> = jobs
        .iter()
        .map(|j| engine.score(std::slice::from_ref(j)).unwrap().remove(0))
        .collect();
    for (what, outs) in [("32 a decode", &batched), ("16 a decode", &by16)] {
        let mut worst = 0.0f64;
        for (b, single) in outs.iter().zip(&singles) {
            let (lb, ls) = (label_lps(b), label_lps(single));
            let top = |v: &[f64]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j]));
            assert_eq!(
                top(&lb),
                top(&ls),
                "{what}: top label differs: {lb:?} vs {ls:?}"
            );
            worst = worst.max(max_abs_diff(&softmax(&lb), &softmax(&ls)));
            // The tolerances of fast_paths_match_naive_reference: llama.cpp's kernels round
            // differently with batch size (measured up to 0.3 nats on a label at p = 0.08).
            assert!(max_abs_diff(&lb, &ls) < 0.5, "{what}: {lb:?} vs {ls:?}");
        }
        eprintln!("{what} vs one at a time: max |prob difference| {worst:.5}");
        assert!(
            worst < 0.05,
            "{what}: label probabilities differ by {worst}"
        );
    }
    // Before and after: 32 a decode against 16 a decode, within the same rounding.
    let (mut d_lp, mut d_prob) = (0.0f64, 0.0f64);
    for (a, b) in batched.iter().zip(&by16) {
        let (la, lb) = (label_lps(a), label_lps(b));
        d_lp = d_lp.max(max_abs_diff(&la, &lb));
        d_prob = d_prob.max(max_abs_diff(&softmax(&la), &softmax(&lb)));
    }
    eprintln!("32 a decode vs 16 a decode: max |logprob difference| {d_lp:.4}, |prob| {d_prob:.4}");
    assert!(
        d_lp < 0.5 && d_prob < 0.05,
        "32 and 16 a decode differ by {d_lp} nats, {d_prob}"
    );
}

#[test]
fn truncation_policies_and_budget() {
    let mut engine = testkit::engine(3);
    let long = "The service was slow. ".repeat(200);
    for (slot, (policy, max)) in [("keep_head", 32u32), ("keep_tail", 32), ("reject", 32)]
        .into_iter()
        .enumerate()
    {
        let mut task = testkit::task("sentiment");
        task.name = format!("sentiment-{policy}");
        task.input.max_tokens = max;
        task.input.truncate = serde_json::from_value(serde_json::json!(policy)).unwrap();
        let c = Classifier::new(&mut engine, task, slot, None, None).unwrap();
        let res = c.classify(&mut engine, &Request::text("long", long.clone()));
        match policy {
            "reject" => match res {
                Err(RecordError::TooLong { tokens, max }) => {
                    assert!(tokens > 1000);
                    assert_eq!(max, 32);
                }
                other => panic!("expected TooLong, got {other:?}"),
            },
            _ => {
                let r = res.unwrap();
                let t = r.truncated.expect("truncation reported");
                assert_eq!(t.kept_tokens, 32);
                assert!(t.input_tokens > 1000);
                assert!(
                    r.tokens.prompt <= c.prefix_len() + 32 + 16,
                    "prompt {} tokens",
                    r.tokens.prompt
                );
            }
        }
        // Empty text is an error, not a guess.
        assert!(matches!(
            c.classify(&mut engine, &Request::text("e", "  ")),
            Err(RecordError::EmptyText)
        ));
    }
}

/// A board whose budget cannot hold the model is refused before loading, with the numbers;
/// with allow_ctx_shrink a too-large n_ctx is shrunk instead.
#[test]
fn budget_refuses_or_shrinks() {
    let mut cfg = testkit::board();
    cfg.memory_budget_mib = 200;
    let err = Engine::load(&cfg, 1)
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains("needs") && err.contains("memory_budget_mib is 200"),
        "{err}"
    );

    let mut cfg = testkit::board();
    cfg.n_ctx = 65_536;
    let need = edgeact::model::preflight(&testkit::board(), 1)
        .unwrap()
        .2
        .estimate
        .total_mib();
    cfg.memory_budget_mib = need + 64;
    assert!(Engine::load(&cfg, 1).is_err());
    cfg.allow_ctx_shrink = true;
    let e = Engine::load(&cfg, 1).unwrap();
    assert_eq!(e.info.shrunk_from_ctx, Some(65_536));
    assert!(e.info.n_ctx < 65_536 && e.info.estimate_mib <= cfg.memory_budget_mib);
}

/// A decoded prefix is saved and loaded by the next engine (same scores); a corrupted state
/// file is detected, rebuilt, and gives the same scores again.
#[test]
fn prefix_state_is_persisted_and_a_corrupt_one_rebuilt() {
    use edgeact::model::PrefixSource;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = testkit::board();
    cfg.prefix_cache_dir = Some(dir.path().to_path_buf());
    let req = Request::text("p", "The staff were kind and the food was great");
    let mut scores = Vec::new();
    for (round, want) in [
        PrefixSource::Decoded,
        PrefixSource::Loaded,
        PrefixSource::Rebuilt,
    ]
    .into_iter()
    .enumerate()
    {
        if round == 2 {
            let state = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "state"))
                .expect("a saved prefix state");
            let mut bytes = std::fs::read(&state).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(&state, bytes).unwrap();
        }
        let mut engine = Engine::load(&cfg, 1).unwrap();
        let c = Classifier::new(
            &mut engine,
            testkit::task("sentiment"),
            0,
            Some(false),
            None,
        )
        .unwrap();
        assert_eq!(c.prefix_source, want, "round {round}");
        let r = c.classify(&mut engine, &req).unwrap();
        assert_eq!(r.tokens.reused, c.prefix_len());
        scores.push(r.labels["positive"].logprob_total);
    }
    assert!((scores[0] - scores[1]).abs() < 1e-6, "{scores:?}");
    assert!((scores[0] - scores[2]).abs() < 1e-6, "{scores:?}");
}

#[test]
fn hidden_state_features_are_finite_model_wide_and_differ() {
    use edgeact::classify::features::{extract_states, FeatureSpec, Pooling};
    use edgeact::model::FeatureParams;
    let engine = testkit::engine(1);
    let n_embd = engine.n_embd();
    assert_eq!(n_embd, 640, "Gemma 3 270M's embedding width");
    let mut fctx = engine
        .feature_context(FeatureParams {
            n_batch_tokens: 64,
            n_seq_max: 4,
            threads: 2,
        })
        .unwrap();
    let spec = FeatureSpec::prompt_eol(Pooling::Last);
    let texts = [
        "My card was stolen, please block it.",
        "What is the exchange rate for dollars?",
        "The food was cold and the waiter was rude.",
        "My card was stolen, please block it.",
        "I love this phone.",
    ];
    // Packed several to a decode (64 tokens, 4 sequences at most).
    let batched = extract_states(&engine, &mut fctx, &spec, &texts, None).unwrap();
    assert_eq!(batched.len(), texts.len());
    for s in &batched {
        assert_eq!((s.last.len(), s.mean.len()), (n_embd, n_embd));
        assert!(s.last.iter().chain(&s.mean).all(|v| v.is_finite()));
        assert!(s.last.iter().any(|&v| v != 0.0));
    }
    let dist = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f32>()
            .sqrt()
    };
    let norm = dist(&batched[0].last, &vec![0.0; n_embd]);
    for (i, j) in [(0, 1), (0, 2), (1, 2), (2, 4)] {
        assert!(
            dist(&batched[i].last, &batched[j].last) > 0.05 * norm,
            "texts {i} and {j} gave (nearly) the same last-token state"
        );
        assert!(dist(&batched[i].mean, &batched[j].mean) > 0.0);
    }
    // The same text in another place of the batch gets the same features; and alone.
    let alone = extract_states(&engine, &mut fctx, &spec, &texts[3..4], None).unwrap();
    for other in [&batched[3], &alone[0]] {
        assert!(
            dist(&batched[0].last, &other.last) < 0.02 * norm,
            "{}",
            dist(&batched[0].last, &other.last) / norm
        );
        assert!(dist(&batched[0].mean, &other.mean) < 0.02 * norm);
    }
    // A sequence longer than one decode is refused, not cut silently.
    let long = vec![2; fctx.max_tokens() + 1];
    assert!(fctx.hidden_states(&[long], &[], |_| {}).is_err());
}
