//! The stacked scorer: one class-balanced, L2-regularized logistic regression
//! ([`super::linear`]) over three blocks: the model's frozen features (standardized, see
//! [`super::features`]), TF-IDF word and character n-grams ([`super::tfidf`]), and the task
//! prompt's label log-probabilities (the prompt method's own output, so the regression can
//! lean on the prompt where the base model is good at the task). Any block may be absent:
//! with the TF-IDF block alone it is plain TF-IDF (method `tfidf`, no model pass at all).
//! A fourth, optional block is the sentence encoder's embedding ([`crate::encoder`]),
//! standardized like the model block; only stacks with it load the encoder.
//! Its file is saved beside the task, like a head file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::features::FeatureSpec;
use super::head::{load_json, save_json, HeadError, LinearHead, Standardizer};
use super::linear::{Design, LrParams, SoftmaxLr, SparseRow};
use super::tfidf::{TextFeaturizer, TextParams};
use crate::model::scoring::LogprobOver;
use crate::model::PooledStates;

/// Stack file format version.
const STACK_VERSION: u32 = 1;

/// The model-feature block: which features, their standardization, and the block's weight
/// (each standardized value is multiplied by `scale`; `1/sqrt(width)` gives the block about
/// unit norm, like one TF-IDF block).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DenseBlock {
    pub feature: FeatureSpec,
    pub standardizer: Standardizer,
    pub scale: f64,
}

impl DenseBlock {
    fn row(&self, states: &PooledStates) -> Vec<f32> {
        self.standardizer
            .apply(&self.feature.pooling.apply(states))
            .into_iter()
            .map(|v| (v * self.scale) as f32)
            .collect()
    }
}

/// Smallest prompt probability taken into the log (a label the prompt rules out still
/// gives a finite feature).
const PROMPT_FLOOR: f64 = 1e-6;

/// The prompt block: the task prompt's label probabilities as log-probabilities centered
/// over the labels (so only their differences count), standardized on the training rows
/// and multiplied by `scale` (`weight / sqrt(labels)`: about unit norm at weight 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptBlock {
    pub standardizer: Standardizer,
    pub scale: f64,
    /// What the prompt's label log-probabilities were normalized over when the block was
    /// fitted: the prompt runs the same way at inference (files from before the field were
    /// fitted over the vocabulary; for labels of several tokens the two differ).
    #[serde(default = "fitted_over_vocab")]
    pub logprob_over: LogprobOver,
}

fn fitted_over_vocab() -> LogprobOver {
    LogprobOver::Vocab
}

impl PromptBlock {
    /// Centered log-probabilities of one row of prompt probabilities (task label order).
    pub fn raw(probs: &[f64]) -> Vec<f32> {
        let logs: Vec<f64> = probs.iter().map(|p| p.max(PROMPT_FLOOR).ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len().max(1) as f64;
        logs.iter().map(|l| (l - mean) as f32).collect()
    }

    fn row(&self, probs: &[f64]) -> Vec<f32> {
        self.standardizer
            .apply(&Self::raw(probs))
            .into_iter()
            .map(|v| (v * self.scale) as f32)
            .collect()
    }
}

/// The sentence-encoder block: which encoder (the sha256 of its weights), the embedding's
/// standardization, and the block's weight (`weight / sqrt(width)`, as the model block).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderBlock {
    pub sha256: String,
    pub standardizer: Standardizer,
    pub scale: f64,
}

impl EncoderBlock {
    fn row(&self, embedding: &[f32]) -> Vec<f32> {
        self.standardizer
            .apply(embedding)
            .into_iter()
            .map(|v| (v * self.scale) as f32)
            .collect()
    }
}

/// The encoder block to fit: the encoder's identity, the block weight relative to unit norm
/// (negative: unscaled, each standardized value as is) and each text's embedding.
#[derive(Debug, Clone, Copy)]
pub struct EncoderFit<'a> {
    pub sha256: &'a str,
    pub weight: f64,
    pub rows: &'a [Vec<f32>],
}

/// The learned parts: the blocks and the regression over them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackModel {
    pub dense: Option<DenseBlock>,
    pub text: Option<TextFeaturizer>,
    /// The prompt's label log-probabilities (absent in files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Box<PromptBlock>>,
    /// The sentence encoder's embedding (absent in files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<Box<EncoderBlock>>,
    pub lr: LrParams,
    pub model: SoftmaxLr,
}

