//! The inference thread: owns the backend, model, context and one runner per served task
//! (a classifier, a ranker, or a ReAct loop with its tools); takes work from a bounded
//! queue, micro-batches classifications waiting for the same task, and hands each outcome
//! back. Nothing else touches the model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{
    channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError,
    TrySendError,
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::serve::react_runner;
use crate::serve::turns::BackgroundTurns;

use serde_json::Value;

use crate::classify::runner::{ModelSource, TaskRunner};
use crate::classify::{ClassifyResult, RecordError, Request, ScorePath, SetupError};
use crate::model::config::EngineConfig;
use crate::model::{Engine, EngineError, FeatureContext, ModelInfo, PooledStates};
use crate::rank::{FailedItem, RankConfig, RankRequest, RankResult, Ranker};
use crate::react::generator::{LazyEngine, LazyModel};
use crate::react::request::{ReactRequest, ReactResult};
use crate::react::session::Sessions;
use crate::react::ReactError;
use crate::spec::react::ReactSpec;
use crate::spec::Task;

/// A task the daemon serves, loaded and validated.
#[derive(Debug, Clone)]
pub enum ServedTask {
    /// Label scoring (a task file without `[rank]`).
    Classify(Task),
    /// Candidate items ranked for a profile (a task file with `[rank]`).
    Rank(Task, RankConfig),
    /// The ReAct loop (a task file with `type = "react"`).
    React(ReactSpec),
}

/// Why the inference thread could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The model could not be checked or loaded, or the budget refused it.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A classification task could not be prepared on the model.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A ReAct task's knowledge base or prefix could not be prepared.
    #[error("cannot read task {}: {source}", path.display())]
    ReactTask { path: PathBuf, source: ReactError },
    #[error("cannot read inference thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot read inference thread: the inference thread died while loading")]
    Died,
}

/// What a served task does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Classify,
    Rank,
    React,
}

impl ServedTask {
    pub fn name(&self) -> &str {
        match self {
            ServedTask::Classify(t) | ServedTask::Rank(t, _) => &t.name,
            ServedTask::React(s) => &s.name,
        }
    }

    pub fn kind(&self) -> TaskKind {
        match self {
            ServedTask::Classify(_) => TaskKind::Classify,
            ServedTask::Rank(..) => TaskKind::Rank,
            ServedTask::React(_) => TaskKind::React,
        }
    }
}

/// A request, as its task's kind reads it.
#[derive(Debug, Clone)]
pub enum Job {
    Classify(Request),
    Rank(Box<RankRequest>),
    React(Box<ReactRequest>),
}

impl Job {
    /// Parses a request payload for a task of `kind`; the error names what is wrong.
    pub fn from_json(kind: TaskKind, value: Value, default_id: &str) -> Result<Job, String> {
        match kind {
            TaskKind::Classify => {
                crate::classify::input::request_from_json(value, default_id).map(Job::Classify)
            }
            TaskKind::Rank => {
                crate::rank::request_from_json(value, default_id).map(|r| Job::Rank(Box::new(r)))
            }
            TaskKind::React => crate::react::request::request_from_json(value, default_id)
                .map(|r| Job::React(Box::new(r))),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Job::Classify(r) => &r.id,
            Job::Rank(r) => &r.id,
            Job::React(r) => &r.id,
        }
    }
}

/// One request for the inference thread.
#[derive(Debug)]
pub struct Work {
    /// Index of the task in the worker's task list.
    pub task: usize,
    pub job: Job,
    /// Chosen by the caller to match the outcome to its input.
    pub ticket: u64,
    pub received: Instant,
}

/// What a job produced.
#[derive(Debug)]
pub enum Output {
    Classified(Box<ClassifyResult>),
    Ranked(RankResult),
    Reacted(Box<ReactResult>),
}

/// Why a job produced no output.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    React(#[from] ReactError),
    #[error("task `{task}` does not take this request: {reason}")]
    WrongKind { task: String, reason: String },
}

