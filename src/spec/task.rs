//! Classification task files (TOML): instruction, query template with placeholders, labels
//! with their surface text, few-shot examples, calibration, abstention and the input token
//! budget; and the rendering of a request into a fixed prefix plus a per-request suffix.
//! A ranking task is one of these with a `[rank]` section (validated by `crate::rank`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::demos::Demos;
use super::template::Template;
use super::train::TrainSource;
use super::SpecError;
use crate::model::config::LoraAdapter;
use crate::model::scoring::{AbstainRule, LogprobOver};

/// How a too-long input is cut to its token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncatePolicy {
    /// Keep the beginning of the text.
    KeepHead,
    /// Keep the end of the text.
    KeepTail,
    /// Refuse the input with an error.
    Reject,
}

fn is_default_over(o: &LogprobOver) -> bool {
    *o == LogprobOver::default()
}

/// How label log-likelihoods become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreNorm {
    /// Sum of the label's token log-probabilities.
    #[default]
    Total,
    /// Per-token mean (length-normalised).
    Mean,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: Option<String>,
    description: Option<String>,
    instruction: String,
    query: String,
    #[serde(default = "default_separator")]
    separator: String,
    #[serde(default)]
    use_chat_template: bool,
    labels: Vec<Label>,
    #[serde(default)]
    examples: Vec<BTreeMap<String, String>>,
    #[serde(default)]
    score: ScoreNorm,
    /// Leave labels whose score bound is this far below the best label unfinished
    /// (multi-token label sets only; the top label is unchanged). Absent: score all fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prune_margin_nats: Option<f64>,
    /// `labels` (default): one-token labels on a tied-output model are scored from their
    /// output rows alone; `vocab`: always over the full vocabulary (absolute log-likelihoods).
    #[serde(default, skip_serializing_if = "is_default_over")]
    logprob_over: LogprobOver,
    #[serde(default)]
    calibration: Calibration,
    #[serde(default)]
    abstain: AbstainRule,
    #[serde(default)]
    input: InputBudget,
    /// A LoRA adapter applied to the model for this task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora: Option<LoraAdapter>,
    /// `[monitor]`: alert rules over the stream of results (validated by `crate::monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    monitor: Option<toml::Table>,
    /// `[rank]`: the task ranks items for a profile (validated by `crate::rank`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank: Option<toml::Table>,
    /// What `edgeact tune` measured when it wrote this file (free-form, informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    measured: Option<toml::Table>,
    /// A learned head on the model's hidden states (`edgeact tune --head`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<HeadRef>,
    /// Where the head's train and dev rows come from (`super::train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    train: Option<TrainSource>,
    /// Retrieved demonstrations: `examples` is a pool, each request shows its nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    demos: Option<Demos>,
}

