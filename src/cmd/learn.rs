//! `edgeact learn`: learning from corrected labels. The corrections (a JSON-lines file of
//! `{"task", "text", "label", "id"?}`) are validated and appended to the task's feedback
//! log in the state folder (the one `serve`'s feedback topic writes); the task's head,
//! stack or TF-IDF model is fitted again, with the parameters `tune` chose, on its train
//! rows plus every correction kept; old and new are scored on the dev rows, and the new
//! one replaces the files only if its dev macro-F1 is not lower ([`crate::eval::retrain`]).

use std::io::Write;
use std::path::PathBuf;

use super::AppError;
use crate::classify::features::FeatureTokenizer;
use crate::classify::head::HeadError;
use crate::classify::runner::Learned;
use crate::classify::SetupError;
use crate::eval::feedback::{self, Feedback, FeedbackLog, FeedbackRules};
use crate::eval::learn::FeatureStore;
use crate::eval::retrain::{self, RetrainError, RetrainRecord, Verdict};
use crate::eval::select::Split;
use crate::model::config::EngineConfig;
use crate::model::{Engine, FeatureParams, PooledStates};
use crate::spec::Task;

/// Settings of `edgeact learn`.
#[derive(Debug, Clone)]
pub struct LearnRunConfig {
    pub engine: EngineConfig,
    pub task: Task,
    /// Corrections to add (None: retrain from the ones already kept).
    pub feedback: Option<PathBuf>,
    /// Folder of the feedback log (`serve`'s state folder).
    pub state_dir: PathBuf,
    pub features: FeatureParams,
    pub cache_dir: Option<PathBuf>,
    /// Largest corrected text, in bytes.
    pub max_text_bytes: usize,
    /// Progress bars on stderr.
    pub progress: bool,
}

fn setup_err(task: &Task) -> impl Fn(HeadError) -> AppError + '_ {
    move |source| {
        AppError::Setup(SetupError::Head {
            task: task.name.clone(),
            source,
        })
    }
}

fn retrain_err(task: &Task, e: RetrainError) -> AppError {
    match e {
        RetrainError::Eval(e) => AppError::Eval(e),
        RetrainError::Head(e) => setup_err(task)(e),
        e @ RetrainError::NoSource { .. } => setup_err(task)(HeadError::Train(e.to_string())),
    }
}

