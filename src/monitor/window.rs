//! The sliding window of one key: hit and message counters per slot of the window, the
//! baseline of hits per closed window (for `jump` rules), and what a rule measures on them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::{BaselineKind, Rule, RuleConfig, ThresholdKind};
use super::fusion::{self, ContextState, Reading};
use super::incident::{Example, Incident};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct Slot {
    pub(super) index: i64,
    pub(super) hits: u64,
    pub(super) total: u64,
}

/// Baseline of hits per closed window of `window_s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Baseline {
    /// Index (ts / window) of the window being counted.
    pub(super) bucket: Option<i64>,
    pub(super) bucket_hits: u64,
    pub(super) windows: u64,
    pub(super) mean: f64,
    pub(super) var: f64,
    /// Last windows (the `mean` kind only).
    pub(super) history: VecDeque<f64>,
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
            let gap = bucket.saturating_sub(cur).saturating_sub(1).min(256);
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct KeyState {
    /// LRU clock value of the last observation.
    pub(super) seen: u64,
    pub(super) slots: VecDeque<Slot>,
    pub(super) baseline: Baseline,
    /// Recent hits, newest last (at most `max_trigger_ids`).
    pub(super) recent: VecDeque<Example>,
    pub(super) incident: Option<Incident>,
    pub(super) cooldown_until_ms: i64,
    /// The last sensor reading of a rule with a context condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) context: Option<Reading>,
}

impl KeyState {
    pub(super) fn new() -> KeyState {
        KeyState {
            seen: 0,
            slots: VecDeque::new(),
            baseline: Baseline::default(),
            recent: VecDeque::new(),
            incident: None,
            cooldown_until_ms: i64::MIN,
            context: None,
        }
    }

    /// Drops slots that left the window ending at `now_ms`.
    fn prune(&mut self, rule: &Rule, now_ms: i64) {
        let first = now_ms
            .div_euclid(rule.slot_ms)
            .saturating_sub(rule.cfg.window_slots as i64 - 1);
        while self.slots.front().is_some_and(|s| s.index < first) {
            self.slots.pop_front();
        }
    }

    /// Counts one message; false when it is older than the window (late, ignored).
    pub(super) fn add(&mut self, rule: &Rule, now_ms: i64, ts_ms: i64, hit: bool) -> bool {
        let idx = ts_ms.div_euclid(rule.slot_ms);
        let first = now_ms
            .div_euclid(rule.slot_ms)
            .saturating_sub(rule.cfg.window_slots as i64 - 1);
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
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Measure {
    pub(super) count: u64,
    pub(super) total: u64,
    pub(super) value: f64,
    pub(super) mean: f64,
    pub(super) std: f64,
    pub(super) windows: u64,
    pub(super) z: Option<f64>,
    /// The rule's context condition now (None: it has none).
    pub(super) context: Option<ContextState>,
    pub(super) firing: bool,
}

pub(super) fn measure(rule: &Rule, ks: &mut KeyState, now_ms: i64) -> Measure {
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
    let context = c
        .context
        .as_ref()
        .map(|cond| fusion::evaluate(cond, ks.context.as_ref(), now_ms));
    let sensor_ok = context.as_ref().is_none_or(|s| s.holds);
    Measure {
        count,
        total,
        value,
        mean: b.mean,
        std,
        windows: b.windows,
        z,
        context,
        firing: warm && sensor_ok && count >= c.min_count && value >= c.threshold,
    }
}
