//! `edgeact serve`: the daemon. Reads requests from MQTT (or JSON lines on stdin), hands
//! them to the inference thread over a bounded queue, records every outcome in the durable
//! outbox before acknowledging the request, and publishes from the outbox until PUBACK.
//!
//! One task owns the MQTT event loop, the outbox, the monitors and the bookkeeping below;
//! inference runs on its own thread, so the event loop never blocks on the model.
//!
//! Served tasks are classifications (result, trace, retained state; with `[monitor]` rules,
//! incidents on `<prefix>/<rule>/events`), rankings (`[rank]`; also reachable as
//! `<prefix>/rank/request`) and ReAct loops (`type = "react"`: answer, compact trace, and
//! `notify` side effects on `<prefix>/<task>/notify`).

pub mod mqtt;
pub mod outbox;
pub mod redact;
pub mod worker;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, Outgoing, Publish, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::classify::input;
use crate::classify::ClassifyResult;
use crate::cmd::AppError;
use crate::model::config::EngineConfig;
use crate::monitor::{replay, Monitor, MonitorConfig, Restored};
use crate::rank::RankResult;
use crate::react::request::{compact_trace, ReactResult};
use crate::serve::mqtt::{BrokerConfig, Topics};
use crate::serve::outbox::{Outbox, OutboxLimits, Priority};
use crate::serve::worker::{
    Done, Job, JobError, Output, Rejected, ServedTask, TaskKind, Work, WorkerHandle, WorkerOptions,
};
use crate::util::proc::rss_mib;
use crate::util::stats::percentile;
use crate::util::time::now_ms;

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
    pub batch_size: usize,
    pub outbox_dir: PathBuf,
    pub outbox: OutboxLimits,
    pub stats_interval: Duration,
    pub ha_discovery: bool,
    /// Largest request payload accepted, in bytes.
    pub max_request_bytes: usize,
    /// How long shutdown waits for PUBACKs before leaving the rest in the outbox.
    pub drain_timeout: Duration,
    /// Masks personal data in trace and error payloads and in log lines.
    pub redactor: crate::serve::redact::Redactor,
}

type Msg = (String, String, bool, Priority);

/// An error record for `<prefix>/errors` (and stdout in pipeline mode).
pub fn error_record(
    id: Option<&str>,
    task: Option<&str>,
    topic: Option<&str>,
    kind: &str,
    message: &str,
) -> Value {
    json!({
        "id": id,
        "task": task,
        "topic": topic,
        "error": {"kind": kind, "message": message},
        "ts_ms": now_ms(),
    })
}

/// The compact trace of a result: bounded in size (top labels only), full detail stays in
/// the local log.
pub fn trace_of(r: &ClassifyResult) -> Value {
    let mut scores: Vec<(&String, &f64)> = r.scores.iter().collect();
    scores.sort_by(|a, b| b.1.total_cmp(a.1));
    let top: serde_json::Map<String, Value> = scores
        .iter()
        .take(8)
        .map(|(k, v)| ((*k).clone(), json!((**v * 1e4).round() / 1e4)))
        .collect();
    json!({
        "id": r.id,
        "task": r.task,
        "label": r.label,
        "abstained": r.abstained,
        "template_sha256": r.provenance.template_sha256,
        "model_sha256": &r.provenance.model_sha256[..16.min(r.provenance.model_sha256.len())],
        "tokens": r.tokens,
        "timings_ms": r.timings_ms,
        "top_scores": top,
        "n_labels": r.scores.len(),
        "truncated": r.truncated,
        "calibration": r.calibration.applied,
        "ts_ms": now_ms(),
    })
}

/// What one outcome publishes under `route` (the task name the request came in on):
/// result, trace and retained state for a classification; result and trace for a ranking;
/// answer, trace and `notify` side effects for a ReAct run; or an error record.
pub fn messages_for(
    topics: &Topics,
    route: &str,
    request_id: &str,
    outcome: &Result<Output, JobError>,
) -> Vec<Msg> {
    match outcome {
        Ok(Output::Classified(r)) => {
            let result = serde_json::to_string(r).unwrap_or_default();
            let state = json!({
                "id": r.id, "label": r.label, "top_label": r.top_label,
                "confidence": r.confidence, "abstained": r.abstained, "ts_ms": now_ms(),
            });
            vec![
                (topics.result(route), result, false, Priority::Normal),
                (
                    topics.trace(route),
                    trace_of(r).to_string(),
                    false,
                    Priority::Low,
                ),
                (
                    topics.state(route),
                    state.to_string(),
                    true,
                    Priority::Normal,
                ),
            ]
        }
        Ok(Output::Ranked(r)) => vec![
            (
                topics.result(route),
                serde_json::to_string(r).unwrap_or_default(),
                false,
                Priority::Normal,
            ),
            (
                topics.trace(route),
                rank_trace(r).to_string(),
                false,
                Priority::Low,
            ),
        ],
        Ok(Output::Reacted(r)) => {
            let mut msgs: Vec<Msg> = r
                .notify
                .iter()
                .map(|n| {
                    let mut n = n.clone();
                    n["id"] = json!(r.id);
                    (topics.notify(route), n.to_string(), false, Priority::High)
                })
                .collect();
            msgs.push((
                topics.result(route),
                serde_json::to_string(r.as_ref() as &ReactResult).unwrap_or_default(),
                false,
                Priority::Normal,
            ));
            msgs.push((
                topics.trace(route),
                compact_trace(r).to_string(),
                false,
                Priority::Low,
            ));
            msgs
        }
        Err(e) => vec![(
            topics.errors(),
            error_record(
                Some(request_id),
                Some(route),
                Some(&topics.request(route)),
                e.kind(),
                &e.to_string(),
            )
            .to_string(),
            false,
            Priority::High,
        )],
    }
}

