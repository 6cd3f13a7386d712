//! The model side of the ReAct loop: the [`StepGenerator`] trait the loop asks for one
//! step at a time (so the state machine is tested without a model), and the engine as one
//! ([`EngineGenerator`]), with the free-text baseline's stop rule.

use std::time::Instant;

use super::ground::TextScorer;
use crate::classify::runner::ModelSource;
use crate::model::config::EngineConfig;
use crate::model::scoring::{LabelTrie, LogprobOver};
use crate::model::{
    Engine, EngineError, GenCache, GenerateRequest, GenerateStop, ModelInfo, ScoreJob,
};

/// How a step is generated.
#[derive(Debug, Clone, Copy)]
pub enum GenMode<'a> {
    /// Under this GBNF grammar, whose sentences are `lines` lines: generation ends at the
    /// last newline (the grammar would allow only an end token next).
    Grammar { gbnf: &'a str, lines: usize },
    /// Free text (the baseline); the step ends at `Observation`, a new `Question`, or the
    /// end of a `Final Answer` line.
    Free,
}

/// Why one generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenEnd {
    Complete,
    MaxTokens,
    Deadline,
}

/// One generated step and what it cost.
#[derive(Debug, Clone)]
pub struct GenStep {
    pub text: String,
    pub generated_tokens: usize,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    /// Wall time in all, and the part spent decoding the new prompt tokens.
    pub ms: f64,
    pub prefill_ms: f64,
    pub end: GenEnd,
}

/// The model side of the loop.
pub trait StepGenerator {
    fn generate(
        &mut self,
        prompt: &str,
        mode: GenMode<'_>,
        max_tokens: usize,
        seed: u64,
        deadline: Instant,
    ) -> Result<GenStep, EngineError>;

    /// Tokens of `text` as the prompt would hold them.
    fn count_tokens(&mut self, text: &str) -> usize;
}

/// Where a free (no-grammar) step ends: an `Observation` or a new `Question` the model
/// starts writing itself, or the end of a `Final Answer` line.
pub fn free_step_end(text: &str) -> Option<usize> {
    let cut = ["\nObservation", "\nQuestion:"]
        .iter()
        .filter_map(|m| text.find(m))
        .min();
    if cut.is_some() {
        return cut.map(|c| c + 1);
    }
    let f = text.find("Final Answer:")?;
    text[f..].find('\n').map(|n| f + n + 1)
}

/// The engine as a [`StepGenerator`]: one generation sequence whose cache carries over
/// between steps and runs (shared prompt beginnings are decoded once).
pub struct EngineGenerator<'a> {
    pub engine: &'a mut Engine,
    pub cache: GenCache,
    pub temperature: f32,
    /// A prefix slot holding the task's decoded prefix (see [`EngineGenerator::with_prefix`]).
    pub prefix_slot: Option<usize>,
}

