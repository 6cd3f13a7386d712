//! The daemon's state machine, apart from any network: events in (a connection, a request,
//! a PUBACK, an outcome, a tick, the shutdown signal), and requests out to the MQTT client
//! ([`Link`]) and the inference thread ([`Inference`]). [`super::mqtt_loop`] feeds it
//! rumqttc's events; the tests below feed it by hand.
//!
//! The guarantee it keeps: an outcome is recorded in the outbox before its request is
//! acknowledged, and an outbox entry is forgotten only when the broker acknowledged it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rumqttc::{Publish, QoS};
use serde_json::Value;

use crate::classify::input;
use crate::serve::acks::{HandOver, PendingAcks};
use crate::serve::inbox::Redeliveries;
use crate::serve::limits::{check_id_lengths, too_large_record};
use crate::serve::message::{error_record, MessageKind, OutMessage};
use crate::serve::monitors::Monitors;
use crate::serve::mqtt::{self, Topics};
use crate::serve::outbox::Outbox;
use crate::serve::redact::Redactor;
use crate::serve::stats::Stats;
use crate::serve::worker::{self, Done, Job, Rejected, TaskKind, Work, WorkerHandle};
use crate::serve::ServeError;
use crate::util::time::now_ms;

/// Publishes handed to rumqttc and not yet sent, at most: its request queue holds 1024, and
/// the rest is kept for acks and subscriptions.
pub const PUBLISH_QUEUE_LIMIT: usize = 768;

pub use crate::serve::limits::{MAX_CONTEXT_VALUE_BYTES, MAX_ID_BYTES};

/// Why the MQTT client did not take a request.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum NotQueued {
    /// Its request queue is full: the same request is taken once the event loop has
    /// written some (the next event).
    #[error("the MQTT client's request queue is full")]
    Full,
    /// It will never take this request (a topic with a wildcard, a client whose event loop
    /// is gone): retrying it would only block what waits behind it.
    #[error("the MQTT client refused it: {0}")]
    Refused(String),
    /// There is no connection: nothing is handed to the client until the next one (the
    /// outbox replays, the broker redelivers).
    #[error("not connected to the broker")]
    Disconnected,
}

/// The non-blocking half of an MQTT client: requests are queued for the event loop.
pub trait Link {
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotQueued>;
    /// Acknowledges an incoming publish (PUBACK for QoS 1).
    fn ack(&mut self, p: &Publish) -> Result<(), NotQueued>;
    fn subscribe(&mut self, topic: String) -> Result<(), NotQueued>;
    fn disconnect(&mut self) -> Result<(), NotQueued>;
}

/// The daemon's view of the inference thread.
pub trait Inference {
    /// Queues without blocking.
    fn try_submit(&self, work: Work) -> Result<(), (Rejected, Work)>;
    /// Requests queued or being worked on.
    fn depth(&self) -> usize;
    /// Takes no more work; what is queued is finished.
    fn close(&mut self);
    /// Waits for the thread to finish.
    fn join(&mut self);
}

impl Inference for WorkerHandle {
    fn try_submit(&self, work: Work) -> Result<(), (Rejected, Work)> {
        WorkerHandle::try_submit(self, work)
    }
    fn depth(&self) -> usize {
        WorkerHandle::depth(self)
    }
    fn close(&mut self) {
        WorkerHandle::close(self)
    }
    fn join(&mut self) {
        WorkerHandle::join(self)
    }
}

/// What the daemon reacts to.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection (CONNACK).
    Connected,
    /// The connection failed or was lost.
    Disconnected,
    /// A message on a subscribed topic: a request or a context value.
    Incoming(Publish),
    /// The broker has the publish with this packet id.
    PubAck(u16),
    /// A subscription is in place (`refused`: the broker refused one of its topics).
    SubAck { refused: bool },
    /// rumqttc wrote the oldest publish handed to it, with this packet id.
    Written(u16),
    /// The inference thread finished a request.
    Done(Done),
    /// Time to publish stats and move idle monitors on.
    StatsTick,
    /// The deadline [`Daemon::fsync_deadline`] asked for has come.
    FsyncDue,
    /// The inference thread's outcome channel closed: it exited (after a close) or died.
    WorkerStopped,
    /// Stop taking requests, finish the ones taken, flush the outbox.
    Shutdown,
    /// A retrain from feedback ended ([`crate::serve::learner`]).
    Retrained(crate::serve::learning::RetrainReport),
}

