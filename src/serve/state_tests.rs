//! The daemon without a broker: a fake client that records what it is asked and can be
//! full, a fake inference thread that keeps what it is given.

use std::cell::{Cell, RefCell};

use super::*;
use crate::classify::ClassifyResult;
use crate::monitor::MonitorConfig;
use crate::rank::RankResult;
use crate::serve::outbox::{FsyncPolicy, OutboxLimits};
use crate::serve::worker::{JobError, Output};

#[derive(Debug, Clone, PartialEq)]
enum Sent {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: String,
    },
    Ack(u16),
    Subscribe(String),
    Disconnect,
}

/// Like rumqttc, it refuses for good a publish on a topic with a wildcard.
#[derive(Default)]
struct FakeLink {
    sent: Vec<Sent>,
    /// The client's request queue is full.
    full: bool,
}

impl FakeLink {
    fn take(&mut self, s: Sent) -> Result<(), NotQueued> {
        if let Sent::Publish { topic, .. } = &s {
            if topic.contains(['+', '#']) {
                return Err(NotQueued::Refused(format!("invalid topic `{topic}`")));
            }
        }
        if self.full {
            return Err(NotQueued::Full);
        }
        self.sent.push(s);
        Ok(())
    }
}

impl Link for FakeLink {
    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), NotQueued> {
        let payload = String::from_utf8(payload).unwrap();
        self.take(Sent::Publish {
            topic,
            qos,
            retain,
            payload,
        })
    }
    fn ack(&mut self, p: &Publish) -> Result<(), NotQueued> {
        self.take(Sent::Ack(p.pkid))
    }
    fn subscribe(&mut self, topic: String) -> Result<(), NotQueued> {
        self.take(Sent::Subscribe(topic))
    }
    fn disconnect(&mut self) -> Result<(), NotQueued> {
        self.take(Sent::Disconnect)
    }
}

#[derive(Default)]
struct FakeWorker {
    queued: RefCell<Vec<Work>>,
    overloaded: bool,
    closed: Cell<bool>,
    /// The thread is gone: its queue takes nothing.
    dead: bool,
}

impl Inference for FakeWorker {
    fn try_submit(&self, work: Work) -> Result<(), (Rejected, Work)> {
        if self.dead {
            return Err((Rejected::Stopped, work));
        }
        if self.overloaded {
            return Err((Rejected::Overloaded, work));
        }
        self.queued.borrow_mut().push(work);
        Ok(())
    }
    fn depth(&self) -> usize {
        self.queued.borrow().len()
    }
    fn close(&mut self) {
        self.closed.set(true);
    }
    fn join(&mut self) {}
}

struct Fixture {
    d: Daemon<FakeLink, FakeWorker>,
    _dir: tempfile::TempDir,
}

fn config() -> DaemonConfig {
    DaemonConfig {
        device_id: "d1".into(),
        topics: Topics {
            prefix: "edgeact/d1".into(),
            fleet_prefix: "edgeact/fleet".into(),
            share_group: None,
        },
        context_topics: BTreeMap::from([("room".to_string(), "home/room".to_string())]),
        ha_discovery: false,
        max_request_bytes: 4096,
        max_packet_bytes: 1 << 20,
        queue_capacity: 8,
        drain_timeout: Duration::from_secs(5),
        redactor: Redactor::all_kinds(),
    }
}

fn daemon_with(worker: FakeWorker) -> Fixture {
    daemon_full(worker, OutboxLimits::default(), &BTreeMap::new())
}

fn daemon_with_outbox(worker: FakeWorker, limits: OutboxLimits) -> Fixture {
    daemon_full(worker, limits, &BTreeMap::new())
}

/// A daemon whose tasks have the alert `rules` given by task name.
fn daemon_watching(worker: FakeWorker, rules: &BTreeMap<String, MonitorConfig>) -> Fixture {
    daemon_full(worker, OutboxLimits::default(), rules)
}

fn daemon_full(
    worker: FakeWorker,
    limits: OutboxLimits,
    rules: &BTreeMap<String, MonitorConfig>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), limits).unwrap();
    let tasks = vec![
        ("greet".to_string(), TaskKind::Classify),
        ("offers".to_string(), TaskKind::Rank),
    ];
    let monitors =
        Monitors::open(rules, dir.path(), |n| tasks.iter().position(|t| t.0 == n)).unwrap();
    let d = Daemon::new(
        config(),
        tasks.clone(),
        FakeLink::default(),
        worker,
        outbox,
        monitors,
    );
    Fixture { d, _dir: dir }
}

