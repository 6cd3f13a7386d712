//! The scenario file (JSON lines: a question with the expected tool, passage id and fact)
//! and the metrics of `edgeact react-eval`: retrieval hit rate@k, tool choice, passage
//! retrieved and cited, fact in the answer, unparsable steps, stop reasons, steps, tokens
//! and seconds per answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::kb::Kb;
use super::trace::{StopReason, Trace};
use crate::util::jsonl::JsonLines;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenarios {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenarios {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub id: String,
    pub question: String,
    /// The tool a good first step calls (`kb_search`, `notify`, `calculator`, `clock`).
    pub expect_tool: String,
    /// The passage that answers it, when the knowledge base does.
    #[serde(default)]
    pub expect_passage: Option<String>,
    /// A fact the answer should contain (case-insensitive).
    #[serde(default)]
    pub expect_fact: Option<String>,
}

/// Reads the scenario file; with `kb`, every expected passage id must exist in it.
pub fn load(path: &Path, kb: Option<&Kb>) -> Result<Vec<Scenario>, ScenarioError> {
    let io_err = |source| ScenarioError::Io {
        path: path.into(),
        source,
    };
    let mut lines = JsonLines::open(path).map_err(io_err)?;
    let mut out: Vec<Scenario> = Vec::new();
    while let Some((n, line)) = lines.next_line().map_err(io_err)? {
        let err = |reason: String| ScenarioError::Line {
            path: path.into(),
            line: n,
            reason,
        };
        let s: Scenario = serde_json::from_slice(line).map_err(|e| err(e.to_string()))?;
        if out.iter().any(|o| o.id == s.id) {
            return Err(err(format!("id `{}` repeats", s.id)));
        }
        if crate::spec::tool::ToolName::parse(&s.expect_tool).is_none() {
            return Err(err(format!("`{}` is not a tool", s.expect_tool)));
        }
        if let (Some(kb), Some(p)) = (kb, &s.expect_passage) {
            if kb.get(p).is_none() {
                return Err(err(format!("passage `{p}` is not in the knowledge base")));
            }
        }
        out.push(s);
    }
    Ok(out)
}

/// Share of scenarios with an expected passage whose passage BM25 ranks in the top `k` for
/// the question itself (the retriever alone, no model).
pub fn retrieval_hit_rate(kb: &Kb, scenarios: &[Scenario], k: usize) -> (usize, usize) {
    let mut hits = 0;
    let mut n = 0;
    for s in scenarios {
        if let Some(p) = &s.expect_passage {
            n += 1;
            if kb
                .search(&s.question, k)
                .iter()
                .any(|h| &kb.passages[h.index].id == p)
            {
                hits += 1;
            }
        }
    }
    (hits, n)
}

/// A count out of a total.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Rate {
    pub hits: usize,
    pub n: usize,
}

impl Rate {
    pub fn add(&mut self, hit: bool) {
        self.n += 1;
        self.hits += usize::from(hit);
    }

    pub fn value(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.hits as f64 / self.n as f64
        }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} ({}/{})", self.value(), self.hits, self.n)
    }
}

/// What a run over the scenarios measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoopMetrics {
    pub runs: usize,
    pub tool_choice: Rate,
    pub passage_retrieved: Rate,
    pub passage_cited: Rate,
    pub fact_in_answer: Rate,
    /// Knowledge-base questions the knowledge base cannot answer (`kb_search`, no expected
    /// passage) whose answer cites nothing: said so and offered staff, no guess.
    pub refused_unanswerable: Rate,
    /// Knowledge-base questions it can answer whose answer cites nothing: the other side
    /// of the "not found" threshold.
    pub refused_answerable: Rate,
    pub finished: Rate,
    pub steps: usize,
    pub unparsable_steps: usize,
    pub runs_with_unparsable: usize,
    pub refused_calls: usize,
    pub stop_reasons: BTreeMap<String, usize>,
    pub mean_steps: f64,
    pub mean_generated_tokens: f64,
    pub mean_seconds: f64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    /// Answers citing an id that no search of the run returned (must be 0).
    pub cited_not_retrieved: usize,
    /// Numbers, times and prices in answers that do not occur in the cited passage (must
    /// be 0).
    pub ungrounded_numbers: usize,
}

