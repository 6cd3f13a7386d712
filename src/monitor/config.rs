//! The `[monitor]` section of a task file: its rules as written, their validation, and the
//! rules with times in ms the monitor runs.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::entities::EntityConfig;
use super::fusion::ContextCondition;
use super::MonitorError;
use crate::spec::Task;

/// What a rule compares with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdKind {
    /// Hits of the label in the window.
    Count,
    /// Hits per minute over the window.
    Rate,
    /// Hits over all messages of the key in the window (0..1).
    Share,
    /// z-score of the window's hits against the key's baseline of past windows.
    Jump,
}

/// How the baseline of a `jump` rule is kept (per key, over closed windows of `window_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaselineKind {
    /// Exponentially weighted mean and variance (`baseline_alpha`).
    #[default]
    Ewma,
    /// Plain mean and standard deviation of the last `baseline_windows` windows.
    Mean,
}

/// One rule as written in the task file (`[[monitor.rules]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule and its topic `<prefix>/<name>/events`.
    pub name: String,
    /// The label counted.
    pub label: String,
    /// Input field that splits the stream (such as `district`); absent: one stream.
    #[serde(default)]
    pub key: Option<String>,
    /// Length of the sliding window.
    pub window_s: f64,
    /// The window slides in steps of `window_s / window_slots`.
    #[serde(default = "default_window_slots")]
    pub window_slots: u32,
    pub kind: ThresholdKind,
    /// count: hits; rate: hits per minute; share: 0..1; jump: z-score.
    pub threshold: f64,
    /// Fewest hits in the window for any kind to fire.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
    #[serde(default)]
    pub baseline: BaselineKind,
    /// Weight of the newest window in the EWMA baseline.
    #[serde(default = "default_alpha")]
    pub baseline_alpha: f64,
    /// Windows kept by the `mean` baseline.
    #[serde(default = "default_baseline_windows")]
    pub baseline_windows: u32,
    /// A `jump` rule fires only after this many closed windows of baseline.
    #[serde(default = "default_min_baseline_windows")]
    pub min_baseline_windows: u32,
    /// Floor on the baseline's standard deviation (hits), so a silent key is not infinitely
    /// surprised by one message.
    #[serde(default = "default_min_std")]
    pub min_std: f64,
    /// An open incident publishes `update` at most this often (and only when it changed).
    #[serde(default = "default_update_interval_s")]
    pub update_interval_s: f64,
    /// The incident ends once the condition has been false this long (default `window_s`).
    #[serde(default)]
    pub quiet_s: Option<f64>,
    /// After an end, no new incident for the same key for this long.
    #[serde(default)]
    pub cooldown_s: f64,
    /// Classifications below this confidence are not hits (abstentions never are).
    #[serde(default)]
    pub min_confidence: f64,
    /// Keys kept at most; the least recently seen is evicted beyond.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Examples (highest confidence) in each incident message.
    #[serde(default = "default_max_examples")]
    pub max_examples: usize,
    /// Ids of triggering messages kept per incident (and recent hits kept per key).
    #[serde(default = "default_max_trigger_ids")]
    pub max_trigger_ids: usize,
    /// Fusion with a sensor: the rule fires only while this context reading holds (fresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextCondition>,
}

fn default_window_slots() -> u32 {
    20
}
fn default_min_count() -> u64 {
    1
}
fn default_alpha() -> f64 {
    0.2
}
fn default_baseline_windows() -> u32 {
    12
}
fn default_min_baseline_windows() -> u32 {
    3
}
fn default_min_std() -> f64 {
    1.0
}
fn default_update_interval_s() -> f64 {
    60.0
}
fn default_max_keys() -> usize {
    4096
}
fn default_max_examples() -> usize {
    3
}
fn default_max_trigger_ids() -> usize {
    10
}

/// Upper limits of the per-rule memory settings, so the worst case stays small and stated
/// (docs/monitor.md).
pub const LIMIT_MAX_KEYS: usize = 65_536;
pub const LIMIT_MAX_TRIGGER_IDS: usize = 100;
pub const LIMIT_MAX_EXAMPLES: usize = 20;
/// Upper limit of `max_key_bytes` and `max_id_bytes`.
pub const LIMIT_ID_BYTES: usize = 1024;

