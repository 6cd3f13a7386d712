//! The incident lifecycle of a rule: one observation counted for its key, an incident
//! opened when the rule fires (`new`), updated while it has new hits (`update`), ended when
//! quiet or evicted (`end`), and the JSON snapshot each message carries.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::{Rule, RuleConfig};
use super::fusion;
use super::state::RuleState;
use super::window::{measure, KeyState, Measure};
use super::{EventType, MonitorEvent, Observation};

/// A hit kept as evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Example {
    pub(super) id: String,
    pub(super) ts_ms: i64,
    pub(super) confidence: f64,
    pub(super) text: String,
}

/// Longest example text kept, in bytes (cut at a character boundary): texts are the bulk of
/// what a key holds.
pub(super) const EXAMPLE_BYTES: usize = 160;

/// `text` cut to at most `max` bytes at a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// An open incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Incident {
    pub(super) id: String,
    pub(super) start_ts_ms: i64,
    /// Last time the condition held.
    pub(super) last_true_ms: i64,
    pub(super) last_emit_ms: i64,
    pub(super) hits_at_last_emit: u64,
    /// Hits since the incident opened (the window at the start included).
    pub(super) hits: u64,
    pub(super) peak_value: f64,
    pub(super) peak_count: u64,
    pub(super) trigger_ids: Vec<String>,
    pub(super) examples: Vec<Example>,
    pub(super) updates: u64,
    /// The snapshot last published: `before` of the next message.
    pub(super) last_published: Value,
}

/// Feeds one observation to one rule under one of its keys: finds (or makes room for) the
/// key, counts it in the key's window, and opens or updates the key's incident.
pub(super) fn observe_rule(
    rule: &Rule,
    rs: &mut RuleState,
    obs: &Observation,
    key: &str,
    now: i64,
    out: &mut Vec<MonitorEvent>,
) {
    let c = &rule.cfg;
    rs.counters.observations += 1;
    rs.touch(rule, key, now, out);
    // Inserted by `touch` when it was missing.
    let Some(ks) = rs.keys.get_mut(key) else {
        return;
    };
    if let Some(cond) = &c.context {
        // The newest reading the key's messages carried (a message without one keeps it).
        if obs.fields.contains_key(&cond.field) && ks.context.is_none_or(|r| r.at_ms <= obs.ts_ms) {
            ks.context = Some(fusion::read(cond, &obs.fields, obs.ts_ms));
        }
    }

    let hit = obs.label.as_deref() == Some(c.label.as_str()) && obs.confidence >= c.min_confidence;
    if !ks.add(rule, now, obs.ts_ms, hit) {
        rs.counters.late += 1;
        return;
    }
    if hit {
        rs.counters.hits += 1;
        record_hit(c, ks, obs);
    }
    let m = measure(rule, ks, now);
    match ks.incident.as_mut() {
        None => {
            if m.firing && now >= ks.cooldown_until_ms {
                out.push(open_incident(rule, key, ks, &m, now));
                rs.open.insert(key.to_string());
                rs.counters.incidents += 1;
            }
        }
        Some(inc) => out.extend(update_incident(rule, key, inc, &m, now)),
    }
}

/// Keeps a hit as evidence: among the key's recent hits, and in its open incident.
fn record_hit(c: &RuleConfig, ks: &mut KeyState, obs: &Observation) {
    let ex = Example {
        id: obs.id.clone(),
        ts_ms: obs.ts_ms,
        confidence: round4(obs.confidence),
        text: obs
            .fields
            .get("text")
            .map(|t| cut(t, EXAMPLE_BYTES))
            .unwrap_or_default(),
    };
    ks.recent.push_back(ex.clone());
    while ks.recent.len() > c.max_trigger_ids {
        ks.recent.pop_front();
    }
    if let Some(inc) = ks.incident.as_mut() {
        inc.hits += 1;
        if inc.trigger_ids.len() < c.max_trigger_ids {
            inc.trigger_ids.push(ex.id.clone());
        }
        keep_top(&mut inc.examples, ex, c.max_examples);
    }
}