impl<'a> EngineGenerator<'a> {
    pub fn new(engine: &'a mut Engine, temperature: f32) -> EngineGenerator<'a> {
        EngineGenerator {
            engine,
            cache: GenCache::default(),
            temperature,
            prefix_slot: None,
        }
    }

    /// Puts `prefix` (the task's fixed prompt beginning) in prefix slot `slot` through the
    /// engine's prefix cache on disk, so a cold start loads it instead of decoding it.
    pub fn with_prefix(
        mut self,
        slot: usize,
        prefix: &str,
    ) -> Result<(Self, crate::model::PrefixSource), EngineError> {
        let tokens = self.engine.tokenize(prefix, true, false);
        let source = self.engine.set_prefix_cached(slot, &tokens)?;
        self.prefix_slot = Some(slot);
        Ok((self, source))
    }
}

impl StepGenerator for EngineGenerator<'_> {
    fn generate(
        &mut self,
        prompt: &str,
        mode: GenMode<'_>,
        max_tokens: usize,
        seed: u64,
        deadline: Instant,
    ) -> Result<GenStep, EngineError> {
        let tokens = self.engine.tokenize(prompt, true, false);
        let (grammar, free, lines) = match mode {
            GenMode::Grammar { gbnf, lines } => (Some(gbnf), false, lines),
            GenMode::Free => (None, true, 0),
        };
        let req = GenerateRequest {
            grammar,
            max_tokens,
            temperature: self.temperature,
            seed,
            deadline: Some(deadline),
            prefix_slot: self.prefix_slot,
        };
        // Grammar mode: the last newline of the sentence ends it; free mode: the
        // baseline's stop rule.
        let mut stop = |text: &str| {
            if free {
                free_step_end(text).is_some()
            } else {
                text.matches('\n').count() >= lines
            }
        };
        let g = self
            .engine
            .generate(&mut self.cache, &tokens, &req, &mut stop)?;
        let mut text = g.text;
        if free {
            if let Some(end) = free_step_end(&text) {
                text.truncate(end);
            }
        }
        Ok(GenStep {
            end: match g.stop {
                GenerateStop::Complete | GenerateStop::StopRule => GenEnd::Complete,
                GenerateStop::MaxTokens => GenEnd::MaxTokens,
                GenerateStop::Deadline => GenEnd::Deadline,
            },
            generated_tokens: g.tokens.len(),
            prompt_tokens: g.prompt_tokens,
            reused_tokens: g.reused_tokens,
            ms: g.prefill_ms + g.generate_ms,
            prefill_ms: g.prefill_ms,
            text,
        })
    }

    fn count_tokens(&mut self, text: &str) -> usize {
        self.engine.tokenize(text, true, false).len()
    }
}

impl TextScorer for EngineGenerator<'_> {
    fn continuation_logprobs(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        let mut prompts = Vec::with_capacity(pairs.len());
        let mut tries = Vec::with_capacity(pairs.len());
        for (prompt, cont) in pairs {
            prompts.push(self.engine.tokenize(prompt, true, false));
            let c = self.engine.tokenize(cont, false, false);
            // One label: the continuation; an empty one scores nothing.
            let trie = LabelTrie::new(&[c]).map_err(|e| EngineError::Decode(e.to_string()))?;
            tries.push(trie);
        }
        let jobs: Vec<ScoreJob> = prompts
            .iter()
            .zip(&tries)
            .map(|(tokens, trie)| ScoreJob {
                prefix: self.prefix_slot,
                tokens,
                trie,
                pruning: None,
                logprob_over: LogprobOver::Vocab,
            })
            .collect();
        Ok(self
            .engine
            .score(&jobs)?
            .into_iter()
            .map(|o| o.labels.first().map_or((0.0, 0), |l| (l.total, l.n_tokens)))
            .collect())
    }

    /// One job, one label trie: the prompt is decoded once for all labels.
    fn label_logprobs(
        &mut self,
        prompt: &str,
        labels: &[String],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        let tokens = self.engine.tokenize(prompt, true, false);
        let label_tokens: Vec<_> = labels
            .iter()
            .map(|l| self.engine.tokenize(l, false, false))
            .collect();
        let trie = LabelTrie::new(&label_tokens).map_err(|e| EngineError::Decode(e.to_string()))?;
        let job = ScoreJob {
            prefix: self.prefix_slot,
            tokens: &tokens,
            trie: &trie,
            pruning: None,
            logprob_over: LogprobOver::Vocab,
        };
        let out = self.engine.score(std::slice::from_ref(&job))?;
        Ok(out
            .first()
            .map(|o| o.labels.iter().map(|l| (l.total, l.n_tokens)).collect())
            .unwrap_or_default())
    }
}

