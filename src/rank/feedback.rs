//! Fusion weights learned from feedback. A feedback event is one ranking a user saw: the
//! query (the profile), the items shown and which of them were clicked or ignored. Each
//! event's items get their stage features ([`hybrid::features`]); the weights are fitted
//! by pairwise logistic regression (a clicked item should score above an ignored one),
//! pulled toward the current weights so that a few events move them a little, and are
//! kept only when they rank the check events (held-out ones when given) at least as well
//! as the current weights do, by mean NDCG@k.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::eval::ndcg_at;
use super::hybrid::{self, FusionWeights, Stages};
use super::{item_from_value, Item};

/// One feedback event, as a JSON object:
/// `{"task"?, "query", "items": [{"id", "text"} | {"id", "title", "description"}, ...],
/// "clicked": [id, ...], "ignored"?: [id, ...]}`. Items are as in a rank request. With no
/// `ignored`, every shown item that was not clicked counts as ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEvent", into = "RawEvent")]
pub struct FeedbackEvent {
    pub task: Option<String>,
    pub query: String,
    pub items: Vec<Item>,
    pub clicked: Vec<String>,
    pub ignored: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    query: String,
    items: Vec<serde_json::Value>,
    clicked: Vec<String>,
    #[serde(default)]
    ignored: Vec<String>,
}

impl TryFrom<RawEvent> for FeedbackEvent {
    type Error = String;

    fn try_from(r: RawEvent) -> Result<FeedbackEvent, String> {
        if r.query.trim().is_empty() {
            return Err("`query` is empty".into());
        }
        let items = r
            .items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                item_from_value(v, &(i + 1).to_string()).map_err(|e| format!("item {}: {e}", i + 1))
            })
            .collect::<Result<Vec<Item>, String>>()?;
        let ids: BTreeSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        if ids.len() != items.len() {
            return Err("two items have the same id".into());
        }
        for (key, list) in [("clicked", &r.clicked), ("ignored", &r.ignored)] {
            if let Some(id) = list.iter().find(|id| !ids.contains(id.as_str())) {
                return Err(format!(
                    "`{key}` names `{id}`, which is not one of the items"
                ));
            }
        }
        if let Some(id) = r.clicked.iter().find(|id| r.ignored.contains(id)) {
            return Err(format!("`{id}` is both clicked and ignored"));
        }
        Ok(FeedbackEvent {
            task: r.task,
            query: r.query,
            items,
            clicked: r.clicked,
            ignored: r.ignored,
        })
    }
}

impl From<FeedbackEvent> for RawEvent {
    fn from(e: FeedbackEvent) -> RawEvent {
        let items = e
            .items
            .into_iter()
            .map(|it| {
                let mut o = serde_json::Map::new();
                o.insert("id".into(), it.id.into());
                for (k, v) in it.fields {
                    o.insert(k, v.into());
                }
                serde_json::Value::Object(o)
            })
            .collect();
        RawEvent {
            task: e.task,
            query: e.query,
            items,
            clicked: e.clicked,
            ignored: e.ignored,
        }
    }
}

impl FeedbackEvent {
    /// Each item's grade: Some(1) clicked, Some(0) ignored, None not judged (shown, but
    /// neither clicked nor ignored while the event lists ignored items).
    pub fn grades(&self) -> Vec<Option<f64>> {
        self.items
            .iter()
            .map(|it| {
                if self.clicked.contains(&it.id) {
                    Some(1.0)
                } else if self.ignored.is_empty() || self.ignored.contains(&it.id) {
                    Some(0.0)
                } else {
                    None
                }
            })
            .collect()
    }

    /// The text each item is ranked by (as a rank request's query sees it).
    pub fn texts(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|it| it.request().fields.remove("text").unwrap_or_default())
            .collect()
    }
}

/// One event as learning sees it: the features of its judged items and their grades.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub features: Vec<[f64; 3]>,
    pub grades: Vec<f64>,
}

impl Judged {
    /// The event's items' features (stage scores of the query and the model's P(yes), one
    /// per item in order), its unjudged items left out.
    pub fn new(event: &FeedbackEvent, stages: &Stages, model: &[f64]) -> Judged {
        let texts = event.texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let f = hybrid::features(&stages.scores(&event.query, &refs), model);
        let (features, grades) = f
            .into_iter()
            .zip(event.grades())
            .filter_map(|(f, g)| g.map(|g| (f, g)))
            .unzip();
        Judged { features, grades }
    }
}

/// Mean NDCG@k of the fused order over the events that have a click (0 when none has).
pub fn mean_ndcg(events: &[Judged], w: &FusionWeights, k: usize) -> f64 {
    let scored: Vec<f64> = events
        .iter()
        .filter(|e| e.grades.iter().any(|g| *g > 0.0))
        .map(|e| {
            let s = hybrid::fuse_features(&e.features, w);
            let ranked: Vec<f64> = hybrid::order(&s).iter().map(|&i| e.grades[i]).collect();
            ndcg_at(&ranked, &e.grades, k)
        })
        .collect();
    if scored.is_empty() {
        0.0
    } else {
        scored.iter().sum::<f64>() / scored.len() as f64
    }
}

