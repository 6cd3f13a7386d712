//! Per-layer model features through the layer tap (llama.cpp's eval callback on the feature
//! context): the final output matches the embeddings path, a call is deterministic, stopping
//! the graph early keeps the values of the layers it reached, and the cost against the whole
//! graph (printed, not asserted).

use std::time::Instant;

use edgeact::classify::features::{FeatureSpec, FeatureTokenizer, Pooling};
use edgeact::model::{FeatureParams, PooledStates};

use crate::testkit;

const TEXTS: [&str; 8] = [
    "My card was stolen, please block it.",
    "What is the exchange rate for dollars?",
    "The food was cold and the waiter was rude.",
    "I love this phone.",
    "Flooding reported on Main Street after the storm, two lanes closed.",
    "这家餐厅的服务太差了。",
    "Why was I charged a fee for my transfer?",
    "Great battery life and a bright screen.",
];

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let norm = a.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt();
    d / norm
}

fn close(a: &PooledStates, b: &PooledStates, tol: f32, what: &str) {
    let (l, m) = (
        max_rel_diff(&a.last, &b.last),
        max_rel_diff(&a.mean, &b.mean),
    );
    assert!(l <= tol && m <= tol, "{what}: last {l}, mean {m}");
}

#[test]
fn layer_tap_matches_the_full_graph_is_deterministic_and_stops_early() {
    let engine = testkit::engine(1);
    let n_embd = engine.n_embd();
    let mut fctx = engine
        .feature_context(FeatureParams {
            n_batch_tokens: 64,
            n_seq_max: 4,
            threads: 2,
        })
        .unwrap();
    let n_layer = fctx.n_layer();
    assert_eq!(n_layer, 18, "Gemma 3 270M has 18 layers");
    let spec = FeatureSpec::prompt_eol(Pooling::Last);
    let tok = FeatureTokenizer::new(&engine, &spec, fctx.max_tokens()).unwrap();
    let seqs: Vec<Vec<i32>> = TEXTS.iter().map(|t| tok.tokens(&engine, t).0).collect();

    // The final normed output through the tap (graph stopped before the output projection)
    // is what the embeddings context returns after the whole graph.
    let full = fctx.hidden_states_full_graph(&seqs).unwrap();
    let tapped = fctx.hidden_states(&seqs, &[], |_| {}).unwrap();
    let tapped_final = fctx.hidden_states(&seqs, &[n_layer], |_| {}).unwrap();
    for i in 0..seqs.len() {
        assert_eq!(tapped[i].last.len(), n_embd);
        close(
            &full[i],
            &tapped[i],
            1e-4,
            &format!("text {i}, final vs full graph"),
        );
        assert_eq!(
            tapped[i], tapped_final[i],
            "text {i}: [] and [n_layer] differ"
        );
    }

    // Deterministic, and the same whether the graph stops at layer 3 or goes on to 17.
    let all: Vec<u32> = (0..=n_layer).collect();
    let every = fctx.hidden_states(&seqs, &all, |_| {}).unwrap();
    let again = fctx.hidden_states(&seqs, &all, |_| {}).unwrap();
    assert_eq!(every, again, "two identical calls differ");
    let early = fctx.hidden_states(&seqs, &[3], |_| {}).unwrap();
    let late = fctx.hidden_states(&seqs, &[17, 3], |_| {}).unwrap();
    for i in 0..seqs.len() {
        assert_eq!(every[i].last.len(), (n_layer as usize + 1) * n_embd);
        assert!(every[i]
            .last
            .iter()
            .chain(&every[i].mean)
            .all(|v| v.is_finite()));
        let from_every = every[i].select(&all, &[3]).unwrap();
        close(
            &early[i],
            &from_every,
            1e-5,
            &format!("text {i}, layer 3 alone vs all"),
        );
        close(
            &early[i],
            &late[i].select(&[17, 3], &[3]).unwrap(),
            1e-5,
            "layer 3 vs 17,3",
        );
        let last_final = every[i].select(&all, &[n_layer]).unwrap();
        close(
            &last_final,
            &tapped[i],
            1e-5,
            &format!("text {i}, final among all"),
        );
    }
    // Layers differ from each other (the tap did not copy one tensor twice).
    let l3 = every[0].select(&all, &[3]).unwrap();
    let l9 = every[0].select(&all, &[9]).unwrap();
    assert!(max_rel_diff(&l3.last, &l9.last) > 0.05);

    // A layer the model does not have is an error, not an abort.
    assert!(fctx.hidden_states(&seqs, &[n_layer + 1], |_| {}).is_err());

    // Cost: printed for docs/benchmarks.md, never asserted (the machine is shared).
    let reps = 3;
    let mut line = Vec::new();
    for (what, layers) in [
        ("full graph (embeddings)", None),
        ("tap: final norm", Some(vec![])),
        ("tap: layer 17", Some(vec![17])),
        ("tap: layer 8", Some(vec![8])),
        ("tap: layer 4", Some(vec![4])),
        ("tap: layers 0..=18", Some(all.clone())),
    ] {
        let t0 = Instant::now();
        for _ in 0..reps {
            match &layers {
                None => drop(fctx.hidden_states_full_graph(&seqs).unwrap()),
                Some(l) => drop(fctx.hidden_states(&seqs, l, |_| {}).unwrap()),
            }
        }
        let rate = (reps * seqs.len()) as f64 / t0.elapsed().as_secs_f64();
        line.push(format!("{what}: {rate:.1} texts/s"));
    }
    println!(
        "feature cost (2 threads, 8 texts x {reps}): {}",
        line.join("; ")
    );
}

