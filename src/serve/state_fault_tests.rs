//! State-machine tests of the failure paths: far-future event times, deferred fsync,
//! refused publishes, a dead inference thread. The fixtures are the parent module's.

use super::*;

#[test]
fn a_far_future_event_time_gets_an_error_record_and_leaves_the_monitor_alone() {
    let rules: MonitorConfig = toml::from_str(
        "[[rules]]\nname = \"hellos\"\nlabel = \"hello\"\nwindow_s = 60.0\nkind = \"count\"\nthreshold = 2.0\n",
    )
    .unwrap();
    let rules = BTreeMap::from([("greet".to_string(), rules)]);
    let mut f = daemon_watching(FakeWorker::default(), &rules);
    go_online(&mut f);
    let now_s = now_ms() as i64 / 1000;
    // Milliseconds sent where seconds are meant, then two normal reports.
    let cases = [
        (1, "r1", now_s * 1000),
        (2, "r2", now_s),
        (3, "r3", now_s + 1),
    ];
    for (pkid, id, ts) in cases {
        let payload = format!(r#"{{"id":"{id}","text":"hi","ts":{ts}}}"#);
        f.d.handle(Event::Incoming(request(
            "edgeact/d1/greet/request",
            pkid,
            &payload,
        )))
        .unwrap();
        let ticket = f.d.worker.queued.borrow().last().unwrap().ticket;
        let d = Done {
            request_id: id.into(),
            ..done(ticket, Ok(classified(id)))
        };
        f.d.handle(Event::Done(d)).unwrap();
        assert!(f.d.link.sent.contains(&Sent::Ack(pkid)), "{id} acked");
    }
    let sent = publishes(&f.d);
    let on = |topic: &str| -> Vec<String> {
        sent.iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, p)| p.clone())
            .collect()
    };
    let errors = on("edgeact/d1/errors");
    assert_eq!(errors.len(), 1, "{sent:?}");
    let e: Value = serde_json::from_str(&errors[0]).unwrap();
    assert_eq!(e["id"], "r1");
    assert_eq!(e["topic"], "edgeact/d1/greet/request");
    assert_eq!(e["error"]["kind"], "future_ts");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`ts`") && msg.contains("max_future_s = 300"),
        "{msg}"
    );
    // Its classification still went out, and the later reports still count.
    assert_eq!(on("edgeact/d1/greet/result").len(), 3);
    assert_eq!(on("edgeact/d1/hellos/events").len(), 1, "{sent:?}");
}

/// `outbox_fsync = N`: a put that was not synced at once asks for a timer at most N ms
/// away, and the timer's event syncs it; no later traffic is needed.
#[test]
fn a_deferred_fsync_is_due_within_the_interval_without_more_traffic() {
    let n = Duration::from_millis(500);
    let limits = OutboxLimits {
        fsync: FsyncPolicy::Interval(n),
        ..OutboxLimits::default()
    };
    let mut f = online_with(daemon_with_outbox(FakeWorker::default(), limits));
    assert_eq!(f.d.fsync_deadline(), None, "nothing to sync");
    let before = Instant::now();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        1,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    f.d.handle(Event::Done(done(ticket, Ok(ranked())))).unwrap();
    assert!(f.d.link.sent.contains(&Sent::Ack(1)), "acknowledged");
    assert!(f.d.outbox.has_unsynced_puts(), "the fsync was deferred");
    let due =
        f.d.fsync_deadline()
            .expect("a timer for the deferred fsync");
    assert!(
        due <= before + n + Duration::from_millis(1),
        "due within the interval"
    );
    f.d.handle(Event::FsyncDue).unwrap();
    assert!(
        !f.d.outbox.has_unsynced_puts(),
        "synced when the timer fired"
    );
    assert_eq!(f.d.fsync_deadline(), None);
    // Acks alone do not need the timer (one lost in a crash is one more publish).
    f.d.handle(Event::Written(1)).unwrap();
    f.d.handle(Event::PubAck(1)).unwrap();
    assert_eq!(f.d.fsync_deadline(), None);
}

#[test]
fn with_fsync_always_no_timer_is_asked_for() {
    let mut f = online();
    let msgs = vec![OutMessage::new(
        MessageKind::Result,
        "a".into(),
        "{}".into(),
    )];
    assert!(f.d.record(msgs, None));
    assert!(!f.d.outbox.has_unsynced_puts());
    assert_eq!(f.d.fsync_deadline(), None);
}

