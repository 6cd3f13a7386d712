//! Runs a task by its method: the prompt's label scores ([`Classifier`]), its learned head
//! ([`super::head`]) on the feature prompt's hidden states, both (the two distributions
//! multiplied and renormalized), or its stacked scorer ([`super::stack`]: model features,
//! TF-IDF n-grams and, when the stack has that block, the task prompt's label scores; or
//! TF-IDF alone without a model pass). `classify`, `eval`, `serve` and
//! `monitor` all run a task through [`TaskRunner`], so a method scores the same everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use regex::Regex;

use super::features::{FeatureSpec, FeatureTokenizer};
use super::head::{HeadError, HeadFile};
use super::stack::StackFile;
use super::tfidf::TextFeaturizer;
use crate::classify::{
    fail_batch, CalibrationApplied, Classifier, ClassifyResult, LabelDetail, Provenance,
    RecordError, Request, ScorePath, SetupError, Timings, TokenCounts, Truncation,
};
use crate::encoder::Encoder;
use crate::model::scoring::{decide, softmax, AbstainRule, LogprobOver};
use crate::model::{Engine, EngineError, FeatureContext, FeatureParams, ModelInfo, PooledStates};
use crate::spec::{Method, Task, TRUNCATED_FIELD};

/// The model a [`TaskRunner`] runs on: an [`Engine`] (loaded), or only the model file
/// checked and planned ([`ModelInfo`]) when no task of the run reads the model (a stack of
/// TF-IDF and encoder blocks: see [`crate::spec::needs_model`]), or one loaded at first use.
pub trait ModelSource {
    /// The model's identity and plan, for provenance and reports.
    fn info(&self) -> &ModelInfo;
    /// The loaded engine (loaded now if need be); [`EngineError::NotLoaded`] where the run
    /// planned without the weights.
    fn engine(&mut self) -> Result<&mut Engine, EngineError>;
}

impl ModelSource for Engine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn engine(&mut self) -> Result<&mut Engine, EngineError> {
        Ok(self)
    }
}

impl ModelSource for ModelInfo {
    fn info(&self) -> &ModelInfo {
        self
    }
    fn engine(&mut self) -> Result<&mut Engine, EngineError> {
        Err(EngineError::NotLoaded)
    }
}

/// The engine for `cfg` when its tasks need the weights (`cfg.load_weights`, see
/// [`crate::spec::config_for_tasks`]), else the model file checked and planned only (its
/// weights not loaded, said on stderr's log).
pub fn load_model(
    cfg: &crate::model::config::EngineConfig,
    n_prefix_slots: usize,
) -> Result<Box<dyn ModelSource>, EngineError> {
    if cfg.load_weights {
        return Ok(Box::new(Engine::load(cfg, n_prefix_slots)?));
    }
    let info = crate::model::planned_info(cfg, n_prefix_slots)?;
    tracing::info!(
        model = %info.path.display(),
        estimate_mib = info.estimate_mib,
        "model weights not loaded: no task reads the model's hidden states or label scores"
    );
    Ok(Box::new(info))
}

/// A learned scorer read from the file of a task's `[head]`.
pub enum Learned {
    Head(HeadFile),
    Stack(StackFile),
}

impl Learned {
    fn load(path: &std::path::Path, method: Method) -> Result<Learned, HeadError> {
        Ok(if method.uses_stack_file() {
            Learned::Stack(StackFile::load(path)?)
        } else {
            Learned::Head(HeadFile::load(path)?)
        })
    }

    /// The feature prompt, when the scorer reads the model's hidden states.
    pub fn feature(&self) -> Option<&FeatureSpec> {
        match self {
            Learned::Head(h) => Some(&h.feature),
            Learned::Stack(s) => s.stack.needs_features(),
        }
    }

    pub fn labels(&self) -> &[String] {
        match self {
            Learned::Head(h) => &h.labels,
            Learned::Stack(s) => &s.labels,
        }
    }