impl RawTask {
    /// The query template: it has the `{text}` placeholder and ends with literal text.
    fn query_template(&self, path: &Path) -> Result<Template, SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(path, key, reason);
        let query = Template::parse(&self.query).map_err(|r| invalid("query", r))?;
        if !query.fields().contains(&TRUNCATED_FIELD) {
            return Err(invalid(
                "query",
                "must contain the {text} placeholder".into(),
            ));
        }
        if !query.ends_with_literal() {
            return Err(invalid(
                "query",
                "must end with literal text after the last placeholder (such as \"\\nSentiment:\"), \
                 so the label follows a fixed context"
                    .into(),
            ));
        }
        Ok(query)
    }

    /// At least two distinct labels; every example has a known label and the query's
    /// `fields`.
    fn check_labels_and_examples(&self, path: &Path, fields: &[&str]) -> Result<(), SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(path, key, reason);
        if self.labels.len() < 2 {
            return Err(invalid("labels", "need at least two labels".into()));
        }
        for (i, l) in self.labels.iter().enumerate() {
            if l.name.trim().is_empty() || l.text.trim().is_empty() {
                return Err(invalid(
                    &format!("labels[{i}]"),
                    "name and text must not be empty".into(),
                ));
            }
            if self.labels[..i]
                .iter()
                .any(|o| o.name == l.name || o.text == l.text)
            {
                return Err(invalid(
                    &format!("labels[{i}]"),
                    format!(
                        "label `{}` repeats the name or text of another label",
                        l.name
                    ),
                ));
            }
        }
        for (i, ex) in self.examples.iter().enumerate() {
            let key = format!("examples[{i}]");
            let label = ex
                .get("label")
                .ok_or_else(|| invalid(&key, "has no `label`".into()))?;
            if !self.labels.iter().any(|l| &l.name == label) {
                return Err(invalid(
                    &key,
                    format!("label `{label}` is not one of the task's labels"),
                ));
            }
            for f in fields {
                if !ex.contains_key(*f) {
                    return Err(invalid(
                        &key,
                        format!("lacks field `{f}` used by the query template"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The input budget, abstention thresholds, pruning margin and calibration inputs.
    fn check_numbers(&self, path: &Path) -> Result<(), SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(path, key, reason);
        if self.input.max_tokens == 0 {
            return Err(invalid("input.max_tokens", "must be at least 1".into()));
        }
        for (key, v) in [
            ("abstain.min_confidence", self.abstain.min_confidence),
            ("abstain.min_margin", self.abstain.min_margin),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(key, format!("{v} is not within 0..=1")));
            }
        }
        if let Some(m) = self.prune_margin_nats {
            if !(m.is_finite() && m >= 0.0) {
                return Err(invalid(
                    "prune_margin_nats",
                    format!("{m} is not a finite number of nats >= 0"),
                ));
            }
        }
        if self.calibration.enabled && self.calibration.content_free.is_empty() {
            return Err(invalid(
                "calibration.content_free",
                "calibration is enabled but no content-free inputs are given".into(),
            ));
        }
        Ok(())
    }
}

/// The `[head]` table: a head file and how the task uses it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadRef {
    /// The head file, relative to the task file.
    pub file: PathBuf,
    /// `head` (the head alone), `both` (head and label scores combined), `stack` or
    /// `tfidf` (the file is a stack file, see `classify::stack`) or `prompt` (label scores
    /// only: the file is ignored).
    #[serde(default = "default_head_method")]
    pub method: Method,
}

fn default_head_method() -> Method {
    Method::Head
}

fn default_separator() -> String {
    "\n\n".into()
}

/// One label: the name reported, and the text the model is scored on after the prompt.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Label {
    pub name: String,
    /// Surface text appended after the query, usually with a leading space (" positive").
    pub text: String,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    #[serde(default)]
    pub enabled: bool,
    /// Content-free inputs whose averaged label distribution is divided out.
    #[serde(default = "default_content_free")]
    pub content_free: Vec<String>,
}

impl Default for Calibration {
    fn default() -> Self {
        Calibration {
            enabled: false,
            content_free: default_content_free(),
        }
    }
}

fn default_content_free() -> Vec<String> {
    vec!["N/A".into(), "".into(), "[MASK]".into()]
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputBudget {
    /// Most tokens of the truncated field (`text`) one request may bring.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    #[serde(default = "default_truncate")]
    pub truncate: TruncatePolicy,
}

impl Default for InputBudget {
    fn default() -> Self {
        InputBudget {
            max_tokens: default_max_tokens(),
            truncate: default_truncate(),
        }
    }
}

fn default_max_tokens() -> u32 {
    256
}
fn default_truncate() -> TruncatePolicy {
    TruncatePolicy::KeepHead
}

/// A loaded, validated task.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub instruction: String,
    pub query: Template,
    pub query_src: String,
    pub separator: String,
    pub use_chat_template: bool,
    pub labels: Vec<Label>,
    pub examples: Vec<BTreeMap<String, String>>,
    pub score: ScoreNorm,
    /// See `scoring::Pruning`: None scores every label fully.
    pub prune_margin_nats: Option<f64>,
    /// What label log-probabilities are normalized over (see `scoring::LogprobOver`).
    pub logprob_over: LogprobOver,
    pub calibration: Calibration,
    pub abstain: AbstainRule,
    pub input: InputBudget,
    /// The `[monitor]` section, as written (see `crate::monitor::MonitorConfig`).
    pub monitor: Option<toml::Table>,
    /// The `[rank]` section, as written (see `crate::rank::RankConfig`).
    pub rank: Option<toml::Table>,
    /// What `edgeact tune` measured for this file, if it wrote it.
    pub measured: Option<toml::Table>,
    /// The learned head, if the task has one.
    pub head: Option<HeadRef>,
    /// Where the head's train and dev rows come from, so it can be retrained.
    pub train: Option<TrainSource>,
    /// The LoRA adapter the model runs with for this task (path absolute, file checked).
    pub lora: Option<LoraAdapter>,
    /// Retrieved demonstrations: when set, `examples` is the pool they come from and the
    /// fixed prefix holds the instruction only.
    pub demos: Option<Demos>,
}

