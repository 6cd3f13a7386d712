//! Ranking: a task with a `[rank]` section scores candidate items for one profile by the
//! model's probability of the positive label (`yes`) after a yes/no prompt, calibrated
//! with the task's content-free inputs, and returns them sorted, cut to top-k and a
//! minimum score. The profile is written into the task's prefix, so it is decoded once
//! and every candidate reuses it (each candidate decodes only its own suffix).

pub mod eval;
pub mod feedback;
pub mod hybrid;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::classify::input;
use crate::classify::{Classifier, RecordError, Request, ScorePath, SetupError};
use crate::model::scoring::{softmax, AbstainRule};
use crate::model::Engine;
use crate::spec::{ScoreNorm, Task};

#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("task file {path}: `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// The `[rank]` section of a task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankConfig {
    /// The label whose probability is the item's score.
    #[serde(default = "default_positive")]
    pub positive_label: String,
    /// How the profile enters the prompt, after the instruction: `{profile}` is replaced.
    #[serde(default = "default_profile_template")]
    pub profile_template: String,
    /// Items returned at most (default: all).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Items scoring below this are left out.
    #[serde(default)]
    pub min_score: f64,
    /// `[rank.fusion]`: the hybrid ranker's stage weights (`edgeact rank-learn` writes them).
    #[serde(default)]
    pub fusion: hybrid::FusionWeights,
}

fn default_positive() -> String {
    "yes".into()
}
fn default_profile_template() -> String {
    "User profile: {profile}".into()
}

