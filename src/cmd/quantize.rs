//! `edgeact quantize`: writes the model with another weight type, then prints what a board
//! config needs to use it (path, size, sha256).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use super::{write_json, AppError};
use crate::model::quantize::{quantize, QuantType};
use crate::model::{file_sha256, gguf, EngineError};

#[derive(Debug)]
pub struct QuantizeConfig {
    pub input: PathBuf,
    pub output: PathBuf,
    pub ty: QuantType,
    pub threads: u32,
}

pub fn run(cfg: QuantizeConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let t0 = Instant::now();
    quantize(&cfg.input, &cfg.output, cfg.ty, cfg.threads)?;
    let seconds = t0.elapsed().as_secs_f64();
    let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let header = gguf::read_header(&cfg.output).map_err(EngineError::from)?;
    let v = json!({
        "input": cfg.input,
        "input_bytes": size(&cfg.input),
        "output": cfg.output,
        "output_bytes": size(&cfg.output),
        "type": cfg.ty.name(),
        "tensor_bytes": header.tensor_bytes(),
        "output_sha256": file_sha256(&cfg.output).map_err(EngineError::from)?,
        "seconds": (seconds * 10.0).round() / 10.0,
        "use_with": format!(
            "--model {} (or model_path and model_sha256 in the board config)",
            cfg.output.display()
        ),
    });
    write_json(out, &v, true)
}