/// A daemon connected, subscribed and online, with what that sent cleared.
fn online() -> Fixture {
    online_with(daemon_with(FakeWorker::default()))
}

fn online_with(mut f: Fixture) -> Fixture {
    go_online(&mut f);
    f
}

fn go_online(f: &mut Fixture) {
    f.d.handle(Event::Connected).unwrap();
    for _ in 0..2 {
        f.d.handle(Event::SubAck { refused: false }).unwrap();
    }
    // `online` is written (its packet id pairs with no outbox entry) and acknowledged.
    f.d.handle(Event::Written(100)).unwrap();
    f.d.handle(Event::PubAck(100)).unwrap();
    assert_eq!(f.d.acks.unwritten(), 0);
    f.d.link.sent.clear();
}

fn request(topic: &str, pkid: u16, payload: &str) -> Publish {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec());
    p.pkid = pkid;
    p
}

fn publishes(d: &Daemon<FakeLink, FakeWorker>) -> Vec<(String, String)> {
    d.link
        .sent
        .iter()
        .filter_map(|s| match s {
            Sent::Publish { topic, payload, .. } => Some((topic.clone(), payload.clone())),
            _ => None,
        })
        .collect()
}

fn done(ticket: u64, outcome: Result<Output, JobError>) -> Done {
    Done {
        ticket,
        task: 0,
        request_id: "r1".into(),
        outcome,
        latency_ms: 12.0,
    }
}

fn ranked() -> Output {
    Output::Ranked(RankResult {
        id: "r1".into(),
        task: "offers".into(),
        ranked: Vec::new(),
        n_items: 0,
        failed: Vec::new(),
        prefix_tokens_decoded: 0,
        ms: 1.0,
    })
}

/// `greet`'s answer `hello` to request `id`.
fn classified(id: &str) -> Output {
    use crate::classify::{CalibrationApplied, Provenance, Timings, TokenCounts};
    Output::Classified(Box::new(ClassifyResult {
        id: id.into(),
        task: "greet".into(),
        label: Some("hello".into()),
        top_label: "hello".into(),
        confidence: 0.9,
        margin: 0.8,
        abstained: false,
        scores: BTreeMap::from([("hello".to_string(), 0.9)]),
        labels: BTreeMap::new(),
        score_norm: Default::default(),
        logprob_over: Default::default(),
        calibration: CalibrationApplied {
            applied: false,
            prior: None,
        },
        truncated: None,
        tokens: TokenCounts {
            prompt: 1,
            reused: 0,
            decoded: 1,
            scored: 1,
        },
        timings_ms: Timings {
            prefill_ms: 1.0,
            scoring_ms: 1.0,
            total_ms: 2.0,
        },
        provenance: Provenance {
            model: "m".into(),
            model_sha256: "0".into(),
            task: "greet".into(),
            template_sha256: "0".into(),
            board: "b".into(),
            method: crate::spec::Method::Prompt,
        },
        demos: Vec::new(),
    }))
}

#[test]
fn connecting_subscribes_then_says_online_once_every_subscription_is_in() {
    let mut f = daemon_with(FakeWorker::default());
    f.d.handle(Event::Connected).unwrap();
    assert_eq!(
        f.d.link.sent,
        [
            Sent::Subscribe("edgeact/d1/+/request".into()),
            Sent::Subscribe("home/room".into())
        ]
    );
    f.d.handle(Event::SubAck { refused: false }).unwrap();
    assert!(
        publishes(&f.d).is_empty(),
        "not online before the last SUBACK"
    );
    f.d.handle(Event::SubAck { refused: false }).unwrap();
    assert_eq!(
        f.d.link.sent.last(),
        Some(&Sent::Publish {
            topic: "edgeact/d1/available".into(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: "online".into()
        })
    );
}

#[test]
fn an_outcome_is_in_the_outbox_before_the_request_is_acked_and_leaves_it_on_puback() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/offers/request",
        9,
        r#"{"id":"r1","profile":"p","items":[{"id":"a","text":"x"}]}"#,
    )))
    .unwrap();
    assert!(f.d.link.sent.is_empty(), "not acked before the outcome");
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    f.d.handle(Event::Done(done(ticket, Ok(ranked())))).unwrap();
    assert_eq!(f.d.outbox.len(), 2, "result and trace recorded");
    let topics: Vec<_> = publishes(&f.d).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        topics,
        ["edgeact/d1/offers/result", "edgeact/d1/offers/trace"]
    );
    assert!(f.d.link.sent.contains(&Sent::Ack(9)));
    f.d.handle(Event::Written(1)).unwrap();
    f.d.handle(Event::Written(2)).unwrap();
    f.d.handle(Event::PubAck(2)).unwrap();
    assert_eq!(f.d.outbox.len(), 1);
    f.d.handle(Event::PubAck(1)).unwrap();
    assert!(f.d.outbox.is_empty());
}

