//! Feedback from users: a corrected label for a classified text (`{"task", "text",
//! "label", "id"?}`) or a ranking event (`{"task", "query", "items", "clicked",
//! "ignored"?, "id"?}`); validated against the served tasks with errors that name what is
//! wrong, and kept durably in one JSON-lines file per task (appended, synced, owner-only),
//! so nothing accepted is lost across restarts. `edgeact learn` and `serve` retrain from it
//! ([`super::retrain`]).

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Example;
use crate::classify::Request;
use crate::spec::Task;
use crate::util::jsonl::JsonLines;

/// Longest feedback id, in bytes (as a request id's, see `serve::limits`).
pub const MAX_ID_BYTES: usize = 256;

/// A corrected label: `text` should have been classified as `label`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelFeedback {
    pub task: String,
    pub text: String,
    pub label: String,
    /// The request the correction is about, when the sender knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// What a user did with a ranking: kept for the ranking's learning (the items as sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankFeedback {
    pub task: String,
    pub query: String,
    pub items: Vec<Value>,
    pub clicked: Vec<String>,
    #[serde(default)]
    pub ignored: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One feedback record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Feedback {
    Label(LabelFeedback),
    Rank(RankFeedback),
}

impl Feedback {
    pub fn task(&self) -> &str {
        match self {
            Feedback::Label(f) => &f.task,
            Feedback::Rank(f) => &f.task,
        }
    }

    pub fn id(&self) -> Option<&str> {
        match self {
            Feedback::Label(f) => f.id.as_deref(),
            Feedback::Rank(f) => f.id.as_deref(),
        }
    }
}

/// What feedback a task takes.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackKind {
    /// Corrected labels, one of these.
    Labels(Vec<String>),
    /// Ranking events.
    Rank,
}

/// The tasks feedback may name, and the largest text accepted.
#[derive(Debug, Clone, Default)]
pub struct FeedbackRules {
    pub tasks: BTreeMap<String, FeedbackKind>,
    /// Largest `text` or `query`, in bytes.
    pub max_text_bytes: usize,
}

impl FeedbackRules {
    /// Rules for classification tasks (corrected labels) and ranking tasks (`rank`).
    pub fn new(
        tasks: impl IntoIterator<Item = (String, FeedbackKind)>,
        max_text_bytes: usize,
    ) -> FeedbackRules {
        FeedbackRules {
            tasks: tasks.into_iter().collect(),
            max_text_bytes,
        }
    }

    /// Label feedback for one classification task.
    pub fn for_task(task: &Task, max_text_bytes: usize) -> FeedbackRules {
        let labels = task.labels.iter().map(|l| l.name.clone()).collect();
        FeedbackRules::new(
            [(task.name.clone(), FeedbackKind::Labels(labels))],
            max_text_bytes,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("`{field}` {reason}")]
    Field { field: &'static str, reason: String },
    #[error("unknown task `{task}` (feedback is taken for: {known})")]
    UnknownTask { task: String, known: String },
    #[error("unknown label `{label}` for task `{task}` (its labels: {labels})")]
    UnknownLabel {
        task: String,
        label: String,
        labels: String,
    },
    #[error("`{field}` is {bytes} bytes, over the limit of {max}")]
    TooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("task `{task}` {reason}")]
    WrongKind { task: String, reason: String },
    #[error("cannot write feedback to {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("feedback file {}, line {line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl FeedbackError {
    /// The error record's kind (the same names as requests' where the fault is the same).
    pub fn kind(&self) -> &'static str {
        match self {
            FeedbackError::Json(_) => "invalid_json",
            FeedbackError::Field { .. } | FeedbackError::WrongKind { .. } => "invalid_request",
            FeedbackError::UnknownTask { .. } => "unknown_task",
            FeedbackError::UnknownLabel { .. } => "unknown_label",
            FeedbackError::TooLong { .. } => "too_long",
            FeedbackError::Io { .. } => "feedback_write_failed",
            FeedbackError::Line { .. } => "invalid_request",
        }
    }
}

fn field(field: &'static str, reason: &str) -> FeedbackError {
    FeedbackError::Field {
        field,
        reason: reason.into(),
    }
}

fn string(v: &Value, name: &'static str) -> Result<String, FeedbackError> {
    match v.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(field(name, "is empty")),
        Some(_) => Err(field(name, "must be a string")),
        None => Err(field(name, "is missing")),
    }
}

