//! `edgeact eval`: a task (or several candidate templates) over labeled JSON lines; writes
//! `metrics.json`, `predictions.jsonl`, `report.md` and two SVG plots of the best candidate
//! (by macro-F1) and prints a summary table.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::AppError;
use crate::classify::runner::load_model;
use crate::eval::{self, plots, EvalError, EvalRun};
use crate::model::config::EngineConfig;
use crate::model::ModelInfo;
use crate::spec::Task;

/// Settings of `edgeact eval`.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub engine: EngineConfig,
    /// Candidate tasks (templates) to compare; the first is the task under evaluation.
    pub tasks: Vec<Task>,
    pub data: PathBuf,
    pub split: Option<String>,
    pub limit: usize,
    pub shots: Option<usize>,
    /// Split the few-shot examples come from.
    pub shots_split: String,
    pub calibrate: Option<bool>,
    pub out: PathBuf,
    pub batch_size: usize,
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    std::fs::write(path, bytes).map_err(|source| EvalError::Write {
        path: path.into(),
        source,
    })
}

/// Runs every candidate, writes the report of the best into `cfg.out`, and prints a
/// summary table.
pub fn run(cfg: EvalConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let data = eval::read_labeled(&cfg.data, cfg.split.as_deref(), cfg.limit)?;
    let pool = match cfg.shots {
        Some(_) => eval::read_labeled(&cfg.data, Some(&cfg.shots_split), usize::MAX)?,
        None => Vec::new(),
    };
    let mut tasks = Vec::new();
    for t in &cfg.tasks {
        eval::check_labels(t, &data, &cfg.data)?;
        tasks.push(match cfg.shots {
            Some(k) => eval::with_shots(t, &pool, k)?,
            None => t.clone(),
        });
    }
    std::fs::create_dir_all(&cfg.out).map_err(|source| EvalError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    let mut model = load_model(
        &crate::spec::config_for_tasks(&cfg.engine, &tasks)?,
        tasks.len(),
    )?;
    let engine = &mut *model;
    let mut runs = Vec::new();
    let mut best: Option<(usize, Vec<serde_json::Value>)> = None;
    for (slot, t) in tasks.into_iter().enumerate() {
        let (run, preds) = eval::run(engine, t, slot, cfg.calibrate, &data, cfg.batch_size, true)?;
        let better = best.as_ref().is_none_or(|(b, _)| {
            run.metrics.macro_f1 > runs.get(*b).map_or(-1.0, |r: &EvalRun| r.metrics.macro_f1)
        });
        runs.push(run);
        if better {
            best = Some((runs.len() - 1, preds));
        }
    }
    let Some((b, preds)) = best else {
        return Ok(());
    };
    write_report(&cfg, engine.info(), &runs, b, &preds)?;

    writeln!(out, "| candidate | calibrated | n | accuracy | macro-F1 | ECE | classif/s |\n|---|---|---|---|---|---|---|")
        .map_err(AppError::Output)?;
    for c in &runs {
        writeln!(
            out,
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.1} |",
            c.task,
            c.calibrated,
            c.metrics.n,
            c.metrics.accuracy,
            c.metrics.macro_f1,
            c.metrics.ece,
            c.classifications_per_s
        )
        .map_err(AppError::Output)?;
    }
    writeln!(out, "report: {}", cfg.out.join("report.md").display()).map_err(AppError::Output)?;
    Ok(())
}

/// `metrics.json`, `predictions.jsonl`, the two plots and `report.md` of the best run
/// (`runs[b]`, whose predictions are `preds`).
fn write_report(
    cfg: &EvalConfig,
    model: &ModelInfo,
    runs: &[EvalRun],
    b: usize,
    preds: &[serde_json::Value],
) -> Result<(), EvalError> {
    let r = &runs[b];
    let labels: Vec<String> = r
        .metrics
        .per_class
        .iter()
        .map(|c| c.label.clone())
        .collect();
    let metrics_json = json!({
        "data": cfg.data, "split": cfg.split, "n": r.metrics.n,
        "task": r.task, "template_sha256": r.template_sha256, "calibrated": r.calibrated,
        "model_sha256": model.sha256, "board": model.board,
        "accuracy": r.metrics.accuracy, "macro_f1": r.metrics.macro_f1, "ece": r.metrics.ece,
        "per_class": r.metrics.per_class, "confusion": r.metrics.confusion,
        "coverage": r.metrics.coverage, "reliability": r.metrics.reliability,
        "latency_ms": r.latency_ms, "decoded_tokens_per_s": r.decoded_tokens_per_s,
        "classifications_per_s": r.classifications_per_s,
        "candidates": runs.iter().map(|c| json!({
            "task": c.task, "template_sha256": c.template_sha256, "calibrated": c.calibrated,
            "accuracy": c.metrics.accuracy, "macro_f1": c.metrics.macro_f1, "ece": c.metrics.ece,
        })).collect::<Vec<_>>(),
    });
    let dir = &cfg.out;
    write(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(&metrics_json)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let mut p = String::new();
    for v in preds {
        p.push_str(&v.to_string());
        p.push('\n');
    }
    write(&dir.join("predictions.jsonl"), p.as_bytes())?;
    write(
        &dir.join("confusion.svg"),
        plots::confusion_svg(&labels, &r.metrics.confusion)?.as_bytes(),
    )?;
    write(
        &dir.join("reliability.svg"),
        plots::reliability_svg(&r.metrics.reliability)?.as_bytes(),
    )?;
    let md = report_md(cfg, model, runs, r);
    write(&dir.join("report.md"), md.as_bytes())
}

fn report_md(cfg: &EvalConfig, model: &ModelInfo, runs: &[EvalRun], r: &EvalRun) -> String {
    let mut md = format!(
        "# edgeact eval: {}\n\nData `{}`{}, {} examples; model sha256 `{}`; board `{}`.\n\n\
         | candidate | calibrated | accuracy | macro-F1 | ECE |\n|---|---|---|---|---|\n",
        r.task,
        cfg.data.display(),
        cfg.split
            .as_deref()
            .map(|s| format!(" (split `{s}`)"))
            .unwrap_or_default(),
        r.metrics.n,
        model.sha256,
        model.board
    );
    for c in runs {
        md.push_str(&format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} |\n",
            c.task, c.calibrated, c.metrics.accuracy, c.metrics.macro_f1, c.metrics.ece
        ));
    }
    md.push_str(&format!(
        "\nBest: `{}`. Latency p50 {:.1} ms, p95 {:.1} ms per classification (micro-batches of {}); {:.1} decoded tokens/s.\n\n\
         | label | precision | recall | F1 | support |\n|---|---|---|---|---|\n",
        r.task, r.latency_ms.p50, r.latency_ms.p95, cfg.batch_size, r.decoded_tokens_per_s
    ));
    for c in &r.metrics.per_class {
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {:.3} | {} |\n",
            c.label, c.precision, c.recall, c.f1, c.support
        ));
    }
    md.push_str("\n| abstain below confidence | coverage | accuracy |\n|---|---|---|\n");
    for c in r.metrics.coverage.iter().step_by(2) {
        md.push_str(&format!(
            "| {:.2} | {:.3} | {:.3} |\n",
            c.threshold, c.coverage, c.accuracy
        ));
    }
    md.push_str(
        "\n![confusion matrix](confusion.svg)\n\n![reliability diagram](reliability.svg)\n",
    );
    md
}