impl RankConfig {
    /// The task's `[rank]` section, validated; None when it has none.
    pub fn from_task(task: &Task) -> Result<Option<RankConfig>, RankError> {
        let Some(table) = &task.rank else {
            return Ok(None);
        };
        let invalid = |key: &str, reason: String| RankError::Invalid {
            path: task.path.clone(),
            key: key.into(),
            reason,
        };
        let cfg: RankConfig = table.clone().try_into().map_err(|e: toml::de::Error| {
            invalid("rank", e.to_string().trim().replace('\n', " "))
        })?;
        if task.label_index(&cfg.positive_label).is_none() {
            return Err(invalid(
                "rank.positive_label",
                format!("`{}` is not one of the task's labels", cfg.positive_label),
            ));
        }
        if !cfg.profile_template.contains("{profile}") {
            return Err(invalid(
                "rank.profile_template",
                "must contain {profile}".into(),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.min_score) {
            return Err(invalid(
                "rank.min_score",
                format!("{} is not within 0..=1", cfg.min_score),
            ));
        }
        if cfg.top_k == Some(0) {
            return Err(invalid("rank.top_k", "must be at least 1".into()));
        }
        if let Some(reason) = cfg.fusion.problem() {
            return Err(invalid("rank.fusion", reason));
        }
        Ok(Some(cfg))
    }

    /// Whether ranking needs the model's P(yes): it orders (no lexical stage), weighs in
    /// the fusion, or a minimum score cuts on it. Otherwise the model is not asked at all
    /// (no prefix decode, no item decode): the order is the same, since a stage of weight
    /// 0 adds nothing to the fused score.
    pub fn uses_model(&self) -> bool {
        let w = &self.fusion;
        w.model != 0.0 || (w.lexical == 0.0 && w.char == 0.0) || self.min_score > 0.0
    }
}

/// A candidate item: `title` and `description` (or `text`), and any other fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

impl Item {
    /// The request the task's query sees: `text` is "title. description" when not given.
    pub fn request(&self) -> Request {
        let mut fields = self.fields.clone();
        if !fields.contains_key("text") {
            let get = |k: &str| self.fields.get(k).map(|s| s.trim()).unwrap_or("");
            let (title, description) = (get("title"), get("description"));
            let text = match (title.is_empty(), description.is_empty()) {
                (false, false) if title.ends_with(['.', '!', '?', ':']) => {
                    format!("{title} {description}")
                }
                (false, false) => format!("{title}. {description}"),
                (false, true) => title.to_string(),
                _ => description.to_string(),
            };
            fields.insert("text".into(), text);
        }
        Request {
            id: self.id.clone(),
            fields,
        }
    }
}

/// One ranked item.
#[derive(Debug, Clone, Serialize)]
pub struct Ranked {
    pub rank: usize,
    pub id: String,
    /// P(positive label), calibrated when the task calibrates; 0 when the model was not
    /// asked (`model_scored` false).
    pub score: f64,
    /// P(positive label) before calibration.
    pub score_raw: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The hybrid ranker's score, which orders the items when the task's `[rank.fusion]`
    /// weighs a lexical stage: the weighted z-scores (over this request's items) of the
    /// word and character TF-IDF similarities to the profile and of `score`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fused: Option<f64>,
    /// Prompt tokens reused from the profile prefix / decoded for this item.
    pub tokens_reused: usize,
    pub tokens_decoded: usize,
    /// Whether the model scored this item; false when the task's weights do not use the
    /// model ([`RankConfig::uses_model`]): then `score` is 0 and only `fused` orders.
    pub model_scored: bool,
}

/// A profile prepared on an engine: its prompt prefix decoded in a slot.
pub struct Ranker {
    /// None when the task's weights do not use the model: nothing is decoded.
    classifier: Option<Classifier>,
    cfg: RankConfig,
    positive: String,
    profile: String,
}

impl Ranker {
    /// Decodes `task`'s prefix with `profile` in it (slot `slot`) and, when the task
    /// calibrates, measures the content-free prior for this profile; neither when `cfg`
    /// does not use the model ([`RankConfig::uses_model`]).
    pub fn new(
        engine: &mut Engine,
        task: &Task,
        cfg: &RankConfig,
        profile: &str,
        slot: usize,
        calibrate: Option<bool>,
    ) -> Result<Ranker, RankError> {
        Self::build(
            engine,
            task,
            cfg,
            profile,
            slot,
            calibrate,
            cfg.uses_model(),
        )
    }

    /// As [`Ranker::new`], but the model scores every item whatever the weights: for
    /// `rank-eval` and `rank-learn`, which measure the model's stage.
    pub fn with_model(
        engine: &mut Engine,
        task: &Task,
        cfg: &RankConfig,
        profile: &str,
        slot: usize,
        calibrate: Option<bool>,
    ) -> Result<Ranker, RankError> {
        Self::build(engine, task, cfg, profile, slot, calibrate, true)
    }

    fn build(
        engine: &mut Engine,
        task: &Task,
        cfg: &RankConfig,
        profile: &str,
        slot: usize,
        calibrate: Option<bool>,
        model: bool,
    ) -> Result<Ranker, RankError> {
        let mut t = task.clone();
        let line = cfg.profile_template.replace("{profile}", profile.trim());
        t.instruction = if t.instruction.is_empty() {
            line
        } else {
            format!("{}{}{}", t.instruction, t.separator, line)
        };
        let classifier = if model {
            Some(Classifier::new(
                engine,
                t,
                slot,
                calibrate,
                Some(AbstainRule::default()),
            )?)
        } else {
            None
        };
        Ok(Ranker {
            classifier,
            cfg: cfg.clone(),
            positive: cfg.positive_label.clone(),
            profile: profile.trim().to_string(),
        })
    }

    /// Tokens of the prefix (instruction, profile, examples), decoded once.
    pub fn prefix_tokens(&self) -> usize {
        self.classifier.as_ref().map_or(0, Classifier::prefix_len)
    }

    /// Scores every item (micro-batches of `batch_size`), in input order.
    pub fn score(
        &self,
        engine: &mut Engine,
        items: &[Item],
        batch_size: usize,
    ) -> Vec<Result<Ranked, RecordError>> {
        let Some(classifier) = &self.classifier else {
            return items.iter().map(|it| Ok(unscored(it))).collect();
        };
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(batch_size.max(1)) {
            let reqs: Vec<Request> = chunk.iter().map(Item::request).collect();
            let results = classifier.classify_many(engine, &reqs, ScorePath::Fast);
            for (item, r) in chunk.iter().zip(results) {
                out.push(r.map(|r| {
                    let raw: Vec<f64> = r
                        .labels
                        .values()
                        .map(|l| match r.score_norm {
                            ScoreNorm::Total => l.logprob_total,
                            ScoreNorm::Mean => l.logprob_mean,
                        })
                        .collect();
                    let raw_p = softmax(&raw);
                    let pos_raw = r
                        .labels
                        .keys()
                        .position(|k| *k == self.positive)
                        .and_then(|i| raw_p.get(i).copied())
                        .unwrap_or(0.0);
                    Ranked {
                        rank: 0,
                        id: item.id.clone(),
                        score: r.scores.get(&self.positive).copied().unwrap_or(0.0),
                        score_raw: pos_raw,
                        title: item.fields.get("title").cloned(),
                        fused: None,
                        tokens_reused: r.tokens.reused,
                        tokens_decoded: r.tokens.decoded,
                        model_scored: true,
                    }
                }));
            }
        }
        out
    }

    /// Sorted by the fused score where the task fuses (else by score; ties: input order),
    /// cut to `top_k` and `min_score` (arguments override the task's; `min_score` is on
    /// `score`), ranks numbered from 1. `items` are the request's candidates, the scored
    /// ones among them.
    pub fn rank(
        &self,
        mut scored: Vec<Ranked>,
        items: &[Item],
        top_k: Option<usize>,
        min_score: Option<f64>,
    ) -> Vec<Ranked> {
        self.fuse(&mut scored, items);
        sort_ranked(&mut scored);
        let min = min_score.unwrap_or(self.cfg.min_score);
        // The cut is on the model's score: items it did not score are not cut.
        scored.retain(|r| !r.model_scored || r.score >= min);
        scored.truncate(top_k.or(self.cfg.top_k).unwrap_or(usize::MAX));
        for (i, r) in scored.iter_mut().enumerate() {
            r.rank = i + 1;
        }
        scored
    }
}

impl Ranker {
    /// Sets each item's fused score when the task's fusion weighs a lexical stage. The
    /// stages are fitted on this request's candidates, without corpus expansion (a request
    /// brings no other corpus; `rank-eval` also measures with one).
    fn fuse(&self, scored: &mut [Ranked], items: &[Item]) {
        if let Some(fused) = fused_scores(&self.profile, &self.cfg.fusion, scored, items) {
            for (r, f) in scored.iter_mut().zip(fused) {
                r.fused = Some(f);
            }
        }
    }
}

/// An item the model was not asked about: only the fusion's lexical stages order it.
fn unscored(item: &Item) -> Ranked {
    Ranked {
        rank: 0,
        id: item.id.clone(),
        score: 0.0,
        score_raw: 0.0,
        title: item.fields.get("title").cloned(),
        fused: None,
        tokens_reused: 0,
        tokens_decoded: 0,
        model_scored: false,
    }
}

/// The fused score of each scored item (see [`Ranked::fused`]); `None` when the weights
/// weigh no lexical stage (the model's score alone orders).
pub fn fused_scores(
    profile: &str,
    w: &hybrid::FusionWeights,
    scored: &[Ranked],
    items: &[Item],
) -> Option<Vec<f64>> {
    if w.lexical == 0.0 && w.char == 0.0 {
        return None;
    }
    let texts: BTreeMap<&str, String> = items
        .iter()
        .rev() // the first of equal ids wins
        .map(|it| (it.id.as_str(), item_text(it)))
        .collect();
    let corpus: Vec<&str> = texts.values().map(String::as_str).collect();
    let stages = hybrid::Stages::fit(&corpus, hybrid::HybridConfig::without_expansion());
    let candidates: Vec<&str> = scored
        .iter()
        .map(|r| texts.get(r.id.as_str()).map_or("", String::as_str))
        .collect();
    let model: Vec<f64> = scored.iter().map(|r| r.score).collect();
    Some(hybrid::fuse(
        &stages.scores(profile, &candidates),
        &model,
        w,
    ))
}

/// The text an item is ranked on (as its prompt sees it).
fn item_text(item: &Item) -> String {
    item.request()
        .fields
        .get("text")
        .cloned()
        .unwrap_or_default()
}

/// Highest fused score first where there is one, else highest score; a stable sort keeps
/// input order among equal scores.
pub fn sort_ranked(scored: &mut [Ranked]) {
    let key = |r: &Ranked| r.fused.unwrap_or(r.score);
    scored.sort_by(|a, b| key(b).total_cmp(&key(a)));
}

/// An item from one JSON line: `{"id", "title", "description"}` or `{"id", "text"}`.
pub fn item_from_line(bytes: &[u8], line: usize) -> Result<Option<Item>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| format!("line {line}: not UTF-8"))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("line {line}: not valid JSON: {e}"))?;
    item_from_value(v, &line.to_string())
        .map(Some)
        .map_err(|e| format!("line {line}: {e}"))
}

