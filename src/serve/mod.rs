//! `edgeact serve`: the daemon. Reads requests from MQTT (or JSON lines on stdin), hands
//! them to the inference thread over a bounded queue, records every outcome in the durable
//! outbox before acknowledging the request, and publishes from the outbox until PUBACK.
//!
//! One task owns the MQTT event loop, the outbox, the monitors and the bookkeeping;
//! inference runs on its own thread, so the event loop never blocks on the model.
//!
//! Served tasks are classifications (result, trace, retained state; with `[monitor]` rules,
//! incidents on `<prefix>/<rule>/events`), rankings (`[rank]`; also reachable as
//! `<prefix>/rank/request`) and ReAct loops (`type = "react"`: answer, compact trace, and
//! `notify` side effects on `<prefix>/<task>/notify`).
//!
//! # Layout
//!
//! - [`run`] (here): the entry; the caller passes the shutdown signal. [`run_stdio`]
//!   ([`stdio`]) is the pipeline mode.
//! - [`mqtt_loop`]: the rumqttc event loop, reconnects with backoff; turns what happens
//!   into [`state::Event`]s.
//! - [`state`]: the daemon as a state machine (events in, client and inference requests
//!   out), tested without a broker.
//! - [`acks`]: which outbox entry a PUBACK acknowledges ([`acks::PendingAcks`]);
//!   [`inbox`]: incoming redeliveries; [`limits`]: id, context and packet size limits.
//! - [`message`]: what is published (typed messages, records, compact traces); redaction
//!   by message kind with [`redact`].
//! - [`outbox`]: the durable log of messages until the broker has them.
//! - [`worker`]: the inference thread ([`turns`]: when background work runs between
//!   requests); [`monitors`]: alert rules on results;
//!   [`stats`]: `<prefix>/stats`; [`mqtt`]: broker options and topics.

pub mod acks;
pub mod inbox;
pub mod learner;
pub mod learning;
pub mod limits;
pub mod message;
pub mod monitors;
pub mod mqtt;
pub mod mqtt_loop;
pub mod outbox;
mod react_runner;
pub mod redact;
pub mod state;
pub mod stats;
pub mod stdio;
pub mod turns;
pub mod worker;

#[cfg(test)]
mod decode_tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::config::EngineConfig;
use crate::monitor::{MonitorConfig, MonitorError};
use crate::react::session::Sessions;
use crate::serve::mqtt::{BrokerConfig, MqttConfigError, Topics};
use crate::serve::outbox::{OutboxError, OutboxLimits};
use crate::serve::worker::{ServedTask, WorkerError, WorkerOptions};

pub use message::{error_record, messages_for, trace_of};
pub use stdio::run_stdio;

/// Everything `serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub tasks: Vec<ServedTask>,
    /// Alert rules by task name (classification tasks with a `[monitor]` section).
    pub monitors: BTreeMap<String, MonitorConfig>,
    pub device_id: String,
    pub topics: Topics,
    /// None: JSON lines on stdin, results on stdout.
    pub broker: Option<BrokerConfig>,
    /// Context name -> topic; the latest value is the template field `context.<name>`.
    pub context_topics: BTreeMap<String, String>,
    pub queue_capacity: usize,
    /// Largest micro-batch; `None`: what one decode holds for the task's labels
    /// ([`crate::classify::runner::TaskRunner::jobs_per_decode`]).
    pub batch_size: Option<usize>,
    pub outbox_dir: PathBuf,
    pub outbox: OutboxLimits,
    pub stats_interval: Duration,
    pub ha_discovery: bool,
    /// Largest request payload accepted, in bytes.
    pub max_request_bytes: usize,
    /// Bounds on the ReAct sessions kept under `<outbox_dir>/sessions`.
    pub sessions: crate::react::session::SessionLimits,
    /// How long shutdown waits for PUBACKs before leaving the rest in the outbox.
    pub drain_timeout: Duration,
    /// Masks personal data in trace and error payloads and in log lines.
    pub redactor: crate::serve::redact::Redactor,
    /// Learning from `<prefix>/feedback`.
    pub learn: learning::LearnSettings,
}

impl ServeConfig {
    fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            queue_capacity: self.queue_capacity,
            batch_size: self.batch_size,
            sessions: Sessions::new(self.outbox_dir.join("sessions"), self.sessions),
        }
    }

    fn daemon_config(&self) -> state::DaemonConfig {
        state::DaemonConfig {
            device_id: self.device_id.clone(),
            topics: self.topics.clone(),
            context_topics: self.context_topics.clone(),
            ha_discovery: self.ha_discovery,
            max_request_bytes: self.max_request_bytes,
            max_packet_bytes: self
                .broker
                .as_ref()
                .map_or(usize::MAX, |b| b.max_packet_bytes),
            queue_capacity: self.queue_capacity,
            drain_timeout: self.drain_timeout,
            redactor: self.redactor.clone(),
        }
    }
}

/// Why `serve` stopped (or could not start).
///
/// Exit codes (main maps them): `Mqtt` is a configuration error (2); `Worker` as its
/// inner error (a model that cannot be loaded 3, a task that cannot be prepared 2, the rest
/// 1); everything else is a runtime error (1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Broker options, or the broker refused the first connection for good.
    #[error(transparent)]
    Mqtt(#[from] MqttConfigError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The inference thread could not start.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("cannot read broker: serve over MQTT needs --broker")]
    NoBroker,
    #[error("cannot read {}: {source}", path.display())]
    MonitorState { path: PathBuf, source: MonitorError },
    #[error("cannot read standard input: {0}")]
    Stdin(std::io::Error),
    #[error("cannot write results: {0}")]
    Output(std::io::Error),
    #[error("cannot read inference thread: stopped")]
    WorkerStopped,
}

/// Runs the MQTT daemon until `shutdown` resolves (the caller passes its signal handler),
/// then stops taking requests, finishes those in work, flushes the outbox (up to
/// `drain_timeout`) and returns.
pub async fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    mqtt_loop::run(cfg, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// main prints these: they are the messages `serve` printed before it had its own
    /// error type.
    #[test]
    fn error_messages_stay_as_they_were() {
        let io = || std::io::Error::other("disk on fire");
        let cases = [
            (
                ServeError::NoBroker,
                "cannot read broker: serve over MQTT needs --broker",
            ),
            (
                ServeError::Stdin(io()),
                "cannot read standard input: disk on fire",
            ),
            (
                ServeError::Output(io()),
                "cannot write results: disk on fire",
            ),
            (
                ServeError::WorkerStopped,
                "cannot read inference thread: stopped",
            ),
            (
                ServeError::Worker(WorkerError::Thread(io())),
                "cannot read inference thread: disk on fire",
            ),
            (
                ServeError::Worker(WorkerError::Died),
                "cannot read inference thread: the inference thread died while loading",
            ),
        ];
        for (e, msg) in cases {
            assert_eq!(e.to_string(), msg);
        }
    }
}
