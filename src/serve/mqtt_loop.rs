//! The rumqttc event loop: connects, turns rumqttc's events, finished outcomes, the stats
//! tick and the shutdown signal into [`Event`]s for the [`Daemon`], retries the broker with
//! backoff, and stops once the drain is done.

use std::future::Future;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::{v5::Publish as V5Publish, QoS as V5QoS};
use rumqttc::v5::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, Incoming};
use rumqttc::v5::{MqttState, StateError};
use rumqttc::{Outgoing, Publish, QoS};
use tokio::sync::mpsc;

use crate::serve::learner;
use crate::serve::learning::RetrainReport;
use crate::serve::monitors::Monitors;
use crate::serve::mqtt::{self, BrokerConfig, MqttConfigError};
use crate::serve::outbox::Outbox;
use crate::serve::state::{Daemon, Event, Link, NotQueued};
use crate::serve::worker::{self, Done, WorkerError, WorkerHandle};
use crate::serve::{ServeConfig, ServeError};
use crate::util::time::now_ms;

/// rumqttc's request queue: publishes, acks and subscriptions waiting for the event loop.
const CLIENT_QUEUE: usize = 1024;

/// The daemon keeps rumqttc's MQTT 3 types for what it handles; the wire speaks MQTT 5.
fn v5_qos(q: QoS) -> V5QoS {
    match q {
        QoS::AtMostOnce => V5QoS::AtMostOnce,
        QoS::AtLeastOnce => V5QoS::AtLeastOnce,
        QoS::ExactlyOnce => V5QoS::ExactlyOnce,
    }
}