/// What the daemon needs of [`super::ServeConfig`].
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub device_id: String,
    pub topics: Topics,
    /// Context name -> topic; the latest value is the template field `context.<name>`.
    pub context_topics: BTreeMap<String, String>,
    pub ha_discovery: bool,
    pub max_request_bytes: usize,
    /// Largest MQTT packet this daemon sends (and announces it takes).
    pub max_packet_bytes: usize,
    pub queue_capacity: usize,
    pub drain_timeout: Duration,
    pub redactor: Redactor,
}

/// An accepted request waiting for its outcome.
struct Ticket {
    /// The incoming message to acknowledge once the outcome is in the outbox.
    publish: Option<Publish>,
    /// The task name the request came in on (its results go under it).
    route: String,
    /// The request's fields, kept for the task's monitor (None: the task has none).
    fields: Option<BTreeMap<String, String>>,
}

pub struct Daemon<L: Link, I: Inference> {
    cfg: DaemonConfig,
    task_names: Vec<String>,
    task_kinds: Vec<TaskKind>,
    link: L,
    worker: I,
    outbox: Outbox,
    monitors: Monitors,
    stats: Stats,
    /// Whether connected, and which outbox entry each publish handed to rumqttc carries,
    /// until its PUBACK.
    acks: PendingAcks,
    /// The broker's own packet limit (from its CONNACK), when it announced one.
    broker_max_packet_bytes: Option<usize>,
    /// Outbox seqs not yet handed to rumqttc in this connection, oldest first.
    to_send: VecDeque<u64>,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    /// Requests in work and recently answered, so a redelivery is not run twice.
    redeliveries: Redeliveries,
    /// `context.<name>` -> the latest value and when it arrived.
    context: BTreeMap<String, (String, Instant)>,
    subacks_pending: usize,
    /// Requests to acknowledge once rumqttc's request queue has room, oldest first.
    unsent_acks: VecDeque<Publish>,
    draining: bool,
    drain_deadline: Option<Instant>,
    /// The inference thread died: the drain ends with `offline` and the run with
    /// [`ServeError::WorkerStopped`], so the service manager restarts the daemon.
    worker_died: bool,
    /// `stopped` was published and the disconnect requested.
    stopped_sent: bool,
    /// Feedback on `<prefix>/feedback` and the retrain schedule (None: not taken).
    learning: Option<crate::serve::learning::Learning>,
}

