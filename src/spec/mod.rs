//! Task files (TOML): instruction, query template with placeholders, labels with their
//! surface text, few-shot examples, calibration, abstention and the input token budget;
//! and the rendering of a request into a fixed prefix plus a per-request suffix.

pub mod react;
pub mod step;
pub mod tool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::model::config::{EngineConfig, LoraAdapter};
use crate::model::scoring::AbstainRule;
use crate::model::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("unknown task `{name}`: no {name}.toml in {searched}")]
    Unknown { name: String, searched: String },
    #[error("cannot read task file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("task file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("task file {path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

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
}

/// The `[head]` table: a head file and how the task uses it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadRef {
    /// The head file, relative to the task file.
    pub file: PathBuf,
    /// `head` (the head alone), `both` (head and label scores combined) or `prompt`
    /// (label scores only: the head is ignored).
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

impl LoraAdapter {
    /// Resolves the path against `task_dir` and checks the file is a LoRA adapter GGUF.
    fn validated(&self, task_dir: &Path) -> Result<LoraAdapter, (&'static str, String)> {
        if !self.scale.is_finite() {
            return Err((
                "lora.scale",
                format!("{} is not a finite number", self.scale),
            ));
        }
        let path = task_dir.join(&self.path);
        if !path.is_file() {
            return Err(("lora.path", format!("{} does not exist", path.display())));
        }
        let header =
            crate::model::gguf::read_header(&path).map_err(|e| ("lora.path", e.to_string()))?;
        for (k, want) in [("general.type", "adapter"), ("adapter.type", "lora")] {
            if header.str(k) != Some(want) {
                return Err((
                    "lora.path",
                    format!(
                        "{} is not a LoRA adapter: its `{k}` is {:?}, expected \"{want}\"",
                        path.display(),
                        header.str(k).unwrap_or("missing")
                    ),
                ));
            }
        }
        let path = std::fs::canonicalize(&path)
            .map_err(|e| ("lora.path", format!("{}: {e}", path.display())))?;
        if path.to_str().is_none() {
            return Err((
                "lora.path",
                format!(
                    "{} is not valid UTF-8 (llama.cpp takes the path as text)",
                    path.display()
                ),
            ));
        }
        Ok(LoraAdapter {
            path,
            scale: self.scale,
        })
    }
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

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Field(String),
}

/// A template such as `Review: {text}\nSentiment:`. `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_alphanumeric() || c == '_' || c == '.' || c == '-' => {
                                name.push(c)
                            }
                            Some(c) => {
                                return Err(format!(
                                    "placeholder `{{{name}` contains `{c}`; use {{{{ for a literal brace"
                                ))
                            }
                            None => return Err(format!("placeholder `{{{name}` is not closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err("empty placeholder `{}`".into());
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => return Err("unmatched `}`; use }} for a literal brace".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Template { pieces })
    }

    /// The placeholder names, in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.pieces {
            if let Piece::Field(f) = p {
                if !out.contains(&f.as_str()) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// True when the template ends with literal text, so the tokens of a label appended
    /// after it do not depend on the request.
    pub fn ends_with_literal(&self) -> bool {
        matches!(self.pieces.last(), Some(Piece::Lit(_)))
    }

    /// Renders with `lookup`; a field it cannot give is an error naming the field.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Field(f) => out.push_str(lookup(f).ok_or_else(|| f.clone())?),
            }
        }
        Ok(out)
    }
}

/// Where a task file named `name` is: the name itself when it is a path (contains `/` or
/// ends in `.toml`), else `<dir>/<name>.toml` in the first of `dirs` that has it.
pub fn find_task_file(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    if name.contains('/') || name.ends_with(".toml") {
        return Some(PathBuf::from(name));
    }
    dirs.iter()
        .map(|d| d.join(format!("{name}.toml")))
        .find(|p| p.is_file())
}

/// The task folders searched, for "unknown task" errors.
pub fn searched_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
    /// The LoRA adapter the model runs with for this task (path absolute, file checked).
    pub lora: Option<LoraAdapter>,
}

/// The field the token budget truncates.
pub const TRUNCATED_FIELD: &str = "text";

