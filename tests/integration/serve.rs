//! `edgeact serve` against a real Mosquitto (Debian) on a free loopback port and the real
//! model: round trip, broker outage, crash and restart, bad payloads, overload, fleet
//! sharing, and the stdin pipeline mode.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::testkit;
use crate::testkit::broker::Broker;
use crate::testkit::daemon::Daemon;
use crate::testkit::probe::{result_ids, wait_online, Probe};

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
    // Each result's trace is published beside it, not before it: wait for both.
    probe.wait_for(120, "12 results and their traces", |_| {
        result_ids(&probe, "edgeact/rt/sentiment/result").len() == n
            && probe.on("edgeact/rt/sentiment/trace").len() >= n
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
            format!("{{\"id\":\"huge\",\"text\":\"{}\"}}", "a".repeat(600 << 10)).into_bytes(),
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
    let mut child = Command::new(testkit::bin())
        .current_dir(testkit::root())
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

#[test]
fn rank_requests_over_mqtt_come_back_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-rank", &["edgeact/rk/#"]);
    let _daemon = Daemon::start(&broker, "rk", dir.path(), &["--task", "rank-interest"]);
    wait_online(&probe, "edgeact/rk");
    let items = serde_json::json!([
        {"id": "a", "title": "Exchange rates for paying abroad", "description": "What the bank charges when you pay in another currency"},
        {"id": "b", "title": "Pruning roses", "description": "When to cut back climbing roses"},
        {"id": "c", "title": "Card payment declined in a foreign shop", "description": "Why a card may not work abroad"},
        {"id": "d", "title": "Weekend football drills"},
        {"id": "e", "text": "Top up your account with a foreign currency transfer"},
    ]);
    let profile = "Travels abroad every month and pays by card in foreign currencies.";
    // Through the generic `rank` topic and through the task's own topic.
    probe.publish(
        "edgeact/rk/rank/request",
        serde_json::json!({"id": "q1", "profile": profile, "items": items, "top_k": 3}).to_string(),
    );
    probe.publish(
        "edgeact/rk/rank-interest/request",
        serde_json::json!({"id": "q2", "profile": profile, "items": items}).to_string(),
    );
    probe.publish(
        "edgeact/rk/rank/request",
        serde_json::json!({"id": "q3", "profile": profile}).to_string(),
    );
    probe.wait_for(300, "two rankings and one error", |_| {
        result_ids(&probe, "edgeact/rk/rank/result").contains("q1")
            && result_ids(&probe, "edgeact/rk/rank-interest/result").contains("q2")
            && !probe.on("edgeact/rk/errors").is_empty()
    });
    let q1 = probe.on("edgeact/rk/rank/result")[0].json();
    let q2 = probe.on("edgeact/rk/rank-interest/result")[0].json();
    let ranked = |v: &serde_json::Value| v["ranked"].as_array().unwrap().clone();
    assert_eq!(ranked(&q1).len(), 3, "top_k cuts: {q1}");
    assert_eq!(ranked(&q2).len(), 5, "all items: {q2}");
    assert_eq!(q2["n_items"], 5);
    let scores: Vec<f64> = ranked(&q2)
        .iter()
        .map(|r| r["score"].as_f64().unwrap())
        .collect();
    // The task fuses ([rank.fusion]): the fused score orders; P(yes) stays in `score`.
    let fused: Vec<f64> = ranked(&q2)
        .iter()
        .map(|r| r["fused"].as_f64().unwrap())
        .collect();
    assert!(fused.windows(2).all(|w| w[0] >= w[1]), "sorted: {fused:?}");
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    let ranks: Vec<u64> = ranked(&q2)
        .iter()
        .map(|r| r["rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks, vec![1, 2, 3, 4, 5]);
    // The same items in the same order whichever topic asked.
    let ids = |v: &serde_json::Value| -> Vec<String> {
        ranked(v)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&q1)[..], ids(&q2)[..3]);
    // The task weighs the model 0 ([rank.fusion]): no profile prefix is decoded and no
    // item is scored by the model (the model's stage: tests/integration/rank.rs).
    assert_eq!(q1["prefix_tokens_decoded"], 0, "{q1}");
    assert_eq!(q2["prefix_tokens_decoded"], 0, "{q2}");
    assert!(
        ranked(&q2).iter().all(|r| r["model_scored"] == false),
        "{q2}"
    );
    let err = probe.on("edgeact/rk/errors")[0].json();
    assert_eq!(err["error"]["kind"], "invalid_request");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("items"),
        "{err}"
    );
}

/// The kiosk task with absolute paths, a long timeout (loaded machines) and its sensors
/// and notifications from the daemon (also used by the `serve_qa` tests).
pub(crate) fn kiosk_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let root = testkit::root();
    let src = std::fs::read_to_string(root.join("tasks/kiosk.toml")).unwrap();
    let src = src
        .replace("\"../kb/kiosk\"", &format!("{:?}", root.join("kb/kiosk")))
        .replace(
            "\"../examples/sensors\"",
            &format!("{:?}", root.join("examples/sensors")),
        )
        .replace("timeout_ms = 60000", "timeout_ms = 600000");
    let p = dir.join("kiosk.toml");
    std::fs::write(&p, src).unwrap();
    p
}

