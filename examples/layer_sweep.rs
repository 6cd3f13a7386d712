//! Which layers make the best head: extracts the feature prompt's pooled states at every
//! layer once (through the layer tap, cached on disk like `tune`'s features), then fits
//! `tune`'s head candidates on each layer choice and prints the dev scores. Dev only: the
//! test split is never read.
//!
//! ```text
//! cargo run --release --example layer_sweep -- TASK.toml DATA.jsonl [K=8] [DEV_LIMIT=100] [THREADS=2]
//! ```
//! K is per label (`all`: the whole train split); the dev split is an evenly spaced sample.

use std::path::PathBuf;
use std::time::Instant;

use edgeact::classify::features::{layers_name, FeatureSpec, FeatureTokenizer, Pooling};
use edgeact::eval::learn::{default_cache_dir, per_class_upto, xy, FeatureStore};
use edgeact::eval::select::{learned_candidates, LearnGrid, Split};
use edgeact::eval::{self};
use edgeact::model::config::{self, BoardFile};
use edgeact::model::{Engine, FeatureParams, PooledStates};
use edgeact::spec::{Method, Task};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err("usage: layer_sweep TASK.toml DATA.jsonl [K] [DEV_LIMIT] [THREADS]".into());
    }
    let task = Task::load(&PathBuf::from(&args[0]))?;
    let data = PathBuf::from(&args[1]);
    let k = match args.get(2).map(String::as_str) {
        Some("all") => usize::MAX,
        Some(s) => s.parse()?,
        None => 8,
    };
    let limit: usize = args.get(3).map_or(Ok(100), |s| s.parse())?;
    let threads: u32 = args.get(4).map_or(Ok(2), |s| s.parse())?;

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cfg = config::load_board(
        "x86-dev",
        &[root.join("board-configs")],
        &BoardFile::default(),
    )?;
    cfg.model_path = root.join(&cfg.model_path);
    cfg.threads = threads;
    cfg.threads_batch = threads;
    let engine = Engine::load(&cfg, 1)?;
    let pool = eval::read_labeled(&data, Some("train"), usize::MAX)?;
    let dev = eval::read_labeled(&data, Some("dev"), limit)?;
    let (train, _) = per_class_upto(&task, &pool, k)?;
    let (tx, ty) = xy(&task, &train);
    let (dx, dy) = xy(&task, &dev);
    let labels: Vec<String> = task.labels.iter().map(|l| l.name.clone()).collect();

    let mut fctx = engine.feature_context(FeatureParams {
        threads,
        ..FeatureParams::default()
    })?;
    let n_layer = fctx.n_layer();
    let all: Vec<u32> = (0..=n_layer).collect();
    let spec = FeatureSpec {
        layers: all.clone(),
        ..FeatureSpec::prompt_eol(Pooling::Last)
    };
    let tok = FeatureTokenizer::new(&engine, &spec, fctx.max_tokens())?;
    let mut store = FeatureStore::open(default_cache_dir().as_deref(), &engine, &spec, &tok);
    let t0 = Instant::now();
    let ts = store.states(&engine, &mut fctx, &spec, &tx, true, "train")?;
    let ds = store.states(&engine, &mut fctx, &spec, &dx, true, "dev")?;
    println!(
        "task {} | {} labels | train {} | dev {} | features of {} layers (+ final) in {:.1} s",
        task.name,
        labels.len(),
        tx.len(),
        dx.len(),
        n_layer,
        t0.elapsed().as_secs_f64()
    );

    // Every layer alone (n_layer: the final normed output), then a few concatenations.
    let mut choices: Vec<Vec<u32>> = (0..=n_layer).map(|l| vec![l]).collect();
    let q = n_layer / 4;
    choices.push(vec![q, 2 * q, 3 * q]);
    choices.push(vec![2 * q, 3 * q]);
    choices.push(vec![2 * q, 3 * q, n_layer]);
    choices.push(vec![q, 2 * q, 3 * q, n_layer]);
    let alphas: Vec<f64> = std::env::var("ALPHAS")
        .unwrap_or_else(|_| "1".into())
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    println!("| layers | best head candidate | dev accuracy | dev macro-F1 |\n|---|---|---|---|");
    for layers in &choices {
        let pick = |s: &[PooledStates]| -> Vec<PooledStates> {
            s.iter()
                .map(|p| p.select(&all, layers).unwrap_or_else(|| p.clone()))
                .collect()
        };
        let (tsl, dsl) = (pick(&ts), pick(&ds));
        let grid = LearnGrid {
            methods: vec![Method::Head],
            feature: FeatureSpec {
                layers: layers.clone(),
                ..FeatureSpec::prompt_eol(Pooling::Last)
            },
            poolings: vec![Pooling::Last, Pooling::Mean],
            layer_choices: Vec::new(),
            final_layer: n_layer,
            alphas: alphas.clone(),
            stack_weights: vec![1.0],
            max_iterations: 150,
        };
        let train = Split {
            texts: &tx,
            states: &tsl,
            y: &ty,
        };
        let devs = Split {
            texts: &dx,
            states: &dsl,
            y: &dy,
        };
        let c = learned_candidates(&labels, train, devs, &grid, |_| {})?;
        let b = c
            .iter()
            .max_by(|a, b| a.dev.macro_f1.total_cmp(&b.dev.macro_f1))
            .ok_or("no candidate")?;
        let name = if layers == &[n_layer] {
            "final".to_string()
        } else {
            layers_name(layers)
        };
        println!(
            "| {name} | {} | {:.3} | {:.3} |",
            b.label, b.dev.accuracy, b.dev.macro_f1
        );
    }
    Ok(())
}