/// A full client queue is retried on the next event; a publish the client refuses for good
/// is logged, counted and dropped, and does not hold up the messages behind it.
#[test]
fn a_full_queue_is_retried_a_refused_publish_is_counted_and_skipped() {
    let mut f = online();
    f.d.link.full = true;
    let msgs = ["bad/+/topic", "good"]
        .map(|t| OutMessage::new(MessageKind::Result, t.into(), "{}".into()))
        .to_vec();
    assert!(f.d.record(msgs, None));
    f.d.pump();
    // The fake refuses the wildcard topic before it looks at the queue (as rumqttc does).
    assert_eq!(f.d.stats.publish_refused, 1);
    assert!(publishes(&f.d).is_empty(), "full: nothing taken");
    assert_eq!(f.d.to_send.len(), 1, "the good one waits for room");
    f.d.pump();
    assert_eq!(f.d.stats.publish_refused, 1, "a full queue is not counted");
    f.d.link.full = false;
    f.d.handle(Event::Written(0)).unwrap();
    let topics: Vec<_> = publishes(&f.d).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["good"]);
    assert_eq!(f.d.stats.publish_refused, 1);
    assert_eq!(f.d.outbox.len(), 1, "the refused one left the outbox");
    assert!(f.d.to_send.is_empty());
}

fn error_kinds(d: &Daemon<FakeLink, FakeWorker>) -> Vec<String> {
    publishes(d)
        .iter()
        .filter(|(t, _)| t == "edgeact/d1/errors")
        .map(|(_, p)| {
            let v: Value = serde_json::from_str(p).unwrap();
            v["error"]["kind"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Flushes the outbox (every publish written and acknowledged) and runs the drain step.
fn flush_and_drain(f: &mut Fixture) {
    for pkid in 1..=8 {
        f.d.handle(Event::Written(pkid)).unwrap();
        f.d.handle(Event::PubAck(pkid)).unwrap();
    }
    f.d.drain_step(Instant::now());
}

#[test]
fn a_dead_inference_thread_says_offline_and_ends_the_run_with_an_error() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        1,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    // The thread panicked: its outcome channel closed with the request still in work.
    f.d.handle(Event::WorkerStopped).unwrap();
    assert_eq!(error_kinds(&f.d), ["worker_died"]);
    assert!(f.d.is_draining(), "no new requests");
    flush_and_drain(&mut f);
    assert!(f.d.is_stopping());
    assert!(f.d.link.sent.contains(&Sent::Publish {
        topic: "edgeact/d1/available".into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        payload: "offline".into()
    }));
    assert!(f.d.link.sent.contains(&Sent::Disconnect));
    assert!(
        !f.d.link.sent.contains(&Sent::Ack(1)),
        "the request in work is left to the broker"
    );
    assert!(matches!(f.d.finish(), Err(ServeError::WorkerStopped)));
}

#[test]
fn a_queue_whose_thread_is_gone_is_a_dead_inference_thread() {
    let mut f = online_with(daemon_with(FakeWorker {
        dead: true,
        ..FakeWorker::default()
    }));
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        1,
        r#"{"text":"hi"}"#,
    )))
    .unwrap();
    assert_eq!(error_kinds(&f.d), ["worker_died"]);
    assert!(!f.d.link.sent.contains(&Sent::Ack(1)));
    flush_and_drain(&mut f);
    assert!(f.d.link.sent.contains(&Sent::Publish {
        topic: "edgeact/d1/available".into(),
        qos: QoS::AtLeastOnce,
        retain: true,
        payload: "offline".into()
    }));
    assert!(matches!(f.d.finish(), Err(ServeError::WorkerStopped)));
}

#[test]
fn the_thread_ending_after_a_shutdown_is_no_death() {
    let mut f = online();
    f.d.handle(Event::Shutdown).unwrap();
    f.d.handle(Event::WorkerStopped).unwrap();
    assert!(error_kinds(&f.d).is_empty());
    flush_and_drain(&mut f);
    assert_eq!(
        publishes(&f.d),
        [("edgeact/d1/available".to_string(), "stopped".to_string())]
    );
    f.d.finish().unwrap();
}

/// The classification queued for a plain request, after `context` topic messages.
fn classify_after(f: &mut Fixture, pkid: u16, payload: &str) -> BTreeMap<String, String> {
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        pkid,
        payload,
    )))
    .unwrap();
    let queued = f.d.worker.queued.borrow();
    let Job::Classify(r) = &queued.last().expect("a queued job").job else {
        panic!("a classification")
    };
    r.fields.clone()
}