/// What learning found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Learned {
    /// The weights to use: the fitted ones, or the current ones when the fitted ones rank
    /// the check events worse (or when there was nothing to learn from).
    pub weights: FusionWeights,
    pub fitted: FusionWeights,
    /// Mean NDCG@k on the check events with the current and with the chosen weights.
    pub ndcg_before: f64,
    pub ndcg_after: f64,
    /// (clicked, ignored) pairs the fit saw.
    pub pairs: usize,
    pub kept_current: bool,
}

/// The fit's settings: the pull toward the current weights (L2), gradient steps and rate.
const L2: f64 = 0.05;
const STEPS: usize = 400;
const RATE: f64 = 0.5;

/// Learns fusion weights from `train` (pairwise logistic regression from `current`) and
/// keeps them only when their mean NDCG@k on `check` is at least that of `current`.
pub fn learn_weights(
    train: &[Judged],
    check: &[Judged],
    current: &FusionWeights,
    k: usize,
) -> Learned {
    // Feature differences of every (clicked, ignored) pair within an event.
    let diffs: Vec<[f64; 3]> = train
        .iter()
        .flat_map(|e| {
            let pos = e.grades.iter().enumerate().filter(|(_, g)| **g > 0.0);
            pos.flat_map(move |(i, _)| {
                e.grades
                    .iter()
                    .enumerate()
                    .filter(|(_, g)| **g <= 0.0)
                    .map(move |(j, _)| {
                        let (a, b) = (e.features[i], e.features[j]);
                        [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
                    })
            })
        })
        .collect();
    let w0 = current.to_array();
    let mut w = w0;
    if !diffs.is_empty() {
        let n = diffs.len() as f64;
        for _ in 0..STEPS {
            let mut grad = [0.0; 3];
            for d in &diffs {
                let m: f64 = d.iter().zip(w).map(|(x, w)| x * w).sum();
                // d/dw of ln(1 + e^-m) is -d * sigmoid(-m).
                let s = 1.0 / (1.0 + m.exp());
                for (g, x) in grad.iter_mut().zip(d) {
                    *g -= x * s / n;
                }
            }
            for i in 0..3 {
                w[i] -= RATE * (grad[i] + 2.0 * L2 * (w[i] - w0[i]));
            }
        }
    }
    let fitted = FusionWeights::from_array(w.map(|x| (x * 1e4).round() / 1e4));
    let before = mean_ndcg(check, current, k);
    let fitted_ndcg = mean_ndcg(check, &fitted, k);
    // No pairs: nothing was learned, so nothing should be written either.
    let kept_current = diffs.is_empty() || fitted.problem().is_some() || fitted_ndcg < before;
    let (weights, after) = if kept_current {
        (*current, before)
    } else {
        (fitted, fitted_ndcg)
    };
    Learned {
        weights,
        fitted,
        ndcg_before: before,
        ndcg_after: after,
        pairs: diffs.len(),
        kept_current,
    }
}

/// `src` (a task file's text) with its `[rank.fusion]` table replaced by `w` (appended at
/// the end; the rest of the file, comments included, is kept as it was).
pub fn with_fusion_weights(src: &str, w: &FusionWeights) -> String {
    let mut out = String::with_capacity(src.len() + 128);
    let mut skipping = false;
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            skipping = t == "[rank.fusion]";
            // The comment this function wrote above the table goes with it.
            if skipping && out.ends_with(FUSION_COMMENT) {
                out.truncate(out.len() - FUSION_COMMENT.len());
            }
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out.push('\n');
    out.push_str(FUSION_COMMENT);
    out.push_str(&format!(
        "[rank.fusion]\nlexical = {:?}\nchar = {:?}\nmodel = {:?}\n",
        w.lexical, w.char, w.model
    ));
    out
}

const FUSION_COMMENT: &str =
    "# Stage weights of the hybrid ranker (`edgeact rank-learn` rewrites this table).\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Result<FeedbackEvent, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn events_parse_validate_and_round_trip() {
        let e = event(
            r#"{"task":"rank-interest","query":"roses","items":[{"id":"a","text":"prune roses"},
            {"id":"b","title":"Laptops","description":"Cheap."},{"id":"c","text":"soil"}],
            "clicked":["a"],"ignored":["b"]}"#,
        )
        .unwrap();
        assert_eq!(e.grades(), vec![Some(1.0), Some(0.0), None]);
        assert_eq!(e.texts()[1], "Laptops. Cheap.");
        let back: FeedbackEvent =
            serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        // No `ignored`: every item not clicked counts as ignored.
        let e = event(r#"{"query":"q","items":[{"id":"a","text":"x"},{"id":"b","text":"y"}],"clicked":["b"]}"#)
            .unwrap();
        assert_eq!(e.grades(), vec![Some(0.0), Some(1.0)]);
        for (bad, why) in [
            (
                r#"{"query":"q","items":[{"id":"a","text":"x"}],"clicked":["z"]}"#,
                "`z`",
            ),
            (
                r#"{"query":"q","items":[{"id":"a","text":"x"}],"clicked":["a"],"ignored":["a"]}"#,
                "both",
            ),
            (r#"{"query":" ","items":[],"clicked":[]}"#, "empty"),
            (
                r#"{"query":"q","items":[{"id":"a","text":"x"},{"id":"a","text":"y"}],"clicked":[]}"#,
                "same id",
            ),
            (
                r#"{"query":"q","items":[{"id":"a"}],"clicked":[]}"#,
                "item 1",
            ),
            (
                r#"{"query":"q","items":[],"clicked":[],"shown":1}"#,
                "shown",
            ),
        ] {
            let e = event(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Events where the model's feature alone orders clicks first and the lexical one
    /// orders them last.
    fn model_right(n: usize) -> Vec<Judged> {
        (0..n)
            .map(|i| {
                let s = i as f64 * 0.1;
                Judged {
                    features: vec![
                        [-1.0 + s, 0.0, 1.0],
                        [1.0, 0.0, -1.0 + s],
                        [0.5, 0.1, -0.5],
                        [0.0, -0.1, 0.0],
                    ],
                    grades: vec![1.0, 0.0, 0.0, 0.0],
                }
            })
            .collect()
    }

    #[test]
    fn learning_moves_weight_to_the_stage_that_ranks_clicks_first() {
        let ev = model_right(5);
        let cur = FusionWeights::default();
        assert!(mean_ndcg(&ev, &cur, 5) < 1.0);
        let l = learn_weights(&ev, &ev, &cur, 5);
        assert!(!l.kept_current, "{l:?}");
        assert!(l.weights.model > l.weights.lexical, "{l:?}");
        assert_eq!(l.ndcg_after, 1.0);
        assert!(l.ndcg_before < l.ndcg_after);
        assert_eq!(l.pairs, 15);
    }

    #[test]
    fn learned_weights_are_never_worse_on_the_check_events() {
        // The check events disagree with the training events: the current weights stay.
        let train = model_right(5);
        let check: Vec<Judged> = train
            .iter()
            .map(|e| Judged {
                features: e.features.clone(),
                grades: vec![0.0, 1.0, 0.0, 0.0],
            })
            .collect();
        let cur = FusionWeights::default();
        let l = learn_weights(&train, &check, &cur, 5);
        assert!(l.kept_current, "{l:?}");
        assert_eq!(l.weights, cur);
        assert_eq!(l.ndcg_after, l.ndcg_before);
        // No pairs (no clicks): nothing to learn, the current weights stay.
        let none = vec![Judged {
            features: vec![[1.0, 0.0, 0.0]],
            grades: vec![0.0],
        }];
        let l = learn_weights(&none, &none, &cur, 5);
        assert_eq!((l.pairs, l.weights, l.kept_current), (0, cur, true));
    }

    #[test]
    fn fusion_weights_replace_the_old_table_and_keep_the_rest() {
        let w = FusionWeights {
            lexical: 1.5,
            char: 0.25,
            model: -0.1,
        };
        let src = "# top\nname = \"r\"\n[rank]\ntop_k = 3\n[rank.fusion]\nlexical = 1.0\nmodel = 0.0\n\n[calibration]\nenabled = true\n";
        let out = with_fusion_weights(src, &w);
        assert!(
            out.starts_with("# top\nname = \"r\"\n[rank]\ntop_k = 3\n[calibration]"),
            "{out}"
        );
        assert_eq!(out.matches("[rank.fusion]").count(), 1, "{out}");
        let v: toml::Table = toml::from_str(&out).unwrap();
        let f: FusionWeights = v["rank"]["fusion"].clone().try_into().unwrap();
        assert_eq!(f, w);
        assert_eq!(with_fusion_weights(&out, &w), out);
    }

    #[test]
    fn judged_events_drop_unjudged_items() {
        let corpus = ["prune roses in spring", "cheap laptops", "garden soil"];
        let stages = Stages::fit(&corpus, hybrid::HybridConfig::default());
        let e = event(
            r#"{"query":"roses","items":[{"id":"a","text":"prune roses"},{"id":"b","text":"laptops"},
            {"id":"c","text":"soil"}],"clicked":["a"],"ignored":["b"]}"#,
        )
        .unwrap();
        let j = Judged::new(&e, &stages, &[0.9, 0.1, 0.5]);
        assert_eq!(j.grades, vec![1.0, 0.0]);
        assert_eq!(j.features.len(), 2);
        assert!(j.features[0][0] > j.features[1][0]);
    }
}
