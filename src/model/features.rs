//! Features: a second llama.cpp context on the engine's model, with embeddings on and no
//! pooling, reads every token's final hidden state; pooled per sequence for frozen-feature
//! heads (`edgeact tune --head`). The scoring context is not touched.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::load::backend;
use super::{Engine, EngineError};
use crate::model::config::EngineConfig;
use crate::model::scoring::Token;

/// The final hidden states of one token sequence (after the model's output norm, the input
/// of the output projection), pooled two ways.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledStates {
    /// The last token's hidden state.
    pub last: Vec<f32>,
    /// The mean over every token but the first (the BOS token, whose state does not depend
    /// on the input); the one token's state for a one-token sequence.
    pub mean: Vec<f32>,
}

/// Settings of a [`FeatureContext`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureParams {
    /// Tokens per decode; also the longest sequence accepted. llama.cpp keeps n_vocab f32 of
    /// logits for every token of an embeddings batch (1 MiB each for Gemma 3), twice (output
    /// buffer and compute buffer): this is the context's memory knob.
    pub n_batch_tokens: u32,
    /// Sequences decoded together at most.
    pub n_seq_max: u32,
    pub threads: u32,
}

impl FeatureParams {
    /// The defaults with the board's threads.
    pub fn for_config(cfg: &EngineConfig) -> FeatureParams {
        FeatureParams {
            threads: cfg.threads_batch.max(1),
            ..FeatureParams::default()
        }
    }
}

impl Default for FeatureParams {
    fn default() -> Self {
        FeatureParams {
            n_batch_tokens: 64,
            n_seq_max: 8,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)) as u32,
        }
    }
}

/// A second llama.cpp context on the engine's model, with embeddings on and no pooling:
/// reads every token's final hidden state. For frozen-feature heads (`edgeact tune --head`).
pub struct FeatureContext {
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    n_embd: usize,
    n_batch: usize,
    n_seq_max: usize,
}

impl Engine {
    /// Width of the model's hidden states (the features a head reads).
    pub fn n_embd(&self) -> usize {
        self.model.n_embd_out().max(0) as usize
    }

    /// Creates a [`FeatureContext`] on this engine's model (the scoring context stays as it is).
    pub fn feature_context(&self, params: FeatureParams) -> Result<FeatureContext, EngineError> {
        let n_batch = params.n_batch_tokens.max(8);
        let n_seq_max = params.n_seq_max.clamp(1, 64);
        // Every sequence fits one decode and the cache is cleared after each: n_batch cells
        // are enough; llama.cpp pads n_ctx to 256.
        let n_ctx = n_batch.div_ceil(256) * 256;
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(n_seq_max)
            .with_n_threads(params.threads as i32)
            .with_n_threads_batch(params.threads as i32)
            .with_kv_unified(true)
            .with_embeddings(true)
            .with_pooling_type(LlamaPoolingType::None);
        let backend = backend()?;
        let ctx = self
            .model
            .new_context(backend, cparams)
            .map_err(|e| EngineError::Context {
                n_ctx,
                reason: e.to_string(),
            })?;
        Ok(FeatureContext {
            ctx,
            batch: LlamaBatch::new(n_batch as usize, 1),
            n_embd: self.n_embd(),
            n_batch: n_batch as usize,
            n_seq_max: n_seq_max as usize,
        })
    }
}

impl FeatureContext {
    /// Longest sequence [`FeatureContext::hidden_states`] accepts.
    pub fn max_tokens(&self) -> usize {
        self.n_batch
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// The pooled final hidden states of each sequence, in order. Whole sequences are packed
    /// into decodes (each on its own KV sequence); `on_progress` gets the number done after
    /// each decode. A sequence that is empty or longer than [`FeatureContext::max_tokens`] is
    /// an error: cut inputs before.
    pub fn hidden_states(
        &mut self,
        seqs: &[Vec<Token>],
        mut on_progress: impl FnMut(usize),
    ) -> Result<Vec<PooledStates>, EngineError> {
        if let Some((i, s)) = seqs
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.len() > self.n_batch)
        {
            return Err(EngineError::Decode(format!(
                "feature sequence {i} has {} tokens; 1..={} fit one decode",
                s.len(),
                self.n_batch
            )));
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < seqs.len()
                && end - start < self.n_seq_max
                && tokens + seqs[end].len() <= self.n_batch
            {
                tokens += seqs[end].len();
                end += 1;
            }
            self.ctx.clear_kv_cache();
            self.batch.clear();
            for (k, s) in seqs[start..end].iter().enumerate() {
                for (pos, &t) in s.iter().enumerate() {
                    self.batch
                        .add(LlamaToken(t), pos as i32, &[k as i32], true)
                        .map_err(|e| EngineError::Decode(e.to_string()))?;
                }
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            let mut idx = 0i32;
            for s in &seqs[start..end] {
                let mut sum = vec![0f64; self.n_embd];
                let mut last = Vec::new();
                for pos in 0..s.len() {
                    let e = self.ctx.embeddings_ith(idx).map_err(|e| {
                        EngineError::Decode(format!("no hidden state for token {idx}: {e}"))
                    })?;
                    if pos > 0 || s.len() == 1 {
                        for (a, &v) in sum.iter_mut().zip(e) {
                            *a += v as f64;
                        }
                    }
                    if pos + 1 == s.len() {
                        last = e.to_vec();
                    }
                    idx += 1;
                }
                let n = (s.len() - 1).max(1) as f64;
                out.push(PooledStates {
                    last,
                    mean: sum.into_iter().map(|v| (v / n) as f32).collect(),
                });
            }
            self.ctx.clear_kv_cache();
            start = end;
            on_progress(start);
        }
        Ok(out)
    }
}
