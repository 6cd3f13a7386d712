//! Retraining a task's head or stack from feedback: the parameters `edgeact tune` chose
//! are read back from the learned file ([`params_of`]), the model is fitted again on the
//! train rows with the corrections ([`super::feedback::merge`]), old and new are scored on
//! the same dev rows, and the new one replaces the old files (atomically: written aside,
//! synced, renamed) only if its dev macro-F1 is not lower ([`Verdict`]). Used by
//! `edgeact learn` and by `serve`'s background retrain.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::classify::head::{HeadError, HeadFile};
use crate::classify::linear::LrParams;
use crate::classify::runner::Learned;
use crate::classify::stack::{StackFile, StackModel, StackParams};
use crate::classify::tfidf::TextFeaturizer;
use crate::eval::feedback::{self, Feedback, Merge};
use crate::eval::learn::{per_class_upto, score_probs, Shortfall};
use crate::eval::metrics::Metrics;
use crate::eval::select::{fit_temperature, Split};
use crate::eval::{check_labels, read_labeled, EvalError, Example};
use crate::spec::{Method, Task};

/// Why a retrain could not run.
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(
        "task `{task}` has no [train] table saying where its train and dev rows come from: \
         tune it again (`edgeact tune`), which records it"
    )]
    NoSource { task: String },
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Head(#[from] HeadError),
}

/// The rows of a retrain: the task's train rows (K per label as tuned) with the
/// corrections merged in, and its dev rows.
pub struct Rows {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub merge: Merge,
    /// Labels with fewer train rows than the tuned K.
    pub short: Vec<Shortfall>,
    pub data: PathBuf,
}

/// Rebuilds the train and dev rows from the task's `[train]` source and merges `feedback`.
pub fn rows(task: &Task, feedback: &[Feedback]) -> Result<Rows, RetrainError> {
    let src = task.train.as_ref().ok_or_else(|| RetrainError::NoSource {
        task: task.name.clone(),
    })?;
    let data = src.data_path(&task.path);
    let dev = read_labeled(
        &data,
        Some(&src.dev_split),
        src.dev_limit.unwrap_or(usize::MAX),
    )?;
    check_labels(task, &dev, &data)?;
    let pool = read_labeled(&data, Some(&src.train_split), usize::MAX)?;
    let (train, short) = per_class_upto(task, &pool, src.per_class.unwrap_or(usize::MAX))?;
    let (train, merge) = feedback::merge(train, &dev, feedback, &task.name);
    Ok(Rows {
        train,
        dev,
        merge,
        short,
        data,
    })
}

/// Texts and label indices (in `labels`' order) of examples.
pub fn texts_and_labels<'a>(
    labels: &[String],
    rows: &'a [Example],
) -> Result<(Vec<&'a str>, Vec<usize>), HeadError> {
    let texts = rows.iter().map(Example::text).collect();
    let y = label_indices(labels, rows.iter().map(|e| e.label.as_str()))?;
    Ok((texts, y))
}

/// The task's learned file, read as its method says.
pub fn load_learned(task: &Task) -> Result<(PathBuf, Learned, Method), HeadError> {
    let (Some(head), Some(path)) = (task.head.as_ref(), task.head_path()) else {
        return Err(HeadError::Train(format!(
            "task `{}` has no [head] (train one with `edgeact tune --methods tfidf,head,stack`)",
            task.name
        )));
    };
    let learned = match head.method {
        Method::Stack | Method::Tfidf => {
            let stack = StackFile::load(&path)?;
            if stack.stack.prompt.is_some() {
                // Its third block is the prompt's label scores of every train row: a refit
                // would have to run the prompt over all of them, which this path does not.
                return Err(HeadError::Train(format!(
                    "task `{}`: its stack includes the prompt's label scores, which a retrain \
                     cannot recompute yet; add the corrections to the data and run `edgeact tune` again",
                    task.name
                )));
            }
            Learned::Stack(stack)
        }
        Method::Head | Method::Both => Learned::Head(HeadFile::load(&path)?),
        Method::Prompt => {
            return Err(HeadError::Train(format!(
                "task `{}` classifies by its prompt (method prompt): nothing to retrain",
                task.name
            )))
        }
    };
    Ok((path, learned, head.method))
}

