//! Label scoring: each job's prompt suffix decoded after its cached prefix, then the
//! label-trie nodes whose logits are needed, several jobs per decode (micro-batching); and
//! the slow reference path. The batch plan (which jobs share a decode, which tokens go on
//! which sequence, which rows come back) is plain functions over the jobs, tested without
//! a model; the `Engine` methods only add the KV-cache copies and the decodes.

use std::ops::Range;
use std::time::Instant;

use super::decode::RowSource;
use super::decode::{Entry, RowId};
use super::label_rows::LabelRows;
use super::{Engine, EngineError};
use crate::model::scoring::{
    logsumexp, LabelLogprob, LabelSearch, LabelTrie, LogprobOver, Pruning, Token,
};

/// One request to score: the whole prompt's tokens, and the labels.
pub struct ScoreJob<'a> {
    /// A prefix slot whose cached tokens may be reused.
    pub prefix: Option<usize>,
    pub tokens: &'a [Token],
    pub trie: &'a LabelTrie,
    /// Leave labels that cannot win unfinished (None: score every label fully).
    pub pruning: Option<Pruning>,
    /// What to normalize the label log-probabilities over: `Labels` where the engine and
    /// label set allow it (else the vocabulary); `Vocab` always reads full logits rows.
    pub logprob_over: LogprobOver,
}

/// What scoring one job measured.
#[derive(Debug, Clone)]
pub struct ScoreOut {
    pub labels: Vec<LabelLogprob>,
    /// Prompt tokens taken from the cached prefix.
    pub reused_tokens: usize,
    /// Tokens this job decoded (suffix and label tokens).
    pub decoded_tokens: usize,
    /// Wall time in llama.cpp decode for the batch this job was in.
    pub decode_ms: f64,
    /// Wall time turning logits into label log-probabilities.
    pub scoring_ms: f64,
    /// How many jobs shared the decode.
    pub batch_jobs: usize,
    /// What the label log-probabilities were normalized over.
    pub logprob_over: LogprobOver,
}

// ---------------------------------------------------------------------------------------
// The batch plan: pure.

/// KV cells a job takes beyond the `reuse` prompt tokens copied from its prefix: its prompt
/// suffix and every decoded label-trie node.
fn job_cells(job: &ScoreJob, reuse: usize) -> usize {
    job.tokens.len() - reuse + job.trie.decoded.len()
}

/// Jobs (by the cells each needs) into groups that share decodes: at most `max_jobs` a
/// group, and a group's cells within `free_cells`. A job always starts a group, even one
/// that does not fit alone (scoring it reports the full context).
fn group_jobs(needs: &[usize], max_jobs: usize, free_cells: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < needs.len() {
        let mut end = start;
        let mut cells = 0;
        while end < needs.len() && end - start < max_jobs {
            let need = needs[end];
            if end > start && cells + need > free_cells {
                break;
            }
            cells += need;
            end += 1;
        }
        groups.push(start..end);
        start = end;
    }
    groups
}

/// Phase A: each job's prompt tokens after its `reuse` on its own request sequence
/// (`base + k`), the last prompt token's logits row asked for.
fn suffix_entries(jobs: &[ScoreJob], reuse: &[usize], base: usize) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (k, (job, &r)) in jobs.iter().zip(reuse).enumerate() {
        let seq = base + k;
        let n = job.tokens.len();
        for (i, &t) in job.tokens.iter().enumerate().skip(r) {
            entries.push(Entry {
                token: t,
                pos: i as i32,
                seqs: vec![seq as i32],
                row: (i == n - 1).then_some(RowId { job: k, node: None }),
            });
        }
    }
    entries
}

/// The branches of one round: for each job, the chosen decoded nodes (`rounds[k]`, indices
/// into `trie.decoded`) with no chosen descendant, as (job, trie node).
fn round_branches(jobs: &[ScoreJob], rounds: &[Vec<usize>]) -> Vec<(usize, usize)> {
    let mut branches = Vec::new();
    for (k, chosen) in rounds.iter().enumerate() {
        let trie = jobs[k].trie;
        for &d in chosen {
            let below = chosen
                .iter()
                .any(|&o| o != d && trie.is_ancestor_or_self(trie.decoded[d], trie.decoded[o]));
            if !below {
                branches.push((k, trie.decoded[d]));
            }
        }
    }
    branches
}

