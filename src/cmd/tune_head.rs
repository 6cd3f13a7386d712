//! `edgeact tune --head`: extracts frozen features of K labeled examples per class (and a
//! dev sample), fits the head for each pooling and L2 strength, keeps the best by dev
//! macro-F1, and writes the head file next to a task file that uses it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::AppError;
use crate::classify::features::{FeatureSpec, FeatureTokenizer, Pooling};
use crate::classify::head::{HeadError, HeadFile, TrainParams};
use crate::classify::SetupError;
use crate::eval::learn::{
    fit_candidates, per_class_name, per_class_upto, xy, FeatureStore, Fitted,
};
use crate::eval::{self, EvalError, Example};
use crate::model::config::EngineConfig;
use crate::model::{Engine, FeatureParams};
use crate::spec::{HeadRef, Method, Task, TrainSource};

/// Settings of `edgeact tune --head`.
#[derive(Debug, Clone)]
pub struct TuneHeadConfig {
    pub engine: EngineConfig,
    /// The task whose labels (and prompt, for `method = "both"`) the head serves.
    pub task: Task,
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    /// Training examples per label.
    pub per_class: usize,
    /// Dev examples at most (evenly spaced sample).
    pub limit: usize,
    pub prompt: String,
    /// Layers of the features (empty: the final output).
    pub layers: Vec<u32>,
    pub poolings: Vec<Pooling>,
    pub alphas: Vec<f64>,
    pub max_text_tokens: usize,
    pub features: FeatureParams,
    pub cache_dir: Option<PathBuf>,
    /// The task file written; the head goes beside it as `<stem>.head.json`.
    pub out: PathBuf,
}

/// Trains every candidate head, prints their dev scores, and writes the best with its task
/// file.
pub fn run(cfg: TuneHeadConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let started = Instant::now();
    let pool = eval::read_labeled(&cfg.data, Some(&cfg.train_split), usize::MAX)?;
    let dev = eval::read_labeled(&cfg.data, Some(&cfg.dev_split), cfg.limit)?;
    eval::check_labels(&cfg.task, &dev, &cfg.data)?;
    let (train, short) = per_class_upto(&cfg.task, &pool, cfg.per_class)?;
    let per_class = per_class_name(cfg.per_class);
    if !short.is_empty() {
        let list: Vec<String> = short.iter().map(|(l, n)| format!("{l} ({n})")).collect();
        writeln!(
            out,
            "note: {} labels have fewer than {} train examples; using what there is: {}",
            short.len(),
            per_class,
            list.join(", ")
        )
        .map_err(AppError::Output)?;
    }
    let labels: Vec<String> = cfg.task.labels.iter().map(|l| l.name.clone()).collect();
    // The feature context it creates is part of the memory estimate.
    let engine_cfg = EngineConfig {
        feature_batch_tokens: vec![cfg.features.n_batch_tokens],
        ..cfg.engine.clone()
    };
    let engine = Engine::load(&engine_cfg, 1)?;
    let spec = FeatureSpec {
        prompt: cfg.prompt.clone(),
        pooling: Pooling::Last,
        max_text_tokens: cfg.max_text_tokens,
        layers: cfg.layers.clone(),
    };
    let head_err = |e: HeadError| SetupError::Head {
        task: cfg.task.name.clone(),
        source: e,
    };
    let mut fctx = engine
        .feature_context(cfg.features)
        .map_err(|e| head_err(e.into()))?;
    let tok = FeatureTokenizer::new(&engine, &spec, fctx.max_tokens()).map_err(head_err)?;
    let mut store = FeatureStore::open(cfg.cache_dir.as_deref(), &engine, &spec, &tok);
    let (tx, ty) = xy(&cfg.task, &train);
    let (dx, dy) = xy(&cfg.task, &dev);
    writeln!(
        out,
        "task {} | {} labels | train: {} per label = {} examples | dev: {} | features: `{}`, {} cached",
        cfg.task.name,
        labels.len(),
        per_class,
        train.len(),
        dev.len(),
        cfg.prompt,
        store.cached()
    )
    .map_err(AppError::Output)?;
    let t_feat = Instant::now();
    let train_states = store
        .states(&engine, &mut fctx, &spec, &tx, true, "train features")
        .map_err(head_err)?;
    let dev_states = store
        .states(&engine, &mut fctx, &spec, &dx, true, "dev features")
        .map_err(head_err)?;
    let feat_s = t_feat.elapsed().as_secs_f64();
    let (best, all) = fit_candidates(
        &labels,
        (&train_states, &ty),
        (&dev_states, &dy),
        &cfg.poolings,
        &cfg.alphas,
        TrainParams::default().max_iterations,
    )
    .map_err(head_err)?;
    print_candidates(out, &all)?;
    let head_path = write_head_and_task(&cfg, &engine, &spec, (&train, &dev), (&all, best))?;
    let b = &all[best];
    writeln!(
        out,
        "features: {:.1} s for {} texts ({} now cached); total {:.1} s\nbest: {} pooling, alpha {}: dev accuracy {:.3}, macro-F1 {:.3} -> {} (head {})",
        feat_s,
        train.len() + dev.len(),
        store.cached(),
        started.elapsed().as_secs_f64(),
        b.pooling.name(),
        b.alpha,
        b.dev.accuracy,
        b.dev.macro_f1,
        cfg.out.display(),
        head_path.display()
    )
    .map_err(AppError::Output)?;
    Ok(())
}

