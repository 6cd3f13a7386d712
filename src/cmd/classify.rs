//! `edgeact classify`: texts, a JSON-lines file or JSON lines on stdin through one task;
//! one JSON result (or error record) per input.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use serde_json::json;

use super::{write_json, AppError};
use crate::classify::input::{self, InputError};
use crate::classify::runner::{self, ModelSource};
use crate::classify::{Request, ScorePath};
use crate::model;
use crate::model::config::EngineConfig;
use crate::model::scoring::AbstainRule;
use crate::spec::Task;
use crate::util::jsonl::JsonLines;

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
    /// Overrides the task file's method (`[head] method`).
    pub method: Option<crate::spec::Method>,
}

/// Loads the model, prepares the task and writes one JSON line per input to `out`.
pub fn run(cfg: ClassifyConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let mut ecfg = crate::spec::config_for_tasks(&cfg.engine, [&cfg.task])?;
    // `--method` may ask for what the task file's method does not read.
    ecfg.load_weights = crate::spec::needs_model(&cfg.task, cfg.method);
    let mut model = runner::load_model(&ecfg, 1)?;
    let engine = &mut *model;
    let mut classifier = runner::TaskRunner::new(
        engine,
        cfg.task,
        0,
        cfg.calibrate,
        cfg.abstain,
        cfg.method,
        model::FeatureParams::for_config(&cfg.engine),
    )?;
    let mut total = 0usize;
    let mut failed = 0usize;
    let mut pending: Vec<(usize, Request)> = Vec::new();
    let batch_size = cfg.batch_size.max(1);

    let mut flush = |pending: &mut Vec<(usize, Request)>,
                     engine: &mut dyn ModelSource,
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
            let (what, reader) = open_lines(&cfg.inputs)?;
            let mut lines = JsonLines::new(reader);
            while let Some((line, bytes)) = lines.next_line().map_err(|source| AppError::Input {
                what: what.clone(),
                source,
            })? {
                total += 1;
                failed += handle_line(bytes, line, &mut pending, out)?;
                if pending.len() >= batch_size {
                    failed += flush(&mut pending, engine, out)?;
                }
            }
        }
    }
    while !pending.is_empty() {
        let rest = pending.split_off(pending.len().min(batch_size));
        failed += flush(&mut pending, engine, out)?;
        pending = rest;
    }
    out.flush().map_err(AppError::Output)?;
    if failed > 0 {
        return Err(AppError::SomeRecordsFailed { failed, total });
    }
    Ok(())
}

/// The JSON-lines reader of a file or of stdin, and its name for errors.
fn open_lines(inputs: &Inputs) -> Result<(String, Box<dyn BufRead>), AppError> {
    match inputs {
        Inputs::File(p) => {
            let file = std::fs::File::open(p).map_err(|source| AppError::Input {
                what: p.display().to_string(),
                source,
            })?;
            Ok((
                p.display().to_string(),
                Box::new(std::io::BufReader::new(file)),
            ))
        }
        _ => Ok(("standard input".into(), Box::new(std::io::stdin().lock()))),
    }
}

fn error_record(e: &InputError) -> serde_json::Value {
    json!({"id": null, "line": e.line(), "error": {"kind": e.kind(), "message": e.to_string()}})
}
