//! A ReAct request over MQTT (`<prefix>/<task>/request` of a `type = "react"` task), and
//! what it publishes: the answer on `<prefix>/<task>/result`, the compact trace on
//! `<prefix>/<task>/trace`. `"mode": "qa"` asks for retrieve-then-answer instead of the
//! loop (as `edgeact qa`): same topics, the answer with the cited passage.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::kb::Kb;
use super::qa::{parse_answer, QaResult};
use super::tools::cut_chars;
use super::trace::{StepRecord, StopReason, Trace};
use crate::spec::tool::ToolName;

/// How a request is answered: the scored loop (`edgeact react`) or retrieve-then-answer
/// (`edgeact qa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestMode {
    #[default]
    React,
    Qa,
}

impl RequestMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestMode::React => "react",
            RequestMode::Qa => "qa",
        }
    }
}

/// One question for the loop.
#[derive(Debug, Clone, PartialEq)]
pub struct ReactRequest {
    pub id: String,
    pub question: String,
    /// `"mode": "react"` (the default) or `"qa"`.
    pub mode: RequestMode,
    /// Carries the earlier turns of this session (kiosk dialogue), and records this one.
    pub session: Option<String>,
    /// Daemon mode: the latest value of each context topic, by name, for `sensor[name]`
    /// (filled by the daemon, not by the request). None: sensors are files.
    pub sensors: Option<BTreeMap<String, String>>,
}

/// Longest question accepted, in characters.
pub const MAX_QUESTION_CHARS: usize = 2000;

/// `{"id"?, "question" (or "text"), "session"?, "mode"?}`, or a JSON string (the question).
pub fn request_from_json(v: Value, default_id: &str) -> Result<ReactRequest, String> {
    let mut o = match v {
        Value::String(s) => {
            let mut o = serde_json::Map::new();
            o.insert("question".into(), Value::String(s));
            o
        }
        Value::Object(o) => o,
        _ => return Err("a ReAct request is an object with `question` (or a JSON string)".into()),
    };
    let id = match o.remove("id") {
        None | Some(Value::Null) => default_id.to_string(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("field `id` must be a string or number".into()),
    };
    let question = match (o.remove("question"), o.remove("text")) {
        (Some(Value::String(q)), None) | (None, Some(Value::String(q))) => q,
        (Some(_), Some(_)) => return Err("give `question` or `text`, not both".into()),
        (None, None) => return Err("missing field `question`".into()),
        _ => return Err("field `question` must be a string".into()),
    };
    if question.trim().is_empty() {
        return Err("`question` is empty".into());
    }
    if question.chars().count() > MAX_QUESTION_CHARS {
        return Err(format!(
            "`question` is {} characters, over the limit of {MAX_QUESTION_CHARS}",
            question.chars().count()
        ));
    }
    let session = match o.remove("session") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err("field `session` must be a string".into()),
    };
    let mode = match o.remove("mode") {
        None | Some(Value::Null) => RequestMode::React,
        Some(Value::String(m)) if m == "react" => RequestMode::React,
        Some(Value::String(m)) if m == "qa" => RequestMode::Qa,
        Some(_) => return Err("field `mode` must be \"react\" or \"qa\"".into()),
    };
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "unknown field `{k}` (a ReAct request has id, question, session, mode)"
        ));
    }
    Ok(ReactRequest {
        id,
        question,
        mode,
        session,
        sensors: None,
    })
}

/// The answer of one run, for `<prefix>/<task>/result`.
#[derive(Debug, Clone, Serialize)]
pub struct ReactResult {
    pub id: String,
    pub task: String,
    pub answer: String,
    /// `react` (the loop) or `qa` (retrieve, then answer).
    pub mode: &'static str,
    /// False: `answer` is the best partial answer (`stop_reason` says why).
    pub finished: bool,
    pub stop_reason: &'static str,
    /// Passage ids the run retrieved, in order.
    pub citations: Vec<String>,
    /// The passage the answer cites (always one of `citations`) and its text; absent when
    /// the answer cites none (not found, or another tool answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cited: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub steps: usize,
    pub generated_tokens: usize,
    pub unparsable_steps: usize,
    pub refused_calls: usize,
    pub tool_errors: usize,
    /// Side effects (`notify`) published on `<prefix>/<task>/notify`.
    pub notifications: usize,
    pub total_ms: f64,
    pub seed: u64,
    /// The full trace (the compact one is published; this stays local).
    #[serde(skip)]
    pub trace: Trace,
    /// The `notify` payloads of the run, to publish.
    #[serde(skip)]
    pub notify: Vec<Value>,
}

impl ReactResult {
    pub fn new(id: &str, session: Option<String>, trace: Trace, notify: Vec<Value>) -> Self {
        let mut citations: Vec<String> = Vec::new();
        for p in trace.retrieved_ids() {
            if !citations.iter().any(|c| c == p) {
                citations.push(p.to_string());
            }
        }
        ReactResult {
            id: id.to_string(),
            task: trace.task.clone(),
            answer: trace.answer.clone(),
            mode: RequestMode::React.as_str(),
            finished: trace.finished,
            stop_reason: trace.stop_reason.as_str(),
            citations,
            cited: None,
            passage: None,
            session,
            steps: trace.steps.len(),
            generated_tokens: trace.generated_tokens,
            unparsable_steps: trace.unparsable_steps,
            refused_calls: trace.refused_calls,
            tool_errors: trace.tool_errors,
            notifications: notify.len(),
            total_ms: (trace.total_ms * 10.0).round() / 10.0,
            seed: trace.seed,
            trace,
            notify,
        }
    }
}

