//! ReAct task files (`type = "react"`): instruction, allow-listed tools with their argument
//! schemas, few-shot trajectories, step/token/time budgets, seed, and the `[qa]` section of
//! the single retrieve-then-answer mode; validated at load with errors naming the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::policy::PolicyConfig;
use super::step::{self, StepAction};
use super::tool::{ArgSchema, ToolName};
use super::SpecError;
// The sniffer lives with the one loader (`super::file`); re-exported for callers that
// still ask this module.
pub use super::file::is_react_file;

/// A tool the task allows, as the task file declares it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    pub name: ToolName,
    /// One line shown to the model.
    pub description: String,
    /// What the argument between the brackets may be.
    #[serde(default)]
    pub arg: ArgSchema,
}

/// A few-shot trajectory: a question and the steps that answer it, as the model should
/// write them (`Thought:` / `Action:` / `Observation:` lines ending with `Final Answer:`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Trajectory {
    pub question: String,
    pub steps: String,
}

/// A retrieve-then-answer example for `[qa]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QaExample {
    pub question: String,
    /// Passage ids (from the knowledge base) shown with the question.
    pub passages: Vec<String>,
    /// The answer without its citation.
    pub answer: String,
    /// The cited passage id.
    pub cite: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QaSpec {
    pub instruction: String,
    #[serde(default = "default_qa_top_k")]
    pub top_k: usize,
    #[serde(default = "default_answer_chars")]
    pub max_answer_chars: usize,
    #[serde(default = "default_qa_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub examples: Vec<QaExample>,
}

fn default_qa_top_k() -> usize {
    3
}
fn default_qa_tokens() -> usize {
    80
}

/// `[kb_search]`: the knowledge base and how much of it one call returns.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KbConfig {
    /// Folder of `.md` and `.jsonl` files; relative paths are from the task file's folder.
    pub dir: PathBuf,
    #[serde(default = "default_kb_top_k")]
    pub top_k: usize,
    /// Characters of each passage shown.
    #[serde(default = "default_passage_chars")]
    pub max_passage_chars: usize,
}

fn default_kb_top_k() -> usize {
    2
}
fn default_passage_chars() -> usize {
    220
}

/// `[sensor]`: in CLI mode each sensor is a file `<dir>/<name>` holding its latest value.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    pub dir: PathBuf,
}

/// `[notify]`: where notifications go and how often.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// `stderr`, or a file that gets one JSON line per notification.
    #[serde(default = "default_sink")]
    pub sink: String,
    /// Least time between two notifications; a call sooner is refused (an observation).
    #[serde(default = "default_notify_interval_ms")]
    pub min_interval_ms: u64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            sink: default_sink(),
            min_interval_ms: default_notify_interval_ms(),
        }
    }
}

fn default_sink() -> String {
    "stderr".into()
}
fn default_notify_interval_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(default)]
    description: String,
    instruction: String,
    tools: Vec<ToolSpec>,
    #[serde(default)]
    examples: Vec<Trajectory>,
    #[serde(default = "default_max_steps")]
    max_steps: usize,
    #[serde(default = "default_step_tokens")]
    max_step_tokens: usize,
    #[serde(default = "default_total_tokens")]
    max_total_tokens: usize,
    #[serde(default = "default_context_tokens")]
    max_context_tokens: usize,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "default_thought_chars")]
    max_thought_chars: usize,
    #[serde(default = "default_answer_chars")]
    max_answer_chars: usize,
    #[serde(default = "default_observation_chars")]
    max_observation_chars: usize,
    #[serde(default = "default_tool_timeout_ms")]
    tool_timeout_ms: u64,
    #[serde(default = "default_max_tool_errors")]
    max_tool_errors: usize,
    #[serde(default = "default_history_tokens")]
    history_max_tokens: usize,
    #[serde(default)]
    utc_offset_minutes: i32,
    kb_search: Option<KbConfig>,
    sensor: Option<SensorConfig>,
    #[serde(default)]
    notify: NotifyConfig,
    qa: Option<QaSpec>,
    #[serde(default)]
    policy: PolicyConfig,
}

