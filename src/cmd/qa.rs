//! `edgeact qa`: retrieve from the task's knowledge base, then the answer selected from a
//! retrieved passage with its id (or "not found" and an offer of staff); the answer on one
//! line, then the result as JSON. With a session, a follow-up ("and on Saturday?")
//! continues the session's last question and passage, and the turn is recorded.

use std::io::Write;

use super::react::{load_kb, write_json, ReactConfig};
use crate::react::generator::LazyGenerator;
use crate::react::policy::follow_up_context;
use crate::react::qa;
use crate::react::trace::Turn;
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
    let Some(kb) = load_kb(&cfg.spec, &cfg.engine.model_path)? else {
        return Err(ReactError::Usage("qa needs a knowledge base".into()));
    };
    let max_chars = cfg.spec.kb.as_ref().map_or(220, |k| k.max_passage_chars);
    // Loaded when a question first needs it: the selected answer (the default) does not.
    let mut gen = LazyGenerator::new(
        cfg.engine.clone(),
        cfg.spec.temperature,
        qa::render_prefix(&qa_spec, &kb, max_chars),
    );
    for q in &cfg.questions {
        let history = match &cfg.session {
            Some(id) => cfg.sessions.load(id)?,
            None => Vec::new(),
        };
        let context = follow_up_context(Some(&kb), &history, q);
        let r = if cfg.generate {
            qa::answer_generated(&cfg.spec, &qa_spec, &kb, q, &mut gen)?
        } else {
            let ground = cfg.spec.policy.ground;
            qa::answer(
                &cfg.spec,
                &qa_spec,
                &kb,
                q,
                context.as_deref(),
                &mut gen,
                &ground,
            )?
        };
        let line = match &r.cited {
            Some(id) => format!("{} [{id}]", r.answer),
            None => r.answer.clone(),
        };
        writeln!(out, "{line}").map_err(ReactError::Output)?;
        write_json(out, &r, cfg.pretty)?;
        if let Some(id) = &cfg.session {
            let turn = Turn {
                question: q.clone(),
                answer: line,
            };
            cfg.sessions.append(id, turn)?;
        }
    }
    Ok(())
}
