//! Classification of one task: turns requests into prompts (fixed prefix + per-request
//! suffix, with the input token budget), scores the labels on the engine, and turns
//! scores into a calibrated, explainable result.

pub mod demos;
pub mod features;
pub mod head;
pub mod input;
pub mod linear;
pub mod runner;
pub mod stack;
pub mod temperature;
pub mod tfidf;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::model::scoring::{
    decide, softmax, AbstainRule, LabelLogprob, LabelTrie, LogprobOver, Prior, Token,
};
use crate::model::{Engine, EngineError, ScoreJob, ScoreOut};
use crate::spec::{ScoreNorm, SpecError, Task, TruncatePolicy, TRUNCATED_FIELD};

/// Why a task could not be set up on the model.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "task `{task}`: label `{label}` cannot be tokenized apart from the query's end ({reason})"
    )]
    LabelTokens {
        task: String,
        label: String,
        reason: String,
    },
    #[error("task `{task}`: {source}")]
    Trie {
        task: String,
        source: crate::model::scoring::TrieError,
    },
    #[error("task `{task}`: the fixed prompt is {prefix_tokens} tokens, leaving no room in n_ctx {n_ctx} for inputs")]
    PrefixTooLong {
        task: String,
        prefix_tokens: usize,
        n_ctx: usize,
    },
    #[error("task `{task}`: the model's chat template cannot be used: {reason}")]
    ChatTemplate { task: String, reason: String },
    #[error("task `{task}`: {source}")]
    Engine { task: String, source: EngineError },
    #[error("task `{task}`: [demos]: {reason}")]
    Demos { task: String, reason: String },
    #[error("task `{task}`: {source}")]
    Head {
        task: String,
        source: crate::classify::head::HeadError,
    },
}

/// Why one request got an error record instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("`text` is empty")]
    EmptyText,
    #[error("{0}")]
    Field(String),
    #[error("input is {tokens} tokens, over the task's budget of {max} (truncate = \"reject\")")]
    TooLong { tokens: usize, max: usize },
    #[error("{0}")]
    Engine(#[from] EngineError),
}

impl RecordError {
    /// A stable, machine-readable kind for error records.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::EmptyText => "empty_text",
            RecordError::Field(_) => "missing_field",
            RecordError::TooLong { .. } => "too_long",
            RecordError::Engine(EngineError::ContextFull { .. }) => "context_full",
            RecordError::Engine(_) => "engine",
        }
    }
}

/// One request: an id and the fields the template may use (`text` at least).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

impl Request {
    pub fn text(id: impl Into<String>, text: impl Into<String>) -> Request {
        let mut fields = BTreeMap::new();
        fields.insert(TRUNCATED_FIELD.to_string(), text.into());
        Request {
            id: id.into(),
            fields,
        }
    }
}