fn v4_qos(q: V5QoS) -> QoS {
    match q {
        V5QoS::AtMostOnce => QoS::AtMostOnce,
        V5QoS::AtLeastOnce => QoS::AtLeastOnce,
        V5QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// An incoming MQTT 5 publish as the daemon handles it.
fn incoming(p: V5Publish) -> Publish {
    let topic = String::from_utf8_lossy(&p.topic).into_owned();
    let mut q = Publish::from_bytes(topic, v4_qos(p.qos), p.payload);
    q.pkid = p.pkid;
    q.dup = p.dup;
    q.retain = p.retain;
    q
}

impl Link for AsyncClient {
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotQueued> {
        // rumqttc reports every refusal alike; the one it makes for good, before its queue,
        // is a topic with a wildcard. Its event loop lives as long as `drive`, so the rest
        // is a full queue.
        if !rumqttc::valid_topic(&topic) {
            return Err(NotQueued::Refused(format!(
                "`{topic}` is not a valid topic to publish on"
            )));
        }
        self.try_publish(topic, v5_qos(qos), retain, payload)
            .map_err(|_| NotQueued::Full)
    }
    fn ack(&mut self, p: &Publish) -> Result<(), NotQueued> {
        let mut ack = V5Publish::new("", v5_qos(p.qos), Vec::new(), None);
        ack.pkid = p.pkid;
        self.try_ack(&ack).map_err(|_| NotQueued::Full)
    }
    fn subscribe(&mut self, topic: String) -> Result<(), NotQueued> {
        self.try_subscribe(topic, V5QoS::AtLeastOnce)
            .map_err(|_| NotQueued::Full)
    }
    fn disconnect(&mut self) -> Result<(), NotQueued> {
        self.try_disconnect().map_err(|_| NotQueued::Full)
    }
}

/// Runs the MQTT daemon until `shutdown` resolves, then drains and returns.
pub async fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let broker = cfg.broker.clone().ok_or(ServeError::NoBroker)?;
    let options = broker.options(&cfg.topics)?;
    let outbox = Outbox::open(&cfg.outbox_dir, cfg.outbox)?;
    if !outbox.is_empty() {
        tracing::info!(
            pending = outbox.len(),
            "outbox has messages from before the restart: replaying them"
        );
    }
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let worker = worker::spawn(
        cfg.engine.clone(),
        cfg.tasks.clone(),
        cfg.worker_options(),
        move |d| {
            let _ = done_tx.send(d);
        },
    )?;
    let monitors = Monitors::open(&cfg.monitors, &cfg.outbox_dir, |n| worker.task_index(n))?;
    let (client, eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    let tasks = worker
        .task_names
        .iter()
        .cloned()
        .zip(worker.task_kinds.iter().copied())
        .collect();
    let stats_interval = cfg.stats_interval;
    let (report_tx, report_rx) = mpsc::unbounded_channel::<RetrainReport>();
    let estimate_mib = worker.model.estimate_mib;
    let learning = learner::start(&cfg, estimate_mib, worker.background.clone(), move |r| {
        let _ = report_tx.send(r);
    })
    .map_err(WorkerError::Thread)?;
    let mut d = Daemon::new(cfg.daemon_config(), tasks, client, worker, outbox, monitors);
    if let Some(l) = learning {
        d.set_learning(l);
    }
    let rx = Receivers {
        done: done_rx,
        reports: report_rx,
    };
    drive(d, eventloop, &broker, rx, stats_interval, shutdown).await
}

/// What the other threads send the loop: outcomes, and retrain reports.
struct Receivers {
    done: mpsc::UnboundedReceiver<Done>,
    reports: mpsc::UnboundedReceiver<RetrainReport>,
}

/// The loop proper.
async fn drive(
    mut d: Daemon<AsyncClient, WorkerHandle>,
    eventloop: EventLoop,
    broker: &BrokerConfig,
    mut rx: Receivers,
    stats_interval: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut stats_tick = tokio::time::interval(stats_interval);
    stats_tick.tick().await;
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    // Until the first ConnAck, refused credentials or an untrusted certificate are a
    // configuration error (exit with the cause); afterwards every failure is retried.
    let mut ever_connected = false;
    // rumqttc's poll() is not cancel-safe (a request taken from its queue can be lost if the
    // future is dropped mid-write), so one poll future lives across loop turns: it owns the
    // event loop and hands it back with the event.
    let mut poll = Box::pin(poll_owned(eventloop, tokio::time::Instant::now()));
    let mut worker_gone = false;
    loop {
        if d.drain_step(Instant::now()) {
            break;
        }
        // Deferred outbox fsyncs are due within `outbox_fsync` ms, traffic or not.
        let fsync_at = d.fsync_deadline();
        let fsync_timer = tokio::time::sleep_until(fsync_at.unwrap_or_else(Instant::now).into());
        tokio::select! {
            (mut eventloop, ev) = &mut poll => {
                let mut next_at = tokio::time::Instant::now();
                match ev {
                    Ok(MqttEvent::Incoming(Incoming::ConnAck(c))) => {
                        attempt = 0;
                        ever_connected = true;
                        let limit = c.properties.as_ref().and_then(|p| p.max_packet_size);
                        if let Some(max) = limit {
                            tracing::info!(max_packet_bytes = max, "the broker's packet limit");
                        }
                        d.set_broker_packet_limit(limit);
                        d.handle(Event::Connected)?;
                    }
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) if d.is_stopping() => {
                        // Let the disconnect reach the broker, then stop.
                        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                        break;
                    }
                    Ok(ev) => match daemon_event(ev) {
                        Some(ev) => d.handle(ev)?,
                        // Any event may have freed room in the client's queue.
                        None => d.pump(),
                    },
                    Err(e) => {
                        if d.is_stopping() {
                            break;
                        }
                        if !ever_connected {
                            if let Some(reason) = mqtt::refusal_reason(&e) {
                                let broker = format!("{}:{}", broker.host, broker.port);
                                return Err(MqttConfigError::Refused { broker, reason }.into());
                            }
                        }
                        connection_failed(&mut d, &mut eventloop, &e, broker.tls)?;
                        let wait = mqtt::backoff(attempt, now_ms() ^ ((attempt as u64) << 32));
                        attempt = attempt.saturating_add(1);
                        next_at += wait;
                    }
                }
                poll = Box::pin(poll_owned(eventloop, next_at));
            },
            Some(r) = rx.reports.recv() => d.handle(Event::Retrained(r))?,
            done = rx.done.recv(), if !worker_gone => match done {
                Some(done) => d.handle(Event::Done(done))?,
                // The inference thread dropped its end: it exited or died.
                None => {
                    worker_gone = true;
                    d.handle(Event::WorkerStopped)?;
                }
            },
            _ = fsync_timer, if fsync_at.is_some() => d.handle(Event::FsyncDue)?,
            _ = stats_tick.tick() => d.handle(Event::StatsTick)?,
            _ = &mut shutdown, if !d.is_draining() => d.handle(Event::Shutdown)?,
            _ = tokio::time::sleep(Duration::from_millis(200)), if d.is_draining() => d.pump(),
        }
    }
    d.finish()
}

/// The daemon's view of a rumqttc event, for those it reacts to.
fn daemon_event(ev: MqttEvent) -> Option<Event> {
    Some(match ev {
        MqttEvent::Incoming(Incoming::Publish(p)) => Event::Incoming(incoming(p)),
        MqttEvent::Incoming(Incoming::PubAck(a)) => {
            if !matches!(
                a.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ) {
                // The broker has it and will not deliver it (an ACL, a quota): retrying
                // would get the same answer, so the entry leaves the outbox like the rest.
                tracing::warn!(pkid = a.pkid, reason = ?a.reason, "the broker refused a publish");
            }
            Event::PubAck(a.pkid)
        }
        MqttEvent::Incoming(Incoming::SubAck(a)) => Event::SubAck {
            refused: a
                .return_codes
                .iter()
                .any(|c| !matches!(c, SubscribeReasonCode::Success(_))),
        },
        MqttEvent::Outgoing(Outgoing::Publish(pkid)) => Event::Written(pkid),
        _ => return None,
    })
}

/// Logs a failed or lost connection and resets the session state on both sides.
fn connection_failed(
    d: &mut Daemon<AsyncClient, WorkerHandle>,
    eventloop: &mut EventLoop,
    e: &ConnectionError,
    tls: bool,
) -> Result<(), ServeError> {
    let hint = mqtt::connect_hint(e, tls);
    if d.is_connected() {
        tracing::warn!("broker connection lost: {e}{hint}; results wait in the outbox");
    } else {
        tracing::warn!("cannot reach the broker: {e}{hint}");
    }
    if let ConnectionError::MqttState(StateError::Deserialization(
        rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { pkt_size, max },
    )) = e
    {
        // A broker that ignores the packet limit announced in CONNECT.
        tracing::error!(
            "the broker sent a packet of {pkt_size} bytes, over the limit of {max} it was \
             told; set max_packet_size in the broker so it refuses such messages"
        );
    }
    d.handle(Event::Disconnected)?;
    forget_session(eventloop);
    Ok(())
}

/// Empties rumqttc's side of the lost connection: the requests still in its queue, its
/// in-flight publishes (the outbox replays them instead) and the events it buffered but did
/// not yet report (a failed flush leaves `Outgoing::Publish` events behind). Reported
/// after the next CONNACK, any of them would pair a packet id with the wrong outbox entry.
fn forget_session(eventloop: &mut EventLoop) {
    // Moves queued requests and in-flight publishes into `pending`, which is dropped.
    eventloop.clean();
    eventloop.pending.clear();
    eventloop.state = MqttState::new(mqtt::INFLIGHT, true);
}

/// One poll of the event loop, after `not_before`; owns the loop and gives it back.
async fn poll_owned(
    mut eventloop: EventLoop,
    not_before: tokio::time::Instant,
) -> (EventLoop, Result<MqttEvent, ConnectionError>) {
    tokio::time::sleep_until(not_before).await;
    let ev = eventloop.poll().await;
    if let Ok(e) = &ev {
        tracing::trace!(event = %super::message::log_summary(e), "mqtt");
    }
    (eventloop, ev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::MqttOptions;

    #[test]
    fn a_lost_connection_leaves_no_queued_request_or_buffered_event_behind() {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), CLIENT_QUEUE);
        // Publishes queued in the client (handed over before the loss) ...
        for i in 0..3 {
            client
                .try_publish(format!("t/{i}"), V5QoS::AtLeastOnce, false, "x")
                .unwrap();
        }
        // ... and events buffered by a flush that failed.
        for pkid in [1, 2] {
            eventloop
                .state
                .events
                .push_back(MqttEvent::Outgoing(Outgoing::Publish(pkid)));
        }
        forget_session(&mut eventloop);
        assert!(
            eventloop.state.events.is_empty(),
            "no stale event is reported"
        );
        assert!(eventloop.pending.is_empty());
        // The request queue is empty too: cleaning again brings nothing back.
        eventloop.clean();
        assert!(eventloop.pending.is_empty(), "{:?}", eventloop.pending);
        assert_eq!(eventloop.state.inflight(), 0);
    }
}