/// The field the token budget truncates.
pub const TRUNCATED_FIELD: &str = "text";

impl Task {
    /// Finds `name` as a path (contains `/` or ends in `.toml`) or as `<dir>/<name>.toml`
    /// in the first of `dirs` that has it.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<Task, SpecError> {
        Task::load(&super::file::locate(name, dirs, "task")?)
    }

    pub fn load(path: &Path) -> Result<Task, SpecError> {
        let (src, stem) = super::file::read(path)?;
        Task::parse(&src, path, &stem)
    }

    /// A classification (or ranking) task from the text of its file; a ReAct task file is
    /// refused with a pointer to the commands that run it.
    pub fn parse(src: &str, path: &Path, default_name: &str) -> Result<Task, SpecError> {
        if super::file::is_react_file(src) {
            return Err(SpecError::invalid(
                path,
                "type",
                "a ReAct task: use `edgeact react` or `edgeact qa`",
            ));
        }
        Task::parse_classify(src, path, default_name)
    }

    /// [`Task::parse`] for a file already sniffed as not a ReAct task.
    pub(super) fn parse_classify(
        src: &str,
        path: &Path,
        default_name: &str,
    ) -> Result<Task, SpecError> {
        let raw: RawTask = toml::from_str(src).map_err(|e| SpecError::parse(path, &e))?;
        let query = raw.query_template(path)?;
        raw.check_labels_and_examples(path, &query.fields())?;
        raw.check_numbers(path)?;
        if let Some(t) = &raw.train {
            t.validate(path, raw.head.is_some())?;
        }
        if let Some(d) = &raw.demos {
            d.validate(path, raw.examples.len())?;
        }
        let lora = match &raw.lora {
            Some(l) => Some(l.validated(path)?),
            None => None,
        };
        Ok(Task {
            name: raw.name.unwrap_or_else(|| default_name.to_string()),
            description: raw.description.unwrap_or_default(),
            path: path.into(),
            instruction: raw.instruction,
            query,
            query_src: raw.query,
            separator: raw.separator,
            use_chat_template: raw.use_chat_template,
            labels: raw.labels,
            examples: raw.examples,
            score: raw.score,
            prune_margin_nats: raw.prune_margin_nats,
            logprob_over: raw.logprob_over,
            calibration: raw.calibration,
            abstain: raw.abstain,
            input: raw.input,
            monitor: raw.monitor,
            rank: raw.rank,
            measured: raw.measured,
            head: raw.head,
            train: raw.train,
            lora,
            demos: raw.demos,
        })
    }

    /// The fixed part of every prompt: the instruction and the few-shot examples, each
    /// rendered with the query template followed by its label's text. With `[demos]` the
    /// examples are a pool shown per request ([`Task::render_demos`]), not part of it.
    pub fn render_prefix(&self) -> String {
        let mut out = String::new();
        if !self.instruction.is_empty() {
            out.push_str(&self.instruction);
            out.push_str(&self.separator);
        }
        if self.demos.is_none() {
            for ex in &self.examples {
                self.render_example(ex, &mut out);
            }
        }
        out
    }

    /// The examples at `indices` (into `examples`; unknown ones skipped), in that order,
    /// rendered as the prefix renders its examples: the demonstrations of one request.
    pub fn render_demos(&self, indices: &[usize]) -> String {
        let mut out = String::new();
        for ex in indices.iter().filter_map(|&i| self.examples.get(i)) {
            self.render_example(ex, &mut out);
        }
        out
    }

    fn render_example(&self, ex: &BTreeMap<String, String>, out: &mut String) {
        // Validated at load: every example has every field and a known label.
        let q = self
            .query
            .render(|f| ex.get(f).map(String::as_str))
            .unwrap_or_default();
        let label = ex
            .get("label")
            .and_then(|n| self.labels.iter().find(|l| &l.name == n))
            .map(|l| l.text.as_str())
            .unwrap_or_default();
        out.push_str(&q);
        out.push_str(label);
        out.push_str(&self.separator);
    }

    /// The per-request part: the query rendered with the request's fields.
    pub fn render_query(&self, fields: &BTreeMap<String, String>) -> Result<String, SpecError> {
        self.query
            .render(|f| fields.get(f).map(String::as_str))
            .map_err(|f| {
                SpecError::invalid(&self.path, "query", format!("the input has no field `{f}`"))
            })
    }

    /// Hash of what the model is shown, minus the request: changes whenever the prefix,
    /// query template or label texts change.
    pub fn template_sha256(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.render_prefix().as_bytes());
        h.update([0]);
        h.update(self.query_src.as_bytes());
        for l in &self.labels {
            h.update([0]);
            h.update(l.text.as_bytes());
        }
        h.update([u8::from(self.use_chat_template)]);
        // With retrieved demonstrations, the pool and how it is searched are the template.
        if let Some(d) = &self.demos {
            h.update(format!("demos {} {}", d.per_label, d.by.name()).as_bytes());
            for ex in &self.examples {
                let mut one = String::new();
                self.render_example(ex, &mut one);
                h.update([0]);
                h.update(one.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..8])
    }

    /// The head file's path: `[head] file` relative to the task file's folder.
    pub fn head_path(&self) -> Option<PathBuf> {
        let h = self.head.as_ref()?;
        Some(match self.path.parent() {
            Some(dir) if h.file.is_relative() => dir.join(&h.file),
            _ => h.file.clone(),
        })
    }

    /// The task as a task file that [`Task::parse`] reads back to the same prompts.
    pub fn to_toml(&self) -> String {
        let raw = RawTask {
            name: Some(self.name.clone()),
            description: Some(self.description.clone()),
            instruction: self.instruction.clone(),
            query: self.query_src.clone(),
            separator: self.separator.clone(),
            use_chat_template: self.use_chat_template,
            labels: self.labels.clone(),
            examples: self.examples.clone(),
            score: self.score,
            prune_margin_nats: self.prune_margin_nats,
            logprob_over: self.logprob_over,
            calibration: self.calibration.clone(),
            abstain: self.abstain,
            input: self.input.clone(),
            lora: self.lora.clone(),
            monitor: self.monitor.clone(),
            rank: self.rank.clone(),
            measured: self.measured.clone(),
            head: self.head.clone(),
            train: self.train.clone(),
            demos: self.demos,
        };
        // Plain strings, numbers, tables and arrays (the LoRA path was checked to be UTF-8
        // at load): serializing cannot fail.
        toml::to_string(&raw).unwrap_or_default()
    }

    /// The scorer's pruning rule for this task's labels.
    pub fn pruning(&self) -> Option<crate::model::scoring::Pruning> {
        self.prune_margin_nats
            .map(|margin_nats| crate::model::scoring::Pruning {
                margin_nats,
                per_token: self.score == ScoreNorm::Mean,
            })
    }

    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l.name == name)
    }
}