/// What to fit: the blocks and the regression's settings.
#[derive(Debug, Clone)]
pub struct StackParams {
    /// Model features, with the block weight relative to unit norm (None: no model block).
    pub dense: Option<(FeatureSpec, f64)>,
    pub text: Option<TextParams>,
    /// The prompt block's weight relative to unit norm (None: no prompt block).
    pub prompt: Option<f64>,
    pub lr: LrParams,
}

impl StackModel {
    /// Fits on `texts` (with their pooled `states` when there is a model block) and label
    /// indices `y`; without a prompt block (see [`StackModel::fit_blocks`]).
    pub fn fit(
        texts: &[&str],
        states: &[PooledStates],
        y: &[usize],
        n_labels: usize,
        p: &StackParams,
    ) -> Result<StackModel, HeadError> {
        Self::fit_blocks(texts, states, &[], y, n_labels, p)
    }

    /// [`StackModel::fit`] with the prompt's label probabilities of each text (`prompt`,
    /// task label order) for the prompt block.
    pub fn fit_blocks(
        texts: &[&str],
        states: &[PooledStates],
        prompt: &[Vec<f64>],
        y: &[usize],
        n_labels: usize,
        p: &StackParams,
    ) -> Result<StackModel, HeadError> {
        Self::fit_all(texts, states, prompt, None, y, n_labels, p)
    }

    /// [`StackModel::fit_blocks`] with the sentence encoder's embedding of each text as one
    /// more block (`encoder`; None: no encoder block).
    #[allow(clippy::too_many_arguments)]
    pub fn fit_all(
        texts: &[&str],
        states: &[PooledStates],
        prompt: &[Vec<f64>],
        encoder: Option<EncoderFit<'_>>,
        y: &[usize],
        n_labels: usize,
        p: &StackParams,
    ) -> Result<StackModel, HeadError> {
        let text = p.text.map(|tp| TextFeaturizer::fit(texts, tp));
        let sparse: Vec<SparseRow> = text
            .as_ref()
            .map(|t| t.transform_all(texts))
            .unwrap_or_default();
        let dense = match &p.dense {
            Some((feature, weight)) => {
                if states.len() != texts.len() {
                    return Err(HeadError::Train(format!(
                        "{} feature rows for {} texts",
                        states.len(),
                        texts.len()
                    )));
                }
                let raw: Vec<Vec<f32>> = states.iter().map(|s| feature.pooling.apply(s)).collect();
                let standardizer = Standardizer::fit(&raw);
                let width = standardizer.mean.len().max(1);
                Some(DenseBlock {
                    feature: feature.clone(),
                    standardizer,
                    scale: weight / (width as f64).sqrt(),
                })
            }
            None => None,
        };
        let prompt_block = match p.prompt {
            Some(weight) => {
                if prompt.len() != texts.len() || prompt.iter().any(|r| r.len() != n_labels) {
                    return Err(HeadError::Train(format!(
                        "{} prompt score rows for {} texts of {n_labels} labels",
                        prompt.len(),
                        texts.len()
                    )));
                }
                let raw: Vec<Vec<f32>> = prompt.iter().map(|r| PromptBlock::raw(r)).collect();
                Some(Box::new(PromptBlock {
                    standardizer: Standardizer::fit(&raw),
                    scale: weight / (n_labels as f64).sqrt(),
                    // The default; the caller that ran the prompt sets what it used.
                    logprob_over: LogprobOver::default(),
                }))
            }
            None => None,
        };
        let encoder_block = match encoder {
            Some(e) => {
                if e.rows.len() != texts.len() {
                    return Err(HeadError::Train(format!(
                        "{} encoder rows for {} texts",
                        e.rows.len(),
                        texts.len()
                    )));
                }
                let standardizer = Standardizer::fit(e.rows);
                let width = standardizer.mean.len().max(1) as f64;
                let weight = if e.weight < 0.0 {
                    width.sqrt()
                } else {
                    e.weight
                };
                Some(Box::new(EncoderBlock {
                    sha256: e.sha256.to_string(),
                    standardizer,
                    scale: weight / width.sqrt(),
                }))
            }
            None => None,
        };
        let blocks = Blocks {
            dense: dense.as_ref(),
            prompt: prompt_block.as_deref(),
            encoder: encoder_block.as_deref(),
        };
        let dense_rows: Vec<Vec<f32>> = (0..texts.len())
            .map(|i| {
                blocks.row(
                    states.get(i),
                    prompt.get(i).map(Vec::as_slice),
                    encoder.and_then(|e| e.rows.get(i)).map(Vec::as_slice),
                )
            })
            .collect();
        let n_dense = blocks.width();
        let x = Design {
            sparse: &sparse,
            dense: if n_dense == 0 { &[] } else { &dense_rows },
            n_sparse: text.as_ref().map_or(0, TextFeaturizer::width),
            n_dense,
        };
        let model =
            SoftmaxLr::fit(x, y, n_labels, p.lr).map_err(|e| HeadError::Train(e.to_string()))?;
        Ok(StackModel {
            dense,
            text,
            prompt: prompt_block,
            encoder: encoder_block,
            lr: p.lr,
            model,
        })
    }

