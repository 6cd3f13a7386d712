//! Fusion of text and sensors: a rule may also require a numeric context value (a sensor
//! reading that `serve` adds to each request as `context.<name>`, with its age in
//! `context.<name>.age_s`) above or below a threshold, e.g. fire reports in a district AND
//! smoke above 300 ppm. A reading older than `max_age_s` is stale: it is shown as stale in
//! the incident and the condition does not hold on it. Pure logic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// `context = { field = "context.smoke", above = 300, max_age_s = 120 }` in a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextCondition {
    /// Input field with the reading (a number, or text starting with one).
    pub field: String,
    /// The condition holds when the reading is above this (strictly) ...
    #[serde(default)]
    pub above: Option<f64>,
    /// ... and/or below this (strictly).
    #[serde(default)]
    pub below: Option<f64>,
    /// A reading older than this is stale and not used.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: f64,
}

fn default_max_age_s() -> f64 {
    300.0
}

impl ContextCondition {
    /// The field with the reading's age in seconds (set by `serve`).
    pub fn age_field(&self) -> String {
        format!("{}.age_s", self.field)
    }

    /// Why the condition cannot be used, if so.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.above.is_none() && self.below.is_none() {
            return Err("needs `above` or `below`".into());
        }
        if [self.above, self.below]
            .iter()
            .flatten()
            .any(|v| !v.is_finite())
        {
            return Err("`above` and `below` must be finite numbers".into());
        }
        if !(self.max_age_s.is_finite() && self.max_age_s >= 0.0) {
            return Err(format!("max_age_s {} must be >= 0", self.max_age_s));
        }
        Ok(())
    }
}

/// The last reading a key's messages carried, kept with the key's window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(super) struct Reading {
    /// None: missing or not a number.
    pub(super) value: Option<f64>,
    /// Age when the message carrying it arrived; None when the message gave none (a replayed
    /// file whose lines carry their own readings): taken as current then.
    pub(super) age_s: Option<f64>,
    /// Event time of that message, in ms.
    pub(super) at_ms: i64,
}

/// The reading in a message's fields.
pub(super) fn read(
    cond: &ContextCondition,
    fields: &BTreeMap<String, String>,
    ts_ms: i64,
) -> Reading {
    let number = |s: &str| -> Option<f64> {
        let s = s.trim();
        let end = s
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '-' || c == '+'))))
            .map_or(s.len(), |(i, _)| i);
        s[..end].parse::<f64>().ok().filter(|v| v.is_finite())
    };
    Reading {
        value: fields.get(&cond.field).and_then(|s| number(s)),
        age_s: fields.get(&cond.age_field()).and_then(|s| number(s)),
        at_ms: ts_ms,
    }
}

/// The condition on the latest reading at event time `now_ms`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ContextState {
    pub(super) holds: bool,
    pub(super) stale: bool,
    pub(super) value: Option<f64>,
    pub(super) age_s: Option<f64>,
}

pub(super) fn evaluate(
    cond: &ContextCondition,
    reading: Option<&Reading>,
    now_ms: i64,
) -> ContextState {
    let Some(r) = reading else {
        return ContextState {
            holds: false,
            stale: false,
            value: None,
            age_s: None,
        };
    };
    // The reading ages with the stream's time after the message that carried it.
    let since_s = now_ms.saturating_sub(r.at_ms).max(0) as f64 / 1000.0;
    let age_s = r.age_s.map_or(since_s, |a| a.max(0.0) + since_s);
    let stale = age_s > cond.max_age_s;
    let in_range = r
        .value
        .is_some_and(|v| cond.above.is_none_or(|a| v > a) && cond.below.is_none_or(|b| v < b));
    ContextState {
        holds: in_range && !stale,
        stale,
        value: r.value,
        age_s: Some(age_s),
    }
}

impl ContextState {
    /// As shown in an incident: what the rule saw and whether it could use it.
    pub(super) fn to_json(&self, cond: &ContextCondition) -> Value {
        let r = |x: f64| (x * 1e3).round() / 1e3;
        json!({
            "field": cond.field,
            "value": self.value,
            "above": cond.above,
            "below": cond.below,
            "age_s": self.age_s.map(r),
            "max_age_s": cond.max_age_s,
            "stale": self.stale,
            "holds": self.holds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond() -> ContextCondition {
        ContextCondition {
            field: "context.smoke".into(),
            above: Some(300.0),
            below: None,
            max_age_s: 60.0,
        }
    }

    fn fields(v: &str, age: Option<&str>) -> BTreeMap<String, String> {
        let mut f = BTreeMap::new();
        f.insert("context.smoke".to_string(), v.to_string());
        if let Some(a) = age {
            f.insert("context.smoke.age_s".to_string(), a.to_string());
        }
        f
    }

    #[test]
    fn a_fresh_reading_over_the_threshold_holds() {
        let c = cond();
        let r = read(&c, &fields("412 ppm", Some("3")), 1000);
        let s = evaluate(&c, Some(&r), 1000);
        assert!(s.holds && !s.stale);
        assert_eq!(s.value, Some(412.0));
        let low = read(&c, &fields("120", Some("3")), 1000);
        assert!(!evaluate(&c, Some(&low), 1000).holds);
        let junk = read(&c, &fields("n/a", None), 1000);
        assert!(!evaluate(&c, Some(&junk), 1000).holds);
        assert!(!evaluate(&c, None, 1000).holds);
    }

    #[test]
    fn a_stale_reading_is_marked_and_not_used() {
        let c = cond();
        // Old when it arrived.
        let r = read(&c, &fields("900", Some("61")), 0);
        let s = evaluate(&c, Some(&r), 0);
        assert!(s.stale && !s.holds, "{s:?}");
        // Fresh when it arrived, stale once the stream moved on without a new one.
        let r = read(&c, &fields("900", Some("10")), 0);
        assert!(evaluate(&c, Some(&r), 50_000).holds);
        let s = evaluate(&c, Some(&r), 51_000);
        assert!(s.stale && !s.holds);
        assert_eq!(s.to_json(&c)["stale"], true);
        assert_eq!(s.to_json(&c)["age_s"], 61.0);
    }

    #[test]
    fn conditions_need_a_bound() {
        let mut c = cond();
        assert!(c.check().is_ok());
        c.above = None;
        assert!(c.check().is_err());
        c.below = Some(f64::NAN);
        assert!(c.check().is_err());
        c.below = Some(5.0);
        c.max_age_s = -1.0;
        assert!(c.check().is_err());
    }
}
