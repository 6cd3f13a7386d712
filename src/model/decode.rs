//! The one decode loop every path shares: entries (token, position, sequences, whether its
//! logits row comes back) packed into llama.cpp batches, and the KV-cache bookkeeping
//! around it (free cells, clearing a sequence).

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::{tap, Engine, EngineError};
use crate::model::scoring::{LabelTrie, Token};

/// Where a requested row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowSource {
    /// The logits row (n_vocab floats).
    Logits,
    /// The final normed hidden state (`result_norm`, n_embd floats), through the layer tap.
    FinalNorm,
}

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

/// Work the engine's decodes have done since it loaded: `llama_decode` calls, tokens in
/// them and logits rows asked for. Counted, not timed, so a loaded machine does not blur
/// it; a benchmark subtracts two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    pub decodes: u64,
    pub tokens: u64,
    pub rows: u64,
}

impl DecodeCounts {
    /// The work between `earlier` and `self`.
    pub fn since(&self, earlier: &DecodeCounts) -> DecodeCounts {
        DecodeCounts {
            decodes: self.decodes - earlier.decodes,
            tokens: self.tokens - earlier.tokens,
            rows: self.rows - earlier.rows,
        }
    }

    /// Mean tokens per decode (0 with no decode).
    pub fn tokens_per_decode(&self) -> f64 {
        self.tokens as f64 / self.decodes.max(1) as f64
    }

    /// Mean logits rows per decode (0 with no decode).
    pub fn rows_per_decode(&self) -> f64 {
        self.rows as f64 / self.decodes.max(1) as f64
    }
}

impl Engine {
    /// Decodes, tokens and logits rows so far (see [`DecodeCounts`]).
    pub fn decode_counts(&self) -> DecodeCounts {
        self.decode_counts
    }

    /// Sequences left for requests and label branches (after the prefix slots).
    pub(super) fn work_seqs(&self) -> usize {
        self.n_seq_max - self.n_prefix_slots
    }

    /// Requests one decode scores together at most, for any label set: half the work
    /// sequences hold requests, the rest their label branches.
    pub fn jobs_per_decode(&self) -> usize {
        requests_per_decode(self.work_seqs(), self.max_logit_rows, false)
    }

    /// Requests one decode scores together at most for labels in `trie`: when every label
    /// is one token there are no branches, so every work sequence can hold a request, up
    /// to the logits rows one decode returns (one each); otherwise as
    /// [`Engine::jobs_per_decode`].
    pub fn jobs_per_decode_for(&self, trie: &LabelTrie) -> usize {
        requests_per_decode(
            self.work_seqs(),
            self.max_logit_rows,
            trie.decoded.is_empty(),
        )
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

    /// Prompt-processing rate in tokens/s, measured like llama-bench's `pp<batch>` test:
    /// batches of `batch` tokens, each decoded from an empty sequence (position 0), about
    /// `n_tokens` tokens in all; logits for each batch's last token only.
    pub fn prompt_rate(&mut self, n_tokens: usize, batch: usize) -> Result<f64, EngineError> {
        self.prompt_rate_rows(n_tokens, batch, 1)
    }

    /// [`Engine::prompt_rate`] with `rows` logits rows a batch (the last token of each of
    /// `rows` equal parts), the shape label scoring decodes have: one row per request. What
    /// llama.cpp alone does for that shape, to compare a scoring path's tokens/s with.
    pub fn prompt_rate_rows(
        &mut self,
        n_tokens: usize,
        batch: usize,
        rows: usize,
    ) -> Result<f64, EngineError> {
        let free = self.n_ctx().saturating_sub(self.used_cells());
        let batch = batch.clamp(1, self.n_batch).min(free);
        // Whole batches only: each is one llama-bench-like test.
        let n = n_tokens.max(batch) / batch.max(1) * batch;
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
                pos: (i % batch) as i32,
                seqs: vec![seq],
                row: row_at(i % batch, batch, rows).then_some(RowId { job: 0, node: None }),
            })
            .collect();
        let t = Instant::now();
        for chunk in entries.chunks(batch) {
            // Clearing a sequence is bookkeeping in llama.cpp (no memory is touched).
            self.clear_seq(seq as usize);
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
        on_row: impl FnMut(RowId, &[f32]),
    ) -> Result<(), EngineError> {
        self.run_entries_from(entries, RowSource::Logits, on_row)
    }