/// The fitting parameters of a learned file: the same blocks, block weight and L2
/// strength that `edgeact tune` chose.
pub fn params_of(learned: &Learned) -> StackParams {
    match learned {
        Learned::Head(h) => {
            // A head is the model block alone, each standardized feature unscaled (see
            // `select::fit_one`): weight sqrt(width) gives scale 1.
            let width = h.head.standardizer.mean.len().max(1);
            StackParams {
                dense: Some((h.feature.clone(), (width as f64).sqrt())),
                text: None,
                prompt: None,
                lr: LrParams {
                    alpha: h.train.alpha,
                    max_iterations: h.train.max_iterations as usize,
                    balanced: true,
                },
            }
        }
        Learned::Stack(s) => StackParams {
            dense: s.stack.dense.as_ref().map(|d| {
                let width = d.standardizer.mean.len().max(1);
                (d.feature.clone(), d.scale * (width as f64).sqrt())
            }),
            text: s.stack.text.as_ref().map(|t| t.params),
            // load_learned refuses stacks with the prompt block.
            prompt: None,
            lr: s.stack.lr,
        },
    }
}

/// Label indices of `labels` (the learned file's order) for label names; an unknown name is
/// an error naming it.
pub fn label_indices<'a>(
    labels: &[String],
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<usize>, HeadError> {
    names
        .into_iter()
        .map(|n| {
            labels.iter().position(|l| l == n).ok_or_else(|| {
                HeadError::Train(format!(
                    "label `{n}` is not one of the learned file's labels"
                ))
            })
        })
        .collect()
}

/// Old and new on the same dev rows.
pub struct Compared {
    pub model: StackModel,
    pub old: Metrics,
    pub new: Metrics,
    pub fit_ms: f64,
}

/// Whether the new model replaces the old one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Dev macro-F1 is not lower: the new one goes in.
    Swapped { delta: f64 },
    /// Dev macro-F1 is lower: the old one stays.
    Kept { delta: f64 },
}

impl Verdict {
    pub fn of(old_macro_f1: f64, new_macro_f1: f64) -> Verdict {
        let delta = new_macro_f1 - old_macro_f1;
        // Scores are sums of a few hundred terms: a difference this small is a tie.
        if delta >= -1e-9 {
            Verdict::Swapped { delta }
        } else {
            Verdict::Kept { delta }
        }
    }

    pub fn swapped(&self) -> bool {
        matches!(self, Verdict::Swapped { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Swapped { .. } => "swapped",
            Verdict::Kept { .. } => "kept",
        }
    }

    pub fn delta(&self) -> f64 {
        match self {
            Verdict::Swapped { delta } | Verdict::Kept { delta } => *delta,
        }
    }
}

/// Scores `learned` on dev and fits a new model with its parameters on train (label indices
/// in the file's order; states only when the file reads the model's features).
pub fn fit_and_compare(
    learned: &Learned,
    train: Split<'_>,
    dev: Split<'_>,
) -> Result<Compared, HeadError> {
    let labels = learned.labels().to_vec();
    let re = TextFeaturizer::regex();
    let old_probs: Vec<Vec<f64>> = dev
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| learned.predict(&re, t, dev.states.get(i)))
        .collect();
    let old = score_probs(&labels, dev.y, &old_probs);
    let t0 = Instant::now();
    let mut model = StackModel::fit(
        train.texts,
        train.states,
        train.y,
        labels.len(),
        &params_of(learned),
    )?;
    let fit_ms = t0.elapsed().as_secs_f64() * 1e3;
    let new_probs: Vec<Vec<f64>> = dev
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| model.predict(&re, t, dev.states.get(i)))
        .collect();
    let new = score_probs(&labels, dev.y, &new_probs);
    // As `tune` does: the refit's temperature from the same dev rows (its top labels, and
    // so the verdict, do not depend on it).
    fit_temperature(&mut model, &new_probs, dev.y);
    Ok(Compared {
        model,
        old,
        new,
        fit_ms,
    })
}

