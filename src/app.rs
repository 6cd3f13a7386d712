//! The modes edgeact runs in, each from a validated config: `classify` over texts or JSON
//! lines, and `plan` (the memory budget without loading). `main` maps errors to exit codes.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde_json::json;

use crate::classify::{Classifier, Request, ScorePath, SetupError};
use crate::config::{ConfigError, EngineConfig};
use crate::engine::{self, Engine, EngineError};
use crate::input::{self, InputError};
use crate::scoring::AbstainRule;
use crate::task::{Task, TaskError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot read {what}: {source}")]
    Input {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot write results: {0}")]
    Output(std::io::Error),
    #[error("{failed} of {total} inputs were rejected (see their error records)")]
    SomeRecordsFailed { failed: usize, total: usize },
}

/// Where `classify` takes its requests from.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Texts given on the command line.
    Texts(Vec<String>),
    /// JSON lines from a file.
    File(PathBuf),
    /// JSON lines from standard input.
    Stdin,
}

#[derive(Debug, Clone)]
pub struct ClassifyConfig {
    pub engine: EngineConfig,
    pub task: Task,
    pub inputs: Inputs,
    /// Overrides the task's calibration switch.
    pub calibrate: Option<bool>,
    pub abstain: Option<AbstainRule>,
    pub path: ScorePath,
    /// Requests per micro-batch.
    pub batch_size: usize,
    pub pretty: bool,
}

/// Loads the model, prepares the task and writes one JSON line per input to `out`.
pub fn classify(cfg: ClassifyConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let classifier = Classifier::new(&mut engine, cfg.task, 0, cfg.calibrate, cfg.abstain)?;
    let mut total = 0usize;
    let mut failed = 0usize;
    let mut pending: Vec<(usize, Request)> = Vec::new();
    let batch_size = cfg.batch_size.max(1);

    let flush = |pending: &mut Vec<(usize, Request)>,
                 engine: &mut Engine,
                 out: &mut dyn Write|
     -> Result<usize, AppError> {
        let reqs: Vec<Request> = pending.iter().map(|(_, r)| r.clone()).collect();
        let results = classifier.classify_many(engine, &reqs, cfg.path);
        let mut bad = 0;
        for ((line, req), res) in pending.drain(..).zip(results) {
            let value = match res {
                Ok(r) => serde_json::to_value(&r).unwrap_or_else(|e| json!({"id": req.id, "error": {"kind": "internal", "message": e.to_string()}})),
                Err(e) => {
                    bad += 1;
                    tracing::warn!(id = %req.id, line, "{e}");
                    json!({"id": req.id, "line": line, "error": {"kind": e.kind(), "message": e.to_string()}})
                }
            };
            write_json(out, &value, cfg.pretty)?;
        }
        Ok(bad)
    };

    let handle_line = |bytes: &[u8],
                       line: usize,
                       pending: &mut Vec<(usize, Request)>,
                       out: &mut dyn Write|
     -> Result<usize, AppError> {
        match input::parse_line(bytes, line) {
            Ok(Some(req)) => {
                pending.push((line, req));
                Ok(0)
            }
            Ok(None) => Ok(0),
            Err(e) => {
                tracing::warn!("{e}");
                write_json(out, &error_record(&e), cfg.pretty)?;
                Ok(1)
            }
        }
    };

    match &cfg.inputs {
        Inputs::Texts(texts) => {
            for (i, t) in texts.iter().enumerate() {
                pending.push((i + 1, Request::text((i + 1).to_string(), t.clone())));
                total += 1;
            }
        }
        Inputs::File(_) | Inputs::Stdin => {
            let (what, reader): (String, Box<dyn BufRead>) = match &cfg.inputs {
                Inputs::File(p) => (
                    p.display().to_string(),
                    Box::new(std::io::BufReader::new(std::fs::File::open(p).map_err(
                        |source| AppError::Input {
                            what: p.display().to_string(),
                            source,
                        },
                    )?)),
                ),
                _ => ("standard input".into(), Box::new(std::io::stdin().lock())),
            };
            let mut reader = reader;
            let mut buf = Vec::new();
            let mut line = 0;
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|source| AppError::Input {
                        what: what.clone(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                line += 1;
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                total += 1;
                failed += handle_line(&buf, line, &mut pending, out)?;
                if pending.len() >= batch_size {
                    failed += flush(&mut pending, &mut engine, out)?;
                }
            }
        }
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(batch_size));
        failed += flush(&mut pending, &mut engine, out)?;
        pending = rest;
    }
    out.flush().map_err(AppError::Output)?;
    if failed > 0 {
        return Err(AppError::SomeRecordsFailed { failed, total });
    }
    Ok(())
}

fn error_record(e: &InputError) -> serde_json::Value {
    json!({"id": null, "line": e.line(), "error": {"kind": e.kind(), "message": e.to_string()}})
}

fn write_json(out: &mut dyn Write, v: &serde_json::Value, pretty: bool) -> Result<(), AppError> {
    let s = if pretty {
        serde_json::to_string_pretty(v)
    } else {
        serde_json::to_string(v)
    }
    .map_err(|e| AppError::Output(std::io::Error::other(e)))?;
    writeln!(out, "{s}").map_err(AppError::Output)
}

/// `edgeact plan`: checks the model file and prints the memory estimate, loading nothing.
pub fn plan(cfg: &EngineConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let (sha, shape, fitted) = engine::preflight(cfg, 1)?;
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
    });
    write_json(out, &v, true)
}