#[test]
fn requests_for_rank_go_to_the_first_ranking_task() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/rank/request",
        1,
        r#"{"profile":"p","items":[{"id":"a","text":"x"}]}"#,
    )))
    .unwrap();
    assert_eq!(f.d.worker.queued.borrow()[0].task, 1);
}

#[test]
fn unknown_tasks_and_bad_payloads_get_error_records_and_are_acked() {
    let mut f = online();
    f.d.handle(Event::Incoming(request("edgeact/d1/nope/request", 1, "{}")))
        .unwrap();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        2,
        r#"{"id":"x7","text":"#,
    )))
    .unwrap();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        3,
        &"x".repeat(5000),
    )))
    .unwrap();
    assert!(f.d.worker.queued.borrow().is_empty());
    let errors: Vec<Value> = publishes(&f.d)
        .iter()
        .map(|(t, p)| {
            assert_eq!(t, "edgeact/d1/errors");
            serde_json::from_str(p).unwrap()
        })
        .collect();
    let kinds: Vec<&str> = errors
        .iter()
        .map(|e| e["error"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["unknown_task", "invalid_json", "too_large"]);
    assert_eq!(errors[0]["task"], "nope");
    assert!(errors[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("serving: greet, offers"));
    for pkid in 1..=3 {
        assert!(f.d.link.sent.contains(&Sent::Ack(pkid)), "{pkid} acked");
    }
}

#[test]
fn a_full_queue_answers_overloaded() {
    let mut f = daemon_with(FakeWorker {
        overloaded: true,
        ..FakeWorker::default()
    });
    f.d.handle(Event::Connected).unwrap();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        4,
        r#"{"id":"o1","text":"hi"}"#,
    )))
    .unwrap();
    let (topic, payload) = publishes(&f.d).pop().unwrap();
    assert_eq!(topic, "edgeact/d1/errors");
    let v: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["error"]["kind"].as_str()),
        (Some("o1"), Some("overloaded"))
    );
    assert!(f.d.link.sent.contains(&Sent::Ack(4)));
    assert_eq!(f.d.stats.overloaded, 1);
}

#[test]
fn a_redelivery_is_run_once_and_acked_once_answered() {
    let mut f = online();
    let body = r#"{"id":"r1","text":"hi"}"#;
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        5,
        body,
    )))
    .unwrap();
    let mut again = request("edgeact/d1/greet/request", 5, body);
    again.dup = true;
    f.d.handle(Event::Incoming(again.clone())).unwrap();
    assert_eq!(
        f.d.worker.queued.borrow().len(),
        1,
        "in work: not run twice"
    );
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    let e = JobError::WrongKind {
        task: "greet".into(),
        reason: "test".into(),
    };
    f.d.handle(Event::Done(done(ticket, Err(e)))).unwrap();
    assert_eq!(
        f.d.link.sent.iter().filter(|s| **s == Sent::Ack(5)).count(),
        1
    );
    // The PUBACK was lost with the connection; the broker sends it once more.
    f.d.handle(Event::Disconnected).unwrap();
    f.d.handle(Event::Connected).unwrap();
    f.d.handle(Event::Incoming(again)).unwrap();
    assert_eq!(
        f.d.worker.queued.borrow().len(),
        1,
        "answered: not run again"
    );
    assert_eq!(
        f.d.link.sent.iter().filter(|s| **s == Sent::Ack(5)).count(),
        2
    );
}

#[test]
fn context_topics_are_acked_and_fill_request_fields() {
    let mut f = online();
    f.d.handle(Event::Incoming(request("home/room", 6, "kitchen")))
        .unwrap();
    assert_eq!(f.d.link.sent, [Sent::Ack(6)]);
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        7,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    let queued = f.d.worker.queued.borrow();
    let Job::Classify(r) = &queued[0].job else {
        panic!("a classification")
    };
    assert_eq!(
        r.fields.get("context.room").map(String::as_str),
        Some("kitchen")
    );
    assert!(
        r.id.starts_with("d1-"),
        "a default id from the device: {}",
        r.id
    );
}

