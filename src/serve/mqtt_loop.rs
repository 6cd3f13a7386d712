//! The rumqttc event loop: connects, turns rumqttc's events, finished outcomes, the stats
//! tick and the shutdown signal into [`Event`]s for the [`Daemon`], retries the broker with
//! backoff, and stops once the drain is done.

use std::future::Future;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, Incoming, Outgoing};
use rumqttc::{Publish, QoS, SubscribeReasonCode};
use tokio::sync::mpsc;

use crate::serve::monitors::Monitors;
use crate::serve::mqtt::{self, BrokerConfig, MqttConfigError};
use crate::serve::outbox::Outbox;
use crate::serve::state::{Daemon, Event, Link, NotQueued};
use crate::serve::worker::{self, Done, WorkerHandle};
use crate::serve::{ServeConfig, ServeError};
use crate::util::time::now_ms;

/// rumqttc's request queue: publishes, acks and subscriptions waiting for the event loop.
const CLIENT_QUEUE: usize = 1024;

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
        self.try_publish(topic, qos, retain, payload)
            .map_err(|_| NotQueued::Full)
    }
    fn ack(&mut self, p: &Publish) -> Result<(), NotQueued> {
        self.try_ack(p).map_err(|_| NotQueued::Full)
    }
    fn subscribe(&mut self, topic: String) -> Result<(), NotQueued> {
        self.try_subscribe(topic, QoS::AtLeastOnce)
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
    let (client, mut eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
    // Small messages, latency matters: no Nagle delay.
    eventloop.network_options.set_tcp_nodelay(true);
    let tasks = worker
        .task_names
        .iter()
        .cloned()
        .zip(worker.task_kinds.iter().copied())
        .collect();
    let stats_interval = cfg.stats_interval;
    let d = Daemon::new(cfg.daemon_config(), tasks, client, worker, outbox, monitors);
    drive(d, eventloop, &broker, done_rx, stats_interval, shutdown).await
}

/// The loop proper.
async fn drive(
    mut d: Daemon<AsyncClient, WorkerHandle>,
    eventloop: EventLoop,
    broker: &BrokerConfig,
    mut done_rx: mpsc::UnboundedReceiver<Done>,
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
                    Ok(MqttEvent::Incoming(Incoming::ConnAck(_))) => {
                        attempt = 0;
                        ever_connected = true;
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
            done = done_rx.recv(), if !worker_gone => match done {
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
        MqttEvent::Incoming(Incoming::Publish(p)) => Event::Incoming(p),
        MqttEvent::Incoming(Incoming::PubAck(a)) => Event::PubAck(a.pkid),
        MqttEvent::Incoming(Incoming::SubAck(a)) => Event::SubAck {
            refused: a
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure)),
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
    d.handle(Event::Disconnected)?;
    // rumqttc keeps unacknowledged publishes in memory to resend; the outbox replays them
    // instead, so drop its copies to keep packet ids in step.
    eventloop.pending.clear();
    Ok(())
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
