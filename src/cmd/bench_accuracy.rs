//! `edgeact bench-accuracy`: the accuracy figures of one data set on its test split, every
//! method side by side: zero-shot label scoring (with and without calibration), the best
//! K-shot template (chosen on dev), the learned head with K examples per label, and the
//! TF-IDF + logistic-regression baseline (K per label and the full train split). Printed as
//! a Markdown table; measured, not asserted.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::classify::features::{FeatureSpec, FeatureTokenizer, Pooling};
use crate::classify::head::{HeadError, LinearHead, TrainParams};
use crate::eval::baseline::{BaselineParams, TfIdfLr};
use crate::eval::learn::{self, FeatureStore};
use crate::eval::{self, Example};
use crate::model::config::EngineConfig;
use crate::model::{Engine, FeatureParams};
use crate::spec::Task;

use super::AppError;

/// Which rows to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    ZeroShot,
    Tuned,
    Head,
    TfIdf,
}

impl Row {
    pub fn parse(s: &str) -> Option<Row> {
        match s {
            "zero-shot" | "zero" => Some(Row::ZeroShot),
            "tuned" => Some(Row::Tuned),
            "head" => Some(Row::Head),
            "tfidf" => Some(Row::TfIdf),
            _ => None,
        }
    }
}

/// Settings of `edgeact bench-accuracy`.
#[derive(Debug, Clone)]
pub struct FiguresConfig {
    pub engine: EngineConfig,
    /// The task (template and labels) for the prompt rows; its own examples are not used.
    pub task: Task,
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    pub test_split: String,
    /// Test examples at most (evenly spaced sample).
    pub limit: usize,
    /// Dev examples at most, for choosing the tuned template's calibration.
    pub dev_limit: usize,
    /// K of the tuned template and of the K-shot baseline.
    pub shots: usize,
    /// K per label of the head rows.
    pub head_k: Vec<usize>,
    pub feature: FeatureSpec,
    pub alpha: f64,
    pub features: FeatureParams,
    pub cache_dir: Option<PathBuf>,
    pub batch_size: usize,
    pub rows: Vec<Row>,
}

struct Line {
    method: String,
    train: String,
    n: usize,
    accuracy: Option<f64>,
    macro_f1: Option<f64>,
    secs: f64,
    note: String,
}

fn print(out: &mut dyn Write, l: &Line) -> Result<(), AppError> {
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    writeln!(
        out,
        "| {} | {} | {} | {} | {} | {:.0} | {} |",
        l.method,
        l.train,
        l.n,
        f(l.accuracy),
        f(l.macro_f1),
        l.secs,
        l.note
    )
    .map_err(AppError::Output)?;
    out.flush().map_err(AppError::Output)
}

/// Every row asked for, in order, each printed as soon as it is measured.
pub fn run(cfg: FiguresConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let test = eval::read_labeled(&cfg.data, Some(&cfg.test_split), cfg.limit)?;
    let pool = eval::read_labeled(&cfg.data, Some(&cfg.train_split), usize::MAX)?;
    eval::check_labels(&cfg.task, &test, &cfg.data)?;
    let needs_model = cfg.rows.iter().any(|r| *r != Row::TfIdf);
    let mut engine = if needs_model {
        Some(Engine::load(&cfg.engine, 1)?)
    } else {
        None
    };
    writeln!(
        out,
        "data {} | task {} ({} labels) | test split `{}`: {} examples{} | train split `{}`: {}",
        cfg.data.display(),
        cfg.task.name,
        cfg.task.labels.len(),
        cfg.test_split,
        test.len(),
        if cfg.limit < usize::MAX {
            format!(" (--limit {}, evenly spaced)", cfg.limit)
        } else {
            String::new()
        },
        cfg.train_split,
        pool.len()
    )
    .map_err(AppError::Output)?;
    writeln!(
        out,
        "| method | trained on | n test | accuracy | macro-F1 | time s | note |\n|---|---|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    if let (true, Some(engine)) = (cfg.rows.contains(&Row::ZeroShot), engine.as_mut()) {
        zero_shot_rows(&cfg, engine, &test, out)?;
    }
    if let (true, Some(engine)) = (cfg.rows.contains(&Row::Tuned), engine.as_mut()) {
        let line = tuned_row(&cfg, engine, &pool, &test)?;
        print(out, &line)?;
    }
    if let (true, Some(engine)) = (cfg.rows.contains(&Row::Head), engine.as_ref()) {
        head_rows(&cfg, engine, &pool, &test, out)?;
    }
    if cfg.rows.contains(&Row::TfIdf) {
        tfidf_rows(&cfg, &pool, &test, out)?;
    }
    Ok(())
}