impl ReactResult {
    /// With the answer's cited passage and its text from `kb` (only an id the run
    /// retrieved), and the mode that answered.
    pub fn with_citation(mut self, kb: Option<&Kb>, mode: RequestMode) -> Self {
        self.mode = mode.as_str();
        let cited = parse_answer(&self.answer)
            .map(|(_, id)| id)
            .filter(|id| self.citations.contains(id));
        if let (Some(id), Some(kb)) = (cited, kb) {
            if let Some(p) = kb.get(&id) {
                self.passage = Some(p.one_line());
                self.cited = Some(id);
            }
        }
        self
    }
}

/// A grounded `qa` answer as a trace of the loop's shape: one `kb_search` step (the
/// question, the retrieved ids), then the final answer `text [id]`; so a qa request
/// publishes the same result and compact trace as a loop.
pub fn qa_trace(r: &QaResult) -> Trace {
    let line = match &r.cited {
        Some(id) => format!("{} [{id}]", r.answer),
        None => r.answer.clone(),
    };
    let ids: Vec<String> = r.passages.iter().map(|p| p.id.clone()).collect();
    let search = StepRecord {
        tool: Some(ToolName::KbSearch.as_str().to_string()),
        arg: Some(r.question.clone()),
        observation: Some(ids.join(" ")),
        passage_ids: ids,
        tool_ms: r.retrieve_ms,
        ..Default::default()
    };
    let answer = StepRecord {
        final_answer: Some(line.clone()),
        gen_ms: r.generate_ms,
        ..Default::default()
    };
    Trace {
        task: r.task.clone(),
        question: r.question.clone(),
        answer: line,
        finished: r.finished,
        stop_reason: StopReason::Final,
        seed: r.seed,
        grammar: true,
        steps: vec![search, answer],
        generated_tokens: r.generated_tokens,
        unparsable_steps: 0,
        refused_calls: 0,
        tool_errors: 0,
        dropped_observations: 0,
        history_turns: 0,
        dropped_turns: 0,
        total_ms: r.retrieve_ms + r.generate_ms,
    }
}

/// Characters of a thought or observation kept in the compact trace.
const TRACE_TEXT_CHARS: usize = 160;

/// The compact trace: every step (thought, action, argument, observation cut short, tokens,
/// ms), bounded in size whatever the run did.
pub fn compact_trace(r: &ReactResult) -> Value {
    let cut = |s: &Option<String>| s.as_deref().map(|t| cut_chars(t, TRACE_TEXT_CHARS));
    let steps: Vec<Value> = r
        .trace
        .steps
        .iter()
        .map(|s| {
            json!({
                "thought": cut(&s.thought),
                "tool": s.tool,
                "arg": cut(&s.arg),
                "observation": cut(&s.observation),
                "tool_error": cut(&s.tool_error),
                "final_answer": cut(&s.final_answer),
                "unparsable": s.unparsable.is_some(),
                "passage_ids": s.passage_ids,
                "tokens": {"prompt": s.tokens.prompt, "reused": s.tokens.reused, "generated": s.tokens.generated},
                "ms": ((s.gen_ms + s.tool_ms) * 10.0).round() / 10.0,
            })
        })
        .collect();
    json!({
        "id": r.id,
        "task": r.task,
        "stop_reason": r.stop_reason,
        "finished": r.finished,
        "seed": r.seed,
        "grammar": r.trace.grammar,
        "steps": steps,
        "generated_tokens": r.generated_tokens,
        "dropped_observations": r.trace.dropped_observations,
        "history_turns": r.trace.history_turns,
        "total_ms": r.total_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_errors_name_the_field() {
        let r = request_from_json(
            json!({"id": 7, "question": "Open on Sunday?", "session": "k1"}),
            "d",
        )
        .unwrap();
        assert_eq!(
            (r.id.as_str(), r.question.as_str(), r.session.as_deref()),
            ("7", "Open on Sunday?", Some("k1"))
        );
        assert_eq!(r.mode, RequestMode::React);
        let r = request_from_json(json!({"question": "Lift?", "mode": "qa"}), "d").unwrap();
        assert_eq!(r.mode, RequestMode::Qa);
        let r = request_from_json(json!("Where is the lift?"), "d1").unwrap();
        assert_eq!((r.id.as_str(), r.session), ("d1", None));
        assert_eq!(
            request_from_json(json!({"text": "hi"}), "d")
                .unwrap()
                .question,
            "hi"
        );
        for (v, needle) in [
            (json!({}), "missing field `question`"),
            (json!({"question": 3}), "must be a string"),
            (json!({"question": "  "}), "empty"),
            (json!({"question": "a", "text": "b"}), "not both"),
            (json!({"question": "a", "session": 1}), "`session`"),
            (
                json!({"question": "a", "tool": "notify"}),
                "unknown field `tool`",
            ),
            (json!([1]), "an object"),
            (json!({"question": "a", "mode": "chat"}), "`mode`"),
            (
                json!({"question": "x".repeat(MAX_QUESTION_CHARS + 1)}),
                "over the limit",
            ),
        ] {
            let e = request_from_json(v.clone(), "d").unwrap_err();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }
}
