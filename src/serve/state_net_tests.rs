//! State-machine tests of the network edge: messages over the packet limit, over-long ids,
//! and the packet-id bookkeeping across connection losses. The fixtures are the parent
//! module's.

use super::*;

/// A result for request `id` whose payload is `bytes` long.
fn big_result(id: &str, bytes: usize) -> OutMessage {
    let payload = serde_json::json!({"id": id, "pad": "x".repeat(bytes)}).to_string();
    OutMessage::new(
        MessageKind::Result,
        "edgeact/d1/greet/result".into(),
        payload,
    )
}

fn error_records(d: &Daemon<FakeLink, FakeWorker>) -> Vec<Value> {
    publishes(d)
        .iter()
        .filter(|(t, _)| t == "edgeact/d1/errors")
        .map(|(_, p)| serde_json::from_str(p).unwrap())
        .collect()
}

#[test]
fn a_result_over_the_packet_limit_is_replaced_by_an_error_record_naming_id_and_size() {
    let mut f = online();
    f.d.cfg.max_packet_bytes = 4096;
    let small = OutMessage::new(MessageKind::Result, "edgeact/d1/x".into(), "{}".into());
    assert!(f.d.record(vec![big_result("r7", 10_000), small], None));
    f.d.pump();
    let sent = publishes(&f.d);
    assert!(
        sent.iter().all(|(t, p)| t.len() + p.len() <= 4096),
        "nothing over the limit is handed to the client: {sent:?}"
    );
    let errs = error_records(&f.d);
    assert_eq!(errs.len(), 1, "{sent:?}");
    assert_eq!(errs[0]["id"], "r7");
    assert_eq!(errs[0]["error"]["kind"], "result_too_large");
    let msg = errs[0]["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("4096") && msg.contains("10"),
        "names the limit and the size: {msg}"
    );
    assert_eq!(sent.len(), 2, "the message after it still goes: {sent:?}");
    assert_eq!(f.d.stats.too_large_results, 1);
}

#[test]
fn an_entry_over_the_brokers_smaller_limit_is_replaced_at_replay_and_blocks_nothing() {
    let mut f = daemon_with(FakeWorker::default());
    let after = OutMessage::new(MessageKind::Result, "edgeact/d1/x".into(), "{}".into());
    // Recorded while disconnected under our own limit (1 MiB) ...
    assert!(f.d.record(vec![big_result("r8", 6000), after], None));
    assert_eq!(f.d.outbox.len(), 2);
    // ... and the broker takes at most 4 KiB.
    f.d.set_broker_packet_limit(Some(4096));
    f.d.handle(Event::Connected).unwrap();
    let topics: Vec<String> = publishes(&f.d).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["edgeact/d1/x", "edgeact/d1/errors"], "{topics:?}");
    assert_eq!(error_records(&f.d)[0]["id"], "r8");
    assert_eq!(
        f.d.outbox.len(),
        2,
        "the big entry left; its error record came in"
    );
}

