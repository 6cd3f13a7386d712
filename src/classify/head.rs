//! A learned head on frozen model features (see [`super::features`]): standardized, into
//! a multinomial logistic regression (linfa-logistic) with one weight vector per label;
//! its training and the head file saved beside a task. Running a task through its head is
//! [`super::runner`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::features::FeatureSpec;
use crate::model::EngineError;

/// Head file format version.
const HEAD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot read head file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("head file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("feature prompt `{prompt}`: {reason}")]
    Prompt { prompt: String, reason: String },
    #[error("training the head: {0}")]
    Train(String),
    #[error("{0}")]
    Engine(#[from] EngineError),
}

/// Per-feature standardization learned on the training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    /// Standard deviation; 1 where a feature is constant.
    pub scale: Vec<f64>,
}

impl Standardizer {
    pub fn fit(rows: &[Vec<f32>]) -> Standardizer {
        let d = rows.first().map_or(0, Vec::len);
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0.0; d];
        for r in rows {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64 / n;
            }
        }
        let mut var = vec![0.0; d];
        for r in rows {
            for ((s, &m), &v) in var.iter_mut().zip(&mean).zip(r) {
                *s += (v as f64 - m).powi(2) / n;
            }
        }
        let scale = var
            .into_iter()
            .map(|v| if v > 1e-12 { v.sqrt() } else { 1.0 })
            .collect();
        Standardizer { mean, scale }
    }

    pub fn apply(&self, row: &[f32]) -> Vec<f64> {
        row.iter()
            .zip(&self.mean)
            .zip(&self.scale)
            .map(|((&v, m), s)| (v as f64 - m) / s)
            .collect()
    }
}

/// Training settings of the head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    /// L2 penalty on the weights (the loss is the summed log-loss plus alpha/2 |W|^2, so
    /// alpha = 1 is scikit-learn's C = 1).
    pub alpha: f64,
    pub max_iterations: u64,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            alpha: 1.0,
            max_iterations: 200,
        }
    }
}

/// A fitted linear softmax classifier over standardized features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearHead {
    pub standardizer: Standardizer,
    /// One weight vector per label, in label order.
    pub weights: Vec<Vec<f64>>,
    /// One bias per label.
    pub bias: Vec<f64>,
    /// The scores are divided by it before the softmax ([`super::temperature`]; 1 in files
    /// written before temperatures existed).
    #[serde(default = "super::temperature::unit")]
    pub temperature: f64,
}

impl LinearHead {
    /// Fits on `rows` with labels `y` (indices below `n_labels`; every label must occur).
    /// Deterministic: L-BFGS from zero weights.
    pub fn train(
        rows: &[Vec<f32>],
        y: &[usize],
        n_labels: usize,
        params: TrainParams,
    ) -> Result<LinearHead, HeadError> {
        let d = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || d == 0 || rows.len() != y.len() {
            return Err(HeadError::Train(format!(
                "{} rows of width {d} for {} labels",
                rows.len(),
                y.len()
            )));
        }
        if rows.iter().any(|r| r.len() != d) {
            return Err(HeadError::Train("rows of different widths".into()));
        }
        let mut seen = vec![false; n_labels];
        for &c in y {
            if c >= n_labels {
                return Err(HeadError::Train(format!("label index {c} >= {n_labels}")));
            }
            seen[c] = true;
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(HeadError::Train(format!(
                "label index {missing} has no training example"
            )));
        }
        let standardizer = Standardizer::fit(rows);
        let mut x = Array2::<f64>::zeros((rows.len(), d));
        for (i, r) in rows.iter().enumerate() {
            for (j, v) in standardizer.apply(r).into_iter().enumerate() {
                x[[i, j]] = v;
            }
        }
        let targets = Array1::from(y.to_vec());
        let ds = Dataset::new(x, targets);
        let fitted = MultiLogisticRegression::default()
            .alpha(params.alpha)
            .max_iterations(params.max_iterations)
            .fit(&ds)
            .map_err(|e| HeadError::Train(e.to_string()))?;
        // classes() is sorted and every label occurs, so class k is label k; mapped anyway.
        let mut weights = vec![vec![0.0; d]; n_labels];
        let mut bias = vec![0.0; n_labels];
        let p = fitted.params();
        for (k, &c) in fitted.classes().iter().enumerate() {
            weights[c] = p.column(k).to_vec();
            bias[c] = fitted.intercept()[k];
        }
        Ok(LinearHead {
            standardizer,
            weights,
            bias,
            temperature: super::temperature::UNIT,
        })
    }

    /// Label probabilities (softmax of the linear scores).
    pub fn predict(&self, row: &[f32]) -> Vec<f64> {
        let z = self.standardizer.apply(row);
        let scores: Vec<f64> = self
            .weights
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| b + w.iter().zip(&z).map(|(a, x)| a * x).sum::<f64>())
            .collect();
        super::temperature::softmax_at(&scores, self.temperature)
    }
}

/// The head file saved next to a task: everything needed to reproduce the features and
/// apply the head, and what it was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadFile {
    pub version: u32,
    /// Label names in the order of `head.weights`.
    pub labels: Vec<String>,
    pub feature: FeatureSpec,
    /// The model whose hidden states the head reads.
    pub model_sha256: String,
    pub n_embd: usize,
    pub train: TrainParams,
    /// Free-form record of the data and the measured scores.
    pub measured: BTreeMap<String, serde_json::Value>,
    pub head: LinearHead,
}