fn labels(task: &Task) -> Vec<String> {
    task.labels.iter().map(|l| l.name.clone()).collect()
}

/// Zero-shot label scoring, without and with calibration.
fn zero_shot_rows(
    cfg: &FiguresConfig,
    engine: &mut Engine,
    test: &[Example],
    out: &mut dyn Write,
) -> Result<(), AppError> {
    let mut zero = cfg.task.clone();
    zero.examples.clear();
    zero.name = format!("{}-0shot", cfg.task.name);
    for cal in [false, true] {
        let t0 = Instant::now();
        let (run, _) = eval::run(
            engine,
            zero.clone(),
            0,
            Some(cal),
            test,
            cfg.batch_size,
            true,
        )?;
        print(
            out,
            &Line {
                method: if cal {
                    "zero-shot + calibration".into()
                } else {
                    "zero-shot".into()
                },
                train: "-".into(),
                n: run.metrics.n,
                accuracy: Some(run.metrics.accuracy),
                macro_f1: Some(run.metrics.macro_f1),
                secs: t0.elapsed().as_secs_f64(),
                note: format!("{:.1} classif/s", run.classifications_per_s),
            },
        )?;
    }
    Ok(())
}

/// The K-shot template, calibration on or off as it scores better on dev.
fn tuned_row(
    cfg: &FiguresConfig,
    engine: &mut Engine,
    pool: &[Example],
    test: &[Example],
) -> Result<Line, AppError> {
    let t0 = Instant::now();
    let method = format!("template, {}-shot (calibration chosen on dev)", cfg.shots);
    let train = format!("{} per label", cfg.shots);
    let not_run = |note: String, secs: f64| Line {
        method: method.clone(),
        train: train.clone(),
        n: 0,
        accuracy: None,
        macro_f1: None,
        secs,
        note: format!("not run: {note}"),
    };
    let shot = match eval::with_shots(&cfg.task, pool, cfg.shots) {
        Err(e) => return Ok(not_run(e.to_string(), 0.0)),
        Ok(shot) => shot,
    };
    let dev = eval::read_labeled(&cfg.data, Some(&cfg.dev_split), cfg.dev_limit)?;
    let mut best: Option<(bool, f64)> = None;
    let mut failed = None;
    for cal in [false, true] {
        match eval::run(
            engine,
            shot.clone(),
            0,
            Some(cal),
            &dev,
            cfg.batch_size,
            true,
        ) {
            Ok((r, _)) => {
                if best.is_none_or(|(_, b)| r.metrics.macro_f1 > b) {
                    best = Some((cal, r.metrics.macro_f1));
                }
            }
            Err(e) => failed = Some(e.to_string()),
        }
    }
    let Some((cal, dev_f1)) = best else {
        return Ok(not_run(
            failed.unwrap_or_default(),
            t0.elapsed().as_secs_f64(),
        ));
    };
    let (run, _) = eval::run(engine, shot, 0, Some(cal), test, cfg.batch_size, true)?;
    Ok(Line {
        method,
        train,
        n: run.metrics.n,
        accuracy: Some(run.metrics.accuracy),
        macro_f1: Some(run.metrics.macro_f1),
        secs: t0.elapsed().as_secs_f64(),
        note: format!(
            "calibration {} (dev macro-F1 {dev_f1:.3} on {}); {:.1} classif/s",
            if cal { "on" } else { "off" },
            dev.len(),
            run.classifications_per_s
        ),
    })
}

