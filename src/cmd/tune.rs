//! `edgeact tune`: the evaluate-and-feed-back step. Tries candidate templates, K-shot
//! example sets and calibration on/off on a dev split, and writes the winner (by macro-F1)
//! as a task file with its examples and the measured dev score in it.

use std::io::Write;
use std::path::PathBuf;

use super::AppError;
use crate::eval::tune::{candidates, pick_best};
use crate::eval::{self, EvalError};
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::spec::Task;

/// Settings of `edgeact tune`.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    pub engine: EngineConfig,
    /// Candidate templates; their own examples are one candidate each.
    pub templates: Vec<Task>,
    /// K-shot sets to try besides each file's own examples (0 = zero-shot).
    pub shots: Vec<usize>,
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    /// Dev examples at most (evenly spaced sample).
    pub limit: usize,
    pub out: PathBuf,
    pub batch_size: usize,
}

/// Scores every candidate on the dev split and writes the best as a task file.
pub fn run(cfg: TuneConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let dev = eval::read_labeled(&cfg.data, Some(&cfg.dev_split), cfg.limit)?;
    let needs_pool = cfg.shots.iter().any(|&k| k > 0);
    let pool = if needs_pool {
        eval::read_labeled(&cfg.data, Some(&cfg.train_split), usize::MAX)?
    } else {
        Vec::new()
    };
    for t in &cfg.templates {
        eval::check_labels(t, &dev, &cfg.data)?;
    }
    let cands = candidates(&cfg.templates, &cfg.shots, &pool)?;
    let mut engine = Engine::load(
        &crate::spec::config_for_tasks(&cfg.engine, &cfg.templates)?,
        1,
    )?;
    let mut scores = Vec::with_capacity(cands.len());
    let mut runs = Vec::with_capacity(cands.len());
    writeln!(
        out,
        "| candidate | dev n | accuracy | macro-F1 | ECE |\n|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    for c in &cands {
        match eval::run(
            &mut engine,
            c.task.clone(),
            0,
            Some(c.calibrate),
            &dev,
            cfg.batch_size,
            true,
        ) {
            Ok((run, _)) => {
                writeln!(
                    out,
                    "| {} | {} | {:.3} | {:.3} | {:.3} |",
                    c.label,
                    run.metrics.n,
                    run.metrics.accuracy,
                    run.metrics.macro_f1,
                    run.metrics.ece
                )
                .map_err(AppError::Output)?;
                scores.push(Some(run.metrics.macro_f1));
                runs.push(Some(run));
            }
            Err(e) => {
                // A candidate that cannot run (say, a prefix too long for n_ctx) loses.
                writeln!(out, "| {} | - | - | - | failed: {e} |", c.label)
                    .map_err(AppError::Output)?;
                scores.push(None);
                runs.push(None);
            }
        }
    }
    let Some(b) = pick_best(&scores) else {
        return Err(AppError::Eval(EvalError::Empty {
            path: cfg.data.clone(),
            split: " (every candidate failed)".into(),
        }));
    };
    let (winner, run) = (&cands[b], runs[b].as_ref().map(|r| &r.metrics));
    let mut task = winner.task.clone();
    task.calibration.enabled = winner.calibrate;
    let mut measured = toml::Table::new();
    measured.insert("by".into(), "edgeact tune".into());
    measured.insert("candidate".into(), winner.label.clone().into());
    measured.insert("data".into(), cfg.data.display().to_string().into());
    measured.insert("dev_split".into(), cfg.dev_split.clone().into());
    if let Some(m) = run {
        measured.insert("dev_n".into(), (m.n as i64).into());
        measured.insert(
            "dev_macro_f1".into(),
            ((m.macro_f1 * 1e4).round() / 1e4).into(),
        );
        measured.insert(
            "dev_accuracy".into(),
            ((m.accuracy * 1e4).round() / 1e4).into(),
        );
    }
    measured.insert("model_sha256".into(), engine.info.sha256.clone().into());
    measured.insert("candidates_tried".into(), (cands.len() as i64).into());
    task.measured = Some(measured);
    let text = format!(
        "# Written by `edgeact tune` from {} (dev split `{}`): the best of {} candidates by macro-F1.\n{}",
        cfg.data.display(),
        cfg.dev_split,
        cands.len(),
        task.to_toml()
    );
    if let Some(dir) = cfg.out.parent() {
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Write {
            path: dir.into(),
            source,
        })?;
    }
    std::fs::write(&cfg.out, text).map_err(|source| EvalError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    writeln!(out, "best: {} -> {}", winner.label, cfg.out.display()).map_err(AppError::Output)?;
    Ok(())
}
