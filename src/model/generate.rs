//! Free generation under a GBNF grammar (the ReAct loop). Its own sequence (the first work
//! sequence), its own cache record; the scoring paths are untouched. Sampling is greedy or
//! seeded top-k, restricted to what the grammar allows.

use std::time::Instant;

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use super::decode::{Entry, RowId};
use super::{Engine, EngineError};
use crate::model::scoring::Token;
use crate::util::rng::SplitMix64;

/// What the generation sequence holds, owned by the caller so that successive prompts that
/// share a beginning (one ReAct run's steps, or runs of the same task) decode only the new
/// tokens. The engine checks it against the KV cache before trusting it.
#[derive(Debug, Default, Clone)]
pub struct GenCache {
    tokens: Vec<Token>,
}

impl GenCache {
    /// Tokens in the cache now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One generation: the grammar (GBNF, root rule `root`), budgets and sampling.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    /// GBNF text; `None` generates freely (the no-grammar baseline).
    pub grammar: Option<&'a str>,
    /// Generated tokens at most.
    pub max_tokens: usize,
    /// 0: greedy (deterministic whatever the seed); above: top-k sampling at this
    /// temperature with a seeded generator.
    pub temperature: f32,
    pub seed: u64,
    /// Generation stops between tokens once this instant has passed.
    pub deadline: Option<Instant>,
    /// A prefix slot (see [`Engine::set_prefix_cached`]) whose cells are copied into the
    /// generation sequence when they match the prompt's beginning further than the cache.
    pub prefix_slot: Option<usize>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerateStop {
    /// An end-of-generation token: the grammar is complete (only end tokens were allowed)
    /// or, without a grammar, the model ended.
    Complete,
    /// The caller's stop rule said so.
    StopRule,
    /// `max_tokens` generated.
    MaxTokens,
    /// The deadline passed.
    Deadline,
}

/// What a generation produced and measured.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub tokens: Vec<Token>,
    pub stop: GenerateStop,
    /// Prompt tokens, and how many were already in the generation sequence.
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    /// Wall time decoding the new prompt tokens, and generating.
    pub prefill_ms: f64,
    pub generate_ms: f64,
}

/// Candidates checked one by one against the grammar before the whole vocabulary is.
const GRAMMAR_FAST_CANDIDATES: usize = 64;
/// Candidates kept for temperature sampling.
const SAMPLE_TOP_K: usize = 40;

/// Indices of the `k` largest logits, largest first (ties: lower id first).
fn top_k_tokens(logits: &[f32], k: usize) -> Vec<Token> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let cmp = |a: &usize, b: &usize| {
        logits[*b]
            .partial_cmp(&logits[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| i as Token).collect()
}

/// Whether the grammar lets `token` come next: the token alone in a candidate array,
/// the grammar applied, its logit still finite.
fn grammar_allows(grammar: &mut LlamaSampler, token: Token) -> bool {
    let mut one = LlamaTokenDataArray::new(
        vec![LlamaTokenData::new(LlamaToken(token), 0.0, 0.0)],
        false,
    );
    grammar.apply(&mut one);
    one.data.first().is_some_and(|d| d.logit().is_finite())
}

/// Tokens the grammar allows among all of the vocabulary, with their logits.
fn grammar_survivors(grammar: &mut LlamaSampler, logits: &[f32]) -> Vec<(Token, f32)> {
    let mut all = LlamaTokenDataArray::new(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0))
            .collect(),
        false,
    );
    grammar.apply(&mut all);
    all.data
        .iter()
        .filter(|d| d.logit().is_finite())
        .map(|d| (d.id().0, d.logit()))
        .collect()
}

/// The candidates to pick from, likeliest first: the top `k` (greedy: the first allowed of
/// the top [`GRAMMAR_FAST_CANDIDATES`]). The likeliest candidates are checked one at a time
/// first (cheap); only when none passes is the grammar applied to the whole vocabulary.
fn candidates(
    grammar: Option<&mut LlamaSampler>,
    logits: &[f32],
    greedy: bool,
    k: usize,
) -> Vec<(Token, f32)> {
    let top = top_k_tokens(logits, k);
    let Some(g) = grammar else {
        return top.iter().map(|&t| (t, logits[t as usize])).collect();
    };
    let fast: Vec<(Token, f32)> = if greedy {
        top.iter()
            .copied()
            .find(|&t| grammar_allows(g, t))
            .map(|t| vec![(t, logits[t as usize])])
            .unwrap_or_default()
    } else {
        top.iter()
            .copied()
            .filter(|&t| grammar_allows(g, t))
            .map(|t| (t, logits[t as usize]))
            .collect()
    };
    if !fast.is_empty() {
        return fast;
    }
    let mut all = grammar_survivors(g, logits);
    all.sort_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    all.truncate(k);
    all
}

