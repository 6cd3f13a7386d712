//! Monitoring: turns a stream of classifications into incidents. Rules from a task file's
//! `[monitor]` section count a label per key (a field of the input such as `district`) in
//! a sliding window of event time, compare the count (or its share, rate, or jump against
//! the key's own baseline) with a threshold, and run one incident per burst through
//! `new` / `update` / `end` with its evidence. Pure logic: no I/O except [`Monitor::save`]
//! and [`Monitor::restore`], which persist the state atomically.
//!
//! Memory is bounded whatever the key cardinality: each rule keeps at most `max_keys` keys
//! and evicts the least recently seen one (counted); each key keeps `window_slots` counters
//! and a ring of `max_trigger_ids` recent hits.

pub mod replay;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::spec::Task;

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

/// The `[monitor]` section of a task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Input field with the event time in seconds (Unix or any epoch); absent in a message:
    /// the caller's clock.
    #[serde(default = "default_ts_field")]
    pub ts_field: String,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

fn default_ts_field() -> String {
    "ts".into()
}

/// A validated rule, times in ms.
#[derive(Debug, Clone)]
struct Rule {
    cfg: RuleConfig,
    window_ms: i64,
    slot_ms: i64,
    quiet_ms: i64,
    cooldown_ms: i64,
    update_ms: i64,
    hash: String,
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
            if r.max_keys == 0 {
                return Err(invalid(k("max_keys"), "must be at least 1".into()));
            }
        }
        Ok(())
    }

    fn rules(&self) -> Vec<Rule> {
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

/// A hit kept as evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Example {
    id: String,
    ts_ms: i64,
    confidence: f64,
    text: String,
}

const EXAMPLE_CHARS: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Slot {
    index: i64,
    hits: u64,
    total: u64,
}

/// Baseline of hits per closed window of `window_s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Baseline {
    /// Index (ts / window) of the window being counted.
    bucket: Option<i64>,
    bucket_hits: u64,
    windows: u64,
    mean: f64,
    var: f64,
    /// Last windows (the `mean` kind only).
    history: VecDeque<f64>,
}

impl Baseline {
    fn push(&mut self, rule: &RuleConfig, x: f64) {
        self.windows += 1;
        match rule.baseline {
            BaselineKind::Ewma => {
                if self.windows == 1 {
                    self.mean = x;
                    self.var = 0.0;
                } else {
                    // Exponentially weighted mean and variance (West 1979 / Finch 2009).
                    let a = rule.baseline_alpha;
                    let d = x - self.mean;
                    self.mean += a * d;
                    self.var = (1.0 - a) * (self.var + a * d * d);
                }
            }
            BaselineKind::Mean => {
                self.history.push_back(x);
                while self.history.len() > rule.baseline_windows as usize {
                    self.history.pop_front();
                }
                let n = self.history.len() as f64;
                self.mean = self.history.iter().sum::<f64>() / n;
                self.var = self
                    .history
                    .iter()
                    .map(|v| (v - self.mean).powi(2))
                    .sum::<f64>()
                    / n;
            }
        }
    }

    /// Closes windows before `bucket`; `learn` false (an incident is open) keeps the
    /// baseline as it was, so a surge is not learnt as normal.
    fn roll_to(&mut self, rule: &RuleConfig, bucket: i64, learn: bool) {
        let Some(cur) = self.bucket else {
            self.bucket = Some(bucket);
            return;
        };
        if bucket <= cur {
            return;
        }
        if learn {
            self.push(rule, self.bucket_hits as f64);
            // Empty windows in between; past a few hundred the baseline has forgotten
            // everything anyway.
            let gap = (bucket - cur - 1).min(256);
            for _ in 0..gap {
                self.push(rule, 0.0);
            }
        }
        self.bucket = Some(bucket);
        self.bucket_hits = 0;
    }

    fn std(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }
}