/// Phase B, one pass: branch `i` of `pass` runs on sequence `first + i` (a copy of its
/// job's request sequence) and decodes its path from the first label token. A node shared
/// by several branches of the pass is one entry on all their sequences; its row is asked
/// for only when the round chose it and `row_done(job, d)` says it is not read yet.
/// Counts each entry into `decoded[job]`.
fn branch_entries(
    jobs: &[ScoreJob],
    rounds: &[Vec<usize>],
    pass: &[(usize, usize)],
    first: usize,
    row_done: impl Fn(usize, usize) -> bool,
    decoded: &mut [usize],
) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (k, job) in jobs.iter().enumerate() {
        let trie = job.trie;
        let n = job.tokens.len();
        // Breadth first keeps each sequence's positions increasing.
        for &node in &trie.decoded {
            let seqs: Vec<i32> = pass
                .iter()
                .enumerate()
                .filter(|(_, &(pk, leaf))| pk == k && trie.is_ancestor_or_self(node, leaf))
                .map(|(i, _)| (first + i) as i32)
                .collect();
            if seqs.is_empty() {
                continue;
            }
            // Every node on a decoded path is itself a decoded node.
            let d = trie.decoded_index[node].unwrap_or_default();
            let want = rounds[k].contains(&d) && !row_done(k, d);
            decoded[k] += 1;
            entries.push(Entry {
                token: trie.nodes[node].token,
                pos: (n - 1 + trie.nodes[node].depth) as i32,
                seqs,
                row: want.then_some(RowId {
                    job: k,
                    node: Some(d),
                }),
            });
        }
    }
    entries
}

