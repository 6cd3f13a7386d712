//! The learner thread of `serve`: retrains a task from its feedback log off the MQTT loop
//! and off the inference thread. The model's features of the train and dev rows are asked
//! of the inference thread in small low-priority chunks (it runs them only when no request
//! waits, [`super::worker::Background`]); the fit runs here; when the new model's dev
//! macro-F1 is not lower, its files replace the old ones (atomically) and the inference
//! thread rebuilds the task's runner between two requests. Each retrain ends with a
//! [`RetrainReport`].

use std::collections::BTreeMap;
use std::sync::mpsc::channel;
use std::time::Instant;

use crate::eval::feedback::{FeedbackKind, FeedbackLog, FeedbackRules};
use crate::eval::retrain::{self, RetrainRecord, Verdict};
use crate::eval::select::Split;
use crate::model::PooledStates;
use crate::serve::learning::{LearnSettings, Learning, RetrainReport, RetrainSender};
use crate::serve::worker::{Background, BackgroundSender, ServedTask};
use crate::spec::{Method, Task};

/// A served task the learner may retrain: its index in the worker and its file.
#[derive(Debug, Clone)]
pub struct LearnableTask {
    pub index: usize,
    pub task: Task,
}

/// Starts the learner thread; the returned sender takes task names to retrain (false when
/// the thread is gone). Reports go to `on_report`.
pub fn spawn(
    tasks: Vec<LearnableTask>,
    log: FeedbackLog,
    settings: LearnSettings,
    background: BackgroundSender,
    on_report: impl Fn(RetrainReport) + Send + 'static,
) -> std::io::Result<RetrainSender> {
    let (tx, rx) = channel::<String>();
    let by_name: BTreeMap<String, LearnableTask> = tasks
        .into_iter()
        .map(|t| (t.task.name.clone(), t))
        .collect();
    std::thread::Builder::new()
        .name("learner".into())
        .spawn(move || {
            for name in rx {
                let Some(t) = by_name.get(&name) else {
                    continue;
                };
                let t0 = Instant::now();
                let mut report = retrain_task(t, &log, &settings, &background);
                report.ms = t0.elapsed().as_millis() as u64;
                on_report(report);
            }
        })?;
    Ok(Box::new(move |name: &str| {
        tx.send(name.to_string()).is_ok()
    }))
}

fn report(task: &str, outcome: &str, reason: Option<String>) -> RetrainReport {
    RetrainReport {
        task: task.into(),
        outcome: outcome.into(),
        dev_macro_f1_old: None,
        dev_macro_f1_new: None,
        n_feedback: 0,
        n_train: 0,
        ms: 0,
        reason,
    }
}

/// One retrain, start to end; never panics on bad data (the report says what failed).
fn retrain_task(
    t: &LearnableTask,
    log: &FeedbackLog,
    settings: &LearnSettings,
    background: &BackgroundSender,
) -> RetrainReport {
    let name = t.task.name.as_str();
    let failed = |reason: String| report(name, "failed", Some(reason));
    // The file as it is now: an earlier retrain may have rewritten it.
    let task = match Task::load(&t.task.path) {
        Ok(task) => task,
        Err(e) => return failed(e.to_string()),
    };
    let (path, learned, _) = match retrain::load_learned(&task) {
        Ok(l) => l,
        Err(e) => return failed(e.to_string()),
    };
    let feedback = match log.read(name) {
        Ok((f, _)) => f,
        Err(e) => return failed(e.to_string()),
    };
    let rows = match retrain::rows(&task, &feedback) {
        Ok(r) => r,
        Err(e) => return failed(e.to_string()),
    };
    let labels = learned.labels().to_vec();
    let (tx, ty, dx, dy) = match (
        retrain::texts_and_labels(&labels, &rows.train),
        retrain::texts_and_labels(&labels, &rows.dev),
    ) {
        (Ok((tx, ty)), Ok((dx, dy))) => (tx, ty, dx, dy),
        (Err(e), _) | (_, Err(e)) => return failed(e.to_string()),
    };
    let need = retrain::retrain_bytes(&learned, tx.len() + dx.len());
    if need > settings.max_bytes {
        let reason = format!(
            "needs about {} MiB for {} train and {} dev rows, over the bound of {} MiB; \
             lower [train] per_class or dev_limit, or raise learn_max_mib (or the budget)",
            need >> 20,
            tx.len(),
            dx.len(),
            settings.max_bytes >> 20
        );
        return report(name, "refused", Some(reason));
    }
    let (ts, ds) = if learned.feature().is_some() {
        match (
            features(background, t.index, &tx, settings.feature_chunk),
            features(background, t.index, &dx, settings.feature_chunk),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return failed(e),
        }
    } else {
        (Vec::new(), Vec::new())
    };
    let _ = background.send(Background::Release);
    let split = |texts, states, y| Split { texts, states, y };
    let c = match retrain::fit_and_compare(&learned, split(&tx, &ts, &ty), split(&dx, &ds, &dy)) {
        Ok(c) => c,
        Err(e) => return failed(e.to_string()),
    };
    let verdict = Verdict::of(c.old.macro_f1, c.new.macro_f1);
    let mut r = report(name, verdict.name(), None);
    r.dev_macro_f1_old = Some(c.old.macro_f1);
    r.dev_macro_f1_new = Some(c.new.macro_f1);
    r.n_feedback = feedback.len();
    r.n_train = tx.len();
    if verdict.swapped() {
        let rec = RetrainRecord {
            by: "edgeact serve",
            n_train: tx.len(),
            n_feedback: feedback.len(),
            dev: &c.new,
        };
        if let Err(e) = retrain::save_retrained(&task, &path, &learned, c.model, &rec) {
            return failed(format!("the new model could not be written: {e}"));
        }
        let (reply, got) = channel();
        let reloaded = background
            .send(Background::Reload {
                task: t.index,
                reply,
            })
            .ok()
            .and_then(|()| got.recv().ok());
        match reloaded {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                r.outcome = "failed".into();
                r.reason = Some(format!(
                    "written, but the task could not be reloaded (the old model serves until restart): {e}"
                ));
            }
            None => {
                r.outcome = "failed".into();
                r.reason = Some("the inference thread is gone".into());
            }
        }
    }
    r
}