/// An item from a JSON object; `default_id` when it has no `id`.
pub fn item_from_value(mut v: serde_json::Value, default_id: &str) -> Result<Item, String> {
    let has_text = ["text", "title", "description"].iter().any(|k| {
        v.get(*k)
            .and_then(|s| s.as_str())
            .is_some_and(|s| !s.trim().is_empty())
    });
    if !has_text {
        return Err("an item needs `title`, `description` or `text`".into());
    }
    // request_from_json wants `text`; a title/description item gets it from Item::request.
    if v.get("text").is_none() {
        v["text"] = serde_json::Value::String(String::new());
    }
    let req = input::request_from_json(v, default_id)?;
    let mut fields = req.fields;
    if fields.get("text").is_some_and(|t| t.is_empty()) {
        fields.remove("text");
    }
    Ok(Item { id: req.id, fields })
}

/// One ranking request over MQTT: `{"id"?, "profile", "items": [item, ...], "top_k"?,
/// "min_score"?}`, items as in [`item_from_value`].
#[derive(Debug, Clone, PartialEq)]
pub struct RankRequest {
    pub id: String,
    pub profile: String,
    pub items: Vec<Item>,
    pub top_k: Option<usize>,
    pub min_score: Option<f64>,
}

/// Most items one request may carry (each costs a decode).
pub const MAX_ITEMS: usize = 256;