    fn model(&self) -> (Option<&str>, usize) {
        match self {
            Learned::Head(h) => (Some(&h.model_sha256), h.n_embd),
            Learned::Stack(s) => (s.model_sha256.as_deref(), s.n_embd),
        }
    }

    /// Probabilities in the file's label order.
    pub fn predict(&self, re: &Regex, text: &str, states: Option<&PooledStates>) -> Vec<f64> {
        self.predict_all(re, text, states, None, None)
    }

    /// [`Learned::predict`] with what a stack's other blocks read: the prompt's label
    /// probabilities (file label order) and the sentence encoder's embedding of the text.
    pub fn predict_all(
        &self,
        re: &Regex,
        text: &str,
        states: Option<&PooledStates>,
        prompt: Option<&[f64]>,
        embedding: Option<&[f32]>,
    ) -> Vec<f64> {
        match (self, states) {
            (Learned::Head(h), Some(st)) => h.head.predict(&h.feature.pooling.apply(st)),
            (Learned::Head(h), None) => vec![1.0 / h.labels.len() as f64; h.labels.len()],
            (Learned::Stack(s), st) => s.stack.predict_all(re, text, st, prompt, embedding),
        }
    }

    /// The encoder a stack's encoder block reads (its weights' sha256), if any.
    pub fn encoder(&self) -> Option<&str> {
        match self {
            Learned::Stack(s) => s.stack.needs_encoder(),
            Learned::Head(_) => None,
        }
    }

    /// Whether the scorer reads the task prompt's label scores (a stack's prompt block).
    pub fn needs_prompt(&self) -> bool {
        matches!(self, Learned::Stack(s) if s.stack.needs_prompt())
    }

    /// What a stack's prompt block was fitted over (None: no prompt block).
    pub fn prompt_over(&self) -> Option<LogprobOver> {
        match self {
            Learned::Stack(s) => s.stack.prompt_over(),
            Learned::Head(_) => None,
        }
    }

    pub fn sha256(&self) -> String {
        match self {
            Learned::Head(h) => h.sha256(),
            Learned::Stack(s) => s.sha256(),
        }
    }
}

