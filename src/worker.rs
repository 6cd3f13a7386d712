//! The inference thread: owns the backend, model, context and one classifier per task;
//! takes work from a bounded queue, micro-batches what is waiting for the same task, and
//! hands each outcome back. Nothing else touches the model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::classify::{Classifier, ClassifyResult, RecordError, Request, ScorePath};
use crate::config::EngineConfig;
use crate::engine::{Engine, ModelInfo};
use crate::task::Task;

/// One request for the inference thread.
#[derive(Debug)]
pub struct Work {
    /// Index of the task in the worker's task list.
    pub task: usize,
    pub request: Request,
    /// Chosen by the caller to match the outcome to its input.
    pub ticket: u64,
    pub received: Instant,
}

/// What became of one [`Work`].
#[derive(Debug)]
pub struct Done {
    pub ticket: u64,
    pub task: usize,
    pub request_id: String,
    pub outcome: Result<ClassifyResult, RecordError>,
    /// From receipt to outcome, queueing included.
    pub latency_ms: f64,
}

/// The caller's end of the worker.
pub struct WorkerHandle {
    tx: Option<SyncSender<Work>>,
    depth: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    pub model: ModelInfo,
    pub task_names: Vec<String>,
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

    /// Requests queued or being classified.
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

/// Starts the inference thread: loads the model and prepares every task there, and returns
/// once it is ready (or with the error that stopped it). Outcomes go to `on_done`.
pub fn spawn(
    engine_cfg: EngineConfig,
    tasks: Vec<Task>,
    queue_capacity: usize,
    batch_size: usize,
    on_done: impl Fn(Done) + Send + 'static,
) -> Result<WorkerHandle, crate::app::AppError> {
    let (tx, rx) = sync_channel::<Work>(queue_capacity.max(1));
    let (ready_tx, ready_rx) = sync_channel(1);
    let depth = Arc::new(AtomicUsize::new(0));
    let thread_depth = depth.clone();
    let task_names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
    let thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            let setup = || -> Result<(Engine, Vec<Classifier>), crate::app::AppError> {
                let engine_cfg = crate::engine::config_for_tasks(&engine_cfg, &tasks)?;
                let mut engine = Engine::load(&engine_cfg, tasks.len())?;
                let mut cs = Vec::new();
                for (slot, t) in tasks.into_iter().enumerate() {
                    if t
                        .head
                        .as_ref()
                        .is_some_and(|h| h.method != crate::head::Method::Prompt)
                    {
                        tracing::warn!(
                            task = %t.name,
                            "serve does not run learned heads yet: this task is classified by its label scores"
                        );
                    }
                    cs.push(Classifier::new(&mut engine, t, slot, None, None)?);
                }
                Ok((engine, cs))
            };
            match setup() {
                Ok((mut engine, classifiers)) => {
                    let _ = ready_tx.send(Ok(engine.info.clone()));
                    run(
                        &mut engine,
                        &classifiers,
                        rx,
                        batch_size.max(1),
                        &thread_depth,
                        on_done,
                    );
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|e| crate::app::AppError::Input {
            what: "inference thread".into(),
            source: e,
        })?;
    let model = ready_rx.recv().map_err(|_| crate::app::AppError::Input {
        what: "inference thread".into(),
        source: std::io::Error::other("the inference thread died while loading"),
    })??;
    Ok(WorkerHandle {
        tx: Some(tx),
        depth,
        thread: Some(thread),
        model,
        task_names,
    })
}

fn run(
    engine: &mut Engine,
    classifiers: &[Classifier],
    rx: Receiver<Work>,
    batch_size: usize,
    depth: &AtomicUsize,
    on_done: impl Fn(Done),
) {
    let mut held: Option<Work> = None;
    loop {
        let first = match held.take() {
            Some(w) => w,
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
        };
        // Micro-batch whatever else is already waiting for the same task.
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(w) if w.task == batch[0].task => batch.push(w),
                Ok(w) => {
                    held = Some(w);
                    break;
                }
                Err(_) => break,
            }
        }
        let task = batch[0].task;
        let reqs: Vec<Request> = batch.iter().map(|w| w.request.clone()).collect();
        let outcomes = match classifiers.get(task) {
            Some(c) => c.classify_many(engine, &reqs, ScorePath::Fast),
            None => reqs
                .iter()
                .map(|_| Err(RecordError::Field(format!("no task with index {task}"))))
                .collect(),
        };
        for (w, outcome) in batch.into_iter().zip(outcomes) {
            depth.fetch_sub(1, Ordering::SeqCst);
            on_done(Done {
                ticket: w.ticket,
                task: w.task,
                request_id: w.request.id,
                outcome,
                latency_ms: w.received.elapsed().as_secs_f64() * 1e3,
            });
        }
    }
}