impl JobError {
    /// A stable, machine-readable kind for error records.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Record(e) => e.kind(),
            JobError::React(ReactError::Session(_)) => "session",
            JobError::React(ReactError::Engine(crate::model::EngineError::ContextFull {
                ..
            })) => "context_full",
            JobError::React(_) => "engine",
            JobError::WrongKind { .. } => "invalid_request",
        }
    }
}

/// What became of one [`Work`].
#[derive(Debug)]
pub struct Done {
    pub ticket: u64,
    pub task: usize,
    pub request_id: String,
    pub outcome: Result<Output, JobError>,
    /// From receipt to outcome, queueing included.
    pub latency_ms: f64,
}

/// Low-priority work for the inference thread (a retrain's, [`super::learner`]): run only
/// when no request waits, one small job at a time, so a request waits behind one job at
/// most.
pub enum Background {
    /// The pooled states of `texts` by the feature prompt of task `task`'s learned file.
    Features {
        task: usize,
        texts: Vec<String>,
        reply: Sender<Result<Vec<PooledStates>, String>>,
    },
    /// Frees the feature context kept between `Features` jobs.
    Release,
    /// Rebuilds task `task`'s runner from its files (a retrain replaced them); the old
    /// runner stays if the new one cannot be built.
    Reload {
        task: usize,
        reply: Sender<Result<(), String>>,
    },
}

pub type BackgroundSender = Sender<Background>;

/// How long an idle inference thread waits for a request before it looks at background
/// work again.
const BACKGROUND_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The caller's end of the worker.
pub struct WorkerHandle {
    tx: Option<SyncSender<Work>>,
    /// Background jobs (retrains).
    pub background: BackgroundSender,
    depth: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    /// The model as planned (checked and fitted to the budget) or, once loaded, as loaded.
    pub model: ModelInfo,
    /// Whether the model has been loaded: at start when a served task needs it to set up
    /// (a classifier), else at the first request that needs it (a kiosk answering from its
    /// knowledge base never does).
    pub model_loaded: Arc<AtomicBool>,
    pub task_names: Vec<String>,
    pub task_kinds: Vec<TaskKind>,
}

/// Why the queue did not take a request.
#[derive(Debug, PartialEq)]
pub enum Rejected {
    /// The queue is full: the caller answers `overloaded`.
    Overloaded,
    /// The inference thread is gone.
    Stopped,
}

impl WorkerHandle {
    /// Queues without blocking (for the MQTT event loop).
    pub fn try_submit(&self, work: Work) -> Result<(), (Rejected, Work)> {
        let Some(tx) = &self.tx else {
            return Err((Rejected::Stopped, work));
        };
        self.depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(work) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                match e {
                    TrySendError::Full(w) => Err((Rejected::Overloaded, w)),
                    TrySendError::Disconnected(w) => Err((Rejected::Stopped, w)),
                }
            }
        }
    }

    /// Queues, waiting for room (for pipelines that can apply back-pressure).
    pub fn submit(&self, work: Work) -> Result<(), Rejected> {
        let tx = self.tx.as_ref().ok_or(Rejected::Stopped)?;
        self.depth.fetch_add(1, Ordering::SeqCst);
        tx.send(work).map_err(|_| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            Rejected::Stopped
        })
    }

    /// Requests queued or being worked on.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Closes the queue; the thread finishes what it holds, then exits.
    pub fn close(&mut self) {
        self.tx = None;
    }

    pub fn join(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.task_names.iter().position(|t| t == name)
    }
}

/// How the worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queue_capacity: usize,
    /// Classifications scored together at most when several wait for the same task;
    /// `None`: as many as one decode holds.
    pub batch_size: Option<usize>,
    /// Where ReAct sessions (earlier turns by session id) are kept.
    pub sessions: Sessions,
}

/// A ranking task: the profile of the last request stays decoded in the task's slot, so
/// the next request for the same profile decodes only its items.
struct RankRunner {
    task: Task,
    cfg: RankConfig,
    slot: usize,
    current: Option<(String, Ranker)>,
}

