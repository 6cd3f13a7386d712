//! A learned head on frozen model features: the final hidden states of a fixed feature
//! prompt (PromptEOL by default), standardized, into a multinomial logistic regression
//! (linfa-logistic) with one weight vector per label. Training, the head file, and running
//! a task whose method is the head (alone or combined with the prompt's label scores).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::classify::{
    CalibrationApplied, Classifier, ClassifyResult, LabelDetail, Provenance, RecordError, Request,
    ScorePath, SetupError, Timings, TokenCounts, Truncation,
};
use crate::model::scoring::{decide, softmax, AbstainRule, Token};
use crate::model::{Engine, EngineError, FeatureContext, FeatureParams, PooledStates};
use crate::spec::{Method, Task, Template, TruncatePolicy, TRUNCATED_FIELD};

/// The feature prompt of PromptEOL (Jiang et al. 2023): the last token's state has to
/// predict a one-word summary of the sentence.
pub const PROMPT_EOL: &str = "This sentence : \"{text}\" means in one word:\"";

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

/// How the token states of the feature prompt become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The last token's state.
    Last,
    /// The mean over the prompt's tokens (BOS excluded).
    Mean,
    /// Both, concatenated (twice the width).
    LastMean,
}

impl Pooling {
    pub const ALL: [Pooling; 3] = [Pooling::Last, Pooling::Mean, Pooling::LastMean];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Last => "last",
            Pooling::Mean => "mean",
            Pooling::LastMean => "last_mean",
        }
    }

    pub fn parse(s: &str) -> Option<Pooling> {
        Pooling::ALL
            .into_iter()
            .find(|p| p.name() == s || (s == "last+mean" && *p == Pooling::LastMean))
    }

    /// The feature vector of one sequence's states.
    pub fn apply(self, s: &PooledStates) -> Vec<f32> {
        match self {
            Pooling::Last => s.last.clone(),
            Pooling::Mean => s.mean.clone(),
            Pooling::LastMean => [s.last.as_slice(), s.mean.as_slice()].concat(),
        }
    }
}

/// What the features are: the prompt the text is put into, the pooling, the text budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Template with one `{text}` placeholder.
    pub prompt: String,
    pub pooling: Pooling,
    /// Most tokens of the text kept (the head of the text).
    pub max_text_tokens: usize,
}

impl FeatureSpec {
    pub fn prompt_eol(pooling: Pooling) -> FeatureSpec {
        FeatureSpec {
            prompt: PROMPT_EOL.into(),
            pooling,
            max_text_tokens: 96,
        }
    }

    /// The prompt's literal text before and after `{text}`.
    fn split(&self) -> Result<(String, String), HeadError> {
        let bad = |reason: &str| HeadError::Prompt {
            prompt: self.prompt.clone(),
            reason: reason.into(),
        };
        let t = Template::parse(&self.prompt).map_err(|r| bad(&r))?;
        if t.fields() != [TRUNCATED_FIELD] {
            return Err(bad("needs exactly one placeholder, {text}"));
        }
        let mark = "\u{1}";
        let r = t.render(|_| Some(mark)).map_err(|r| bad(&r))?;
        match r.split_once(mark) {
            Some((a, b)) if !b.contains(mark) => Ok((a.to_string(), b.to_string())),
            _ => Err(bad("{text} may appear once")),
        }
    }
}

/// Turns texts into feature-prompt tokens that always fit the feature context:
/// BOS + tokens(prompt before `{text}`) + the text's first tokens + tokens(after).
pub struct FeatureTokenizer {
    before: Vec<Token>,
    after: Vec<Token>,
    /// Most text tokens kept.
    pub text_budget: usize,
}

impl FeatureTokenizer {
    pub fn new(
        engine: &Engine,
        spec: &FeatureSpec,
        max_tokens: usize,
    ) -> Result<FeatureTokenizer, HeadError> {
        let (a, b) = spec.split()?;
        let before = engine.tokenize(&a, true, false);
        let after = engine.tokenize(&b, false, false);
        let room = max_tokens.saturating_sub(before.len() + after.len());
        if room == 0 {
            return Err(HeadError::Prompt {
                prompt: spec.prompt.clone(),
                reason: format!("leaves no room for text in {max_tokens} tokens"),
            });
        }
        Ok(FeatureTokenizer {
            before,
            after,
            text_budget: room.min(spec.max_text_tokens.max(1)),
        })
    }

