//! The ReAct loop: renders the prompt (instruction, tools, few-shot trajectories, earlier
//! turns, question, steps so far), asks a [`StepGenerator`] for one step, parses it, runs
//! the tool through the [`Toolbox`] allow-list, appends the observation, and ends with a
//! typed [`StopReason`]. The context rule, budgets and partial answers live here; the model
//! is behind the trait so the state machine is tested without one.

use std::time::Instant;

use super::generator::{GenEnd, GenMode, GenStep, StepGenerator};
use super::grammar::{signature, step_grammar};
use super::tools::{ToolError, Toolbox};
use super::trace::{StepRecord, StepTokens, StopReason, Trace, Turn};
use crate::model::EngineError;
use crate::spec::react::ReactSpec;
use crate::spec::step::{
    parse_step, parse_step_loose, split_trajectory, Step, StepAction, StepError,
};

/// The text shown for an observation dropped by the context rule.
pub const DROPPED: &str = "(dropped)";

/// The fixed part of every prompt: instruction, tool list, few-shot trajectories.
pub fn render_prefix(spec: &ReactSpec) -> String {
    let mut out = String::new();
    out.push_str(spec.instruction.trim_end());
    out.push_str("\n\nTools:\n");
    for t in &spec.tools {
        out.push_str(&format!(
            "{}: {}\n",
            signature(t.name, &t.arg),
            t.description
        ));
    }
    out.push('\n');
    for ex in &spec.examples {
        out.push_str(&format!("Question: {}\n", one_line(&ex.question)));
        // Validated at load: the trajectory splits into steps.
        for (step, obs) in split_trajectory(&ex.steps).unwrap_or_default() {
            out.push_str(&step);
            if let Some(o) = obs {
                out.push_str(&format!("Observation: {o}\n"));
            }
        }
        out.push('\n');
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The whole prompt before the next step. Observations of the first `dropped` steps that
/// have one are shown as `(dropped)`.
pub fn render_prompt(
    prefix: &str,
    history: &[Turn],
    question: &str,
    steps: &[(String, Option<String>)],
    dropped: usize,
) -> String {
    let mut out = String::from(prefix);
    if !history.is_empty() {
        out.push_str("Earlier in this conversation:\n");
        for t in history {
            out.push_str(&format!(
                "Customer: {}\nKiosk: {}\n",
                one_line(&t.question),
                one_line(&t.answer)
            ));
        }
        out.push('\n');
    }
    out.push_str(&format!("Question: {}\n", one_line(question)));
    let mut seen = 0;
    for (step, obs) in steps {
        out.push_str(step);
        if let Some(o) = obs {
            seen += 1;
            let shown = if seen <= dropped { DROPPED } else { o.as_str() };
            out.push_str(&format!("Observation: {shown}\n"));
        }
    }
    out
}

/// The last turns whose rendered lines fit `max_tokens` (oldest dropped first).
pub fn fit_history(
    history: &[Turn],
    max_tokens: usize,
    count: &mut dyn FnMut(&str) -> usize,
) -> usize {
    let mut used = 0;
    let mut kept = 0;
    for t in history.iter().rev() {
        let n = count(&format!("Customer: {}\nKiosk: {}\n", t.question, t.answer));
        if used + n > max_tokens {
            break;
        }
        used += n;
        kept += 1;
    }
    kept
}

/// Options of one run beyond the task file.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Grammar-guarded steps (the default); false: free text and regex parsing.
    pub grammar: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { grammar: true }
    }
}

/// Runs the loop on `question` until a typed stop.
pub fn run(
    spec: &ReactSpec,
    question: &str,
    history: &[Turn],
    gen: &mut dyn StepGenerator,
    tools: &mut Toolbox,
    opts: RunOptions,
) -> Result<Trace, EngineError> {
    let started = Instant::now();
    let deadline = started + std::time::Duration::from_millis(spec.timeout_ms);
    let mut count = |s: &str| gen.count_tokens(s);
    let kept = fit_history(history, spec.history_max_tokens, &mut count);
    let mut r = Run::new(spec, question, &history[history.len() - kept..], opts);
    let stop = loop {
        if let Some(stop) = r.step(gen, tools, deadline)? {
            break stop;
        }
    };
    let mut trace = r.trace;
    trace.stop_reason = stop;
    trace.dropped_turns = kept - r.history.len();
    if !trace.finished {
        trace.answer = partial_answer(&trace);
    }
    trace.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(trace)
}