fn strings(v: &Value, name: &'static str) -> Result<Vec<String>, FeedbackError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(field(name, "must list item ids (strings)")),
            })
            .collect(),
        Some(_) => Err(field(name, "must be an item id or a list of them")),
    }
}

fn check_len(name: &'static str, s: &str, max: usize) -> Result<(), FeedbackError> {
    if s.len() > max {
        return Err(FeedbackError::TooLong {
            field: name,
            bytes: s.len(),
            max,
        });
    }
    Ok(())
}

/// Parses and validates one feedback payload.
pub fn parse(bytes: &[u8], rules: &FeedbackRules) -> Result<Feedback, FeedbackError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| FeedbackError::Json(e.to_string()))?;
    from_value(&v, rules)
}

/// Validates one feedback object.
pub fn from_value(v: &Value, rules: &FeedbackRules) -> Result<Feedback, FeedbackError> {
    if !v.is_object() {
        return Err(FeedbackError::Json("expected an object".into()));
    }
    let task = string(v, "task")?;
    let id = match v.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(field("id", "must be a string or a number")),
    };
    if let Some(i) = &id {
        check_len("id", i, MAX_ID_BYTES)?;
    }
    let Some(kind) = rules.tasks.get(&task) else {
        let known: Vec<&str> = rules.tasks.keys().map(String::as_str).collect();
        return Err(FeedbackError::UnknownTask {
            task,
            known: known.join(", "),
        });
    };
    match kind {
        FeedbackKind::Labels(labels) => {
            if v.get("query").is_some() || v.get("clicked").is_some() {
                return Err(FeedbackError::WrongKind {
                    task,
                    reason: "classifies: send {\"task\", \"text\", \"label\"}".into(),
                });
            }
            let text = string(v, "text")?;
            check_len("text", &text, rules.max_text_bytes)?;
            let label = string(v, "label")?;
            if !labels.contains(&label) {
                return Err(FeedbackError::UnknownLabel {
                    task,
                    label,
                    labels: labels.join(", "),
                });
            }
            Ok(Feedback::Label(LabelFeedback {
                task,
                text,
                label,
                id,
            }))
        }
        FeedbackKind::Rank => {
            let query = string(v, "query")?;
            check_len("query", &query, rules.max_text_bytes)?;
            let items = match v.get("items") {
                Some(Value::Array(a)) if !a.is_empty() => a.clone(),
                Some(Value::Array(_)) => return Err(field("items", "is empty")),
                Some(_) => return Err(field("items", "must be a list")),
                None => return Err(field("items", "is missing")),
            };
            let clicked = strings(v, "clicked")?;
            let ignored = strings(v, "ignored")?;
            if clicked.is_empty() && ignored.is_empty() {
                return Err(field(
                    "clicked",
                    "and `ignored` are both empty: nothing to learn",
                ));
            }
            Ok(Feedback::Rank(RankFeedback {
                task,
                query,
                items,
                clicked,
                ignored,
                id,
            }))
        }
    }
}

/// One JSON-lines file per task under a folder (the daemon's state folder).
#[derive(Debug, Clone)]
pub struct FeedbackLog {
    dir: PathBuf,
}

impl FeedbackLog {
    pub fn new(dir: impl Into<PathBuf>) -> FeedbackLog {
        FeedbackLog { dir: dir.into() }
    }