    /// The tokens for `text`, and the truncation when the text was cut.
    pub fn tokens(&self, engine: &Engine, text: &str) -> (Vec<Token>, Option<Truncation>) {
        let t = engine.tokenize(text, false, false);
        let kept = t.len().min(self.text_budget);
        let cut = (kept < t.len()).then_some(Truncation {
            policy: TruncatePolicy::KeepHead,
            input_tokens: t.len(),
            kept_tokens: kept,
        });
        let mut out = self.before.clone();
        out.extend_from_slice(&t[..kept]);
        out.extend_from_slice(&self.after);
        (out, cut)
    }
}

/// Pooled states of `texts` under `spec`'s prompt (pooling not applied yet: one pass gives
/// every pooling), with an indicatif bar when `progress`.
pub fn extract_states(
    engine: &Engine,
    fctx: &mut FeatureContext,
    spec: &FeatureSpec,
    texts: &[&str],
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<PooledStates>, HeadError> {
    let tok = FeatureTokenizer::new(engine, spec, fctx.max_tokens())?;
    let seqs: Vec<Vec<Token>> = texts.iter().map(|t| tok.tokens(engine, t).0).collect();
    let base = progress.map(|b| b.position()).unwrap_or(0);
    Ok(fctx.hidden_states(&seqs, |done| {
        if let Some(b) = progress {
            b.set_position(base + done as u64);
        }
    })?)
}

/// A progress bar in the house style (hidden when not wanted).
pub fn progress_bar(len: usize, msg: &str, show: bool) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
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
        softmax(&scores)
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
        let io = |source| HeadError::Io {
            path: path.into(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string(self).map_err(|e| HeadError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(io)
    }

    pub fn load(path: &Path) -> Result<HeadFile, HeadError> {
        let text = std::fs::read_to_string(path).map_err(|source| HeadError::Io {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| HeadError::Invalid {
            path: path.into(),
            reason,
        };
        let h: HeadFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if h.version != HEAD_VERSION {
            return Err(invalid(format!(
                "version {} (this edgeact reads {HEAD_VERSION})",
                h.version
            )));
        }
        let n = h.labels.len();
        let d = h.head.standardizer.mean.len();
        let width = match h.feature.pooling {
            Pooling::LastMean => 2 * h.n_embd,
            _ => h.n_embd,
        };
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

/// A task run through its head (alone or with the prompt's scores).
pub struct HeadClassifier {
    pub task: Task,
    pub head: HeadFile,
    method: Method,
    fctx: FeatureContext,
    tok: FeatureTokenizer,
    /// Task label index -> head label index.
    order: Vec<usize>,
    prompt: Option<Classifier>,
    abstain: AbstainRule,
    head_sha256: String,
}

/// A task ready to classify: by label scores, or through its learned head.
pub enum TaskRunner {
    Prompt(Box<Classifier>),
    Head(Box<HeadClassifier>),
}

impl TaskRunner {
    /// `method` overrides the task file's (`[head] method`); a head method on a task
    /// without a head file is an error.
    pub fn new(
        engine: &mut Engine,
        task: Task,
        slot: usize,
        calibrate: Option<bool>,
        abstain: Option<AbstainRule>,
        method: Option<Method>,
        features: FeatureParams,
    ) -> Result<TaskRunner, SetupError> {
        let method = method.unwrap_or(task.head.as_ref().map_or(Method::Prompt, |h| h.method));
        if method == Method::Prompt {
            return Ok(TaskRunner::Prompt(Box::new(Classifier::new(
                engine, task, slot, calibrate, abstain,
            )?)));
        }
        let name = task.name.clone();
        let err = |source: HeadError| SetupError::Head {
            task: name.clone(),
            source,
        };
        let file = task.head_path().ok_or_else(|| {
            err(HeadError::Train(
                "the task has no [head] file (train one with `edgeact tune --head`)".into(),
            ))
        })?;
        let head = HeadFile::load(&file).map_err(err)?;
        if head.model_sha256 != engine.info.sha256 {
            return Err(err(HeadError::Invalid {
                path: file,
                reason: format!(
                    "trained on the hidden states of model {}, this model is {}",
                    head.model_sha256, engine.info.sha256
                ),
            }));
        }
        if head.n_embd != engine.n_embd() {
            return Err(err(HeadError::Invalid {
                path: file,
                reason: format!(
                    "built for hidden states of width {}, the model's are {}",
                    head.n_embd,
                    engine.n_embd()
                ),
            }));
        }
        let mut order = Vec::new();
        for l in &task.labels {
            match head.labels.iter().position(|h| h == &l.name) {
                Some(i) => order.push(i),
                None => {
                    return Err(err(HeadError::Invalid {
                        path: file,
                        reason: format!("has no label `{}` of the task", l.name),
                    }))
                }
            }
        }
        if head.labels.len() != task.labels.len() {
            return Err(err(HeadError::Invalid {
                path: file,
                reason: format!(
                    "has {} labels, the task {}",
                    head.labels.len(),
                    task.labels.len()
                ),
            }));
        }
        let fctx = engine
            .feature_context(features)
            .map_err(|e| err(HeadError::Engine(e)))?;
        let tok = FeatureTokenizer::new(engine, &head.feature, fctx.max_tokens()).map_err(err)?;
        let prompt = if method == Method::Both {
            Some(Classifier::new(
                engine,
                task.clone(),
                slot,
                calibrate,
                abstain,
            )?)
        } else {
            None
        };
        Ok(TaskRunner::Head(Box::new(HeadClassifier {
            abstain: abstain.unwrap_or(task.abstain),
            head_sha256: head.sha256(),
            task,
            head,
            method,
            fctx,
            tok,
            order,
            prompt,
        })))
    }

    pub fn task(&self) -> &Task {
        match self {
            TaskRunner::Prompt(c) => &c.task,
            TaskRunner::Head(h) => &h.task,
        }
    }

    /// Whether label scores are calibrated (the head's are not).
    pub fn calibrating(&self) -> bool {
        match self {
            TaskRunner::Prompt(c) => c.calibrating(),
            TaskRunner::Head(h) => h.prompt.as_ref().is_some_and(|c| c.calibrating()),
        }
    }

    /// A hash naming what classifies: the template's, or the head file's.
    pub fn template_sha256(&self) -> String {
        match self {
            TaskRunner::Prompt(c) => c.task.template_sha256(),
            TaskRunner::Head(h) => h.head_sha256.clone(),
        }
    }

    pub fn method(&self) -> Method {
        match self {
            TaskRunner::Prompt(_) => Method::Prompt,
            TaskRunner::Head(h) => h.method,
        }
    }

    pub fn classify_many(
        &mut self,
        engine: &mut Engine,
        reqs: &[Request],
        path: ScorePath,
    ) -> Vec<Result<ClassifyResult, RecordError>> {
        match self {
            TaskRunner::Prompt(c) => c.classify_many(engine, reqs, path),
            TaskRunner::Head(h) => h.classify_many(engine, reqs, path),
        }
    }
}

impl HeadClassifier {
    fn classify_many(
        &mut self,
        engine: &mut Engine,
        reqs: &[Request],
        path: ScorePath,
    ) -> Vec<Result<ClassifyResult, RecordError>> {
        let started = Instant::now();
        let mut prompt_results = self
            .prompt
            .as_ref()
            .map(|c| c.classify_many(engine, reqs, path).into_iter());
        let mut seqs = Vec::new();
        let mut cuts = Vec::new();
        let mut checked: Vec<Result<(), RecordError>> = Vec::new();
        for r in reqs {
            let text = r.fields.get(TRUNCATED_FIELD).map(String::as_str);
            match text {
                Some(t) if !t.trim().is_empty() => {
                    let (tokens, cut) = self.tok.tokens(engine, t);
                    seqs.push(tokens);
                    cuts.push(cut);
                    checked.push(Ok(()));
                }
                _ => checked.push(Err(RecordError::EmptyText)),
            }
        }
        let t_decode = Instant::now();
        let states = self.fctx.hidden_states(&seqs, |_| {});
        let decode_ms = t_decode.elapsed().as_secs_f64() * 1e3;
        let states = match states {
            Ok(s) => s,
            Err(e) => {
                let msg = e.to_string();
                return checked
                    .into_iter()
                    .map(|c| {
                        c.and_then(|_| Err(RecordError::Engine(EngineError::Decode(msg.clone()))))
                    })
                    .collect();
            }
        };
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut states = states.into_iter().zip(seqs.iter().zip(cuts));
        let mut out = Vec::with_capacity(reqs.len());
        for (req, c) in reqs.iter().zip(checked) {
            let prompt_res = prompt_results.as_mut().and_then(|it| it.next());
            if let Err(e) = c {
                out.push(Err(e));
                continue;
            }
            let Some((st, (tokens, cut))) = states.next() else {
                out.push(Err(RecordError::Engine(EngineError::Decode(
                    "feature extraction returned too few results".into(),
                ))));
                continue;
            };
            let hp = self
                .head
                .head
                .predict(&self.head.feature.pooling.apply(&st));
            // In task label order.
            let head_probs: Vec<f64> = self.order.iter().map(|&i| hp[i]).collect();
            let res = match prompt_res {
                None => Ok(self.result(engine, req, &head_probs, None, tokens.len(), cut)),
                Some(Err(e)) => Err(e),
                Some(Ok(p)) => {
                    Ok(self.result(engine, req, &head_probs, Some(p), tokens.len(), cut))
                }
            };
            out.push(res.map(|mut r| {
                r.timings_ms.prefill_ms += decode_ms;
                r.timings_ms.total_ms = r.timings_ms.total_ms.max(total_ms);
                r
            }));
        }
        out
    }

    fn result(
        &self,
        engine: &Engine,
        req: &Request,
        head_probs: &[f64],
        prompt: Option<ClassifyResult>,
        n_tokens: usize,
        cut: Option<Truncation>,
    ) -> ClassifyResult {
        let names: Vec<&String> = self.task.labels.iter().map(|l| &l.name).collect();
        let probs = match &prompt {
            Some(p) => softmax(
                &names
                    .iter()
                    .zip(head_probs)
                    .map(|(n, &h)| {
                        h.max(1e-300).ln()
                            + p.scores.get(*n).copied().unwrap_or(0.0).max(1e-300).ln()
                    })
                    .collect::<Vec<_>>(),
            ),
            None => head_probs.to_vec(),
        };
        let d = decide(&probs, &self.abstain);
        let top_label = names[d.top].clone();
        let scores: BTreeMap<String, f64> = names
            .iter()
            .zip(&probs)
            .map(|(n, &p)| ((*n).clone(), p))
            .collect();
        match prompt {
            Some(mut p) => {
                p.label = (!d.abstained).then(|| top_label.clone());
                p.top_label = top_label;
                p.confidence = d.confidence;
                p.margin = d.margin;
                p.abstained = d.abstained;
                p.scores = scores;
                p.tokens.prompt += n_tokens;
                p.tokens.decoded += n_tokens;
                p.provenance.template_sha256 =
                    format!("{}+{}", p.provenance.template_sha256, self.head_sha256);
                p
            }
            None => ClassifyResult {
                id: req.id.clone(),
                task: self.task.name.clone(),
                label: (!d.abstained).then(|| top_label.clone()),
                top_label,
                confidence: d.confidence,
                margin: d.margin,
                abstained: d.abstained,
                labels: names
                    .iter()
                    .zip(&probs)
                    .map(|(n, &prob)| {
                        (
                            (*n).clone(),
                            LabelDetail {
                                prob,
                                logprob_total: prob.max(1e-300).ln(),
                                logprob_mean: prob.max(1e-300).ln(),
                                n_tokens: 0,
                                pruned: false,
                            },
                        )
                    })
                    .collect(),
                scores,
                score_norm: self.task.score,
                calibration: CalibrationApplied {
                    applied: false,
                    prior: None,
                },
                truncated: cut,
                tokens: TokenCounts {
                    prompt: n_tokens,
                    reused: 0,
                    decoded: n_tokens,
                    scored: 0,
                },
                timings_ms: Timings {
                    prefill_ms: 0.0,
                    scoring_ms: 0.0,
                    total_ms: 0.0,
                },
                provenance: Provenance {
                    model: engine
                        .info
                        .path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    model_sha256: engine.info.sha256.clone(),
                    task: self.task.name.clone(),
                    template_sha256: self.head_sha256.clone(),
                    board: engine.info.board.clone(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn feature_prompt_needs_one_text_placeholder() {
        let mut s = FeatureSpec::prompt_eol(Pooling::Mean);
        let (a, b) = s.split().unwrap();
        assert_eq!(a, "This sentence : \"");
        assert_eq!(b, "\" means in one word:\"");
        s.prompt = "no placeholder".into();
        assert!(s.split().is_err());
        s.prompt = "{text} and {text}".into();
        assert!(s.split().is_err());
        s.prompt = "{text} {other}".into();
        assert!(s.split().is_err());
    }

    #[test]
    fn pooling_names_and_widths() {
        let st = PooledStates {
            last: vec![1.0, 2.0],
            mean: vec![3.0, 4.0],
        };
        assert_eq!(Pooling::Last.apply(&st), vec![1.0, 2.0]);
        assert_eq!(Pooling::LastMean.apply(&st), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(Pooling::parse("last+mean"), Some(Pooling::LastMean));
        assert_eq!(Pooling::parse("mean"), Some(Pooling::Mean));
        assert_eq!(Pooling::parse("max"), None);
    }
}
