//! `edgeact tune --head`: extracts frozen features of K labeled examples per class (and a
//! dev sample), fits the head for each pooling and L2 strength, keeps the best by dev
//! macro-F1, and writes the head file next to a task file that uses it. Features are
//! cached on disk by model, feature prompt and text, so a second run extracts nothing new.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::classify::head::{
    self, FeatureSpec, FeatureTokenizer, HeadError, HeadFile, LinearHead, Pooling, TrainParams,
};
use crate::cmd::AppError;
use crate::eval::metrics::{self, Metrics, Outcome};
use crate::eval::{self, EvalError, Example};
use crate::model::config::EngineConfig;
use crate::model::scoring::decide;
use crate::model::{Engine, FeatureContext, FeatureParams, PooledStates};
use crate::spec::Method;
use crate::spec::{HeadRef, Task};

/// Pooled states by text, for one model and feature prompt, kept in memory and appended
/// to a file: `[16-byte key][last: n_embd f32 LE][mean: n_embd f32 LE]` records.
pub struct FeatureStore {
    n_embd: usize,
    map: HashMap<[u8; 16], PooledStates>,
    file: Option<PathBuf>,
    /// Key prefix: model, prompt, text budget.
    salt: Vec<u8>,
}

impl FeatureStore {
    /// Opens (or starts) the store for `spec` on this engine's model in `dir`; None keeps
    /// it in memory only. A damaged file is ignored from the first bad record on.
    pub fn open(
        dir: Option<&Path>,
        engine: &Engine,
        spec: &FeatureSpec,
        tok: &FeatureTokenizer,
    ) -> FeatureStore {
        let salt = format!(
            "{}|{}|{}|",
            engine.info.sha256, spec.prompt, tok.text_budget
        )
        .into_bytes();
        let n_embd = engine.n_embd();
        let file = dir.map(|d| {
            let h = Sha256::digest(&salt);
            d.join(format!("{}.f32", hex::encode(&h[..12])))
        });
        let mut map = HashMap::new();
        if let Some(bytes) = file.as_ref().and_then(|f| {
            let mut v = Vec::new();
            std::fs::File::open(f).ok()?.read_to_end(&mut v).ok()?;
            Some(v)
        }) {
            let rec = 16 + 8 * n_embd;
            for r in bytes.chunks_exact(rec) {
                let mut key = [0u8; 16];
                key.copy_from_slice(&r[..16]);
                let floats: Vec<f32> = r[16..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if floats.iter().any(|v| !v.is_finite()) {
                    break;
                }
                map.insert(
                    key,
                    PooledStates {
                        last: floats[..n_embd].to_vec(),
                        mean: floats[n_embd..].to_vec(),
                    },
                );
            }
        }
        FeatureStore {
            n_embd,
            map,
            file,
            salt,
        }
    }

    fn key(&self, text: &str) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(text.as_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&h.finalize()[..16]);
        k
    }

    /// Appends records to the file. Best effort: without it the next run extracts again.
    fn append(&self, records: &[u8]) {
        let Some(f) = &self.file else { return };
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(mut w) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
        {
            let _ = w.write_all(records);
        }
    }

    pub fn cached(&self) -> usize {
        self.map.len()
    }