/// A task run through its learned scorer (alone or with the prompt's scores).
pub struct HeadClassifier {
    pub task: Task,
    pub learned: Learned,
    method: Method,
    /// The model pass, when the scorer reads hidden states.
    features: Option<(FeatureContext, FeatureTokenizer)>,
    /// The sentence encoder, when the stack has an encoder block (shared between tasks).
    encoder: Option<Arc<Encoder>>,
    re: Regex,
    /// Task label index -> scorer label index.
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
    pub fn new<M: ModelSource + ?Sized>(
        model: &mut M,
        task: Task,
        slot: usize,
        calibrate: Option<bool>,
        abstain: Option<AbstainRule>,
        method: Option<Method>,
        features: FeatureParams,
    ) -> Result<TaskRunner, SetupError> {
        let method = method.unwrap_or(task.head.as_ref().map_or(Method::Prompt, |h| h.method));
        let name = task.name.clone();
        let engine_err = |source: EngineError| SetupError::Engine {
            task: name.clone(),
            source,
        };
        if method == Method::Prompt {
            let engine = model.engine().map_err(engine_err)?;
            return Ok(TaskRunner::Prompt(Box::new(Classifier::new(
                engine, task, slot, calibrate, abstain,
            )?)));
        }
        let err = |source: HeadError| SetupError::Head {
            task: name.clone(),
            source,
        };
        let (learned, order) = load_head(model, &task, method).map_err(err)?;
        let features = match learned.feature() {
            Some(spec) => {
                let engine = model.engine().map_err(|e| err(HeadError::Engine(e)))?;
                let fctx = engine
                    .feature_context(features)
                    .map_err(|e| err(HeadError::Engine(e)))?;
                let tok = FeatureTokenizer::new(engine, spec, fctx.max_tokens()).map_err(err)?;
                Some((fctx, tok))
            }
            None => None,
        };
        let encoder = load_encoder(model.info(), &task, &learned).map_err(err)?;
        let prompt = if method == Method::Both || learned.needs_prompt() {
            // A prompt block reads the scores normalized as when it was fitted.
            let mut prompt_task = task.clone();
            if let Some(over) = learned.prompt_over() {
                prompt_task.logprob_over = over;
            }
            Some(Classifier::new(
                model.engine().map_err(engine_err)?,
                prompt_task,
                slot,
                calibrate,
                abstain,
            )?)
        } else {
            None
        };
        Ok(TaskRunner::Head(Box::new(HeadClassifier {
            abstain: abstain.unwrap_or(task.abstain),
            head_sha256: learned.sha256(),
            task,
            learned,
            method,
            features,
            encoder,
            re: TextFeaturizer::regex(),
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

    /// Requests worth one micro-batch: what one decode scores together for this task's
    /// labels (a head without a prompt pass: the engine's general figure; without the
    /// model: [`NO_MODEL_BATCH`]).
    pub fn jobs_per_decode<M: ModelSource + ?Sized>(&self, model: &mut M) -> usize {
        let prompt = match self {
            TaskRunner::Prompt(c) => Some(&**c),
            TaskRunner::Head(h) => h.prompt.as_ref(),
        };
        if !self.needs_engine() {
            return NO_MODEL_BATCH;
        }
        match model.engine() {
            Ok(engine) => prompt.map_or(engine.jobs_per_decode(), |c| {
                engine.jobs_per_decode_for(c.trie())
            }),
            Err(_) => 1,
        }
    }

    /// Whether classifying runs the model (its label scores or hidden states); a stack of
    /// TF-IDF and encoder blocks does not.
    pub fn needs_engine(&self) -> bool {
        match self {
            TaskRunner::Prompt(_) => true,
            TaskRunner::Head(h) => h.prompt.is_some() || h.features.is_some(),
        }
    }

    pub fn classify_many<M: ModelSource + ?Sized>(
        &mut self,
        model: &mut M,
        reqs: &[Request],
        path: ScorePath,
    ) -> Vec<Result<ClassifyResult, RecordError>> {
        match self {
            TaskRunner::Prompt(c) => match model.engine() {
                Ok(engine) => c.classify_many(engine, reqs, path),
                Err(e) => fail_batch(reqs.iter().map(|_| Ok(())).collect(), &e),
            },
            TaskRunner::Head(h) => h.classify_many(model, reqs, path),
        }
    }
}

/// Requests per micro-batch of a task that runs without the model (nothing is shared by a
/// batch: it only bounds how many wait together).
pub const NO_MODEL_BATCH: usize = 16;

/// The encoder beside the model when the stack reads one, checked to be the one it was
/// trained on.
fn load_encoder(
    info: &ModelInfo,
    task: &Task,
    learned: &Learned,
) -> Result<Option<Arc<Encoder>>, HeadError> {
    let Some(want) = learned.encoder() else {
        return Ok(None);
    };
    let file = task.head_path().unwrap_or_default();
    let invalid = |reason: String| HeadError::Invalid {
        path: file.clone(),
        reason,
    };
    let dir = crate::encoder::dir_beside(&info.path);
    let enc = crate::encoder::shared(&dir)
        .map_err(|e| invalid(format!("its stack reads the sentence encoder: {e}")))?;
    if enc.sha256 != want {
        return Err(invalid(format!(
            "trained on the sentence encoder {want}, the one in {} is {}",
            dir.display(),
            enc.sha256
        )));
    }
    Ok(Some(enc))
}

/// The task's head or stack file, checked against the model and the task, and the task
/// label -> file label index map.
fn load_head<M: ModelSource + ?Sized>(
    model: &mut M,
    task: &Task,
    method: Method,
) -> Result<(Learned, Vec<usize>), HeadError> {
    let file = task.head_path().ok_or_else(|| {
        HeadError::Train("the task has no [head] file (train one with `edgeact tune`)".into())
    })?;
    let learned = Learned::load(&file, method)?;
    let (sha, n_embd) = learned.model();
    if learned.feature().is_some() {
        let engine = model.engine().map_err(HeadError::Engine)?;
        if sha != Some(engine.info.sha256.as_str()) {
            return Err(HeadError::Invalid {
                path: file,
                reason: format!(
                    "trained on the hidden states of model {}, this model is {}",
                    sha.unwrap_or("(none)"),
                    engine.info.sha256
                ),
            });
        }
        if n_embd != engine.n_embd() {
            return Err(HeadError::Invalid {
                path: file,
                reason: format!(
                    "built for hidden states of width {n_embd}, the model's are {}",
                    engine.n_embd()
                ),
            });
        }
    }
    let labels = learned.labels();
    let mut order = Vec::new();
    for l in &task.labels {
        match labels.iter().position(|h| h == &l.name) {
            Some(i) => order.push(i),
            None => {
                return Err(HeadError::Invalid {
                    path: file,
                    reason: format!("has no label `{}` of the task", l.name),
                })
            }
        }
    }
    if labels.len() != task.labels.len() {
        return Err(HeadError::Invalid {
            path: file,
            reason: format!(
                "has {} labels, the task {}",
                labels.len(),
                task.labels.len()
            ),
        });
    }
    Ok((learned, order))
}

impl HeadClassifier {
    fn classify_many<M: ModelSource + ?Sized>(
        &mut self,
        model: &mut M,
        reqs: &[Request],
        path: ScorePath,
    ) -> Vec<Result<ClassifyResult, RecordError>> {
        let started = Instant::now();
        // Only a prompt pass or model features need the engine (a stack of TF-IDF and
        // encoder blocks runs on the planned model, its weights not loaded).
        let mut engine = None;
        if self.prompt.is_some() || self.features.is_some() {
            match model.engine() {
                Ok(e) => engine = Some(e),
                Err(e) => return fail_batch(reqs.iter().map(|_| Ok(())).collect(), &e),
            }
        }
        let mut prompt_results = match (&self.prompt, engine.as_deref_mut()) {
            (Some(c), Some(e)) => Some(c.classify_many(e, reqs, path).into_iter()),
            _ => None,
        };
        let mut seqs = Vec::new();
        let mut cuts = Vec::new();
        let mut texts = Vec::new();
        let mut checked: Vec<Result<(), RecordError>> = Vec::new();
        for r in reqs {
            let text = r.fields.get(TRUNCATED_FIELD).map(String::as_str);
            match text {
                Some(t) if !t.trim().is_empty() => {
                    let (tokens, cut) = match (&self.features, engine.as_deref()) {
                        (Some((_, tok)), Some(e)) => tok.tokens(e, t),
                        _ => (Vec::new(), None),
                    };
                    seqs.push(tokens);
                    cuts.push(cut);
                    texts.push(t);
                    checked.push(Ok(()));
                }
                _ => checked.push(Err(RecordError::EmptyText)),
            }
        }
        let t_decode = Instant::now();
        // TF-IDF alone needs no model pass.
        let layers = self
            .learned
            .feature()
            .map_or(&[][..], |f| f.layers.as_slice());
        let states = match &mut self.features {
            Some((fctx, _)) => fctx
                .hidden_states(&seqs, layers, |_| {})
                .map(|v| v.into_iter().map(Some).collect()),
            None => Ok(vec![None; seqs.len()]),
        };
        // The encoder's embeddings, one text at a time (no padding in its forward pass).
        let embeddings: Vec<Option<Vec<f32>>> = match &self.encoder {
            Some(enc) => texts.iter().map(|t| Some(enc.embed(t))).collect(),
            None => vec![None; texts.len()],
        };
        let decode_ms = t_decode.elapsed().as_secs_f64() * 1e3;
        let states: Vec<Option<PooledStates>> = match states {
            Ok(s) => s,
            Err(e) => return fail_batch(checked, &e),
        };
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut states = states
            .into_iter()
            .zip(embeddings)
            .zip(seqs.iter().zip(cuts).zip(texts));
        let info = model.info();
        let mut out = Vec::with_capacity(reqs.len());
        for (req, c) in reqs.iter().zip(checked) {
            let prompt_res = prompt_results.as_mut().and_then(|it| it.next());
            if let Err(e) = c {
                out.push(Err(e));
                continue;
            }
            let Some(((st, emb), ((tokens, cut), text))) = states.next() else {
                out.push(Err(RecordError::Engine(EngineError::Decode(
                    "feature extraction returned too few results".into(),
                ))));
                continue;
            };
            // A stack's prompt block reads the prompt's scores in the file's label order.
            let prompt_row: Option<Vec<f64>> = match &prompt_res {
                Some(Ok(p)) if self.learned.needs_prompt() => Some(
                    self.learned
                        .labels()
                        .iter()
                        .map(|l| p.scores.get(l).copied().unwrap_or(0.0))
                        .collect(),
                ),
                _ => None,
            };
            let hp = self.learned.predict_all(
                &self.re,
                text,
                st.as_ref(),
                prompt_row.as_deref(),
                emb.as_deref(),
            );
            // In task label order.
            let head_probs: Vec<f64> = self.order.iter().map(|&i| hp[i]).collect();
            let res = match prompt_res {
                None => Ok(self.result(info, req, &head_probs, None, tokens.len(), cut)),
                Some(Err(e)) => Err(e),
                Some(Ok(p)) => Ok(self.result(info, req, &head_probs, Some(p), tokens.len(), cut)),
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
        info: &ModelInfo,
        req: &Request,
        head_probs: &[f64],
        prompt: Option<ClassifyResult>,
        n_tokens: usize,
        cut: Option<Truncation>,
    ) -> ClassifyResult {
        match prompt {
            Some(p) => self.combined_result(p, head_probs, n_tokens),
            None => self.head_result(info, req, head_probs, n_tokens, cut),
        }
    }

    /// Method `both`: the prompt's result with the product of the two distributions
    /// (renormalized) as its scores and decision, and the feature tokens counted. A stack
    /// that read the prompt's scores: the prompt's result with the stack's decision.
    fn combined_result(
        &self,
        mut p: ClassifyResult,
        head_probs: &[f64],
        n_tokens: usize,
    ) -> ClassifyResult {
        let probs = if self.method != Method::Both {
            head_probs.to_vec()
        } else {
            self.product(&p, head_probs)
        };
        let d = decide(&probs, &self.abstain);
        let top_label = self.task.labels[d.top].name.clone();
        p.label = (!d.abstained).then(|| top_label.clone());
        p.top_label = top_label;
        p.confidence = d.confidence;
        p.margin = d.margin;
        p.abstained = d.abstained;
        p.scores = self.scores(&probs);
        p.tokens.prompt += n_tokens;
        p.tokens.decoded += n_tokens;
        p.provenance.template_sha256 =
            format!("{}+{}", p.provenance.template_sha256, self.head_sha256);
        p.provenance.method = self.method;
        p
    }

    /// The head's and the prompt's distributions multiplied and renormalized (task order).
    fn product(&self, p: &ClassifyResult, head_probs: &[f64]) -> Vec<f64> {
        softmax(
            &self
                .task
                .labels
                .iter()
                .zip(head_probs)
                .map(|(l, &h)| {
                    h.max(1e-300).ln()
                        + p.scores
                            .get(&l.name)
                            .copied()
                            .unwrap_or(0.0)
                            .max(1e-300)
                            .ln()
                })
                .collect::<Vec<_>>(),
        )
    }

    /// Method `head`: a result from the head's probabilities alone.
    fn head_result(
        &self,
        info: &ModelInfo,
        req: &Request,
        probs: &[f64],
        n_tokens: usize,
        cut: Option<Truncation>,
    ) -> ClassifyResult {
        let d = decide(probs, &self.abstain);
        let top_label = self.task.labels[d.top].name.clone();
        ClassifyResult {
            id: req.id.clone(),
            task: self.task.name.clone(),
            label: (!d.abstained).then(|| top_label.clone()),
            top_label,
            confidence: d.confidence,
            margin: d.margin,
            abstained: d.abstained,
            labels: self
                .task
                .labels
                .iter()
                .zip(probs)
                .map(|(l, &prob)| {
                    (
                        l.name.clone(),
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
            scores: self.scores(probs),
            score_norm: self.task.score,
            // The head's probabilities, as logs: over the labels.
            logprob_over: LogprobOver::Labels,
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
                model: info
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                model_sha256: info.sha256.clone(),
                task: self.task.name.clone(),
                template_sha256: self.head_sha256.clone(),
                board: info.board.clone(),
                method: self.method,
            },
            demos: Vec::new(),
        }
    }

    /// Probability per label name.
    fn scores(&self, probs: &[f64]) -> BTreeMap<String, f64> {
        self.task
            .labels
            .iter()
            .zip(probs)
            .map(|(l, &p)| (l.name.clone(), p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::linear::LrParams;
    use crate::classify::stack::{StackModel, StackParams};
    use crate::classify::tfidf::TextParams;
    use crate::model::budget::Estimate;

    /// The model as `plan` sees it, never loaded.
    fn planned() -> ModelInfo {
        ModelInfo {
            path: "models/m.gguf".into(),
            sha256: "ab".repeat(32),
            architecture: "gemma3".into(),
            board: "x86-dev".into(),
            n_ctx: 2048,
            shrunk_from_ctx: None,
            estimate_mib: 64,
            estimate: Estimate::without_weights(0),
            load_ms: 0.0,
        }
    }

    fn task(dir: &std::path::Path, head: &str) -> Task {
        let src = format!(
            "instruction = \"x\"\nquery = \"T: {{text}}\\nL:\"\n\
             labels = [{{ name = \"card\", text = \" card\" }}, {{ name = \"rate\", text = \" rate\" }}]\n{head}"
        );
        Task::parse(&src, &dir.join("t.toml"), "t").unwrap()
    }

    #[test]
    fn a_tfidf_stack_runs_on_the_planned_model_and_a_prompt_task_asks_for_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let texts = ["card stolen today", "exchange rate wrong"].repeat(4);
        let y = [0, 1].repeat(4);
        let p = StackParams {
            dense: None,
            text: Some(TextParams::words_and_chars()),
            prompt: None,
            lr: LrParams::default(),
        };
        let m = StackModel::fit(&texts, &[], &y, 2, &p).unwrap();
        let labels = vec!["card".to_string(), "rate".to_string()];
        StackFile::new(labels, None, 0, m)
            .save(&dir.path().join("t.stack.json"))
            .unwrap();
        let head = "[head]\nfile = \"t.stack.json\"\nmethod = \"tfidf\"\n";
        let mut info = planned();
        let f = FeatureParams::default();
        let mut r =
            TaskRunner::new(&mut info, task(dir.path(), head), 0, None, None, None, f).unwrap();
        assert!(!r.needs_engine());
        assert_eq!(r.jobs_per_decode(&mut info), NO_MODEL_BATCH);
        let reqs = [Request::text("1", "my card was stolen")];
        let res = r.classify_many(&mut info, &reqs, ScorePath::Fast);
        let res = res[0].as_ref().unwrap();
        assert_eq!(res.top_label, "card");
        assert_eq!(res.provenance.model, "m.gguf");
        assert_eq!(res.provenance.model_sha256, info.sha256);

        // The prompt (or `--method prompt` on the same task) needs the weights: a clear
        // error, not a panic.
        for (head, method) in [("", None), (head, Some(Method::Prompt))] {
            let t = task(dir.path(), head);
            match TaskRunner::new(&mut info, t, 0, None, None, method, f) {
                Err(SetupError::Engine {
                    source: EngineError::NotLoaded,
                    ..
                }) => {}
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a prompt task ran without the weights"),
            }
        }
    }
}
