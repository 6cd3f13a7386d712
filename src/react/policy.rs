//! The scored policy, the default for a small model: score and select, do not generate.
//! Step one: the action, chosen by its evidence ([`super::action`]: the tool's words, the
//! knowledge base's coverage, a question about the present; optionally a thought and the
//! model's score of each action line `Action: name[`, as classification); the argument
//! comes from the question's own words (text, JSON), from the value its words name
//! (choice; the model breaks ties), or from generation under the argument's grammar
//! (expressions). The tool runs through the [`Toolbox`]
//! allow-list. Step two: the final answer, selected from what the tool returned: for
//! `kb_search` a sentence of a retrieved passage with its id ([`super::ground`]), for the
//! others the observation in a fixed sentence. The free grammar loop ([`super::agent`])
//! stays for larger models.

use std::time::Instant;

use super::action::{self, action_labels};
use super::agent::{fit_history, render_prefix, render_prompt};
use super::generator::{GenEnd, GenMode, StepGenerator};
use super::grammar::{arg_grammar, thought_grammar};
use super::ground::{self, Grounded, Query, TextScorer};
use super::kb::Kb;
use super::qa::parse_answer;
use super::tools::Toolbox;
use super::trace::{StepRecord, StepTokens, StopReason, Trace, Turn};
use crate::model::EngineError;
use crate::spec::react::ReactSpec;
use crate::spec::tool::{ArgSchema, ToolName};

/// A model that both generates and scores.
pub trait Model: StepGenerator + TextScorer {}
impl<T: StepGenerator + TextScorer + ?Sized> Model for T {}

pub use crate::spec::policy::PolicyConfig;

/// The question used for calibration: no content.
pub const CONTENT_FREE: &str = "N/A";

/// Text fit for a bracketed argument: one line, no brackets, quotes or backslashes, cut
/// at a word boundary to `max_chars`.
pub fn clean_arg(text: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for w in text.split_whitespace() {
        let w: String = w
            .chars()
            .filter(|c| !matches!(c, '[' | ']' | '"' | '\\') && !c.is_control())
            .collect();
        if w.is_empty() {
            continue;
        }
        let extra = usize::from(!out.is_empty()) + w.chars().count();
        if out.chars().count() + extra > max_chars {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&w);
    }
    out
}

/// The search words of a question: its words without the trailing punctuation, the
/// follow-up's context after them.
pub fn search_query(question: &str, context: Option<&str>, max_chars: usize) -> String {
    let q = match context {
        Some(c) => format!("{question} {c}"),
        None => question.to_string(),
    };
    let words: String = q
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' || c == '-' || c == ':' || c == '.' {
                c
            } else {
                ' '
            }
        })
        .collect();
    clean_arg(&words, max_chars)
}

/// The final answer after a tool that is not `kb_search`: its observation in a fixed
/// sentence (nothing is made up around it).
pub fn tool_answer(tool: ToolName, observation: &str) -> String {
    let obs = observation.trim();
    match tool {
        ToolName::Notify => "A member of staff has been called and is on the way.".into(),
        ToolName::Calculator => format!("That makes {obs}."),
        ToolName::Clock => format!("It is {obs}."),
        ToolName::Sensor => format!("Right now: {obs}."),
        _ => obs.to_string(),
    }
}

/// The earlier question a follow-up continues, with the title of the passage its answer
/// cited: the session's last question and passage.
pub fn follow_up_context(kb: Option<&Kb>, history: &[Turn], question: &str) -> Option<String> {
    let last = history.last()?;
    if !ground::is_follow_up(question) {
        return None;
    }
    let title = parse_answer(&last.answer)
        .and_then(|(_, id)| kb.and_then(|k| k.get(&id)).map(|p| p.title.clone()))
        .unwrap_or_default();
    Some(format!("{} {title}", last.question).trim().to_string())
}