/// The compact trace of a ranking: the top items' ids and scores, counts and time.
fn rank_trace(r: &RankResult) -> Value {
    let top: Vec<Value> = r
        .ranked
        .iter()
        .take(8)
        .map(|x| json!({"id": x.id, "score": (x.score * 1e4).round() / 1e4}))
        .collect();
    json!({
        "id": r.id,
        "task": r.task,
        "top": top,
        "n_items": r.n_items,
        "n_ranked": r.ranked.len(),
        "n_failed": r.failed.len(),
        "prefix_tokens_decoded": r.prefix_tokens_decoded,
        "ms": r.ms,
        "ts_ms": now_ms(),
    })
}

/// Rolling figures for `<prefix>/stats`.
struct Stats {
    started: Instant,
    results: u64,
    errors: u64,
    overloaded: u64,
    /// Outcomes published without the outbox because it could not be written.
    outbox_write_errors: u64,
    decoded_tokens: u64,
    latencies_ms: VecDeque<f64>,
    last: (Instant, u64, u64),
}

impl Stats {
    fn new() -> Stats {
        Stats {
            started: Instant::now(),
            results: 0,
            errors: 0,
            overloaded: 0,
            outbox_write_errors: 0,
            decoded_tokens: 0,
            latencies_ms: VecDeque::new(),
            last: (Instant::now(), 0, 0),
        }
    }

    fn record(&mut self, d: &Done) {
        match &d.outcome {
            Ok(o) => {
                self.results += 1;
                self.decoded_tokens += match o {
                    Output::Classified(r) => r.tokens.decoded as u64,
                    Output::Ranked(r) => r.ranked.iter().map(|x| x.tokens_decoded as u64).sum(),
                    Output::Reacted(r) => r.generated_tokens as u64,
                };
            }
            Err(_) => self.errors += 1,
        }
        if self.latencies_ms.len() == 1024 {
            self.latencies_ms.pop_front();
        }
        self.latencies_ms.push_back(d.latency_ms);
    }

