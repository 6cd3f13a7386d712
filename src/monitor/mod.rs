//! Monitoring: turns a stream of classifications into incidents. Rules from a task file's
//! `[monitor]` section count a label per key (a field of the input such as `district`) in
//! a sliding window of event time, compare the count (or its share, rate, or jump against
//! the key's own baseline) with a threshold, and run one incident per burst through
//! `new` / `update` / `end` with its evidence. Pure logic: no I/O except [`Monitor::save`]
//! and [`Monitor::restore`], which persist the state atomically.
//!
//! Memory is bounded in bytes whatever the stream: each rule keeps at most `max_keys` keys
//! and evicts the least recently seen one (counted); each key keeps `window_slots` counters
//! and a ring of `max_trigger_ids` recent hits; keys and message ids longer than
//! `max_key_bytes` / `max_id_bytes` are refused. [`MonitorConfig::worst_case_bytes`] states
//! the bound (docs/monitor.md).
//!
//! The pieces: `config` (the `[monitor]` section and its validation), [`entities`] (the
//! companies or tickers a text is about, as keys), [`fusion`] (a sensor reading a rule also
//! requires), `window` (per key: the sliding window, the baseline, what a rule measures),
//! `incident` (the `new` / `update` / `end` lifecycle and its messages), `state` (what
//! survives a restart, LRU-bounded keys, save and restore), `memory` (the bound), and
//! [`replay`] (a stream through it).

mod config;
pub mod entities;
pub mod fusion;
mod incident;
mod memory;
pub mod replay;
mod state;
mod window;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use config::{BaselineKind, MonitorConfig, RuleConfig, ThresholdKind};
pub use entities::EntityConfig;
pub use fusion::ContextCondition;
pub use state::{Restored, RuleCounters};

use config::Rule;
use incident::{end_incident, observe_rule};
use state::{RuleState, State, STATE_FORMAT};
use window::measure;

/// Why rules or state could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("task file {path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("monitor state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An event time too far ahead of the clock: refused, the monitor is left as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "event time `{ts_field}` is {ahead_s:.0} s ahead of this device's clock, more than \
     max_future_s = {max_future_s}; it is not counted by the alert rules (event times are Unix \
     seconds: milliseconds sent?)"
)]
pub struct FutureEvent {
    pub ts_field: String,
    pub ahead_s: f64,
    pub max_future_s: f64,
}

/// Why the alert rules did not count a message (the classification itself stands).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    FutureTs(#[from] FutureEvent),
    #[error(
        "message id of {len} bytes is longer than max_id_bytes = {max}; it is not counted by \
         the alert rules"
    )]
    IdTooLong { len: usize, max: usize },
    #[error(
        "key `{field}` of {len} bytes is longer than max_key_bytes = {max}; the message is not \
         counted by the alert rules"
    )]
    KeyTooLong {
        field: String,
        len: usize,
        max: usize,
    },
}

impl Refused {
    /// The `error.kind` of its error record.
    pub fn kind(&self) -> &'static str {
        match self {
            Refused::FutureTs(_) => "future_ts",
            Refused::IdTooLong { .. } => "monitor_id_too_long",
            Refused::KeyTooLong { .. } => "monitor_key_too_long",
        }
    }
}

/// One classified message, as the monitor sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub id: String,
    /// Event time in ms.
    pub ts_ms: i64,
    /// None when the classifier abstained.
    pub label: Option<String>,
    pub confidence: f64,
    /// Input fields (keys such as `district`, and `text` for examples).
    pub fields: BTreeMap<String, String>,
}

/// Incident lifecycle, Frigate-style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    New,
    Update,
    End,
}

/// One message for `<prefix>/<rule>/events`: `{"type", "before", "after"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonitorEvent {
    #[serde(skip)]
    pub rule: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The incident as last published (null for `new`).
    pub before: Option<Value>,
    pub after: Value,
}

impl MonitorEvent {
    /// The topic under a device prefix.
    pub fn topic(&self, prefix: &str) -> String {
        events_topic(prefix, &self.rule)
    }

    /// The JSON payload.
    pub fn payload(&self) -> String {
        // Value and plain fields: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The incident id.
    pub fn incident_id(&self) -> &str {
        self.after["id"].as_str().unwrap_or_default()
    }
}

/// `<prefix>/<rule>/events`.
pub fn events_topic(prefix: &str, rule: &str) -> String {
    format!("{prefix}/{rule}/events")
}

/// The monitor: rules and their state.
#[derive(Debug, Clone)]
pub struct Monitor {
    rules: Vec<Rule>,
    state: State,
    ts_field: String,
    max_future_s: f64,
    max_key_bytes: usize,
    max_id_bytes: usize,
    entities: Option<EntityConfig>,
}

impl Monitor {
    pub fn new(cfg: &MonitorConfig) -> Monitor {
        let rules = cfg.rules();
        let mut state = State {
            format: STATE_FORMAT,
            ..State::default()
        };
        for r in &rules {
            state.rules.insert(
                r.cfg.name.clone(),
                RuleState {
                    config_hash: r.hash.clone(),
                    ..RuleState::default()
                },
            );
        }
        Monitor {
            rules,
            state,
            ts_field: cfg.ts_field.clone(),
            max_future_s: cfg.max_future_s,
            max_key_bytes: cfg.max_key_bytes,
            max_id_bytes: cfg.max_id_bytes,
            entities: cfg.entities.clone(),
        }
    }