/// The pooled states of `texts` from the inference thread, `chunk` texts per job.
fn features(
    background: &BackgroundSender,
    task: usize,
    texts: &[&str],
    chunk: usize,
) -> Result<Vec<PooledStates>, String> {
    let mut out = Vec::with_capacity(texts.len());
    for part in texts.chunks(chunk.max(1)) {
        let (reply, got) = channel();
        background
            .send(Background::Features {
                task,
                texts: part.iter().map(|s| s.to_string()).collect(),
                reply,
            })
            .map_err(|_| "the inference thread is gone".to_string())?;
        let states = got
            .recv()
            .map_err(|_| "the inference thread is gone".to_string())??;
        out.extend(states);
    }
    Ok(out)
}

/// The daemon's [`Learning`] for the served tasks, with the learner thread started when a
/// task can be retrained (a learned method and a `[train]` source); None when no task takes
/// feedback (ReAct tasks only). A retrain's memory is bounded by `learn_max_mib` and by what
/// the board's budget leaves beside the loaded model (`model_estimate_mib`).
pub fn start(
    cfg: &crate::serve::ServeConfig,
    model_estimate_mib: u64,
    background: BackgroundSender,
    on_report: impl Fn(RetrainReport) + Send + 'static,
) -> std::io::Result<Option<Learning>> {
    let mut kinds = Vec::new();
    let mut learnable = Vec::new();
    for (index, t) in cfg.tasks.iter().enumerate() {
        match t {
            ServedTask::Classify(task) => {
                let labels = task.labels.iter().map(|l| l.name.clone()).collect();
                kinds.push((task.name.clone(), FeedbackKind::Labels(labels)));
                let learned = task
                    .head
                    .as_ref()
                    .is_some_and(|h| h.method != Method::Prompt);
                if learned && task.train.is_some() {
                    learnable.push(LearnableTask {
                        index,
                        task: task.clone(),
                    });
                }
            }
            ServedTask::Rank(task, _) => kinds.push((task.name.clone(), FeedbackKind::Rank)),
            ServedTask::React(_) => {}
        }
    }
    if kinds.is_empty() {
        return Ok(None);
    }
    let log = FeedbackLog::new(&cfg.outbox_dir);
    let mut settings = cfg.learn;
    let headroom = cfg
        .engine
        .memory_budget_mib
        .saturating_sub(model_estimate_mib)
        << 20;
    settings.max_bytes = settings.max_bytes.min(headroom);
    if !learnable.is_empty() {
        tracing::info!(
            tasks = learnable.len(),
            max_mib = settings.max_bytes >> 20,
            "retrains from feedback bounded by learn_max_mib and the budget's headroom"
        );
    }
    let names = learnable.iter().map(|t| t.task.name.clone()).collect();
    let send: RetrainSender = if learnable.is_empty() {
        Box::new(|_: &str| false)
    } else {
        spawn(learnable, log.clone(), settings, background, on_report)?
    };
    let rules = FeedbackRules::new(kinds, cfg.learn.max_text_bytes);
    Ok(Some(Learning::new(rules, log, names, settings, send)))
}