impl Task {
    /// Finds `name` as a path (contains `/` or ends in `.toml`) or as `<dir>/<name>.toml`
    /// in the first of `dirs` that has it.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<Task, TaskError> {
        match find_task_file(name, dirs) {
            Some(p) => Task::load(&p),
            None => Err(TaskError::Unknown {
                name: name.into(),
                searched: searched_dirs(dirs),
            }),
        }
    }

    pub fn load(path: &Path) -> Result<Task, TaskError> {
        let src = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
            path: path.into(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Task::parse(&src, path, &stem)
    }

    pub fn parse(src: &str, path: &Path, default_name: &str) -> Result<Task, TaskError> {
        if crate::spec::react::is_react_file(src) {
            return Err(TaskError::Invalid {
                path: path.into(),
                key: "type".into(),
                reason: "a ReAct task: use `edgeact react` or `edgeact qa`".into(),
            });
        }
        let raw: RawTask = toml::from_str(src).map_err(|e| TaskError::Parse {
            path: path.into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let invalid = |key: &str, reason: String| TaskError::Invalid {
            path: path.into(),
            key: key.into(),
            reason,
        };
        let query = Template::parse(&raw.query).map_err(|r| invalid("query", r))?;
        let fields = query.fields();
        if !fields.contains(&TRUNCATED_FIELD) {
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
        if raw.labels.len() < 2 {
            return Err(invalid("labels", "need at least two labels".into()));
        }
        for (i, l) in raw.labels.iter().enumerate() {
            if l.name.trim().is_empty() || l.text.trim().is_empty() {
                return Err(invalid(
                    &format!("labels[{i}]"),
                    "name and text must not be empty".into(),
                ));
            }
            if raw.labels[..i]
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
        for (i, ex) in raw.examples.iter().enumerate() {
            let key = format!("examples[{i}]");
            let label = ex
                .get("label")
                .ok_or_else(|| invalid(&key, "has no `label`".into()))?;
            if !raw.labels.iter().any(|l| &l.name == label) {
                return Err(invalid(
                    &key,
                    format!("label `{label}` is not one of the task's labels"),
                ));
            }
            for f in &fields {
                if !ex.contains_key(*f) {
                    return Err(invalid(
                        &key,
                        format!("lacks field `{f}` used by the query template"),
                    ));
                }
            }
        }
        if raw.input.max_tokens == 0 {
            return Err(invalid("input.max_tokens", "must be at least 1".into()));
        }
        for (key, v) in [
            ("abstain.min_confidence", raw.abstain.min_confidence),
            ("abstain.min_margin", raw.abstain.min_margin),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(key, format!("{v} is not within 0..=1")));
            }
        }
        if let Some(m) = raw.prune_margin_nats {
            if !(m.is_finite() && m >= 0.0) {
                return Err(invalid(
                    "prune_margin_nats",
                    format!("{m} is not a finite number of nats >= 0"),
                ));
            }
        }
        if raw.calibration.enabled && raw.calibration.content_free.is_empty() {
            return Err(invalid(
                "calibration.content_free",
                "calibration is enabled but no content-free inputs are given".into(),
            ));
        }
        let lora = match &raw.lora {
            Some(l) => Some(
                l.validated(path.parent().unwrap_or(Path::new(".")))
                    .map_err(|(key, reason)| invalid(key, reason))?,
            ),
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
            calibration: raw.calibration,
            abstain: raw.abstain,
            input: raw.input,
            monitor: raw.monitor,
            rank: raw.rank,
            measured: raw.measured,
            head: raw.head,
            lora,
        })
    }

    /// The fixed part of every prompt: the instruction and the few-shot examples, each
    /// rendered with the query template followed by its label's text.
    pub fn render_prefix(&self) -> String {
        let mut out = String::new();
        if !self.instruction.is_empty() {
            out.push_str(&self.instruction);
            out.push_str(&self.separator);
        }
        for ex in &self.examples {
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
        out
    }

    /// The per-request part: the query rendered with the request's fields.
    pub fn render_query(&self, fields: &BTreeMap<String, String>) -> Result<String, TaskError> {
        self.query
            .render(|f| fields.get(f).map(String::as_str))
            .map_err(|f| TaskError::Invalid {
                path: self.path.clone(),
                key: "query".into(),
                reason: format!("the input has no field `{f}`"),
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
            calibration: self.calibration.clone(),
            abstain: self.abstain,
            input: self.input.clone(),
            lora: self.lora.clone(),
            monitor: self.monitor.clone(),
            rank: self.rank.clone(),
            measured: self.measured.clone(),
            head: self.head.clone(),
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
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "prompt" => Some(Method::Prompt),
            "head" => Some(Method::Head),
            "both" => Some(Method::Both),
            _ => None,
        }
    }
}

/// The LoRA adapter one engine runs with for `tasks`: they must agree, since llama.cpp
/// applies an adapter set to the whole context.
pub fn lora_for_tasks<'a>(
    tasks: impl IntoIterator<Item = &'a Task>,
) -> Result<Option<LoraAdapter>, EngineError> {
    let mut first: Option<&Task> = None;
    for t in tasks {
        let Some(f) = first else {
            first = Some(t);
            continue;
        };
        if f.lora != t.lora {
            let path = t.lora.as_ref().or(f.lora.as_ref()).map(|l| l.path.clone());
            return Err(EngineError::Lora {
                path: path.unwrap_or_default(),
                reason: format!(
                    "tasks `{}` and `{}` name different adapters or scales; one engine runs with one",
                    f.name, t.name
                ),
            });
        }
    }
    Ok(first.and_then(|t| t.lora.clone()))
}

/// `cfg` with the LoRA adapter that `tasks` name (see [`lora_for_tasks`]).
pub fn config_for_tasks<'a>(
    cfg: &EngineConfig,
    tasks: impl IntoIterator<Item = &'a Task>,
) -> Result<EngineConfig, EngineError> {
    let mut cfg = cfg.clone();
    cfg.lora = lora_for_tasks(tasks)?;
    Ok(cfg)
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

    fn parse(src: &str) -> Result<Task, TaskError> {
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
    fn placeholders_and_escapes() {
        let t = Template::parse("{{literal}} {text} in {district}:").unwrap();
        assert_eq!(t.fields(), vec!["text", "district"]);
        let out = t
            .render(|f| match f {
                "text" => Some("a"),
                "district" => Some("4"),
                _ => None,
            })
            .unwrap();
        assert_eq!(out, "{literal} a in 4:");
        assert_eq!(t.render(|_| None), Err("text".to_string()));
        assert!(Template::parse("{text").unwrap_err().contains("not closed"));
        assert!(Template::parse("a } b").unwrap_err().contains("unmatched"));
        assert!(Template::parse("{}").is_err());
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
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                // ReAct task files have their own loader (crate::react::spec).
                if crate::spec::react::is_react_file(&std::fs::read_to_string(&p).unwrap()) {
                    continue;
                }
                let t = Task::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(!t.render_prefix().is_empty());
                n += 1;
            }
        }
        assert!(n >= 3, "expected at least 3 shipped tasks, found {n}");
    }
}