#[test]
fn error_records_are_redacted_results_are_not() {
    let mut f = online();
    let body = r#"{"id":"r9","text":"#;
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/jane.doe@example.com/request",
        1,
        body,
    )))
    .unwrap();
    let (_, payload) = publishes(&f.d).pop().unwrap();
    assert!(!payload.contains("jane.doe@example.com"), "{payload}");
    assert!(payload.contains("unknown_task"), "{payload}");
}

#[test]
fn acks_wait_while_the_client_queue_is_full_and_go_first_when_it_has_room() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        1,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    f.d.link.full = true;
    let e = JobError::WrongKind {
        task: "greet".into(),
        reason: "test".into(),
    };
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    f.d.handle(Event::Done(done(ticket, Err(e)))).unwrap();
    assert!(f.d.link.sent.is_empty());
    assert_eq!(
        f.d.acks.unwritten(),
        0,
        "a refused publish is not waiting for a packet id"
    );
    f.d.link.full = false;
    f.d.handle(Event::Written(0)).unwrap();
    assert_eq!(
        f.d.link.sent[0],
        Sent::Ack(1),
        "the ack goes before publishes"
    );
    assert_eq!(publishes(&f.d).len(), 1);
}

#[test]
fn publishes_stop_short_of_filling_the_client_queue() {
    let mut f = online();
    let msgs = (0..PUBLISH_QUEUE_LIMIT + 10)
        .map(|i| OutMessage::new(MessageKind::Result, format!("t/{i}"), "{}".into()))
        .collect();
    assert!(f.d.record(msgs, None));
    f.d.pump();
    assert_eq!(publishes(&f.d).len(), PUBLISH_QUEUE_LIMIT);
    f.d.handle(Event::Written(1)).unwrap();
    assert_eq!(publishes(&f.d).len(), PUBLISH_QUEUE_LIMIT + 1);
}

#[test]
fn after_a_reconnect_the_outbox_is_replayed_oldest_first() {
    let mut f = online();
    let msgs = ["a", "b"]
        .map(|t| OutMessage::new(MessageKind::Result, t.into(), "{}".into()))
        .to_vec();
    assert!(f.d.record(msgs, None));
    f.d.pump();
    f.d.handle(Event::Written(1)).unwrap();
    f.d.handle(Event::PubAck(1)).unwrap();
    f.d.handle(Event::Disconnected).unwrap();
    f.d.link.sent.clear();
    f.d.handle(Event::Connected).unwrap();
    let topics: Vec<_> = publishes(&f.d).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["b"], "only what the broker did not acknowledge");
}

#[test]
fn shutdown_finishes_work_then_says_stopped_and_disconnects() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        1,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    f.d.handle(Event::Shutdown).unwrap();
    assert!(f.d.worker.closed.get());
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        2,
        r#"{"text":"late"}"#,
    )))
    .unwrap();
    assert_eq!(
        f.d.worker.queued.borrow().len(),
        1,
        "no new requests while draining"
    );
    assert!(!f.d.link.sent.contains(&Sent::Ack(2)), "left to the broker");
    assert!(
        !f.d.drain_step(Instant::now()),
        "a request is still in work"
    );
    let work = f.d.worker.queued.borrow_mut().pop().unwrap();
    f.d.handle(Event::Done(done(work.ticket, Ok(ranked()))))
        .unwrap();
    assert!(!f.d.drain_step(Instant::now()), "the outbox is not flushed");
    f.d.link.sent.clear();
    for pkid in 1..=2 {
        f.d.handle(Event::Written(pkid)).unwrap();
        f.d.handle(Event::PubAck(pkid)).unwrap();
    }
    assert!(
        !f.d.drain_step(Instant::now()),
        "connected: the loop waits for the disconnect"
    );
    assert!(f.d.is_stopping());
    assert_eq!(
        f.d.link.sent,
        [
            Sent::Publish {
                topic: "edgeact/d1/available".into(),
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: "stopped".into()
            },
            Sent::Disconnect
        ]
    );
}

#[test]
fn a_drain_that_times_out_leaves_the_rest_in_the_outbox() {
    let mut f = daemon_with(FakeWorker::default());
    let msgs = vec![OutMessage::new(
        MessageKind::Result,
        "a".into(),
        "{}".into(),
    )];
    assert!(f.d.record(msgs, None));
    f.d.handle(Event::Connected).unwrap();
    f.d.handle(Event::Shutdown).unwrap();
    assert!(!f.d.drain_step(Instant::now()));
    let later = Instant::now() + Duration::from_secs(6);
    assert!(
        !f.d.drain_step(later),
        "connected: it waits for the disconnect"
    );
    assert!(f.d.is_stopping());
    assert_eq!(f.d.outbox.len(), 1);
}