/// The reference path's entries for one label: the prompt and all but the label's last
/// token from position 0 on `seq`; row `job: j` is the one that predicts label token `j`.
fn naive_entries(tokens: &[Token], label: &[Token], seq: usize) -> Vec<Entry> {
    let n = tokens.len();
    tokens
        .iter()
        .chain(&label[..label.len() - 1])
        .enumerate()
        .map(|(i, &t)| Entry {
            token: t,
            pos: i as i32,
            seqs: vec![seq as i32],
            row: (i + 1 >= n).then_some(RowId {
                job: i + 1 - n,
                node: None,
            }),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The decodes.

impl Engine {
    /// Reusable prompt length for `job`: the common prefix with its slot, always leaving
    /// the last prompt token to decode (its logits score the labels).
    fn reuse_len(&self, job: &ScoreJob) -> usize {
        let Some(slot) = job.prefix else { return 0 };
        let cached = &self.prefixes[slot];
        let common = cached
            .iter()
            .zip(job.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(job.tokens.len().saturating_sub(1))
    }

    /// Scores each job's labels, several jobs per decode where sequences and cells allow
    /// (micro-batching), reusing cached prefixes and decoding only the label-trie nodes
    /// whose logits are needed.
    pub fn score(&mut self, jobs: &[ScoreJob]) -> Result<Vec<ScoreOut>, EngineError> {
        let mut outs = Vec::with_capacity(jobs.len());
        let free_cells = self.n_ctx().saturating_sub(self.used_cells());
        let max_jobs = jobs
            .iter()
            .map(|j| self.jobs_per_decode_for(j.trie))
            .min()
            .unwrap_or(1);
        let needs: Vec<usize> = jobs
            .iter()
            .map(|j| job_cells(j, self.reuse_len(j)))
            .collect();
        for group in group_jobs(&needs, max_jobs, free_cells) {
            outs.extend(self.score_group(&jobs[group])?);
        }
        Ok(outs)
    }

    /// Why label tokens' logits cannot be computed from their output rows alone on this
    /// engine (the model's output is not tied to its embedding, an adapter or GPU is in
    /// use), or None when they can. Either way a job's `logprob_over` is honoured: without
    /// the rows, the full logits rows are read and normalized as asked.
    pub fn label_rows_unavailable(&self) -> Option<&str> {
        self.tied.as_ref().err().map(String::as_str)
    }

    /// The output rows of `trie`'s label tokens when they can be scored over the labels
    /// (the model's output tied to its embedding). Read on first use.
    fn label_rows_for(&mut self, trie: &LabelTrie) -> Option<LabelRows> {
        let tied = self.tied.as_ref().ok()?;
        let tokens = label_tokens(trie);
        if let Some((_, r)) = self.label_rows.iter().find(|(t, _)| *t == tokens) {
            return r.clone();
        }
        // Read once per label set; a failure (said once) keeps that set on the full rows.
        let rows = tied
            .label_rows(&tokens)
            .map_err(|why| tracing::warn!("labels scored over the vocabulary: {why}"))
            .ok();
        self.label_rows.push((tokens, rows.clone()));
        rows
    }

    /// Each job's label rows when the whole group is scored over its labels, else None.
    fn group_label_rows(&mut self, jobs: &[ScoreJob]) -> Option<Vec<LabelRows>> {
        jobs.iter()
            .map(|j| match j.logprob_over {
                LogprobOver::Labels => self.label_rows_for(j.trie),
                LogprobOver::Vocab => None,
            })
            .collect()
    }

    fn score_group(&mut self, jobs: &[ScoreJob]) -> Result<Vec<ScoreOut>, EngineError> {
        let t0 = Instant::now();
        // The label rows when every job is over its labels and their rows can be read;
        // otherwise the full logits rows, each normalized as its job asks.
        let label_rows = self.group_label_rows(jobs);
        let source = match label_rows {
            Some(_) => RowSource::FinalNorm,
            None => RowSource::Logits,
        };
        let base = self.n_prefix_slots;
        let reuse: Vec<usize> = jobs.iter().map(|j| self.reuse_len(j)).collect();
        let need: usize = jobs.iter().zip(&reuse).map(|(j, &r)| job_cells(j, r)).sum();
        self.check_room(need)?;
        // Phase A: every job's suffix on its own request sequence, one decode.
        for (k, (job, &r)) in jobs.iter().zip(&reuse).enumerate() {
            let seq = base + k;
            self.clear_seq(seq);
            if r > 0 {
                let slot = job.prefix.unwrap_or(0) as i32;
                self.ctx
                    .copy_kv_cache_seq(slot, seq as i32, Some(0), Some(r as u32))
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
        }
        let entries = suffix_entries(jobs, &reuse, base);
        let mut searches: Vec<LabelSearch> = jobs
            .iter()
            .map(|j| LabelSearch::new(j.trie, j.pruning, j.logprob_over))
            .collect();
        let mut decoded: Vec<usize> = jobs
            .iter()
            .zip(&reuse)
            .map(|(j, r)| j.tokens.len() - r)
            .collect();
        let mut scoring_s = 0.0;
        let mut collect = |row: RowId, values: &[f32], searches: &mut Vec<LabelSearch>| {
            let t = Instant::now();
            match &label_rows {
                // `values` is the final hidden state: the row's logits over the tokens
                // that continue a label there.
                Some(rows) => {
                    let needed = jobs[row.job].trie.needed(row.node);
                    let lp = rows[row.job].logprobs(values, &needed);
                    searches[row.job].record_row(row.node, |tok| {
                        needed
                            .iter()
                            .position(|&t| t == tok)
                            .map_or(f64::NEG_INFINITY, |i| lp[i])
                    });
                }
                None => {
                    let job = &jobs[row.job];
                    let lse = normalizer(values, job.logprob_over, job.trie, row.node);
                    searches[row.job].record_row(row.node, |tok| values[tok as usize] as f64 - lse);
                }
            }
            scoring_s += t.elapsed().as_secs_f64();
        };
        self.run_entries_from(&entries, source, |row, v| collect(row, v, &mut searches))?;
        // Phase B: label-trie nodes in rounds (one round unless pruning asks for more). In a
        // round each branch (a chosen node with no chosen descendant) gets a sequence copied
        // from its request; its path from the first label token is decoded, with logits only
        // where a row is still needed. As many branches per decode as free sequences allow.
        let per_pass = (self.work_seqs() - jobs.len()).max(1);
        loop {
            let rounds: Vec<Vec<usize>> = searches.iter().map(LabelSearch::next_round).collect();
            if rounds.iter().all(Vec::is_empty) {
                break;
            }
            for pass in round_branches(jobs, &rounds).chunks(per_pass) {
                let first = base + jobs.len();
                for (i, &(k, _)) in pass.iter().enumerate() {
                    self.clear_seq(first + i);
                    self.ctx
                        .copy_kv_cache_seq((base + k) as i32, (first + i) as i32, None, None)
                        .map_err(|e| EngineError::Decode(e.to_string()))?;
                }
                let row_done = |k: usize, d: usize| searches[k].row_done(d);
                let entries = branch_entries(jobs, &rounds, pass, first, row_done, &mut decoded);
                self.run_entries_from(&entries, source, |row, v| collect(row, v, &mut searches))?;
                for i in 0..pass.len() {
                    self.clear_seq(first + i);
                }
            }
        }
        for k in 0..jobs.len() {
            self.clear_seq(base + k);
        }
        let total_s = t0.elapsed().as_secs_f64();
        Ok(searches
            .iter()
            .zip(&reuse)
            .zip(&decoded)
            .zip(jobs)
            .map(|(((search, &r), &decoded_tokens), job)| ScoreOut {
                labels: search.finish(),
                reused_tokens: r,
                decoded_tokens,
                decode_ms: (total_s - scoring_s) * 1e3,
                scoring_ms: scoring_s * 1e3,
                batch_jobs: jobs.len(),
                logprob_over: job.logprob_over,
            })
            .collect())
    }

    /// The reference path: each label scored by decoding the whole prompt plus that
    /// label from an empty sequence. Slow on purpose; tests and benchmarks compare against it.
    ///
    /// llama.cpp's CPU kernels round differently with batch size and with where the cells
    /// sit in the KV cache (measured: up to 0.3 nats on unlikely labels, about 0.01 in label
    /// probability), so paths agree within a tolerance, not bit for bit. `split_at` decodes
    /// `tokens[..split_at]` and the rest as separate batches, like the prefix-reuse path.
    /// Over the labels, each full logits row is normalized over the tokens that continue a
    /// label there (what the fast path computes from the label rows alone).
    pub fn score_naive(
        &mut self,
        tokens: &[Token],
        trie: &LabelTrie,
        split_at: Option<usize>,
        over: LogprobOver,
    ) -> Result<ScoreOut, EngineError> {
        let t0 = Instant::now();
        let seq = self.n_prefix_slots;
        let mut labels = Vec::new();
        let mut decoded = 0;
        let mut scoring_s = 0.0;
        for path in &trie.paths {
            let label: Vec<Token> = path.iter().map(|&i| trie.nodes[i].token).collect();
            // The trie row each label token is read from, for the normalization over labels.
            let rows: Vec<Option<usize>> = (0..path.len())
                .map(|j| j.checked_sub(1).and_then(|p| trie.decoded_index[path[p]]))
                .collect();
            self.clear_seq(seq);
            self.check_room(tokens.len() + label.len() - 1)?;
            let entries = naive_entries(tokens, &label, seq);
            decoded += entries.len();
            let mut total = 0.0;
            let split = split_at.unwrap_or(0).min(entries.len());
            for part in [&entries[..split], &entries[split..]] {
                self.run_entries(part, |row, logits| {
                    let t = Instant::now();
                    // row.job is the label token index this row predicts.
                    let lse = normalizer(logits, over, trie, rows[row.job]);
                    total += logits[label[row.job] as usize] as f64 - lse;
                    scoring_s += t.elapsed().as_secs_f64();
                })?;
            }
            labels.push(LabelLogprob {
                total,
                mean: total / label.len() as f64,
                n_tokens: label.len(),
                pruned: false,
            });
        }
        self.clear_seq(seq);
        let total_s = t0.elapsed().as_secs_f64();
        Ok(ScoreOut {
            labels,
            reused_tokens: 0,
            decoded_tokens: decoded,
            decode_ms: (total_s - scoring_s) * 1e3,
            scoring_ms: scoring_s * 1e3,
            batch_jobs: 1,
            logprob_over: over,
        })
    }
}

/// The log-normalizer of a full logits row, trie row `row` (see [`LabelTrie::needed`]):
/// over the vocabulary, or over the tokens that continue a label there.
fn normalizer(logits: &[f32], over: LogprobOver, trie: &LabelTrie, row: Option<usize>) -> f64 {
    match over {
        LogprobOver::Vocab => logsumexp(logits),
        LogprobOver::Labels => {
            let v: Vec<f32> = trie
                .needed(row)
                .iter()
                .map(|&t| logits[t as usize])
                .collect();
            logsumexp(&v)
        }
    }
}

/// Every distinct token of `trie`'s labels, in node order (for one-token labels: the
/// labels' tokens in label order).
fn label_tokens(trie: &LabelTrie) -> Vec<Token> {
    let mut seen = std::collections::HashSet::with_capacity(trie.nodes.len());
    trie.nodes
        .iter()
        .map(|n| n.token)
        .filter(|&t| seen.insert(t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(tokens: &'a [Token], trie: &'a LabelTrie) -> ScoreJob<'a> {
        ScoreJob {
            prefix: None,
            tokens,
            trie,
            pruning: None,
            logprob_over: LogprobOver::Vocab,
        }
    }

    fn row(job: usize, node: Option<usize>) -> Option<RowId> {
        Some(RowId { job, node })
    }

    #[test]
    fn groups_respect_max_jobs_and_free_cells() {
        assert!(group_jobs(&[], 4, 100).is_empty());
        assert_eq!(group_jobs(&[5, 5, 5], 2, 100), vec![0..2, 2..3]);
        assert_eq!(group_jobs(&[60, 50, 10], 8, 100), vec![0..1, 1..3]);
        // A job that does not fit alone still gets a group (and fails there, with the numbers).
        assert_eq!(group_jobs(&[200, 1], 8, 100), vec![0..1, 1..2]);
        assert_eq!(group_jobs(&[40, 60, 1], 8, 100), vec![0..2, 2..3]);
    }

    #[test]
    fn job_cells_count_suffix_and_decoded_nodes() {
        let trie = LabelTrie::new(&[vec![1, 2, 9], vec![1, 3, 9], vec![4]]).unwrap();
        let tokens = [10, 11, 12, 13];
        assert_eq!(job_cells(&job(&tokens, &trie), 0), 4 + 3);
        assert_eq!(job_cells(&job(&tokens, &trie), 3), 1 + 3);
    }

    #[test]
    fn suffix_entries_skip_the_reused_prefix_and_ask_for_the_last_row() {
        let trie = LabelTrie::new(&[vec![5], vec![7]]).unwrap();
        let (a, b) = ([10, 11, 12, 13], [20, 21]);
        let jobs = [job(&a, &trie), job(&b, &trie)];
        let entries = suffix_entries(&jobs, &[2, 0], 3);
        let got: Vec<(Token, i32, Vec<i32>, Option<RowId>)> = entries
            .into_iter()
            .map(|e| (e.token, e.pos, e.seqs, e.row))
            .collect();
        assert_eq!(
            got,
            vec![
                (12, 2, vec![3], None),
                (13, 3, vec![3], row(0, None)),
                (20, 0, vec![4], None),
                (21, 1, vec![4], row(1, None)),
            ]
        );
    }

    #[test]
    fn branches_are_the_chosen_nodes_without_chosen_descendants() {
        // Decoded nodes: 0 = "1" (shared), 1 = "1 2", 2 = "1 3".
        let trie = LabelTrie::new(&[vec![1, 2, 9], vec![1, 3, 9], vec![4]]).unwrap();
        let single = LabelTrie::new(&[vec![5], vec![7]]).unwrap();
        let t = [10, 11];
        let jobs = [job(&t, &trie), job(&t, &single)];
        let all = round_branches(&jobs, &[vec![0, 1, 2], vec![]]);
        assert_eq!(all, vec![(0, trie.decoded[1]), (0, trie.decoded[2])]);
        let first = round_branches(&jobs, &[vec![0], vec![]]);
        assert_eq!(first, vec![(0, trie.decoded[0])]);
        assert!(round_branches(&jobs, &[vec![], vec![]]).is_empty());
    }

    #[test]
    fn branch_entries_share_nodes_and_ask_only_for_needed_rows() {
        let trie = LabelTrie::new(&[vec![1, 2, 9], vec![1, 3, 9], vec![4]]).unwrap();
        let t = [10, 11, 12];
        let jobs = [job(&t, &trie)];
        let rounds = [vec![0, 1, 2]];
        let pass = round_branches(&jobs, &rounds);
        let mut decoded = vec![3];
        let entries = branch_entries(&jobs, &rounds, &pass, 5, |_, _| false, &mut decoded);
        let got: Vec<(Token, i32, Vec<i32>, Option<RowId>)> = entries
            .into_iter()
            .map(|e| (e.token, e.pos, e.seqs, e.row))
            .collect();
        // The shared first label token goes on both branch sequences, one position after
        // the prompt's last token; its children each on their own.
        assert_eq!(
            got,
            vec![
                (1, 3, vec![5, 6], row(0, Some(0))),
                (2, 4, vec![5], row(0, Some(1))),
                (3, 4, vec![6], row(0, Some(2))),
            ]
        );
        assert_eq!(decoded, vec![6]);
        // A row already read, or not chosen this round, is decoded (the path needs it) but
        // its logits are not asked for again.
        let rounds = [vec![1, 2]];
        let mut decoded = vec![0];
        let entries = branch_entries(&jobs, &rounds, &pass, 5, |_, d| d == 2, &mut decoded);
        let rows: Vec<Option<RowId>> = entries.iter().map(|e| e.row).collect();
        assert_eq!(rows, vec![None, row(0, Some(1)), None]);
        assert_eq!(decoded, vec![3]);
    }

    #[test]
    fn a_pass_holds_only_its_own_branches() {
        let trie = LabelTrie::new(&[vec![1, 2, 9], vec![1, 3, 9], vec![4]]).unwrap();
        let t = [10];
        let jobs = [job(&t, &trie)];
        let rounds = [vec![0, 1, 2]];
        let pass = round_branches(&jobs, &rounds);
        let mut decoded = vec![0];
        let entries = branch_entries(&jobs, &rounds, &pass[1..], 7, |_, _| false, &mut decoded);
        let got: Vec<(Token, Vec<i32>)> = entries.into_iter().map(|e| (e.token, e.seqs)).collect();
        assert_eq!(got, vec![(1, vec![7]), (3, vec![7])]);
        assert_eq!(decoded, vec![2]);
    }

    #[test]
    fn naive_entries_ask_for_a_row_per_label_token() {
        let entries = naive_entries(&[10, 11], &[1, 2, 3], 4);
        let got: Vec<(Token, i32, Vec<i32>, Option<RowId>)> = entries
            .into_iter()
            .map(|e| (e.token, e.pos, e.seqs, e.row))
            .collect();
        assert_eq!(
            got,
            vec![
                (10, 0, vec![4], None),
                (11, 1, vec![4], row(0, None)),
                (1, 2, vec![4], row(1, None)),
                (2, 3, vec![4], row(2, None)),
            ]
        );
        // A one-token label: the prompt's last row only.
        assert_eq!(naive_entries(&[10, 11], &[1], 4).len(), 2);
    }

    #[test]
    fn label_tokens_are_distinct_in_label_order() {
        let single = LabelTrie::new(&[vec![5], vec![7]]).unwrap();
        assert_eq!(label_tokens(&single), vec![5, 7]);
        let shared = LabelTrie::new(&[vec![5, 8], vec![7, 8], vec![5, 9]]).unwrap();
        assert_eq!(label_tokens(&shared), vec![5, 8, 7, 9]);
    }
}