impl HeadFile {
    pub fn save(&self, path: &Path) -> Result<(), HeadError> {
        save_json(self, path)
    }

    pub fn load(path: &Path) -> Result<HeadFile, HeadError> {
        let h: HeadFile = load_json(path)?;
        let invalid = |reason: String| HeadError::Invalid {
            path: path.into(),
            reason,
        };
        if h.version != HEAD_VERSION {
            return Err(invalid(format!(
                "version {} (this edgeact reads {HEAD_VERSION})",
                h.version
            )));
        }
        let n = h.labels.len();
        let d = h.head.standardizer.mean.len();
        let width = h.feature.width(h.n_embd);
        if n < 2
            || h.head.weights.len() != n
            || h.head.bias.len() != n
            || d != width
            || h.head.standardizer.scale.len() != d
            || h.head.weights.iter().any(|w| w.len() != d)
        {
            return Err(invalid(format!(
                "shapes do not agree ({n} labels, {d} features, {width} expected)"
            )));
        }
        h.feature.split()?;
        Ok(h)
    }

    /// Short hash of the file's content, for provenance.
    pub fn sha256(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }
}

/// Writes a learned file (head or stack) as JSON, creating its folder.
pub(crate) fn save_json<T: Serialize>(value: &T, path: &Path) -> Result<(), HeadError> {
    let io = |source| HeadError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let text = serde_json::to_string(value).map_err(|e| HeadError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(io)
}

/// Reads a learned file (head or stack); its shapes are checked by the caller.
pub(crate) fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, HeadError> {
    let text = std::fs::read_to_string(path).map_err(|source| HeadError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| HeadError::Invalid {
        path: PathBuf::from(path),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::features::Pooling;

    /// Three well-separated clusters in 4 dimensions (one feature constant), by a fixed
    /// pseudo-random walk: deterministic.
    fn toy(n_per: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut s = seed;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
        };
        let centers = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]];
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n_per {
            for (c, m) in centers.iter().enumerate() {
                x.push(vec![m[0] + rnd(), m[1] + rnd(), m[2] + rnd(), 7.0]);
                y.push(c);
            }
        }
        (x, y)
    }

    #[test]
    fn head_learns_a_separable_toy_set() {
        let (x, y) = toy(10, 1);
        let head = LinearHead::train(&x, &y, 3, TrainParams::default()).unwrap();
        let (tx, ty) = toy(20, 99);
        for (row, &gold) in tx.iter().zip(&ty) {
            let p = head.predict(row);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let top = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            assert_eq!(top, gold, "{row:?} -> {p:?}");
            assert!(p[gold] > 0.6, "{p:?}");
        }
        // The constant feature is standardized with scale 1, not divided by zero.
        assert_eq!(head.standardizer.scale[3], 1.0);
        assert_eq!(head.weights.len(), 3);
    }

    #[test]
    fn head_training_is_deterministic_and_labels_keep_their_order() {
        let (x, mut y) = toy(5, 3);
        // Swap label ids 0 and 2: the head must follow the ids, not the sorted order of
        // first appearance.
        for c in y.iter_mut() {
            *c = 2 - *c;
        }
        let a = LinearHead::train(&x, &y, 3, TrainParams::default()).unwrap();
        let b = LinearHead::train(&x, &y, 3, TrainParams::default()).unwrap();
        assert_eq!(a, b);
        let p = a.predict(&[3.0, 0.0, 0.0, 7.0]);
        assert!(p[2] > p[0] && p[2] > p[1], "{p:?}");
    }

    #[test]
    fn training_refuses_bad_shapes_and_missing_labels() {
        let (x, y) = toy(3, 5);
        assert!(LinearHead::train(&x, &y, 4, TrainParams::default())
            .unwrap_err()
            .to_string()
            .contains("label index 3 has no training example"));
        assert!(LinearHead::train(&x, &y[1..], 3, TrainParams::default()).is_err());
        let mut ragged = x.clone();
        ragged[2].pop();
        assert!(LinearHead::train(&ragged, &y, 3, TrainParams::default()).is_err());
    }

    #[test]
    fn head_file_round_trips_and_rejects_wrong_shapes() {
        let (x, y) = toy(5, 7);
        let head = LinearHead::train(&x, &y, 3, TrainParams::default()).unwrap();
        let f = HeadFile {
            version: HEAD_VERSION,
            labels: vec!["a".into(), "b".into(), "c".into()],
            feature: FeatureSpec::prompt_eol(Pooling::Last),
            model_sha256: "00".into(),
            n_embd: 4,
            train: TrainParams::default(),
            measured: BTreeMap::new(),
            head,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.head.json");
        f.save(&p).unwrap();
        let g = HeadFile::load(&p).unwrap();
        for (a, b) in g.head.predict(&x[0]).iter().zip(f.head.predict(&x[0])) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(g.labels, f.labels);
        assert_eq!(g.feature, f.feature);
        let mut bad = f.clone();
        bad.n_embd = 5;
        bad.save(&p).unwrap();
        assert!(HeadFile::load(&p)
            .unwrap_err()
            .to_string()
            .contains("shapes do not agree"));
    }
}
