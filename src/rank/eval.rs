//! `edgeact rank-eval`: ranking quality on a labelled set. Each family (a profile text and
//! the intents it covers, from a TOML file) gets candidates drawn from the data: some
//! utterances of its intents (relevant) and more of other intents; the model's ranking,
//! a TF-IDF cosine ranking (profile vs candidate) and random orderings are scored by
//! NDCG@k in the same run. Also the pure metric and the TF-IDF baseline.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Item, RankConfig, Ranker};
use crate::cmd::AppError;
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::spec::Task;
use crate::util::rng::SplitMix64;

/// NDCG@k of a ranking given as relevance grades in ranked order (binary or graded).
/// `ideal` holds every candidate's grade (the best possible order is computed from it).
pub fn ndcg_at(ranked: &[f64], ideal: &[f64], k: usize) -> f64 {
    let dcg = |g: &[f64]| -> f64 {
        g.iter()
            .take(k)
            .enumerate()
            .map(|(i, &rel)| (2f64.powf(rel) - 1.0) / ((i + 2) as f64).log2())
            .sum()
    };
    let mut best = ideal.to_vec();
    best.sort_by(|a, b| b.total_cmp(a));
    let idcg = dcg(&best);
    if idcg == 0.0 {
        0.0
    } else {
        dcg(ranked) / idcg
    }
}

/// Lower-case word tokens (letters and digits).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// TF-IDF with smoothed IDF, `ln((1 + n) / (1 + df)) + 1`, fitted on a corpus; vectors
/// are L2-normalised so their dot product is the cosine.
pub struct Tfidf {
    idf: HashMap<String, f64>,
    default_idf: f64,
}

impl Tfidf {
    pub fn fit<'a>(docs: impl IntoIterator<Item = &'a str>) -> Tfidf {
        let mut df: HashMap<String, usize> = HashMap::new();
        let mut n = 0usize;
        for d in docs {
            n += 1;
            let mut seen: Vec<String> = words(d);
            seen.sort();
            seen.dedup();
            for w in seen {
                *df.entry(w).or_default() += 1;
            }
        }
        let idf = |df: usize| ((1.0 + n as f64) / (1.0 + df as f64)).ln() + 1.0;
        Tfidf {
            idf: df.into_iter().map(|(w, c)| (w, idf(c))).collect(),
            default_idf: idf(0),
        }
    }

    pub fn vector(&self, text: &str) -> BTreeMap<String, f64> {
        let mut v: BTreeMap<String, f64> = BTreeMap::new();
        for w in words(text) {
            *v.entry(w).or_default() += 1.0;
        }
        for (w, x) in v.iter_mut() {
            *x *= self.idf.get(w).copied().unwrap_or(self.default_idf);
        }
        let norm = v.values().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.values_mut().for_each(|x| *x /= norm);
        }
        v
    }

    pub fn cosine(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> f64 {
        a.iter().filter_map(|(w, x)| b.get(w).map(|y| x * y)).sum()
    }
}

/// A family of intents with the profile text that describes it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub name: String,
    pub profile: String,
    pub intents: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FamiliesFile {
    families: Vec<Family>,
}