/// The next token: greedy or seeded top-k sampling, restricted to what the grammar allows.
fn pick_token(
    grammar: Option<&mut LlamaSampler>,
    logits: &[f32],
    temperature: f32,
    rng: &mut SplitMix64,
) -> Result<Token, EngineError> {
    let greedy = temperature <= 0.0;
    let k = if greedy {
        GRAMMAR_FAST_CANDIDATES
    } else {
        SAMPLE_TOP_K
    };
    let mut pool = candidates(grammar, logits, greedy, k);
    if pool.is_empty() {
        return Err(EngineError::Grammar(
            "no token of the vocabulary is allowed here".into(),
        ));
    }
    if greedy || pool.len() == 1 {
        return Ok(pool[0].0);
    }
    let max = pool[0].1;
    let weights: Vec<f64> = pool
        .iter()
        .map(|&(_, l)| (((l - max) / temperature) as f64).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    let mut r = rng.next_f64() * sum;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return Ok(pool[i].0);
        }
        r -= w;
    }
    // Rounding left r at the end: the last candidate.
    Ok(pool.pop().map(|p| p.0).unwrap_or_default())
}

impl Engine {
    /// A grammar sampler for `gbnf` (root rule `root`); an error when llama.cpp cannot
    /// parse it (its log says where).
    fn grammar_sampler(&self, gbnf: &str) -> Result<LlamaSampler, EngineError> {
        LlamaSampler::grammar(self.model, gbnf, "root")
            .map_err(|e| EngineError::Grammar(format!("llama.cpp rejected the grammar: {e}")))
    }