#[test]
fn react_over_mqtt_publishes_answer_and_compact_trace() {
    let dir = tempfile::tempdir().unwrap();
    let task = kiosk_copy(dir.path());
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-react", &["edgeact/rx/#"]);
    let mut daemon = Daemon::start(
        &broker,
        "rx",
        dir.path(),
        &["--task", task.to_str().unwrap(), "--task", "sentiment"],
    );
    wait_online(&probe, "edgeact/rx");
    probe.publish(
        "edgeact/rx/kiosk/request",
        r#"{"id":"k1","question":"When do you close on Saturday?","session":"kiosk-7f3a9c2e41d8b6"}"#,
    );
    // A classification task served beside it is not held up for long.
    probe.publish("edgeact/rx/sentiment/request", request(0));
    probe.publish("edgeact/rx/kiosk/request", r#"{"id":"k2","tool":"notify"}"#);
    probe.wait_for(600, "the answer, its trace and an error", |_| {
        result_ids(&probe, "edgeact/rx/kiosk/result").contains("k1")
            && !probe.on("edgeact/rx/kiosk/trace").is_empty()
            && !probe.on("edgeact/rx/errors").is_empty()
            && result_ids(&probe, "edgeact/rx/sentiment/result").contains("r0")
    });
    let r = probe.on("edgeact/rx/kiosk/result")[0].json();
    eprintln!("{r}");
    assert_eq!(r["stop_reason"], "final", "{r}\n{}", daemon.log());
    assert_eq!(r["finished"], true);
    assert!(!r["answer"].as_str().unwrap().trim().is_empty());
    assert_eq!(r["unparsable_steps"], 0);
    assert_eq!(r["session"], "kiosk-7f3a9c2e41d8b6");
    let t = probe.on("edgeact/rx/kiosk/trace")[0].json();
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len() as u64, r["steps"].as_u64().unwrap());
    assert!(steps.last().unwrap()["final_answer"].is_string(), "{t}");
    // The scored policy chooses actions and selects the answer; generation is only for
    // arguments it cannot take from the question, so a step may generate nothing.
    assert!(steps
        .iter()
        .all(|s| s["tokens"]["generated"].as_u64().is_some()));
    // Grounded: the answer cites the passage it comes from (`citations` lists the retrieved
    // ones, best first), with that passage's closing time.
    let cited: Vec<&str> = r["citations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(cited.first(), Some(&"hours-saturday"), "{r}");
    let answer = r["answer"].as_str().unwrap();
    assert!(
        answer.contains("18:00") && answer.ends_with("[hours-saturday]"),
        "{r}"
    );
    assert!(probe.on("edgeact/rx/kiosk/trace")[0].payload.len() < 16 * 1024);
    let err = probe.on("edgeact/rx/errors")[0].json();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("question"),
        "{err}"
    );
    // The session remembers the turn for the next request.
    let session = dir.path().join("rx/sessions/kiosk-7f3a9c2e41d8b6.json");
    let turns: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&session).unwrap()).unwrap();
    assert_eq!(turns[0]["question"], "When do you close on Saturday?");
    assert!(daemon.terminate().success());
}