/// Everything `edgeact rank-eval` runs with.
#[derive(Debug, Clone)]
pub struct RankEvalConfig {
    pub engine: EngineConfig,
    pub task: Task,
    pub rank: RankConfig,
    /// Labelled JSON lines `{"text", "label", "split"}`.
    pub data: PathBuf,
    pub families: PathBuf,
    /// Candidates are drawn from this split; TF-IDF is fitted on the others.
    pub split: String,
    pub relevant: usize,
    pub candidates: usize,
    pub k: usize,
    pub seed: u64,
    pub random_runs: usize,
    pub calibrate: Option<bool>,
    pub batch_size: usize,
    pub out: Option<PathBuf>,
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

/// Runs the evaluation; prints a table and writes `metrics.json` to `out` when given.
pub fn run(cfg: RankEvalConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|source| AppError::Input {
            what: p.display().to_string(),
            source,
        })
    };
    let families: FamiliesFile = toml::from_str(&read(&cfg.families)?).map_err(|e| {
        AppError::Config(crate::model::config::ConfigError::Parse {
            path: cfg.families.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })
    })?;
    let mut pool: Vec<(String, String)> = Vec::new();
    let mut fit_docs: Vec<String> = Vec::new();
    for line in read(&cfg.data)?.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(text), Some(label)) = (v["text"].as_str(), v["label"].as_str()) else {
            continue;
        };
        if v["split"].as_str() == Some(cfg.split.as_str()) {
            pool.push((label.to_string(), text.to_string()));
        } else {
            fit_docs.push(text.to_string());
        }
    }
    for f in &families.families {
        for i in &f.intents {
            if !pool.iter().any(|(l, _)| l == i) {
                return Err(AppError::Config(
                    crate::model::config::ConfigError::Invalid(crate::util::invalid::Invalid {
                        path: cfg.families.clone(),
                        key: format!("families.{}.intents", f.name),
                        reason: format!("intent `{i}` has no example in split `{}`", cfg.split),
                    }),
                ));
            }
        }
    }
    let tfidf = Tfidf::fit(fit_docs.iter().map(String::as_str));
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let mut rng = SplitMix64(cfg.seed);
    let mut rows = Vec::new();
    let (mut model_all, mut tfidf_all, mut random_all) = (Vec::new(), Vec::new(), Vec::new());
    let mut reused = Vec::new();
    let started = std::time::Instant::now();
    let mut scored_items = 0usize;
    writeln!(
        out,
        "{:<14} {:>5} {:>9} {:>9} {:>9} {:>8}",
        "family", "cands", "model", "tfidf", "random", "prefix"
    )
    .map_err(AppError::Output)?;
    for f in &families.families {
        let mut rel: Vec<&(String, String)> =
            pool.iter().filter(|(l, _)| f.intents.contains(l)).collect();
        let mut other: Vec<&(String, String)> = pool
            .iter()
            .filter(|(l, _)| !f.intents.contains(l))
            .collect();
        rng.shuffle(&mut rel);
        rng.shuffle(&mut other);
        let n_rel = cfg.relevant.min(rel.len());
        let n_other = cfg.candidates.saturating_sub(n_rel).min(other.len());
        let mut cands: Vec<(f64, &(String, String))> = rel[..n_rel]
            .iter()
            .map(|x| (1.0, *x))
            .chain(other[..n_other].iter().map(|x| (0.0, *x)))
            .collect();
        rng.shuffle(&mut cands);
        let grades: Vec<f64> = cands.iter().map(|(g, _)| *g).collect();
        let items: Vec<Item> = cands
            .iter()
            .enumerate()
            .map(|(i, (_, (_, text)))| {
                let mut fields = BTreeMap::new();
                fields.insert("text".to_string(), text.clone());
                Item {
                    id: i.to_string(),
                    fields,
                }
            })
            .collect();
        // The model.
        let ranker = Ranker::new(
            &mut engine,
            &cfg.task,
            &cfg.rank,
            &f.profile,
            0,
            cfg.calibrate,
        )
        .map_err(|e| match e {
            super::RankError::Setup(s) => AppError::Setup(s),
            super::RankError::Invalid { path, key, reason } => {
                AppError::Config(crate::model::config::ConfigError::Invalid(
                    crate::util::invalid::Invalid { path, key, reason },
                ))
            }
        })?;
        let scored: Vec<super::Ranked> = ranker
            .score(&mut engine, &items, cfg.batch_size)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        scored_items += scored.len();
        reused.extend(scored.iter().map(|r| r.tokens_reused as f64));
        let ranked = ranker.rank(scored, None, Some(0.0));
        let model_order: Vec<f64> = ranked
            .iter()
            .filter_map(|r| r.id.parse::<usize>().ok())
            .map(|i| grades[i])
            .collect();
        let model = ndcg_at(&model_order, &grades, cfg.k);
        // TF-IDF cosine between the profile and each candidate.
        let pv = tfidf.vector(&f.profile);
        let mut by_tfidf: Vec<(f64, usize)> = cands
            .iter()
            .enumerate()
            .map(|(i, (_, (_, t)))| (Tfidf::cosine(&pv, &tfidf.vector(t)), i))
            .collect();
        by_tfidf.sort_by(|a, b| b.0.total_cmp(&a.0));
        let tf: Vec<f64> = by_tfidf.iter().map(|(_, i)| grades[*i]).collect();
        let tfidf_ndcg = ndcg_at(&tf, &grades, cfg.k);
        // Random orderings, averaged.
        let random: Vec<f64> = (0..cfg.random_runs.max(1))
            .map(|_| {
                let mut g = grades.clone();
                rng.shuffle(&mut g);
                ndcg_at(&g, &grades, cfg.k)
            })
            .collect();
        let random_ndcg = mean(&random);
        writeln!(
            out,
            "{:<14} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            f.name,
            cands.len(),
            model,
            tfidf_ndcg,
            random_ndcg,
            ranker.prefix_tokens()
        )
        .map_err(AppError::Output)?;
        model_all.push(model);
        tfidf_all.push(tfidf_ndcg);
        random_all.push(random_ndcg);
        rows.push(json!({
            "family": f.name, "candidates": cands.len(), "relevant": n_rel,
            "ndcg_model": model, "ndcg_tfidf": tfidf_ndcg, "ndcg_random": random_ndcg,
            "prefix_tokens": ranker.prefix_tokens(),
            "top5_model": ranked.iter().take(5).map(|r| json!({"score": r.score, "relevant": r.id.parse::<usize>().ok().map(|i| grades[i] > 0.0), "text": cands[r.id.parse::<usize>().unwrap_or(0)].1 .1})).collect::<Vec<_>>(),
        }));
    }
    let secs = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "{:<14} {:>5} {:>9.3} {:>9.3} {:>9.3}\nNDCG@{} over {} families; {} items scored in {:.1} s ({:.1} items/s, profile prefix reused: {:.0} tokens per item on average)",
        "mean", "", mean(&model_all), mean(&tfidf_all), mean(&random_all),
        cfg.k, rows.len(), scored_items, secs, scored_items as f64 / secs.max(1e-9), mean(&reused)
    )
    .map_err(AppError::Output)?;
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir).map_err(AppError::Output)?;
        let metrics = json!({
            "k": cfg.k, "split": cfg.split, "seed": cfg.seed, "random_runs": cfg.random_runs,
            "task": cfg.task.name, "template_sha256": cfg.task.template_sha256(),
            "calibrate": cfg.calibrate.unwrap_or(cfg.task.calibration.enabled),
            "ndcg_model": mean(&model_all), "ndcg_tfidf": mean(&tfidf_all), "ndcg_random": mean(&random_all),
            "items_scored": scored_items, "seconds": secs, "families": rows,
        });
        std::fs::write(dir.join("metrics.json"), format!("{metrics:#}\n"))
            .map_err(AppError::Output)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_is_one_for_the_ideal_order_and_less_otherwise() {
        let g = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let ideal = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        assert!((ndcg_at(&ideal, &g, 5) - 1.0).abs() < 1e-12);
        let worst = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let mid = ndcg_at(&g, &g, 5);
        assert!(mid < 1.0 && mid > ndcg_at(&worst, &g, 5));
        // Relevant items past k count for nothing.
        assert_eq!(ndcg_at(&worst, &g, 4), 0.0);
        assert_eq!(ndcg_at(&[0.0, 0.0], &[0.0, 0.0], 5), 0.0);
        // One relevant at rank 2 of 1: 1/log2(3).
        let x = ndcg_at(&[0.0, 1.0], &[0.0, 1.0], 5);
        assert!((x - 1.0 / 3f64.log2()).abs() < 1e-12);
    }

    #[test]
    fn tfidf_prefers_shared_rare_words() {
        let docs = [
            "my card has not arrived",
            "how do I top up",
            "top up failed",
            "the card is lost",
            "exchange rate for euros",
        ];
        let t = Tfidf::fit(docs);
        let q = t.vector("I want to top up my account");
        let a = t.vector("top up by bank transfer");
        let b = t.vector("exchange rate for dollars");
        assert!(Tfidf::cosine(&q, &a) > Tfidf::cosine(&q, &b));
        let self_sim = Tfidf::cosine(&a, &a);
        assert!((self_sim - 1.0).abs() < 1e-9);
        assert_eq!(words("Top-up, ATM!"), vec!["top", "up", "atm"]);
    }
}
