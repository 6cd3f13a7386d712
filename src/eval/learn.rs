//! The learned head's training side (`edgeact tune --head` and the head rows of
//! `bench-accuracy`): K labeled examples per class, frozen features cached on disk by
//! model, feature prompt and text (so a second run extracts nothing new), and a head fitted
//! for each pooling and L2 strength, the best by dev macro-F1.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::classify::features::{self, FeatureSpec, FeatureTokenizer, Pooling};
use crate::classify::head::{HeadError, LinearHead, TrainParams};
use crate::eval::metrics::{self, Metrics, Outcome};
use crate::eval::{EvalError, Example};
use crate::model::scoring::decide;
use crate::model::{Engine, FeatureContext, PooledStates};
use crate::spec::Task;

/// Pooled states by text, for one model and feature prompt, kept in memory and appended
/// to a file: `[16-byte key][last: width f32 LE][mean: width f32 LE]` records (width: n_embd
/// per layer of the spec). The key includes the layers.
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
        // No layers (the final output) keeps the key it had before layers could be chosen.
        let layers = match spec.layers.is_empty() {
            true => String::new(),
            false => format!("{}|", features::layers_name(&spec.layers)),
        };
        let salt = format!(
            "{}|{}|{}|{layers}",
            engine.info.sha256, spec.prompt, tok.text_budget
        )
        .into_bytes();
        // Width of one pooling: every layer's vector.
        let n_embd = engine.n_embd() * spec.layers.len().max(1);
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
            let bar = features::progress_bar(missing.len(), what, show_progress);
            let t0 = Instant::now();
            // In chunks, each saved as it is done: an interrupted run keeps its work.
            for chunk in missing.chunks(64) {
                let got = features::extract_states(engine, fctx, spec, chunk, Some(&bar))?;
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

/// How a per-label count reads in reports and task files: `all` for the whole train split
/// (usize::MAX), else the count.
pub fn per_class_name(k: usize) -> String {
    if k == usize::MAX {
        "all".to_string()
    } else {
        k.to_string()
    }
}

/// A label with fewer than K training examples, and how many it has.
pub type Shortfall = (String, usize);

/// Up to K examples per label from `pool` (the first ones in file order; K = usize::MAX for
/// the whole pool), and the labels that have fewer than K, with how many they have. Real
/// label sets are imbalanced: a label short of K keeps what there is; only a label without
/// any example is an error.
pub fn per_class_upto(
    task: &Task,
    pool: &[Example],
    k: usize,
) -> Result<(Vec<Example>, Vec<Shortfall>), EvalError> {
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
    if let Some(i) = counts.iter().position(|&c| c == 0) {
        return Err(EvalError::Shots {
            task: task.name.clone(),
            shots: 1,
            label: task.labels[i].name.clone(),
            found: 0,
        });
    }
    let short = if k == usize::MAX {
        Vec::new()
    } else {
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c < k)
            .map(|(i, &c)| (task.labels[i].name.clone(), c))
            .collect()
    };
    Ok((out, short))
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
            let mut head = LinearHead::train(
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
            let dev_metrics = score_probs(labels, dev.1, &probs);
            // Metrics of the unscaled probabilities, as for the stacks (select::fit_temperature).
            head.temperature = crate::classify::temperature::fit(&probs, dev.1);
            all.push(Fitted {
                pooling,
                alpha,
                head,
                dev: dev_metrics,
                fit_ms,
            });
        }
    }
    let scores: Vec<Option<f64>> = all.iter().map(|f| Some(f.dev.macro_f1)).collect();
    let best = crate::eval::tune::pick_best(&scores)
        .ok_or_else(|| HeadError::Train("no pooling or alpha to try".into()))?;
    Ok((best, all))
}

/// The texts and label indices of examples (labels checked before).
pub fn xy<'a>(task: &Task, data: &'a [Example]) -> (Vec<&'a str>, Vec<usize>) {
    data.iter()
        .map(|e| (e.text(), task.label_index(&e.label).unwrap_or(0)))
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Request;

    fn task() -> Task {
        let src = "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\nlabels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n";
        Task::parse(src, Path::new("t.toml"), "t").unwrap()
    }

    fn ex(label: &str, i: usize) -> Example {
        Example {
            request: Request::text(format!("{label}{i}"), format!("text {label} {i}")),
            label: label.into(),
            split: Some("train".into()),
        }
    }

    #[test]
    fn per_class_upto_keeps_the_first_k_and_names_labels_short_of_k() {
        // 5 of `a`, 2 of `b`, interleaved as a file would have them.
        let pool: Vec<Example> = (0..5)
            .map(|i| ex("a", i))
            .chain((0..2).map(|i| ex("b", i)))
            .collect();
        let (k3, short) = per_class_upto(&task(), &pool, 3).unwrap();
        let ids: Vec<&str> = k3.iter().map(|e| e.request.id.as_str()).collect();
        assert_eq!(ids, ["a0", "a1", "a2", "b0", "b1"]);
        assert_eq!(short, vec![("b".to_string(), 2)]);
        let (all, short) = per_class_upto(&task(), &pool, usize::MAX).unwrap();
        assert_eq!(all.len(), 7);
        assert!(short.is_empty(), "{short:?}");
        let only_a: Vec<Example> = pool.iter().filter(|e| e.label == "a").cloned().collect();
        let err = per_class_upto(&task(), &only_a, usize::MAX).unwrap_err();
        assert!(err.to_string().contains('b'), "{err}");
    }

    #[test]
    fn the_whole_split_reads_all() {
        assert_eq!(per_class_name(usize::MAX), "all");
        assert_eq!(per_class_name(8), "8");
    }
}