/// The passage ids an answer cites: every `[id]` in it.
pub fn cited_ids(answer: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let id = &after[..close];
        if !id.is_empty() && !id.contains(' ') {
            out.push(id.to_string());
        }
        rest = &after[close + 1..];
    }
    out
}

/// A trace's grounding faults: cited ids not retrieved by the run, and numbers of the
/// answer absent from every passage it cites (ids the knowledge base lacks count as not
/// retrieved too).
pub fn grounding_faults(kb: &Kb, t: &Trace) -> (usize, usize) {
    let retrieved = t.retrieved_ids();
    let cited = cited_ids(&t.answer);
    let not_retrieved = cited
        .iter()
        .filter(|c| !retrieved.contains(&c.as_str()) || kb.get(c).is_none())
        .count();
    let mut text = String::new();
    for c in &cited {
        if let Some(p) = kb.get(c) {
            text.push_str(&p.text);
            text.push(' ');
        }
    }
    let ungrounded = if cited.is_empty() {
        0
    } else {
        super::ground::ungrounded_numbers(&t.answer, &text).len()
    };
    (not_retrieved, ungrounded)
}

/// Scores each trace against its scenario (grounding faults too, given the knowledge base).
pub fn score(pairs: &[(&Scenario, &Trace)], kb: Option<&Kb>) -> LoopMetrics {
    let mut m = LoopMetrics::default();
    let mut tokens = 0usize;
    let mut ms = 0.0;
    let mut secs = Vec::new();
    for (s, t) in pairs {
        if let Some(kb) = kb {
            let (a, b) = grounding_faults(kb, t);
            m.cited_not_retrieved += a;
            m.ungrounded_numbers += b;
        }
        secs.push(t.total_ms / 1e3);
        m.runs += 1;
        m.tool_choice
            .add(t.first_tool() == Some(s.expect_tool.as_str()));
        if let Some(p) = &s.expect_passage {
            m.passage_retrieved
                .add(t.retrieved_ids().contains(&p.as_str()));
            m.passage_cited
                .add(t.finished && t.answer.contains(p.as_str()));
        }
        if let Some(f) = &s.expect_fact {
            m.fact_in_answer
                .add(t.answer.to_lowercase().contains(&f.to_lowercase()));
        }
        if s.expect_tool == "kb_search" {
            let refused = cited_ids(&t.answer).is_empty();
            match s.expect_passage {
                Some(_) => m.refused_answerable.add(refused),
                None => m.refused_unanswerable.add(refused),
            }
        }
        m.finished.add(t.stop_reason == StopReason::Final);
        m.steps += t.steps.len();
        m.unparsable_steps += t.unparsable_steps;
        m.runs_with_unparsable += usize::from(t.unparsable_steps > 0);
        m.refused_calls += t.refused_calls;
        *m.stop_reasons
            .entry(t.stop_reason.as_str().to_string())
            .or_default() += 1;
        tokens += t.generated_tokens;
        ms += t.total_ms;
    }
    let n = m.runs.max(1) as f64;
    m.mean_steps = m.steps as f64 / n;
    m.mean_generated_tokens = tokens as f64 / n;
    m.mean_seconds = ms / 1e3 / n;
    secs.sort_by(f64::total_cmp);
    m.p50_seconds = crate::util::stats::percentile(&secs, 50);
    m.p99_seconds = crate::util::stats::percentile(&secs, 99);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::kb::Passage;
    use crate::react::trace::StepRecord;

    fn trace(tool: Option<&str>, ids: &[&str], answer: &str, stop: StopReason) -> Trace {
        Trace {
            task: "t".into(),
            question: "q".into(),
            answer: answer.into(),
            finished: stop == StopReason::Final,
            stop_reason: stop,
            seed: 1,
            grammar: true,
            steps: vec![StepRecord {
                tool: tool.map(String::from),
                passage_ids: ids.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            generated_tokens: 10,
            unparsable_steps: 0,
            refused_calls: 0,
            tool_errors: 0,
            dropped_observations: 0,
            history_turns: 0,
            dropped_turns: 0,
            total_ms: 500.0,
        }
    }

    fn scenario(tool: &str, passage: Option<&str>, fact: Option<&str>) -> Scenario {
        Scenario {
            id: "s".into(),
            question: "q".into(),
            expect_tool: tool.into(),
            expect_passage: passage.map(String::from),
            expect_fact: fact.map(String::from),
        }
    }

    #[test]
    fn metrics_count_what_matched() {
        let s1 = scenario("kb_search", Some("hours"), Some("18:00"));
        let s2 = scenario("notify", None, None);
        let t1 = trace(
            Some("kb_search"),
            &["hours", "x"],
            "We close at 18:00 [hours]",
            StopReason::Final,
        );
        let t2 = trace(Some("kb_search"), &[], "", StopReason::MaxSteps);
        let m = score(&[(&s1, &t1), (&s2, &t2)], None);
        assert_eq!((m.tool_choice.hits, m.tool_choice.n), (1, 2));
        assert_eq!((m.passage_retrieved.hits, m.passage_retrieved.n), (1, 1));
        assert_eq!((m.passage_cited.hits, m.passage_cited.n), (1, 1));
        assert_eq!((m.fact_in_answer.hits, m.fact_in_answer.n), (1, 1));
        assert_eq!(m.stop_reasons["final"], 1);
        assert_eq!(m.stop_reasons["max_steps"], 1);
        assert!((m.mean_seconds - 0.5).abs() < 1e-9);
    }

    #[test]
    fn not_found_answers_are_counted_by_whether_the_question_had_an_answer() {
        let unanswerable = scenario("kb_search", None, None);
        let answerable = scenario("kb_search", Some("hours"), None);
        let not_found = trace(
            Some("kb_search"),
            &["hours"],
            crate::react::ground::NOT_FOUND,
            StopReason::Final,
        );
        let guess = trace(
            Some("kb_search"),
            &["hours"],
            "At 18:00 [hours]",
            StopReason::Final,
        );
        let m = score(
            &[
                (&unanswerable, &not_found),
                (&unanswerable, &guess),
                (&answerable, &not_found),
            ],
            None,
        );
        assert_eq!(
            (m.refused_unanswerable.hits, m.refused_unanswerable.n),
            (1, 2)
        );
        assert_eq!((m.refused_answerable.hits, m.refused_answerable.n), (1, 1));
    }

    #[test]
    fn scenario_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.jsonl");
        let kb = Kb::from_passages(
            Path::new("kb"),
            vec![Passage {
                id: "hours".into(),
                title: "Hours".into(),
                text: "We close at 18:00.".into(),
                source: "h.md".into(),
            }],
        )
        .unwrap();
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"question\":\"when do you close\",\"expect_tool\":\"kb_search\",\"expect_passage\":\"hours\"}\n",
        )
        .unwrap();
        let s = load(&p, Some(&kb)).unwrap();
        assert_eq!(retrieval_hit_rate(&kb, &s, 1), (1, 1));
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"question\":\"q\",\"expect_tool\":\"kb_search\",\"expect_passage\":\"nope\"}\n",
        )
        .unwrap();
        let e = load(&p, Some(&kb)).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("nope"), "{e}");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"question\":\"q\",\"expect_tool\":\"shell\"}\n",
        )
        .unwrap();
        assert!(load(&p, None).unwrap_err().to_string().contains("shell"));
    }
}
