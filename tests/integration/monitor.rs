//! The monitor on a replayed stream built from the disaster-messages data set
//! (scripts/fetch-data): a flat background of mixed event types over eight districts, then
//! fires surge in one district for 30 minutes and stop. The shipped `city-event` rules are
//! used. The classifier's output is the data set's gold label here: the monitor is
//! downstream of classification, and this isolates it (no model needed).

use std::process::Command;

use edgeact::monitor::replay::{event_line, event_time_ms, observation};
use edgeact::monitor::{EventType, Monitor, MonitorConfig, MonitorEvent};
use edgeact::spec::Task;
use serde_json::Value;

use crate::testkit;
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
    let out = Command::new(testkit::bin())
        .current_dir(testkit::root())
        .args([
            "monitor",
            "--task",
            "city-event",
            "--label-field",
            "label",
            "--data",
        ])
        .arg(&data)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
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
    let out = Command::new(testkit::bin())
        .current_dir(testkit::root())
        .args([
            "monitor",
            "--task",
            "sentiment",
            "--label-field",
            "label",
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[monitor]"));
}
