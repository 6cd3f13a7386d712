//! Features: a second llama.cpp context on the engine's model, with embeddings on and no
//! pooling, reads every token's hidden states at chosen layers (through the layer tap,
//! [`super::tap`], which stops the graph after the deepest one) or the final normed output;
//! pooled per sequence for frozen-feature heads (`edgeact tune --head`). The scoring context
//! is not touched.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::load::backend;
use super::tap::{self, TapBox};
use super::{Engine, EngineError};
use crate::model::config::EngineConfig;
use crate::model::scoring::Token;

/// The hidden states of one token sequence at the layers asked for (by default the final
/// ones, after the model's output norm: the input of the output projection), pooled two ways;
/// with several layers, each pooling is the layers' vectors concatenated in the order asked.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledStates {
    /// The last token's hidden state.
    pub last: Vec<f32>,
    /// The mean over every token but the first (the BOS token, whose state does not depend
    /// on the input); the one token's state for a one-token sequence.
    pub mean: Vec<f32>,
}

impl PooledStates {
    /// The blocks of `to` out of states taken at `from` (each layer of `to` must be in
    /// `from`; an empty list is one block, the final output): one extraction of every layer
    /// a search needs serves each layer choice. None when a layer is missing.
    pub fn select(&self, from: &[u32], to: &[u32]) -> Option<PooledStates> {
        let nf = from.len().max(1);
        let n_embd = self.last.len() / nf;
        let mut out = PooledStates {
            last: Vec::new(),
            mean: Vec::new(),
        };
        let want: Vec<Option<usize>> = if to.is_empty() {
            vec![from.is_empty().then_some(0)]
        } else {
            to.iter()
                .map(|l| from.iter().position(|f| f == l))
                .collect()
        };
        for i in want {
            let r = i? * n_embd..(i? + 1) * n_embd;
            out.last.extend_from_slice(self.last.get(r.clone())?);
            out.mean.extend_from_slice(self.mean.get(r)?);
        }
        Some(out)
    }
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
    /// After `ctx`: the context holds a pointer into it and is dropped first.
    tap: TapBox,
    batch: LlamaBatch<'static>,
    n_embd: usize,
    n_layer: u32,
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
        let tap = TapBox::new();
        let cparams = tap::with_tap(cparams, &tap);
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
            tap,
            batch: LlamaBatch::new(n_batch as usize, 1),
            n_embd: self.n_embd(),
            n_layer: self.model.n_layer(),
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

    /// The model's layers (valid layer indices are below it).
    pub fn n_layer(&self) -> u32 {
        self.n_layer
    }

    /// The pooled hidden states of each sequence at `layers` (outputs of those layers,
    /// concatenated in this order; [`FeatureContext::n_layer`] or empty: the final normed
    /// output), in order. The graph
    /// stops after the deepest tensor asked for. Whole sequences are packed into decodes
    /// (each on its own KV sequence); `on_progress` gets the number done after each decode.
    /// A sequence that is empty or longer than [`FeatureContext::max_tokens`], or a layer
    /// the model does not have, is an error: cut inputs before.
    pub fn hidden_states(
        &mut self,
        seqs: &[Vec<Token>],
        layers: &[u32],
        mut on_progress: impl FnMut(usize),
    ) -> Result<Vec<PooledStates>, EngineError> {
        self.check(seqs)?;
        if let Some(&bad) = layers.iter().find(|&&l| l > self.n_layer) {
            return Err(EngineError::Decode(format!(
                "layer {bad} asked for; the model has layers 0..{} ({} is the final normed output)",
                self.n_layer, self.n_layer
            )));
        }
        let names: Vec<String> = if layers.is_empty() {
            vec![tap::FINAL_NORM.to_string()]
        } else {
            layers
                .iter()
                .map(|&l| match l == self.n_layer {
                    true => tap::FINAL_NORM.to_string(),
                    false => tap::layer_name(l),
                })
                .collect()
        };
        let mut out = Vec::with_capacity(seqs.len());
        for (start, end) in groups(seqs, self.n_seq_max, self.n_batch) {
            let group = &seqs[start..end];
            let n_tokens: usize = group.iter().map(Vec::len).sum();
            self.tap.get().arm(names.clone(), self.n_embd, n_tokens);
            self.decode_group(group)?;
            let tap = self.tap.get();
            tap.check().map_err(EngineError::Decode)?;
            let mut row0 = 0;
            for s in group {
                let mut st = PooledStates {
                    last: Vec::with_capacity(names.len() * self.n_embd),
                    mean: Vec::with_capacity(names.len() * self.n_embd),
                };
                for block in &tap.out {
                    let p = pool(s.len(), |pos| {
                        let r = (row0 + pos) * self.n_embd;
                        &block[r..r + self.n_embd]
                    });
                    st.last.extend(p.last);
                    st.mean.extend(p.mean);
                }
                row0 += s.len();
                out.push(st);
            }
            on_progress(end);
        }
        Ok(out)
    }