    /// Whether the prompt's label scores are needed.
    pub fn needs_prompt(&self) -> bool {
        self.prompt.is_some()
    }

    /// What the prompt block's scores must be normalized over (None: no prompt block).
    pub fn prompt_over(&self) -> Option<LogprobOver> {
        self.prompt.as_ref().map(|p| p.logprob_over)
    }

    /// The encoder whose embeddings are needed (its weights' sha256), if any.
    pub fn needs_encoder(&self) -> Option<&str> {
        self.encoder.as_ref().map(|e| e.sha256.as_str())
    }

    /// Whether the model's hidden states are needed.
    pub fn needs_features(&self) -> Option<&FeatureSpec> {
        self.dense.as_ref().map(|d| &d.feature)
    }

    /// Label probabilities of one text (`states` when [`Self::needs_features`]); a prompt
    /// block, if any, stays neutral (see [`StackModel::predict_with`]).
    pub fn predict(&self, re: &Regex, text: &str, states: Option<&PooledStates>) -> Vec<f64> {
        self.predict_with(re, text, states, None)
    }

    /// Label probabilities of one text with the prompt's label probabilities (task label
    /// order) when [`Self::needs_prompt`].
    pub fn predict_with(
        &self,
        re: &Regex,
        text: &str,
        states: Option<&PooledStates>,
        prompt: Option<&[f64]>,
    ) -> Vec<f64> {
        self.predict_all(re, text, states, prompt, None)
    }

    /// [`StackModel::predict_with`] with the encoder's embedding of the text when
    /// [`Self::needs_encoder`] (without it the block stays neutral).
    pub fn predict_all(
        &self,
        re: &Regex,
        text: &str,
        states: Option<&PooledStates>,
        prompt: Option<&[f64]>,
        embedding: Option<&[f32]>,
    ) -> Vec<f64> {
        let sparse = self
            .text
            .as_ref()
            .map(|t| t.transform(re, text))
            .unwrap_or_default();
        let dense = self.blocks().row(states, prompt, embedding);
        self.model.predict(&sparse, &dense)
    }

    fn blocks(&self) -> Blocks<'_> {
        Blocks {
            dense: self.dense.as_ref(),
            prompt: self.prompt.as_deref(),
            encoder: self.encoder.as_deref(),
        }
    }

    /// The model block alone as a [`LinearHead`] (the head file's form), when there is no
    /// TF-IDF or prompt block: the block's scale folded into the weights.
    pub fn to_linear_head(&self) -> Option<(FeatureSpec, LinearHead)> {
        let d = self
            .dense
            .as_ref()
            .filter(|_| self.text.is_none() && self.prompt.is_none() && self.encoder.is_none())?;
        let k = self.model.n_labels;
        let weights = (0..k)
            .map(|c| {
                (0..self.model.n_dense)
                    .map(|j| self.model.weights[j * k + c] as f64 * d.scale)
                    .collect()
            })
            .collect();
        Some((
            d.feature.clone(),
            LinearHead {
                standardizer: d.standardizer.clone(),
                weights,
                bias: self.model.bias.iter().map(|&b| b as f64).collect(),
                temperature: self.model.temperature,
            },
        ))
    }

    /// A short name of the blocks: `stack`, `tfidf` or `head`.
    pub fn kind(&self) -> &'static str {
        match (&self.dense, &self.text, &self.prompt, &self.encoder) {
            (None, _, None, None) => "tfidf",
            (Some(_), None, None, None) => "head",
            _ => "stack",
        }
    }
}

/// The dense blocks of a stack, in column order: model features, prompt, encoder.
struct Blocks<'a> {
    dense: Option<&'a DenseBlock>,
    prompt: Option<&'a PromptBlock>,
    encoder: Option<&'a EncoderBlock>,
}

