//! The `[policy]` section of a ReAct task file: the weights and thresholds of the scored
//! policy (how the action is chosen) and, in `[policy.ground]`, of grounded answers (how
//! the passage and the sentence are chosen). Every key is optional; the defaults are the
//! values chosen on the kiosk dev scenarios (`kb/kiosk-dev*.jsonl`, docs/react.md), so a
//! task file lists only what it changes.
//!
//! ```toml
//! [policy]
//! w_kb = 0.5
//! [policy.ground]
//! min_coverage = 0.25
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SpecError;

/// Weights and thresholds of passage and sentence choice.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroundConfig {
    /// Passage score = w_bm25 * retrieval / best retrieval + w_cover * coverage + w_model *
    /// model, where retrieval is the BM25 score (fused with the cosine of meaning when the
    /// sentence encoder is present; traces: `retrieval`).
    pub w_bm25: f64,
    pub w_cover: f64,
    /// Weight of the model's score (min-max scaled over the candidates); 0: no model call.
    pub w_model: f64,
    /// Weight of a sentence holding the kind of fact the question asks for (a time for
    /// "when", a price for "how much", ...) in sentence choice.
    pub w_kind: f64,
    /// In sentence choice, how much a question term that is also in the passage's title
    /// weighs (it names the passage, not the sentence).
    pub w_title_terms: f64,
    /// A passage covering less of the question's term weight than this is no answer.
    pub min_coverage: f64,
    /// A second sentence joins the answer when its score is within this of the best.
    pub second_margin: f64,
    pub max_answer_chars: usize,
}

impl Default for GroundConfig {
    fn default() -> Self {
        GroundConfig {
            w_bm25: 0.5,
            w_cover: 1.0,
            w_model: 0.0,
            w_kind: 0.5,
            w_title_terms: 0.5,
            min_coverage: 0.25,
            second_margin: 0.5,
            max_answer_chars: 200,
        }
    }
}

/// Options of the scored policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Generate a thought before scoring the actions (else score right after the question).
    pub think: bool,
    /// Subtract each action's score after a content-free question (contextual calibration).
    pub calibrate: bool,
    /// Action score = w_model * model (min-max over the tools; 0, the default chosen on
    /// dev: the action lines are not scored by the model) + w_lex * the question's
    /// coverage by the tool's words (description, choice values, few-shot questions that
    /// start with it) + w_kb * the best passage's coverage (kb_search only) + w_numbers
    /// when an expression tool meets a question with two numbers or more.
    pub w_model: f64,
    pub w_lex: f64,
    pub w_kb: f64,
    pub w_numbers: f64,
    /// How much the knowledge base's coverage of the question discounts the lexical
    /// evidence of a tool other than `kb_search` and `notify` (its words times
    /// `1 - kb_shadow * coverage`): a word the knowledge base explains ("opening times",
    /// "is parking free") is weaker evidence for the clock or the car park sensor.
    /// `notify` is never discounted: an emergency in a place the knowledge base knows
    /// ("a fire in the food court") must still reach staff.
    pub kb_shadow: f64,
    /// A tool that reads the present (clock, sensor) meeting a question that asks about
    /// the present ("now", "today", "currently", "at the moment"): its lexical evidence
    /// counts `1 + w_present` times and is not discounted.
    pub w_present: f64,
    /// Words that describe a tool for the lexical evidence, by tool name, instead of its
    /// `description` (which the model reads in the prompt: a generated loop on a small
    /// model is sensitive to its wording, the lexical evidence wants the situations the
    /// tool is for).
    pub tool_words: BTreeMap<String, String>,
    pub ground: GroundConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            think: false,
            calibrate: false,
            w_model: 0.0,
            w_lex: 1.0,
            w_kb: 0.75,
            w_numbers: 1.0,
            kb_shadow: 1.0,
            w_present: 0.5,
            tool_words: BTreeMap::new(),
            ground: GroundConfig::default(),
        }
    }
}

impl PolicyConfig {
    /// Weights are finite and not negative, shares within 0..=1, lengths at least 1; the
    /// error names the key (`policy.ground.min_coverage`).
    pub fn check(&self, path: &Path) -> Result<(), SpecError> {
        let g = &self.ground;
        let weights = [
            ("policy.w_model", self.w_model),
            ("policy.w_lex", self.w_lex),
            ("policy.w_kb", self.w_kb),
            ("policy.w_numbers", self.w_numbers),
            ("policy.kb_shadow", self.kb_shadow),
            ("policy.w_present", self.w_present),
            ("policy.ground.w_bm25", g.w_bm25),
            ("policy.ground.w_cover", g.w_cover),
            ("policy.ground.w_model", g.w_model),
            ("policy.ground.w_kind", g.w_kind),
            ("policy.ground.w_title_terms", g.w_title_terms),
            ("policy.ground.second_margin", g.second_margin),
        ];
        for (key, v) in weights {
            if !v.is_finite() || v < 0.0 {
                return Err(SpecError::invalid(
                    path,
                    key,
                    format!("{v} is not a finite number >= 0"),
                ));
            }
        }
        if self.kb_shadow > 1.0 {
            return Err(SpecError::invalid(
                path,
                "policy.kb_shadow",
                format!("{} is not a share within 0..=1", self.kb_shadow),
            ));
        }
        if !(0.0..=1.0).contains(&g.min_coverage) {
            return Err(SpecError::invalid(
                path,
                "policy.ground.min_coverage",
                format!("{} is not a share within 0..=1", g.min_coverage),
            ));
        }
        if g.max_answer_chars == 0 {
            return Err(SpecError::invalid(
                path,
                "policy.ground.max_answer_chars",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<PolicyConfig, SpecError> {
        let p: PolicyConfig =
            toml::from_str(src).map_err(|e| SpecError::parse(Path::new("t.toml"), &e))?;
        p.check(Path::new("t.toml"))?;
        Ok(p)
    }

    #[test]
    fn missing_keys_take_the_defaults() {
        assert_eq!(parse("").unwrap(), PolicyConfig::default());
        let p = parse(
            "w_kb = 0.25\n[ground]\nmin_coverage = 0.3\n[tool_words]\nnotify = \"a complaint\"\n",
        )
        .unwrap();
        assert_eq!(p.tool_words["notify"], "a complaint");
        assert_eq!(p.w_kb, 0.25);
        assert_eq!(p.ground.min_coverage, 0.3);
        assert_eq!(p.ground.w_bm25, GroundConfig::default().w_bm25);
        assert_eq!(p.w_lex, PolicyConfig::default().w_lex);
    }

    #[test]
    fn errors_name_the_bad_key() {
        for (src, want) in [
            ("w_foo = 1.0", "w_foo"),
            ("[ground]\nw_bar = 1.0", "w_bar"),
            ("w_kb = -1.0", "policy.w_kb"),
            ("kb_shadow = 1.5", "policy.kb_shadow"),
            ("[ground]\nmin_coverage = 1.5", "policy.ground.min_coverage"),
            (
                "[ground]\nmax_answer_chars = 0",
                "policy.ground.max_answer_chars",
            ),
            ("think = 3", "think"),
        ] {
            let e = parse(src).unwrap_err().to_string();
            assert!(e.contains(want), "want {want} in: {e}");
        }
    }
}