fn feedback_err(e: feedback::FeedbackError) -> AppError {
    AppError::Input {
        what: "feedback".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Adds the corrections to the log, retrains, and writes the new model if it is not worse.
pub fn run(cfg: LearnRunConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let task = &cfg.task;
    let w = |out: &mut dyn Write, s: String| writeln!(out, "{s}").map_err(AppError::Output);
    // Before anything is kept: a task that cannot be retrained is said at once.
    let (path, learned, method) = retrain::load_learned(task).map_err(setup_err(task))?;
    let all = keep_feedback(&cfg, out)?;
    if all.is_empty() {
        return w(
            out,
            format!("no corrections kept for `{}`: nothing to learn", task.name),
        );
    }
    let rows = retrain::rows(task, &all).map_err(|e| retrain_err(task, e))?;
    let m = &rows.merge;
    w(
        out,
        format!(
            "rows: {} train ({} corrections added, {} relabeled, {} superseded, {} on dev rows kept out) and {} dev, from {}",
            rows.train.len(), m.added, m.relabeled, m.superseded, m.in_dev, rows.dev.len(),
            rows.data.display()
        ),
    )?;
    let labels = learned.labels().to_vec();
    let (tx, ty) = retrain::texts_and_labels(&labels, &rows.train).map_err(setup_err(task))?;
    let (dx, dy) = retrain::texts_and_labels(&labels, &rows.dev).map_err(setup_err(task))?;
    let (ts, ds) = match learned.feature() {
        Some(_) => features(&cfg, &learned, (&tx, &dx))?,
        None => (Vec::new(), Vec::new()),
    };
    let est = retrain::retrain_bytes(&learned, tx.len() + dx.len());
    w(
        out,
        format!(
            "fitting {} ({} labels) on {} rows: about {:.1} MiB besides the model",
            method.name(),
            learned.labels().len(),
            tx.len(),
            est as f64 / (1024.0 * 1024.0)
        ),
    )?;
    let bar = spinner(
        cfg.progress,
        format!(
            "fitting on {} rows, scoring old and new on {} dev rows",
            tx.len(),
            dx.len()
        ),
    );
    let c = retrain::fit_and_compare(
        &learned,
        Split {
            texts: &tx,
            states: &ts,
            y: &ty,
        },
        Split {
            texts: &dx,
            states: &ds,
            y: &dy,
        },
    )
    .map_err(setup_err(task))?;
    bar.finish_and_clear();
    let verdict = Verdict::of(c.old.macro_f1, c.new.macro_f1);
    let line = format!(
        "dev macro-F1 old {:.4} new {:.4} ({:+.4}), accuracy old {:.4} new {:.4}, {} dev rows, fit {:.0} ms",
        c.old.macro_f1,
        c.new.macro_f1,
        verdict.delta(),
        c.old.accuracy,
        c.new.accuracy,
        c.new.n,
        c.fit_ms
    );
    if !verdict.swapped() {
        return w(out, format!("kept the old model: {line}; files unchanged"));
    }
    let rec = RetrainRecord {
        by: "edgeact learn",
        n_train: tx.len(),
        n_feedback: all.len(),
        dev: &c.new,
    };
    retrain::save_retrained(task, &path, &learned, c.model, &rec).map_err(setup_err(task))?;
    w(
        out,
        format!(
            "swapped in the new model: {line}; wrote {} and {}",
            path.display(),
            task.path.display()
        ),
    )
}

/// A spinner on stderr while the fit runs (hidden when stderr is not a terminal).
fn spinner(show: bool, msg: String) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(msg);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// Validates the new corrections, appends those not kept yet to the task's log (synced),
/// and returns every correction kept for the task.
fn keep_feedback(cfg: &LearnRunConfig, out: &mut dyn Write) -> Result<Vec<Feedback>, AppError> {
    let log = FeedbackLog::new(&cfg.state_dir);
    let (mut kept, torn) = log.read(&cfg.task.name).map_err(feedback_err)?;
    let mut new = Vec::new();
    if let Some(path) = &cfg.feedback {
        let rules = FeedbackRules::for_task(&cfg.task, cfg.max_text_bytes);
        let (given, _) = feedback::read_file(path, Some(&rules)).map_err(feedback_err)?;
        for f in given {
            // The same file given twice adds nothing the second time.
            if !kept.contains(&f) && !new.contains(&f) {
                new.push(f);
            }
        }
        log.append(&new).map_err(feedback_err)?;
    }
    writeln!(
        out,
        "feedback: {} new, {} kept in all in {}{}",
        new.len(),
        kept.len() + new.len(),
        log.path(&cfg.task.name).display(),
        if torn > 0 {
            format!(" ({torn} damaged line(s) skipped)")
        } else {
            String::new()
        }
    )
    .map_err(AppError::Output)?;
    kept.extend(new);
    Ok(kept)
}

/// Pooled states of the train and dev texts on the model the learned file was made with
/// (through the feature cache; progress bars on stderr).
fn features(
    cfg: &LearnRunConfig,
    learned: &Learned,
    (tx, dx): (&[&str], &[&str]),
) -> Result<(Vec<PooledStates>, Vec<PooledStates>), AppError> {
    let task = &cfg.task;
    let err = setup_err(task);
    let Some(spec) = learned.feature() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let engine = Engine::load(
        &crate::spec::config_for_tasks(&cfg.engine, std::slice::from_ref(task))?,
        1,
    )?;
    let sha = match learned {
        Learned::Head(h) => Some(h.model_sha256.as_str()),
        Learned::Stack(s) => s.model_sha256.as_deref(),
    };
    if sha != Some(engine.info.sha256.as_str()) {
        return Err(err(HeadError::Invalid {
            path: task.head_path().unwrap_or_default(),
            reason: format!(
                "trained on the hidden states of model {}, this model is {}",
                sha.unwrap_or("(none)"),
                engine.info.sha256
            ),
        }));
    }
    let mut fctx = engine
        .feature_context(cfg.features)
        .map_err(|e| err(e.into()))?;
    let tok = FeatureTokenizer::new(&engine, spec, fctx.max_tokens()).map_err(&err)?;
    let mut store = FeatureStore::open(cfg.cache_dir.as_deref(), &engine, spec, &tok);
    let ts = store
        .states(&engine, &mut fctx, spec, tx, cfg.progress, "train features")
        .map_err(&err)?;
    let ds = store
        .states(&engine, &mut fctx, spec, dx, cfg.progress, "dev features")
        .map_err(&err)?;
    Ok((ts, ds))
}