    /// The final normed states read the way an embeddings context gives them, after the
    /// whole graph (output projection included): the reference the tap is checked against,
    /// and the cost it saves (`bench-accuracy`'s feature timing).
    pub fn hidden_states_full_graph(
        &mut self,
        seqs: &[Vec<Token>],
    ) -> Result<Vec<PooledStates>, EngineError> {
        self.check(seqs)?;
        let mut out = Vec::with_capacity(seqs.len());
        for (start, end) in groups(seqs, self.n_seq_max, self.n_batch) {
            let group = &seqs[start..end];
            // Nothing asked for: the callback lets the whole graph run.
            self.tap.get().arm(Vec::new(), self.n_embd, 0);
            self.decode_group(group)?;
            let mut idx = 0i32;
            for s in group {
                let mut rows = Vec::with_capacity(s.len());
                for _ in 0..s.len() {
                    let e = self.ctx.embeddings_ith(idx).map_err(|e| {
                        EngineError::Decode(format!("no hidden state for token {idx}: {e}"))
                    })?;
                    rows.push(e.to_vec());
                    idx += 1;
                }
                out.push(pool(s.len(), |pos| &rows[pos]));
            }
        }
        Ok(out)
    }

    fn check(&self, seqs: &[Vec<Token>]) -> Result<(), EngineError> {
        match seqs
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.len() > self.n_batch)
        {
            Some((i, s)) => Err(EngineError::Decode(format!(
                "feature sequence {i} has {} tokens; 1..={} fit one decode",
                s.len(),
                self.n_batch
            ))),
            None => Ok(()),
        }
    }

    /// One decode of `group`, each sequence on its own KV sequence, every token an output;
    /// the cache is cleared before and after.
    fn decode_group(&mut self, group: &[Vec<Token>]) -> Result<(), EngineError> {
        self.ctx.clear_kv_cache();
        self.batch.clear();
        for (k, s) in group.iter().enumerate() {
            for (pos, &t) in s.iter().enumerate() {
                self.batch
                    .add(LlamaToken(t), pos as i32, &[k as i32], true)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
        }
        let r = self
            .ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Decode(e.to_string()));
        self.ctx.clear_kv_cache();
        r
    }
}

/// Consecutive groups `[start, end)` of whole sequences that fit one decode: at most
/// `n_seq_max` sequences and `n_batch` tokens (each sequence fits alone).
fn groups(seqs: &[Vec<Token>], n_seq_max: usize, n_batch: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < seqs.len() && end - start < n_seq_max && tokens + seqs[end].len() <= n_batch {
            tokens += seqs[end].len();
            end += 1;
        }
        // A sequence longer than n_batch is refused before; never loop on it.
        let end = end.max(start + 1);
        out.push((start, end));
        start = end;
    }
    out
}

/// Last-token and mean pooling of one sequence's `len` rows. The mean leaves out the first
/// token (BOS, whose state does not depend on the input) unless it is the only one.
fn pool<'a>(len: usize, row: impl Fn(usize) -> &'a [f32]) -> PooledStates {
    let width = if len == 0 { 0 } else { row(0).len() };
    let mut sum = vec![0f64; width];
    for pos in 0..len {
        if pos > 0 || len == 1 {
            for (a, &v) in sum.iter_mut().zip(row(pos)) {
                *a += v as f64;
            }
        }
    }
    let n = (len.saturating_sub(1)).max(1) as f64;
    PooledStates {
        last: if len == 0 {
            Vec::new()
        } else {
            row(len - 1).to_vec()
        },
        mean: sum.into_iter().map(|v| (v / n) as f32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_takes_the_blocks_of_the_layers_asked_for() {
        let s = PooledStates {
            last: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            mean: vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0],
        };
        let t = s.select(&[3, 6, 9], &[9, 3]).unwrap();
        assert_eq!(t.last, vec![5.0, 6.0, 1.0, 2.0]);
        assert_eq!(t.mean, vec![-5.0, -6.0, -1.0, -2.0]);
        assert!(s.select(&[3, 6, 9], &[4]).is_none());
        assert!(s.select(&[3, 6, 9], &[]).is_none());
        let f = PooledStates {
            last: vec![1.0],
            mean: vec![2.0],
        };
        assert_eq!(f.select(&[], &[]).unwrap(), f);
    }

    #[test]
    fn groups_pack_whole_sequences_under_both_limits() {
        let seqs: Vec<Vec<Token>> = [3, 3, 2, 5, 1].iter().map(|&n| vec![1; n]).collect();
        assert_eq!(groups(&seqs, 8, 8), vec![(0, 3), (3, 5)]);
        assert_eq!(groups(&seqs, 2, 64), vec![(0, 2), (2, 4), (4, 5)]);
        assert!(groups(&[], 2, 8).is_empty());
    }

    #[test]
    fn pooling_skips_bos_in_the_mean_but_not_alone() {
        let rows = [vec![100.0f32, 0.0], vec![1.0, 2.0], vec![3.0, 4.0]];
        let p = pool(3, |i| &rows[i]);
        assert_eq!(p.last, vec![3.0, 4.0]);
        assert_eq!(p.mean, vec![2.0, 3.0]);
        let one = pool(1, |i| &rows[i]);
        assert_eq!(one.mean, vec![100.0, 0.0]);
        assert_eq!(one.last, vec![100.0, 0.0]);
    }
}