    fn snapshot(&mut self, queue_depth: usize, outbox: &Outbox) -> Value {
        let mut l: Vec<f64> = self.latencies_ms.iter().copied().collect();
        l.sort_by(f64::total_cmp);
        let pct = |q: f64| percentile(&l, q);
        let secs = self.last.0.elapsed().as_secs_f64().max(1e-3);
        let rate = (self.results - self.last.1) as f64 / secs;
        let tok_rate = (self.decoded_tokens - self.last.2) as f64 / secs;
        self.last = (Instant::now(), self.results, self.decoded_tokens);
        let (peak, rss) = rss_mib();
        json!({
            "queue_depth": queue_depth,
            "outbox_depth": outbox.len(),
            "outbox_bytes": outbox.live_bytes(),
            "outbox_dropped": outbox.counters.dropped_for_size + outbox.counters.dropped_for_age,
            "outbox_torn_records": outbox.counters.torn_records,
            "outbox_write_errors": self.outbox_write_errors,
            "results_total": self.results,
            "errors_total": self.errors,
            "overloaded_total": self.overloaded,
            "results_per_s": (rate * 100.0).round() / 100.0,
            "latency_p50_ms": (pct(0.5) * 10.0).round() / 10.0,
            "latency_p99_ms": (pct(0.99) * 10.0).round() / 10.0,
            "decoded_tokens_per_s": tok_rate.round(),
            "rss_mib": rss.round(),
            "peak_rss_mib": peak.round(),
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }
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

/// A task's alert rules, their state file and whether it changed since it was saved.
struct TaskMonitor {
    monitor: Monitor,
    ts_field: String,
    path: PathBuf,
    dirty: bool,
    /// When the last message came, and the stream's time then: an idle stream's time moves
    /// on with the wall clock from there, whatever epoch its event times use.
    last_seen: Option<(Instant, i64)>,
}

struct Daemon {
    cfg: ServeConfig,
    client: AsyncClient,
    worker: WorkerHandle,
    outbox: Outbox,
    stats: Stats,
    connected: bool,
    /// Outbox seqs (None: a publish not from the outbox) in the order they were handed to
    /// rumqttc, waiting for their packet id.
    awaiting_pkid: VecDeque<Option<u64>>,
    pkid_to_seq: HashMap<u16, u64>,
    /// Outbox seqs not yet handed to rumqttc in this connection, oldest first.
    to_send: VecDeque<u64>,
    tickets: HashMap<u64, Ticket>,
    /// Incoming packet ids being worked on, so a redelivered duplicate is not run twice.
    incoming_pkids: HashMap<u16, u64>,
    next_ticket: u64,
    context: BTreeMap<String, String>,
    draining: bool,
    subacks_pending: usize,
    /// Requests already answered, by (packet id, payload hash), most recent last: a
    /// redelivery (DUP) of one of them after a lost PUBACK is acknowledged, not run again.
    answered: VecDeque<(u16, u64)>,
    /// By task index.
    monitors: HashMap<usize, TaskMonitor>,
    /// Requests to acknowledge once rumqttc's request queue has room, oldest first.
    pending_acks: VecDeque<Publish>,
}

const ANSWERED_MEMORY: usize = 4096;

/// Publishes handed to rumqttc and not yet sent, at most: its request queue holds 1024, and
/// the rest is kept for acks and subscriptions.
const PUBLISH_QUEUE_LIMIT: usize = 768;

fn payload_hash(p: &Publish) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.topic.hash(&mut h);
    p.payload.hash(&mut h);
    h.finish()
}

/// Runs the MQTT daemon until `shutdown` resolves, then drains and exits cleanly.
pub async fn serve(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let broker = cfg.broker.clone().ok_or_else(|| AppError::Input {
        what: "broker".into(),
        source: std::io::Error::other("serve over MQTT needs --broker"),
    })?;
    let options = broker.options(&cfg.topics).map_err(AppError::Mqtt)?;
    let outbox = Outbox::open(&cfg.outbox_dir, cfg.outbox).map_err(AppError::Outbox)?;
    if !outbox.is_empty() {
        tracing::info!(
            pending = outbox.len(),
            "outbox has messages from before the restart: replaying them"
        );
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let worker = worker::spawn(
        cfg.engine.clone(),
        cfg.tasks.clone(),
        cfg.worker_options(),
        move |d| {
            let _ = done_tx.send(d);
        },
    )?;
    let monitors = open_monitors(&cfg, &worker)?;
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Small messages, latency matters: no Nagle delay.
    eventloop.network_options.set_tcp_nodelay(true);
    let mut d = Daemon {
        cfg,
        client,
        worker,
        outbox,
        stats: Stats::new(),
        connected: false,
        awaiting_pkid: VecDeque::new(),
        pkid_to_seq: HashMap::new(),
        to_send: VecDeque::new(),
        tickets: HashMap::new(),
        incoming_pkids: HashMap::new(),
        next_ticket: 1,
        context: BTreeMap::new(),
        draining: false,
        subacks_pending: 0,
        answered: VecDeque::new(),
        monitors,
        pending_acks: VecDeque::new(),
    };
    let mut stats_tick = tokio::time::interval(d.cfg.stats_interval);
    stats_tick.tick().await;
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    // Until the first ConnAck, refused credentials or an untrusted certificate are a
    // configuration error (exit with the cause); afterwards every failure is retried.
    let mut ever_connected = false;
    let mut drain_deadline: Option<Instant> = None;
    let mut stopped_sent = false;
    // rumqttc's poll() is not cancel-safe (a request taken from its queue can be lost if the
    // future is dropped mid-write), so one poll future lives across loop turns: it owns the
    // event loop and hands it back with the event.
    let mut poll = Box::pin(poll_owned(eventloop, tokio::time::Instant::now()));
    loop {
        if d.draining {
            let idle = d.tickets.is_empty() && d.worker.depth() == 0;
            let flushed = d.outbox.is_empty();
            let late = drain_deadline.is_some_and(|t| Instant::now() >= t);
            if idle && (flushed || late || !d.connected) && !stopped_sent {
                if late && !flushed {
                    tracing::warn!(
                        pending = d.outbox.len(),
                        "drain timeout: the rest stays in the outbox for the next start"
                    );
                }
                let _ = d.client.try_publish(
                    d.cfg.topics.available(),
                    QoS::AtLeastOnce,
                    true,
                    "stopped",
                );
                d.awaiting_pkid.push_back(None);
                let _ = d.client.try_disconnect();
                stopped_sent = true;
                if !d.connected {
                    break;
                }
            }
        }
        tokio::select! {
            (mut eventloop, ev) = &mut poll => {
                let mut next_at = tokio::time::Instant::now();
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        attempt = 0;
                        ever_connected = true;
                        d.on_connected();
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => d.on_publish(p),
                    Ok(Event::Incoming(Incoming::PubAck(a))) => d.on_puback(a.pkid),
                    Ok(Event::Incoming(Incoming::SubAck(a))) => {
                        if a.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                            tracing::error!("the broker refused a subscription (ACL?): requests on it will not arrive");
                        }
                        d.on_suback()
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(Some(seq)) = d.awaiting_pkid.pop_front() {
                            d.pkid_to_seq.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) if stopped_sent => {
                        // Let the disconnect reach the broker, then stop.
                        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if stopped_sent {
                            break;
                        }
                        if !ever_connected {
                            if let Some(reason) = mqtt::refusal_reason(&e) {
                                return Err(AppError::Mqtt(mqtt::MqttConfigError::Refused {
                                    broker: format!("{}:{}", broker.host, broker.port),
                                    reason,
                                }));
                            }
                        }
                        let hint = mqtt::connect_hint(&e, broker.tls);
                        if d.connected {
                            tracing::warn!("broker connection lost: {e}{hint}; results wait in the outbox");
                        } else {
                            tracing::warn!("cannot reach the broker: {e}{hint}");
                        }
                        d.on_disconnected();
                        // rumqttc keeps unacknowledged publishes in memory to resend; the outbox
                        // replays them instead, so drop its copies to keep packet ids in step.
                        eventloop.pending.clear();
                        let wait = mqtt::backoff(attempt, now_ms() ^ ((attempt as u64) << 32));
                        attempt = attempt.saturating_add(1);
                        next_at += wait;
                    }
                }
                poll = Box::pin(poll_owned(eventloop, next_at));
            },
            Some(done) = done_rx.recv() => d.on_done(done)?,
            _ = stats_tick.tick() => {
                d.publish_stats();
                d.tick_monitors()?;
            },
            _ = &mut shutdown, if !d.draining => {
                tracing::info!("shutting down: no new requests; finishing in-flight work and flushing the outbox");
                d.draining = true;
                drain_deadline = Some(Instant::now() + d.cfg.drain_timeout);
                d.worker.close();
            },
            _ = tokio::time::sleep(Duration::from_millis(200)), if d.draining => {}
        }
        d.pump();
    }
    d.outbox.sync(true).map_err(AppError::Outbox)?;
    d.worker.join();
    d.save_monitors();
    Ok(())
}

impl ServeConfig {
    fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            queue_capacity: self.queue_capacity,
            batch_size: self.batch_size,
            session_dir: self.outbox_dir.join("sessions"),
        }
    }
}