    /// [`Engine::run_entries`] with the rows read from `source`: with
    /// [`RowSource::FinalNorm`] `on_row` gets each requested row's final normed hidden state
    /// (`n_embd` floats) and the graph stops before the output projection. A decode is
    /// then at most one ubatch, so the tap sees each tensor once.
    pub(super) fn run_entries_from(
        &mut self,
        entries: &[Entry],
        source: RowSource,
        mut on_row: impl FnMut(RowId, &[f32]),
    ) -> Result<(), EngineError> {
        let tapped = source == RowSource::FinalNorm && self.tap.is_some();
        if source == RowSource::FinalNorm && !tapped {
            return Err(EngineError::Decode(
                "hidden-state rows asked for on a context without the layer tap".into(),
            ));
        }
        let max_tokens = if tapped {
            self.n_ubatch.min(self.n_batch)
        } else {
            self.n_batch
        };
        let n_embd = self.n_embd();
        let mut i = 0;
        while i < entries.len() {
            self.batch.clear();
            let mut rows = Vec::new();
            while i < entries.len() && (self.batch.n_tokens() as usize) < max_tokens {
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
            let tap = if tapped && !rows.is_empty() {
                self.tap.as_mut()
            } else {
                None
            };
            if let Some(tap) = tap {
                tap.get()
                    .arm(vec![tap::FINAL_NORM.to_string()], n_embd, rows.len());
            } else if let Some(tap) = self.tap.as_mut() {
                // Nothing asked for: the callback lets the whole graph run. Every decode of
                // the scoring context comes through here, so none runs with a stale arm.
                tap.get().arm(Vec::new(), n_embd, 0);
            }
            self.ctx.decode(&mut self.batch).map_err(|e| match e {
                llama_cpp_2::DecodeError::NoKvCacheSlot => EngineError::ContextFull {
                    need: self.batch.n_tokens() as usize,
                    free: 0,
                    n_ctx: self.info.n_ctx,
                },
                other => EngineError::Decode(other.to_string()),
            })?;
            self.decode_counts.decodes += 1;
            self.decode_counts.tokens += self.batch.n_tokens() as u64;
            self.decode_counts.rows += rows.len() as u64;
            match self.tap.as_mut().filter(|_| tapped && !rows.is_empty()) {
                Some(tap) => {
                    let tap = tap.get();
                    tap.check().map_err(EngineError::Decode)?;
                    // The graph's output rows follow the batch order of the tokens that ask
                    // for one (a single ubatch, split in order on the unified cache).
                    for (k, (_, r)) in rows.into_iter().enumerate() {
                        on_row(r, &tap.out[0][k * n_embd..(k + 1) * n_embd]);
                    }
                }
                None => {
                    for (idx, r) in rows {
                        on_row(r, self.ctx.get_logits_ith(idx));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether token `i` of a batch of `len` asks for a logits row when the batch asks for
/// `rows` of them: the last token of each of `rows` (at most `len`) equal parts.
fn row_at(i: usize, len: usize, rows: usize) -> bool {
    let rows = rows.clamp(1, len.max(1));
    // Part k ends before token ceil((k + 1) * len / rows).
    (0..rows).any(|k| ((k + 1) * len).div_ceil(rows) == i + 1)
}

/// Requests one decode scores together for `work_seqs` sequences beyond the prefix slots
/// and `max_rows` logits rows a decode: `single_token` label sets need no branch sequences
/// and one row a request; others keep half the sequences for their label branches.
pub fn requests_per_decode(work_seqs: usize, max_rows: usize, single_token: bool) -> usize {
    if single_token {
        work_seqs.min(max_rows).max(1)
    } else {
        (work_seqs / 2).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_end_equal_parts_of_a_batch() {
        let at = |len, rows| {
            (0..len)
                .filter(|&i| row_at(i, len, rows))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(16, 1), vec![15]);
        assert_eq!(at(16, 4), vec![3, 7, 11, 15]);
        assert_eq!(at(10, 3), vec![3, 6, 9]);
        assert_eq!(at(3, 8), vec![0, 1, 2]);
        // A short last batch still ends in a row.
        assert_eq!(at(5, 2), vec![2, 4]);
    }

    #[test]
    fn single_token_labels_fill_every_work_sequence() {
        // x86-dev: 32 rows, 32 work sequences.
        assert_eq!(requests_per_decode(32, 32, true), 32);
        assert_eq!(requests_per_decode(32, 32, false), 16);
        // Rows bound it too; never zero.
        assert_eq!(requests_per_decode(40, 8, true), 8);
        assert_eq!(requests_per_decode(1, 32, false), 1);
        assert_eq!(requests_per_decode(0, 32, true), 1);
    }
}
