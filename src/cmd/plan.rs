//! `edgeact plan`: the model file checked and the memory estimate for a board, as JSON.

use std::io::Write;

use serde_json::json;

use super::{write_json, AppError};
use crate::model::{self, config::EngineConfig};

/// `edgeact plan`: checks the model file and prints the memory estimate for `n_tasks`
/// tasks (a prefix slot each; their adapter and feature contexts are in `cfg`), loading
/// nothing.
pub fn run(cfg: &EngineConfig, n_tasks: usize, out: &mut dyn Write) -> Result<(), AppError> {
    let (sha, shape, fitted) = model::preflight(cfg, n_tasks.max(1))?;
    let v = json!({
        "board": cfg.board,
        "model": cfg.model_path,
        "model_sha256": sha,
        "architecture": shape.architecture,
        "n_layer": shape.n_layer,
        "n_vocab": shape.n_vocab,
        "n_ctx": fitted.plan.n_ctx,
        "shrunk_from_ctx": fitted.shrunk_from_ctx,
        "memory_budget_mib": cfg.memory_budget_mib,
        "estimate_mib": fitted.estimate.total_mib(),
        "estimate": fitted.estimate.detail(),
        "tasks": n_tasks,
    });
    write_json(out, &v, true)
}