/// The `[monitor]` section of a task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Input field with the event time in Unix seconds (or any epoch behind it); absent in
    /// a message: the caller's clock.
    #[serde(default = "default_ts_field")]
    pub ts_field: String,
    /// Event times more than this many seconds ahead of the clock are refused: one of them
    /// (milliseconds sent as seconds, say) would move the stream's time far ahead for good,
    /// and every later message would count as late.
    #[serde(default = "default_max_future_s")]
    pub max_future_s: f64,
    /// A key value (such as a district or a ticker) longer than this is refused with an
    /// error record: keys are held in several copies per key, up to `max_keys` of them.
    #[serde(default = "default_id_bytes")]
    pub max_key_bytes: usize,
    /// A message id longer than this is refused likewise (ids are kept as evidence).
    #[serde(default = "default_id_bytes")]
    pub max_id_bytes: usize,
    /// Entities (companies, tickers) found in the text, for rules keyed by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<EntityConfig>,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

fn default_ts_field() -> String {
    "ts".into()
}
fn default_id_bytes() -> usize {
    128
}
fn default_max_future_s() -> f64 {
    300.0
}

/// A rule's memory settings within their limits and its context condition usable; else the
/// key and why.
fn bounds_and_context(r: &RuleConfig) -> Result<(), (&'static str, String)> {
    for (f, v, max) in [
        ("max_keys", r.max_keys, LIMIT_MAX_KEYS),
        ("max_trigger_ids", r.max_trigger_ids, LIMIT_MAX_TRIGGER_IDS),
        ("max_examples", r.max_examples, LIMIT_MAX_EXAMPLES),
    ] {
        let min = usize::from(f == "max_keys");
        if !(min..=max).contains(&v) {
            return Err((f, format!("{v} is not within {min}..={max}")));
        }
    }
    if let Some(c) = &r.context {
        c.check().map_err(|reason| ("context", reason))?;
    }
    Ok(())
}

/// A validated rule, times in ms.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) cfg: RuleConfig,
    pub(super) window_ms: i64,
    pub(super) slot_ms: i64,
    pub(super) quiet_ms: i64,
    pub(super) cooldown_ms: i64,
    pub(super) update_ms: i64,
    pub(super) hash: String,
}