/// The engine, loaded at its first use, with the task prefixes to decode into their slots
/// then. The scored policy answers a knowledge-base question without the model (`w_model`
/// 0 and no thought: retrieval and selection), so `edgeact react`, `edgeact qa` and a
/// kiosk served by `edgeact serve` asked such questions neither load the model nor decode
/// a prefix; a question that needs it (a calculator argument, a sensor value the words do
/// not decide, the generated loop) loads it then, once.
pub struct LazyEngine {
    cfg: EngineConfig,
    n_slots: usize,
    /// (slot, text) of each prefix to decode at load.
    prefixes: Vec<(usize, String)>,
    engine: Option<Engine>,
}

impl LazyEngine {
    pub fn new(cfg: EngineConfig, n_slots: usize) -> LazyEngine {
        LazyEngine {
            cfg,
            n_slots,
            prefixes: Vec::new(),
            engine: None,
        }
    }

    /// A prefix for `slot`: decoded now when the engine is loaded, else at load.
    /// The model file this engine loads (the sentence encoder lives beside it).
    pub fn model_path(&self) -> &std::path::Path {
        &self.cfg.model_path
    }

    pub fn add_prefix(&mut self, slot: usize, text: String) -> Result<(), EngineError> {
        if let Some(e) = self.engine.as_mut() {
            decode_prefix(e, slot, &text)?;
        }
        self.prefixes.push((slot, text));
        Ok(())
    }

    /// Whether the model has been loaded (some question needed it).
    pub fn is_loaded(&self) -> bool {
        self.engine.is_some()
    }

    /// What was loaded, once it is.
    pub fn info(&self) -> Option<&crate::model::ModelInfo> {
        self.engine.as_ref().map(|e| &e.info)
    }

    /// The engine, loaded (and its prefixes decoded) first if need be.
    pub fn engine(&mut self) -> Result<&mut Engine, EngineError> {
        let engine = match self.engine.take() {
            Some(e) => e,
            None => {
                let mut e = Engine::load(&self.cfg, self.n_slots)?;
                for (slot, text) in &self.prefixes {
                    decode_prefix(&mut e, *slot, text)?;
                }
                tracing::info!(prefixes = self.prefixes.len(), "model loaded at first use");
                e
            }
        };
        Ok(self.engine.insert(engine))
    }

    /// Before the model is loaded: the text's length in bytes plus one, an upper bound (a
    /// token covers one byte or more), so a session's history never overflows its budget
    /// and counting alone does not load the model.
    pub fn count_tokens(&mut self, text: &str) -> usize {
        match self.engine.as_mut() {
            Some(e) => e.tokenize(text, true, false).len(),
            None => text.len() + 1,
        }
    }

    /// Runs `f` on the engine as an [`EngineGenerator`] on prefix `slot` (loading it first
    /// if need be); `cache` carries over between calls.
    fn with<T>(
        &mut self,
        cache: &mut GenCache,
        temperature: f32,
        slot: usize,
        f: impl FnOnce(&mut EngineGenerator<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut g = EngineGenerator {
            engine: self.engine()?,
            cache: std::mem::take(cache),
            temperature,
            prefix_slot: Some(slot),
        };
        let out = f(&mut g);
        *cache = std::mem::take(&mut g.cache);
        out
    }
}

/// A [`LazyEngine`] as the model of classification runners (`serve`): the planned model's
/// identity until something needs the weights, so a task that reads no model (a stack of
/// TF-IDF and encoder blocks) never loads them.
pub struct LazyModel<'a> {
    pub lazy: &'a mut LazyEngine,
    /// The model file checked and planned (`model::planned_info`).
    pub planned: &'a ModelInfo,
}

impl ModelSource for LazyModel<'_> {
    fn info(&self) -> &ModelInfo {
        self.lazy.info().unwrap_or(self.planned)
    }
    fn engine(&mut self) -> Result<&mut Engine, EngineError> {
        self.lazy.engine()
    }
}