impl<L: Link, I: Inference> Daemon<L, I> {
    /// A daemon serving `tasks` (names and kinds, in the worker's order), not yet connected.
    pub fn new(
        cfg: DaemonConfig,
        tasks: Vec<(String, TaskKind)>,
        link: L,
        worker: I,
        outbox: Outbox,
        monitors: Monitors,
    ) -> Daemon<L, I> {
        let (task_names, task_kinds) = tasks.into_iter().unzip();
        Daemon {
            cfg,
            task_names,
            task_kinds,
            link,
            worker,
            outbox,
            monitors,
            stats: Stats::new(),
            acks: PendingAcks::default(),
            broker_max_packet_bytes: None,
            to_send: VecDeque::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            redeliveries: Redeliveries::default(),
            context: BTreeMap::new(),
            subacks_pending: 0,
            unsent_acks: VecDeque::new(),
            draining: false,
            drain_deadline: None,
            worker_died: false,
            stopped_sent: false,
            learning: None,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.acks.is_connected()
    }

    /// The packet limit the broker announced in its CONNACK (None: none), for the next
    /// [`Event::Connected`]: messages over it are replaced like those over our own.
    pub fn set_broker_packet_limit(&mut self, max_packet_bytes: Option<u32>) {
        self.broker_max_packet_bytes = max_packet_bytes.map(|m| m as usize);
    }

    /// The largest packet that can be published now: ours, or the broker's if smaller.
    fn packet_limit(&self) -> usize {
        self.broker_max_packet_bytes
            .map_or(self.cfg.max_packet_bytes, |b| {
                b.min(self.cfg.max_packet_bytes)
            })
    }

    /// `stopped` was published and the disconnect requested: the loop ends with the
    /// connection.
    pub fn is_stopping(&self) -> bool {
        self.stopped_sent
    }

    /// Handles one event, then hands what waits to the client. An error is fatal: an
    /// outcome could be neither recorded nor published.
    pub fn handle(&mut self, ev: Event) -> Result<(), ServeError> {
        match ev {
            Event::Connected => self.on_connected(),
            Event::Disconnected => self.on_disconnected(),
            Event::Incoming(p) => self.on_publish(p),
            Event::PubAck(pkid) => self.on_puback(pkid),
            Event::SubAck { refused } => self.on_suback(refused),
            Event::Written(pkid) => self.acks.written(pkid),
            Event::Done(d) => self.on_done(d)?,
            Event::StatsTick => {
                self.start_due_retrains();
                self.publish_stats();
                self.tick_monitors()?;
            }
            Event::Retrained(r) => self.on_retrained(r),
            Event::Shutdown => self.on_shutdown(),
            Event::FsyncDue => self.on_fsync_due(),
            Event::WorkerStopped => self.on_worker_stopped(),
        }
        self.pump();
        Ok(())
    }

    /// While draining: once no request is left in work and the outbox is flushed (or the
    /// drain timed out, or there is no connection to flush it on), publishes `stopped` and
    /// disconnects. True when the loop can end now (no connection to close).
    pub fn drain_step(&mut self, now: Instant) -> bool {
        if !self.draining || self.stopped_sent {
            return false;
        }
        // A dead thread's queue depth never goes down (its requests are left to the broker).
        let idle = self.worker_died || (self.tickets.is_empty() && self.worker.depth() == 0);
        let flushed = self.outbox.is_empty();
        let late = self.drain_deadline.is_some_and(|t| now >= t);
        if !(idle && (flushed || late || !self.is_connected())) {
            return false;
        }
        if late && !flushed {
            tracing::warn!(
                pending = self.outbox.len(),
                "drain timeout: the rest stays in the outbox for the next start"
            );
        }
        let available = self.cfg.topics.available();
        // A clean disconnect sends no last will: say `offline` ourselves when not serving.
        let state = if self.worker_died {
            "offline"
        } else {
            "stopped"
        };
        let _ = self.publish(None, available, QoS::AtLeastOnce, true, state.into());
        let _ = self.link.disconnect();
        self.stopped_sent = true;
        !self.is_connected()
    }

    /// When the loop must send [`Event::FsyncDue`] (None: no timer needed).
    pub fn fsync_deadline(&self) -> Option<Instant> {
        self.outbox.sync_deadline()
    }

    /// Whether the shutdown signal came.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// After the loop: the outbox synced to disk, the inference thread joined, monitor
    /// state saved. [`ServeError::WorkerStopped`] when the inference thread died.
    pub fn finish(mut self) -> Result<(), ServeError> {
        self.outbox.sync(true)?;
        self.worker.join();
        self.monitors.save();
        if self.worker_died {
            return Err(ServeError::WorkerStopped);
        }
        Ok(())
    }

    /// The one way a publish reaches the client: recorded in [`PendingAcks`] exactly when
    /// the client took it (`seq`: the outbox entry it carries).
    fn publish(
        &mut self,
        seq: Option<u64>,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotQueued> {
        let link = &mut self.link;
        self.acks
            .hand_over(seq, || link.publish(topic, qos, retain, payload))
            .map_err(|e| match e {
                HandOver::Disconnected => NotQueued::Disconnected,
                HandOver::Refused(e) => e,
            })
    }

    fn on_connected(&mut self) {
        tracing::info!("connected to the broker");
        self.acks.connected();
        // Replay everything still in the outbox, oldest first.
        self.to_send = self.outbox.pending().map(|m| m.seq).collect();
        let t = &self.cfg.topics;
        let mut subs = vec![t.request_wildcard()];
        for task in &self.task_names {
            subs.extend(t.shared_request(task));
        }
        subs.extend(self.cfg.context_topics.values().cloned());
        if self.learning.is_some() {
            subs.push(t.feedback());
        }
        self.subacks_pending = 0;
        for s in subs {
            match self.link.subscribe(s.clone()) {
                Ok(()) => self.subacks_pending += 1,
                Err(e) => tracing::error!("cannot subscribe to {s}: {e}"),
            }
        }
        if self.cfg.ha_discovery {
            // Only classification tasks publish the retained state a sensor reads.
            let with_state: Vec<String> = self
                .task_names
                .iter()
                .zip(&self.task_kinds)
                .filter(|(_, k)| **k == TaskKind::Classify)
                .map(|(n, _)| n.clone())
                .collect();
            let (topic, payload) =
                mqtt::ha_discovery(&self.cfg.device_id, &self.cfg.topics, &with_state);
            let _ = self.publish(None, topic, QoS::AtLeastOnce, true, payload.into_bytes());
        }
    }

    /// `online` once every subscription is in place: from then on no request is missed.
    fn on_suback(&mut self, refused: bool) {
        if refused {
            tracing::error!(
                "the broker refused a subscription (ACL?): requests on it will not arrive"
            );
        }
        self.subacks_pending = self.subacks_pending.saturating_sub(1);
        if self.subacks_pending == 0 && self.is_connected() {
            let available = self.cfg.topics.available();
            let _ = self.publish(None, available, QoS::AtLeastOnce, true, "online".into());
            tracing::info!("subscribed: serving");
        }
    }

    fn on_disconnected(&mut self) {
        // The broker redelivers what this session did not acknowledge (DUP), and the
        // redelivery is acknowledged then.
        self.unsent_acks.clear();
        self.acks.disconnected();
        self.to_send.clear();
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(seq) = self.acks.acked(pkid) {
            if let Err(e) = self.outbox.ack(seq) {
                tracing::error!("{e}");
            }
        }
    }

    fn on_shutdown(&mut self) {
        if self.draining {
            return;
        }
        tracing::info!(
            "shutting down: no new requests; finishing in-flight work and flushing the outbox"
        );
        self.start_drain();
    }

    fn start_drain(&mut self) {
        self.draining = true;
        self.drain_deadline = Some(Instant::now() + self.cfg.drain_timeout);
        self.worker.close();
    }

    /// The timer [`Daemon::fsync_deadline`] asked for: sync the deferred puts now. A
    /// failure is logged and counted, and retried one interval later.
    fn on_fsync_due(&mut self) {
        if let Err(e) = self.outbox.sync(true) {
            self.stats.outbox_write_errors += 1;
            tracing::error!("{e}");
        }
    }

    /// The thread's outcome channel closed. After a shutdown with nothing left in work
    /// that is its normal end; otherwise it died (a panic): nothing would answer requests
    /// again, so the daemon reports it, says `offline`, flushes what it has and ends with
    /// an error for the service manager to restart it.
    fn on_worker_stopped(&mut self) {
        if self.worker_died || (self.draining && self.tickets.is_empty()) {
            return;
        }
        self.worker_died = true;
        let in_work = self.tickets.len();
        let msg = format!(
            "the inference thread stopped; {in_work} request(s) in work are left to the broker \
             and the daemon exits to be restarted"
        );
        tracing::error!("{msg}");
        // Their requests stay unacknowledged: the broker delivers them to the next session.
        self.tickets.clear();
        let rec = error_record(None, None, None, "worker_died", &msg);
        let rec = OutMessage::new(
            MessageKind::Error,
            self.cfg.topics.errors(),
            rec.to_string(),
        );
        self.record(vec![rec], None);
        self.start_drain();
    }

    /// Hands waiting acks, then outbox messages, to the client while connected and its
    /// queue has room; publishes stop short of filling the queue, so acks always find a
    /// place.
    pub fn pump(&mut self) {
        if !self.is_connected() {
            return;
        }
        while let Some(p) = self.unsent_acks.front() {
            if self.link.ack(p).is_err() {
                return;
            }
            self.unsent_acks.pop_front();
        }
        while let Some(&seq) = self.to_send.front() {
            if self.acks.unwritten() >= PUBLISH_QUEUE_LIMIT {
                break;
            }
            let Some(m) = self.outbox.get(seq).cloned() else {
                self.to_send.pop_front();
                continue;
            };
            let limit = self.packet_limit();
            if mqtt::publish_packet_bytes(&m.topic, m.payload.len()) > limit {
                // Recorded under a larger limit (the broker's is smaller, or the settings
                // changed): it would be refused on every try and block what follows.
                self.to_send.pop_front();
                let rec = too_large_record(&self.cfg.topics, &m.topic, &m.payload, limit);
                if let Err(e) = self.outbox.ack(seq) {
                    tracing::error!("{e}");
                }
                // Not recorded: logged and counted by `record`.
                self.record(vec![rec], None);
                continue;
            }
            let payload = m.payload.into_bytes();
            let topic = m.topic.clone();
            match self.publish(Some(seq), m.topic, QoS::AtLeastOnce, m.retain, payload) {
                Ok(()) => {
                    self.to_send.pop_front();
                }
                // The next event frees room; or the connection is gone.
                Err(NotQueued::Full | NotQueued::Disconnected) => break,
                Err(NotQueued::Refused(reason)) => {
                    // Never publishable: kept, it would be refused again on every pump and
                    // reconnect, and hold the drain until its timeout.
                    self.to_send.pop_front();
                    self.stats.publish_refused += 1;
                    tracing::error!(topic = %topic, "dropping an outbox message: {reason}");
                    if let Err(e) = self.outbox.ack(seq) {
                        tracing::error!("{e}");
                    }
                }
            }
        }
    }

    /// Records messages durably, queues them to publish, then acknowledges `ack`; true when
    /// recorded. Payloads whose kind calls for it are redacted first.
    ///
    /// When the outbox cannot be written (disk full, I/O error) nothing is published and
    /// `ack` is not acknowledged: an outcome that is not durable must not stand for its
    /// request, so the broker delivers the request again (on the next connection) and it
    /// is run then. An `outbox_write_failed` error record goes out directly (best effort,
    /// not durable), the failure is logged and counted, and the daemon keeps running.
    fn record(&mut self, mut msgs: Vec<OutMessage>, ack: Option<&Publish>) -> bool {
        let limit = self.packet_limit();
        for m in msgs.iter_mut() {
            m.redact_with(&self.cfg.redactor);
            if mqtt::publish_packet_bytes(&m.topic, m.payload.len()) > limit {
                // Never publishable: recorded, it would block the outbox behind it.
                self.stats.too_large_results += 1;
                *m = too_large_record(&self.cfg.topics, &m.topic, &m.payload, limit);
            }
        }
        // The request id the outcome carries, for the error record if it cannot be kept.
        let id = msgs.iter().find_map(|m| {
            let v: Value = serde_json::from_str(&m.payload).ok()?;
            v.get("id")?.as_str().map(str::to_string)
        });
        let records = msgs.into_iter().map(OutMessage::into_outbox).collect();
        match self.outbox.put_all(records) {
            Ok(put) => self.to_send.extend(put.iter().map(|m| m.seq)),
            Err(e) => {
                self.not_recorded(&e.to_string(), id.as_deref(), ack);
                return false;
            }
        }
        if let Some(p) = ack {
            self.ack_now(p);
        }
        true
    }

    /// The outbox refused an outcome: logged, counted, and said on `<prefix>/errors`
    /// directly when connected; its request is left unacknowledged.
    fn not_recorded(&mut self, reason: &str, id: Option<&str>, request: Option<&Publish>) {
        self.stats.outbox_write_errors += 1;
        let message = format!(
            "{reason}; the outcome is not kept, its request is left to the broker to deliver again"
        );
        tracing::error!("{message}");
        if !self.is_connected() {
            return;
        }
        let topic = request.map(|p| p.topic.as_str());
        let rec = error_record(id, None, topic, "outbox_write_failed", &message);
        let mut msg = OutMessage::new(
            MessageKind::Error,
            self.cfg.topics.errors(),
            rec.to_string(),
        );
        msg.redact_with(&self.cfg.redactor);
        let payload = msg.payload.into_bytes();
        if let Err(e) = self.publish(None, msg.topic, QoS::AtLeastOnce, false, payload) {
            tracing::error!("cannot publish the outbox_write_failed record: {e}");
        }
    }

    /// Acknowledges `p` to the broker; when the client's request queue is full the ack
    /// waits in `unsent_acks` for [`Daemon::pump`] (a dropped PUBACK would hold one of the
    /// broker's in-flight slots for good, and with all of them held no request would
    /// arrive).
    fn ack_now(&mut self, p: &Publish) {
        // Without a connection the broker redelivers it, and the redelivery is acked then
        // (a PUBACK queued now would go out on a later connection, for a stale packet id).
        if p.qos == QoS::AtMostOnce || !self.is_connected() {
            return;
        }
        if !self.unsent_acks.is_empty() || self.link.ack(p).is_err() {
            self.unsent_acks.push_back(p.clone());
        }
    }

    /// Answers a request with an error record and acknowledges it.
    fn reject(
        &mut self,
        p: &Publish,
        id: Option<&str>,
        task: Option<&str>,
        kind: &str,
        message: String,
    ) {
        tracing::warn!(topic = %p.topic, kind, "{}", self.cfg.redactor.redact(&message));
        let rec = error_record(id, task, Some(&p.topic), kind, &message);
        let msg = OutMessage::new(
            MessageKind::Error,
            self.cfg.topics.errors(),
            rec.to_string(),
        );
        // Not recorded: not acknowledged, the broker will deliver it again.
        self.record(vec![msg], Some(p));
    }

    fn on_publish(&mut self, p: Publish) {
        if let Some((name, _)) = self.cfg.context_topics.iter().find(|(_, t)| **t == p.topic) {
            let name = name.clone();
            self.on_context(&name, &p);
            return;
        }
        if self.learning.is_some() && p.topic == self.cfg.topics.feedback() {
            self.on_feedback(p);
            return;
        }
        let Some(task_name) = self.cfg.topics.task_of(&p.topic) else {
            self.ack_now(&p);
            return;
        };
        if self.draining {
            // Not acknowledged: the broker keeps it for our next session.
            return;
        }
        if self.redeliveries.answered_before(&p) {
            // Answered before a connection loss ate our PUBACK: the result is in the outbox.
            self.ack_now(&p);
            return;
        }
        if let Some(ticket) = self.redeliveries.working_on(&p) {
            // Redelivered while we work on it: acknowledge with the newest copy.
            if let Some(t) = self.tickets.get_mut(&ticket) {
                t.publish = Some(p);
            }
            return;
        }
        let Some(task) = self.resolve_task(&task_name) else {
            let msg = format!(
                "unknown task `{task_name}` (serving: {})",
                self.task_names.join(", ")
            );
            self.reject(&p, None, Some(&task_name), "unknown_task", msg);
            return;
        };
        self.submit(p, task, task_name);
    }

    /// Decodes a request for `task` and queues it; an error record when it cannot be.
    fn submit(&mut self, p: Publish, task: usize, task_name: String) {
        let default_id = format!("{}-{}-{}", self.cfg.device_id, now_ms(), self.next_ticket);
        let kind = self.task_kinds[task];
        // The id, when there is a usable one, so even a rejected request can be matched.
        let mut given_id = None;
        let decoded = input::decode_payload_with(&p.payload, self.cfg.max_request_bytes, |v| {
            given_id = match v.get("id") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            Job::from_json(kind, v, &default_id)
        });
        let mut job = match decoded {
            Ok(j) => j,
            Err(e) => {
                let (kind, msg) = (e.kind(), e.to_string());
                let id = given_id.filter(|i| i.len() <= MAX_ID_BYTES);
                self.reject(&p, id.as_deref(), Some(&task_name), kind, msg);
                return;
            }
        };
        if let Err(msg) = check_id_lengths(&job) {
            self.reject(&p, None, Some(&task_name), "too_long", msg);
            return;
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match &mut job {
            Job::Classify(request) => self.add_context(&mut request.fields),
            Job::React(r) => {
                let values = self
                    .context
                    .iter()
                    .map(|(k, (v, _))| (k.clone(), v.clone()));
                r.sensors = Some(worker::sensors_from_context(&values.collect()));
            }
            Job::Rank(_) => {}
        }
        let fields = match &job {
            Job::Classify(r) if self.monitors.watches(task) => Some(r.fields.clone()),
            _ => None,
        };
        let id = job.id().to_string();
        let work = Work {
            task,
            job,
            ticket,
            received: Instant::now(),
        };
        match self.worker.try_submit(work) {
            Ok(()) => {
                self.redeliveries.started(&p, ticket);
                let route = task_name;
                let publish = Some(p);
                self.tickets.insert(
                    ticket,
                    Ticket {
                        publish,
                        route,
                        fields,
                    },
                );
            }
            Err((Rejected::Overloaded, _)) => {
                self.stats.overloaded += 1;
                let msg = format!(
                    "the queue of {} requests is full; try again later",
                    self.cfg.queue_capacity
                );
                self.reject(&p, Some(&id), Some(&task_name), "overloaded", msg);
            }
            Err((Rejected::Stopped, _)) => {
                tracing::error!(
                    "the inference thread has stopped; request {id} left to the broker"
                );
                self.on_worker_stopped();
            }
        }
    }

    /// The task a request topic names: a task by its name, or `rank` for the first ranking
    /// task when no task is called that.
    fn resolve_task(&self, name: &str) -> Option<usize> {
        self.task_names.iter().position(|t| t == name).or_else(|| {
            (name == "rank")
                .then(|| self.task_kinds.iter().position(|k| *k == TaskKind::Rank))
                .flatten()
        })
    }
}

#[path = "state_outcomes.rs"]
mod outcomes;

#[path = "state_feedback.rs"]
mod feedback;

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
