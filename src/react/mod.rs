//! ReAct on the device: grammar-guarded `Thought:` / `Action:` / `Observation:` loops with
//! allow-listed tools, retrieve-then-answer QA over a local knowledge base, multi-turn
//! sessions, and the scenario evaluation.
//!
//! - the task file (`type = "react"`) and the step format are in [`crate::spec::react`]
//!   and [`crate::spec::step`].
//! - [`grammar`]: GBNF built from the task (step grammar, QA citation grammar).
//! - [`agent`]: the loop (state machine, context rule, budgets, partial answers).
//! - [`generator`]: the model side of the loop, [`generator::StepGenerator`], and the
//!   engine as one.
//! - [`trace`]: what a run records: steps, stop reason, answer; earlier turns.
//! - [`tools`]: the tools and the per-task toolbox (allow-list, limits, rate limit).
//! - [`kb`]: the knowledge base and its BM25 index.
//! - [`semantic`]: the sentence encoder's evidence (cosine of meaning) when it is fetched.
//! - [`ground`]: grounded answers: passage re-ranking and sentence selection, the
//!   number check, the not-found answer.
//! - [`action`]: which tool: each allowed action's evidence (the tool's words, the
//!   knowledge base's coverage, a question about the present), as plain functions.
//! - [`policy`]: the scored policy (the default): actions chosen by scoring, answers
//!   selected from what the tool returned.
//! - [`qa`]: one retrieval, one grammar-constrained answer citing a retrieved passage.
//! - [`request`]: a request over MQTT, its result and compact trace.
//! - [`session`]: earlier turns of a conversation, kept on disk by session id.
//! - [`scenario`]: the scenario file and its metrics (`edgeact react-eval`).
//!
//! The modes themselves (`react`, `qa`, `react-eval`) are in the command layer.

pub mod action;
pub mod agent;
pub mod generator;
pub mod grammar;
pub mod ground;
pub mod kb;
pub mod policy;
pub mod qa;
pub mod request;
pub mod scenario;
pub mod semantic;
pub mod session;
pub mod tools;
pub mod trace;

/// Errors of the ReAct modes.
#[derive(Debug, thiserror::Error)]
pub enum ReactError {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Kb(#[from] kb::KbError),
    #[error(transparent)]
    Engine(#[from] crate::model::EngineError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
}
