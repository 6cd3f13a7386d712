//! `edgeact serve` against a real Mosquitto (Debian) on a free loopback port and the real
//! model: round trip, broker outage, crash and restart, bad payloads, overload, fleet
//! sharing, and the stdin pipeline mode.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{result_ids, wait_online, Broker, Daemon, Probe};

fn request(i: usize) -> String {
    let text = if i.is_multiple_of(2) {
        format!("Wonderful service, I loved it ({i})")
    } else {
        format!("Terrible service, I hated it ({i})")
    };
    serde_json::json!({"id": format!("r{i}"), "text": text}).to_string()
}

#[test]
fn round_trip_results_state_and_availability() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-rt", &["edgeact/rt/#"]);
    let mut daemon = Daemon::start(&broker, "rt", dir.path(), &[]);
    wait_online(&probe, "edgeact/rt");
    let n = 12;
    for i in 0..n {
        probe.publish("edgeact/rt/sentiment/request", request(i));
    }
    probe.wait_for(120, "12 results", |_| {
        result_ids(&probe, "edgeact/rt/sentiment/result").len() == n
    });
    for r in probe.on("edgeact/rt/sentiment/result") {
        let v = r.json();
        let i: usize = v["id"].as_str().unwrap()[1..].parse().unwrap();
        let want = if i.is_multiple_of(2) {
            "positive"
        } else {
            "negative"
        };
        assert_eq!(v["label"], want, "{v}");
        assert!(!r.retain, "results are not retained");
    }
    let traces = probe.on("edgeact/rt/sentiment/trace");
    assert_eq!(traces.len(), n);
    assert!(
        traces.iter().all(|t| t.payload.len() < 2048),
        "traces are compact"
    );
    // Stats arrive every second and count what was done.
    probe.wait_for(10, "stats counting every result", |g| {
        g.iter().any(|m| {
            m.topic == "edgeact/rt/stats"
                && m.json()["results_total"].as_u64().unwrap_or(0) >= n as u64
        })
    });
    let stats = probe.on("edgeact/rt/stats").last().unwrap().json();
    assert!(stats["rss_mib"].as_f64().unwrap() > 100.0);

    // Shut down cleanly: exit 0 and `stopped`.
    let status = daemon.terminate();
    assert!(status.success(), "exit {status:?}: {}", daemon.log());

    // A late subscriber sees the retained state and availability.
    let late = Probe::connect(
        broker.port,
        "probe-late",
        &["edgeact/rt/+/state", "edgeact/rt/available"],
    );
    late.wait_for(10, "retained state", |g| g.len() >= 2);
    let state = late.on("edgeact/rt/sentiment/state");
    assert!(state[0].retain);
    assert!(state[0].json()["label"].is_string());
    assert_eq!(late.on("edgeact/rt/available")[0].text(), "stopped");
}

