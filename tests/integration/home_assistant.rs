//! Home Assistant and availability end to end on a real Mosquitto: a client that behaves as
//! Home Assistant's MQTT integration does (subscribes to `homeassistant/#`, reads the device
//! discovery config, then subscribes to the topics the config names) checks the config's
//! fields, that the state topic carries what the value template reads, and that the
//! availability it is told to follow says `offline` when the daemon is killed (the broker
//! publishes the last will), `online` after a restart, and not-available after a clean stop.

use crate::testkit::broker::Broker;
use crate::testkit::daemon::Daemon;
use crate::testkit::probe::{wait_online, Probe};

/// Home Assistant's abbreviations of the discovery keys this test reads
/// (homeassistant/components/mqtt/abbreviations.py).
const ABBREVIATIONS: [(&str, &str); 12] = [
    ("dev", "device"),
    ("o", "origin"),
    ("cmps", "components"),
    ("p", "platform"),
    ("uniq_id", "unique_id"),
    ("stat_t", "state_topic"),
    ("val_tpl", "value_template"),
    ("avty_t", "availability_topic"),
    ("pl_avail", "payload_available"),
    ("pl_not_avail", "payload_not_available"),
    ("avty_tpl", "availability_template"),
    ("json_attr_t", "json_attributes_topic"),
];
const DEVICE_ABBREVIATIONS: [(&str, &str); 4] = [
    ("ids", "identifiers"),
    ("mf", "manufacturer"),
    ("sw", "sw_version"),
    ("name", "name"),
];

/// A discovery object with the abbreviations expanded, as Home Assistant reads it.
fn expand(
    v: &serde_json::Value,
    table: &[(&str, &str)],
) -> serde_json::Map<String, serde_json::Value> {
    let obj = v.as_object().expect("a JSON object");
    obj.iter()
        .map(|(k, v)| {
            let full = table
                .iter()
                .find(|(a, _)| a == k)
                .map_or(k.as_str(), |(_, f)| f);
            (full.to_string(), v.clone())
        })
        .collect()
}

/// The value a `{{ value_json.a.b }}` template gives for a JSON payload (the only form a
/// state template here may take; anything else fails the test).
fn render_value_json(template: &str, payload: &serde_json::Value) -> serde_json::Value {
    let path = template
        .trim()
        .strip_prefix("{{")
        .and_then(|t| t.strip_suffix("}}"))
        .map(str::trim)
        .and_then(|t| t.strip_prefix("value_json."))
        .unwrap_or_else(|| panic!("value_template {template:?} is not `{{{{ value_json.x }}}}`"));
    path.split('.')
        .fold(payload.clone(), |v, key| v[key].clone())
}

/// The value an `{{ 'A' if value == 'B' else 'C' }}` availability template gives.
fn render_availability(template: &str, value: &str) -> String {
    let re = regex::Regex::new(
        r"^\{\{\s*'([^']*)'\s+if\s+value\s*==\s*'([^']*)'\s+else\s+'([^']*)'\s*\}\}$",
    )
    .unwrap();
    let c = re
        .captures(template.trim())
        .unwrap_or_else(|| panic!("availability_template {template:?} has an unexpected form"));
    if value == &c[2] {
        c[1].to_string()
    } else {
        c[3].to_string()
    }
}

/// What Home Assistant would make of `payload` on the availability topic: Some(true)
/// available, Some(false) not available, None ignored.
fn availability(root: &serde_json::Map<String, serde_json::Value>, payload: &str) -> Option<bool> {
    let value = match root.get("availability_template").and_then(|t| t.as_str()) {
        Some(t) => render_availability(t, payload),
        None => payload.to_string(),
    };
    let on = root
        .get("payload_available")
        .and_then(|v| v.as_str())
        .unwrap_or("online");
    let off = root
        .get("payload_not_available")
        .and_then(|v| v.as_str())
        .unwrap_or("offline");
    if value == on {
        Some(true)
    } else if value == off {
        Some(false)
    } else {
        None
    }
}