/// An open incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Incident {
    id: String,
    start_ts_ms: i64,
    /// Last time the condition held.
    last_true_ms: i64,
    last_emit_ms: i64,
    hits_at_last_emit: u64,
    /// Hits since the incident opened (the window at the start included).
    hits: u64,
    peak_value: f64,
    peak_count: u64,
    trigger_ids: Vec<String>,
    examples: Vec<Example>,
    updates: u64,
    /// The snapshot last published: `before` of the next message.
    last_published: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyState {
    /// LRU clock value of the last observation.
    seen: u64,
    slots: VecDeque<Slot>,
    baseline: Baseline,
    /// Recent hits, newest last (at most `max_trigger_ids`).
    recent: VecDeque<Example>,
    incident: Option<Incident>,
    cooldown_until_ms: i64,
}

impl KeyState {
    fn new() -> KeyState {
        KeyState {
            seen: 0,
            slots: VecDeque::new(),
            baseline: Baseline::default(),
            recent: VecDeque::new(),
            incident: None,
            cooldown_until_ms: i64::MIN,
        }
    }

    /// Drops slots that left the window ending at `now_ms`.
    fn prune(&mut self, rule: &Rule, now_ms: i64) {
        let first = now_ms.div_euclid(rule.slot_ms) - rule.cfg.window_slots as i64 + 1;
        while self.slots.front().is_some_and(|s| s.index < first) {
            self.slots.pop_front();
        }
    }

    /// Counts one message; false when it is older than the window (late, ignored).
    fn add(&mut self, rule: &Rule, now_ms: i64, ts_ms: i64, hit: bool) -> bool {
        let idx = ts_ms.div_euclid(rule.slot_ms);
        let first = now_ms.div_euclid(rule.slot_ms) - rule.cfg.window_slots as i64 + 1;
        if idx < first {
            return false;
        }
        let pos = self.slots.iter().position(|s| s.index >= idx);
        let slot = match pos {
            Some(p) if self.slots[p].index == idx => &mut self.slots[p],
            Some(p) => {
                self.slots.insert(
                    p,
                    Slot {
                        index: idx,
                        hits: 0,
                        total: 0,
                    },
                );
                &mut self.slots[p]
            }
            None => {
                self.slots.push_back(Slot {
                    index: idx,
                    hits: 0,
                    total: 0,
                });
                let last = self.slots.len() - 1;
                &mut self.slots[last]
            }
        };
        slot.total += 1;
        if hit {
            slot.hits += 1;
            let b = ts_ms.div_euclid(rule.window_ms);
            if self.baseline.bucket.is_none_or(|cur| b >= cur) {
                self.baseline.roll_to(&rule.cfg, b, self.incident.is_none());
                self.baseline.bucket_hits += 1;
            }
        }
        true
    }
}

/// What a rule measured for one key at one time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Measure {
    count: u64,
    total: u64,
    value: f64,
    mean: f64,
    std: f64,
    windows: u64,
    z: Option<f64>,
    firing: bool,
}

fn measure(rule: &Rule, ks: &mut KeyState, now_ms: i64) -> Measure {
    ks.prune(rule, now_ms);
    let learn = ks.incident.is_none();
    ks.baseline
        .roll_to(&rule.cfg, now_ms.div_euclid(rule.window_ms), learn);
    let count: u64 = ks.slots.iter().map(|s| s.hits).sum();
    let total: u64 = ks.slots.iter().map(|s| s.total).sum();
    let b = &ks.baseline;
    let std = b.std();
    let z = (b.windows > 0).then(|| (count as f64 - b.mean) / std.max(rule.cfg.min_std));
    let c = &rule.cfg;
    let value = match c.kind {
        ThresholdKind::Count => count as f64,
        ThresholdKind::Rate => count as f64 * 60_000.0 / rule.window_ms as f64,
        ThresholdKind::Share => {
            if total == 0 {
                0.0
            } else {
                count as f64 / total as f64
            }
        }
        ThresholdKind::Jump => z.unwrap_or(0.0),
    };
    let warm = c.kind != ThresholdKind::Jump || b.windows >= c.min_baseline_windows as u64;
    Measure {
        count,
        total,
        value,
        mean: b.mean,
        std,
        windows: b.windows,
        z,
        firing: warm && count >= c.min_count && value >= c.threshold,
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Per-rule state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RuleState {
    /// Hash of the rule's settings: state for other settings is dropped on restore.
    config_hash: String,
    keys: BTreeMap<String, KeyState>,
    clock: u64,
    #[serde(skip)]
    lru: BTreeSet<(u64, String)>,
    /// Keys with an open incident.
    open: BTreeSet<String>,
    counters: RuleCounters,
}

/// Counters per rule (in `stats` and the state file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleCounters {
    pub observations: u64,
    pub hits: u64,
    /// Messages older than the window when they arrived (not counted).
    pub late: u64,
    /// Messages without the rule's key field.
    pub missing_key: u64,
    /// Keys evicted to stay within `max_keys`.
    pub evictions: u64,
    /// Incidents ended because their key was evicted.
    pub evicted_open: u64,
    pub incidents: u64,
}

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    format: u32,
    /// Highest event time seen.
    watermark_ms: Option<i64>,
    rules: BTreeMap<String, RuleState>,
}