/// Each monitored task's rules, with the window state saved before the last stop.
fn open_monitors(
    cfg: &ServeConfig,
    worker: &WorkerHandle,
) -> Result<HashMap<usize, TaskMonitor>, AppError> {
    let mut out = HashMap::new();
    for (name, mcfg) in &cfg.monitors {
        let Some(i) = worker.task_index(name) else {
            continue;
        };
        let path = cfg.outbox_dir.join(format!("monitor-{name}.json"));
        let (monitor, restored) = Monitor::restore(mcfg, &path).map_err(|e| AppError::Input {
            what: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        match restored {
            Restored::Fresh => {}
            Restored::Loaded { reset_rules } => tracing::info!(
                task = %name,
                open_incidents = monitor.open_incidents().len(),
                ?reset_rules,
                "monitor state restored"
            ),
            Restored::Discarded(reason) => tracing::warn!(
                task = %name,
                path = %path.display(),
                "monitor state discarded ({reason}); starting with empty windows"
            ),
        }
        out.insert(
            i,
            TaskMonitor {
                monitor,
                ts_field: mcfg.ts_field.clone(),
                path,
                dirty: false,
                last_seen: None,
            },
        );
    }
    Ok(out)
}

impl Daemon {
    fn on_connected(&mut self) {
        self.connected = true;
        tracing::info!("connected to the broker");
        self.awaiting_pkid.clear();
        self.pkid_to_seq.clear();
        // Replay everything still in the outbox, oldest first.
        self.to_send = self.outbox.pending().map(|m| m.seq).collect();
        let t = &self.cfg.topics;
        let mut subs = vec![t.request_wildcard()];
        for task in &self.worker.task_names {
            subs.extend(t.shared_request(task));
        }
        subs.extend(self.cfg.context_topics.values().cloned());
        self.subacks_pending = 0;
        for s in subs {
            match self.client.try_subscribe(s.clone(), QoS::AtLeastOnce) {
                Ok(()) => self.subacks_pending += 1,
                Err(e) => tracing::error!("cannot subscribe to {s}: {e}"),
            }
        }
        if self.cfg.ha_discovery {
            let (topic, payload) =
                mqtt::ha_discovery(&self.cfg.device_id, t, &self.worker.task_names);
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload);
            self.awaiting_pkid.push_back(None);
        }
    }

    /// `online` once every subscription is in place: from then on no request is missed.
    fn on_suback(&mut self) {
        self.subacks_pending = self.subacks_pending.saturating_sub(1);
        if self.subacks_pending == 0 && self.connected {
            let _ = self.client.try_publish(
                self.cfg.topics.available(),
                QoS::AtLeastOnce,
                true,
                "online",
            );
            self.awaiting_pkid.push_back(None);
            tracing::info!("subscribed: serving");
        }
    }

    fn on_disconnected(&mut self) {
        self.connected = false;
        // The broker redelivers what this session did not acknowledge (DUP), and the
        // redelivery is acknowledged then.
        self.pending_acks.clear();
        self.awaiting_pkid.clear();
        self.pkid_to_seq.clear();
        self.to_send.clear();
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(seq) = self.pkid_to_seq.remove(&pkid) {
            if let Err(e) = self.outbox.ack(seq) {
                tracing::error!("{e}");
            }
        }
    }

    /// Hands waiting acks, then outbox messages, to rumqttc while connected and its queue has
    /// room; publishes stop short of filling the queue, so acks always find a place.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(p) = self.pending_acks.front() {
            if self.client.try_ack(p).is_err() {
                return;
            }
            self.pending_acks.pop_front();
        }
        while let Some(&seq) = self.to_send.front() {
            if self.awaiting_pkid.len() >= PUBLISH_QUEUE_LIMIT {
                break;
            }
            let Some(m) = self.outbox.get(seq).cloned() else {
                self.to_send.pop_front();
                continue;
            };
            match self.client.try_publish(
                m.topic,
                QoS::AtLeastOnce,
                m.retain,
                m.payload.into_bytes(),
            ) {
                Ok(()) => {
                    self.to_send.pop_front();
                    self.awaiting_pkid.push_back(Some(seq));
                }
                Err(_) => break, // queue full: the next event frees room
            }
        }
    }

    /// Records messages durably, queues them to publish, then acknowledges `ack`. Trace and
    /// error payloads are redacted first. When the outbox cannot be written (disk full, I/O
    /// error) the messages are published directly instead, without the crash guarantee, so
    /// the daemon keeps answering; each such write error is logged and counted.
    fn record(&mut self, mut msgs: Vec<Msg>, ack: Option<&Publish>) -> Result<(), AppError> {
        let t = &self.cfg.topics;
        for m in msgs.iter_mut() {
            if m.0 == t.errors() || m.0.ends_with("/trace") {
                m.1 = self.cfg.redactor.redact_payload(&m.1);
            }
        }
        match self.outbox.put_all(msgs.clone()) {
            Ok(put) => self.to_send.extend(put.iter().map(|m| m.seq)),
            Err(e) => {
                self.stats.outbox_write_errors += 1;
                tracing::error!(
                    "{e}; publishing {} message(s) without the outbox (not crash-safe until it can be written again)",
                    msgs.len()
                );
                for (topic, payload, retain, _) in msgs {
                    if self
                        .client
                        .try_publish(topic, QoS::AtLeastOnce, retain, payload.into_bytes())
                        .is_ok()
                    {
                        self.awaiting_pkid.push_back(None);
                    } else {
                        // Neither recorded nor queued: leave the request unacknowledged so
                        // the broker delivers it again.
                        return Err(AppError::Outbox(e));
                    }
                }
            }
        }
        if let Some(p) = ack {
            self.ack_now(p);
        }
        Ok(())
    }

    /// Acknowledges `p` to the broker; when rumqttc's request queue is full the ack waits in
    /// `pending_acks` for [`Daemon::pump`] (a dropped PUBACK would hold one of the broker's
    /// in-flight slots for good, and with all of them held no request would arrive).
    fn ack_now(&mut self, p: &Publish) {
        if p.qos == QoS::AtMostOnce {
            return;
        }
        if !self.pending_acks.is_empty() || self.client.try_ack(p).is_err() {
            self.pending_acks.push_back(p.clone());
        }
    }

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
        let msgs = vec![(
            self.cfg.topics.errors(),
            rec.to_string(),
            false,
            Priority::High,
        )];
        if let Err(e) = self.record(msgs, Some(p)) {
            // Not acknowledged: the broker will deliver it again.
            tracing::error!("cannot record or publish an error record: {e}");
        }
    }

    fn on_publish(&mut self, p: Publish) {
        if let Some((name, _)) = self.cfg.context_topics.iter().find(|(_, t)| **t == p.topic) {
            self.context.insert(
                format!("context.{name}"),
                String::from_utf8_lossy(&p.payload).into_owned(),
            );
            self.ack_now(&p);
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
        if p.dup && self.answered.contains(&(p.pkid, payload_hash(&p))) {
            // Answered before a connection loss ate our PUBACK: the result is in the outbox.
            self.ack_now(&p);
            return;
        }
        if p.qos != QoS::AtMostOnce {
            if let Some(&ticket) = self.incoming_pkids.get(&p.pkid) {
                // Redelivered while we work on it: acknowledge with the newest copy.
                if let Some(t) = self.tickets.get_mut(&ticket) {
                    t.publish = Some(p);
                }
                return;
            }
        }
        let Some(task) = self.resolve_task(&task_name) else {
            let msg = format!(
                "unknown task `{task_name}` (serving: {})",
                self.worker.task_names.join(", ")
            );
            self.reject(&p, None, Some(&task_name), "unknown_task", msg);
            return;
        };
        let default_id = format!("{}-{}-{}", self.cfg.device_id, now_ms(), self.next_ticket);
        let kind = self.worker.task_kinds[task];
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
                self.reject(
                    &p,
                    given_id.as_deref(),
                    Some(&task_name),
                    e.kind(),
                    e.to_string(),
                );
                return;
            }
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match &mut job {
            Job::Classify(request) => {
                for (k, v) in &self.context {
                    request.fields.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            Job::React(r) => r.sensors = Some(worker::sensors_from_context(&self.context)),
            Job::Rank(_) => {}
        }
        let fields = match &job {
            Job::Classify(r) if self.monitors.contains_key(&task) => Some(r.fields.clone()),
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
                if p.qos != QoS::AtMostOnce {
                    self.incoming_pkids.insert(p.pkid, ticket);
                }
                self.tickets.insert(
                    ticket,
                    Ticket {
                        publish: Some(p),
                        route: task_name,
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
            }
        }
    }

    /// The task a request topic names: a task by its name, or `rank` for the first ranking
    /// task when no task is called that.
    fn resolve_task(&self, name: &str) -> Option<usize> {
        self.worker.task_index(name).or_else(|| {
            (name == "rank")
                .then(|| {
                    self.worker
                        .task_kinds
                        .iter()
                        .position(|k| *k == TaskKind::Rank)
                })
                .flatten()
        })
    }

    fn on_done(&mut self, d: Done) -> Result<(), AppError> {
        self.stats.record(&d);
        let ticket = self.tickets.remove(&d.ticket);
        let task = self
            .worker
            .task_names
            .get(d.task)
            .cloned()
            .unwrap_or_default();
        if let Err(e) = &d.outcome {
            let e = e.to_string();
            tracing::warn!(id = %d.request_id, task = %task, "{}", self.cfg.redactor.redact(&e));
        }
        let route = ticket.as_ref().map_or(task, |t| t.route.clone());
        let mut msgs = messages_for(&self.cfg.topics, &route, &d.request_id, &d.outcome);
        if let (Ok(Output::Classified(r)), Some(fields)) =
            (&d.outcome, ticket.as_ref().and_then(|t| t.fields.as_ref()))
        {
            msgs.extend(self.observe(d.task, r, fields));
        }
        let publish = ticket.and_then(|t| t.publish);
        if let Some(p) = &publish {
            self.incoming_pkids.remove(&p.pkid);
            if p.qos != QoS::AtMostOnce {
                if self.answered.len() == ANSWERED_MEMORY {
                    self.answered.pop_front();
                }
                self.answered.push_back((p.pkid, payload_hash(p)));
            }
        }
        self.record(msgs, publish.as_ref())
    }

    /// Feeds a classification to its task's monitor; the incident messages it caused.
    fn observe(
        &mut self,
        task: usize,
        r: &ClassifyResult,
        fields: &BTreeMap<String, String>,
    ) -> Vec<Msg> {
        let Some(m) = self.monitors.get_mut(&task) else {
            return Vec::new();
        };
        let ts_ms = replay::event_time_ms(fields, &m.ts_field).unwrap_or(now_ms() as i64);
        let obs = crate::monitor::Observation {
            id: r.id.clone(),
            ts_ms,
            label: r.label.clone(),
            confidence: r.confidence,
            fields: fields.clone(),
        };
        let events = m.monitor.observe(&obs);
        m.dirty = true;
        m.last_seen = m.monitor.watermark_ms().map(|w| (Instant::now(), w));
        if !events.is_empty() {
            // Incidents opened or ended: keep the windows that explain them.
            if let Err(e) = m.monitor.save(&m.path) {
                tracing::error!("{e}");
            } else {
                m.dirty = false;
            }
        }
        let prefix = &self.cfg.topics.prefix;
        events
            .iter()
            .map(|e| (e.topic(prefix), e.payload(), false, Priority::High))
            .collect()
    }

    /// On the stats tick: moves idle monitors' time on (quiet incidents end) and saves
    /// window state that changed.
    fn tick_monitors(&mut self) -> Result<(), AppError> {
        let prefix = self.cfg.topics.prefix.clone();
        let mut msgs = Vec::new();
        for m in self.monitors.values_mut() {
            let Some((at, watermark)) = m.last_seen else {
                continue;
            };
            let now = watermark + at.elapsed().as_millis() as i64;
            let events = m.monitor.advance_to(now);
            if !events.is_empty() {
                m.dirty = true;
            }
            msgs.extend(
                events
                    .iter()
                    .map(|e| (e.topic(&prefix), e.payload(), false, Priority::High)),
            );
        }
        self.save_monitors();
        if msgs.is_empty() {
            return Ok(());
        }
        self.record(msgs, None)
    }

    fn save_monitors(&mut self) {
        for m in self.monitors.values_mut().filter(|m| m.dirty) {
            match m.monitor.save(&m.path) {
                Ok(()) => m.dirty = false,
                Err(e) => tracing::error!("{e}"),
            }
        }
    }

    fn publish_stats(&mut self) {
        let s = self.stats.snapshot(self.worker.depth(), &self.outbox);
        tracing::debug!(stats = %s, "stats");
        let sent = self.connected
            && self
                .client
                .try_publish(
                    self.cfg.topics.stats(),
                    QoS::AtMostOnce,
                    false,
                    s.to_string(),
                )
                .is_ok();
        if sent {
            self.awaiting_pkid.push_back(None);
        }
        // Acks are written without fsync; settle them now and then.
        let _ = self.outbox.sync(false);
    }
}

/// Pipeline mode: JSON lines on stdin (`task` optional, default the first task), one JSON
/// result or error record per line on stdout, in input order.
pub fn serve_stdio(
    cfg: ServeConfig,
    input: impl BufRead,
    mut out: impl Write,
) -> Result<(), AppError> {
    let (tx, rx) = std::sync::mpsc::channel::<Done>();
    let mut worker = worker::spawn(
        cfg.engine.clone(),
        cfg.tasks.clone(),
        cfg.worker_options(),
        move |d| {
            let _ = tx.send(d);
        },
    )?;
    let mut pending: BTreeMap<u64, Option<Value>> = BTreeMap::new();
    let mut next_out = 1u64;
    let write_ready = |pending: &mut BTreeMap<u64, Option<Value>>,
                       next_out: &mut u64,
                       out: &mut dyn Write|
     -> Result<(), AppError> {
        while let Some(Some(v)) = pending.get(next_out) {
            writeln!(out, "{v}").map_err(AppError::Output)?;
            pending.remove(next_out);
            *next_out += 1;
        }
        out.flush().map_err(AppError::Output)
    };
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    let mut input = input;
    loop {
        buf.clear();
        let n = input
            .read_until(b'\n', &mut buf)
            .map_err(|source| AppError::Input {
                what: "standard input".into(),
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let record = match input::parse_line_value(&buf, line_no as usize) {
            Ok(None) => {
                line_no -= 1;
                continue;
            }
            Err(e) => Some(error_record(None, None, None, e.kind(), &e.to_string())),
            Ok(Some(value)) => stdio_submit(&worker, value, line_no)?,
        };
        pending.insert(line_no, record);
        while let Ok(d) = rx.try_recv() {
            pending.insert(d.ticket, Some(done_value(&worker, d)));
        }
        write_ready(&mut pending, &mut next_out, &mut out)?;
    }
    worker.close();
    while pending.values().any(Option::is_none) {
        match rx.recv() {
            Ok(d) => {
                pending.insert(d.ticket, Some(done_value(&worker, d)));
            }
            Err(_) => break,
        }
    }
    write_ready(&mut pending, &mut next_out, &mut out)?;
    worker.join();
    Ok(())
}

/// Queues one pipeline line (`task` picks the task, default the first); an error record
/// when the line is not a request for it.
fn stdio_submit(
    worker: &WorkerHandle,
    mut value: Value,
    line_no: u64,
) -> Result<Option<Value>, AppError> {
    let task_name = match value.as_object_mut().and_then(|o| o.remove("task")) {
        None => worker.task_names[0].clone(),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Ok(Some(error_record(
                None,
                None,
                None,
                "invalid_request",
                &format!("line {line_no}: field `task` must be a string"),
            )))
        }
    };
    let Some(task) = worker.task_index(&task_name) else {
        return Ok(Some(error_record(
            value.get("id").and_then(Value::as_str),
            Some(&task_name),
            None,
            "unknown_task",
            &format!("unknown task `{task_name}`"),
        )));
    };
    let job = match Job::from_json(worker.task_kinds[task], value, &line_no.to_string()) {
        Ok(j) => j,
        Err(reason) => {
            return Ok(Some(error_record(
                None,
                Some(&task_name),
                None,
                "invalid_request",
                &format!("line {line_no}: {reason}"),
            )))
        }
    };
    let work = Work {
        task,
        job,
        ticket: line_no,
        received: Instant::now(),
    };
    worker.submit(work).map_err(|_| AppError::Input {
        what: "inference thread".into(),
        source: std::io::Error::other("stopped"),
    })?;
    Ok(None)
}

fn done_value(worker: &WorkerHandle, d: Done) -> Value {
    match d.outcome {
        Ok(Output::Classified(r)) => serde_json::to_value(r.as_ref()).unwrap_or(Value::Null),
        Ok(Output::Ranked(r)) => serde_json::to_value(&r).unwrap_or(Value::Null),
        Ok(Output::Reacted(r)) => serde_json::to_value(r.as_ref()).unwrap_or(Value::Null),
        Err(e) => error_record(
            Some(&d.request_id),
            worker.task_names.get(d.task).map(String::as_str),
            None,
            e.kind(),
            &e.to_string(),
        ),
    }
}

/// One poll of the event loop, after `not_before`; owns the loop and gives it back.
async fn poll_owned(
    mut eventloop: rumqttc::EventLoop,
    not_before: tokio::time::Instant,
) -> (rumqttc::EventLoop, Result<Event, rumqttc::ConnectionError>) {
    tokio::time::sleep_until(not_before).await;
    let ev = eventloop.poll().await;
    if let Ok(e) = &ev {
        tracing::trace!(event = ?e, "mqtt");
    }
    (eventloop, ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::agent::{StepRecord, StopReason, Trace};

    fn topics() -> Topics {
        Topics {
            prefix: "edgeact/d".into(),
            fleet_prefix: "edgeact/fleet".into(),
            share_group: None,
        }
    }

    #[test]
    fn a_react_outcome_publishes_notifications_first_then_answer_and_trace() {
        let trace = Trace {
            task: "kiosk".into(),
            question: "My child is lost".into(),
            answer: "A member of staff is on the way.".into(),
            finished: true,
            stop_reason: StopReason::Final,
            seed: 42,
            grammar: true,
            steps: vec![
                StepRecord {
                    thought: Some("Staff must help.".into()),
                    tool: Some("notify".into()),
                    arg: Some(r#"{"reason":"lost child"}"#.into()),
                    observation: Some("x".repeat(5000)),
                    passage_ids: vec!["lost-child".into()],
                    ..StepRecord::default()
                },
                StepRecord {
                    final_answer: Some("A member of staff is on the way.".into()),
                    ..StepRecord::default()
                },
            ],
            generated_tokens: 40,
            unparsable_steps: 0,
            refused_calls: 0,
            tool_errors: 0,
            dropped_observations: 0,
            history_turns: 0,
            dropped_turns: 0,
            total_ms: 1234.56,
        };
        let notify = vec![json!({"task": "kiosk", "payload": {"reason": "lost child"}})];
        let r = ReactResult::new("k7", None, trace, notify);
        let msgs = messages_for(&topics(), "kiosk", "k7", &Ok(Output::Reacted(Box::new(r))));
        let names: Vec<&str> = msgs.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "edgeact/d/kiosk/notify",
                "edgeact/d/kiosk/result",
                "edgeact/d/kiosk/trace"
            ]
        );
        assert_eq!(msgs[0].3, Priority::High, "side effects go first");
        let n: Value = serde_json::from_str(&msgs[0].1).unwrap();
        assert_eq!(
            (n["id"].as_str(), n["payload"]["reason"].as_str()),
            (Some("k7"), Some("lost child"))
        );
        let result: Value = serde_json::from_str(&msgs[1].1).unwrap();
        assert_eq!(result["stop_reason"], "final");
        assert_eq!(result["citations"], json!(["lost-child"]));
        assert_eq!(result["notifications"], 1);
        assert!(result.get("trace").is_none(), "the full trace stays local");
        assert!(
            msgs[2].1.len() < 2000,
            "observations are cut in the compact trace"
        );
    }
}