/// Runs the scored policy on `question`: one tool step, then the selected answer.
#[allow(clippy::too_many_arguments)]
pub fn run(
    spec: &ReactSpec,
    kb: Option<&Kb>,
    question: &str,
    history: &[Turn],
    model: &mut dyn Model,
    tools: &mut Toolbox,
    cfg: &PolicyConfig,
) -> Result<Trace, EngineError> {
    let started = Instant::now();
    let deadline = started + std::time::Duration::from_millis(spec.timeout_ms);
    let mut count = |s: &str| model.count_tokens(s);
    let kept = fit_history(history, spec.history_max_tokens, &mut count);
    let history = &history[history.len() - kept..];
    let mut trace = Trace {
        task: spec.name.clone(),
        question: question.to_string(),
        answer: String::new(),
        finished: false,
        stop_reason: StopReason::Final,
        seed: spec.seed,
        grammar: true,
        steps: Vec::new(),
        generated_tokens: 0,
        unparsable_steps: 0,
        refused_calls: 0,
        tool_errors: 0,
        dropped_observations: 0,
        history_turns: history.len(),
        dropped_turns: 0,
        total_ms: 0.0,
    };
    let prefix = render_prefix(spec);
    let context = follow_up_context(kb, history, question);
    let mut rec = StepRecord::default();
    let ask = Ask {
        question,
        context: context.as_deref(),
        history,
    };
    let cx = StepCtx {
        spec,
        kb,
        cfg,
        deadline,
    };
    let (tool, arg) = choose_action(&cx, &prefix, ask, model, &mut rec)?;
    trace.generated_tokens += rec.tokens.generated;
    let t = Instant::now();
    let result = tools.call(tool.as_str(), &arg);
    rec.tool_ms = t.elapsed().as_secs_f64() * 1e3;
    rec.tool = Some(tool.as_str().to_string());
    rec.arg = Some(arg.clone());
    let answer = match result {
        Ok(out) => {
            rec.observation = Some(out.text.clone());
            rec.passage_ids = out.passage_ids.clone();
            if tool == ToolName::KbSearch {
                let g = grounded(
                    kb,
                    question,
                    context.as_deref(),
                    &arg,
                    &out.passage_ids,
                    model,
                    cfg,
                )?;
                trace.steps.push(rec);
                trace.steps.push(StepRecord {
                    thought: Some(evidence(&g)),
                    final_answer: Some(g.line()),
                    ..Default::default()
                });
                g.line()
            } else {
                trace.steps.push(rec);
                let a = tool_answer(tool, &out.text);
                trace.steps.push(StepRecord {
                    final_answer: Some(a.clone()),
                    ..Default::default()
                });
                a
            }
        }
        Err(e) => {
            trace.tool_errors += 1;
            if matches!(e, super::tools::ToolError::NotAllowed(_)) {
                trace.refused_calls += 1;
            }
            rec.tool_error = Some(e.to_string());
            rec.observation = Some(format!("error: {e}"));
            trace.steps.push(rec);
            trace.stop_reason = StopReason::ToolError;
            ground::NOT_FOUND.to_string()
        }
    };
    trace.finished = trace.stop_reason == StopReason::Final;
    trace.answer = answer;
    trace.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(trace)
}

/// Why the answer came from where it did, for the trace: each candidate and its score.
fn evidence(g: &Grounded) -> String {
    let c: Vec<String> = g
        .candidates
        .iter()
        .map(|c| format!("{} {:.2} (cover {:.2})", c.id, c.score, c.coverage))
        .collect();
    match &g.cited {
        Some(id) => format!("selected from {id}; candidates: {}", c.join(", ")),
        None => format!("no passage good enough; candidates: {}", c.join(", ")),
    }
}

/// Selection over the passages the search returned (their BM25 scores recomputed for the
/// same query; only ids the search returned can be cited).
fn grounded(
    kb: Option<&Kb>,
    question: &str,
    context: Option<&str>,
    query: &str,
    ids: &[String],
    model: &mut dyn Model,
    cfg: &PolicyConfig,
) -> Result<Grounded, EngineError> {
    let Some(kb) = kb else {
        return Ok(Grounded {
            answer: ground::NOT_FOUND.into(),
            cited: None,
            candidates: Vec::new(),
            sentence_scores: Vec::new(),
        });
    };
    let scores = kb.search(query, ids.len().max(1) * 4);
    let hits: Vec<(String, f64)> = ids
        .iter()
        .map(|id| {
            let s = scores
                .iter()
                .find(|h| &kb.passages[h.index].id == id)
                .map_or(0.0, |h| h.score as f64);
            (id.clone(), s)
        })
        .collect();
    let scorer: &mut dyn TextScorer = model;
    ground::select(
        kb,
        Query { question, context },
        &hits,
        Some(scorer),
        &cfg.ground,
    )
}

/// The question, the follow-up's context and the earlier turns.
#[derive(Clone, Copy)]
struct Ask<'a> {
    question: &'a str,
    context: Option<&'a str>,
    history: &'a [Turn],
}

/// What choosing the action needs besides the question and the model: the task, the
/// knowledge base, the policy and the deadline.
struct StepCtx<'a> {
    spec: &'a ReactSpec,
    kb: Option<&'a Kb>,
    cfg: &'a PolicyConfig,
    deadline: Instant,
}

/// Step one: the thought (when `cfg.think`), the scored action and its argument.
fn choose_action(
    cx: &StepCtx,
    prefix: &str,
    ask: Ask,
    model: &mut dyn Model,
    rec: &mut StepRecord,
) -> Result<(ToolName, String), EngineError> {
    let mut prompt = render_prompt(prefix, ask.history, ask.question, &[], 0);
    thought(cx, model, &mut prompt, rec)?;
    let labels = action_labels(cx.spec);
    let t = Instant::now();
    let model_scores = score_action_lines(cx, prefix, model, &prompt, &labels, rec)?;
    rec.gen_ms += t.elapsed().as_secs_f64() * 1e3;
    let feats = action::action_features(cx.spec, cx.kb, ask.question, &model_scores);
    let scores: Vec<f64> = feats.iter().map(|f| f.score(cx.cfg)).collect();
    if rec.thought.is_none() {
        rec.thought = Some(action::explain(&labels, &scores, &feats));
    }
    let Some(b) = ground::best(&scores) else {
        return Err(EngineError::Decode("the task allows no tools".into()));
    };
    let (tool, label) = &labels[b];
    let action_prompt = format!("{prompt}{label}");
    let arg = choose_arg(cx, *tool, &action_prompt, ask, model, rec)?;
    Ok((*tool, arg))
}

