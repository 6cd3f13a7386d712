//! `qa`: retrieve from the knowledge base, then the answer: by default selected from the
//! retrieved passages ([`answer`], see [`super::ground`]: re-ranked, a sentence copied, the
//! id cited, or "not found" when nothing is good enough); for larger models one
//! grammar-constrained generation that must cite a retrieved id ([`answer_generated`]).
//! No loop: cheaper than ReAct when every question is a lookup.

use std::time::Instant;

use super::generator::{GenEnd, GenMode, StepGenerator};
use super::grammar::qa_grammar;
use super::ground::{self, Candidate, GroundConfig, Query, TextScorer};
use super::kb::{Hit, Kb};
use super::tools::cut_chars;
use crate::model::EngineError;
use crate::spec::react::{QaSpec, ReactSpec};

/// A retrieved passage as the result lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Retrieved {
    pub id: String,
    pub score: f32,
}

/// The retrieved passages as the result lists them, best first.
fn retrieved(kb: &Kb, hits: &[Hit]) -> Vec<Retrieved> {
    hits.iter()
        .map(|h| Retrieved {
            id: kb.passages[h.index].id.clone(),
            score: h.score,
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QaResult {
    pub task: String,
    pub question: String,
    pub answer: String,
    /// The passage id the answer cites (always one of `passages` when `finished`).
    pub cited: Option<String>,
    pub finished: bool,
    pub passages: Vec<Retrieved>,
    pub seed: u64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub retrieve_ms: f64,
    pub generate_ms: f64,
    /// Grounded answers: each retrieved passage's features and fused score.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
}

/// The answer when nothing in the knowledge base matches the question.
pub const NOTHING_FOUND: &str = "I could not find this in the knowledge base.";

fn passages_block(kb: &Kb, ids: &[String], max_chars: usize) -> String {
    let mut out = String::from("Passages:\n");
    for id in ids {
        if let Some(p) = kb.get(id) {
            out.push_str(&format!(
                "[{}] {}\n",
                p.id,
                cut_chars(&p.one_line(), max_chars)
            ));
        }
    }
    out
}

/// The fixed beginning: instruction and examples (their passages looked up in `kb`;
/// unknown ids are skipped).
pub fn render_prefix(qa: &QaSpec, kb: &Kb, max_chars: usize) -> String {
    let mut out = format!("{}\n\n", qa.instruction.trim_end());
    for ex in &qa.examples {
        out.push_str(&passages_block(kb, &ex.passages, max_chars));
        out.push_str(&format!(
            "Question: {}\nAnswer: {} [{}]\n\n",
            ex.question.trim(),
            ex.answer.trim(),
            ex.cite
        ));
    }
    out
}

/// The prefix, then the retrieved passages and the question, ending with `Answer:`.
pub fn render_prompt(
    qa: &QaSpec,
    kb: &Kb,
    ids: &[String],
    question: &str,
    max_chars: usize,
) -> String {
    let mut out = render_prefix(qa, kb, max_chars);
    out.push_str(&passages_block(kb, ids, max_chars));
    let q: Vec<&str> = question.split_whitespace().collect();
    out.push_str(&format!("Question: {}\nAnswer:", q.join(" ")));
    out
}

/// Splits ` text [id]\n` into the text and the id.
pub fn parse_answer(text: &str) -> Option<(String, String)> {
    let t = text.trim_end_matches('\n');
    let open = t.rfind(" [")?;
    let id = t[open + 2..].strip_suffix(']')?;
    Some((t[..open].trim().to_string(), id.to_string()))
}

/// Retrieves `qa.top_k` passages (for a follow-up, with the earlier question `context`
/// after its words) and selects the cited answer from them.
pub fn answer(
    spec: &ReactSpec,
    qa: &QaSpec,
    kb: &Kb,
    question: &str,
    context: Option<&str>,
    scorer: &mut dyn TextScorer,
    cfg: &GroundConfig,
) -> Result<QaResult, EngineError> {
    let t0 = Instant::now();
    let query = match context {
        Some(c) => format!("{question} {c}"),
        None => question.to_string(),
    };
    let hits = kb.search(&query, qa.top_k);
    let pairs: Vec<(String, f64)> = hits
        .iter()
        .map(|h| (kb.passages[h.index].id.clone(), h.score as f64))
        .collect();
    let retrieve_ms = t0.elapsed().as_secs_f64() * 1e3;
    let cfg = GroundConfig {
        max_answer_chars: qa.max_answer_chars,
        ..*cfg
    };
    let g = ground::select(kb, Query { question, context }, &pairs, Some(scorer), &cfg)?;
    Ok(QaResult {
        task: spec.name.clone(),
        question: question.to_string(),
        answer: g.answer,
        cited: g.cited,
        finished: true,
        passages: retrieved(kb, &hits),
        seed: spec.seed,
        prompt_tokens: 0,
        generated_tokens: 0,
        retrieve_ms,
        generate_ms: t0.elapsed().as_secs_f64() * 1e3 - retrieve_ms,
        candidates: g.candidates,
    })
}

/// Retrieves `qa.top_k` passages and generates the cited answer under the citation
/// grammar (for models large enough to write it).
pub fn answer_generated(
    spec: &ReactSpec,
    qa: &QaSpec,
    kb: &Kb,
    question: &str,
    gen: &mut dyn StepGenerator,
) -> Result<QaResult, EngineError> {
    let t0 = Instant::now();
    let max_chars = spec.kb.as_ref().map_or(220, |k| k.max_passage_chars);
    let hits = kb.search(question, qa.top_k);
    let ids: Vec<String> = hits
        .iter()
        .map(|h| kb.passages[h.index].id.clone())
        .collect();
    let mut res = QaResult {
        task: spec.name.clone(),
        question: question.to_string(),
        answer: NOTHING_FOUND.into(),
        cited: None,
        finished: true,
        passages: retrieved(kb, &hits),
        seed: spec.seed,
        prompt_tokens: 0,
        generated_tokens: 0,
        retrieve_ms: t0.elapsed().as_secs_f64() * 1e3,
        generate_ms: 0.0,
        candidates: Vec::new(),
    };
    if ids.is_empty() {
        return Ok(res);
    }
    let prompt = render_prompt(qa, kb, &ids, question, max_chars);
    let grammar = qa_grammar(&ids, qa.max_answer_chars);
    let deadline = t0 + std::time::Duration::from_millis(spec.timeout_ms);
    let g = gen.generate(
        &prompt,
        GenMode::Grammar {
            gbnf: &grammar,
            lines: 1,
        },
        qa.max_tokens,
        spec.seed,
        deadline,
    )?;
    res.prompt_tokens = g.prompt_tokens;
    res.generated_tokens = g.generated_tokens;
    res.generate_ms = g.ms;
    match (g.end, parse_answer(&g.text)) {
        (GenEnd::Complete, Some((text, id))) => {
            res.answer = text;
            res.cited = Some(id);
        }
        _ => {
            // Cut by the token budget or the deadline: the best partial answer is the
            // text so far, else the top passage.
            res.finished = false;
            let partial = g.text.trim().to_string();
            res.answer = if partial.is_empty() {
                kb.get(&ids[0]).map(|p| p.one_line()).unwrap_or_default()
            } else {
                partial
            };
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_split_into_text_and_citation() {
        assert_eq!(
            parse_answer(" We open at 10:00 on Sundays. [hours-sunday]\n"),
            Some((
                "We open at 10:00 on Sundays.".to_string(),
                "hours-sunday".to_string()
            ))
        );
        assert_eq!(parse_answer(" no citation\n"), None);
    }
}
