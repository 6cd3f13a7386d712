//! `edgeact rank-eval`: ranking quality on a labelled set. Each family (a profile text and
//! the intents it covers, from a TOML file) gets candidates drawn from the data: some
//! utterances of its intents (relevant) and more of other intents; the model's ranking,
//! a TF-IDF cosine ranking (profile vs candidate), the hybrid ranker's lexical stage
//! (TF-IDF with corpus expansion) and its fusion with the model, and random orderings are
//! scored by NDCG@k in the same run. The fusion is also scored at several model weights
//! (`ndcg_hybrid_by_w_model` in metrics.json), the figures its weight is chosen from on dev.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::AppError;
use crate::model::config::{ConfigError, EngineConfig};
use crate::model::Engine;
use crate::rank::eval::{ndcg_at, Family, Tfidf};
use crate::rank::hybrid::{self, Expander, HybridConfig};
use crate::rank::{Item, RankConfig, Ranked, Ranker};
use crate::spec::Task;
use crate::util::invalid::Invalid;
use crate::util::jsonl::JsonLines;
use crate::util::rng::SplitMix64;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FamiliesFile {
    families: Vec<Family>,
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

fn read(p: &Path) -> Result<String, AppError> {
    std::fs::read_to_string(p).map_err(|source| AppError::Input {
        what: p.display().to_string(),
        source,
    })
}

/// The (label, text) pool of the candidates' split, and the other texts (TF-IDF's corpus).
type Data = (Vec<(String, String)>, Vec<String>);

fn read_data(cfg: &RankEvalConfig) -> Result<Data, AppError> {
    let mut pool: Vec<(String, String)> = Vec::new();
    let mut fit_docs: Vec<String> = Vec::new();
    let input_err = |source| AppError::Input {
        what: cfg.data.display().to_string(),
        source,
    };
    let mut lines = JsonLines::open(&cfg.data).map_err(input_err)?;
    while let Some((_, line)) = lines.next_line().map_err(input_err)? {
        // Lines that are not a labeled example are not candidates (the data set may carry
        // other records); they are skipped, as TF-IDF's corpus is only the texts.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
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
    Ok((pool, fit_docs))
}

/// One family's scores.
struct FamilyScore {
    model: f64,
    tfidf: f64,
    lexical: f64,
    hybrid: f64,
    by_w: Vec<f64>,
    random: f64,
    scored: usize,
    reused: Vec<f64>,
    row: serde_json::Value,
}

/// Runs the evaluation; prints a table and writes `metrics.json` to `out` when given.
pub fn run(cfg: RankEvalConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let families: FamiliesFile = toml::from_str(&read(&cfg.families)?).map_err(|e| {
        AppError::Config(ConfigError::Parse {
            path: cfg.families.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })
    })?;
    let (pool, fit_docs) = read_data(&cfg)?;
    for f in &families.families {
        for i in &f.intents {
            if !pool.iter().any(|(l, _)| l == i) {
                return Err(AppError::Config(ConfigError::Invalid(Invalid::new(
                    &cfg.families,
                    format!("families.{}.intents", f.name),
                    format!("intent `{i}` has no example in split `{}`", cfg.split),
                ))));
            }
        }
    }
    let tfidf = Tfidf::fit(fit_docs.iter().map(String::as_str));
    let expander = Expander::new(&tfidf, fit_docs.iter().map(String::as_str));
    let lex = Lexical {
        tfidf: &tfidf,
        expander: &expander,
        cfg: HybridConfig::default(),
    };
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let mut rng = SplitMix64(cfg.seed);
    let mut rows = Vec::new();
    let (mut model_all, mut tfidf_all, mut random_all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lexical_all, mut hybrid_all) = (Vec::new(), Vec::new());
    let mut by_w_all: Vec<Vec<f64>> = vec![Vec::new(); W_MODEL_GRID.len()];
    let mut reused = Vec::new();
    let started = std::time::Instant::now();
    let mut scored_items = 0usize;
    writeln!(
        out,
        "{:<14} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "family", "cands", "model", "tfidf", "lexical", "hybrid", "random", "prefix"
    )
    .map_err(AppError::Output)?;
    for f in &families.families {
        let s = family(&cfg, &mut engine, &lex, &mut rng, &pool, f, out)?;
        scored_items += s.scored;
        lexical_all.push(s.lexical);
        hybrid_all.push(s.hybrid);
        for (all, x) in by_w_all.iter_mut().zip(&s.by_w) {
            all.push(*x);
        }
        reused.extend(s.reused);
        model_all.push(s.model);
        tfidf_all.push(s.tfidf);
        random_all.push(s.random);
        rows.push(s.row);
    }
    let secs = started.elapsed().as_secs_f64();
    writeln!(
        out,
        "{:<14} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\nNDCG@{} over {} families; {} items scored in {:.1} s ({:.1} items/s, profile prefix reused: {:.0} tokens per item on average)",
        "mean", "", mean(&model_all), mean(&tfidf_all), mean(&lexical_all), mean(&hybrid_all), mean(&random_all),
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
            "ndcg_lexical": mean(&lexical_all), "ndcg_hybrid": mean(&hybrid_all), "hybrid": lex.cfg,
            "ndcg_hybrid_by_w_model": W_MODEL_GRID.iter().zip(&by_w_all).map(|(w, x)| json!({"w_model": w, "ndcg": mean(x)})).collect::<Vec<_>>(),
            "items_scored": scored_items, "seconds": secs, "families": rows,
        });
        std::fs::write(dir.join("metrics.json"), format!("{metrics:#}\n"))
            .map_err(AppError::Output)?;
    }
    Ok(())
}