/// The learned head with K per label, for each K, on features extracted once for the test
/// split (and cached).
fn head_rows(
    cfg: &FiguresConfig,
    engine: &Engine,
    pool: &[Example],
    test: &[Example],
    out: &mut dyn Write,
) -> Result<(), AppError> {
    let labels = labels(&cfg.task);
    let head_err = |e: HeadError| {
        AppError::Setup(crate::classify::SetupError::Head {
            task: cfg.task.name.clone(),
            source: e,
        })
    };
    let (ty_texts, ty) = learn::xy(&cfg.task, test);
    let mut fctx = engine
        .feature_context(cfg.features)
        .map_err(|e| head_err(e.into()))?;
    let tok = FeatureTokenizer::new(engine, &cfg.feature, fctx.max_tokens()).map_err(head_err)?;
    let mut store = FeatureStore::open(cfg.cache_dir.as_deref(), engine, &cfg.feature, &tok);
    let t0 = Instant::now();
    let test_states = store
        .states(
            engine,
            &mut fctx,
            &cfg.feature,
            &ty_texts,
            true,
            "test features",
        )
        .map_err(head_err)?;
    let test_feat_s = t0.elapsed().as_secs_f64();
    let test_x: Vec<Vec<f32>> = test_states
        .iter()
        .map(|s| cfg.feature.pooling.apply(s))
        .collect();
    for &k in &cfg.head_k {
        let t1 = Instant::now();
        let method = format!(
            "head on features ({} pooling, alpha {})",
            cfg.feature.pooling.name(),
            cfg.alpha
        );
        let train = match learn::per_class(&cfg.task, pool, k) {
            Ok(t) => t,
            Err(e) => {
                print(
                    out,
                    &Line {
                        method,
                        train: format!("{k} per label"),
                        n: 0,
                        accuracy: None,
                        macro_f1: None,
                        secs: 0.0,
                        note: format!("not run: {e}"),
                    },
                )?;
                continue;
            }
        };
        let (tx, y) = learn::xy(&cfg.task, &train);
        let states = store
            .states(
                engine,
                &mut fctx,
                &cfg.feature,
                &tx,
                true,
                &format!("train features, {k} per label"),
            )
            .map_err(head_err)?;
        let x: Vec<Vec<f32>> = states
            .iter()
            .map(|s| cfg.feature.pooling.apply(s))
            .collect();
        let head = LinearHead::train(
            &x,
            &y,
            labels.len(),
            TrainParams {
                alpha: cfg.alpha,
                ..TrainParams::default()
            },
        )
        .map_err(head_err)?;
        let probs: Vec<Vec<f64>> = test_x.iter().map(|r| head.predict(r)).collect();
        let m = learn::score_probs(&labels, &ty, &probs);
        print(
            out,
            &Line {
                method,
                train: format!("{k} per label ({})", train.len()),
                n: m.n,
                accuracy: Some(m.accuracy),
                macro_f1: Some(m.macro_f1),
                secs: t1.elapsed().as_secs_f64(),
                note: format!(
                    "test features {test_feat_s:.0} s (cached ones free); {} features cached",
                    store.cached()
                ),
            },
        )?;
    }
    Ok(())
}

/// TF-IDF + logistic regression on K per label and on the full train split.
fn tfidf_rows(
    cfg: &FiguresConfig,
    pool: &[Example],
    test: &[Example],
    out: &mut dyn Write,
) -> Result<(), AppError> {
    let labels = labels(&cfg.task);
    let (ty_texts, ty) = learn::xy(&cfg.task, test);
    let sets: Vec<(String, Vec<Example>)> = vec![
        (
            format!("{} per label", cfg.shots),
            learn::per_class(&cfg.task, pool, cfg.shots)?,
        ),
        ("full train split".into(), pool.to_vec()),
    ];
    for (name, train) in sets {
        let t0 = Instant::now();
        let (tx, y) = learn::xy(&cfg.task, &train);
        let line = match TfIdfLr::fit(&tx, &y, labels.len(), BaselineParams::default())
            .and_then(|m| Ok((m.n_features(), m.predict(&ty_texts)?)))
        {
            Ok((nf, probs)) => {
                let m = learn::score_probs(&labels, &ty, &probs);
                Line {
                    method: "TF-IDF 1-2 grams + logistic regression".into(),
                    train: format!("{name} ({})", train.len()),
                    n: m.n,
                    accuracy: Some(m.accuracy),
                    macro_f1: Some(m.macro_f1),
                    secs: t0.elapsed().as_secs_f64(),
                    note: format!("{nf} n-grams"),
                }
            }
            Err(e) => Line {
                method: "TF-IDF 1-2 grams + logistic regression".into(),
                train: name,
                n: 0,
                accuracy: None,
                macro_f1: None,
                secs: t0.elapsed().as_secs_f64(),
                note: format!("failed: {e}"),
            },
        };
        print(out, &line)?;
    }
    Ok(())
}

/// The default feature spec of the head rows: PromptEOL, last-token pooling.
pub fn default_feature(pooling: Pooling, max_text_tokens: usize) -> FeatureSpec {
    FeatureSpec {
        max_text_tokens,
        ..FeatureSpec::prompt_eol(pooling)
    }
}
