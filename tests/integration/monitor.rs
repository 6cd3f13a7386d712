//! The monitor on a replayed stream built from the disaster-messages data set
//! (scripts/fetch-data): a flat background of mixed event types over eight districts, then
//! fires surge in one district for 30 minutes and stop. The shipped `city-event` rules are
//! used. The classifier's output is the data set's gold label here: the monitor is
//! downstream of classification, and this isolates it (no model needed).

use std::time::Duration;

use edgeact::monitor::replay::{event_line, event_time_ms, observation};
use edgeact::monitor::{EventType, Monitor, MonitorConfig, MonitorEvent};
use edgeact::spec::Task;
use serde_json::Value;

use crate::testkit;
use crate::testkit::broker::Broker;
use crate::testkit::daemon::Daemon;
use crate::testkit::probe::{result_ids, wait_online, Probe};
use crate::testkit::timeline::{synthetic_timeline, Surge, TimelineSpec};

const START: f64 = 1_700_000_000.0;
const SURGE_FROM: f64 = 7200.0;
const SURGE_TO: f64 = 9000.0;

fn pool() -> Vec<(String, String)> {
    let path = testkit::root().join("data/disaster-events.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-data)", path.display()));
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["label"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn spec(surge: bool) -> TimelineSpec {
    TimelineSpec {
        start_ts_s: START,
        duration_s: 4.0 * 3600.0,
        background_per_min: 30.0,
        keys: (1..=8).map(|d| format!("d{d}")).collect(),
        key_field: "district".into(),
        surge: surge.then(|| Surge {
            label: "fire".into(),
            key: "d4".into(),
            from_s: SURGE_FROM,
            to_s: SURGE_TO,
            per_min: 6.0,
        }),
        seed: 7,
    }
}

fn city_event() -> (Task, MonitorConfig) {
    let task = Task::load(&testkit::root().join("tasks/city-event.toml")).unwrap();
    let cfg = MonitorConfig::from_task(&task)
        .unwrap()
        .expect("[monitor] in city-event");
    (task, cfg)
}

/// Feeds the timeline with its gold labels as the classifications.
fn run(lines: &[Value], cfg: &MonitorConfig) -> (Monitor, Vec<MonitorEvent>) {
    let mut m = Monitor::new(cfg);
    let mut events = Vec::new();
    for (i, v) in lines.iter().enumerate() {
        let req = edgeact::classify::input::request_from_json(v.clone(), &i.to_string()).unwrap();
        let ts = event_time_ms(&req.fields, &cfg.ts_field).unwrap();
        let label = req.fields.get("label").cloned();
        events.extend(
            m.observe(&observation(&req, label, 1.0, ts), i64::MAX)
                .unwrap(),
        );
    }
    (m, events)
}

#[test]
fn a_surge_is_one_incident_that_opens_in_the_window_and_ends_after_it_stops() {
    let (_, cfg) = city_event();
    let rule = cfg
        .rules
        .iter()
        .find(|r| r.name == "fire-jump")
        .unwrap()
        .clone();
    let lines = synthetic_timeline(&pool(), &spec(true));
    let (m, events) = run(&lines, &cfg);
    let fire: Vec<&MonitorEvent> = events.iter().filter(|e| e.rule == "fire-jump").collect();
    let kinds: Vec<EventType> = fire.iter().map(|e| e.kind).collect();
    eprintln!("{} messages; fire-jump: {kinds:?}", lines.len());
    // One incident, in the surging district, opened within the window after the start.
    assert_eq!(
        kinds.iter().filter(|&&k| k == EventType::New).count(),
        1,
        "{kinds:?}"
    );
    let new = fire[0];
    assert_eq!(new.kind, EventType::New);
    assert_eq!(new.after["key"], "d4");
    let opened = new.after["start_ts"].as_f64().unwrap() - START;
    assert!(
        opened >= SURGE_FROM && opened <= SURGE_FROM + rule.window_s,
        "opened {opened} s into the stream; the surge starts at {SURGE_FROM}"
    );
    // It stays one incident (updates with the same id), then ends after the surge stopped.
    let id = new.incident_id();
    assert!(fire.iter().all(|e| e.incident_id() == id));
    assert!(kinds.contains(&EventType::Update), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&EventType::End), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|&&k| k == EventType::End).count(), 1);
    let end = fire.last().unwrap();
    let ended = end.after["end_ts"].as_f64().unwrap() - START;
    let quiet_s = rule.quiet_s.unwrap_or(rule.window_s);
    assert!(
        ended >= SURGE_TO && ended <= SURGE_TO + rule.window_s + quiet_s + 60.0,
        "ended {ended} s into the stream; the surge stops at {SURGE_TO}"
    );
    assert_eq!(end.after["end_reason"], "quiet");
    // The evidence: ids of messages that exist, fires in d4, examples with text.
    let by_id: std::collections::HashMap<&str, &Value> = lines
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v))
        .collect();
    let triggers = new.after["trigger_ids"].as_array().unwrap();
    assert!(!triggers.is_empty());
    for t in triggers {
        let v = by_id[t.as_str().unwrap()];
        assert_eq!(
            (v["label"].as_str(), v["district"].as_str()),
            (Some("fire"), Some("d4"))
        );
    }
    assert!(end.after["hits"].as_u64().unwrap() >= rule.min_count);
    assert!(!end.after["top_examples"][0]["text"]
        .as_str()
        .unwrap()
        .is_empty());
    // Updates are throttled.
    let ts: Vec<f64> = fire
        .iter()
        .map(|e| e.after["ts"].as_f64().unwrap())
        .collect();
    for (w, e) in ts.windows(2).zip(&fire[1..]) {
        if e.kind == EventType::Update {
            assert!(w[1] - w[0] >= rule.update_interval_s, "{ts:?}");
        }
    }
    // Background floods never reach the flood rule's count.
    assert!(events.iter().all(|e| e.rule != "flood-count"), "{events:?}");
    assert!(m.open_incidents().is_empty());
}