/// How a task with a head classifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Label scores after the prompt (no head).
    #[default]
    Prompt,
    /// The learned head alone.
    Head,
    /// Head and prompt: their log-probabilities summed (a product of the two).
    Both,
    /// The stacked scorer (`<stem>.stack.json`): one logistic regression over model features
    /// and TF-IDF n-grams.
    Stack,
    /// TF-IDF n-grams alone through the stack file's regression (no model pass).
    Tfidf,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Prompt,
        Method::Head,
        Method::Both,
        Method::Stack,
        Method::Tfidf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Prompt => "prompt",
            Method::Head => "head",
            Method::Both => "both",
            Method::Stack => "stack",
            Method::Tfidf => "tfidf",
        }
    }

    /// Whether the method reads a stack file (else a head file).
    pub fn uses_stack_file(self) -> bool {
        matches!(self, Method::Stack | Method::Tfidf)
    }

    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "prompt" => Some(Method::Prompt),
            "head" => Some(Method::Head),
            "both" => Some(Method::Both),
            "stack" => Some(Method::Stack),
            "tfidf" => Some(Method::Tfidf),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENTIMENT: &str = r#"
instruction = "Classify the sentiment."
query = "Review: {text}\nSentiment:"
labels = [{ name = "positive", text = " positive" }, { name = "negative", text = " negative" }]
examples = [{ text = "Great!", label = "positive" }, { text = "Awful.", label = "negative" }]
"#;

    fn parse(src: &str) -> Result<Task, SpecError> {
        Task::parse(src, Path::new("t.toml"), "t")
    }

    #[test]
    fn renders_prefix_and_query() {
        let t = parse(SENTIMENT).unwrap();
        assert_eq!(
            t.render_prefix(),
            "Classify the sentiment.\n\nReview: Great!\nSentiment: positive\n\nReview: Awful.\nSentiment: negative\n\n"
        );
        let mut f = BTreeMap::new();
        f.insert("text".to_string(), "非常高兴 {not a field}".to_string());
        assert_eq!(
            t.render_query(&f).unwrap(),
            "Review: 非常高兴 {not a field}\nSentiment:"
        );
        assert_eq!(t.name, "t");
        assert_eq!(t.template_sha256().len(), 16);
    }

    #[test]
    fn load_time_errors_name_the_key() {
        let e =
            parse(&SENTIMENT.replace("Review: {text}", "Review: {text} {district}")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("examples[0]") && msg.contains("district"),
            "{msg}"
        );

        let e = parse(&SENTIMENT.replace("{text}\\nSentiment:", "{txt}\\nSentiment:")).unwrap_err();
        assert!(e.to_string().contains("{text}"), "{e}");

        let e = parse(&SENTIMENT.replace("\\nSentiment:\"", "{text}\"")).unwrap_err();
        assert!(e.to_string().contains("must end with literal text"), "{e}");

        let e =
            parse(&SENTIMENT.replace("label = \"negative\"", "label = \"neutral\"")).unwrap_err();
        assert!(e.to_string().contains("`neutral` is not one of"), "{e}");

        let e = parse(&format!("{SENTIMENT}\nthreshold = 3")).unwrap_err();
        assert!(e.to_string().contains("threshold"), "{e}");

        let e = parse(&format!("{SENTIMENT}\n[abstain]\nmin_confidence = 1.5")).unwrap_err();
        assert!(e.to_string().contains("abstain.min_confidence"), "{e}");
    }

    #[test]
    fn to_toml_reads_back_to_the_same_prompts() {
        let mut t = parse(SENTIMENT).unwrap();
        t.calibration.enabled = true;
        let mut m = toml::Table::new();
        m.insert("dev_macro_f1".into(), toml::Value::Float(0.9));
        t.measured = Some(m);
        let back = parse(&t.to_toml()).unwrap();
        assert_eq!(back.render_prefix(), t.render_prefix());
        assert_eq!(back.template_sha256(), t.template_sha256());
        assert!(back.calibration.enabled);
        assert_eq!(back.measured.unwrap()["dev_macro_f1"].as_float(), Some(0.9));
    }

    #[test]
    fn shipped_tasks_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tasks");
        let (mut n, mut react) = (0, 0);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                match crate::spec::TaskFile::load(&p).unwrap_or_else(|e| panic!("{e}")) {
                    crate::spec::TaskFile::Classify(t) | crate::spec::TaskFile::Rank(t) => {
                        assert!(!t.render_prefix().is_empty());
                        n += 1;
                    }
                    crate::spec::TaskFile::React(_) => react += 1,
                }
            }
        }
        assert!(n >= 3, "expected at least 3 shipped tasks, found {n}");
        assert!(react >= 1, "expected a shipped ReAct task");
    }
}