impl Blocks<'_> {
    fn width(&self) -> usize {
        self.dense.map_or(0, |d| d.standardizer.mean.len())
            + self.prompt.map_or(0, |b| b.standardizer.mean.len())
            + self.encoder.map_or(0, |e| e.standardizer.mean.len())
    }

    /// The dense columns of one row: each block present, from its input when given; a
    /// block without its input is neutral (zeros: the training mean), so the other blocks
    /// keep their columns.
    fn row(
        &self,
        states: Option<&PooledStates>,
        prompt: Option<&[f64]>,
        embedding: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut row = match (self.dense, states) {
            (Some(d), Some(s)) => d.row(s),
            (Some(d), None) => vec![0.0; d.standardizer.mean.len()],
            (None, _) => Vec::new(),
        };
        match (self.prompt, prompt) {
            (Some(b), Some(p)) => row.extend(b.row(p)),
            (Some(b), None) => row.extend(vec![0.0; b.standardizer.mean.len()]),
            (None, _) => {}
        }
        match (self.encoder, embedding) {
            (Some(e), Some(v)) if v.len() == e.standardizer.mean.len() => row.extend(e.row(v)),
            (Some(e), _) => row.extend(vec![0.0; e.standardizer.mean.len()]),
            (None, _) => {}
        }
        row
    }
}

/// The stack file saved next to a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackFile {
    pub version: u32,
    /// Label names in the model's order.
    pub labels: Vec<String>,
    /// The model whose hidden states the model block reads (None without one).
    pub model_sha256: Option<String>,
    pub n_embd: usize,
    /// Free-form record of the data and the measured scores.
    pub measured: BTreeMap<String, serde_json::Value>,
    pub stack: StackModel,
}

