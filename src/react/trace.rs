//! What a ReAct run records: every step with its tokens and times, the typed
//! [`StopReason`] it ended with, and the answer; and the earlier turns of a session that
//! a run is given.

/// Every run ends with one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A `Final Answer` step.
    Final,
    /// `max_steps` steps without a final answer.
    MaxSteps,
    /// The run's generated-token budget is spent, a step did not fit its own, or the
    /// context could not be made to fit.
    TokenBudget,
    /// `timeout_ms` passed.
    Timeout,
    /// `max_tool_errors` tool calls failed (or were refused).
    ToolError,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Final => "final",
            StopReason::MaxSteps => "max_steps",
            StopReason::TokenBudget => "token_budget",
            StopReason::Timeout => "timeout",
            StopReason::ToolError => "tool_error",
        }
    }
}

/// An earlier turn of a session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub question: String,
    pub answer: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepTokens {
    pub prompt: usize,
    pub reused: usize,
    pub generated: usize,
}

/// One step of the trace.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StepRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thought: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_answer: Option<String>,
    /// The generated text, kept only when it did not parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unparsable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passage_ids: Vec<String>,
    pub tokens: StepTokens,
    /// Generation wall time, of which `prefill_ms` decoding the new prompt tokens.
    pub gen_ms: f64,
    pub prefill_ms: f64,
    pub tool_ms: f64,
}

/// The outcome of a run: answer, stop reason and every step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trace {
    pub task: String,
    pub question: String,
    /// The final answer, or the best partial answer when `finished` is false.
    pub answer: String,
    pub finished: bool,
    pub stop_reason: StopReason,
    pub seed: u64,
    pub grammar: bool,
    pub steps: Vec<StepRecord>,
    pub generated_tokens: usize,
    pub unparsable_steps: usize,
    /// Calls of a tool not on the task's allow-list (never run).
    pub refused_calls: usize,
    pub tool_errors: usize,
    /// Observations replaced by `(dropped)` to fit the context.
    pub dropped_observations: usize,
    /// Earlier turns kept in the prompt, and dropped from it.
    pub history_turns: usize,
    pub dropped_turns: usize,
    pub total_ms: f64,
}

impl Trace {
    /// Passage ids any `kb_search` of the run returned.
    pub fn retrieved_ids(&self) -> Vec<&str> {
        self.steps
            .iter()
            .flat_map(|s| s.passage_ids.iter().map(String::as_str))
            .collect()
    }

    /// The first tool the run called, if any.
    pub fn first_tool(&self) -> Option<&str> {
        self.steps.iter().find_map(|s| s.tool.as_deref())
    }
}
