//! `edgeact rank`: candidate items (JSON lines) ranked for a profile by a task with a
//! `[rank]` section; the ranked items as JSON lines, best first.

use std::io::Write;
use std::path::PathBuf;

use super::AppError;
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::rank::{item_from_line, RankConfig, Ranker};
use crate::spec::Task;
use crate::util::jsonl::JsonLines;

/// Everything `edgeact rank` runs with.
#[derive(Debug, Clone)]
pub struct RankRunConfig {
    pub engine: EngineConfig,
    pub task: Task,
    pub rank: RankConfig,
    pub profile: String,
    pub items: PathBuf,
    pub top_k: Option<usize>,
    pub min_score: Option<f64>,
    pub calibrate: Option<bool>,
    pub batch_size: usize,
}

/// `edgeact rank`: prints the ranked items as JSON lines, best first.
pub fn run(cfg: RankRunConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let input_err = |source| AppError::Input {
        what: cfg.items.display().to_string(),
        source,
    };
    let mut lines = JsonLines::open(&cfg.items).map_err(input_err)?;
    let mut items = Vec::new();
    let mut failed = 0;
    while let Some((n, line)) = lines.next_line().map_err(input_err)? {
        match item_from_line(line, n) {
            Ok(Some(it)) => items.push(it),
            Ok(None) => {}
            Err(msg) => {
                failed += 1;
                tracing::warn!("{}: {msg}", cfg.items.display());
            }
        }
    }
    let mut engine = Engine::load(&cfg.engine, 1)?;
    // A minimum score given here cuts on the model's score, so the model is then asked.
    let mut rank_cfg = cfg.rank.clone();
    if let Some(m) = cfg.min_score {
        rank_cfg.min_score = m;
    }
    let ranker = Ranker::new(
        &mut engine,
        &cfg.task,
        &rank_cfg,
        &cfg.profile,
        0,
        cfg.calibrate,
    )?;
    let mut ok = Vec::new();
    for (item, r) in items
        .iter()
        .zip(ranker.score(&mut engine, &items, cfg.batch_size))
    {
        match r {
            Ok(r) => ok.push(r),
            Err(e) => {
                failed += 1;
                tracing::warn!(id = %item.id, "{e}");
            }
        }
    }
    let total = items.len();
    for r in ranker.rank(ok, &items, cfg.top_k, cfg.min_score) {
        let v = serde_json::to_string(&r).unwrap_or_default();
        writeln!(out, "{v}").map_err(AppError::Output)?;
    }
    out.flush().map_err(AppError::Output)?;
    if failed > 0 {
        return Err(AppError::SomeRecordsFailed {
            failed,
            total: total + failed,
        });
    }
    Ok(())
}