fn print_candidates(out: &mut dyn Write, all: &[Fitted]) -> Result<(), AppError> {
    writeln!(
        out,
        "| pooling | alpha | dev accuracy | dev macro-F1 | dev ECE | fit ms |\n|---|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    for f in all {
        writeln!(
            out,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            f.pooling.name(),
            f.alpha,
            f.dev.accuracy,
            f.dev.macro_f1,
            f.dev.ece,
            f.fit_ms
        )
        .map_err(AppError::Output)?;
    }
    Ok(())
}

fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Saves the best head (`all[best]`) as `<stem>.head.json` beside `cfg.out` and the task that uses it as
/// `cfg.out`, both with what was measured; returns the head's path.
fn write_head_and_task(
    cfg: &TuneHeadConfig,
    engine: &Engine,
    spec: &FeatureSpec,
    (train, dev): (&[Example], &[Example]),
    (all, best): (&[Fitted], usize),
) -> Result<PathBuf, AppError> {
    let b = &all[best];
    let per_class = per_class_name(cfg.per_class);
    let stem = cfg
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.task.name.clone());
    let head_name = format!("{stem}.head.json");
    let head_path = cfg
        .out
        .parent()
        .map(|d| d.join(&head_name))
        .unwrap_or_else(|| PathBuf::from(&head_name));
    let mut measured = BTreeMap::new();
    measured.insert("by".into(), "edgeact tune --head".into());
    measured.insert("data".into(), cfg.data.display().to_string().into());
    measured.insert("train_split".into(), cfg.train_split.clone().into());
    measured.insert("per_class".into(), per_class.clone().into());
    measured.insert("n_train".into(), train.len().into());
    measured.insert("dev_split".into(), cfg.dev_split.clone().into());
    measured.insert("dev_n".into(), dev.len().into());
    measured.insert("dev_accuracy".into(), r4(b.dev.accuracy).into());
    measured.insert("dev_macro_f1".into(), r4(b.dev.macro_f1).into());
    measured.insert("candidates_tried".into(), all.len().into());
    let file = HeadFile {
        version: 1,
        labels: cfg.task.labels.iter().map(|l| l.name.clone()).collect(),
        feature: FeatureSpec {
            pooling: b.pooling,
            ..spec.clone()
        },
        model_sha256: engine.info.sha256.clone(),
        n_embd: engine.n_embd(),
        train: TrainParams {
            alpha: b.alpha,
            ..TrainParams::default()
        },
        measured,
        head: b.head.clone(),
    };
    file.save(&head_path).map_err(|e| SetupError::Head {
        task: cfg.task.name.clone(),
        source: e,
    })?;
    let mut task = cfg.task.clone();
    task.head = Some(HeadRef {
        file: PathBuf::from(&head_name),
        method: Method::Head,
    });
    let mut m = toml::Table::new();
    m.insert("by".into(), "edgeact tune --head".into());
    m.insert(
        "candidate".into(),
        format!("head, {} pooling, alpha {}", b.pooling.name(), b.alpha).into(),
    );
    m.insert("data".into(), cfg.data.display().to_string().into());
    m.insert("per_class".into(), per_class.clone().into());
    m.insert("dev_split".into(), cfg.dev_split.clone().into());
    m.insert("dev_n".into(), (dev.len() as i64).into());
    m.insert("dev_macro_f1".into(), r4(b.dev.macro_f1).into());
    m.insert("dev_accuracy".into(), r4(b.dev.accuracy).into());
    m.insert("model_sha256".into(), engine.info.sha256.clone().into());
    task.measured = Some(m);
    // Where the rows came from, for `edgeact learn` (the data path absolute: the task file
    // usually goes to another folder).
    task.train = Some(TrainSource::of_run(
        &cfg.data,
        &cfg.train_split,
        &cfg.dev_split,
        cfg.per_class,
        cfg.limit,
    ));
    let text = format!(
        "# Written by `edgeact tune --head` from {} (trained on {}; chosen on `{}`).\n{}",
        cfg.data.display(),
        match cfg.per_class {
            usize::MAX => format!("the whole `{}` split", cfg.train_split),
            k => format!("{k} per label from `{}`", cfg.train_split),
        },
        cfg.dev_split,
        task.to_toml()
    );
    std::fs::write(&cfg.out, text).map_err(|source| EvalError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    Ok(head_path)
}