#[test]
fn bad_payloads_get_error_records_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-bad", &["edgeact/bad/#"]);
    let _daemon = Daemon::start(&broker, "bad", dir.path(), &[]);
    wait_online(&probe, "edgeact/bad");
    let req = "edgeact/bad/sentiment/request";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (req, b"this is not json".to_vec(), "invalid_json"),
        (req, br#"{"id":"no-text"}"#.to_vec(), "invalid_request"),
        (
            req,
            format!("{{\"id\":\"huge\",\"text\":\"{}\"}}", "a".repeat(1 << 20)).into_bytes(),
            "too_large",
        ),
        (req, b"{\"text\":\"caf\xff\"}".to_vec(), "invalid_utf8"),
        (
            req,
            br#"{"id":"empty","text":"   "}"#.to_vec(),
            "empty_text",
        ),
        (
            req,
            br#"{"id":"nested","text":{"a":[1,2]}}"#.to_vec(),
            "invalid_request",
        ),
        (
            "edgeact/bad/no-such-task/request",
            br#"{"text":"hello"}"#.to_vec(),
            "unknown_task",
        ),
    ];
    for (topic, payload, _) in &cases {
        probe.publish(topic, payload.clone());
    }
    probe.wait_for(60, "one error record per bad payload", |_| {
        probe.on("edgeact/bad/errors").len() >= cases.len()
    });
    let kinds: Vec<String> = probe
        .on("edgeact/bad/errors")
        .iter()
        .map(|g| {
            g.json()["error"]["kind"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    for (_, _, kind) in &cases {
        assert!(
            kinds.iter().any(|k| k == kind),
            "no `{kind}` error in {kinds:?}"
        );
    }
    // The daemon keeps serving.
    probe.publish(req, request(0));
    probe.wait_for(60, "a result after the bad payloads", |_| {
        result_ids(&probe, "edgeact/bad/sentiment/result").contains("r0")
    });
}

#[test]
fn overload_is_an_explicit_error_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-ov", &["edgeact/ov/#"]);
    let _daemon = Daemon::start(
        &broker,
        "ov",
        dir.path(),
        &["--queue-capacity", "2", "--batch-size", "1"],
    );
    wait_online(&probe, "edgeact/ov");
    let n = 40;
    for i in 0..n {
        probe.publish("edgeact/ov/sentiment/request", request(i));
    }
    let answered = |p: &Probe| {
        let mut ids = result_ids(p, "edgeact/ov/sentiment/result");
        for e in p.on("edgeact/ov/errors") {
            if e.json()["error"]["kind"] == "overloaded" {
                ids.insert(e.json()["id"].as_str().unwrap().to_string());
            }
        }
        ids
    };
    probe.wait_for(
        120,
        "every request answered by a result or `overloaded`",
        |_| answered(&probe).len() == n,
    );
    let overloaded = probe
        .on("edgeact/ov/errors")
        .iter()
        .filter(|e| e.json()["error"]["kind"] == "overloaded")
        .count();
    assert!(
        overloaded > 0,
        "a burst of {n} into a queue of 2 must overload"
    );
    assert!(result_ids(&probe, "edgeact/ov/sentiment/result").len() >= 2);
    // After the burst: normal service.
    probe.publish("edgeact/ov/sentiment/request", request(1000));
    probe.wait_for(60, "a result after the burst", |_| {
        result_ids(&probe, "edgeact/ov/sentiment/result").contains("r1000")
    });
}

#[test]
fn broker_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let probe = Probe::connect(
        broker.port,
        "probe-out",
        &["edgeact/out/sentiment/result", "edgeact/out/available"],
    );
    let _daemon = Daemon::start(&broker, "out", dir.path(), &["--queue-capacity", "1024"]);
    wait_online(&probe, "edgeact/out");
    let n = 200;
    for i in 0..n / 2 {
        probe.publish("edgeact/out/sentiment/request", request(i));
    }
    // Stop the broker in the middle of the stream, while results are being produced.
    probe.wait_for(60, "some results", |_| {
        result_ids(&probe, "edgeact/out/sentiment/result").len() >= 10
    });
    broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    for i in n / 2..n {
        probe.publish("edgeact/out/sentiment/request", request(i));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while result_ids(&probe, "edgeact/out/sentiment/result").len() < n
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let ids = result_ids(&probe, "edgeact/out/sentiment/result");
    let want: BTreeSet<String> = (0..n).map(|i| format!("r{i}")).collect();
    let missing: Vec<&String> = want.difference(&ids).collect();
    assert!(
        missing.is_empty(),
        "{} of {n} results missing: {missing:?}\n{}\n{}",
        missing.len(),
        _daemon.log(),
        broker.log()
    );
}

#[test]
fn crash_and_restart_delivers_outbox_and_unacked_requests() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(
        broker.port,
        "probe-crash",
        &["edgeact/crash/sentiment/result", "edgeact/crash/available"],
    );
    let mut daemon = Daemon::start(&broker, "crash", dir.path(), &["--queue-capacity", "1024"]);
    wait_online(&probe, "edgeact/crash");
    let n = 60;
    for i in 0..n {
        probe.publish("edgeact/crash/sentiment/request", request(i));
    }
    probe.wait_for(60, "some results", |_| {
        result_ids(&probe, "edgeact/crash/sentiment/result").len() >= 5
    });
    daemon.kill9();
    let before = result_ids(&probe, "edgeact/crash/sentiment/result").len();
    assert!(
        before < n,
        "the crash should interrupt the stream ({before} of {n} done)"
    );
    // Same device id and outbox folder: the broker redelivers unacknowledged requests and
    // the outbox replays recorded results.
    let _again = Daemon::start(&broker, "crash", dir.path(), &["--queue-capacity", "1024"]);
    probe.wait_for(180, "all results after the restart", |_| {
        result_ids(&probe, "edgeact/crash/sentiment/result").len() == n
    });
}

