//! The MQTT edge of `edgeact serve` under abuse and a flaky network, on a real Mosquitto
//! and the real model: an oversized request must not wedge the daemon (with and without a
//! broker `max_packet_size`), and back-to-back broker outages must neither lose a result
//! nor leave the outbox holding entries whose PUBACK was paired with the wrong packet.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::testkit::broker::Broker;
use crate::testkit::daemon::Daemon;
use crate::testkit::probe::{result_ids, wait_online, Probe};

fn request(i: usize) -> String {
    serde_json::json!({"id": format!("r{i}"), "text": format!("Wonderful service, I loved it ({i})")})
        .to_string()
}

/// Publishes `bytes` bytes at QoS 1 on `topic` with Mosquitto's own client (a rumqttc
/// publisher would retry a refused packet forever). Whether the broker took it is not
/// checked: with `max_packet_size` it refuses it, which is the point of that test.
fn publish_big(dir: &std::path::Path, port: u16, topic: &str, bytes: usize) {
    let file = dir.join("big.bin");
    // Valid JSON, so a daemon that read it would answer it (too_large), not drop it.
    let mut body = b"{\"id\":\"big\",\"text\":\"".to_vec();
    body.resize(bytes - 2, b'a');
    body.extend_from_slice(b"\"}");
    std::fs::write(&file, body).unwrap();
    let st = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-q", "1", "-t", topic, "-f"])
        .arg(&file)
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    eprintln!("mosquitto_pub of {bytes} bytes: {st}");
}

/// Stats the daemon published last (it publishes every second in the tests).
fn last_stats(probe: &Probe, prefix: &str) -> serde_json::Value {
    probe
        .on(&format!("{prefix}/stats"))
        .last()
        .map(|g| g.json())
        .unwrap_or_default()
}

/// One 17 MB QoS 1 request, then ten normal ones: all ten are answered.
fn oversized_then_ten(extra_conf: &str, device: &str) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with(dir.path(), &format!("allow_anonymous true\n{extra_conf}"));
    let prefix = format!("edgeact/{device}");
    // Not subscribed to the request topic: the probe's own packet limit is 4 MiB.
    let probe = Probe::connect(
        broker.port,
        &format!("probe-{device}"),
        &[
            &format!("{prefix}/sentiment/result"),
            &format!("{prefix}/errors"),
            &format!("{prefix}/stats"),
            &format!("{prefix}/available"),
        ],
    );
    let daemon = Daemon::start(&broker, device, dir.path(), &[]);
    wait_online(&probe, &prefix);
    let req = format!("{prefix}/sentiment/request");
    publish_big(dir.path(), broker.port, &req, 17_000_000);
    // Over max_request_bytes (256 KiB) but within the packet limit: the daemon sees it and
    // answers it with an error record.
    probe.publish(
        &req,
        format!("{{\"id\":\"mid\",\"text\":\"{}\"}}", "b".repeat(600 << 10)),
    );
    for i in 0..10 {
        probe.publish(&req, request(i));
    }
    let want: BTreeSet<String> = (0..10).map(|i| format!("r{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    while result_ids(&probe, &format!("{prefix}/sentiment/result")) != want
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = result_ids(&probe, &format!("{prefix}/sentiment/result"));
    assert_eq!(
        got,
        want,
        "after an oversized request, {} of 10 answered\n--- daemon\n{}\n--- broker\n{}",
        got.len(),
        daemon.log(),
        broker.log()
    );
    probe.wait_for(30, "an error record for the 600 KiB request", |_| {
        probe
            .on(&format!("{prefix}/errors"))
            .iter()
            .any(|g| g.json()["error"]["kind"] == "too_large")
    });
    // The 17 MB one never reached the daemon: Mosquitto dropped it for the packet limit
    // the daemon announced (or refused it from the publisher with `max_packet_size`).
    assert!(
        !daemon.log().contains("payload size limit"),
        "{}",
        daemon.log()
    );
    let stats = last_stats(&probe, &prefix);
    eprintln!("stats after the oversized request: {stats}");
}

#[test]
fn an_oversized_request_does_not_wedge_the_daemon() {
    oversized_then_ten("", "big");
}

#[test]
fn an_oversized_request_with_a_broker_max_packet_size() {
    // The README's broker set-up: refuse packets over 1 MiB at the broker.
    oversized_then_ten("max_packet_size 1048576\n", "bigmps");
}

/// Requests flow while the broker is stopped and started twice in quick succession: every
/// request is answered at least once and the outbox ends empty.
#[test]
fn back_to_back_broker_outages_lose_nothing_and_empty_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let prefix = "edgeact/b2b";
    let probe = Probe::connect(
        broker.port,
        "probe-b2b",
        &[
            "edgeact/b2b/sentiment/result",
            "edgeact/b2b/stats",
            "edgeact/b2b/available",
        ],
    );
    let daemon = Daemon::start(&broker, "b2b", dir.path(), &["--queue-capacity", "1024"]);
    wait_online(&probe, prefix);
    let n = 240;
    let req = "edgeact/b2b/sentiment/request";
    for i in 0..n / 3 {
        probe.publish(req, request(i));
    }
    probe.wait_for(120, "some results", |_| {
        result_ids(&probe, "edgeact/b2b/sentiment/result").len() >= 5
    });
    for round in 1..=2 {
        broker.stop();
        std::thread::sleep(Duration::from_millis(300));
        broker.restart();
        // Requests go on flowing between the outages (the probe queues them while down).
        for i in round * n / 3..(round + 1) * n / 3 {
            probe.publish(req, request(i));
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let want: BTreeSet<String> = (0..n).map(|i| format!("r{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while result_ids(&probe, "edgeact/b2b/sentiment/result") != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let ids = result_ids(&probe, "edgeact/b2b/sentiment/result");
    let missing: Vec<&String> = want.difference(&ids).collect();
    assert!(
        missing.is_empty(),
        "{} of {n} results missing: {missing:?}\n{}",
        missing.len(),
        daemon.log()
    );
    // Every entry leaves the outbox on its own PUBACK: none is left behind.
    probe.wait_for(60, "an empty outbox in the stats", |_| {
        last_stats(&probe, prefix)["outbox_depth"] == 0
    });
}