/// One run in progress: its trace so far, and the prompt's moving parts.
struct Run<'a> {
    spec: &'a ReactSpec,
    question: &'a str,
    opts: RunOptions,
    grammar: String,
    prefix: String,
    /// The earlier turns still in the prompt (the context rule drops the oldest).
    history: &'a [Turn],
    /// Step texts as the prompt shows them, each with its observation.
    shown: Vec<(String, Option<String>)>,
    trace: Trace,
}

impl<'a> Run<'a> {
    fn new(spec: &'a ReactSpec, question: &'a str, history: &'a [Turn], opts: RunOptions) -> Self {
        Run {
            spec,
            question,
            opts,
            grammar: step_grammar(spec),
            prefix: render_prefix(spec),
            history,
            shown: Vec::new(),
            trace: Trace {
                task: spec.name.clone(),
                question: question.to_string(),
                answer: String::new(),
                finished: false,
                stop_reason: StopReason::MaxSteps,
                seed: spec.seed,
                grammar: opts.grammar,
                steps: Vec::new(),
                generated_tokens: 0,
                unparsable_steps: 0,
                refused_calls: 0,
                tool_errors: 0,
                dropped_observations: 0,
                history_turns: history.len(),
                dropped_turns: 0,
                total_ms: 0.0,
            },
        }
    }

    /// One turn of the loop: checks the budgets, generates a step and acts on it; `Some`
    /// when the run stops.
    fn step(
        &mut self,
        gen: &mut dyn StepGenerator,
        tools: &mut Toolbox,
        deadline: Instant,
    ) -> Result<Option<StopReason>, EngineError> {
        let spec = self.spec;
        if self.trace.steps.len() >= spec.max_steps {
            return Ok(Some(StopReason::MaxSteps));
        }
        let left = spec
            .max_total_tokens
            .saturating_sub(self.trace.generated_tokens);
        if left == 0 {
            return Ok(Some(StopReason::TokenBudget));
        }
        let budget = spec.max_step_tokens.min(left);
        let Some(prompt) = self.fit_prompt(gen, budget) else {
            return Ok(Some(StopReason::TokenBudget));
        };
        if Instant::now() >= deadline {
            return Ok(Some(StopReason::Timeout));
        }
        let mode = if self.opts.grammar {
            GenMode::Grammar {
                gbnf: &self.grammar,
                lines: 2,
            }
        } else {
            GenMode::Free
        };
        let seed = spec.seed.wrapping_add(self.trace.steps.len() as u64);
        let g = match gen.generate(&prompt, mode, budget, seed, deadline) {
            Ok(g) => g,
            Err(EngineError::ContextFull { .. }) => return Ok(Some(StopReason::TokenBudget)),
            Err(e) => return Err(e),
        };
        self.trace.generated_tokens += g.generated_tokens;
        let rec = StepRecord {
            tokens: StepTokens {
                prompt: g.prompt_tokens,
                reused: g.reused_tokens,
                generated: g.generated_tokens,
            },
            gen_ms: g.ms,
            prefill_ms: g.prefill_ms,
            ..Default::default()
        };
        let parsed = if self.opts.grammar {
            parse_step(&g.text, spec)
        } else {
            parse_step_loose(&g.text)
        };
        Ok(match parsed {
            Ok(step) => self.act(rec, &g, step, tools),
            Err(e) => self.unparsable(rec, &g, e),
        })
    }

