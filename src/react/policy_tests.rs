use super::*;
use crate::react::generator::GenStep;
use crate::react::tools::Toolbox;
use crate::spec::react::tests_support::{spec, SPEC};
use std::path::Path;

/// The unit task with notify allowed too.
fn spec_with_notify() -> ReactSpec {
    let src = SPEC.replace(
        "  { name = \"clock\"",
        "  { name = \"notify\", description = \"call staff\", arg = { kind = \"json\", keys = [\"reason\"], max_value_chars = 80 } },\n  { name = \"clock\"",
    );
    ReactSpec::parse(&src, Path::new("tasks/unit.toml"), "unit").unwrap()
}

/// A fake model: thoughts are fixed, and each label scores by the first rule whose word
/// the prompt's last question contains.
struct Fake {
    prefer: Vec<(&'static str, &'static str)>,
    generated: Vec<String>,
    /// Scoring calls.
    scored: usize,
}

impl StepGenerator for Fake {
    fn generate(
        &mut self,
        prompt: &str,
        _mode: GenMode<'_>,
        _max_tokens: usize,
        _seed: u64,
        _deadline: Instant,
    ) -> Result<GenStep, EngineError> {
        let text = if prompt.ends_with("calculator[") {
            "3 * 1.50]\n"
        } else {
            " I look it up.\n"
        };
        self.generated.push(text.to_string());
        Ok(GenStep {
            text: text.into(),
            generated_tokens: 4,
            prompt_tokens: 10,
            reused_tokens: 0,
            ms: 1.0,
            prefill_ms: 0.5,
            end: GenEnd::Complete,
        })
    }

    fn count_tokens(&mut self, text: &str) -> usize {
        text.split_whitespace().count()
    }
}

impl TextScorer for Fake {
    fn continuation_logprobs(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        self.scored += 1;
        Ok(pairs
            .iter()
            .map(|(prompt, cont)| {
                let q = prompt
                    .rsplit("Question: ")
                    .next()
                    .unwrap_or("")
                    .to_lowercase();
                let hit = self
                    .prefer
                    .iter()
                    .any(|(word, label)| q.contains(word) && cont.contains(label));
                (if hit { -1.0 } else { -5.0 }, 3)
            })
            .collect())
    }
}

#[test]
fn arguments_come_from_the_question_and_fit_their_schemas() {
    assert_eq!(clean_arg("a [b] \"c\"\\ d", 60), "a b c d");
    assert_eq!(clean_arg("one two three", 8), "one two");
    assert_eq!(
        search_query("and on Saturday?", Some("When do you open on Sunday?"), 60),
        "and on Saturday When do you open on Sunday"
    );
    let s = spec();
    let labels = action_labels(&s);
    assert!(labels.iter().any(|(_, l)| l == "Action: kb_search["));
    assert!(labels
        .iter()
        .all(|(t, l)| l.starts_with(&format!("Action: {t}["))));
    assert_eq!(
        tool_answer(ToolName::Calculator, "4.5\n"),
        "That makes 4.5."
    );
}

#[test]
fn the_best_scored_action_runs_and_the_answer_is_selected() {
    let s = spec_with_notify();
    let mut fake = Fake {
        prefer: vec![("lost", "notify["), ("cost", "calculator[")],
        generated: Vec::new(),
        scored: 0,
    };
    let cfg = PolicyConfig {
        calibrate: false,
        w_model: 1.0,
        ..Default::default()
    };
    let sink = tempfile::NamedTempFile::new().unwrap();
    let mut s2 = s.clone();
    s2.notify.sink = sink.path().display().to_string();
    let mut tools = Toolbox::new(&s2, None);
    let t = run(
        &s2,
        None,
        "My child is lost!",
        &[],
        &mut fake,
        &mut tools,
        &cfg,
    )
    .unwrap();
    assert_eq!(t.first_tool(), Some("notify"), "{t:#?}");
    let arg = t.steps[0].arg.clone().unwrap();
    assert!(
        arg.starts_with("{\"") && arg.contains("My child is lost!"),
        "{arg}"
    );
    assert!(t.finished && t.answer.contains("staff"), "{t:#?}");
    assert_eq!(tools.notifications, 1);
    let mut tools = Toolbox::new(&s2, None);
    let t = run(
        &s2,
        None,
        "What does 3 times 1.50 cost?",
        &[],
        &mut fake,
        &mut tools,
        &cfg,
    )
    .unwrap();
    assert_eq!(t.first_tool(), Some("calculator"), "{t:#?}");
    assert_eq!(t.steps[0].arg.as_deref(), Some("3 * 1.50"));
    assert_eq!(t.answer, "That makes 4.5.");
}

#[test]
fn a_follow_up_carries_the_last_question_and_its_passage() {
    let history = vec![Turn {
        question: "How late are you open on Sunday?".into(),
        answer: "Open until 16:00. [hours-sunday]".into(),
    }];
    let c = follow_up_context(None, &history, "and on Saturday?").unwrap();
    assert!(c.contains("Sunday"), "{c}");
    assert_eq!(
        follow_up_context(None, &history, "Where are the toilets in this hall?"),
        None
    );
    assert_eq!(follow_up_context(None, &[], "and on Saturday?"), None);
}

#[test]
fn without_a_model_weight_the_action_lines_are_not_scored() {
    let s = spec_with_notify();
    let mut fake = Fake {
        prefer: vec![("lost", "notify[")],
        generated: Vec::new(),
        scored: 0,
    };
    let cfg = PolicyConfig::default();
    assert_eq!(cfg.w_model, 0.0);
    let sink = tempfile::NamedTempFile::new().unwrap();
    let mut s2 = s.clone();
    s2.notify.sink = sink.path().display().to_string();
    let mut tools = Toolbox::new(&s2, None);
    let t = run(
        &s2,
        None,
        "What time is it?",
        &[],
        &mut fake,
        &mut tools,
        &cfg,
    )
    .unwrap();
    assert_eq!(fake.scored, 0, "{t:#?}");
}
