//! A ReAct task served by the inference thread: its knowledge base, tools and prefix slot,
//! and one request through the same scored, grounded policy as `edgeact react` (or `qa`).
//! The model is borrowed lazily: a kiosk answering from its knowledge base never loads it.

use std::sync::Arc;

use super::worker::{JobError, Output, WorkerError};
use crate::model::GenCache;
use crate::react::agent;
use crate::react::generator::{LazyEngine, LazyEngineGenerator};
use crate::react::kb::Kb;
use crate::react::policy;
use crate::react::request::{qa_trace, ReactRequest, ReactResult, RequestMode};
use crate::react::session::Sessions;
use crate::react::tools::Toolbox;
use crate::react::trace::Turn;
use crate::react::ReactError;
use crate::spec::react::ReactSpec;

/// A ReAct task: its prefix in the task's slot (decoded when the model loads), its tools, and the generation
/// cache carried over between runs.
pub(super) struct ReactRunner {
    spec: ReactSpec,
    kb: Option<Arc<Kb>>,
    tools: Toolbox,
    cache: GenCache,
    slot: usize,
}

/// Loads the task's knowledge base and tools, and registers its prefix for slot `slot`.
pub(super) fn setup(
    lazy: &mut LazyEngine,
    spec: ReactSpec,
    slot: usize,
) -> Result<ReactRunner, WorkerError> {
    let react_err = |source: ReactError| WorkerError::ReactTask {
        path: spec.path.clone(),
        source,
    };
    let kb = match &spec.kb {
        Some(k) => Some(Arc::new(
            Kb::load_beside(&k.dir, lazy.model_path())
                .map_err(|e| react_err(ReactError::from(e)))?,
        )),
        None => None,
    };
    let mut tools = Toolbox::new(&spec, kb.clone());
    tools.collect_notifications();
    // Decoded when the model loads (now if a task before needed it).
    lazy.add_prefix(slot, agent::render_prefix(&spec))
        .map_err(|e| react_err(ReactError::from(e)))?;
    Ok(ReactRunner {
        spec,
        kb,
        tools,
        cache: GenCache::default(),
        slot,
    })
}

/// One ReAct or qa request through the task's scored policy; the model loads here only if
/// the question needs it.
pub(super) fn react(
    lazy: &mut LazyEngine,
    r: &mut ReactRunner,
    req: &ReactRequest,
    sessions: &Sessions,
) -> Result<Output, JobError> {
    let history = match &req.session {
        Some(id) => sessions.load(id).map_err(ReactError::from)?,
        None => Vec::new(),
    };
    match &req.sensors {
        Some(v) => r.tools.set_sensor_values(v.clone()),
        None => r.tools.clear_sensor_values(),
    }
    // The model loads here only if this question needs it.
    let mut gen = LazyEngineGenerator {
        lazy,
        cache: &mut r.cache,
        temperature: r.spec.temperature,
        prefix_slot: r.slot,
    };
    // The same scored, grounded policy as `edgeact react` (or, for `"mode": "qa"`, the
    // grounded retrieve-then-answer of `edgeact qa`), with the task's `[policy]`.
    let trace = match (req.mode, &r.spec.qa, r.kb.as_deref()) {
        (RequestMode::React, ..) => policy::run(
            &r.spec,
            r.kb.as_deref(),
            &req.question,
            &history,
            &mut gen,
            &mut r.tools,
            &r.spec.policy,
        ),
        (RequestMode::Qa, Some(qa_spec), Some(kb)) => {
            let context = policy::follow_up_context(Some(kb), &history, &req.question);
            crate::react::qa::answer(
                &r.spec,
                qa_spec,
                kb,
                &req.question,
                context.as_deref(),
                &mut gen,
                &r.spec.policy.ground,
            )
            .map(|a| qa_trace(&a))
        }
        (RequestMode::Qa, ..) => {
            return Err(JobError::WrongKind {
                task: r.spec.name.clone(),
                reason: "\"mode\": \"qa\" needs a task with a [qa] section".into(),
            });
        }
    };
    let trace = trace.map_err(ReactError::from)?;
    let notify = r.tools.take_notifications();
    if let Some(id) = &req.session {
        sessions
            .append(
                id,
                Turn {
                    question: req.question.clone(),
                    answer: trace.answer.clone(),
                },
            )
            .map_err(ReactError::from)?;
    }
    let result = ReactResult::new(&req.id, req.session.clone(), trace, notify)
        .with_citation(r.kb.as_deref(), req.mode);
    Ok(Output::Reacted(Box::new(result)))
}
