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
    // What serve's micro-batch grows to with a deep queue (the board's max_logit_rows and
    // the sequences left after the tasks' prefix slots).
    let work_seqs = (fitted.plan.n_seq_max as usize).saturating_sub(n_tasks.max(1));
    let rows = fitted.plan.max_logit_rows as usize;
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
        // False when no task reads the model (a stack of TF-IDF and encoder blocks): the
        // weights are not loaded and the estimate leaves them out.
        "load_weights": cfg.load_weights,
        "estimate_mib": fitted.estimate.total_mib(),
        "estimate": fitted.estimate.detail(),
        "tasks": n_tasks,
        "requests_per_decode": {
            "one_token_labels": model::requests_per_decode(work_seqs, rows, true),
            "longer_labels": model::requests_per_decode(work_seqs, rows, false),
        },
    });
    write_json(out, &v, true)
}