impl StackFile {
    pub fn new(
        labels: Vec<String>,
        model_sha256: Option<String>,
        n_embd: usize,
        stack: StackModel,
    ) -> StackFile {
        StackFile {
            version: STACK_VERSION,
            labels,
            model_sha256,
            n_embd,
            measured: BTreeMap::new(),
            stack,
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), HeadError> {
        save_json(self, path)
    }

    pub fn load(path: &Path) -> Result<StackFile, HeadError> {
        let mut f: StackFile = load_json(path)?;
        let invalid = |reason: String| HeadError::Invalid {
            path: PathBuf::from(path),
            reason,
        };
        if f.version != STACK_VERSION {
            return Err(invalid(format!(
                "version {} (this edgeact reads {STACK_VERSION})",
                f.version
            )));
        }
        let s = &mut f.stack;
        let n_sparse = s.text.as_ref().map_or(0, TextFeaturizer::width);
        let n_model = s.dense.as_ref().map_or(0, |d| d.standardizer.mean.len());
        let n_prompt = s.prompt.as_ref().map_or(0, |p| p.standardizer.mean.len());
        let n_encoder = s.encoder.as_ref().map_or(0, |e| e.standardizer.mean.len());
        let n_dense = n_model + n_prompt + n_encoder;
        let encoder_ok = s.encoder.as_ref().is_none_or(|e| {
            !e.sha256.is_empty() && e.standardizer.scale.len() == n_encoder && n_encoder > 0
        });
        let prompt_ok = n_prompt == 0 || n_prompt == f.labels.len();
        let dense_ok = s.dense.as_ref().is_none_or(|d| {
            let width = d.feature.width(f.n_embd);
            d.standardizer.scale.len() == n_model && n_model == width && d.feature.split().is_ok()
        });
        if !s.model.consistent()
            || !prompt_ok
            || s.model.n_labels != f.labels.len()
            || s.model.n_sparse != n_sparse
            || s.model.n_dense != n_dense
            || !dense_ok
            || !encoder_ok
            || (s.dense.is_some() && f.model_sha256.is_none())
        {
            return Err(invalid(format!(
                "shapes do not agree ({} labels, {n_sparse} n-grams, {n_dense} features)",
                f.labels.len()
            )));
        }
        if let Some(t) = s.text.as_mut() {
            t.build_index();
        }
        Ok(f)
    }

    /// Short hash of the file's content, for provenance.
    pub fn sha256(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::features::Pooling;

    fn states(v: f32) -> PooledStates {
        PooledStates {
            last: vec![v, -v, 1.0],
            mean: vec![0.0, v, 0.0],
        }
    }

    /// Texts separate labels 0/1 by words; label 2 shares words with 0 but its features
    /// differ: only the stack gets all three.
    fn data() -> (Vec<&'static str>, Vec<PooledStates>, Vec<usize>) {
        let mut t = Vec::new();
        let mut s = Vec::new();
        let mut y = Vec::new();
        for i in 0..4 {
            let e = i as f32 * 0.05;
            t.extend([
                "card stolen today",
                "exchange rate wrong",
                "card stolen again",
            ]);
            s.extend([states(1.0 + e), states(1.0 - e), states(-1.0 + e)]);
            y.extend([0, 1, 2]);
        }
        (t, s, y)
    }

    fn argmax(p: &[f64]) -> usize {
        (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap()
    }

    #[test]
    fn stack_uses_both_blocks_and_round_trips() {
        let (t, s, y) = data();
        let p = StackParams {
            dense: Some((FeatureSpec::prompt_eol(Pooling::Last), 1.0)),
            text: Some(TextParams::words_and_chars()),
            prompt: None,
            lr: LrParams {
                alpha: 0.1,
                ..LrParams::default()
            },
        };
        let m = StackModel::fit(&t, &s, &y, 3, &p).unwrap();
        assert_eq!(m.kind(), "stack");
        let re = TextFeaturizer::regex();
        assert_eq!(
            argmax(&m.predict(&re, "card stolen", Some(&states(1.0)))),
            0
        );
        assert_eq!(
            argmax(&m.predict(&re, "card stolen", Some(&states(-1.0)))),
            2
        );
        assert_eq!(argmax(&m.predict(&re, "rate wrong", Some(&states(1.0)))), 1);
        let f = StackFile::new(
            vec!["a".into(), "b".into(), "c".into()],
            Some("00".into()),
            3,
            m,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.stack.json");
        f.save(&path).unwrap();
        let g = StackFile::load(&path).unwrap();
        let a = f.stack.predict(&re, "card stolen", Some(&states(0.5)));
        let b = g.stack.predict(&re, "card stolen", Some(&states(0.5)));
        assert_eq!(a, b);
        // A file claiming another feature width is refused.
        let mut bad = g.clone();
        bad.n_embd = 4;
        bad.save(&path).unwrap();
        assert!(StackFile::load(&path)
            .unwrap_err()
            .to_string()
            .contains("shapes"));
    }

    #[test]
    fn a_model_block_alone_becomes_the_same_linear_head() {
        let (t, s, y) = data();
        let p = StackParams {
            dense: Some((FeatureSpec::prompt_eol(Pooling::Mean), 2.0)),
            text: None,
            prompt: None,
            lr: LrParams::default(),
        };
        let m = StackModel::fit(&t, &s, &y, 3, &p).unwrap();
        assert_eq!(m.kind(), "head");
        let (f, head) = m.to_linear_head().unwrap();
        assert_eq!(f.pooling, Pooling::Mean);
        let re = TextFeaturizer::regex();
        let st = states(0.3);
        let a = m.predict(&re, "", Some(&st));
        let b = head.predict(&Pooling::Mean.apply(&st));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} {b:?}");
        }
    }

    #[test]
    fn tfidf_alone_needs_no_features() {
        let (t, _, y) = data();
        let y: Vec<usize> = y.iter().map(|&c| usize::from(c == 1)).collect();
        let p = StackParams {
            dense: None,
            text: Some(TextParams::words_and_chars()),
            prompt: None,
            lr: LrParams::default(),
        };
        let m = StackModel::fit(&t, &[], &y, 2, &p).unwrap();
        assert_eq!(m.kind(), "tfidf");
        assert!(m.needs_features().is_none());
        let re = TextFeaturizer::regex();
        assert_eq!(argmax(&m.predict(&re, "the exchange rate", None)), 1);
        assert_eq!(argmax(&m.predict(&re, "my card", None)), 0);
    }

    #[test]
    fn the_prompt_block_carries_what_the_words_do_not() {
        // Same words for both labels: only the prompt's scores separate them.
        let t = vec!["the same words"; 8];
        let y: Vec<usize> = (0..8).map(|i| i % 2).collect();
        let probs: Vec<Vec<f64>> = y
            .iter()
            .map(|&c| {
                if c == 0 {
                    vec![0.8, 0.2]
                } else {
                    vec![0.3, 0.7]
                }
            })
            .collect();
        let mut p = StackParams {
            dense: None,
            text: Some(TextParams::words_and_chars()),
            prompt: Some(1.0),
            lr: LrParams {
                alpha: 0.1,
                ..LrParams::default()
            },
        };
        let m = StackModel::fit_blocks(&t, &[], &probs, &y, 2, &p).unwrap();
        assert_eq!(m.kind(), "stack");
        assert!(m.needs_prompt() && m.needs_features().is_none());
        let re = TextFeaturizer::regex();
        let a = m.predict_with(&re, "the same words", None, Some(&[0.9, 0.1]));
        let b = m.predict_with(&re, "the same words", None, Some(&[0.1, 0.9]));
        assert_eq!((argmax(&a), argmax(&b)), (0, 1), "{a:?} {b:?}");
        // Without prompt scores the block is neutral: no preference from it.
        let u = m.predict(&re, "the same words", None);
        assert!((u[0] - 0.5).abs() < 0.1, "{u:?}");
        // Saved and loaded, it predicts the same; a file whose prompt block has another
        // width than the labels is refused.
        let f = StackFile::new(vec!["a".into(), "b".into()], None, 0, m);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.stack.json");
        f.save(&path).unwrap();
        let g = StackFile::load(&path).unwrap();
        let c = g
            .stack
            .predict_with(&re, "the same words", None, Some(&[0.9, 0.1]));
        assert_eq!(a, c);
        assert_eq!(
            g.stack.prompt_over(),
            Some(LogprobOver::Labels),
            "as fitted"
        );
        // A block written before its normalization was recorded was fitted over the vocabulary.
        let mut old = serde_json::to_value(&g).unwrap();
        old["stack"]["prompt"]
            .as_object_mut()
            .unwrap()
            .remove("logprob_over");
        std::fs::write(&path, old.to_string()).unwrap();
        let o = StackFile::load(&path).unwrap();
        assert_eq!(o.stack.prompt_over(), Some(LogprobOver::Vocab));
        let mut bad = g.clone();
        bad.labels.push("c".into());
        bad.save(&path).unwrap();
        assert!(StackFile::load(&path).is_err());
        // Rows that do not match the texts are an error, not a panic.
        p.prompt = Some(1.0);
        assert!(StackModel::fit_blocks(&t, &[], &probs[..3], &y, 2, &p).is_err());
    }

    #[test]
    fn the_encoder_block_carries_what_the_words_do_not_and_round_trips() {
        // Words tell labels 0/1 apart; label 2 shares label 0's words and differs only in
        // its (encoder) embedding.
        let (t, _, y) = data();
        let emb: Vec<Vec<f32>> = y
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let e = i as f32 * 0.01;
                if l == 2 {
                    vec![-1.0 + e, 0.2]
                } else {
                    vec![1.0 - e, 0.2 + e]
                }
            })
            .collect();
        let p = StackParams {
            dense: None,
            text: Some(TextParams::words_and_chars()),
            prompt: None,
            lr: LrParams {
                alpha: 0.1,
                ..LrParams::default()
            },
        };
        let enc = EncoderFit {
            sha256: "abc",
            weight: 1.0,
            rows: &emb,
        };
        let m = StackModel::fit_all(&t, &[], &[], Some(enc), &y, 3, &p).unwrap();
        assert_eq!(m.kind(), "stack");
        assert_eq!(m.needs_encoder(), Some("abc"));
        assert!(m.needs_features().is_none() && m.to_linear_head().is_none());
        let re = TextFeaturizer::regex();
        let pred = |m: &StackModel, e: &[f32]| {
            argmax(&m.predict_all(&re, "card stolen", None, None, Some(e)))
        };
        assert_eq!(pred(&m, &[1.0, 0.2]), 0);
        assert_eq!(pred(&m, &[-1.0, 0.2]), 2);
        let f = StackFile::new(vec!["a".into(), "b".into(), "c".into()], None, 0, m);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.stack.json");
        f.save(&path).unwrap();
        let g = StackFile::load(&path).unwrap();
        assert_eq!(pred(&g.stack, &[-1.0, 0.2]), 2);
        // A file whose encoder block lost its identity is refused.
        let mut bad = g.clone();
        if let Some(e) = bad.stack.encoder.as_mut() {
            e.sha256.clear();
        }
        bad.save(&path).unwrap();
        assert!(StackFile::load(&path).is_err());
        // Without the encoder block the words alone cannot tell 0 from 2.
        let words = StackModel::fit(&t, &[], &y, 3, &p).unwrap();
        let probs = words.predict(&re, "card stolen", None);
        assert!((probs[0] - probs[2]).abs() < 0.2, "{probs:?}");
    }
}