#[test]
fn a_flat_stream_raises_nothing() {
    let (_, cfg) = city_event();
    let lines = synthetic_timeline(&pool(), &spec(false));
    let (m, events) = run(&lines, &cfg);
    assert!(lines.len() > 5000, "{}", lines.len());
    assert!(
        events.is_empty(),
        "{:?}",
        events.iter().map(event_line).collect::<Vec<_>>()
    );
    // Every district was seen, and fires were in the background.
    assert_eq!(m.keys("fire-jump"), 8);
    assert!(m.counters("fire-jump").unwrap().hits > 20);
}

#[test]
fn cli_replay_prints_the_same_incidents_and_saves_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("timeline.jsonl");
    let lines = synthetic_timeline(&pool(), &spec(true));
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let state = dir.path().join("state/monitor.json");
    let out = testkit::edgeact(
        &[
            "monitor",
            "--task",
            "city-event",
            "--label-field",
            "label",
            "--data",
            data.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (_, cfg) = city_event();
    let (_, events) = run(&lines, &cfg);
    let expected: Vec<Value> = events.iter().map(event_line).collect();
    assert_eq!(printed, expected);
    assert!(stderr.contains("1 incidents"), "{stderr}");
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert!(saved["rules"]["fire-jump"]["keys"]["d4"].is_object());

    // A task without [monitor] is a usage error naming the section.
    let out = testkit::edgeact(
        &[
            "monitor",
            "--task",
            "sentiment",
            "--label-field",
            "label",
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[monitor]"));
}

// ---- Financial sentiment: alerts per company -------------------------------------------

const FIN_SURGE_FROM: f64 = 4.0 * 3600.0;
const FIN_SURGE_TO: f64 = 5.0 * 3600.0;

/// (label, text) of the news-sentence set (scripts/fetch-data), every split: the monitor
/// sees gold labels here.
fn news_pool() -> Vec<(String, String)> {
    let path = testkit::root().join("data/news-sentiment-en.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-data)", path.display()));
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["label"].as_str().unwrap().to_string(),
                v["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn finance() -> MonitorConfig {
    let task = Task::load(&testkit::root().join("tasks/finance-sentiment.toml")).unwrap();
    MonitorConfig::from_task(&task)
        .unwrap()
        .expect("[monitor] in finance-sentiment")
}

/// Eight hours of news about eight companies (about one message a minute each), and with
/// `surge` an hour of extra negative news about Tesla. Each message names its company in
/// the text only, by cashtag or by name in turn, so the key comes from the extractor.
fn finance_timeline(surge: bool) -> Vec<Value> {
    let cfg = finance();
    let names = cfg.entities.as_ref().unwrap().names.clone();
    let spec = TimelineSpec {
        start_ts_s: START,
        duration_s: 8.0 * 3600.0,
        background_per_min: 8.0,
        keys: names.keys().cloned().collect(),
        key_field: "ticker".into(),
        surge: surge.then(|| Surge {
            label: "negative".into(),
            key: "TSLA".into(),
            from_s: FIN_SURGE_FROM,
            to_s: FIN_SURGE_TO,
            per_min: 1.0,
        }),
        seed: 11,
    };
    let mut lines = synthetic_timeline(&news_pool(), &spec);
    for (i, v) in lines.iter_mut().enumerate() {
        let o = v.as_object_mut().unwrap();
        let ticker = o.remove("ticker").unwrap().as_str().unwrap().to_string();
        let mention = if i % 2 == 0 {
            format!("${ticker}")
        } else {
            names[&ticker][0].clone()
        };
        let text = format!("{mention}: {}", o["text"].as_str().unwrap());
        o.insert("text".into(), Value::String(text));
        // Kept for the test's own checks; the monitor does not read it.
        o.insert("company".into(), Value::String(ticker));
    }
    lines
}

#[test]
fn finance_a_negative_surge_about_one_company_is_one_incident_with_its_evidence() {
    let cfg = finance();
    let lines = finance_timeline(true);
    let (m, events) = run(&lines, &cfg);
    let kinds: Vec<EventType> = events.iter().map(|e| e.kind).collect();
    eprintln!("{} messages; negative-jump: {kinds:?}", lines.len());
    let news: Vec<&MonitorEvent> = events.iter().filter(|e| e.kind == EventType::New).collect();
    assert_eq!(
        news.len(),
        1,
        "{:?}",
        events.iter().map(event_line).collect::<Vec<_>>()
    );
    let new = news[0];
    assert_eq!(new.rule, "negative-jump");
    assert_eq!(new.after["key_field"], "entity");
    assert_eq!(new.after["key"], "TSLA");
    let window_s = cfg.rules[0].window_s;
    let opened = new.after["start_ts"].as_f64().unwrap() - START;
    assert!(
        (FIN_SURGE_FROM..=FIN_SURGE_FROM + window_s).contains(&opened),
        "opened {opened} s in; the surge starts at {FIN_SURGE_FROM}"
    );
    // Its evidence: negative messages about Tesla, from the window before it opened.
    let by_id: std::collections::BTreeMap<&str, &Value> = lines
        .iter()
        .map(|v| (v["id"].as_str().unwrap(), v))
        .collect();
    let ids: Vec<&str> = new.after["trigger_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(ids.len() >= cfg.rules[0].min_count as usize, "{ids:?}");
    for id in &ids {
        let msg = by_id[id];
        assert_eq!(msg["company"], "TSLA", "{msg}");
        assert_eq!(msg["label"], "negative", "{msg}");
        let ts = msg["ts"].as_f64().unwrap() - START;
        assert!(ts > opened - window_s && ts <= opened, "{msg}");
    }
    let examples = new.after["top_examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    for e in examples {
        assert!(ids.contains(&e["id"].as_str().unwrap()), "{e}");
        let text = e["text"].as_str().unwrap();
        assert!(
            text.starts_with("$TSLA") || text.starts_with("Tesla"),
            "{text}"
        );
    }
    // One incident from start to end, ended after the surge stopped.
    let id = new.incident_id();
    assert!(events.iter().all(|e| e.incident_id() == id));
    assert_eq!(kinds.last(), Some(&EventType::End), "{kinds:?}");
    assert!(events.last().unwrap().after["end_ts"].as_f64().unwrap() - START >= FIN_SURGE_TO);
    assert!(m.open_incidents().is_empty());
    // Every company was keyed from its text alone.
    assert_eq!(m.keys("negative-jump"), 8);
    assert_eq!(m.counters("negative-jump").unwrap().missing_key, 0);
}

#[test]
fn finance_the_same_news_without_the_surge_raises_nothing() {
    let lines = finance_timeline(false);
    let (m, events) = run(&lines, &finance());
    assert!(
        events.is_empty(),
        "{:?}",
        events.iter().map(event_line).collect::<Vec<_>>()
    );
    assert!(m.counters("negative-jump").unwrap().hits > 500);
}

// ---- Fusion of text and sensors over MQTT (real model, real Mosquitto) -------------------

/// The label of result `id` on `topic`, once it arrived.
fn label_of(probe: &Probe, topic: &str, id: &str) -> String {
    probe.wait_for(300, &format!("result {id}"), |_| {
        result_ids(probe, topic).contains(id)
    });
    let r = probe
        .on(topic)
        .into_iter()
        .map(|g| g.json())
        .find(|r| r["id"] == id)
        .unwrap();
    r["label"].as_str().unwrap_or_default().to_string()
}

/// A template reads a context topic, so the same report is classified differently when the
/// sensor changes; an alert rule also needs a temperature reading over 50, so the same
/// classifications raise an incident only once the sensor says so, and the incident shows
/// the reading it used.
#[test]
fn fusion_context_changes_the_classification_and_gates_the_alert() {
    let dir = tempfile::tempdir().unwrap();
    let task = dir.path().join("door-watch.toml");
    std::fs::write(
        &task,
        r#"
instruction = "Say whether staff must be called, as the alarm sensor says."
query = "Report: {text}\nAlarm sensor: {context.alarm}\nCall staff:"
labels = [{ name = "yes", text = " yes" }, { name = "no", text = " no" }]
examples = [
  { text = "a parcel is at the door", "context.alarm" = "yes", label = "yes" },
  { text = "a parcel is at the door", "context.alarm" = "no", label = "no" },
  { text = "the corridor is quiet", "context.alarm" = "no", label = "no" },
  { text = "the corridor is quiet", "context.alarm" = "yes", label = "yes" },
]

[monitor]

[[monitor.rules]]
name = "hot-call"
label = "yes"
window_s = 600
kind = "count"
threshold = 3
min_count = 3
context = { field = "context.temp", above = 50.0, max_age_s = 600 }
"#,
    )
    .unwrap();
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-fx", &["edgeact/fx/#"]);
    let _daemon = Daemon::start(
        &broker,
        "fx",
        dir.path(),
        &[
            "--task",
            task.to_str().unwrap(),
            "--context",
            "alarm=site/alarm",
            "--context",
            "temp=site/temp",
        ],
    );
    wait_online(&probe, "edgeact/fx");
    let results = "edgeact/fx/door-watch/result";
    let events = "edgeact/fx/hot-call/events";
    let ask = |id: &str| {
        let req = serde_json::json!({"id": id, "text": "someone is waiting in the hall"});
        probe.publish("edgeact/fx/door-watch/request", req.to_string());
        label_of(&probe, results, id)
    };
    let sensor = |topic: &str, value: &str| {
        probe.publish(topic, value);
        // Context and requests are different topics: let the value land first.
        std::thread::sleep(Duration::from_millis(500));
    };
    // The same report, two readings of the alarm: two answers.
    sensor("site/temp", "21.5");
    sensor("site/alarm", "yes");
    assert_eq!(ask("a1"), "yes");
    sensor("site/alarm", "no");
    assert_eq!(ask("b1"), "no");
    // Three "yes" in the window, but the temperature is low: no incident.
    sensor("site/alarm", "yes");
    assert_eq!(ask("a2"), "yes");
    assert_eq!(ask("a3"), "yes");
    assert!(probe.on(events).is_empty(), "{:?}", probe.on(events));
    // The same classifications with a hot reading: one incident, showing the reading.
    sensor("site/temp", "82");
    assert_eq!(ask("a4"), "yes");
    probe.wait_for(60, "an incident", |g| g.iter().any(|m| m.topic == events));
    let inc = probe.on(events)[0].json();
    assert_eq!(inc["type"], "new", "{inc}");
    let ctx = &inc["after"]["context"];
    assert_eq!(ctx["value"], 82.0, "{inc}");
    assert_eq!(ctx["stale"], false, "{inc}");
    assert!(ctx["age_s"].as_f64().unwrap() < 600.0, "{inc}");
    let ids = inc["after"]["trigger_ids"].as_array().unwrap();
    assert!(ids.contains(&serde_json::json!("a4")), "{inc}");
    assert!(!ids.contains(&serde_json::json!("b1")), "{inc}");
}