#[test]
fn without_a_connection_the_drain_ends_at_once() {
    let mut f = daemon_with(FakeWorker::default());
    f.d.handle(Event::Shutdown).unwrap();
    assert!(f.d.drain_step(Instant::now()));
    f.d.finish().unwrap();
}

#[path = "state_fault_tests.rs"]
mod faults;

#[path = "state_net_tests.rs"]
mod net;

/// `<prefix>/feedback`: subscribed; a record is acknowledged once it is on disk and starts
/// a retrain when due; a bad one gets an error record naming the fault; the retrain's
/// report goes into the stats.
#[test]
fn feedback_is_acknowledged_once_kept_and_its_retrain_is_reported_in_stats() {
    use crate::eval::feedback::{FeedbackKind, FeedbackLog, FeedbackRules};
    use crate::serve::learning::{LearnSettings, Learning, RetrainReport};
    use std::sync::{Arc, Mutex};
    let mut f = daemon_with(FakeWorker::default());
    let dir = tempfile::tempdir().unwrap();
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let asked2 = asked.clone();
    let rules = FeedbackRules::new(
        [(
            "greet".to_string(),
            FeedbackKind::Labels(vec!["hello".into(), "bye".into()]),
        )],
        100,
    );
    let settings = LearnSettings {
        retrain_after: 1,
        retrain_interval: Duration::from_secs(60),
        max_bytes: 1 << 30,
        feature_chunk: 4,
        max_text_bytes: 100,
    };
    f.d.set_learning(Learning::new(
        rules,
        FeedbackLog::new(dir.path()),
        ["greet".to_string()].into(),
        settings,
        Box::new(move |t| {
            asked2.lock().unwrap().push(t.to_string());
            true
        }),
    ));
    f.d.handle(Event::Connected).unwrap();
    assert!(f
        .d
        .link
        .sent
        .contains(&Sent::Subscribe("edgeact/d1/feedback".into())));
    for _ in 0..3 {
        f.d.handle(Event::SubAck { refused: false }).unwrap();
    }
    f.d.link.sent.clear();

    let good = r#"{"task":"greet","text":"hi there","label":"hello"}"#;
    f.d.handle(Event::Incoming(request("edgeact/d1/feedback", 7, good)))
        .unwrap();
    assert_eq!(f.d.link.sent, vec![Sent::Ack(7)]);
    let (kept, _) = FeedbackLog::new(dir.path()).read("greet").unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(*asked.lock().unwrap(), ["greet"]);

    let bad = r#"{"id":"f2","task":"greet","text":"hi","label":"zzz"}"#;
    f.d.handle(Event::Incoming(request("edgeact/d1/feedback", 8, bad)))
        .unwrap();
    let errs: Vec<Value> = publishes(&f.d)
        .iter()
        .filter(|(t, _)| t == "edgeact/d1/errors")
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["error"]["kind"], "unknown_label");
    assert_eq!(errs[0]["id"], "f2");
    assert!(f.d.link.sent.contains(&Sent::Ack(8)));
    assert_eq!(
        FeedbackLog::new(dir.path()).read("greet").unwrap().0.len(),
        1
    );

    f.d.handle(Event::Retrained(RetrainReport {
        task: "greet".into(),
        outcome: "kept".into(),
        dev_macro_f1_old: Some(0.7),
        dev_macro_f1_new: Some(0.6),
        n_feedback: 1,
        n_train: 5,
        ms: 3,
        reason: None,
    }))
    .unwrap();
    f.d.handle(Event::StatsTick).unwrap();
    let stats: Value = publishes(&f.d)
        .iter()
        .rev()
        .find(|(t, _)| t == "edgeact/d1/stats")
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .unwrap();
    let fb = &stats["feedback"];
    assert_eq!(fb["received_total"], 1, "{stats}");
    assert_eq!(fb["rejected_total"], 1, "{stats}");
    assert_eq!(fb["applied_total"], 0, "{stats}");
    assert_eq!(fb["last_retrain"]["outcome"], "kept", "{stats}");
    assert_eq!(fb["last_retrain"]["dev_macro_f1_old"], 0.7, "{stats}");
}