/// A head file for `task` on the final output with fixed pseudo-random weights: the cost of
/// a head does not depend on what it learned.
fn head_task(
    engine: &edgeact::model::Engine,
    name: &str,
    layers: Vec<u32>,
    dir: &std::path::Path,
) -> edgeact::spec::Task {
    use edgeact::classify::head::{HeadFile, LinearHead, Standardizer, TrainParams};
    let mut task = testkit::task(name);
    let feature = FeatureSpec {
        layers,
        ..FeatureSpec::prompt_eol(Pooling::Last)
    };
    let d = feature.width(engine.n_embd());
    let labels: Vec<String> = task.labels.iter().map(|l| l.name.clone()).collect();
    let mut s = 7u64;
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    };
    let head = LinearHead {
        standardizer: Standardizer {
            mean: vec![0.0; d],
            scale: vec![1.0; d],
        },
        weights: labels
            .iter()
            .map(|_| (0..d).map(|_| rnd() * 0.01).collect())
            .collect(),
        bias: vec![0.0; labels.len()],
        temperature: 1.0,
    };
    let file = HeadFile {
        version: 1,
        labels,
        feature,
        model_sha256: engine.info.sha256.clone(),
        n_embd: engine.n_embd(),
        train: TrainParams::default(),
        measured: Default::default(),
        head,
    };
    let path = dir.join(format!("{name}.head.json"));
    file.save(&path).unwrap();
    task.head = Some(edgeact::spec::HeadRef {
        file: path,
        method: edgeact::spec::Method::Head,
    });
    task
}

#[test]
fn a_head_on_77_labels_costs_about_what_one_on_2_does() {
    use edgeact::classify::runner::TaskRunner;
    use edgeact::classify::{Request, ScorePath};
    let mut engine = testkit::engine(1);
    let dir = tempfile::tempdir().unwrap();
    let reqs: Vec<Request> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| Request::text(i.to_string(), *t))
        .collect();
    let reps = 3;
    let mut per_req_ms = Vec::new();
    for (name, layers) in [
        ("banking77", vec![]),
        ("sentiment", vec![]),
        ("banking77", vec![9]),
        ("sentiment", vec![9]),
    ] {
        let task = head_task(&engine, name, layers.clone(), dir.path());
        let n_labels = task.labels.len();
        let mut runner = TaskRunner::new(
            &mut engine,
            task,
            0,
            None,
            None,
            None,
            FeatureParams::default(),
        )
        .unwrap();
        // Warm: the first call builds the graph.
        runner.classify_many(&mut engine, &reqs, ScorePath::Fast);
        let t0 = Instant::now();
        for _ in 0..reps {
            for r in runner.classify_many(&mut engine, &reqs, ScorePath::Fast) {
                let r = r.unwrap();
                assert_eq!(r.provenance.method, edgeact::spec::Method::Head);
                assert_eq!(r.scores.len(), n_labels);
            }
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / (reps * reqs.len()) as f64;
        per_req_ms.push(ms);
        println!(
            "head cost: {name} ({n_labels} labels, {}): {ms:.1} ms per request (batches of {})",
            edgeact::classify::features::layers_name(&layers),
            reqs.len()
        );
    }
    println!(
        "head cost ratio 77 labels / 2 labels: {:.2} (final output), {:.2} (layer 9)",
        per_req_ms[0] / per_req_ms[1],
        per_req_ms[2] / per_req_ms[3]
    );
}
