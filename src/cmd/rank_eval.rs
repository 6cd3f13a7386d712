//! `edgeact rank-eval`: ranking quality on a labelled set. Each family (a profile text and
//! the intents it covers, from a TOML file) gets candidates drawn from the data: some
//! utterances of its intents (relevant) and more of other intents; the model's ranking,
//! a TF-IDF cosine ranking (profile vs candidate), each stage of the hybrid ranker
//! (lexical: TF-IDF with corpus expansion; char: character n-gram TF-IDF), their fusion
//! with the model (the task's `[rank.fusion]` weights), and random orderings are scored by
//! NDCG@k in the same run. The fusion is also scored at several model weights
//! (`ndcg_hybrid_by_w_model` in metrics.json), the figures its weight is chosen from on
//! dev. `draws` > 1 averages several candidate draws per family; `no_model` skips the
//! model (its stage then counts 0), for choosing the first stage quickly on dev.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::AppError;
use crate::model::config::{ConfigError, EngineConfig};
use crate::model::Engine;
use crate::rank::eval::{ndcg_at, Family};
use crate::rank::feedback::FeedbackEvent;
use crate::rank::hybrid::{self, FusionWeights, HybridConfig, Stages};
use crate::rank::{Item, RankConfig, Ranked, Ranker};
use crate::spec::Task;
use crate::util::invalid::Invalid;
use crate::util::rng::SplitMix64;

/// Everything `edgeact rank-eval` runs with.
#[derive(Debug, Clone)]
pub struct RankEvalConfig {
    pub engine: EngineConfig,
    pub task: Task,
    pub rank: RankConfig,
    /// Labelled JSON lines `{"text", "label", "split"?}`.
    pub data: PathBuf,
    pub families: PathBuf,
    /// Candidates are drawn from this split; TF-IDF is fitted on the others.
    pub split: String,
    pub relevant: usize,
    pub candidates: usize,
    pub k: usize,
    pub seed: u64,
    pub random_runs: usize,
    /// Candidate draws per family (NDCG averaged over them).
    pub draws: usize,
    /// Skip the model: its P(yes) counts 0 in the fusion.
    pub no_model: bool,
    pub calibrate: Option<bool>,
    pub batch_size: usize,
    pub out: Option<PathBuf>,
    /// Write every draw as a feedback event (the relevant candidates clicked) to this file:
    /// simulated feedback for `edgeact rank-learn`.
    pub feedback_out: Option<PathBuf>,
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

/// Reads the data through the one labeled-data reader (a row without `split` is in the
/// split [`crate::eval::split_of_unsplit`] gives it, as in `tune` and `eval`; a bad line is
/// an error naming it).
fn read_data(cfg: &RankEvalConfig) -> Result<Data, AppError> {
    let mut pool: Vec<(String, String)> = Vec::new();
    let mut fit_docs: Vec<String> = Vec::new();
    for ex in crate::eval::read_labeled(&cfg.data, None, usize::MAX)? {
        let text = ex.text().to_string();
        if ex.split.as_deref() == Some(cfg.split.as_str()) {
            pool.push((ex.label, text));
        } else {
            fit_docs.push(text);
        }
    }
    Ok((pool, fit_docs))
}

/// NDCG@k of each ordering, for one draw of one family or averaged over several.
#[derive(Debug, Clone, Default)]
struct Scores {
    model: f64,
    tfidf: f64,
    lexical: f64,
    char: f64,
    hybrid: f64,
    random: f64,
    /// The fusion at each weight of [`W_MODEL_GRID`] for the model.
    by_w: Vec<f64>,
}

impl Scores {
    fn mean(all: &[Scores]) -> Scores {
        let m = |f: fn(&Scores) -> f64| mean(&all.iter().map(f).collect::<Vec<_>>());
        Scores {
            model: m(|s| s.model),
            tfidf: m(|s| s.tfidf),
            lexical: m(|s| s.lexical),
            char: m(|s| s.char),
            hybrid: m(|s| s.hybrid),
            random: m(|s| s.random),
            by_w: (0..W_MODEL_GRID.len())
                .map(|i| {
                    mean(
                        &all.iter()
                            .filter_map(|s| s.by_w.get(i).copied())
                            .collect::<Vec<_>>(),
                    )
                })
                .collect(),
        }
    }

    fn line(&self, name: &str, cands: &str, no_model: bool, tail: &str) -> String {
        let model = if no_model {
            "-".to_string()
        } else {
            format!("{:.3}", self.model)
        };
        format!(
            "{name:<14} {cands:>5} {model:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {tail:>8}",
            self.tfidf, self.lexical, self.char, self.hybrid, self.random
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "ndcg_model": self.model, "ndcg_tfidf": self.tfidf, "ndcg_lexical": self.lexical,
            "ndcg_char": self.char, "ndcg_hybrid": self.hybrid, "ndcg_random": self.random,
            "ndcg_hybrid_by_w_model": W_MODEL_GRID.iter().zip(&self.by_w)
                .map(|(w, x)| json!({"w_model": w, "ndcg": x})).collect::<Vec<_>>(),
        })
    }
}

