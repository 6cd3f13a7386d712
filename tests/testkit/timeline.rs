//! Synthetic monitor timelines for the monitor tests: a background of mixed messages, then a
//! surge of one label in one key.

use edgeact::util::rng::SplitMix64;
use serde_json::{json, Value};

/// A synthetic stream: a flat background of messages (labels and texts drawn from `pool`)
/// spread over `keys`, and optionally a surge of `surge_label` in one key.
#[derive(Debug, Clone)]
pub struct TimelineSpec {
    pub start_ts_s: f64,
    pub duration_s: f64,
    /// Background messages per minute, all keys together (Poisson).
    pub background_per_min: f64,
    pub keys: Vec<String>,
    /// Name of the key field written in each message.
    pub key_field: String,
    pub surge: Option<Surge>,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct Surge {
    pub label: String,
    pub key: String,
    /// Offsets from `start_ts_s`.
    pub from_s: f64,
    pub to_s: f64,
    /// Extra messages of the label per minute during the surge (Poisson).
    pub per_min: f64,
}

/// Builds the timeline as JSON objects `{"id","ts","<key_field>","text","label"}` sorted
/// by `ts`. `pool` is (label, text) pairs, for instance a labelled data set.
pub fn synthetic_timeline(pool: &[(String, String)], spec: &TimelineSpec) -> Vec<Value> {
    let mut rng = SplitMix64(spec.seed);
    let mut rows: Vec<(f64, String, String, String)> = Vec::new();
    if !pool.is_empty() && !spec.keys.is_empty() && spec.background_per_min > 0.0 {
        let mut t = rng.exponential(spec.background_per_min / 60.0);
        while t < spec.duration_s {
            let (label, text) = &pool[rng.below(pool.len())];
            let key = &spec.keys[rng.below(spec.keys.len())];
            rows.push((t, key.clone(), label.clone(), text.clone()));
            t += rng.exponential(spec.background_per_min / 60.0);
        }
    }
    if let Some(s) = &spec.surge {
        let of_label: Vec<&(String, String)> = pool.iter().filter(|(l, _)| *l == s.label).collect();
        if !of_label.is_empty() && s.per_min > 0.0 {
            let mut t = s.from_s + rng.exponential(s.per_min / 60.0);
            while t < s.to_s.min(spec.duration_s) {
                let (label, text) = of_label[rng.below(of_label.len())];
                rows.push((t, s.key.clone(), label.clone(), text.clone()));
                t += rng.exponential(s.per_min / 60.0);
            }
        }
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    rows.into_iter()
        .enumerate()
        .map(|(i, (t, key, label, text))| {
            let mut v = json!({
                "id": format!("m{i}"),
                "ts": ((spec.start_ts_s + t) * 1000.0).round() / 1000.0,
                "text": text,
                "label": label,
            });
            v[&spec.key_field] = json!(key);
            v
        })
        .collect()
}
