//! Which tool: the evidence for each allowed action of the scored policy, as plain
//! functions (no model). Each action gets the model's score (optional), the question's
//! coverage by the tool's own words, and for `kb_search` how well the knowledge base
//! covers the question. The knowledge base's coverage is also evidence *against* the tools
//! that answer from elsewhere: "sunday opening times?" shares "time" with the clock, but
//! the knowledge base explains the question, so the clock needs more than one shared word
//! (the question asking about the present: "now", "today"). A choice argument (the sensor's
//! value) is chosen by its words too, the model only breaking ties.

use super::ground;
use super::kb::Kb;
use crate::spec::policy::PolicyConfig;
use crate::spec::react::ReactSpec;
use crate::spec::step::split_trajectory;
use crate::spec::tool::{ArgSchema, ToolName};

/// The action line scored for each allowed tool: `Action: name[`, the same shape for every
/// tool (a closing `]` for tools without an argument would add a token only they pay for,
/// and the model then never chose them).
pub fn action_labels(spec: &ReactSpec) -> Vec<(ToolName, String)> {
    spec.tools
        .iter()
        .map(|t| (t.name, format!("Action: {}[", t.name)))
        .collect()
}

/// What calling staff is for, whatever the kiosk: added to the `notify` tool's own
/// description when the task gives no `[policy.tool_words] notify`, so that an emergency
/// calls staff even where the description only says "call a member of staff".
pub const NOTIFY_WORDS: &str = "an emergency: fire, smoke, an accident, someone hurt, injured, \
     bleeding, ill, fainted, collapsed or unconscious, a lost child, a fight or a theft; a \
     complaint, or a customer who wants to speak to a person or a manager";

/// The words that describe a tool: its description (or its `[policy.tool_words]`), its
/// choice values, the sentences of the instruction that name it, and the few-shot questions
/// whose first action calls it.
pub fn tool_words(spec: &ReactSpec, tool: ToolName) -> String {
    let mut out = String::new();
    for sentence in ground::split_sentences(&spec.instruction) {
        if sentence.contains(tool.as_str()) {
            out.push_str(&sentence);
            out.push(' ');
        }
    }
    if let Some(t) = spec.tool(tool) {
        match spec.policy.tool_words.get(tool.as_str()) {
            Some(words) => out.push_str(words),
            None => {
                out.push_str(&t.description);
                if tool == ToolName::Notify {
                    out.push(' ');
                    out.push_str(NOTIFY_WORDS);
                }
            }
        }
        if let ArgSchema::Choice { values } = &t.arg {
            for v in values {
                out.push(' ');
                out.push_str(&v.replace('_', " "));
            }
        }
    }
    let call = format!("Action: {tool}[");
    for ex in &spec.examples {
        let first = split_trajectory(&ex.steps)
            .unwrap_or_default()
            .into_iter()
            .next();
        if first.is_some_and(|(step, _)| step.contains(&call)) {
            out.push(' ');
            out.push_str(&ex.question);
        }
    }
    out
}

/// Phrases by which a question asks about the present moment (general English, not one
/// knowledge base's): what only a live reading answers.
const PRESENT_MARKERS: [&[&str]; 6] = [
    &["now"],
    &["today"],
    &["currently"],
    &["current"],
    &["at", "the", "moment"],
    &["at", "present"],
];

/// Whether `question` asks about the present moment ("what's the time now", "what day is
/// it today", "how many spaces are free right now").
pub fn asks_present(question: &str) -> bool {
    let w = ground::words_lower(question);
    PRESENT_MARKERS
        .iter()
        .any(|m| w.windows(m.len()).any(|win| win == *m))
}

/// Tools whose answer is a reading of the present (the clock, a sensor), not a fact that
/// holds any day.
pub fn reads_present(tool: ToolName) -> bool {
    matches!(tool, ToolName::Clock | ToolName::Sensor)
}

/// Tools whose lexical evidence the knowledge base's coverage discounts: all but
/// `kb_search` itself and `notify` (staff must come for an emergency in a place the
/// knowledge base knows).
fn shadowed(tool: ToolName) -> bool {
    !matches!(tool, ToolName::KbSearch | ToolName::Notify)
}

/// The evidence for one allowed action, each in 0..=1: the model's score (min-max over the
/// tools), the question's coverage by the tool's words, the best retrieved passage's
/// coverage (`kb` for kb_search; `shadow` for the tools it discounts), whether a tool that
/// reads the present meets a question about the present, and whether an expression tool
/// meets two numbers or more.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ActionFeatures {
    pub model: f64,
    pub lex: f64,
    pub kb: f64,
    pub shadow: f64,
    pub present: f64,
    pub numbers: f64,
}