enum Runner {
    Classify(Box<TaskRunner>),
    Rank(Box<RankRunner>),
    React(Box<react_runner::ReactRunner>),
}

fn setup_runner(
    lazy: &mut LazyEngine,
    planned: &ModelInfo,
    task: ServedTask,
    slot: usize,
) -> Result<Runner, WorkerError> {
    Ok(match task {
        // The task's own method (prompt, head, both, stack, tfidf), as `classify` runs it;
        // the model loads here only if the task reads it.
        ServedTask::Classify(t) => Runner::Classify(Box::new(TaskRunner::new(
            &mut LazyModel { lazy, planned },
            t,
            slot,
            None,
            None,
            None,
            crate::model::FeatureParams::default(),
        )?)),
        ServedTask::Rank(task, cfg) => Runner::Rank(Box::new(RankRunner {
            task,
            cfg,
            slot,
            current: None,
        })),
        ServedTask::React(spec) => Runner::React(Box::new(react_runner::setup(lazy, spec, slot)?)),
    })
}

/// The engine config for serving `tasks`: their LoRA adapter, a feature context for each
/// task whose learned scorer reads the model's hidden states (serve runs a task's head or
/// stack as `classify` does, see `setup_runner`), and the sentence encoder when a stack or a
/// kiosk's knowledge base uses it. With `tasks.len()` prefix slots, this is what the memory
/// estimate of the served set is made from (the same as `plan`'s).
pub fn engine_config(
    engine_cfg: &EngineConfig,
    tasks: &[ServedTask],
) -> Result<EngineConfig, EngineError> {
    let label_tasks = tasks.iter().filter_map(|t| match t {
        ServedTask::Classify(t) | ServedTask::Rank(t, _) => Some(t),
        ServedTask::React(_) => None,
    });
    let mut cfg = crate::spec::config_for_tasks(engine_cfg, label_tasks)?;
    // Ranking runs the model, and a ReAct task may load it for a question that needs it.
    cfg.load_weights |= tasks.iter().any(|t| !matches!(t, ServedTask::Classify(_)));
    Ok(crate::spec::count_kb_encoder(cfg, react_specs(tasks)))
}

/// The ReAct tasks among `tasks`.
pub fn react_specs(tasks: &[ServedTask]) -> impl Iterator<Item = &ReactSpec> {
    tasks.iter().filter_map(|t| match t {
        ServedTask::React(s) => Some(s),
        _ => None,
    })
}