/// One family's scores, averaged over its draws.
struct FamilyScore {
    scores: Scores,
    scored: usize,
    reused: Vec<f64>,
    row: serde_json::Value,
    /// The draws as feedback events (only when `feedback_out` is set).
    events: Vec<FeedbackEvent>,
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
    let corpus: Vec<&str> = fit_docs.iter().map(String::as_str).collect();
    let stages = Stages::fit(&corpus, HybridConfig::default());
    let mut engine = match cfg.no_model {
        true => None,
        false => Some(Engine::load(&cfg.engine, 1)?),
    };
    let mut rng = SplitMix64(cfg.seed);
    let (mut rows, mut all, mut reused) = (Vec::new(), Vec::new(), Vec::new());
    let started = std::time::Instant::now();
    let mut scored_items = 0usize;
    writeln!(
        out,
        "{:<14} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "family", "cands", "model", "tfidf", "lexical", "char", "hybrid", "random", "prefix"
    )
    .map_err(AppError::Output)?;
    let mut events = Vec::new();
    for f in &families.families {
        let s = family(&cfg, engine.as_mut(), &stages, &mut rng, &pool, f, out)?;
        events.extend(s.events);
        scored_items += s.scored;
        reused.extend(s.reused);
        all.push(s.scores);
        rows.push(s.row);
    }
    let secs = started.elapsed().as_secs_f64();
    let m = Scores::mean(&all);
    let model_line = if cfg.no_model {
        format!("no model pass (--no-model), {secs:.1} s")
    } else {
        format!(
            "{} items scored by the model in {:.1} s ({:.1} items/s, profile prefix reused: {:.0} tokens per item on average)",
            scored_items, secs, scored_items as f64 / secs.max(1e-9), mean(&reused)
        )
    };
    writeln!(
        out,
        "{}\nNDCG@{} over {} families, {} draw(s) each; fusion weights {:?}; {model_line}",
        m.line("mean", "", cfg.no_model, ""),
        cfg.k,
        rows.len(),
        cfg.draws.max(1),
        cfg.rank.fusion,
    )
    .map_err(AppError::Output)?;
    if let Some(path) = &cfg.feedback_out {
        let mut text = String::new();
        for e in &events {
            text.push_str(&serde_json::to_string(e).map_err(AppError::Serialize)?);
            text.push('\n');
        }
        std::fs::write(path, text).map_err(AppError::Output)?;
    }
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir).map_err(AppError::Output)?;
        let mut metrics = json!({
            "k": cfg.k, "split": cfg.split, "seed": cfg.seed, "random_runs": cfg.random_runs,
            "draws": cfg.draws.max(1), "no_model": cfg.no_model,
            "task": cfg.task.name, "template_sha256": cfg.task.template_sha256(),
            "calibrate": cfg.calibrate.unwrap_or(cfg.task.calibration.enabled),
            "hybrid": stages.cfg, "fusion": cfg.rank.fusion,
            "items_scored": scored_items, "seconds": secs, "families": rows,
        });
        if let (Some(o), serde_json::Value::Object(s)) = (metrics.as_object_mut(), m.json()) {
            o.extend(s);
        }
        std::fs::write(dir.join("metrics.json"), format!("{metrics:#}\n"))
            .map_err(AppError::Output)?;
    }
    Ok(())
}

/// Model weights the fusion is also scored at (to choose the weight on dev).
const W_MODEL_GRID: [f64; 6] = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0];

/// NDCG@k of the order that sorts `scores` high first (ties to the earlier candidate).
fn ndcg_of(scores: &[f64], grades: &[f64], k: usize) -> f64 {
    let g: Vec<f64> = hybrid::order(scores).iter().map(|&i| grades[i]).collect();
    ndcg_at(&g, grades, k)
}

/// One draw of candidates for a family: their grades (1 relevant) and texts.
fn draw(
    cfg: &RankEvalConfig,
    rng: &mut SplitMix64,
    pool: &[(String, String)],
    f: &Family,
) -> (Vec<f64>, Vec<String>) {
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
    cands.into_iter().map(|(g, (_, t))| (g, t.clone())).unzip()
}