impl ActionFeatures {
    /// The fused score (weights in `cfg`): the tool's words count `1 + w_present` times
    /// for a question about the present, else `1 - kb_shadow * shadow` times.
    pub fn score(&self, cfg: &PolicyConfig) -> f64 {
        let lex_factor = if self.present > 0.0 {
            1.0 + cfg.w_present
        } else {
            1.0 - cfg.kb_shadow * self.shadow
        };
        cfg.w_model * self.model
            + cfg.w_lex * self.lex * lex_factor
            + cfg.w_kb * self.kb
            + cfg.w_numbers * self.numbers
    }
}

/// How well the knowledge base covers `question`: the best coverage of its term weight by
/// one of the three best passages (title and text); with the sentence encoder, the best
/// of that and the semantic match ([`super::semantic::kb_match`]); 0 without a knowledge
/// base.
pub fn kb_coverage(kb: &Kb, question: &str) -> f64 {
    let q = ground::weighted_terms(kb, question, None, 0.0);
    let words = kb
        .search(question, 3)
        .iter()
        .map(|h| {
            let p = &kb.passages[h.index];
            ground::coverage(&q, &kb.terms(&format!("{} {}", p.title, p.text)))
        })
        .fold(0.0, f64::max);
    match (kb.semantic(), kb.cosines(question)) {
        (Some(sem), Some(c)) => words.max(super::semantic::kb_match(&c, &sem.cfg)),
        _ => words,
    }
}

/// Each allowed action's evidence, in the order of [`action_labels`].
pub fn action_features(
    spec: &ReactSpec,
    kb: Option<&Kb>,
    question: &str,
    model: &[f64],
) -> Vec<ActionFeatures> {
    let model = ground::min_max(model);
    let n_numbers = ground::numbers(question).len();
    let q_terms = kb.map(|k| ground::weighted_terms(k, question, None, 0.0));
    let kb_cover = kb.map_or(0.0, |k| kb_coverage(k, question));
    let present = asks_present(question);
    action_labels(spec)
        .iter()
        .zip(model)
        .map(|((tool, _), m)| {
            let lex = match (kb, &q_terms) {
                (Some(k), Some(q)) => ground::coverage(q, &k.terms(&tool_words(spec, *tool))),
                _ => 0.0,
            };
            let schema = spec.tool(*tool).map(|t| &t.arg);
            let numbers = matches!(schema, Some(ArgSchema::Expr { .. })) && n_numbers >= 2;
            let is_kb = *tool == ToolName::KbSearch;
            ActionFeatures {
                model: m,
                lex,
                kb: if is_kb { kb_cover } else { 0.0 },
                shadow: if shadowed(*tool) { kb_cover } else { 0.0 },
                present: f64::from(u8::from(present && reads_present(*tool))),
                numbers: f64::from(u8::from(numbers)),
            }
        })
        .collect()
}

/// Fuses each allowed action's evidence into one score (weights in `cfg`).
pub fn fuse_actions(
    spec: &ReactSpec,
    kb: Option<&Kb>,
    question: &str,
    model: &[f64],
    cfg: &PolicyConfig,
) -> Vec<f64> {
    action_features(spec, kb, question, model)
        .iter()
        .map(|f| f.score(cfg))
        .collect()
}

/// The choice, explained for the trace: each action's fused score and its evidence.
pub fn explain(labels: &[(ToolName, String)], scores: &[f64], feats: &[ActionFeatures]) -> String {
    let shown: Vec<String> = labels
        .iter()
        .zip(scores)
        .zip(feats)
        .map(|(((t, _), s), f)| {
            format!(
                "{t} {s:.2} (model {:.3} lex {:.3} kb {:.3} shadow {:.3} present {} numbers {})",
                f.model, f.lex, f.kb, f.shadow, f.present, f.numbers
            )
        })
        .collect();
    format!("action scores: {}", shown.join(", "))
}

/// Each choice value's lexical evidence: the question's coverage by the value's words
/// (`outside_temperature` is "outside temperature"), all 0 without a knowledge base (whose
/// term weights it uses).
pub fn choice_by_words(kb: Option<&Kb>, question: &str, values: &[String]) -> Vec<f64> {
    let Some(kb) = kb else {
        return vec![0.0; values.len()];
    };
    let q = ground::weighted_terms(kb, question, None, 0.0);
    values
        .iter()
        .map(|v| ground::coverage(&q, &kb.terms(&v.replace('_', " "))))
        .collect()
}

/// The indices that share the best score (all of them when every score is equal): one
/// index when the words decide, several when the model must break the tie.
pub fn top_ties(scores: &[f64]) -> Vec<usize> {
    let best = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (0..scores.len())
        .filter(|&i| (best - scores[i]).abs() < 1e-9)
        .collect()
}

#[cfg(test)]
#[path = "action_tests.rs"]
mod tests;