#[test]
fn ids_and_field_names_over_the_limit_get_an_error_record_and_are_acked() {
    let long = "i".repeat(MAX_ID_BYTES + 1);
    let ok_id = "i".repeat(MAX_ID_BYTES);
    let cases = [
        ("greet", format!(r#"{{"id":"{long}","text":"hi"}}"#), true),
        ("greet", format!(r#"{{"text":"hi","{long}":"v"}}"#), true),
        (
            "offers",
            format!(r#"{{"profile":"p","items":[{{"id":"{long}","text":"x"}}]}}"#),
            true,
        ),
        ("greet", format!(r#"{{"id":"{ok_id}","text":"hi"}}"#), false),
    ];
    for (i, (task, payload, refused)) in cases.iter().enumerate() {
        let mut f = online();
        let pkid = i as u16 + 1;
        let topic = format!("edgeact/d1/{task}/request");
        f.d.handle(Event::Incoming(request(&topic, pkid, payload)))
            .unwrap();
        let errs = error_records(&f.d);
        if *refused {
            assert_eq!(errs.len(), 1, "case {i}");
            assert_eq!(errs[0]["error"]["kind"], "too_long", "case {i}");
            assert!(errs[0]["id"].is_null(), "the long id is not echoed");
            assert!(f.d.link.sent.contains(&Sent::Ack(pkid)), "case {i}");
            assert!(f.d.worker.queued.borrow().is_empty(), "case {i}");
        } else {
            assert!(errs.is_empty(), "case {i}: {errs:?}");
            assert_eq!(f.d.worker.queued.borrow().len(), 1, "case {i}");
        }
    }
}

#[test]
fn nothing_is_handed_to_the_client_while_disconnected() {
    let mut f = online();
    f.d.handle(Event::Incoming(request(
        "edgeact/d1/greet/request",
        4,
        r#"{"id":"r1","text":"hi"}"#,
    )))
    .unwrap();
    let ticket = f.d.worker.queued.borrow()[0].ticket;
    f.d.handle(Event::Disconnected).unwrap();
    f.d.link.sent.clear();
    // The outcome comes while down: recorded, neither published nor acked (the PUBACK
    // would go out on the next connection for a stale packet id, and the publish would
    // take a packet id that pairs with another entry).
    f.d.handle(Event::Done(done(ticket, Ok(classified("r1")))))
        .unwrap();
    f.d.handle(Event::StatsTick).unwrap();
    assert!(f.d.link.sent.is_empty(), "{:?}", f.d.link.sent);
    assert_eq!(f.d.acks.unwritten(), 0);
    assert_eq!(f.d.outbox.len(), 3);
    // The next connection replays it; the broker's redelivery (DUP) is acked then.
    f.d.handle(Event::Connected).unwrap();
    assert_eq!(publishes(&f.d).len(), 3);
    let mut again = request("edgeact/d1/greet/request", 4, r#"{"id":"r1","text":"hi"}"#);
    again.dup = true;
    f.d.handle(Event::Incoming(again)).unwrap();
    assert!(f.d.link.sent.contains(&Sent::Ack(4)));
    assert!(f.d.worker.queued.borrow().len() == 1, "not run twice");
}

#[test]
fn back_to_back_reconnects_with_stale_writes_ack_each_entry_on_its_own_puback() {
    let mut f = online();
    let msgs = ["a", "b", "c"]
        .map(|t| OutMessage::new(MessageKind::Result, t.into(), "{}".into()))
        .to_vec();
    assert!(f.d.record(msgs, None));
    f.d.pump();
    // First connection: a and b written, then the connection drops before any PUBACK.
    f.d.handle(Event::Written(1)).unwrap();
    f.d.handle(Event::Written(2)).unwrap();
    f.d.handle(Event::Disconnected).unwrap();
    // A write reported after the loss (buffered by a failed flush) takes nothing.
    f.d.handle(Event::Written(3)).unwrap();
    // Second connection: drops at once.
    f.d.handle(Event::Connected).unwrap();
    f.d.handle(Event::Disconnected).unwrap();
    f.d.handle(Event::Written(1)).unwrap();
    // Third connection: everything replayed, acked out of order.
    f.d.handle(Event::Connected).unwrap();
    for pkid in [1, 2, 3] {
        f.d.handle(Event::Written(pkid)).unwrap();
    }
    let left = |d: &Daemon<FakeLink, FakeWorker>| -> Vec<String> {
        d.outbox.pending().map(|m| m.topic.clone()).collect()
    };
    f.d.handle(Event::PubAck(2)).unwrap();
    assert_eq!(left(&f.d), ["a", "c"], "pkid 2 carried b");
    f.d.handle(Event::PubAck(3)).unwrap();
    f.d.handle(Event::PubAck(1)).unwrap();
    assert!(f.d.outbox.is_empty());
    assert_eq!(f.d.acks.stale_events, 2);
}