/// How the scoring path is chosen (the naive path exists to check and benchmark the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorePath {
    /// Prefix reuse, label trie, micro-batching.
    Fast,
    /// Every label from an empty cache.
    Naive,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Truncation {
    pub policy: TruncatePolicy,
    pub input_tokens: usize,
    pub kept_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenCounts {
    /// The whole prompt, prefix included.
    pub prompt: usize,
    /// Prompt tokens taken from the cached prefix.
    pub reused: usize,
    /// Tokens decoded for this request (suffix and label tokens).
    pub decoded: usize,
    /// Label tokens scored.
    pub scored: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Time in llama.cpp decode (prompt suffix and label tokens).
    pub prefill_ms: f64,
    /// Time turning logits into label probabilities.
    pub scoring_ms: f64,
    /// From receiving the request to the result (tokenizing included).
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibrationApplied {
    pub applied: bool,
    /// The averaged content-free label distribution that was divided out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub model: String,
    pub model_sha256: String,
    pub task: String,
    pub template_sha256: String,
    pub board: String,
    /// What decided: prompt (label scores), head, both, stack or tfidf.
    pub method: crate::spec::Method,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabelDetail {
    pub prob: f64,
    pub logprob_total: f64,
    pub logprob_mean: f64,
    pub n_tokens: usize,
    /// Left unfinished because it could not win (task `prune_margin_nats`): the log-probs
    /// are upper bounds, so `prob` overstates it and the top label's confidence is a floor.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pruned: bool,
}

/// One classification, as printed by `classify` and published by `serve`.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifyResult {
    pub id: String,
    pub task: String,
    /// The chosen label; `null` when the classifier abstained.
    pub label: Option<String>,
    /// The most probable label, even when abstaining.
    pub top_label: String,
    pub confidence: f64,
    pub margin: f64,
    pub abstained: bool,
    /// Probability per label (after calibration when applied).
    pub scores: BTreeMap<String, f64>,
    pub labels: BTreeMap<String, LabelDetail>,
    pub score_norm: ScoreNorm,
    /// What `labels.*.logprob_total`/`logprob_mean` are normalized over: `vocab` (absolute
    /// log-likelihoods) or `labels` (at each point where labels part, log-softmax over the
    /// tokens that continue a label: `exp(logprob_total)` sums to 1 over the labels).
    pub logprob_over: LogprobOver,
    pub calibration: CalibrationApplied,
    pub truncated: Option<Truncation>,
    pub tokens: TokenCounts,
    pub timings_ms: Timings,
    pub provenance: Provenance,
    /// The demonstrations shown with this request (a task with `[demos]`): indices into the
    /// task's `examples`, in prompt order (the last sits next to the query).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub demos: Vec<usize>,
}

/// A task prepared on an engine: its prefix cached in a slot, its label tokens known.
pub struct Classifier {
    pub task: Task,
    /// Whether the prefix was decoded, loaded from the prefix cache, or rebuilt.
    pub prefix_source: crate::model::PrefixSource,
    slot: usize,
    prefix: Vec<Token>,
    /// Control-token text closing a chat turn after the query (chat-template tasks only).
    chat_tail: Vec<Token>,
    trie: LabelTrie,
    prior: Option<Prior>,
    calibrate: bool,
    abstain: AbstainRule,
    /// Most tokens a request's prompt suffix may take.
    suffix_room: usize,
    /// Tokens in the prefix slot: the prefix and the query's fixed head.
    slot_len: usize,
    template_sha256: String,
    provenance_model: String,
    /// The pool search of a task with `[demos]`: each request gets its own examples.
    demos: Option<demos::DemoPicker>,
}

const CHAT_SPLIT: &str = "\u{1}EDGEACT-QUERY\u{1}";

impl Classifier {
    /// Prepares `task` on `engine` in prefix slot `slot`: tokenizes and caches the prefix,
    /// derives label tokens in context, and measures the calibration prior when asked.
    pub fn new(
        engine: &mut Engine,
        task: Task,
        slot: usize,
        calibrate: Option<bool>,
        abstain: Option<AbstainRule>,
    ) -> Result<Classifier, SetupError> {
        let name = task.name.clone();
        let (prefix, chat_tail) = prefix_tokens(engine, &task)?;
        let label_tokens = label_tokens(engine, &task, &chat_tail)?;
        let trie = LabelTrie::new(&label_tokens).map_err(|source| SetupError::Trie {
            task: name.clone(),
            source,
        })?;
        // The slot also holds the query's fixed head (`Review:`), so a request decodes only
        // its own text; a request whose tokens differ there just reuses less (the engine
        // reuses the common token prefix), so the prompt is always tokenized as a whole.
        let slot_tokens = [prefix.as_slice(), &query_head_tokens(engine, &task)].concat();
        let n_ctx = engine.n_ctx();
        // The head is part of each request's query tokens, so the room for it is counted there.
        let reserved = prefix.len() + chat_tail.len() + trie.decoded.len() + 1;
        if reserved + 16 > n_ctx {
            return Err(SetupError::PrefixTooLong {
                task: name,
                prefix_tokens: prefix.len(),
                n_ctx,
            });
        }
        let picker = demo_picker(engine, &task)?;
        let prefix_source = engine
            .set_prefix_cached(slot, &slot_tokens)
            .map_err(|source| SetupError::Engine {
                task: name.clone(),
                source,
            })?;
        let mut c = Classifier {
            prefix_source,
            slot,
            prefix,
            chat_tail,
            trie,
            prior: None,
            calibrate: calibrate.unwrap_or(task.calibration.enabled),
            abstain: abstain.unwrap_or(task.abstain),
            suffix_room: n_ctx - reserved,
            slot_len: slot_tokens.len(),
            template_sha256: task.template_sha256(),
            provenance_model: engine
                .info
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            task,
            demos: picker,
        };
        if c.calibrate {
            c.prior = Some(
                c.measure_prior(engine)
                    .map_err(|source| SetupError::Engine {
                        task: name.clone(),
                        source,
                    })?,
            );
        }
        Ok(c)
    }

    /// The label distribution for each content-free input, averaged.
    fn measure_prior(&self, engine: &mut Engine) -> Result<Prior, EngineError> {
        let mut runs = Vec::new();
        for cf in &self.task.calibration.content_free {
            let mut fields = BTreeMap::new();
            for f in self.task.query.fields() {
                fields.insert(f.to_string(), cf.clone());
            }
            // Content-free inputs are short and come from the task file: cannot fail the budget.
            // With retrieved demonstrations, each gets the ones it would retrieve.
            let demos = self.pick_demos(cf);
            let tokens = self.prompt_tokens(engine, &fields, &demos);
            // Calibration needs every label's probability: no pruning here.
            let out = engine.score(&[ScoreJob {
                prefix: Some(self.slot),
                tokens: &tokens,
                trie: &self.trie,
                pruning: None,
                logprob_over: self.task.logprob_over,
            }])?;
            runs.push(softmax(&self.raw_scores(&out[0].labels)));
        }
        // At least one content-free input is guaranteed by task validation.
        Ok(Prior::from_content_free(&runs).unwrap_or(Prior {
            probs: vec![1.0; self.task.labels.len()],
        }))
    }

    pub fn prior(&self) -> Option<&Prior> {
        self.prior.as_ref()
    }

    pub fn calibrating(&self) -> bool {
        self.calibrate
    }

    fn raw_scores(&self, labels: &[LabelLogprob]) -> Vec<f64> {
        labels
            .iter()
            .map(|l| match self.task.score {
                ScoreNorm::Total => l.total,
                ScoreNorm::Mean => l.mean,
            })
            .collect()
    }

    /// The pool indices shown with `text` (none without `[demos]`).
    fn pick_demos(&self, text: &str) -> Vec<usize> {
        self.demos
            .as_ref()
            .map(|d| d.pick(text))
            .unwrap_or_default()
    }

    fn prompt_tokens(
        &self,
        engine: &Engine,
        fields: &BTreeMap<String, String>,
        demos: &[usize],
    ) -> Vec<Token> {
        // Only called with fields that cover the query (checked by `prepare`).
        let query = self.task.render_query(fields).unwrap_or_default();
        let mut t = self.prefix.clone();
        if !demos.is_empty() {
            t.extend(engine.tokenize(&self.task.render_demos(demos), false, false));
        }
        t.extend(engine.tokenize(&query, false, false));
        t.extend_from_slice(&self.chat_tail);
        t
    }

    /// Checks a request, applies the token budget, and returns its prompt tokens.
    pub fn prepare(&self, engine: &Engine, req: &Request) -> Result<Prepared, RecordError> {
        let text = req
            .fields
            .get(TRUNCATED_FIELD)
            .map(String::as_str)
            .unwrap_or("");
        if text.trim().is_empty() {
            return Err(RecordError::EmptyText);
        }
        if let Err(e) = self.task.render_query(&req.fields) {
            return Err(RecordError::Field(match e {
                SpecError::Invalid(i) => i.reason,
                other => other.to_string(),
            }));
        }
        let text_tokens = engine.tokenize(text, false, false);
        // Chosen on the whole text, before any cut (their tokens count against the room).
        let demos = self.pick_demos(text);
        let mut fields = req.fields.clone();
        fields.insert(TRUNCATED_FIELD.into(), String::new());
        let empty_len = self.prompt_tokens(engine, &fields, &demos).len() - self.prefix.len();
        let room = self.suffix_room.saturating_sub(empty_len + 2);
        let max = (self.task.input.max_tokens as usize).min(room);
        let mut truncated = None;
        if text_tokens.len() > max {
            let policy = self.task.input.truncate;
            let kept = match policy {
                TruncatePolicy::Reject => {
                    return Err(RecordError::TooLong {
                        tokens: text_tokens.len(),
                        max,
                    })
                }
                TruncatePolicy::KeepHead => &text_tokens[..max],
                TruncatePolicy::KeepTail => &text_tokens[text_tokens.len() - max..],
            };
            fields.insert(TRUNCATED_FIELD.into(), engine.detokenize(kept));
            truncated = Some(Truncation {
                policy,
                input_tokens: text_tokens.len(),
                kept_tokens: max,
            });
        } else {
            fields.insert(TRUNCATED_FIELD.into(), text.to_string());
        }
        let mut tokens = self.prompt_tokens(engine, &fields, &demos);
        // Re-tokenizing cut text can merge differently; never let it overflow the context.
        let limit = self.prefix.len() + self.suffix_room;
        if tokens.len() > limit {
            let tail =
                self.chat_tail.len() + engine.tokenize(&self.query_tail(), false, false).len();
            let cut = tokens.len() - limit;
            let keep_end = tokens.len() - tail;
            tokens.drain(keep_end - cut..keep_end);
        }
        Ok(Prepared {
            id: req.id.clone(),
            tokens,
            truncated,
            demos,
        })
    }

    /// The query's literal text after its last placeholder (validated non-empty).
    fn query_tail(&self) -> String {
        let src = &self.task.query_src;
        src.rfind('}')
            .map(|i| src[i + 1..].to_string())
            .unwrap_or_default()
    }

    /// Classifies requests, micro-batched on the fast path. Each request gets its own
    /// result or error, in order.
    pub fn classify_many(
        &self,
        engine: &mut Engine,
        reqs: &[Request],
        path: ScorePath,
    ) -> Vec<Result<ClassifyResult, RecordError>> {
        let started = Instant::now();
        let prepared: Vec<Result<Prepared, RecordError>> =
            reqs.iter().map(|r| self.prepare(engine, r)).collect();
        let ok: Vec<&Prepared> = prepared.iter().filter_map(|p| p.as_ref().ok()).collect();
        let scored: Result<Vec<ScoreOut>, EngineError> = match path {
            ScorePath::Fast => {
                let jobs: Vec<ScoreJob> = ok
                    .iter()
                    .map(|p| ScoreJob {
                        prefix: Some(self.slot),
                        tokens: &p.tokens,
                        trie: &self.trie,
                        pruning: self.task.pruning(),
                        logprob_over: self.task.logprob_over,
                    })
                    .collect();
                engine.score(&jobs)
            }
            ScorePath::Naive => {
                let over = self.task.logprob_over;
                ok.iter()
                    .map(|p| engine.score_naive(&p.tokens, &self.trie, None, over))
                    .collect()
            }
        };
        let mut scored = match scored {
            Ok(s) => s.into_iter(),
            Err(e) => return fail_batch(prepared, &e),
        };
        let total_ms = started.elapsed().as_secs_f64() * 1e3;
        prepared
            .into_iter()
            .map(|p| {
                let p = p?;
                // One ScoreOut per prepared request, in order.
                let out = scored.next().ok_or_else(|| {
                    RecordError::Engine(EngineError::Decode(
                        "scorer returned too few results".into(),
                    ))
                })?;
                Ok(self.finish(engine, p, out, total_ms))
            })
            .collect()
    }

    pub fn classify(
        &self,
        engine: &mut Engine,
        req: &Request,
    ) -> Result<ClassifyResult, RecordError> {
        self.classify_many(engine, std::slice::from_ref(req), ScorePath::Fast)
            .pop()
            .unwrap_or(Err(RecordError::EmptyText))
    }

    fn finish(&self, engine: &Engine, p: Prepared, out: ScoreOut, total_ms: f64) -> ClassifyResult {
        let raw = self.raw_scores(&out.labels);
        let calibrated = match (&self.prior, self.calibrate) {
            (Some(prior), true) => prior.apply(&raw),
            _ => raw,
        };
        let probs = softmax(&calibrated);
        let d = decide(&probs, &self.abstain);
        let names: Vec<&String> = self.task.labels.iter().map(|l| &l.name).collect();
        let top_label = names[d.top].clone();
        ClassifyResult {
            id: p.id,
            task: self.task.name.clone(),
            label: (!d.abstained).then(|| top_label.clone()),
            top_label,
            confidence: d.confidence,
            margin: d.margin,
            abstained: d.abstained,
            scores: names
                .iter()
                .zip(&probs)
                .map(|(n, &p)| ((*n).clone(), p))
                .collect(),
            labels: names
                .iter()
                .zip(&probs)
                .zip(&out.labels)
                .map(|((n, &prob), l)| {
                    (
                        (*n).clone(),
                        LabelDetail {
                            prob,
                            logprob_total: l.total,
                            logprob_mean: l.mean,
                            n_tokens: l.n_tokens,
                            pruned: l.pruned,
                        },
                    )
                })
                .collect(),
            score_norm: self.task.score,
            logprob_over: out.logprob_over,
            calibration: CalibrationApplied {
                applied: self.calibrate && self.prior.is_some(),
                prior: self.prior.as_ref().filter(|_| self.calibrate).map(|pr| {
                    names
                        .iter()
                        .map(|n| (*n).clone())
                        .zip(pr.probs.iter().copied())
                        .collect()
                }),
            },
            truncated: p.truncated,
            tokens: TokenCounts {
                prompt: p.tokens.len(),
                reused: out.reused_tokens,
                decoded: out.decoded_tokens,
                scored: self.trie.n_label_tokens(),
            },
            timings_ms: Timings {
                prefill_ms: round3(out.decode_ms),
                scoring_ms: round3(out.scoring_ms),
                total_ms: round3(total_ms),
            },
            provenance: Provenance {
                model: self.provenance_model.clone(),
                model_sha256: engine.info.sha256.clone(),
                task: self.task.name.clone(),
                template_sha256: self.template_sha256.clone(),
                board: engine.info.board.clone(),
                method: crate::spec::Method::Prompt,
            },
            demos: p.demos,
        }
    }

    /// Tokens decoded once for the task and reused by every request: the instruction, the
    /// examples and the query's fixed head.
    pub fn prefix_len(&self) -> usize {
        self.slot_len
    }

    pub fn trie(&self) -> &LabelTrie {
        &self.trie
    }
}

/// The task's fixed prompt as tokens (BOS first), and for chat-template tasks the
/// control tokens closing the user turn after the query.
fn prefix_tokens(engine: &Engine, task: &Task) -> Result<(Vec<Token>, Vec<Token>), SetupError> {
    let name = &task.name;
    let body = task.render_prefix();
    let tokens = if task.use_chat_template {
        let wrapped = engine
            .chat_wrap(&format!("{body}{CHAT_SPLIT}"))
            .map_err(|reason| SetupError::ChatTemplate {
                task: name.clone(),
                reason,
            })?;
        let (head, tail) =
            wrapped
                .split_once(CHAT_SPLIT)
                .ok_or_else(|| SetupError::ChatTemplate {
                    task: name.clone(),
                    reason: "the template rewrote the user message".into(),
                })?;
        let mut p = engine.tokenize(head, false, true);
        let bos = engine.tokenize("", true, false);
        if p.first() != bos.first() {
            p.splice(0..0, bos);
        }
        (p, engine.tokenize(tail, false, true))
    } else {
        (engine.tokenize(&body, true, true), Vec::new())
    };
    Ok(tokens)
}

/// The pool search of a task with `[demos]`, with the sentence encoder beside the model
/// when it measures similarity.
fn demo_picker(engine: &Engine, task: &Task) -> Result<Option<demos::DemoPicker>, SetupError> {
    let err = |reason: String| SetupError::Demos {
        task: task.name.clone(),
        reason,
    };
    let encoder = match task.demos {
        Some(d) if d.by == crate::spec::DemoSimilarity::Encoder => {
            let dir = crate::encoder::dir_beside(&engine.info.path);
            Some(crate::encoder::shared(&dir).map_err(|e| err(e.to_string()))?)
        }
        _ => None,
    };
    demos::DemoPicker::new(task, encoder).map_err(err)
}

/// Inputs that start differently (a word, a digit, punctuation, a non-Latin letter), so the
/// tokens every rendered query shares come from the template, not from one input.
const HEAD_PROBES: [&str; 5] = ["x", "The", "1", "\"", "\u{4e2d}"];

/// The tokens every rendered query starts with, whatever the input: the common token
/// prefix of the query rendered with several different inputs. Empty when the query
/// starts with a field.
pub(crate) fn query_head_tokens(engine: &Engine, task: &Task) -> Vec<Token> {
    let mut head: Option<Vec<Token>> = None;
    for probe in HEAD_PROBES {
        let fields: BTreeMap<String, String> = task
            .query
            .fields()
            .into_iter()
            .map(|f| (f.to_string(), probe.to_string()))
            .collect();
        let Ok(q) = task.render_query(&fields) else {
            return Vec::new();
        };
        let t = engine.tokenize(&q, false, false);
        head = Some(match head {
            None => t,
            Some(h) => common_prefix(&h, &t).to_vec(),
        });
    }
    head.unwrap_or_default()
}

fn common_prefix<'a>(a: &'a [Token], b: &[Token]) -> &'a [Token] {
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    &a[..n]
}

