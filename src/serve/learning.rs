//! The daemon's side of learning from feedback (`<prefix>/feedback`): each record is
//! validated ([`crate::eval::feedback`]) and appended, synced, to its task's log before the
//! broker gets its PUBACK; corrections are counted per task until a retrain is due (after
//! `retrain_after` new ones, or `retrain_interval` after the first one not yet learned), and
//! the retrain reports ([`RetrainReport`]) go into `<prefix>/stats`. Pure bookkeeping: the
//! retrain itself runs on the learner thread ([`super::learner`]).
//!
//! A record with an `id` that is already kept (the broker delivers a message again when our
//! PUBACK was lost in a reconnect or a crash) is acknowledged again but neither written nor
//! counted a second time: the last [`RECENT_IDS`] ids per task are remembered, seeded from
//! the task's log the first time the task sends feedback.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::eval::feedback::{self, Feedback, FeedbackError, FeedbackLog, FeedbackRules};

/// When `serve` retrains, and within what memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnSettings {
    /// New corrections of a task that start its retrain.
    pub retrain_after: usize,
    /// Longest wait from the first correction not yet learned to its retrain.
    pub retrain_interval: Duration,
    /// Most memory a retrain may hold besides the running model (features of the train
    /// and dev rows, the fit); a larger one is refused with a log line.
    pub max_bytes: u64,
    /// Texts per feature job handed to the inference thread.
    pub feature_chunk: usize,
    /// Largest corrected text, in bytes.
    pub max_text_bytes: usize,
}

/// How one retrain ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetrainReport {
    pub task: String,
    /// `swapped`, `kept`, `refused` (over the memory bound) or `failed`.
    pub outcome: String,
    pub dev_macro_f1_old: Option<f64>,
    pub dev_macro_f1_new: Option<f64>,
    /// Corrections the retrain learned from (all kept for the task).
    pub n_feedback: usize,
    pub n_train: usize,
    pub ms: u64,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Ids of kept records remembered per task, to recognise a message delivered again.
pub const RECENT_IDS: usize = 4096;

/// Asks the learner thread for a retrain of a task; false when it cannot take it.
pub type RetrainSender = Box<dyn FnMut(&str) -> bool + Send>;

/// Feedback counters and the retrain schedule.
pub struct Learning {
    rules: FeedbackRules,
    log: FeedbackLog,
    settings: LearnSettings,
    /// Tasks a retrain can run for (a learned method and a `[train]` source).
    learnable: BTreeSet<String>,
    /// New corrections by task, and when the first of them came.
    pending: BTreeMap<String, (usize, Instant)>,
    running: BTreeSet<String>,
    send: RetrainSender,
    received: u64,
    rejected: u64,
    write_errors: u64,
    /// Corrections learned by a retrain that was swapped in.
    applied: u64,
    retrains: u64,
    duplicates: u64,
    last: Option<RetrainReport>,
    recent: BTreeMap<String, RecentIds>,
}