fn decode_prefix(engine: &mut Engine, slot: usize, text: &str) -> Result<(), EngineError> {
    let tokens = engine.tokenize(text, true, false);
    let source = engine.set_prefix_cached(slot, &tokens)?;
    tracing::info!(slot, ?source, tokens = tokens.len(), "task prefix ready");
    Ok(())
}

/// A [`LazyEngine`] borrowed as the model of one run on prefix slot `prefix_slot`, with
/// the generation cache that carries over between runs (serve's inference thread shares
/// one engine between its tasks).
pub struct LazyEngineGenerator<'a> {
    pub lazy: &'a mut LazyEngine,
    pub cache: &'a mut GenCache,
    pub temperature: f32,
    pub prefix_slot: usize,
}

impl StepGenerator for LazyEngineGenerator<'_> {
    fn generate(
        &mut self,
        prompt: &str,
        mode: GenMode<'_>,
        max_tokens: usize,
        seed: u64,
        deadline: Instant,
    ) -> Result<GenStep, EngineError> {
        self.lazy
            .with(self.cache, self.temperature, self.prefix_slot, |g| {
                g.generate(prompt, mode, max_tokens, seed, deadline)
            })
    }

    fn count_tokens(&mut self, text: &str) -> usize {
        self.lazy.count_tokens(text)
    }
}

impl TextScorer for LazyEngineGenerator<'_> {
    fn continuation_logprobs(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        self.lazy
            .with(self.cache, self.temperature, self.prefix_slot, |g| {
                g.continuation_logprobs(pairs)
            })
    }

    fn label_logprobs(
        &mut self,
        prompt: &str,
        labels: &[String],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        self.lazy
            .with(self.cache, self.temperature, self.prefix_slot, |g| {
                g.label_logprobs(prompt, labels)
            })
    }
}

/// A [`LazyEngine`] of its own with one prefix in slot 0 (`edgeact react`, `edgeact qa`).
pub struct LazyGenerator {
    lazy: LazyEngine,
    temperature: f32,
    cache: GenCache,
}

impl LazyGenerator {
    pub fn new(cfg: EngineConfig, temperature: f32, prefix: String) -> LazyGenerator {
        let mut lazy = LazyEngine::new(cfg, 1);
        lazy.prefixes.push((0, prefix));
        LazyGenerator {
            lazy,
            temperature,
            cache: GenCache::default(),
        }
    }

    /// Whether the model has been loaded (some question needed it).
    pub fn is_loaded(&self) -> bool {
        self.lazy.is_loaded()
    }

    fn borrowed(&mut self) -> LazyEngineGenerator<'_> {
        LazyEngineGenerator {
            lazy: &mut self.lazy,
            cache: &mut self.cache,
            temperature: self.temperature,
            prefix_slot: 0,
        }
    }
}

impl StepGenerator for LazyGenerator {
    fn generate(
        &mut self,
        prompt: &str,
        mode: GenMode<'_>,
        max_tokens: usize,
        seed: u64,
        deadline: Instant,
    ) -> Result<GenStep, EngineError> {
        self.borrowed()
            .generate(prompt, mode, max_tokens, seed, deadline)
    }

    fn count_tokens(&mut self, text: &str) -> usize {
        self.lazy.count_tokens(text)
    }
}

impl TextScorer for LazyGenerator {
    fn continuation_logprobs(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        self.borrowed().continuation_logprobs(pairs)
    }

    fn label_logprobs(
        &mut self,
        prompt: &str,
        labels: &[String],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        self.borrowed().label_logprobs(prompt, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_steps_end_where_peers_stop() {
        assert_eq!(
            free_step_end("Thought: a\nAction: b[c]\nObservation: made up"),
            Some(24)
        );
        assert_eq!(free_step_end("Thought: a\nFinal Answer: b\nmore"), Some(27));
        assert_eq!(free_step_end("Thought: a\nFinal Answer: b"), None);
        assert_eq!(free_step_end("Thought: a\nQuestion: b"), Some(11));
    }
}