/// The model's score of each candidate (0 where scoring failed), and the scored items.
fn model_scores(
    cfg: &RankEvalConfig,
    engine: &mut Engine,
    ranker: &Ranker,
    texts: &[String],
) -> (Vec<f64>, Vec<Ranked>) {
    let items = items_of(texts);
    let scored: Vec<Ranked> = ranker
        .score(engine, &items, cfg.batch_size)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let mut p_yes = vec![0.0; texts.len()];
    for r in &scored {
        if let Some(p) = r.id.parse::<usize>().ok().and_then(|i| p_yes.get_mut(i)) {
            *p = r.score;
        }
    }
    (p_yes, scored)
}

/// One family: candidates drawn, ranked by the model, by TF-IDF, by the hybrid's stages
/// and their fusion, and at random; its line printed.
fn family(
    cfg: &RankEvalConfig,
    mut engine: Option<&mut Engine>,
    stages: &Stages,
    rng: &mut SplitMix64,
    pool: &[(String, String)],
    f: &Family,
    out: &mut dyn Write,
) -> Result<FamilyScore, AppError> {
    let ranker = match engine.as_deref_mut() {
        Some(e) => Some(Ranker::with_model(
            e,
            &cfg.task,
            &cfg.rank,
            &f.profile,
            0,
            cfg.calibrate,
        )?),
        None => None,
    };
    let (mut draws, mut scored, mut reused, mut top5) = (Vec::new(), 0, Vec::new(), Vec::new());
    let (mut n_cands, mut events) = (0, Vec::new());
    for _ in 0..cfg.draws.max(1) {
        let (grades, texts) = draw(cfg, rng, pool, f);
        n_cands = texts.len();
        if cfg.feedback_out.is_some() {
            events.push(as_event(&cfg.task.name, &f.profile, &grades, &texts));
        }
        let p_yes = match (engine.as_deref_mut(), &ranker) {
            (Some(e), Some(r)) => {
                let (p, s) = model_scores(cfg, e, r, &texts);
                scored += s.len();
                reused.extend(s.iter().map(|r| r.tokens_reused as f64));
                p
            }
            _ => vec![0.0; texts.len()],
        };
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let st = stages.scores(&f.profile, &refs);
        let w = cfg.rank.fusion;
        let fused = hybrid::fuse(&st, &p_yes, &w);
        let by_w = W_MODEL_GRID
            .iter()
            .map(|&m| {
                let w = FusionWeights { model: m, ..w };
                ndcg_of(&hybrid::fuse(&st, &p_yes, &w), &grades, cfg.k)
            })
            .collect();
        if top5.is_empty() {
            top5 = hybrid::order(&fused)
                .into_iter()
                .take(5)
                .map(|i| json!({"relevant": grades[i] > 0.0, "p_yes": p_yes[i], "text": texts[i]}))
                .collect();
        }
        // Random orderings, averaged.
        let random: Vec<f64> = (0..cfg.random_runs.max(1))
            .map(|_| {
                let mut g = grades.clone();
                rng.shuffle(&mut g);
                ndcg_at(&g, &grades, cfg.k)
            })
            .collect();
        draws.push(Scores {
            model: ndcg_of(&p_yes, &grades, cfg.k),
            tfidf: ndcg_of(&st.tfidf, &grades, cfg.k),
            lexical: ndcg_of(&st.lexical, &grades, cfg.k),
            char: ndcg_of(&st.char, &grades, cfg.k),
            hybrid: ndcg_of(&fused, &grades, cfg.k),
            random: mean(&random),
            by_w,
        });
    }
    let scores = Scores::mean(&draws);
    let prefix = ranker.as_ref().map_or(0, Ranker::prefix_tokens);
    writeln!(
        out,
        "{}",
        scores.line(
            &f.name,
            &n_cands.to_string(),
            cfg.no_model,
            &prefix.to_string()
        )
    )
    .map_err(AppError::Output)?;
    let mut row = json!({
        "family": f.name, "candidates": n_cands, "relevant": cfg.relevant,
        "prefix_tokens": prefix, "top5_hybrid_first_draw": top5,
    });
    if let (Some(o), serde_json::Value::Object(s)) = (row.as_object_mut(), scores.json()) {
        o.extend(s);
    }
    Ok(FamilyScore {
        scores,
        scored,
        reused,
        row,
        events,
    })
}

/// The candidates as ranking items: the id is the index, the text the only field.
fn items_of(texts: &[String]) -> Vec<Item> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| Item {
            id: i.to_string(),
            fields: BTreeMap::from([("text".to_string(), text.clone())]),
        })
        .collect()
}

/// One draw as a feedback event: the profile is the query, the relevant items clicked.
fn as_event(task: &str, profile: &str, grades: &[f64], texts: &[String]) -> FeedbackEvent {
    let items = items_of(texts);
    FeedbackEvent {
        task: Some(task.to_string()),
        query: profile.to_string(),
        clicked: (0..grades.len())
            .filter(|&i| grades[i] > 0.0)
            .map(|i| i.to_string())
            .collect(),
        ignored: Vec::new(),
        items,
    }
}