/// A context value is a sensor reading: control characters (a newline could forge a line
/// of the prompt) become spaces, an oversized value is refused with an error record and
/// the last good value is kept, and the sensor's value wins over a request's own
/// `context.<name>` field.
#[test]
fn context_values_are_bounded_stripped_and_win_over_the_request() {
    let mut f = online();
    f.d.handle(Event::Incoming(request("home/room", 6, "kit\nchen\u{7}")))
        .unwrap();
    let big = "x".repeat(MAX_CONTEXT_VALUE_BYTES + 1);
    f.d.handle(Event::Incoming(request("home/room", 7, &big)))
        .unwrap();
    assert_eq!(f.d.link.sent[..2], [Sent::Ack(6), Sent::Ack(7)]);
    let fields = classify_after(&mut f, 8, r#"{"text":"hi","context.room":"attic"}"#);
    assert_eq!(
        fields.get("context.room").map(String::as_str),
        Some("kit chen")
    );
    flush_and_drain(&mut f);
    assert_eq!(error_kinds(&f.d), ["context_too_large"]);
}

/// A full disk: the outcome cannot be recorded, so it is neither published nor its request
/// acknowledged (the broker delivers it again); an error record goes out directly, and the
/// daemon keeps running. Once the disk takes writes, the redelivered request is run again
/// (not taken for one already answered) and answered.
#[test]
fn a_full_disk_leaves_the_request_unacknowledged_and_the_daemon_running() {
    let mut f = online();
    f.d.outbox.fail_writes(true);
    let p = request("edgeact/d1/greet/request", 7, r#"{"id":"r1","text":"hi"}"#);
    f.d.handle(Event::Incoming(p.clone())).unwrap();
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    f.d.handle(Event::Done(done(ticket, Ok(classified("r1")))))
        .expect("a full disk never stops the daemon");
    assert!(
        !f.d.link.sent.contains(&Sent::Ack(7)),
        "not durable: not acked"
    );
    let sent = publishes(&f.d);
    assert!(
        sent.iter()
            .all(|(t, _)| !t.starts_with("edgeact/d1/greet/")),
        "not durable: not published: {sent:?}"
    );
    assert_eq!(error_kinds(&f.d), ["outbox_write_failed"]);
    let e: Value = serde_json::from_str(&sent[0].1).unwrap();
    assert_eq!(e["id"], "r1");
    assert!(f.d.outbox.is_empty());
    assert_eq!(f.d.stats.outbox_write_errors, 1);
    // A request refused on a full disk (bad JSON) is not acknowledged either.
    let bad = request("edgeact/d1/greet/request", 8, "not json");
    f.d.handle(Event::Incoming(bad)).unwrap();
    assert!(!f.d.link.sent.contains(&Sent::Ack(8)));
    assert_eq!(f.d.stats.outbox_write_errors, 2);

    // The disk takes writes again; the broker redelivers after the next connection.
    f.d.outbox.fail_writes(false);
    f.d.handle(Event::Disconnected).unwrap();
    go_online(&mut f);
    let mut again = p.clone();
    again.dup = true;
    f.d.handle(Event::Incoming(again)).unwrap();
    assert_eq!(f.d.worker.queued.borrow().len(), 2, "run again");
    let ticket = f.d.worker.queued.borrow()[1].ticket;
    f.d.handle(Event::Done(done(ticket, Ok(classified("r1")))))
        .unwrap();
    assert!(f.d.link.sent.contains(&Sent::Ack(7)));
    let topics: Vec<String> = publishes(&f.d).into_iter().map(|(t, _)| t).collect();
    assert!(
        topics.contains(&"edgeact/d1/greet/result".to_string()),
        "{topics:?}"
    );
}

/// A context reading carries its age (`context.<name>.age_s`, seconds since it arrived) for
/// rules that must not use a stale one; a request can neither claim an age nor supply a
/// configured context value the sensor has not sent.
#[test]
fn context_readings_carry_their_age_and_requests_cannot_forge_them() {
    let mut f = online();
    let forged = r#"{"text":"hi","context.room":"attic","context.room.age_s":"0"}"#;
    let fields = classify_after(&mut f, 5, forged);
    assert_eq!(fields.get("context.room"), None, "{fields:?}");
    assert_eq!(fields.get("context.room.age_s"), None, "{fields:?}");
    f.d.handle(Event::Incoming(request("home/room", 6, "kitchen")))
        .unwrap();
    let fields = classify_after(&mut f, 7, forged);
    assert_eq!(
        fields.get("context.room").map(String::as_str),
        Some("kitchen")
    );
    let age: f64 = fields["context.room.age_s"].parse().unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
}