/// Starts the inference thread: checks the model, prepares every task there (loading the
/// model if a task needs it to set up), and returns once it is ready (or with the error
/// that stopped it). Outcomes go to `on_done`.
pub fn spawn(
    engine_cfg: EngineConfig,
    tasks: Vec<ServedTask>,
    opts: WorkerOptions,
    on_done: impl Fn(Done) + Send + 'static,
) -> Result<WorkerHandle, WorkerError> {
    let (tx, rx) = sync_channel::<Work>(opts.queue_capacity.max(1));
    let (bg_tx, bg_rx) = channel::<Background>();
    let (ready_tx, ready_rx) = sync_channel(1);
    let depth = Arc::new(AtomicUsize::new(0));
    let thread_depth = depth.clone();
    let model_loaded = Arc::new(AtomicBool::new(false));
    let thread_loaded = model_loaded.clone();
    let task_names: Vec<String> = tasks.iter().map(|t| t.name().to_string()).collect();
    let task_kinds: Vec<TaskKind> = tasks.iter().map(ServedTask::kind).collect();
    let thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            let setup = || -> Result<(LazyEngine, ModelInfo, Vec<Runner>), WorkerError> {
                let engine_cfg = engine_config(&engine_cfg, &tasks)?;
                // The file is checked and the memory planned now, so a model that is
                // missing or does not fit stops serve at start even when it loads later.
                let planned = crate::model::planned_info(&engine_cfg, tasks.len())?;
                let mut lazy = LazyEngine::new(engine_cfg, tasks.len());
                let mut runners = Vec::new();
                for (slot, t) in tasks.into_iter().enumerate() {
                    runners.push(setup_runner(&mut lazy, &planned, t, slot)?);
                }
                Ok((lazy, planned, runners))
            };
            match setup() {
                Ok((mut lazy, planned, mut runners)) => {
                    thread_loaded.store(lazy.is_loaded(), Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(lazy.info().cloned().unwrap_or(planned.clone())));
                    let mut engine = LazyModel {
                        lazy: &mut lazy,
                        planned: &planned,
                    };
                    let queues = Queues {
                        rx,
                        bg: bg_rx,
                        turns: BackgroundTurns::new(Instant::now()),
                    };
                    let shared = Shared {
                        depth: &thread_depth,
                        loaded: &thread_loaded,
                    };
                    run(&mut engine, &mut runners, queues, &opts, shared, on_done);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(WorkerError::Thread)?;
    let model = ready_rx.recv().map_err(|_| WorkerError::Died)??;
    Ok(WorkerHandle {
        tx: Some(tx),
        background: bg_tx,
        depth,
        thread: Some(thread),
        model,
        model_loaded,
        task_names,
        task_kinds,
    })
}

/// Requests, and background jobs run when no request waits (or after waiting
/// [`crate::serve::turns::BACKGROUND_MAX_WAIT`] behind continuous traffic).
struct Queues {
    rx: Receiver<Work>,
    bg: Receiver<Background>,
    turns: BackgroundTurns,
}

impl Queues {
    /// The next request; background jobs run while none waits. None: the queue closed.
    fn next(
        &mut self,
        engine: &mut LazyModel,
        runners: &mut [Runner],
        fctx: &mut Option<FeatureContext>,
    ) -> Option<Work> {
        // Behind continuous traffic: one background job after the wait.
        if self.turns.take(Instant::now(), true) {
            if let Ok(job) = self.bg.try_recv() {
                background(engine, runners, fctx, job);
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(w) => return Some(w),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            self.turns.take(Instant::now(), false);
            if let Ok(job) = self.bg.try_recv() {
                background(engine, runners, fctx, job);
                continue;
            }
            match self.rx.recv_timeout(BACKGROUND_POLL) {
                Ok(w) => return Some(w),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// What the inference thread shares with the caller's handle.
struct Shared<'a> {
    /// Requests queued or being worked on.
    depth: &'a AtomicUsize,
    /// Whether the model has been loaded.
    loaded: &'a AtomicBool,
}

fn run(
    engine: &mut LazyModel,
    runners: &mut [Runner],
    mut queues: Queues,
    opts: &WorkerOptions,
    shared: Shared,
    on_done: impl Fn(Done),
) {
    let mut held: Option<Work> = None;
    // A retrain's feature context, kept between its feature jobs.
    let mut fctx: Option<FeatureContext> = None;
    loop {
        let first = match held.take() {
            Some(w) => w,
            None => match queues.next(engine, runners, &mut fctx) {
                Some(w) => w,
                None => return,
            },
        };
        // Micro-batch whatever other classifications already wait for the same task, up to
        // what one decode of its labels holds.
        let batch_size = opts
            .batch_size
            .unwrap_or_else(|| match runners.get(first.task) {
                Some(Runner::Classify(r)) => r.jobs_per_decode(engine),
                _ => 1,
            })
            .max(1);
        let mut batch = vec![first];
        while batch.len() < batch_size && matches!(batch[0].job, Job::Classify(_)) {
            match queues.rx.try_recv() {
                Ok(w) if w.task == batch[0].task && matches!(w.job, Job::Classify(_)) => {
                    batch.push(w)
                }
                Ok(w) => {
                    held = Some(w);
                    break;
                }
                Err(_) => break,
            }
        }
        let task = batch[0].task;
        let outcomes = run_batch(engine, runners.get_mut(task), &batch, &opts.sessions);
        shared
            .loaded
            .store(engine.lazy.is_loaded(), Ordering::SeqCst);
        for (w, outcome) in batch.into_iter().zip(outcomes) {
            shared.depth.fetch_sub(1, Ordering::SeqCst);
            on_done(Done {
                ticket: w.ticket,
                task: w.task,
                request_id: w.job.id().to_string(),
                outcome,
                latency_ms: w.received.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
}

/// Runs one background job (see [`Background`]); its reply says how it went.
fn background(
    lazy: &mut LazyModel,
    runners: &mut [Runner],
    fctx: &mut Option<FeatureContext>,
    job: Background,
) {
    match job {
        Background::Features { task, texts, reply } => {
            let spec = match runners.get(task) {
                Some(Runner::Classify(r)) => match &**r {
                    TaskRunner::Head(h) => h.learned.feature().cloned(),
                    TaskRunner::Prompt(_) => None,
                },
                _ => None,
            };
            let got = match spec {
                None => Err(format!("task #{task} reads no model features")),
                Some(spec) => {
                    let engine = match lazy.engine() {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = reply.send(Err(e.to_string()));
                            return;
                        }
                    };
                    if fctx.is_none() {
                        match engine.feature_context(crate::model::FeatureParams::default()) {
                            Ok(c) => *fctx = Some(c),
                            Err(e) => {
                                let _ = reply.send(Err(e.to_string()));
                                return;
                            }
                        }
                    }
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    match fctx.as_mut() {
                        Some(c) => {
                            crate::classify::features::extract_states(engine, c, &spec, &refs, None)
                                .map_err(|e| e.to_string())
                        }
                        None => Err("no feature context".into()),
                    }
                }
            };
            let _ = reply.send(got);
        }
        Background::Release => *fctx = None,
        Background::Reload { task, reply } => {
            *fctx = None;
            let got = match runners.get_mut(task) {
                Some(Runner::Classify(r)) => {
                    let path = r.task().path.clone();
                    crate::spec::Task::load(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|t| {
                            TaskRunner::new(
                                &mut *lazy,
                                t,
                                task,
                                None,
                                None,
                                None,
                                crate::model::FeatureParams::default(),
                            )
                            .map_err(|e| e.to_string())
                        })
                        .map(|new| {
                            // Between two requests: the next one runs on the new model.
                            **r = new;
                            tracing::info!(task = %r.task().name, "retrained model swapped in");
                        })
                }
                _ => Err(format!("task #{task} is not a classification task")),
            };
            let _ = reply.send(got);
        }
    }
}

/// One outcome per work item, in order.
fn run_batch(
    lazy: &mut LazyModel,
    runner: Option<&mut Runner>,
    batch: &[Work],
    sessions: &Sessions,
) -> Vec<Result<Output, JobError>> {
    let wrong = |task: String, reason: &str| {
        batch
            .iter()
            .map(|_| {
                Err(JobError::WrongKind {
                    task: task.clone(),
                    reason: reason.to_string(),
                })
            })
            .collect()
    };
    match (runner, &batch[0].job) {
        (Some(Runner::Classify(c)), Job::Classify(_)) => {
            let reqs: Vec<Request> = batch
                .iter()
                .filter_map(|w| match &w.job {
                    Job::Classify(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            // A task that reads no model classifies without loading it.
            c.classify_many(lazy, &reqs, ScorePath::Fast)
                .into_iter()
                .map(|r| {
                    r.map(|r| Output::Classified(Box::new(r)))
                        .map_err(JobError::from)
                })
                .collect()
        }
        (Some(Runner::Rank(r)), Job::Rank(req)) => vec![lazy
            .engine()
            .map_err(|e| JobError::React(ReactError::from(e)))
            .and_then(|engine| rank(engine, r, req))],
        (Some(Runner::React(r)), Job::React(req)) => {
            vec![react_runner::react(lazy.lazy, r, req, sessions)]
        }
        (Some(_), _) => wrong(
            format!("#{}", batch[0].task),
            "the request's kind does not match the task's",
        ),
        (None, _) => wrong(format!("#{}", batch[0].task), "no such task"),
    }
}

fn rank(engine: &mut Engine, r: &mut RankRunner, req: &RankRequest) -> Result<Output, JobError> {
    let t0 = Instant::now();
    let mut prefix_tokens_decoded = 0;
    if r.current.as_ref().map(|(p, _)| p.as_str()) != Some(req.profile.as_str()) {
        r.current = None;
        // A profile is one user's: its prefix is not worth a file in the prefix cache.
        let cache = engine.set_prefix_cache_dir(None);
        let made = Ranker::new(engine, &r.task, &r.cfg, &req.profile, r.slot, None);
        engine.set_prefix_cache_dir(cache);
        let ranker = made.map_err(|e| match e {
            crate::rank::RankError::Setup(s) => {
                JobError::Record(RecordError::Field(format!("profile: {s}")))
            }
            other => JobError::Record(RecordError::Field(other.to_string())),
        })?;
        prefix_tokens_decoded = ranker.prefix_tokens();
        r.current = Some((req.profile.clone(), ranker));
    }
    let Some((_, ranker)) = &r.current else {
        return Err(JobError::Record(RecordError::Field(
            "the profile could not be prepared".into(),
        )));
    };
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for (item, s) in req.items.iter().zip(ranker.score(engine, &req.items, 8)) {
        match s {
            Ok(s) => ok.push(s),
            Err(e) => failed.push(FailedItem {
                id: item.id.clone(),
                error: e.to_string(),
            }),
        }
    }
    let ranked = ranker.rank(ok, &req.items, req.top_k, req.min_score);
    Ok(Output::Ranked(RankResult {
        id: req.id.clone(),
        task: r.task.name.clone(),
        ranked,
        n_items: req.items.len(),
        failed,
        prefix_tokens_decoded,
        ms: (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0,
    }))
}

/// The latest value of each context topic by name, from the daemon's `context.NAME` fields.
pub fn sensors_from_context(context: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    context
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("context.")
                .map(|n| (n.to_string(), v.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{load_board, BoardFile};
    use std::path::Path;

    fn x86_dev() -> EngineConfig {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        load_board(
            "x86-dev",
            &[root.join("board-configs")],
            &BoardFile::default(),
        )
        .unwrap()
    }

    #[test]
    fn the_served_estimate_counts_a_heads_feature_context_as_plan_does() {
        let cfg = x86_dev();
        let src = "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\n\
                   labels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n\
                   [head]\nfile = \"t.head.json\"\nmethod = \"head\"\n";
        let task = Task::parse(src, Path::new("t.toml"), "t").unwrap();
        let served = engine_config(&cfg, &[ServedTask::Classify(task.clone())]).unwrap();
        let planned = crate::spec::config_for_tasks(&cfg, [&task]).unwrap();
        assert_eq!(served.feature_batch_tokens.len(), 1);
        assert_eq!(served.feature_batch_tokens, planned.feature_batch_tokens);
    }

    #[test]
    fn a_words_only_stack_is_served_without_the_weights_unless_another_task_needs_them() {
        let cfg = x86_dev();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t.stack.json"),
            r#"{"stack": {"text": {}}}"#,
        )
        .unwrap();
        let src = "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\n\
                   labels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n";
        let stack = format!("{src}[head]\nfile = \"t.stack.json\"\nmethod = \"tfidf\"\n");
        let words = Task::parse(&stack, &dir.path().join("t.toml"), "t").unwrap();
        let alone = engine_config(&cfg, &[ServedTask::Classify(words.clone())]).unwrap();
        assert!(!alone.load_weights);
        let prompt = Task::parse(src, Path::new("p.toml"), "p").unwrap();
        let rank = ServedTask::Rank(prompt, serde_json::from_str::<RankConfig>("{}").unwrap());
        assert!(
            engine_config(&cfg, &[ServedTask::Classify(words), rank])
                .unwrap()
                .load_weights
        );
    }
}