#[test]
fn fleet_shares_one_stream_through_a_shared_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(
        broker.port,
        "probe-fleet",
        &["edgeact/+/sentiment/result", "edgeact/+/available"],
    );
    let args = [
        "--share-group",
        "g1",
        "--queue-capacity",
        "1024",
        "--batch-size",
        "2",
    ];
    let _a = Daemon::start(&broker, "boardA", dir.path(), &args);
    let _b = Daemon::start(&broker, "boardB", dir.path(), &args);
    wait_online(&probe, "edgeact/boardA");
    wait_online(&probe, "edgeact/boardB");
    let n = 100;
    for i in 0..n {
        probe.publish("edgeact/fleet/sentiment/request", request(i));
    }
    let all = |p: &Probe| {
        let mut ids = result_ids(p, "edgeact/boardA/sentiment/result");
        ids.extend(result_ids(p, "edgeact/boardB/sentiment/result"));
        ids
    };
    probe.wait_for(240, "100 results across the fleet", |_| {
        all(&probe).len() == n
    });
    let a = result_ids(&probe, "edgeact/boardA/sentiment/result").len();
    let b = result_ids(&probe, "edgeact/boardB/sentiment/result").len();
    eprintln!("boardA {a}, boardB {b}");
    assert!(a > 0 && b > 0, "both boards must do a share: A {a}, B {b}");
}

#[test]
fn stdin_pipeline_mode_without_a_broker() {
    let mut child = Command::new(common::bin())
        .current_dir(common::root())
        .args(["serve", "--task", "sentiment", "--task", "city-event"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, r#"{{"id":"a","text":"I love this place"}}"#).unwrap();
        writeln!(
            stdin,
            r#"{{"id":"b","task":"city-event","text":"The river burst its banks"}}"#
        )
        .unwrap();
        writeln!(stdin, "not json").unwrap();
        writeln!(stdin, r#"{{"id":"c","task":"nope","text":"x"}}"#).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "one line out per line in, in order");
    assert_eq!(lines[0]["id"], "a");
    assert_eq!(lines[0]["label"], "positive");
    assert_eq!(lines[1]["task"], "city-event");
    assert_eq!(lines[1]["label"], "flood");
    assert_eq!(lines[2]["error"]["kind"], "invalid_json");
    assert_eq!(lines[3]["error"]["kind"], "unknown_task");
}

#[test]
fn context_topics_feed_templates() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("door-event.toml");
    std::fs::write(
        &task,
        r#"
instruction = "Say whether the report needs staff at the door."
query = "Door: {context.door}\nReport: {text}\nNeeds staff:"
labels = [{ name = "yes", text = " yes" }, { name = "no", text = " no" }]
examples = [
  { "context.door" = "open", text = "someone is stuck in the doorway", label = "yes" },
  { "context.door" = "closed", text = "all quiet", label = "no" },
]
"#,
    )
    .unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-ctx", &["edgeact/ctx/#"]);
    let _daemon = Daemon::start(
        &broker,
        "ctx",
        dir.path(),
        &[
            "--task",
            task.to_str().unwrap(),
            "--context",
            "door=site/door/state",
        ],
    );
    wait_online(&probe, "edgeact/ctx");
    // Before any context value: the template cannot be filled, and says so.
    probe.publish(
        "edgeact/ctx/door-event/request",
        r#"{"id":"early","text":"a child is crying"}"#,
    );
    probe.wait_for(60, "an error for the missing context", |g| {
        g.iter()
            .any(|m| m.topic == "edgeact/ctx/errors" && m.json()["id"] == "early")
    });
    let err = probe.on("edgeact/ctx/errors")[0].json();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context.door"),
        "{err}"
    );
    // With a context value, the same request is classified.
    probe.publish("site/door/state", "open");
    std::thread::sleep(Duration::from_millis(500));
    probe.publish(
        "edgeact/ctx/door-event/request",
        r#"{"id":"late","text":"a child is crying"}"#,
    );
    probe.wait_for(60, "a result once the context is known", |_| {
        result_ids(&probe, "edgeact/ctx/door-event/result").contains("late")
    });
}