const STATE_FORMAT: u32 = 1;

/// How [`Monitor::restore`] found the state file.
#[derive(Debug, Clone, PartialEq)]
pub enum Restored {
    /// No file: a fresh start.
    Fresh,
    /// Loaded; rules whose settings changed since were reset (named).
    Loaded { reset_rules: Vec<String> },
    /// Unreadable (corrupt, other format): ignored and a fresh start, with the reason.
    Discarded(String),
}

/// The monitor: rules and their state.
#[derive(Debug, Clone)]
pub struct Monitor {
    rules: Vec<Rule>,
    state: State,
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
        Monitor { rules, state }
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

    /// Feeds one classification; returns the incident messages it caused (and those of
    /// incidents elsewhere that went quiet by its time).
    pub fn observe(&mut self, obs: &Observation) -> Vec<MonitorEvent> {
        let now = self
            .state
            .watermark_ms
            .map_or(obs.ts_ms, |w| w.max(obs.ts_ms));
        self.state.watermark_ms = Some(now);
        let mut out = Vec::new();
        for rule in &self.rules {
            // Created in `new` / `restore` for every rule.
            let Some(rs) = self.state.rules.get_mut(&rule.cfg.name) else {
                continue;
            };
            observe_rule(rule, rs, obs, now, &mut out);
        }
        out.extend(self.advance_to(now));
        out
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
                    } else if now - inc.last_true_ms >= rule.quiet_ms {
                        out.push(end_incident(rule, &key, ks, &m, now, "quiet"));
                        rs.open.remove(&key);
                    }
                }
            }
        }
        out
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename, fsync of the
    /// folder): after a crash the file is the old state or the new, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), MonitorError> {
        let io = |source| MonitorError::Io {
            path: path.into(),
            source,
        };
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(d) = dir {
            std::fs::create_dir_all(d).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        // Plain structs, maps and JSON values: serializing cannot fail.
        let bytes = serde_json::to_vec(&self.state).unwrap_or_default();
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(d) = dir {
            // Makes the rename itself durable; a folder that cannot be opened is no error.
            if let Ok(f) = std::fs::File::open(d) {
                let _ = f.sync_all();
            }
        }
        Ok(())
    }

    /// A monitor for `cfg` with the state saved at `path`, when there is one. State of a
    /// rule whose settings changed, or of a rule no longer configured, is dropped.
    pub fn restore(cfg: &MonitorConfig, path: &Path) -> Result<(Monitor, Restored), MonitorError> {
        let mut m = Monitor::new(cfg);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((m, Restored::Fresh)),
            Err(source) => {
                return Err(MonitorError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let saved: State = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => return Ok((m, Restored::Discarded(e.to_string()))),
        };
        if saved.format != STATE_FORMAT {
            return Ok((
                m,
                Restored::Discarded(format!(
                    "state format {} (this build writes {STATE_FORMAT})",
                    saved.format
                )),
            ));
        }
        m.state.watermark_ms = saved.watermark_ms;
        let mut reset_rules = Vec::new();
        let mut saved_rules = saved.rules;
        for rule in &m.rules {
            let name = &rule.cfg.name;
            match saved_rules.remove(name) {
                Some(mut rs) if rs.config_hash == rule.hash => {
                    rs.lru = rs.keys.iter().map(|(k, v)| (v.seen, k.clone())).collect();
                    rs.open = rs
                        .keys
                        .iter()
                        .filter(|(_, v)| v.incident.is_some())
                        .map(|(k, _)| k.clone())
                        .collect();
                    m.state.rules.insert(name.clone(), rs);
                }
                Some(_) => reset_rules.push(name.clone()),
                None => {}
            }
        }
        Ok((m, Restored::Loaded { reset_rules }))
    }
}