/// Each label's tokens as they follow a rendered query: tokenize the end of a query with
/// and without the label, and take the tail (SentencePiece merges a leading space).
fn label_tokens(
    engine: &Engine,
    task: &Task,
    chat_tail: &[Token],
) -> Result<Vec<Vec<Token>>, SetupError> {
    let name = &task.name;
    let mut probe_fields = BTreeMap::new();
    for f in task.query.fields() {
        probe_fields.insert(f.to_string(), "x".to_string());
    }
    let probe = task
        .render_query(&probe_fields)
        .map_err(|e| SetupError::LabelTokens {
            task: name.clone(),
            label: String::new(),
            reason: e.to_string(),
        })?;
    let probe_tokens = if task.use_chat_template {
        [engine.tokenize(&probe, false, false), chat_tail.to_vec()].concat()
    } else {
        engine.tokenize(&probe, false, false)
    };
    let mut label_tokens = Vec::new();
    for l in &task.labels {
        let with = if task.use_chat_template {
            [
                engine.tokenize(&probe, false, false),
                chat_tail.to_vec(),
                engine.tokenize(&l.text, false, false),
            ]
            .concat()
        } else {
            engine.tokenize(&format!("{probe}{}", l.text), false, false)
        };
        if with.len() <= probe_tokens.len() || with[..probe_tokens.len()] != probe_tokens[..] {
            return Err(SetupError::LabelTokens {
                task: name.clone(),
                label: l.name.clone(),
                reason: "its first token merges with the query's last; end the query with \":\" and start the label with a space".into(),
            });
        }
        label_tokens.push(with[probe_tokens.len()..].to_vec());
    }
    Ok(label_tokens)
}

/// A request checked and tokenized.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub id: String,
    pub tokens: Vec<Token>,
    pub truncated: Option<Truncation>,
    /// The demonstrations in `tokens` (pool indices; empty without `[demos]`).
    pub demos: Vec<usize>,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A failed decode fails the whole micro-batch: each request that was ready gets the
/// decode error, each one already refused keeps its own error.
pub(crate) fn fail_batch<T, R>(
    ready: Vec<Result<T, RecordError>>,
    e: &EngineError,
) -> Vec<Result<R, RecordError>> {
    let msg = e.to_string();
    ready
        .into_iter()
        .map(|p| p.and_then(|_| Err(RecordError::Engine(EngineError::Decode(msg.clone())))))
        .collect()
}
