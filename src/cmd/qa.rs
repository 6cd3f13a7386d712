//! `edgeact qa`: retrieve from the task's knowledge base, then one grammar-constrained
//! answer citing a retrieved passage; the answer on one line, then the result as JSON.

use std::io::Write;

use super::react::{load_kb, write_json, ReactConfig};
use crate::model::Engine;
use crate::react::generator::EngineGenerator;
use crate::react::qa;
use crate::react::ReactError;

/// Each question through retrieve-then-answer: the answer on one line, then the result.
pub fn run(cfg: ReactConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    let qa_spec = cfg.spec.qa.clone().ok_or_else(|| {
        ReactError::Usage(format!(
            "task {} has no [qa] section",
            cfg.spec.path.display()
        ))
    })?;
    if cfg.questions.is_empty() {
        return Err(ReactError::Usage("give a question".into()));
    }
    let Some(kb) = load_kb(&cfg.spec)? else {
        return Err(ReactError::Usage("qa needs a knowledge base".into()));
    };
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let max_chars = cfg.spec.kb.as_ref().map_or(220, |k| k.max_passage_chars);
    let (mut gen, source) = EngineGenerator::new(&mut engine, cfg.spec.temperature)
        .with_prefix(0, &qa::render_prefix(&qa_spec, &kb, max_chars))?;
    tracing::info!(?source, "qa prefix ready");
    for q in &cfg.questions {
        let r = qa::answer(&cfg.spec, &qa_spec, &kb, q, &mut gen)?;
        match &r.cited {
            Some(id) => writeln!(out, "{} [{id}]", r.answer),
            None => writeln!(out, "{}", r.answer),
        }
        .map_err(ReactError::Output)?;
        write_json(out, &r, cfg.pretty)?;
    }
    Ok(())
}