/// Parses a ranking request; the error names what is wrong.
pub fn request_from_json(v: serde_json::Value, default_id: &str) -> Result<RankRequest, String> {
    let serde_json::Value::Object(mut o) = v else {
        return Err("a rank request is an object with `profile` and `items`".into());
    };
    let id = match o.remove("id") {
        None | Some(serde_json::Value::Null) => default_id.to_string(),
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => return Err("field `id` must be a string or number".into()),
    };
    let profile = match o.remove("profile") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s,
        Some(serde_json::Value::String(_)) => return Err("`profile` is empty".into()),
        Some(_) => return Err("field `profile` must be a string".into()),
        None => return Err("missing field `profile`".into()),
    };
    let items = match o.remove("items") {
        Some(serde_json::Value::Array(a)) => a,
        Some(_) => return Err("field `items` must be an array of items".into()),
        None => return Err("missing field `items`".into()),
    };
    if items.is_empty() {
        return Err("`items` is empty".into());
    }
    if items.len() > MAX_ITEMS {
        return Err(format!(
            "{} items, over the limit of {MAX_ITEMS} per request",
            items.len()
        ));
    }
    let items = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            item_from_value(v, &(i + 1).to_string()).map_err(|e| format!("item {}: {e}", i + 1))
        })
        .collect::<Result<Vec<Item>, String>>()?;
    let top_k = match o.remove("top_k") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k >= 1 => Some(k as usize),
            _ => return Err("`top_k` must be a whole number of at least 1".into()),
        },
    };
    let min_score = match o.remove("min_score") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(s) if (0.0..=1.0).contains(&s) => Some(s),
            _ => return Err("`min_score` must be a number within 0..=1".into()),
        },
    };
    if let Some(k) = o.keys().next() {
        return Err(format!(
            "unknown field `{k}` (a rank request has id, profile, items, top_k, min_score)"
        ));
    }
    Ok(RankRequest {
        id,
        profile,
        items,
        top_k,
        min_score,
    })
}