    /// The states of `texts`, extracting (and saving) the ones not known yet.
    pub fn states(
        &mut self,
        engine: &Engine,
        fctx: &mut FeatureContext,
        spec: &FeatureSpec,
        texts: &[&str],
        show_progress: bool,
        what: &str,
    ) -> Result<Vec<PooledStates>, HeadError> {
        let mut missing: Vec<&str> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for t in texts {
            let k = self.key(t);
            if !self.map.contains_key(&k) && seen.insert(k) {
                missing.push(t);
            }
        }
        if !missing.is_empty() {
            let bar = head::progress_bar(missing.len(), what, show_progress);
            let t0 = Instant::now();
            // In chunks, each saved as it is done: an interrupted run keeps its work.
            for chunk in missing.chunks(64) {
                let got = head::extract_states(engine, fctx, spec, chunk, Some(&bar))?;
                let mut out = Vec::new();
                for (t, s) in chunk.iter().zip(got) {
                    let k = self.key(t);
                    out.extend_from_slice(&k);
                    for v in s.last.iter().chain(&s.mean) {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    self.map.insert(k, s);
                }
                self.append(&out);
            }
            bar.finish_and_clear();
            tracing::info!(
                texts = missing.len(),
                secs = t0.elapsed().as_secs_f64(),
                "features extracted"
            );
        }
        Ok(texts
            .iter()
            .map(|t| {
                // Every text was inserted above.
                self.map
                    .get(&self.key(t))
                    .cloned()
                    .unwrap_or_else(|| PooledStates {
                        last: vec![0.0; self.n_embd],
                        mean: vec![0.0; self.n_embd],
                    })
            })
            .collect())
    }
}

/// The default feature cache folder: `$EDGEACT_CACHE/features` or ~/.cache/edgeact/features.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("EDGEACT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/edgeact")))
        .map(|c| c.join("features"))
}

/// K examples per label from `pool`, the first ones in file order (deterministic).
pub fn per_class(task: &Task, pool: &[Example], k: usize) -> Result<Vec<Example>, EvalError> {
    let mut counts = vec![0usize; task.labels.len()];
    let mut out = Vec::new();
    for e in pool {
        if let Some(i) = task.label_index(&e.label) {
            if counts[i] < k {
                counts[i] += 1;
                out.push(e.clone());
            }
        }
    }
    if let Some(i) = counts.iter().position(|&c| c < k) {
        return Err(EvalError::Shots {
            task: task.name.clone(),
            shots: k,
            label: task.labels[i].name.clone(),
            found: counts[i],
        });
    }
    Ok(out)
}

/// Metrics of label-probability rows against gold label indices.
pub fn score_probs(labels: &[String], gold: &[usize], probs: &[Vec<f64>]) -> Metrics {
    let outcomes: Vec<Outcome> = gold
        .iter()
        .zip(probs)
        .map(|(&g, p)| {
            let d = decide(p, &Default::default());
            Outcome {
                gold: g,
                predicted: d.top,
                confidence: d.confidence,
                abstained: false,
                probs: p.clone(),
            }
        })
        .collect();
    metrics::evaluate(labels, &outcomes, 10)
}

/// One fitted candidate.
pub struct Fitted {
    pub pooling: Pooling,
    pub alpha: f64,
    pub head: LinearHead,
    pub dev: Metrics,
    pub fit_ms: f64,
}

/// Fits a head for each pooling x alpha on `train` states and scores it on `dev` states;
/// returns all, best (by dev macro-F1, earliest on ties) first in `.0`.
pub fn fit_candidates(
    labels: &[String],
    train: (&[PooledStates], &[usize]),
    dev: (&[PooledStates], &[usize]),
    poolings: &[Pooling],
    alphas: &[f64],
    max_iterations: u64,
) -> Result<(usize, Vec<Fitted>), HeadError> {
    let mut all = Vec::new();
    for &pooling in poolings {
        let x: Vec<Vec<f32>> = train.0.iter().map(|s| pooling.apply(s)).collect();
        let dx: Vec<Vec<f32>> = dev.0.iter().map(|s| pooling.apply(s)).collect();
        for &alpha in alphas {
            let t0 = Instant::now();
            let head = LinearHead::train(
                &x,
                train.1,
                labels.len(),
                TrainParams {
                    alpha,
                    max_iterations,
                },
            )?;
            let fit_ms = t0.elapsed().as_secs_f64() * 1e3;
            let probs: Vec<Vec<f64>> = dx.iter().map(|r| head.predict(r)).collect();
            let dev = score_probs(labels, dev.1, &probs);
            all.push(Fitted {
                pooling,
                alpha,
                head,
                dev,
                fit_ms,
            });
        }
    }
    let scores: Vec<Option<f64>> = all.iter().map(|f| Some(f.dev.macro_f1)).collect();
    let best = crate::eval::tune::pick_best(&scores)
        .ok_or_else(|| HeadError::Train("no pooling or alpha to try".into()))?;
    Ok((best, all))
}