impl MonitorConfig {
    /// The task's `[monitor]` section, validated; None when it has none.
    pub fn from_task(task: &Task) -> Result<Option<MonitorConfig>, MonitorError> {
        let Some(table) = &task.monitor else {
            return Ok(None);
        };
        let cfg: MonitorConfig =
            table
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| MonitorError::Invalid {
                    path: task.path.clone(),
                    key: "monitor".into(),
                    reason: e.to_string().trim().replace('\n', " "),
                })?;
        cfg.validate(&task.path, Some(task))?;
        Ok(Some(cfg))
    }

    /// Checks every rule; with `task`, also that each label is one of its labels.
    pub fn validate(&self, path: &Path, task: Option<&Task>) -> Result<(), MonitorError> {
        let invalid = |key: String, reason: String| MonitorError::Invalid {
            path: path.into(),
            key,
            reason,
        };
        if self.rules.is_empty() {
            return Err(invalid("monitor.rules".into(), "no rules".into()));
        }
        if !(self.max_future_s.is_finite() && self.max_future_s >= 0.0) {
            return Err(invalid(
                "monitor.max_future_s".into(),
                format!("{} must be a finite number >= 0", self.max_future_s),
            ));
        }
        for (key, v) in [
            ("max_key_bytes", self.max_key_bytes),
            ("max_id_bytes", self.max_id_bytes),
        ] {
            if !(1..=LIMIT_ID_BYTES).contains(&v) {
                return Err(invalid(
                    format!("monitor.{key}"),
                    format!("{v} is not within 1..={LIMIT_ID_BYTES}"),
                ));
            }
        }
        if let Some(e) = &self.entities {
            self.validate_entities(e, &invalid)?;
        }
        for (i, r) in self.rules.iter().enumerate() {
            let k = |f: &str| format!("monitor.rules[{i}].{f}");
            let ok_name = !r.name.is_empty()
                && r.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok_name {
                return Err(invalid(
                    k("name"),
                    format!(
                        "`{}` must be non-empty ASCII letters, digits, - or _ (it names a topic)",
                        r.name
                    ),
                ));
            }
            if self.rules[..i].iter().any(|o| o.name == r.name) {
                return Err(invalid(k("name"), format!("`{}` is used twice", r.name)));
            }
            if let Some(t) = task {
                if t.label_index(&r.label).is_none() {
                    return Err(invalid(
                        k("label"),
                        format!("`{}` is not one of the task's labels", r.label),
                    ));
                }
            }
            let positive = |f: &str, v: f64| {
                if v.is_finite() && v > 0.0 {
                    Ok(())
                } else {
                    Err(invalid(k(f), format!("{v} must be a finite number > 0")))
                }
            };
            let non_negative = |f: &str, v: f64| {
                if v.is_finite() && v >= 0.0 {
                    Ok(())
                } else {
                    Err(invalid(k(f), format!("{v} must be a finite number >= 0")))
                }
            };
            positive("window_s", r.window_s)?;
            positive("threshold", r.threshold)?;
            non_negative("update_interval_s", r.update_interval_s)?;
            non_negative("cooldown_s", r.cooldown_s)?;
            positive("min_std", r.min_std)?;
            if let Some(q) = r.quiet_s {
                non_negative("quiet_s", q)?;
            }
            if !(1..=1000).contains(&r.window_slots) {
                return Err(invalid(
                    k("window_slots"),
                    format!("{} is not within 1..=1000", r.window_slots),
                ));
            }
            if r.window_s * 1000.0 < r.window_slots as f64 {
                return Err(invalid(
                    k("window_slots"),
                    "a slot would be shorter than 1 ms".into(),
                ));
            }
            if !(r.baseline_alpha > 0.0 && r.baseline_alpha <= 1.0) {
                return Err(invalid(
                    k("baseline_alpha"),
                    format!("{} is not within (0, 1]", r.baseline_alpha),
                ));
            }
            if r.baseline_windows == 0 {
                return Err(invalid(k("baseline_windows"), "must be at least 1".into()));
            }
            if r.kind == ThresholdKind::Share && r.threshold > 1.0 {
                return Err(invalid(
                    k("threshold"),
                    format!("{} is a share: it must be within (0, 1]", r.threshold),
                ));
            }
            if !(0.0..=1.0).contains(&r.min_confidence) {
                return Err(invalid(
                    k("min_confidence"),
                    format!("{} is not within 0..=1", r.min_confidence),
                ));
            }
            bounds_and_context(r).map_err(|(f, reason)| invalid(k(f), reason))?;
        }
        Ok(())
    }

    fn validate_entities(
        &self,
        e: &EntityConfig,
        invalid: &dyn Fn(String, String) -> MonitorError,
    ) -> Result<(), MonitorError> {
        if !(1..=16).contains(&e.max_per_message) {
            return Err(invalid(
                "monitor.entities.max_per_message".into(),
                format!("{} is not within 1..=16", e.max_per_message),
            ));
        }
        for (key, names) in &e.names {
            if key.is_empty() || key.len() > self.max_key_bytes {
                return Err(invalid(
                    format!("monitor.entities.names.{key}"),
                    format!("a key must have 1..={} bytes", self.max_key_bytes),
                ));
            }
            if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) {
                return Err(invalid(
                    format!("monitor.entities.names.{key}"),
                    "needs at least one non-empty name".into(),
                ));
            }
        }
        Ok(())
    }

    /// The rules with their times in ms and the hash of their settings.
    pub(super) fn rules(&self) -> Vec<Rule> {
        self.rules
            .iter()
            .map(|c| {
                let ms = |s: f64| (s * 1000.0).round() as i64;
                let window_ms = ms(c.window_s).max(1);
                let mut h = Sha256::new();
                // A plain struct of numbers and strings: serializing cannot fail.
                h.update(serde_json::to_vec(c).unwrap_or_default());
                Rule {
                    cfg: c.clone(),
                    window_ms,
                    slot_ms: (window_ms / c.window_slots as i64).max(1),
                    quiet_ms: ms(c.quiet_s.unwrap_or(c.window_s)),
                    cooldown_ms: ms(c.cooldown_s),
                    update_ms: ms(c.update_interval_s),
                    hash: hex::encode(&h.finalize()[..8]),
                }
            })
            .collect()
    }
}