#[test]
fn home_assistant_discovery_state_and_availability_across_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let ha = Probe::connect(broker.port, "homeassistant-test", &["homeassistant/#"]);
    // A classification task (has a state) and a ranking task (has none).
    let args = [
        "--ha-discovery",
        "true",
        "--task",
        "sentiment",
        "--task",
        "rank-interest",
    ];
    let mut daemon = Daemon::start(&broker, "ha1", dir.path(), &args);
    let config_topic = "homeassistant/device/ha1/config";
    ha.wait_for(120, "the discovery config", |g| {
        g.iter().any(|m| m.topic == config_topic)
    });
    let got = ha.on(config_topic).pop().unwrap();
    let root = expand(&got.json(), &ABBREVIATIONS);

    // Device: identifiers and a name; origin: a name (required for device discovery).
    let device = expand(&root["device"], &DEVICE_ABBREVIATIONS);
    let ids = &device["identifiers"];
    assert!(
        ids.as_str().is_some_and(|s| !s.is_empty())
            || ids.as_array().is_some_and(|a| !a.is_empty()),
        "device identifiers: {ids}"
    );
    assert!(device["name"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(root["origin"]["name"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    // Availability: the daemon's topic and Home Assistant's payloads.
    let avail_topic = root["availability_topic"].as_str().unwrap().to_string();
    assert_eq!(avail_topic, "edgeact/ha1/available");
    assert_eq!(availability(&root, "online"), Some(true));
    assert_eq!(availability(&root, "offline"), Some(false));

    // One sensor, for the classification task only (a ranking publishes no state).
    let cmps = root["components"].as_object().unwrap();
    assert_eq!(cmps.len(), 1, "{cmps:?}");
    let (_, cmp) = cmps.iter().next().unwrap();
    let cmp = expand(cmp, &ABBREVIATIONS);
    assert_eq!(cmp["platform"], "sensor");
    let unique_id = cmp["unique_id"].as_str().unwrap();
    assert!(
        unique_id.contains("ha1") && unique_id.contains("sentiment"),
        "{unique_id}"
    );
    let state_topic = cmp["state_topic"].as_str().unwrap().to_string();
    assert_eq!(state_topic, "edgeact/ha1/sentiment/state");
    let template = cmp["value_template"].as_str().unwrap().to_string();

    // As Home Assistant does after discovery: subscribe to what the config names.
    let entity = Probe::connect(
        broker.port,
        "homeassistant-entity",
        &[&state_topic, &avail_topic, "edgeact/ha1/sentiment/result"],
    );
    wait_online(&entity, "edgeact/ha1");
    entity.publish(
        "edgeact/ha1/sentiment/request",
        r#"{"id":"h1","text":"The staff were kind and the food was great"}"#,
    );
    entity.wait_for(120, "the state after a result", |g| {
        g.iter().any(|m| m.topic == state_topic)
    });
    let state = entity.on(&state_topic).pop().unwrap();
    // Home Assistant restarting later still finds the device and the latest state: both
    // retained (a subscriber that was already there gets them without the retain flag).
    let late = Probe::connect(
        broker.port,
        "homeassistant-late",
        &[config_topic, &state_topic],
    );
    late.wait_for(30, "the retained config and state", |g| {
        g.iter().any(|m| m.topic == config_topic && m.retain)
            && g.iter().any(|m| m.topic == state_topic && m.retain)
    });
    let shown = render_value_json(&template, &state.json());
    let result = entity
        .on("edgeact/ha1/sentiment/result")
        .pop()
        .unwrap()
        .json();
    assert_eq!(
        shown, result["label"],
        "the sensor shows the result's label"
    );
    assert!(
        ["positive", "negative"].contains(&shown.as_str().unwrap_or_default()),
        "{shown}"
    );
    if let Some(attrs) = cmp.get("json_attributes_topic") {
        assert_eq!(attrs.as_str(), Some(state_topic.as_str()));
        assert!(state.json().is_object(), "attributes are a JSON object");
    }

    // kill -9: the broker publishes the last will.
    let seen = entity.on(&avail_topic).len();
    daemon.kill9();
    entity.wait_for(30, "offline (the last will) after kill -9", |g| {
        g.iter()
            .filter(|m| m.topic == avail_topic)
            .skip(seen)
            .any(|m| m.payload == b"offline")
    });
    assert_eq!(availability(&root, "offline"), Some(false));

    // A restart says online again.
    let seen = entity.on(&avail_topic).len();
    let mut daemon = Daemon::start(&broker, "ha1", dir.path(), &args);
    entity.wait_for(120, "online after the restart", |g| {
        g.iter()
            .filter(|m| m.topic == avail_topic)
            .skip(seen)
            .any(|m| m.payload == b"online")
    });

    // A clean stop says `stopped`, which Home Assistant must read as not available.
    let seen = entity.on(&avail_topic).len();
    assert!(daemon.terminate().success(), "{}", daemon.log());
    entity.wait_for(30, "stopped after a clean stop", |g| {
        g.iter()
            .filter(|m| m.topic == avail_topic)
            .skip(seen)
            .any(|m| m.payload == b"stopped")
    });
    assert_eq!(
        availability(&root, "stopped"),
        Some(false),
        "Home Assistant would ignore `stopped` and keep the sensor available"
    );
}