#[test]
fn monitor_rules_raise_one_incident_over_mqtt_and_keep_state_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("flood-watch.toml");
    std::fs::write(
        &task,
        r#"
instruction = "Each message reports an event in the city. Name the type of event: flood or fire."
query = "Message: {text}\nEvent:"
labels = [{ name = "flood", text = " flood" }, { name = "fire", text = " fire" }]
examples = [
  { text = "Water is knee deep on Main Street after the river overflowed", label = "flood" },
  { text = "Smoke and flames are coming from the warehouse roof", label = "fire" },
]

[monitor]
ts_field = "ts"

[[monitor.rules]]
name = "flood-district"
label = "flood"
key = "district"
window_s = 600
kind = "count"
threshold = 4
min_count = 4
quiet_s = 600
"#,
    )
    .unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-mon", &["edgeact/mn/#"]);
    let args = ["--task", task.to_str().unwrap()];
    let mut daemon = Daemon::start(&broker, "mn", dir.path(), &args);
    wait_online(&probe, "edgeact/mn");
    // Event times an hour in the past: times beyond now + `max_future_s` are refused.
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    // Plain flood reports (the classifier is not what this test is about).
    let flood = |i: usize| format!("The river has flooded the streets, water is everywhere ({i})");
    for i in 0..6 {
        let req = serde_json::json!({"id": format!("f{i}"), "text": flood(i), "district": "4", "ts": t0 + 10 * i as u64});
        probe.publish("edgeact/mn/flood-watch/request", req.to_string());
    }
    probe.wait_for(300, "six results", |_| {
        result_ids(&probe, "edgeact/mn/flood-watch/result").len() == 6
    });
    let labels: Vec<String> = probe
        .on("edgeact/mn/flood-watch/result")
        .iter()
        .map(|r| r.json()["label"].to_string())
        .collect();
    probe.wait_for(30, "a new incident", |g| {
        g.iter()
            .any(|m| m.topic == "edgeact/mn/flood-district/events")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let events = probe.on("edgeact/mn/flood-district/events");
    let new: Vec<serde_json::Value> = events
        .iter()
        .map(|e| e.json())
        .filter(|e| e["type"] == "new")
        .collect();
    assert_eq!(new.len(), 1, "one burst, one incident: {events:?}");
    let inc = &new[0]["after"];
    assert_eq!(inc["key"], "4", "{inc}");
    assert!(
        inc["window"]["count"].as_u64().unwrap() >= 4,
        "{inc} {labels:?}"
    );
    let id = inc["id"].as_str().unwrap().to_string();
    // The window state is on disk, and a restarted daemon carries the open incident on.
    assert!(daemon.terminate().success());
    let state = std::fs::read_to_string(dir.path().join("mn/monitor-flood-watch.json")).unwrap();
    assert!(state.contains(&id), "{state}");
    let daemon2 = Daemon::start(&broker, "mn", dir.path(), &args);
    probe.wait_for(120, "online again", |g| {
        g.iter()
            .filter(|m| m.topic == "edgeact/mn/available" && m.text() == "online")
            .count()
            >= 2
    });
    let req = serde_json::json!({"id": "f9", "text": flood(9), "district": "4", "ts": t0 + 100});
    probe.publish("edgeact/mn/flood-watch/request", req.to_string());
    probe.wait_for(120, "the seventh result", |_| {
        result_ids(&probe, "edgeact/mn/flood-watch/result").contains("f9")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let news = probe
        .on("edgeact/mn/flood-district/events")
        .iter()
        .filter(|e| e.json()["type"] == "new")
        .count();
    assert_eq!(news, 1, "no second incident after the restart");
    assert!(
        daemon2.log().contains("monitor state restored"),
        "{}",
        daemon2.log()
    );
}