/// The answer to a [`RankRequest`]: the ranked items, and the items that could not be
/// scored with their errors (nothing is dropped silently).
#[derive(Debug, Clone, Serialize)]
pub struct RankResult {
    pub id: String,
    pub task: String,
    pub ranked: Vec<Ranked>,
    pub n_items: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedItem>,
    /// Tokens of the profile prefix, decoded once for all items (0 when reused from the
    /// previous request with the same profile).
    pub prefix_tokens_decoded: usize,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailedItem {
    pub id: String,
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
instruction = "Does the item match?"
query = "Item: {text}\nAnswer:"
labels = [{ name = "yes", text = " yes" }, { name = "no", text = " no" }]
"#;

    fn parse(extra: &str) -> Result<Option<RankConfig>, RankError> {
        let t = Task::parse(&format!("{BASE}{extra}"), Path::new("r.toml"), "r").unwrap();
        RankConfig::from_task(&t)
    }

    #[test]
    fn rank_section_defaults_and_errors_name_the_key() {
        assert!(parse("").unwrap().is_none());
        let c = parse("[rank]\ntop_k = 3\n").unwrap().unwrap();
        assert_eq!(
            (c.positive_label.as_str(), c.top_k, c.min_score),
            ("yes", Some(3), 0.0)
        );
        assert_eq!(c.fusion, hybrid::FusionWeights::default());
        let c = parse("[rank.fusion]\nmodel = 0.5\n").unwrap().unwrap();
        assert_eq!((c.fusion.lexical, c.fusion.model), (1.0, 0.5));
        for (extra, key) in [
            (
                "[rank]\npositive_label = \"maybe\"\n",
                "rank.positive_label",
            ),
            (
                "[rank]\nprofile_template = \"User\"\n",
                "rank.profile_template",
            ),
            ("[rank]\nmin_score = 2\n", "rank.min_score"),
            ("[rank]\ntop_k = 0\n", "rank.top_k"),
            ("[rank]\ntopk = 3\n", "rank"),
            (
                "[rank.fusion]\nlexical = 0\nchar = 0\nmodel = 0\n",
                "rank.fusion",
            ),
            ("[rank.fusion]\nbm25 = 1\n", "rank"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn items_from_lines_get_their_text_from_title_and_description() {
        let it = item_from_line(br#"{"id":"a","title":"Pasta","description":"Fresh."}"#, 1)
            .unwrap()
            .unwrap();
        assert_eq!(it.request().fields["text"], "Pasta. Fresh.");
        assert!(!it.fields.contains_key("text"));
        let it = item_from_line(br#"{"text":"just text"}"#, 2)
            .unwrap()
            .unwrap();
        assert_eq!(
            (it.id.as_str(), it.request().fields["text"].as_str()),
            ("2", "just text")
        );
        assert!(item_from_line(br#"{"id":"x"}"#, 3)
            .unwrap_err()
            .contains("line 3"));
        assert!(item_from_line(b"  ", 4).unwrap().is_none());
    }

    #[test]
    fn fusion_orders_by_the_words_when_the_model_cannot_tell() {
        let item = |id: &str, text: &str| Item {
            id: id.into(),
            fields: BTreeMap::from([("text".to_string(), text.to_string())]),
        };
        let items = vec![
            item("tax", "Filing your income tax return before the deadline"),
            item(
                "pasta",
                "Fresh pasta by hand: flour, eggs and a rolling pin",
            ),
            item("tyres", "Changing the tyres of a delivery van"),
        ];
        let scored: Vec<Ranked> = items
            .iter()
            .map(|it| Ranked {
                rank: 0,
                id: it.id.clone(),
                score: 0.5,
                score_raw: 0.5,
                title: None,
                fused: None,
                tokens_reused: 0,
                tokens_decoded: 0,
                model_scored: true,
            })
            .collect();
        let w = hybrid::FusionWeights::default();
        let f = fused_scores(
            "Cooks Italian food, makes pasta and bread",
            &w,
            &scored,
            &items,
        )
        .expect("the default weights fuse");
        assert!(f[1] > f[0] && f[1] > f[2], "{f:?}");
        let model_only = hybrid::FusionWeights::from_array([0.0, 0.0, 1.0]);
        assert!(fused_scores("pasta", &model_only, &scored, &items).is_none());
        // At model weight 0 the model's scores change nothing: skipping the model pass
        // (every score 0) gives the same fused scores.
        let unscored: Vec<Ranked> = items.iter().map(unscored).collect();
        let g = fused_scores(
            "Cooks Italian food, makes pasta and bread",
            &w,
            &unscored,
            &items,
        )
        .expect("the default weights fuse");
        assert_eq!(f, g);
    }

    #[test]
    fn the_model_is_used_only_where_it_counts() {
        let cfg = |fusion: &str, min: f64| {
            let mut c = parse(&format!("[rank]\n{fusion}")).unwrap().unwrap();
            c.min_score = min;
            c
        };
        assert!(!cfg("", 0.0).uses_model(), "default weights: model 0");
        assert!(cfg("[rank.fusion]\nmodel = 0.5\n", 0.0).uses_model());
        assert!(cfg("[rank.fusion]\nlexical = 0\nchar = 0\nmodel = 1\n", 0.0).uses_model());
        assert!(cfg("", 0.3).uses_model(), "a minimum score cuts on P(yes)");
    }

    #[test]
    fn sorting_is_by_score_and_stable() {
        let r = |id: &str, score: f64| Ranked {
            rank: 0,
            id: id.into(),
            score,
            score_raw: score,
            title: None,
            fused: None,
            tokens_reused: 0,
            tokens_decoded: 0,
            model_scored: true,
        };
        let mut v = vec![r("a", 0.2), r("b", 0.9), r("c", 0.2), r("d", 0.5)];
        sort_ranked(&mut v);
        let ids: Vec<&str> = v.iter().map(|x| x.id.as_str()).collect();
        assert_eq!(ids, vec!["b", "d", "a", "c"]);
    }
}