    /// Highest event time seen, in ms.
    pub fn watermark_ms(&self) -> Option<i64> {
        self.state.watermark_ms
    }

    pub fn counters(&self, rule: &str) -> Option<&RuleCounters> {
        self.state.rules.get(rule).map(|r| &r.counters)
    }

    /// Keys currently held by a rule.
    pub fn keys(&self, rule: &str) -> usize {
        self.state.rules.get(rule).map_or(0, |r| r.keys.len())
    }

    /// Ids of the open incidents, by rule.
    pub fn open_incidents(&self) -> Vec<String> {
        self.state
            .rules
            .values()
            .flat_map(|r| r.keys.values())
            .filter_map(|k| k.incident.as_ref().map(|i| i.id.clone()))
            .collect()
    }

    /// Refuses an event time more than `max_future_s` ahead of `clock_ms` (the wall clock):
    /// the stream's time only moves forward, so one such time would make every later
    /// message late.
    pub fn check_time(&self, ts_ms: i64, clock_ms: i64) -> Result<(), FutureEvent> {
        let limit = clock_ms.saturating_add((self.max_future_s * 1000.0) as i64);
        if ts_ms <= limit {
            return Ok(());
        }
        Err(FutureEvent {
            ts_field: self.ts_field.clone(),
            ahead_s: ts_ms.saturating_sub(clock_ms) as f64 / 1000.0,
            max_future_s: self.max_future_s,
        })
    }

    /// The keys of `obs` for each rule (None: the rule's key field is missing): the field's
    /// value, else for the entity key the entities found in the text.
    fn keys_of(&self, obs: &Observation) -> Vec<Option<Vec<String>>> {
        let mut found: Option<Vec<String>> = None;
        self.rules
            .iter()
            .map(|rule| {
                let Some(f) = &rule.cfg.key else {
                    return Some(vec!["*".to_string()]);
                };
                if let Some(v) = obs.fields.get(f) {
                    return Some(vec![v.clone()]);
                }
                let e = self.entities.as_ref().filter(|e| e.key == *f)?;
                let keys = found.get_or_insert_with(|| {
                    obs.fields
                        .get(&e.from)
                        .map_or_else(Vec::new, |t| entities::extract(e, t))
                });
                (!keys.is_empty()).then(|| keys.clone())
            })
            .collect()
    }

    /// Feeds one classification, unless its event time is too far ahead of `clock_ms` (see
    /// [`Monitor::check_time`]) or its id or a key is too long; returns the incident
    /// messages it caused (and those of incidents elsewhere that went quiet by its time).
    /// A refused message changes nothing.
    pub fn observe(
        &mut self,
        obs: &Observation,
        clock_ms: i64,
    ) -> Result<Vec<MonitorEvent>, Refused> {
        self.check_time(obs.ts_ms, clock_ms)?;
        if obs.id.len() > self.max_id_bytes {
            return Err(Refused::IdTooLong {
                len: obs.id.len(),
                max: self.max_id_bytes,
            });
        }
        let keys = self.keys_of(obs);
        for (rule, ks) in self.rules.iter().zip(&keys) {
            if let Some(long) = ks.iter().flatten().find(|k| k.len() > self.max_key_bytes) {
                return Err(Refused::KeyTooLong {
                    field: rule.cfg.key.clone().unwrap_or_default(),
                    len: long.len(),
                    max: self.max_key_bytes,
                });
            }
        }
        let now = self
            .state
            .watermark_ms
            .map_or(obs.ts_ms, |w| w.max(obs.ts_ms));
        self.state.watermark_ms = Some(now);
        let mut out = Vec::new();
        for (rule, keys) in self.rules.iter().zip(keys) {
            // Created in `new` / `restore` for every rule.
            let Some(rs) = self.state.rules.get_mut(&rule.cfg.name) else {
                continue;
            };
            let Some(keys) = keys else {
                rs.counters.missing_key += 1;
                continue;
            };
            for key in keys {
                observe_rule(rule, rs, obs, &key, now, &mut out);
            }
        }
        out.extend(self.advance_to(now));
        Ok(out)
    }

    /// Moves time on to `now_ms` (the event time of the stream, or a clock when the stream
    /// is idle) and ends the incidents quiet for `quiet_s`.
    pub fn advance_to(&mut self, now_ms: i64) -> Vec<MonitorEvent> {
        let now = self.state.watermark_ms.map_or(now_ms, |w| w.max(now_ms));
        self.state.watermark_ms = Some(now);
        let mut out = Vec::new();
        for rule in &self.rules {
            let Some(rs) = self.state.rules.get_mut(&rule.cfg.name) else {
                continue;
            };
            let open: Vec<String> = rs.open.iter().cloned().collect();
            for key in open {
                let Some(ks) = rs.keys.get_mut(&key) else {
                    rs.open.remove(&key);
                    continue;
                };
                let m = measure(rule, ks, now);
                if let Some(inc) = ks.incident.as_mut() {
                    if m.firing {
                        inc.last_true_ms = now;
                    } else if now.saturating_sub(inc.last_true_ms) >= rule.quiet_ms {
                        out.push(end_incident(rule, &key, ks, &m, now, "quiet"));
                        rs.open.remove(&key);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
