//! `edgeact react`: each question through the scored policy (the action chosen by
//! scoring, the answer selected from what the tool returned; `--generate`: the
//! grammar-guarded loop), with the task's tools and, with a session id, its earlier turns;
//! the answer on one line, then the trace as JSON.

use std::io::Write;
use std::sync::Arc;

use crate::model::config::EngineConfig;
use crate::react::agent::{self, RunOptions};
use crate::react::generator::LazyGenerator;
use crate::react::kb::Kb;
use crate::react::policy;
use crate::react::session::Sessions;
use crate::react::tools::Toolbox;
use crate::react::trace::Turn;
use crate::react::ReactError;
use crate::spec::react::ReactSpec;

/// Settings of `edgeact react` and `edgeact qa`.
#[derive(Debug, Clone)]
pub struct ReactConfig {
    pub engine: EngineConfig,
    pub spec: ReactSpec,
    pub questions: Vec<String>,
    /// Carry earlier turns of this session (and record this one).
    pub session: Option<String>,
    pub sessions: Sessions,
    pub grammar: bool,
    /// Generate every step (the loop for larger models) instead of the scored policy.
    pub generate: bool,
    pub pretty: bool,
}

/// The task's knowledge base, when it has one (with the sentence encoder fetched beside
/// the model at `model_path`, if it is).
pub(super) fn load_kb(
    spec: &ReactSpec,
    model_path: &std::path::Path,
) -> Result<Option<Arc<Kb>>, ReactError> {
    Ok(match &spec.kb {
        Some(k) => Some(Arc::new(Kb::load_beside(&k.dir, model_path)?)),
        None => None,
    })
}

pub(super) fn write_json(
    out: &mut dyn Write,
    v: &impl serde::Serialize,
    pretty: bool,
) -> Result<(), ReactError> {
    // Plain data structures: serializing cannot fail.
    let s = if pretty {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        serde_json::to_string(v).unwrap_or_default()
    };
    writeln!(out, "{s}").map_err(ReactError::Output)
}

/// Each question through the loop: the answer on one line, then the trace as JSON.
pub fn run(cfg: ReactConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    if cfg.questions.is_empty() {
        return Err(ReactError::Usage("give a question".into()));
    }
    let kb = load_kb(&cfg.spec, &cfg.engine.model_path)?;
    let mut tools = Toolbox::new(&cfg.spec, kb.clone());
    // Loaded when a question first needs it: a knowledge-base answer does not.
    let mut gen = LazyGenerator::new(
        cfg.engine.clone(),
        cfg.spec.temperature,
        agent::render_prefix(&cfg.spec),
    );
    for q in &cfg.questions {
        let history = match &cfg.session {
            Some(id) => cfg.sessions.load(id)?,
            None => Vec::new(),
        };
        let trace = if cfg.generate || !cfg.grammar {
            agent::run(
                &cfg.spec,
                q,
                &history,
                &mut gen,
                &mut tools,
                RunOptions {
                    grammar: cfg.grammar,
                },
            )?
        } else {
            let pc = cfg.spec.policy.clone();
            policy::run(
                &cfg.spec,
                kb.as_deref(),
                q,
                &history,
                &mut gen,
                &mut tools,
                &pc,
            )?
        };
        writeln!(out, "{}", trace.answer).map_err(ReactError::Output)?;
        write_json(out, &trace, cfg.pretty)?;
        if let Some(id) = &cfg.session {
            cfg.sessions.append(
                id,
                Turn {
                    question: q.clone(),
                    answer: trace.answer.clone(),
                },
            )?;
        }
    }
    Ok(())
}
