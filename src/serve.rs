//! `edgeact serve`: the daemon. Reads requests from MQTT (or JSON lines on stdin), hands
//! them to the inference thread over a bounded queue, records every outcome in the durable
//! outbox before acknowledging the request, and publishes from the outbox until PUBACK.
//!
//! One task owns the MQTT event loop, the outbox and the bookkeeping below; inference runs
//! on its own thread, so the event loop never blocks on the model.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, Incoming, Outgoing, Publish, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::app::{percentile, rss_mib, AppError};
use crate::classify::{ClassifyResult, RecordError};
use crate::config::EngineConfig;
use crate::input;
use crate::mqtt::{self, BrokerConfig, Topics};
use crate::outbox::{Outbox, OutboxLimits, Priority};
use crate::task::Task;
use crate::worker::{self, Done, Rejected, Work, WorkerHandle};

/// Everything `serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub tasks: Vec<Task>,
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
    pub redactor: crate::redact::Redactor,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// What one outcome publishes: result, trace and retained state; or an error record.
pub fn messages_for(
    topics: &Topics,
    task: &str,
    request_id: &str,
    outcome: &Result<ClassifyResult, RecordError>,
) -> Vec<Msg> {
    match outcome {
        Ok(r) => {
            let result = serde_json::to_string(r).unwrap_or_default();
            let state = json!({
                "id": r.id, "label": r.label, "top_label": r.top_label,
                "confidence": r.confidence, "abstained": r.abstained, "ts_ms": now_ms(),
            });
            vec![
                (topics.result(task), result, false, Priority::Normal),
                (
                    topics.trace(task),
                    trace_of(r).to_string(),
                    false,
                    Priority::Low,
                ),
                (
                    topics.state(task),
                    state.to_string(),
                    true,
                    Priority::Normal,
                ),
            ]
        }
        Err(e) => vec![(
            topics.errors(),
            error_record(
                Some(request_id),
                Some(task),
                Some(&topics.request(task)),
                e.kind(),
                &e.to_string(),
            )
            .to_string(),
            false,
            Priority::High,
        )],
    }
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
            Ok(r) => {
                self.results += 1;
                self.decoded_tokens += r.tokens.decoded as u64;
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
}

const ANSWERED_MEMORY: usize = 4096;

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
        cfg.queue_capacity,
        cfg.batch_size,
        move |d| {
            let _ = done_tx.send(d);
        },
    )?;
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
            _ = stats_tick.tick() => d.publish_stats(),
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
    Ok(())
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

    /// Hands outbox messages to rumqttc while connected and its queue has room.
    fn pump(&mut self) {
        if !self.connected {
            return;
        }
        while let Some(&seq) = self.to_send.front() {
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
            if p.qos != QoS::AtMostOnce {
                let _ = self.client.try_ack(p);
            }
        }
        Ok(())
    }

    fn ack_now(&self, p: &Publish) {
        if p.qos != QoS::AtMostOnce {
            let _ = self.client.try_ack(p);
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
        let Some(task) = self.worker.task_index(&task_name) else {
            let msg = format!(
                "unknown task `{task_name}` (serving: {})",
                self.worker.task_names.join(", ")
            );
            self.reject(&p, None, Some(&task_name), "unknown_task", msg);
            return;
        };
        if p.payload.len() > self.cfg.max_request_bytes {
            let msg = format!(
                "request is {} bytes, over the limit of {}",
                p.payload.len(),
                self.cfg.max_request_bytes
            );
            self.reject(&p, None, Some(&task_name), "too_large", msg);
            return;
        }
        let text = match std::str::from_utf8(&p.payload) {
            Ok(t) => t,
            Err(e) => {
                let msg = format!(
                    "payload is not valid UTF-8 (first bad byte at offset {})",
                    e.valid_up_to()
                );
                self.reject(&p, None, Some(&task_name), "invalid_utf8", msg);
                return;
            }
        };
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.reject(
                    &p,
                    None,
                    Some(&task_name),
                    "invalid_json",
                    format!("payload is not valid JSON: {e}"),
                );
                return;
            }
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let default_id = format!("{}-{}-{ticket}", self.cfg.device_id, now_ms());
        // The id, when there is a usable one, so even a rejected request can be matched.
        let given_id = match value.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let mut request = match input::request_from_json(value, &default_id) {
            Ok(r) => r,
            Err(msg) => {
                self.reject(
                    &p,
                    given_id.as_deref(),
                    Some(&task_name),
                    "invalid_request",
                    msg,
                );
                return;
            }
        };
        for (k, v) in &self.context {
            request.fields.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let id = request.id.clone();
        let work = Work {
            task,
            request,
            ticket,
            received: Instant::now(),
        };
        match self.worker.try_submit(work) {
            Ok(()) => {
                if p.qos != QoS::AtMostOnce {
                    self.incoming_pkids.insert(p.pkid, ticket);
                }
                self.tickets.insert(ticket, Ticket { publish: Some(p) });
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
        let msgs = messages_for(&self.cfg.topics, &task, &d.request_id, &d.outcome);
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
        cfg.queue_capacity,
        cfg.batch_size,
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
        let parsed = input::parse_line(&buf, line_no as usize);
        let record = match parsed {
            Ok(None) => {
                line_no -= 1;
                continue;
            }
            Err(e) => Some(error_record(None, None, None, e.kind(), &e.to_string())),
            Ok(Some(mut req)) => {
                let task_name = req
                    .fields
                    .remove("task")
                    .unwrap_or_else(|| worker.task_names[0].clone());
                match worker.task_index(&task_name) {
                    None => Some(error_record(
                        Some(&req.id),
                        Some(&task_name),
                        None,
                        "unknown_task",
                        &format!("unknown task `{task_name}`"),
                    )),
                    Some(task) => {
                        let work = Work {
                            task,
                            request: req,
                            ticket: line_no,
                            received: Instant::now(),
                        };
                        worker.submit(work).map_err(|_| AppError::Input {
                            what: "inference thread".into(),
                            source: std::io::Error::other("stopped"),
                        })?;
                        None
                    }
                }
            }
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

fn done_value(worker: &WorkerHandle, d: Done) -> Value {
    match d.outcome {
        Ok(r) => serde_json::to_value(&r).unwrap_or(Value::Null),
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