    /// The prompt for the next step, made to fit the context with `budget` tokens to
    /// generate; `None` when it cannot. The context rule: oldest observations become
    /// `(dropped)`, then the oldest earlier turns go; the instruction, tools, examples and
    /// question always stay.
    fn fit_prompt(&mut self, gen: &mut dyn StepGenerator, budget: usize) -> Option<String> {
        let n_obs = self.shown.iter().filter(|(_, o)| o.is_some()).count();
        loop {
            let p = render_prompt(
                &self.prefix,
                self.history,
                self.question,
                &self.shown,
                self.trace.dropped_observations,
            );
            if gen.count_tokens(&p) + budget <= self.spec.max_context_tokens {
                return Some(p);
            }
            if self.trace.dropped_observations < n_obs {
                self.trace.dropped_observations += 1;
            } else if !self.history.is_empty() {
                self.history = &self.history[1..];
            } else {
                return None;
            }
        }
    }

    /// A step that did not parse: a stop when generation was cut, else the parse error
    /// as its observation, as peers do: tell the model and go on.
    fn unparsable(&mut self, mut rec: StepRecord, g: &GenStep, e: StepError) -> Option<StopReason> {
        rec.unparsable = Some(g.text.clone());
        self.trace.steps.push(rec);
        match g.end {
            GenEnd::Deadline => return Some(StopReason::Timeout),
            // A step cut by its budget: in grammar mode it can be nothing else.
            GenEnd::MaxTokens if self.opts.grammar => return Some(StopReason::TokenBudget),
            _ => {}
        }
        self.trace.unparsable_steps += 1;
        let obs = format!("Invalid format: {e}");
        if let Some(last) = self.trace.steps.last_mut() {
            last.observation = Some(obs.clone());
        }
        self.shown.push((ensure_newline(&g.text), Some(obs)));
        None
    }

    /// A parsed step: the final answer, or the tool call and its observation.
    fn act(
        &mut self,
        mut rec: StepRecord,
        g: &GenStep,
        step: Step,
        tools: &mut Toolbox,
    ) -> Option<StopReason> {
        rec.thought = Some(step.thought.clone());
        match step.action {
            StepAction::Final(answer) => {
                rec.final_answer = Some(answer.clone());
                self.trace.steps.push(rec);
                self.trace.answer = answer;
                self.trace.finished = true;
                Some(StopReason::Final)
            }
            StepAction::Tool { tool, arg } => {
                rec.tool = Some(tool.clone());
                rec.arg = Some(arg.clone());
                let obs = self.call_tool(&mut rec, &tool, &arg, tools);
                rec.observation = Some(obs.clone());
                self.trace.steps.push(rec);
                let text = if self.opts.grammar {
                    g.text.clone()
                } else {
                    format!("Thought: {}\nAction: {tool}[{arg}]\n", step.thought)
                };
                self.shown.push((text, Some(obs)));
                (self.trace.tool_errors >= self.spec.max_tool_errors)
                    .then_some(StopReason::ToolError)
            }
        }
    }

    /// Runs a tool through the allow-list; the observation is its output or its error.
    fn call_tool(
        &mut self,
        rec: &mut StepRecord,
        tool: &str,
        arg: &str,
        tools: &mut Toolbox,
    ) -> String {
        let t = Instant::now();
        let result = tools.call(tool, arg);
        rec.tool_ms = t.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(out) => {
                rec.passage_ids = out.passage_ids;
                out.text
            }
            Err(e) => {
                if matches!(e, ToolError::NotAllowed(_)) {
                    self.trace.refused_calls += 1;
                }
                self.trace.tool_errors += 1;
                rec.tool_error = Some(e.to_string());
                format!("error: {e}")
            }
        }
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The best answer of an unfinished run: the last successful observation (what a tool
/// found), else the last thought, else nothing.
pub fn partial_answer(trace: &Trace) -> String {
    trace
        .steps
        .iter()
        .rev()
        .find_map(|s| {
            s.observation
                .as_ref()
                .filter(|_| s.tool_error.is_none() && s.tool.is_some())
                .cloned()
        })
        .or_else(|| trace.steps.iter().rev().find_map(|s| s.thought.clone()))
        .unwrap_or_default()
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