fn default_max_steps() -> usize {
    4
}
fn default_step_tokens() -> usize {
    96
}
fn default_total_tokens() -> usize {
    384
}
fn default_context_tokens() -> usize {
    1536
}
fn default_timeout_ms() -> u64 {
    60_000
}
fn default_seed() -> u64 {
    42
}
fn default_thought_chars() -> usize {
    160
}
fn default_answer_chars() -> usize {
    240
}
fn default_observation_chars() -> usize {
    480
}
fn default_tool_timeout_ms() -> u64 {
    2_000
}
fn default_max_tool_errors() -> usize {
    2
}
fn default_history_tokens() -> usize {
    192
}

impl RawSpec {
    /// The kind, the tool list and the sections the tools need, the budgets.
    fn check(&self, path: &Path) -> Result<(), SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(path, key, reason);
        if self.kind != "react" {
            return Err(invalid(
                "type",
                format!("`{}`: a ReAct task file has type = \"react\"", self.kind),
            ));
        }
        if self.tools.is_empty() {
            return Err(invalid("tools", "list at least one tool".into()));
        }
        for (i, t) in self.tools.iter().enumerate() {
            let key = format!("tools[{i}]");
            if self.tools[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(&key, format!("`{}` is listed twice", t.name)));
            }
            if t.description.contains('\n') || t.description.trim().is_empty() {
                return Err(invalid(
                    &key,
                    "the description is one non-empty line".into(),
                ));
            }
            t.arg
                .validate(t.name)
                .map_err(|r| invalid(&format!("{key}.arg"), r))?;
        }
        let has = |n: ToolName| self.tools.iter().any(|t| t.name == n);
        if has(ToolName::KbSearch) && self.kb_search.is_none() {
            return Err(invalid(
                "kb_search",
                "the kb_search tool needs a [kb_search] section with `dir`".into(),
            ));
        }
        if self.qa.is_some() && self.kb_search.is_none() {
            return Err(invalid(
                "qa",
                "[qa] needs a [kb_search] section with `dir`".into(),
            ));
        }
        self.policy.check(path)?;
        for name in self.policy.tool_words.keys() {
            if !self.tools.iter().any(|t| t.name.as_str() == name) {
                return Err(invalid(
                    &format!("policy.tool_words.{name}"),
                    "no tool of that name in `tools`".into(),
                ));
            }
        }
        if has(ToolName::Sensor) && self.sensor.is_none() {
            return Err(invalid(
                "sensor",
                "the sensor tool needs a [sensor] section with `dir`".into(),
            ));
        }
        for (key, v) in [
            ("max_steps", self.max_steps),
            ("max_step_tokens", self.max_step_tokens),
            ("max_total_tokens", self.max_total_tokens),
            ("max_thought_chars", self.max_thought_chars),
            ("max_answer_chars", self.max_answer_chars),
            ("max_observation_chars", self.max_observation_chars),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if self.max_context_tokens < self.max_step_tokens * 2 {
            return Err(invalid(
                "max_context_tokens",
                format!(
                    "{} leaves too little room: at least twice max_step_tokens ({})",
                    self.max_context_tokens, self.max_step_tokens
                ),
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(invalid(
                "temperature",
                format!("{} is not within 0..=2", self.temperature),
            ));
        }
        Ok(())
    }
}

/// A loaded, validated ReAct task.
#[derive(Debug, Clone)]
pub struct ReactSpec {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub instruction: String,
    /// The allow-list: only these tools can be named by the grammar or run.
    pub tools: Vec<ToolSpec>,
    pub examples: Vec<Trajectory>,
    pub max_steps: usize,
    /// Generated tokens per step at most.
    pub max_step_tokens: usize,
    /// Generated tokens per run at most.
    pub max_total_tokens: usize,
    /// Prompt plus one step at most; older observations give way first.
    pub max_context_tokens: usize,
    pub timeout_ms: u64,
    pub seed: u64,
    pub temperature: f32,
    pub max_thought_chars: usize,
    pub max_answer_chars: usize,
    pub max_observation_chars: usize,
    pub tool_timeout_ms: u64,
    /// Tool errors in one run before it stops with `tool_error`.
    pub max_tool_errors: usize,
    /// Tokens of earlier turns of a session kept in the prompt.
    pub history_max_tokens: usize,
    /// The clock tool's offset from UTC.
    pub utc_offset_minutes: i32,
    pub kb: Option<KbConfig>,
    pub sensor: Option<SensorConfig>,
    pub notify: NotifyConfig,
    pub qa: Option<QaSpec>,
    /// Weights and thresholds of the scored policy and grounded answers (`[policy]`).
    pub policy: PolicyConfig,
}

impl ReactSpec {
    /// Finds `name` as a path (contains `/` or ends in `.toml`) or as `<dir>/<name>.toml`.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<ReactSpec, SpecError> {
        ReactSpec::load(&super::file::locate(name, dirs, "ReAct task")?)
    }

    pub fn load(path: &Path) -> Result<ReactSpec, SpecError> {
        let (src, stem) = super::file::read(path)?;
        ReactSpec::parse(&src, path, &stem)
    }

    pub fn parse(src: &str, path: &Path, default_name: &str) -> Result<ReactSpec, SpecError> {
        let raw: RawSpec = toml::from_str(src).map_err(|e| SpecError::parse(path, &e))?;
        raw.check(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let kb = raw.kb_search.map(|mut k| {
            k.dir = resolve(&k.dir);
            k
        });
        let sensor = raw.sensor.map(|mut s| {
            s.dir = resolve(&s.dir);
            s
        });
        let mut notify = raw.notify;
        if notify.sink != "stderr" {
            notify.sink = resolve(Path::new(&notify.sink)).display().to_string();
        }
        let spec = ReactSpec {
            name: raw.name.unwrap_or_else(|| default_name.to_string()),
            description: raw.description,
            path: path.into(),
            instruction: raw.instruction,
            tools: raw.tools,
            examples: raw.examples,
            max_steps: raw.max_steps,
            max_step_tokens: raw.max_step_tokens,
            max_total_tokens: raw.max_total_tokens,
            max_context_tokens: raw.max_context_tokens,
            timeout_ms: raw.timeout_ms,
            seed: raw.seed,
            temperature: raw.temperature,
            max_thought_chars: raw.max_thought_chars,
            max_answer_chars: raw.max_answer_chars,
            max_observation_chars: raw.max_observation_chars,
            tool_timeout_ms: raw.tool_timeout_ms,
            max_tool_errors: raw.max_tool_errors,
            history_max_tokens: raw.history_max_tokens,
            utc_offset_minutes: raw.utc_offset_minutes,
            kb,
            sensor,
            notify,
            qa: raw.qa,
            policy: raw.policy,
        };
        spec.check_examples()?;
        Ok(spec)
    }

    /// Every few-shot step must be a sentence of the task's own grammar: the model copies
    /// them, so a malformed example teaches a format the grammar then fights.
    fn check_examples(&self) -> Result<(), SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(&self.path, key, reason);
        for (i, ex) in self.examples.iter().enumerate() {
            let key = format!("examples[{i}].steps");
            let steps = step::split_trajectory(&ex.steps).map_err(|r| invalid(&key, r))?;
            if steps.is_empty() {
                return Err(invalid(&key, "has no steps".into()));
            }
            for (k, (text, obs)) in steps.iter().enumerate() {
                let s = step::parse_step(text, self).map_err(|e| {
                    invalid(
                        &key,
                        format!("step {} does not follow the grammar: {e}", k + 1),
                    )
                })?;
                let last = k + 1 == steps.len();
                match (&s.action, last, obs.is_some()) {
                    (StepAction::Final(_), true, false) => {}
                    (StepAction::Final(_), _, _) => {
                        return Err(invalid(
                            &key,
                            format!("step {} is a Final Answer but not the last", k + 1),
                        ))
                    }
                    (StepAction::Tool { .. }, _, true) => {}
                    (StepAction::Tool { .. }, _, false) => {
                        return Err(invalid(
                            &key,
                            format!("step {} has an Action but no Observation after it", k + 1),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    pub fn tool(&self, name: ToolName) -> Option<&ToolSpec> {
        self.tools.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A small task for unit tests: kb_search, calculator and clock allowed (notify and
    /// sensor are not), one few-shot trajectory.
    pub const SPEC: &str = r#"
type = "react"
name = "unit"
instruction = "Answer the question."
max_steps = 3
max_step_tokens = 40
max_total_tokens = 100
max_context_tokens = 400
tools = [
  { name = "kb_search", description = "search the knowledge base", arg = { kind = "text", max_chars = 60 } },
  { name = "calculator", description = "arithmetic", arg = { kind = "expr", max_chars = 40 } },
  { name = "clock", description = "the current time" },
]
[kb_search]
dir = "kb"
[[examples]]
question = "When do you open on Sunday?"
steps = """
Thought: I should search the knowledge base.
Action: kb_search[sunday opening hours]
Observation: [hours-sunday] Sunday: 10:00 to 16:00.
Thought: The passage answers it.
Final Answer: From 10:00 to 16:00. [hours-sunday]
"""
"#;

    pub fn spec() -> ReactSpec {
        ReactSpec::parse(SPEC, Path::new("tasks/unit.toml"), "unit").unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    fn parse(src: &str) -> Result<ReactSpec, SpecError> {
        ReactSpec::parse(src, Path::new("tasks/t.toml"), "t")
    }

    #[test]
    fn loads_and_resolves_paths_from_the_task_folder() {
        let s = spec();
        assert_eq!(s.name, "unit");
        assert_eq!(s.tools.len(), 3);
        assert_eq!(s.kb.as_ref().unwrap().dir, Path::new("tasks/kb"));
        assert_eq!(s.max_steps, 3);
        assert_eq!(s.seed, 42);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                SPEC.replace("type = \"react\"", "type = \"classify\""),
                "`type`",
            ),
            (
                SPEC.replace("kind = \"expr\"", "kind = \"text\""),
                "tools[1].arg",
            ),
            (
                SPEC.replace("name = \"clock\"", "name = \"shell\""),
                "shell",
            ),
            (SPEC.replace("[kb_search]\ndir = \"kb\"", ""), "`kb_search`"),
            (
                SPEC.replace("Action: kb_search[sunday", "Action: notify[sunday"),
                "examples[0].steps",
            ),
            (
                SPEC.replace("Observation: [hours-sunday] Sunday: 10:00 to 16:00.\n", ""),
                "examples[0].steps",
            ),
            (
                SPEC.replace("max_steps = 3", "max_steps = 0"),
                "`max_steps`",
            ),
            (
                SPEC.replace("max_context_tokens = 400", "max_context_tokens = 50"),
                "max_context_tokens",
            ),
            (format!("{SPEC}\nfoo = 1"), "foo"),
            (format!("{SPEC}\n[policy]\nw_kb = -2.0"), "policy.w_kb"),
            (format!("{SPEC}\n[policy.ground]\nw_typo = 1.0"), "w_typo"),
            (
                format!("{SPEC}\n[policy.tool_words]\nshell = \"run\""),
                "policy.tool_words.shell",
            ),
        ];
        for (src, want) in cases {
            let e = parse(&src).unwrap_err().to_string();
            assert!(e.contains(want), "want {want} in: {e}");
        }
    }
}