/// Bytes a retrain holds besides the running model, estimated from the row counts and the
/// old model's shape: the pooled states (last and mean) and the two copies of each dense
/// row the fit makes, about 2 KiB of n-grams a row, and L-BFGS's vectors (about 20 f64 per
/// weight, the vocabulary allowed to grow by a tenth).
pub fn retrain_bytes(learned: &Learned, n_rows: usize) -> u64 {
    let (dense, n_sparse, n_labels, n_embd) = match learned {
        Learned::Head(h) => (h.head.standardizer.mean.len(), 0, h.labels.len(), h.n_embd),
        Learned::Stack(s) => (
            s.stack.model.n_dense,
            s.stack.model.n_sparse,
            s.labels.len(),
            s.n_embd,
        ),
    };
    let states = if learned.feature().is_some() {
        8 * n_embd + 8 * dense
    } else {
        0
    };
    let text = if n_sparse > 0 { 2048 } else { 0 };
    let n_feat = dense + n_sparse + n_sparse / 10 + 1;
    (n_rows * (states + text + 64)) as u64 + 160 * (n_feat * n_labels) as u64
}

/// Replaces `path` with `bytes` atomically: written to a sibling, synced, renamed over it,
/// the folder synced; owner-only (a TF-IDF vocabulary holds words of the feedback).
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    crate::util::private::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Makes the rename durable; a folder that cannot be opened this way (some
        // filesystems) still has the renamed file.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// What a retrain writes into the learned file's and the task file's `measured`.
pub struct RetrainRecord<'a> {
    pub by: &'a str,
    pub n_train: usize,
    pub n_feedback: usize,
    pub dev: &'a Metrics,
}

fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Writes the new model over the task's learned file (same kind, labels and model as the
/// old) and the task file with the new dev scores, each atomically, learned file first.
pub fn save_retrained(
    task: &Task,
    path: &Path,
    old: &Learned,
    model: StackModel,
    rec: &RetrainRecord<'_>,
) -> Result<(), HeadError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| HeadError::Io { path: p, source }
    };
    let mut measured = std::collections::BTreeMap::new();
    measured.insert("by".to_string(), rec.by.into());
    measured.insert("n_train".into(), rec.n_train.into());
    measured.insert("n_feedback".into(), rec.n_feedback.into());
    measured.insert("dev_n".into(), rec.dev.n.into());
    measured.insert("dev_accuracy".into(), r4(rec.dev.accuracy).into());
    measured.insert("dev_macro_f1".into(), r4(rec.dev.macro_f1).into());
    let json = match old {
        Learned::Head(h) => {
            let Some((feature, head)) = model.to_linear_head() else {
                return Err(HeadError::Train("the refit head has a text block".into()));
            };
            let mut f = h.clone();
            f.feature = feature;
            f.head = head;
            f.measured.extend(measured);
            serde_json::to_vec(&f)
        }
        Learned::Stack(s) => {
            let mut f = s.clone();
            f.stack = model;
            f.measured.extend(measured);
            serde_json::to_vec(&f)
        }
    }
    .map_err(|e| HeadError::Train(e.to_string()))?;
    replace_file(path, &json).map_err(io(path))?;
    let mut t = task.clone();
    let m = t.measured.get_or_insert_with(toml::Table::new);
    m.insert("retrained_by".into(), rec.by.into());
    m.insert("n_train".into(), (rec.n_train as i64).into());
    m.insert("n_feedback".into(), (rec.n_feedback as i64).into());
    m.insert("dev_n".into(), (rec.dev.n as i64).into());
    m.insert("dev_macro_f1".into(), r4(rec.dev.macro_f1).into());
    m.insert("dev_accuracy".into(), r4(rec.dev.accuracy).into());
    let text = format!(
        "# Retrained from feedback by {} (dev macro-F1 {:.4}).\n{}",
        rec.by,
        rec.dev.macro_f1,
        t.to_toml()
    );
    replace_file(&task.path, text.as_bytes()).map_err(io(&task.path))
}

#[cfg(test)]
#[path = "retrain_tests.rs"]
mod tests;
