//! Replaying a stream through a task's monitor rules (`edgeact monitor`, whose run is in
//! the command layer; the daemon uses the same pieces): a message's event time, its
//! observation, an incident message as a JSON line.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{MonitorEvent, Observation};
use crate::classify::Request;

/// Event time of a message in ms: the `ts_field` in seconds (a number or a numeric string).
pub fn event_time_ms(fields: &BTreeMap<String, String>, ts_field: &str) -> Option<i64> {
    let s: f64 = fields.get(ts_field)?.trim().parse().ok()?;
    s.is_finite().then(|| (s * 1000.0).round() as i64)
}

/// An observation from a request and its classification.
pub fn observation(
    req: &Request,
    label: Option<String>,
    confidence: f64,
    ts_ms: i64,
) -> Observation {
    Observation {
        id: req.id.clone(),
        ts_ms,
        label,
        confidence,
        fields: req.fields.clone(),
    }
}

/// An incident message as one JSON line of `edgeact monitor`: the payload plus `rule`.
pub fn event_line(e: &MonitorEvent) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    v["rule"] = json!(e.rule);
    v
}
