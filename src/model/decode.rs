//! The one decode loop every path shares: entries (token, position, sequences, whether its
//! logits row comes back) packed into llama.cpp batches, and the KV-cache bookkeeping
//! around it (free cells, clearing a sequence).

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::{Engine, EngineError};
use crate::model::scoring::Token;

/// Which logits row an entry asks for, as its caller names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowId {
    pub(super) job: usize,
    /// None: the prompt's last token; Some(k): decoded trie node k.
    pub(super) node: Option<usize>,
}

/// One token to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) token: Token,
    pub(super) pos: i32,
    pub(super) seqs: Vec<i32>,
    pub(super) row: Option<RowId>,
}

impl Engine {
    /// Sequences left for requests and label branches (after the prefix slots).
    pub(super) fn work_seqs(&self) -> usize {
        self.n_seq_max - self.n_prefix_slots
    }

    /// Requests one decode scores together at most: half the work sequences hold requests,
    /// the rest their label branches.
    pub fn jobs_per_decode(&self) -> usize {
        (self.work_seqs() / 2).max(1)
    }

    pub(super) fn clear_seq(&mut self, seq: usize) {
        // Removing a whole sequence cannot fail; the error is only for ids above i32::MAX.
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    }

    pub(super) fn used_cells(&self) -> usize {
        self.prefixes.iter().map(Vec::len).sum()
    }

    pub(super) fn check_room(&self, need: usize) -> Result<(), EngineError> {
        let free = self.n_ctx().saturating_sub(self.used_cells());
        if need > free {
            return Err(EngineError::ContextFull {
                need,
                free,
                n_ctx: self.info.n_ctx,
            });
        }
        Ok(())
    }

    /// Prompt-processing rate in tokens/s, measured like llama-bench's `pp` test: `n_tokens`
    /// tokens (at most the free cells) decoded on an empty sequence in batches of `batch`,
    /// logits for each batch's last token only.
    pub fn prompt_rate(&mut self, n_tokens: usize, batch: usize) -> Result<f64, EngineError> {
        let free = self.n_ctx().saturating_sub(self.used_cells());
        let n = n_tokens.min(free);
        let batch = batch.clamp(1, self.n_batch);
        let text = "The quick brown fox jumps over the lazy dog while the committee reviews \
                    the quarterly budget and the weather turns to rain over the harbour. ";
        let pool = self.tokenize(text, false, false);
        if n == 0 || pool.is_empty() {
            return Ok(0.0);
        }
        let seq = self.n_prefix_slots as i32;
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                token: pool[i % pool.len()],
                pos: i as i32,
                seqs: vec![seq],
                row: ((i + 1) % batch == 0 || i + 1 == n).then_some(RowId { job: 0, node: None }),
            })
            .collect();
        self.clear_seq(seq as usize);
        let t = Instant::now();
        for chunk in entries.chunks(batch) {
            self.run_entries(chunk, |_, _| {})?;
        }
        let s = t.elapsed().as_secs_f64();
        self.clear_seq(seq as usize);
        Ok(n as f64 / s)
    }

    /// Decodes entries in batches bounded by n_batch and by the logits rows one decode
    /// may return; calls `on_row` with each requested row's logits.
    pub(super) fn run_entries(
        &mut self,
        entries: &[Entry],
        mut on_row: impl FnMut(RowId, &[f32]),
    ) -> Result<(), EngineError> {
        let mut i = 0;
        while i < entries.len() {
            self.batch.clear();
            let mut rows = Vec::new();
            while i < entries.len() && (self.batch.n_tokens() as usize) < self.n_batch {
                let e = &entries[i];
                if e.row.is_some() && rows.len() == self.max_logit_rows {
                    break;
                }
                let idx = self.batch.n_tokens();
                self.batch
                    .add(LlamaToken(e.token), e.pos, &e.seqs, e.row.is_some())
                    .map_err(|err| EngineError::Decode(err.to_string()))?;
                if let Some(r) = e.row {
                    rows.push((idx, r));
                }
                i += 1;
            }
            self.ctx.decode(&mut self.batch).map_err(|e| match e {
                llama_cpp_2::DecodeError::NoKvCacheSlot => EngineError::ContextFull {
                    need: self.batch.n_tokens() as usize,
                    free: 0,
                    n_ctx: self.info.n_ctx,
                },
                other => EngineError::Decode(other.to_string()),
            })?;
            for (idx, r) in rows {
                on_row(r, self.ctx.get_logits_ith(idx));
            }
        }
        Ok(())
    }
}