/// Appends `Thought:` and the thought to `prompt`: generated under the thought grammar when
/// `cfg.think`, else a fixed sentence (no model call).
fn thought(
    cx: &StepCtx,
    model: &mut dyn Model,
    prompt: &mut String,
    rec: &mut StepRecord,
) -> Result<(), EngineError> {
    prompt.push_str("Thought:");
    if !cx.cfg.think {
        prompt.push_str(" I choose the tool for this question.\n");
        return Ok(());
    }
    let g = model.generate(
        prompt,
        GenMode::Grammar {
            gbnf: &thought_grammar(cx.spec.max_thought_chars),
            lines: 1,
        },
        cx.spec.max_step_tokens,
        cx.spec.seed,
        cx.deadline,
    )?;
    rec.tokens = StepTokens {
        prompt: g.prompt_tokens,
        reused: g.reused_tokens,
        generated: g.generated_tokens,
    };
    rec.gen_ms += g.ms;
    rec.prefill_ms += g.prefill_ms;
    let text = if g.end == GenEnd::Complete {
        g.text
    } else {
        format!("{}\n", g.text.trim_end())
    };
    prompt.push_str(&text);
    rec.thought = Some(text.trim().to_string());
    Ok(())
}

/// The model's log-probability of each action line after `prompt` (less its score after a
/// content-free question when `cfg.calibrate`); all 0 without a model weight (the default:
/// on the dev sets it added nothing to the lexical evidence), then nothing is scored.
fn score_action_lines(
    cx: &StepCtx,
    prefix: &str,
    model: &mut dyn Model,
    prompt: &str,
    labels: &[(ToolName, String)],
    rec: &mut StepRecord,
) -> Result<Vec<f64>, EngineError> {
    if cx.cfg.w_model <= 0.0 {
        return Ok(vec![0.0; labels.len()]);
    }
    let texts: Vec<String> = labels.iter().map(|(_, l)| l.clone()).collect();
    let mut scores: Vec<f64> = model
        .label_logprobs(prompt, &texts)?
        .into_iter()
        .map(|(lp, _)| lp)
        .collect();
    if cx.cfg.calibrate {
        let mut cf = render_prompt(prefix, &[], CONTENT_FREE, &[], 0);
        let mut scratch = StepRecord::default();
        thought(cx, model, &mut cf, &mut scratch)?;
        rec.tokens.generated += scratch.tokens.generated;
        let prior = model.label_logprobs(&cf, &texts)?;
        for (s, (p, _)) in scores.iter_mut().zip(prior) {
            *s -= p;
        }
    }
    Ok(scores)
}

/// The chosen tool's argument: the question's own words (text, JSON), the value whose
/// words the question uses (choice; the model breaks ties), or generation under the
/// argument's grammar after `action_prompt` (expressions).
fn choose_arg(
    cx: &StepCtx,
    tool: ToolName,
    action_prompt: &str,
    ask: Ask,
    model: &mut dyn Model,
    rec: &mut StepRecord,
) -> Result<String, EngineError> {
    let schema = cx
        .spec
        .tool(tool)
        .map(|t| t.arg.clone())
        .unwrap_or_default();
    Ok(match &schema {
        ArgSchema::None => String::new(),
        ArgSchema::Text { max_chars } => search_query(ask.question, ask.context, *max_chars),
        ArgSchema::Json {
            keys,
            max_value_chars,
        } => {
            // clean_arg leaves no quote, backslash or bracket: the value needs no escaping.
            let v = clean_arg(ask.question, *max_value_chars);
            let key = keys.first().map_or("reason", String::as_str);
            format!("{{\"{key}\": \"{v}\"}}")
        }
        ArgSchema::Choice { values } => {
            let ties = action::top_ties(&action::choice_by_words(cx.kb, ask.question, values));
            let pick = if ties.len() == 1 {
                ties[0]
            } else {
                let s: Vec<f64> = model
                    .label_logprobs(action_prompt, values)?
                    .into_iter()
                    .map(|(l, _)| l)
                    .collect();
                let tied: Vec<f64> = ties.iter().map(|&i| s[i]).collect();
                ground::best(&tied).map_or(0, |b| ties[b])
            };
            values[pick].clone()
        }
        ArgSchema::Expr { .. } => {
            let g = model.generate(
                action_prompt,
                GenMode::Grammar {
                    gbnf: &arg_grammar(&schema),
                    lines: 1,
                },
                cx.spec.max_step_tokens,
                cx.spec.seed,
                cx.deadline,
            )?;
            rec.tokens.generated += g.generated_tokens;
            rec.gen_ms += g.ms;
            g.text.trim_end().trim_end_matches(']').trim().to_string()
        }
    })
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