    /// Makes the generation sequence `seq` and `cache` hold the longest usable beginning of
    /// `prompt` (from the cache itself, or copied from `prefix_slot` when that matches
    /// further), always leaving the last prompt token to decode; returns its length.
    fn reuse_gen_cache(
        &mut self,
        seq: usize,
        cache: &mut GenCache,
        prompt: &[Token],
        prefix_slot: Option<usize>,
    ) -> Result<usize, EngineError> {
        // Trust the record only when the sequence holds exactly that many cells (scoring
        // uses the same sequence ids and clears them).
        if self.ctx.kv_cache_seq_pos_max(seq as i32) + 1 != cache.tokens.len() as i32 {
            self.clear_seq(seq);
            cache.tokens.clear();
        }
        let mut common = cache
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        if let Some(slot) = prefix_slot.filter(|&s| s < self.n_prefix_slots) {
            let from_slot = self.prefixes[slot]
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1);
            if from_slot > common {
                // The unified KV cache makes this copy metadata only.
                self.clear_seq(seq);
                cache.tokens.clear();
                self.ctx
                    .copy_kv_cache_seq(slot as i32, seq as i32, Some(0), Some(from_slot as u32))
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                cache.tokens = prompt[..from_slot].to_vec();
                common = from_slot;
            }
        }
        if common < cache.tokens.len() {
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(common as u32), None);
            cache.tokens.truncate(common);
        }
        Ok(common)
    }

    /// Decodes `prompt[common..]` on `seq` after checking there is room for it and
    /// `max_tokens` more; returns the last prompt token's logits.
    fn prefill(
        &mut self,
        seq: usize,
        cache: &mut GenCache,
        prompt: &[Token],
        common: usize,
        max_tokens: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let free = self
            .n_ctx()
            .saturating_sub(self.used_cells() + cache.tokens.len());
        let need = prompt.len() - common + max_tokens;
        if need > free {
            return Err(EngineError::ContextFull {
                need,
                free,
                n_ctx: self.info.n_ctx,
            });
        }
        let entries: Vec<Entry> = prompt
            .iter()
            .enumerate()
            .skip(common)
            .map(|(i, &t)| Entry {
                token: t,
                pos: i as i32,
                seqs: vec![seq as i32],
                row: (i + 1 == prompt.len()).then_some(RowId { job: 0, node: None }),
            })
            .collect();
        let mut logits: Vec<f32> = Vec::new();
        let decoded = self.run_entries(&entries, |_, l| logits = l.to_vec());
        // A failed decode leaves the sequence in an unknown state: start over next time.
        cache.tokens.clear();
        decoded?;
        cache.tokens = prompt.to_vec();
        Ok(logits)
    }

    /// Generates after `prompt` on the generation sequence (the first work sequence),
    /// under `req.grammar`, until the grammar is complete (an end token is the only one
    /// allowed), `stop` says so for the text so far, `max_tokens`, or the deadline.
    /// Prompt tokens already in `cache` (a common beginning) are not decoded again.
    pub fn generate(
        &mut self,
        cache: &mut GenCache,
        prompt: &[Token],
        req: &GenerateRequest,
        stop: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Decode("empty prompt".into()));
        }
        let t0 = Instant::now();
        let seq = self.n_prefix_slots;
        let mut grammar = match req.grammar {
            Some(g) => Some(self.grammar_sampler(g)?),
            None => None,
        };
        let common = self.reuse_gen_cache(seq, cache, prompt, req.prefix_slot)?;
        let mut logits = self.prefill(seq, cache, prompt, common, req.max_tokens)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut rng = SplitMix64(req.seed);
        let mut out = Generated {
            text: String::new(),
            tokens: Vec::new(),
            stop: GenerateStop::MaxTokens,
            prompt_tokens: prompt.len(),
            reused_tokens: common,
            prefill_ms,
            generate_ms: 0.0,
        };
        let mut bytes: Vec<u8> = Vec::new();
        while out.tokens.len() < req.max_tokens {
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                out.stop = GenerateStop::Deadline;
                break;
            }
            let tok = pick_token(grammar.as_mut(), &logits, req.temperature, &mut rng)?;
            if self.model.vocab().is_eog(LlamaToken(tok)) {
                out.stop = GenerateStop::Complete;
                break;
            }
            if let Some(g) = grammar.as_mut() {
                g.try_accept(LlamaToken(tok)).map_err(|e| {
                    EngineError::Grammar(format!("the grammar refused token {tok}: {e}"))
                })?;
            }
            bytes.extend(
                self.model
                    .vocab()
                    .token_to_piece(LlamaToken(tok), false, None),
            );
            out.tokens.push(tok);
            out.text = String::from_utf8_lossy(&bytes).into_owned();
            if stop(&out.text) {
                out.stop = GenerateStop::StopRule;
                break;
            }
            if out.tokens.len() == req.max_tokens {
                break;
            }
            let pos = cache.tokens.len() as i32;
            let entry = Entry {
                token: tok,
                pos,
                seqs: vec![seq as i32],
                row: Some(RowId { job: 0, node: None }),
            };
            let decoded = self.run_entries(std::slice::from_ref(&entry), |_, l| {
                logits.clear();
                logits.extend_from_slice(l);
            });
            if decoded.is_err() {
                cache.tokens.clear();
            }
            decoded?;
            cache.tokens.push(tok);
        }
        out.generate_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }

    /// Whether llama.cpp's grammar engine accepts `text` as a complete sentence of `gbnf`
    /// (tokenized as the model would generate it). For tests and checks of task files.
    pub fn grammar_accepts(&self, gbnf: &str, text: &str) -> Result<bool, EngineError> {
        let mut g = self.grammar_sampler(gbnf)?;
        for t in self.tokenize(text, false, false) {
            if !grammar_allows(&mut g, t) || g.try_accept(LlamaToken(t)).is_err() {
                return Ok(false);
            }
        }
        // Complete when an end-of-generation token is allowed now.
        let eos = self.model.vocab().eos().0;
        Ok(grammar_allows(&mut g, eos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_ordered_with_ties_by_id() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.0];
        assert_eq!(top_k_tokens(&logits, 3), vec![1, 3, 4]);
        assert_eq!(top_k_tokens(&logits, 10), vec![1, 3, 4, 0, 2]);
        assert!(top_k_tokens(&logits, 0).is_empty());
    }

    #[test]
    fn seeded_generator_repeats_and_stays_in_range() {
        let a: Vec<f64> = (0..5)
            .scan(SplitMix64(7), |g, _| Some(g.next_f64()))
            .collect();
        let b: Vec<f64> = (0..5)
            .scan(SplitMix64(7), |g, _| Some(g.next_f64()))
            .collect();
        let c: Vec<f64> = (0..5)
            .scan(SplitMix64(8), |g, _| Some(g.next_f64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|x| (0.0..1.0).contains(x)));
    }

    #[test]
    fn picking_without_a_grammar_is_greedy_or_seeded() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut rng = SplitMix64(1);
        assert_eq!(pick_token(None, &logits, 0.0, &mut rng).unwrap(), 1);
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..20)
                .map(|_| pick_token(None, &logits, 1.0, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        assert!(d.contains(&1) && d.contains(&2), "{d:?}");
    }
}