/// Model weights the fusion is also scored at (to choose the weight on dev).
const W_MODEL_GRID: [f64; 5] = [0.0, 0.1, 0.25, 0.5, 1.0];

/// The lexical side: TF-IDF, the corpus expander and the hybrid's settings.
struct Lexical<'a> {
    tfidf: &'a Tfidf,
    expander: &'a Expander,
    cfg: HybridConfig,
}

/// NDCG@k of the order that sorts `scores` high first (ties to the earlier candidate).
fn ndcg_of(scores: &[f64], grades: &[f64], k: usize) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let g: Vec<f64> = order.iter().map(|&i| grades[i]).collect();
    ndcg_at(&g, grades, k)
}

/// One family: candidates drawn, ranked by the model, by TF-IDF, by the hybrid's stages
/// and at random; its line printed.
fn family(
    cfg: &RankEvalConfig,
    engine: &mut Engine,
    lex: &Lexical,
    rng: &mut SplitMix64,
    pool: &[(String, String)],
    f: &Family,
    out: &mut dyn Write,
) -> Result<FamilyScore, AppError> {
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
    let ranker = Ranker::new(engine, &cfg.task, &cfg.rank, &f.profile, 0, cfg.calibrate)?;
    let scored: Vec<Ranked> = ranker
        .score(engine, &items, cfg.batch_size)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let n_scored = scored.len();
    let reused = scored.iter().map(|r| r.tokens_reused as f64).collect();
    let ranked = ranker.rank(scored, None, Some(0.0));
    let model_order: Vec<f64> = ranked
        .iter()
        .filter_map(|r| r.id.parse::<usize>().ok())
        .map(|i| grades[i])
        .collect();
    let model = ndcg_at(&model_order, &grades, cfg.k);
    // The hybrid: the lexical stage, then fused with the model's P(yes) (unscored items 0).
    let texts: Vec<&str> = cands.iter().map(|(_, (_, t))| t.as_str()).collect();
    let lexical_scores =
        hybrid::lexical_scores(lex.tfidf, lex.expander, &f.profile, &texts, &lex.cfg);
    let mut p_yes = vec![0.0; cands.len()];
    for r in &ranked {
        if let Ok(i) = r.id.parse::<usize>() {
            p_yes[i] = r.score;
        }
    }
    let lexical = ndcg_of(&lexical_scores, &grades, cfg.k);
    let fused = hybrid::fuse(&lexical_scores, &p_yes, lex.cfg.w_model);
    let hybrid_ndcg = ndcg_of(&fused, &grades, cfg.k);
    let by_w: Vec<f64> = W_MODEL_GRID
        .iter()
        .map(|&w| ndcg_of(&hybrid::fuse(&lexical_scores, &p_yes, w), &grades, cfg.k))
        .collect();
    let tfidf = lex.tfidf;
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
        "{:<14} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}",
        f.name,
        cands.len(),
        model,
        tfidf_ndcg,
        lexical,
        hybrid_ndcg,
        random_ndcg,
        ranker.prefix_tokens()
    )
    .map_err(AppError::Output)?;
    let row = json!({
        "family": f.name, "candidates": cands.len(), "relevant": n_rel,
        "ndcg_model": model, "ndcg_tfidf": tfidf_ndcg, "ndcg_random": random_ndcg,
        "ndcg_lexical": lexical, "ndcg_hybrid": hybrid_ndcg, "ndcg_hybrid_by_w_model": by_w,
        "prefix_tokens": ranker.prefix_tokens(),
        "top5_model": ranked.iter().take(5).map(|r| json!({"score": r.score, "relevant": r.id.parse::<usize>().ok().map(|i| grades[i] > 0.0), "text": cands[r.id.parse::<usize>().unwrap_or(0)].1 .1})).collect::<Vec<_>>(),
    });
    Ok(FamilyScore {
        model,
        tfidf: tfidf_ndcg,
        lexical,
        hybrid: hybrid_ndcg,
        by_w,
        random: random_ndcg,
        scored: n_scored,
        reused,
        row,
    })
}
