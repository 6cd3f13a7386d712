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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::linear::LrParams;
    use crate::classify::stack::{StackFile, StackModel, StackParams};
    use crate::classify::tfidf::TextParams;
    use crate::eval::feedback::{Feedback, LabelFeedback};
    use std::time::Duration;

    /// A TF-IDF task tuned on two rows, its data, and three corrections kept in `state`.
    fn tuned(dir: &std::path::Path) -> Task {
        let rows = [
            ("good film", "pos", "train"),
            ("bad film", "neg", "train"),
            ("awful story", "neg", "dev"),
            ("lovely story", "pos", "dev"),
        ];
        let data: String = rows
            .iter()
            .map(|(t, l, s)| {
                format!(
                    "{}\n",
                    serde_json::json!({"text": t, "label": l, "split": s})
                )
            })
            .collect();
        std::fs::write(dir.join("d.jsonl"), data).unwrap();
        std::fs::write(
            dir.join("t.toml"),
            "name = \"t\"\ninstruction = \"x\"\nquery = \"T: {text}\\nL:\"\nlabels = [{ name = \"pos\", text = \" p\" }, { name = \"neg\", text = \" n\" }]\n[head]\nfile = \"t.stack.json\"\nmethod = \"tfidf\"\n[train]\ndata = \"d.jsonl\"\ntrain_split = \"train\"\ndev_split = \"dev\"\n",
        )
        .unwrap();
        let p = StackParams {
            dense: None,
            text: Some(TextParams::words()),
            prompt: None,
            lr: LrParams::default(),
        };
        let m = StackModel::fit(&["good film", "bad film"], &[], &[0, 1], 2, &p).unwrap();
        StackFile::new(vec!["pos".into(), "neg".into()], None, 0, m)
            .save(&dir.join("t.stack.json"))
            .unwrap();
        let fb: Vec<Feedback> = [
            ("awful plot", "neg"),
            ("lovely plot", "pos"),
            ("awful acting", "neg"),
        ]
        .iter()
        .map(|(t, l)| {
            Feedback::Label(LabelFeedback {
                task: "t".into(),
                text: t.to_string(),
                label: l.to_string(),
                id: None,
            })
        })
        .collect();
        FeedbackLog::new(dir.join("state")).append(&fb).unwrap();
        Task::load(&dir.join("t.toml")).unwrap()
    }

    fn settings(max_bytes: u64) -> LearnSettings {
        LearnSettings {
            retrain_after: 1,
            retrain_interval: Duration::from_secs(60),
            max_bytes,
            feature_chunk: 4,
            max_text_bytes: 100,
        }
    }

    /// Runs one retrain of `t` on the learner thread; the inference thread's part (a
    /// reload) is answered by a stand-in that records it.
    fn retrain(dir: &std::path::Path, task: Task, max_bytes: u64) -> (RetrainReport, usize) {
        let (bg_tx, bg_rx) = std::sync::mpsc::channel::<Background>();
        let reloads = std::thread::spawn(move || {
            let mut n = 0;
            for job in bg_rx {
                if let Background::Reload { reply, .. } = job {
                    n += 1;
                    let _ = reply.send(Ok(()));
                }
            }
            n
        });
        let (rep_tx, rep_rx) = std::sync::mpsc::channel();
        let mut send = spawn(
            vec![LearnableTask { index: 0, task }],
            FeedbackLog::new(dir.join("state")),
            settings(max_bytes),
            bg_tx,
            move |r| {
                let _ = rep_tx.send(r);
            },
        )
        .unwrap();
        assert!(send("t"));
        let report = rep_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        drop(send);
        (report, reloads.join().unwrap())
    }

    #[test]
    fn a_retrain_over_the_memory_bound_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let task = tuned(dir.path());
        let before = std::fs::read(dir.path().join("t.stack.json")).unwrap();
        let (r, reloads) = retrain(dir.path(), task, 1);
        assert_eq!(r.outcome, "refused", "{r:?}");
        assert!(
            r.reason.as_deref().unwrap().contains("over the bound"),
            "{r:?}"
        );
        assert_eq!(reloads, 0);
        assert_eq!(
            std::fs::read(dir.path().join("t.stack.json")).unwrap(),
            before
        );
    }

    #[test]
    fn a_better_model_is_written_and_the_runner_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let task = tuned(dir.path());
        let (r, reloads) = retrain(dir.path(), task, 1 << 30);
        assert_eq!(r.outcome, "swapped", "{r:?}");
        assert!(
            r.dev_macro_f1_new.unwrap() >= r.dev_macro_f1_old.unwrap(),
            "{r:?}"
        );
        assert_eq!((r.n_feedback, r.n_train), (3, 5));
        assert_eq!(reloads, 1);
        let t = Task::load(&dir.path().join("t.toml")).unwrap();
        assert_eq!(t.measured.unwrap()["n_feedback"].as_integer(), Some(3));
    }
}