/// Opens an incident on `key` (firing, out of cooldown) with the hits of the window as its
/// evidence; returns its `new` message.
fn open_incident(rule: &Rule, key: &str, ks: &mut KeyState, m: &Measure, now: i64) -> MonitorEvent {
    let c = &rule.cfg;
    let window_start = now.saturating_sub(rule.window_ms);
    let in_window: Vec<&Example> = ks
        .recent
        .iter()
        .filter(|e| e.ts_ms > window_start)
        .collect();
    let mut examples = Vec::new();
    for e in &in_window {
        keep_top(&mut examples, (*e).clone(), c.max_examples);
    }
    let mut inc = Incident {
        id: format!("{}:{}:{}", c.name, key, now),
        start_ts_ms: now,
        last_true_ms: now,
        last_emit_ms: now,
        hits_at_last_emit: m.count,
        hits: m.count,
        peak_value: m.value,
        peak_count: m.count,
        trigger_ids: in_window.iter().map(|e| e.id.clone()).collect(),
        examples,
        updates: 0,
        last_published: Value::Null,
    };
    let after = snapshot(rule, key, &inc, m, now, None);
    inc.last_published = after.clone();
    ks.incident = Some(inc);
    MonitorEvent {
        rule: c.name.clone(),
        kind: EventType::New,
        before: None,
        after,
    }
}

/// Tracks an open incident's peak and last firing time; an `update` message when it got
/// new hits and the last message is at least `update_interval_s` old.
fn update_incident(
    rule: &Rule,
    key: &str,
    inc: &mut Incident,
    m: &Measure,
    now: i64,
) -> Option<MonitorEvent> {
    if m.firing {
        inc.last_true_ms = now;
    }
    if m.value > inc.peak_value {
        inc.peak_value = m.value;
    }
    inc.peak_count = inc.peak_count.max(m.count);
    let changed = inc.hits != inc.hits_at_last_emit;
    if !(changed && now.saturating_sub(inc.last_emit_ms) >= rule.update_ms) {
        return None;
    }
    inc.updates += 1;
    inc.last_emit_ms = now;
    inc.hits_at_last_emit = inc.hits;
    let after = snapshot(rule, key, inc, m, now, None);
    let before = std::mem::replace(&mut inc.last_published, after.clone());
    Some(MonitorEvent {
        rule: rule.cfg.name.clone(),
        kind: EventType::Update,
        before: Some(before),
        after,
    })
}

/// Keeps the `max` examples of highest confidence (earliest first among equals).
fn keep_top(examples: &mut Vec<Example>, ex: Example, max: usize) {
    if max == 0 || examples.iter().any(|e| e.id == ex.id) {
        return;
    }
    examples.push(ex);
    examples.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then(a.ts_ms.cmp(&b.ts_ms))
    });
    examples.truncate(max);
}

pub(super) fn end_incident(
    rule: &Rule,
    key: &str,
    ks: &mut KeyState,
    m: &Measure,
    now: i64,
    reason: &str,
) -> MonitorEvent {
    // Callers check that an incident is open.
    let inc = ks.incident.take();
    ks.cooldown_until_ms = now.saturating_add(rule.cooldown_ms);
    let (before, after) = match inc {
        Some(inc) => (
            Some(inc.last_published.clone()),
            snapshot(rule, key, &inc, m, now, Some(reason)),
        ),
        None => (None, Value::Null),
    };
    MonitorEvent {
        rule: rule.cfg.name.clone(),
        kind: EventType::End,
        before,
        after,
    }
}

/// The incident as published: what fired, since when, and the evidence.
fn snapshot(
    rule: &Rule,
    key: &str,
    inc: &Incident,
    m: &Measure,
    now: i64,
    end_reason: Option<&str>,
) -> Value {
    let c = &rule.cfg;
    let s = |ms: i64| round4(ms as f64 / 1000.0);
    json!({
        "id": inc.id,
        "rule": c.name,
        "label": c.label,
        "key_field": c.key,
        "key": key,
        "kind": c.kind,
        "threshold": c.threshold,
        "min_count": c.min_count,
        "start_ts": s(inc.start_ts_ms),
        "ts": s(now),
        "last_active_ts": s(inc.last_true_ms),
        "end_ts": end_reason.map(|_| s(now)),
        "end_reason": end_reason,
        "window_s": c.window_s,
        "window": {
            "count": m.count,
            "total": m.total,
            "share": if m.total == 0 { 0.0 } else { round4(m.count as f64 / m.total as f64) },
            "rate_per_min": round4(m.count as f64 * 60_000.0 / rule.window_ms as f64),
        },
        "value": round4(m.value),
        "peak_value": round4(inc.peak_value),
        "peak_count": inc.peak_count,
        "baseline": {
            "kind": c.baseline,
            "mean": round4(m.mean),
            "std": round4(m.std),
            "windows": m.windows,
        },
        "z": m.z.map(round4),
        "context": c.context.as_ref().zip(m.context.as_ref()).map(|(cond, s)| s.to_json(cond)),
        "hits": inc.hits,
        "updates": inc.updates,
        "trigger_ids": inc.trigger_ids,
        "top_examples": inc.examples.iter().map(|e| json!({
            "id": e.id, "ts": s(e.ts_ms), "confidence": e.confidence, "text": e.text,
        })).collect::<Vec<_>>(),
    })
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