    /// `<dir>/feedback-<task>.jsonl`; a task name with other characters than letters,
    /// digits, `-`, `_` and `.` is hashed, so no name can leave the folder.
    pub fn path(&self, task: &str) -> PathBuf {
        let plain = !task.is_empty()
            && !task.starts_with('.')
            && task
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        let name = if plain {
            task.to_string()
        } else {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(task.as_bytes())[..8])
        };
        self.dir.join(format!("feedback-{name}.jsonl"))
    }

    /// Appends the records (all of one task) and syncs them to disk before returning: once
    /// this is Ok they survive a crash or power loss. A torn last line left by an earlier
    /// crash is ended first, so the new records are whole lines.
    pub fn append(&self, records: &[Feedback]) -> Result<(), FeedbackError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let path = self.path(first.task());
        let io = |source| FeedbackError::Io {
            path: path.clone(),
            source,
        };
        crate::util::private::create_dir(&self.dir).map_err(io)?;
        // Created (or narrowed) owner-only, then written in append mode: `edgeact learn` and
        // `serve` may append to the same log, and each write lands at its end.
        drop(crate::util::private::open(&path, false).map_err(io)?);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io)?;
        let end = f.metadata().map_err(io)?.len();
        let mut out = Vec::new();
        if end > 0 {
            let mut last = [0u8; 1];
            let mut r = std::fs::File::open(&path).map_err(io)?;
            r.seek(SeekFrom::Start(end - 1)).map_err(io)?;
            r.read_exact(&mut last).map_err(io)?;
            if last[0] != b'\n' {
                out.push(b'\n');
            }
        }
        for r in records {
            // Plain strings and JSON values: serializing cannot fail.
            out.extend(serde_json::to_vec(r).unwrap_or_default());
            out.push(b'\n');
        }
        f.write_all(&out).map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// The records kept for `task`, oldest first (none when there is no file). A line that
    /// is not a record (a torn tail after a power loss) is skipped and counted in `.1`.
    pub fn read(&self, task: &str) -> Result<(Vec<Feedback>, usize), FeedbackError> {
        let path = self.path(task);
        read_file(&path, None)
    }
}

/// Reads feedback records from a JSON-lines file: with `rules`, each is validated and a bad
/// line is an error naming it; without, bad lines are skipped and counted.
pub fn read_file(
    path: &Path,
    rules: Option<&FeedbackRules>,
) -> Result<(Vec<Feedback>, usize), FeedbackError> {
    let io = |source| FeedbackError::Io {
        path: path.into(),
        source,
    };
    let mut lines = match JsonLines::open(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && rules.is_none() => {
            return Ok((Vec::new(), 0))
        }
        Err(e) => return Err(io(e)),
    };
    let mut out = Vec::new();
    let mut skipped = 0;
    while let Some((line, bytes)) = lines.next_line().map_err(io)? {
        let got = match rules {
            Some(r) => parse(bytes, r).map_err(|e| FeedbackError::Line {
                path: path.into(),
                line,
                reason: e.to_string(),
            })?,
            None => match serde_json::from_slice::<Feedback>(bytes) {
                Ok(f) => f,
                Err(_) => {
                    skipped += 1;
                    continue;
                }
            },
        };
        out.push(got);
    }
    Ok((out, skipped))
}

/// How corrections changed the train rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merge {
    /// Corrections added as new train rows.
    pub added: usize,
    /// Train rows whose label a correction replaced (same text).
    pub relabeled: usize,
    /// Corrections of texts that are dev rows: kept out of training, so the dev comparison
    /// of old and new stays fair.
    pub in_dev: usize,
    /// Corrections superseded by a later one for the same text.
    pub superseded: usize,
}

/// The train rows with the task's label corrections applied: a later correction of the
/// same text wins; a correction of a train row's text relabels it; the rest are appended.
pub fn merge(
    train: Vec<Example>,
    dev: &[Example],
    feedback: &[Feedback],
    task: &str,
) -> (Vec<Example>, Merge) {
    let dev_texts: HashSet<String> = dev.iter().map(|e| e.text().to_string()).collect();
    let mut m = Merge::default();
    // The last correction of each text, in the order the texts were first corrected.
    let mut latest: Vec<(String, String)> = Vec::new();
    for f in feedback {
        let Feedback::Label(f) = f else { continue };
        if f.task != task {
            continue;
        }
        match latest.iter_mut().find(|(t, _)| *t == f.text) {
            Some(slot) => {
                slot.1 = f.label.clone();
                m.superseded += 1;
            }
            None => latest.push((f.text.clone(), f.label.clone())),
        }
    }
    let mut train = train;
    let mut out_of_train = Vec::new();
    for (text, label) in latest {
        if dev_texts.contains(&text) {
            m.in_dev += 1;
            continue;
        }
        let mut found = false;
        for e in train.iter_mut().filter(|e| e.text() == text) {
            found = true;
            if e.label != label {
                e.label = label.clone();
                m.relabeled += 1;
            }
        }
        if !found {
            out_of_train.push(Example {
                request: Request::text(format!("feedback-{}", m.added + 1), text),
                label,
                split: Some("feedback".into()),
            });
            m.added += 1;
        }
    }
    train.extend(out_of_train);
    (train, m)
}

#[cfg(test)]
#[path = "feedback_tests.rs"]
mod tests;