fn observe_rule(
    rule: &Rule,
    rs: &mut RuleState,
    obs: &Observation,
    now: i64,
    out: &mut Vec<MonitorEvent>,
) {
    let c = &rule.cfg;
    let key = match &c.key {
        None => "*".to_string(),
        Some(f) => match obs.fields.get(f) {
            Some(v) => v.clone(),
            None => {
                rs.counters.missing_key += 1;
                return;
            }
        },
    };
    rs.counters.observations += 1;
    rs.clock += 1;
    let clock = rs.clock;
    if !rs.keys.contains_key(&key) {
        while rs.keys.len() >= c.max_keys {
            let Some((_, victim)) = rs.lru.pop_first() else {
                break;
            };
            if let Some(mut ks) = rs.keys.remove(&victim) {
                rs.counters.evictions += 1;
                if ks.incident.is_some() {
                    rs.counters.evicted_open += 1;
                    rs.open.remove(&victim);
                    let m = measure(rule, &mut ks, now);
                    out.push(end_incident(rule, &victim, &mut ks, &m, now, "evicted"));
                }
            }
        }
        rs.keys.insert(key.clone(), KeyState::new());
    }
    // Inserted just above when it was missing.
    let Some(ks) = rs.keys.get_mut(&key) else {
        return;
    };
    rs.lru.remove(&(ks.seen, key.clone()));
    ks.seen = clock;
    rs.lru.insert((clock, key.clone()));

    let hit = obs.label.as_deref() == Some(c.label.as_str()) && obs.confidence >= c.min_confidence;
    if !ks.add(rule, now, obs.ts_ms, hit) {
        rs.counters.late += 1;
        return;
    }
    if hit {
        rs.counters.hits += 1;
        let ex = Example {
            id: obs.id.clone(),
            ts_ms: obs.ts_ms,
            confidence: round4(obs.confidence),
            text: obs
                .fields
                .get("text")
                .map(|t| t.chars().take(EXAMPLE_CHARS).collect())
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
    let m = measure(rule, ks, now);
    match ks.incident.as_mut() {
        None => {
            if m.firing && now >= ks.cooldown_until_ms {
                let window_start = now - rule.window_ms;
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
                let after = snapshot(rule, &key, &inc, &m, now, None);
                inc.last_published = after.clone();
                ks.incident = Some(inc);
                rs.open.insert(key.clone());
                rs.counters.incidents += 1;
                out.push(MonitorEvent {
                    rule: c.name.clone(),
                    kind: EventType::New,
                    before: None,
                    after,
                });
            }
        }
        Some(inc) => {
            if m.firing {
                inc.last_true_ms = now;
            }
            if m.value > inc.peak_value {
                inc.peak_value = m.value;
            }
            inc.peak_count = inc.peak_count.max(m.count);
            let changed = inc.hits != inc.hits_at_last_emit;
            if changed && now - inc.last_emit_ms >= rule.update_ms {
                inc.updates += 1;
                inc.last_emit_ms = now;
                inc.hits_at_last_emit = inc.hits;
                let after = snapshot(rule, &key, inc, &m, now, None);
                let before = std::mem::replace(&mut inc.last_published, after.clone());
                out.push(MonitorEvent {
                    rule: c.name.clone(),
                    kind: EventType::Update,
                    before: Some(before),
                    after,
                });
            }
        }
    }
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

fn end_incident(
    rule: &Rule,
    key: &str,
    ks: &mut KeyState,
    m: &Measure,
    now: i64,
    reason: &str,
) -> MonitorEvent {
    // Callers check that an incident is open.
    let inc = ks.incident.take();
    ks.cooldown_until_ms = now + rule.cooldown_ms;
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
        "hits": inc.hits,
        "updates": inc.updates,
        "trigger_ids": inc.trigger_ids,
        "top_examples": inc.examples.iter().map(|e| json!({
            "id": e.id, "ts": s(e.ts_ms), "confidence": e.confidence, "text": e.text,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests;