/// The last [`RECENT_IDS`] record keys (id and content) kept for one task.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    fn contains(&self, key: &str) -> bool {
        self.set.contains(key)
    }

    fn insert(&mut self, key: String) {
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
            if self.order.len() > RECENT_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// A record's identity for redelivery: its id with its whole content, so a different
/// record that reuses an id is still kept. None for a record without an id.
fn redelivery_key(f: &Feedback) -> Option<String> {
    f.id()?;
    serde_json::to_string(f).ok()
}

/// What became of a feedback message.
#[derive(Debug)]
pub enum Accepted {
    /// Kept on disk: acknowledge it.
    Kept(Feedback),
    /// Invalid: answer with an error record (and acknowledge).
    Invalid(FeedbackError),
    /// Could not be written: leave it to the broker to deliver again.
    NotKept(FeedbackError),
    /// Already kept (same id and content): acknowledge it again, nothing else.
    Duplicate,
}

impl Learning {
    pub fn new(
        rules: FeedbackRules,
        log: FeedbackLog,
        learnable: BTreeSet<String>,
        settings: LearnSettings,
        send: RetrainSender,
    ) -> Learning {
        Learning {
            rules,
            log,
            settings,
            learnable,
            pending: BTreeMap::new(),
            running: BTreeSet::new(),
            send,
            received: 0,
            rejected: 0,
            write_errors: 0,
            applied: 0,
            retrains: 0,
            duplicates: 0,
            last: None,
            recent: BTreeMap::new(),
        }
    }

    /// The task's remembered ids, read from its log the first time.
    fn recent_ids(&mut self, task: &str) -> &mut RecentIds {
        let log = &self.log;
        self.recent.entry(task.to_string()).or_insert_with(|| {
            let mut r = RecentIds::default();
            match log.read(task) {
                Ok((kept, _)) => kept
                    .iter()
                    .filter_map(redelivery_key)
                    .for_each(|k| r.insert(k)),
                Err(e) => tracing::warn!(task, "feedback log not read for redeliveries: {e}"),
            }
            r
        })
    }

    /// Validates and keeps one payload (synced before this returns).
    pub fn accept(&mut self, payload: &[u8], now: Instant) -> Accepted {
        let f = match feedback::parse(payload, &self.rules) {
            Ok(f) => f,
            Err(e) => {
                self.rejected += 1;
                return Accepted::Invalid(e);
            }
        };
        let key = redelivery_key(&f);
        if let Some(k) = &key {
            if self.recent_ids(f.task()).contains(k) {
                self.duplicates += 1;
                return Accepted::Duplicate;
            }
        }
        if let Err(e) = self.log.append(std::slice::from_ref(&f)) {
            self.write_errors += 1;
            return Accepted::NotKept(e);
        }
        if let Some(k) = key {
            self.recent_ids(f.task()).insert(k);
        }
        self.received += 1;
        if matches!(f, Feedback::Label(_)) && self.learnable.contains(f.task()) {
            let e = self.pending.entry(f.task().to_string()).or_insert((0, now));
            e.0 += 1;
        }
        Accepted::Kept(f)
    }

    /// Starts the retrains that are due: a task with `retrain_after` new corrections, or
    /// with one waiting `retrain_interval`; one at a time per task.
    pub fn start_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(t, (n, first))| {
                !self.running.contains(*t)
                    && (*n >= self.settings.retrain_after
                        || now.duration_since(*first) >= self.settings.retrain_interval)
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in due {
            if (self.send)(&t) {
                self.pending.remove(&t);
                self.running.insert(t);
            } else {
                tracing::warn!(task = %t, "the learner cannot take a retrain now; trying later");
            }
        }
    }

    /// A retrain ended.
    pub fn finished(&mut self, r: RetrainReport) {
        self.running.remove(&r.task);
        self.retrains += 1;
        if r.outcome == "swapped" {
            self.applied += r.n_feedback as u64;
        }
        match r.outcome.as_str() {
            "swapped" | "kept" => tracing::info!(
                task = %r.task,
                old = ?r.dev_macro_f1_old,
                new = ?r.dev_macro_f1_new,
                "retrain from feedback: {}",
                r.outcome
            ),
            _ => tracing::warn!(
                task = %r.task,
                "retrain from feedback {}: {}",
                r.outcome,
                r.reason.as_deref().unwrap_or("")
            ),
        }
        self.last = Some(r);
    }

    /// The `feedback` object of `<prefix>/stats`.
    pub fn stats(&self) -> Value {
        let pending: usize = self.pending.values().map(|(n, _)| n).sum();
        json!({
            "received_total": self.received,
            "rejected_total": self.rejected,
            "write_errors_total": self.write_errors,
            "duplicates_total": self.duplicates,
            "pending": pending,
            "applied_total": self.applied,
            "retrains_total": self.retrains,
            "retraining": self.running.iter().collect::<Vec<_>>(),
            "last_retrain": self.last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::feedback::FeedbackKind;
    use std::sync::{Arc, Mutex};

    fn learning(dir: &std::path::Path, asked: Arc<Mutex<Vec<String>>>) -> Learning {
        let rules = FeedbackRules::new(
            [(
                "s".to_string(),
                FeedbackKind::Labels(vec!["a".into(), "b".into()]),
            )],
            100,
        );
        Learning::new(
            rules,
            FeedbackLog::new(dir),
            ["s".to_string()].into(),
            LearnSettings {
                retrain_after: 2,
                retrain_interval: Duration::from_secs(60),
                max_bytes: 1 << 30,
                feature_chunk: 4,
                max_text_bytes: 100,
            },
            Box::new(move |t| {
                asked.lock().unwrap().push(t.to_string());
                true
            }),
        )
    }

    #[test]
    fn records_are_kept_counted_and_start_a_retrain_by_count_or_time() {
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut l = learning(dir.path(), asked.clone());
        let t0 = Instant::now();
        let ok = br#"{"task":"s","text":"x","label":"a"}"#;
        assert!(matches!(l.accept(ok, t0), Accepted::Kept(_)));
        assert!(matches!(
            l.accept(br#"{"task":"s","text":"x","label":"z"}"#, t0),
            Accepted::Invalid(_)
        ));
        l.start_due(t0);
        assert!(
            asked.lock().unwrap().is_empty(),
            "one correction is not enough"
        );
        // The timer: one correction waiting the interval.
        l.start_due(t0 + Duration::from_secs(61));
        assert_eq!(*asked.lock().unwrap(), ["s"]);
        // While it runs, new corrections wait for it.
        l.accept(ok, t0);
        l.accept(ok, t0);
        l.start_due(t0);
        assert_eq!(asked.lock().unwrap().len(), 1);
        l.finished(RetrainReport {
            task: "s".into(),
            outcome: "swapped".into(),
            dev_macro_f1_old: Some(0.5),
            dev_macro_f1_new: Some(0.6),
            n_feedback: 1,
            n_train: 10,
            ms: 5,
            reason: None,
        });
        // By count: two new corrections.
        l.start_due(t0);
        assert_eq!(asked.lock().unwrap().len(), 2);
        let s = l.stats();
        assert_eq!(s["received_total"], 3);
        assert_eq!(s["rejected_total"], 1);
        assert_eq!(s["applied_total"], 1);
        assert_eq!(s["last_retrain"]["outcome"], "swapped");
        assert_eq!(s["last_retrain"]["dev_macro_f1_new"], 0.6);
        let (kept, _) = FeedbackLog::new(dir.path()).read("s").unwrap();
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn a_record_delivered_again_is_acknowledged_but_kept_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let with_id = br#"{"task":"s","text":"x","label":"a","id":"m1"}"#;
        let mut l = learning(dir.path(), asked.clone());
        assert!(matches!(l.accept(with_id, t0), Accepted::Kept(_)));
        assert!(matches!(l.accept(with_id, t0), Accepted::Duplicate));
        // The same id with other content is another record; no id: never a duplicate.
        let reused = br#"{"task":"s","text":"y","label":"b","id":"m1"}"#;
        assert!(matches!(l.accept(reused, t0), Accepted::Kept(_)));
        let no_id = br#"{"task":"s","text":"x","label":"a"}"#;
        assert!(matches!(l.accept(no_id, t0), Accepted::Kept(_)));
        assert!(matches!(l.accept(no_id, t0), Accepted::Kept(_)));
        let s = l.stats();
        assert_eq!(s["received_total"], 4);
        assert_eq!(s["duplicates_total"], 1);
        assert_eq!(s["pending"], 4);
        // After a restart the log tells what was kept: a redelivery is still recognised.
        let mut again = learning(dir.path(), asked);
        assert!(matches!(again.accept(with_id, t0), Accepted::Duplicate));
        assert!(matches!(again.accept(reused, t0), Accepted::Duplicate));
        let (kept, _) = FeedbackLog::new(dir.path()).read("s").unwrap();
        assert_eq!(kept.len(), 4);
    }

    #[test]
    fn a_record_that_cannot_be_written_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the folder should be.
        let blocked = dir.path().join("f");
        std::fs::write(&blocked, "").unwrap();
        let mut l = learning(&blocked, Arc::new(Mutex::new(Vec::new())));
        let got = l.accept(br#"{"task":"s","text":"x","label":"a"}"#, Instant::now());
        assert!(matches!(got, Accepted::NotKept(_)), "{got:?}");
        assert_eq!(l.stats()["write_errors_total"], 1);
        assert_eq!(l.stats()["pending"], 0);
    }
}