/// Settings of `edgeact tune --head`.
#[derive(Debug, Clone)]
pub struct TuneHeadConfig {
    pub engine: EngineConfig,
    /// The task whose labels (and prompt, for `method = "both"`) the head serves.
    pub task: Task,
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    /// Training examples per label.
    pub per_class: usize,
    /// Dev examples at most (evenly spaced sample).
    pub limit: usize,
    pub prompt: String,
    pub poolings: Vec<Pooling>,
    pub alphas: Vec<f64>,
    pub max_text_tokens: usize,
    pub features: FeatureParams,
    pub cache_dir: Option<PathBuf>,
    /// The task file written; the head goes beside it as `<stem>.head.json`.
    pub out: PathBuf,
}

/// The texts and label indices of examples (labels checked before).
pub fn xy<'a>(task: &Task, data: &'a [Example]) -> (Vec<&'a str>, Vec<usize>) {
    data.iter()
        .map(|e| {
            (
                e.request
                    .fields
                    .get(crate::spec::TRUNCATED_FIELD)
                    .map(String::as_str)
                    .unwrap_or(""),
                task.label_index(&e.label).unwrap_or(0),
            )
        })
        .unzip()
}

pub fn tune_head(cfg: TuneHeadConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let started = Instant::now();
    let pool = eval::read_labeled(&cfg.data, Some(&cfg.train_split), usize::MAX)?;
    let dev = eval::read_labeled(&cfg.data, Some(&cfg.dev_split), cfg.limit)?;
    eval::check_labels(&cfg.task, &dev, &cfg.data)?;
    let train = per_class(&cfg.task, &pool, cfg.per_class)?;
    let labels: Vec<String> = cfg.task.labels.iter().map(|l| l.name.clone()).collect();
    let engine = Engine::load(&cfg.engine, 1)?;
    let spec = FeatureSpec {
        prompt: cfg.prompt.clone(),
        pooling: Pooling::Last,
        max_text_tokens: cfg.max_text_tokens,
    };
    let head_err = |e: HeadError| crate::classify::SetupError::Head {
        task: cfg.task.name.clone(),
        source: e,
    };
    let mut fctx = engine
        .feature_context(cfg.features)
        .map_err(|e| head_err(e.into()))?;
    let tok = FeatureTokenizer::new(&engine, &spec, fctx.max_tokens()).map_err(head_err)?;
    let mut store = FeatureStore::open(cfg.cache_dir.as_deref(), &engine, &spec, &tok);
    let (tx, ty) = xy(&cfg.task, &train);
    let (dx, dy) = xy(&cfg.task, &dev);
    writeln!(
        out,
        "task {} | {} labels | train: {} per label = {} examples | dev: {} | features: `{}`, {} cached",
        cfg.task.name,
        labels.len(),
        cfg.per_class,
        train.len(),
        dev.len(),
        cfg.prompt,
        store.cached()
    )
    .map_err(AppError::Output)?;
    let t_feat = Instant::now();
    let train_states = store
        .states(&engine, &mut fctx, &spec, &tx, true, "train features")
        .map_err(head_err)?;
    let dev_states = store
        .states(&engine, &mut fctx, &spec, &dx, true, "dev features")
        .map_err(head_err)?;
    let feat_s = t_feat.elapsed().as_secs_f64();
    let (best, all) = fit_candidates(
        &labels,
        (&train_states, &ty),
        (&dev_states, &dy),
        &cfg.poolings,
        &cfg.alphas,
        TrainParams::default().max_iterations,
    )
    .map_err(head_err)?;
    writeln!(
        out,
        "| pooling | alpha | dev accuracy | dev macro-F1 | dev ECE | fit ms |\n|---|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    for f in &all {
        writeln!(
            out,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.0} |",
            f.pooling.name(),
            f.alpha,
            f.dev.accuracy,
            f.dev.macro_f1,
            f.dev.ece,
            f.fit_ms
        )
        .map_err(AppError::Output)?;
    }
    let b = &all[best];
    let stem = cfg
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| cfg.task.name.clone());
    let head_name = format!("{stem}.head.json");
    let head_path = cfg
        .out
        .parent()
        .map(|d| d.join(&head_name))
        .unwrap_or_else(|| PathBuf::from(&head_name));
    let r4 = |x: f64| (x * 1e4).round() / 1e4;
    let mut measured = BTreeMap::new();
    measured.insert("by".into(), "edgeact tune --head".into());
    measured.insert("data".into(), cfg.data.display().to_string().into());
    measured.insert("train_split".into(), cfg.train_split.clone().into());
    measured.insert("per_class".into(), cfg.per_class.into());
    measured.insert("n_train".into(), train.len().into());
    measured.insert("dev_split".into(), cfg.dev_split.clone().into());
    measured.insert("dev_n".into(), dev.len().into());
    measured.insert("dev_accuracy".into(), r4(b.dev.accuracy).into());
    measured.insert("dev_macro_f1".into(), r4(b.dev.macro_f1).into());
    measured.insert("candidates_tried".into(), all.len().into());
    let file = HeadFile {
        version: 1,
        labels: labels.clone(),
        feature: FeatureSpec {
            pooling: b.pooling,
            ..spec.clone()
        },
        model_sha256: engine.info.sha256.clone(),
        n_embd: engine.n_embd(),
        train: TrainParams {
            alpha: b.alpha,
            ..TrainParams::default()
        },
        measured,
        head: b.head.clone(),
    };
    file.save(&head_path).map_err(head_err)?;
    let mut task = cfg.task.clone();
    task.head = Some(HeadRef {
        file: PathBuf::from(&head_name),
        method: Method::Head,
    });
    let mut m = toml::Table::new();
    m.insert("by".into(), "edgeact tune --head".into());
    m.insert(
        "candidate".into(),
        format!("head, {} pooling, alpha {}", b.pooling.name(), b.alpha).into(),
    );
    m.insert("data".into(), cfg.data.display().to_string().into());
    m.insert("per_class".into(), (cfg.per_class as i64).into());
    m.insert("dev_split".into(), cfg.dev_split.clone().into());
    m.insert("dev_n".into(), (dev.len() as i64).into());
    m.insert("dev_macro_f1".into(), r4(b.dev.macro_f1).into());
    m.insert("dev_accuracy".into(), r4(b.dev.accuracy).into());
    m.insert("model_sha256".into(), engine.info.sha256.clone().into());
    task.measured = Some(m);
    let text = format!(
        "# Written by `edgeact tune --head` from {} ({} per label from `{}`; chosen on `{}`).\n{}",
        cfg.data.display(),
        cfg.per_class,
        cfg.train_split,
        cfg.dev_split,
        task.to_toml()
    );
    std::fs::write(&cfg.out, text).map_err(|source| EvalError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    writeln!(
        out,
        "features: {:.1} s for {} texts ({} now cached); total {:.1} s\nbest: {} pooling, alpha {}: dev accuracy {:.3}, macro-F1 {:.3} -> {} (head {})",
        feat_s,
        train.len() + dev.len(),
        store.cached(),
        started.elapsed().as_secs_f64(),
        b.pooling.name(),
        b.alpha,
        b.dev.accuracy,
        b.dev.macro_f1,
        cfg.out.display(),
        head_path.display()
    )
    .map_err(AppError::Output)?;
    Ok(())
}
