//! Label scoring math, kept apart from the model: the label trie that decides which
//! tokens must be decoded, log-softmax, contextual calibration and abstention.

/// A token id as llama.cpp numbers it.
pub type Token = i32;

/// Labels' token sequences as a trie. Only *internal* nodes (a label token that another,
/// longer label continues) must be decoded: the logits that score a label's last token come
/// from the token before it, so single-token label sets need no extra decode at all.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelTrie {
    /// Every node, parents before children (breadth first).
    pub nodes: Vec<Node>,
    /// For each label, the path of node indices from its first to its last token.
    pub paths: Vec<Vec<usize>>,
    /// The nodes whose logits are needed, i.e. the ones to decode (breadth first).
    pub decoded: Vec<usize>,
    /// For each node, its index in `decoded` (None for nodes no label continues).
    pub decoded_index: Vec<Option<usize>>,
    /// Number of branches: decoded nodes without decoded children. Each branch gets its own
    /// KV sequence so that sibling tokens cannot attend to each other (at least 1).
    pub n_branches: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub token: Token,
    /// 1 for a label's first token.
    pub depth: usize,
    pub parent: Option<usize>,
    pub children: Vec<usize>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TrieError {
    #[error("label {index} has no tokens")]
    EmptyLabel { index: usize },
    #[error("labels {a} and {b} tokenize identically; the model could not tell them apart")]
    Duplicate { a: usize, b: usize },
}

impl LabelTrie {
    pub fn new(labels: &[Vec<Token>]) -> Result<Self, TrieError> {
        let mut nodes: Vec<Node> = Vec::new();
        let mut roots: Vec<usize> = Vec::new();
        let mut paths = Vec::with_capacity(labels.len());
        for (i, label) in labels.iter().enumerate() {
            if label.is_empty() {
                return Err(TrieError::EmptyLabel { index: i });
            }
            let mut path = Vec::with_capacity(label.len());
            let mut parent: Option<usize> = None;
            for &tok in label {
                let siblings = match parent {
                    None => &roots,
                    Some(p) => &nodes[p].children,
                };
                let existing = siblings.iter().copied().find(|&n| nodes[n].token == tok);
                let idx = match existing {
                    Some(n) => n,
                    None => {
                        let idx = nodes.len();
                        nodes.push(Node {
                            token: tok,
                            depth: path.len() + 1,
                            parent,
                            children: Vec::new(),
                        });
                        match parent {
                            None => roots.push(idx),
                            Some(p) => nodes[p].children.push(idx),
                        }
                        idx
                    }
                };
                path.push(idx);
                parent = Some(idx);
            }
            if let Some(j) = paths.iter().position(|p: &Vec<usize>| p == &path) {
                return Err(TrieError::Duplicate { a: j, b: i });
            }
            paths.push(path);
        }
        // Breadth-first order keeps each sequence's positions increasing within a batch.
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_by_key(|&n| (nodes[n].depth, n));
        let decoded: Vec<usize> = order
            .into_iter()
            .filter(|&n| !nodes[n].children.is_empty())
            .collect();
        let is_decoded = |n: usize| !nodes[n].children.is_empty();
        let n_branches = decoded
            .iter()
            .filter(|&&n| !nodes[n].children.iter().any(|&c| is_decoded(c)))
            .count();
        let mut decoded_index = vec![None; nodes.len()];
        for (k, &n) in decoded.iter().enumerate() {
            decoded_index[n] = Some(k);
        }
        Ok(LabelTrie {
            nodes,
            paths,
            decoded,
            decoded_index,
            n_branches: n_branches.max(1),
        })
    }

    /// Number of label tokens in total (what "scored tokens" counts).
    pub fn n_label_tokens(&self) -> usize {
        self.paths.iter().map(Vec::len).sum()
    }

    pub fn max_label_len(&self) -> usize {
        self.paths.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Which tokens must be read from each logits row: row `None` is the prompt's last
    /// token; row `Some(k)` is decoded node `k`.
    pub fn needed(&self, row: Option<usize>) -> Vec<Token> {
        match row {
            None => {
                let mut roots: Vec<Token> = self
                    .nodes
                    .iter()
                    .filter(|n| n.parent.is_none())
                    .map(|n| n.token)
                    .collect();
                roots.dedup();
                roots
            }
            Some(k) => self.nodes[self.decoded[k]]
                .children
                .iter()
                .map(|&c| self.nodes[c].token)
                .collect(),
        }
    }

    /// Sums each label's token log-probabilities. `logprob(row, token)` returns the
    /// log-probability of `token` from logits row `row` (see [`LabelTrie::needed`]).
    pub fn label_logprobs(
        &self,
        mut logprob: impl FnMut(Option<usize>, Token) -> f64,
    ) -> Vec<LabelLogprob> {
        self.paths
            .iter()
            .map(|path| {
                let mut total = 0.0;
                let mut row = None;
                for &n in path {
                    total += logprob(row, self.nodes[n].token);
                    row = self.decoded_index[n];
                }
                LabelLogprob {
                    total,
                    mean: total / path.len() as f64,
                    n_tokens: path.len(),
                    pruned: false,
                }
            })
            .collect()
    }

    /// Whether node `a` is `b` or one of its ancestors.
    pub fn is_ancestor_or_self(&self, a: usize, b: usize) -> bool {
        let mut cur = Some(b);
        while let Some(n) = cur {
            if n == a {
                return true;
            }
            cur = self.nodes[n].parent;
        }
        false
    }
}

/// When the scorer may stop extending unlikely labels (task key `prune_margin_nats`).
///
/// Label tokens' log-probabilities are at most 0, so a label's score can only fall as its
/// remaining tokens are scored: the score of its known prefix bounds it from above (divided
/// by the label's length for the per-token mean). A label whose bound is more than
/// `margin_nats` below the best fully scored label cannot win, and is left unfinished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pruning {
    pub margin_nats: f64,
    /// Scores are per-token means (`score = "mean"`), not totals.
    pub per_token: bool,
}

/// The state of scoring one request's labels: which trie rows are known, which to decode
/// next. Without pruning, every decoded node is asked for in one round; with pruning, rounds
/// go deeper only under labels that can still matter. The top label is the same either way.
#[derive(Debug, Clone)]
pub struct LabelSearch<'a> {
    trie: &'a LabelTrie,
    pruning: Option<Pruning>,
    /// Log-probability of each node's token after its parent (None: not scored yet).
    node_lp: Vec<Option<f64>>,
    /// Whether each decoded node's logits row has been read.
    row_done: Vec<bool>,
}

impl<'a> LabelSearch<'a> {
    /// A search over `trie`'s labels. Over the labels ([`LogprobOver::Labels`]) a node with
    /// one child holds no choice: that child is certain and the node's row is never read.
    pub fn new(trie: &'a LabelTrie, pruning: Option<Pruning>, over: LogprobOver) -> Self {
        let mut node_lp = vec![None; trie.nodes.len()];
        let mut row_done = vec![false; trie.decoded.len()];
        if over == LogprobOver::Labels {
            for (k, &n) in trie.decoded.iter().enumerate() {
                if let [only] = trie.nodes[n].children[..] {
                    node_lp[only] = Some(0.0);
                    row_done[k] = true;
                }
            }
        }
        LabelSearch {
            trie,
            pruning,
            node_lp,
            row_done,
        }
    }

    /// Records one logits row: `row` as in [`LabelTrie::needed`], `logprob(token)` the
    /// log-probability of `token` in it.
    pub fn record_row(&mut self, row: Option<usize>, mut logprob: impl FnMut(Token) -> f64) {
        let children: Vec<usize> = match row {
            None => (0..self.trie.nodes.len())
                .filter(|&n| self.trie.nodes[n].parent.is_none())
                .collect(),
            Some(k) => {
                self.row_done[k] = true;
                self.trie.nodes[self.trie.decoded[k]].children.clone()
            }
        };
        for c in children {
            self.node_lp[c] = Some(logprob(self.trie.nodes[c].token));
        }
    }

    pub fn row_done(&self, k: usize) -> bool {
        self.row_done[k]
    }

    /// For a label: its known prefix's summed log-probability and how many of its tokens
    /// that covers.
    fn known(&self, path: &[usize]) -> (f64, usize) {
        let mut total = 0.0;
        for (i, &n) in path.iter().enumerate() {
            match self.node_lp[n] {
                Some(lp) => total += lp,
                None => return (total, i),
            }
        }
        (total, path.len())
    }

    fn score(&self, total: f64, n_tokens: usize, per_token: bool) -> f64 {
        if per_token {
            total / n_tokens as f64
        } else {
            total
        }
    }

    /// The decoded nodes (indices into `trie.decoded`) whose rows to read next, parents
    /// before children; empty when the search is over.
    pub fn next_round(&self) -> Vec<usize> {
        let Some(p) = self.pruning else {
            return (0..self.trie.decoded.len())
                .filter(|&k| !self.row_done[k])
                .collect();
        };
        let mut best_exact = f64::NEG_INFINITY;
        let mut frontier: Vec<(usize, f64)> = Vec::new();
        for path in &self.trie.paths {
            let (total, known) = self.known(path);
            if known == path.len() {
                best_exact = best_exact.max(self.score(total, path.len(), p.per_token));
            } else if known > 0 {
                // The last known node continues this label, so it is a decoded node.
                if let Some(k) = self.trie.decoded_index[path[known - 1]] {
                    frontier.push((k, self.score(total, path.len(), p.per_token)));
                }
            }
        }
        // Best first: the most promising unfinished labels go deeper before the rest are
        // compared with the best finished one. The search ends when every unfinished label's
        // bound is more than the margin below the best finished score.
        let reference = frontier.iter().map(|&(_, b)| b).fold(best_exact, f64::max);
        let mut chosen: Vec<usize> = frontier
            .into_iter()
            .filter(|&(k, bound)| !self.row_done[k] && bound >= reference - p.margin_nats)
            .map(|(k, _)| k)
            .collect();
        // Single-child chains below a chosen node hold no decision: take them in the same
        // round rather than one decode per token (the rows still to read on them; over the
        // labels, the chain's certain tokens are decoded on the way to the next choice).
        let mut i = 0;
        while i < chosen.len() {
            let mut node = &self.trie.nodes[self.trie.decoded[chosen[i]]];
            while let [only] = node.children[..] {
                let Some(k) = self.trie.decoded_index[only] else {
                    break;
                };
                if !self.row_done[k] {
                    chosen.push(k);
                    break;
                }
                node = &self.trie.nodes[only];
            }
            i += 1;
        }
        chosen.sort_unstable();
        chosen.dedup();
        chosen
    }

    /// Each label's log-likelihood; an unfinished (pruned) label gets the upper bound of
    /// its known prefix and `pruned: true`.
    pub fn finish(&self) -> Vec<LabelLogprob> {
        self.trie
            .paths
            .iter()
            .map(|path| {
                let (total, known) = self.known(path);
                let n = path.len();
                LabelLogprob {
                    total,
                    mean: total / n as f64,
                    n_tokens: n,
                    pruned: known < n,
                }
            })
            .collect()
    }
}

/// A label's log-likelihood after the prompt.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LabelLogprob {
    pub total: f64,
    /// Per token: `total / n_tokens`.
    pub mean: f64,
    pub n_tokens: usize,
    /// Not every token was scored: `total` and `mean` are upper bounds (see [`Pruning`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pruned: bool,
}

/// What label log-probabilities are normalized over (task key, result and trace field
/// `logprob_over`).
///
/// `Vocab`: the model's full next-token distribution, so a label's log-probability is its
/// absolute log-likelihood after the prompt. `Labels` (on a model whose output is tied to
/// its embedding): at each point where labels part, over the tokens that continue some
/// label there, the distribution of a decoder allowed to write only a label. The scorer
/// computes just those tokens' logits, skipping the vocabulary-wide output projection, and a
/// label token no other label competes with at its place is certain (log-probability 0) and
/// is decoded only when labels part after it.
///
/// For one-token labels the two differ by one constant per request (the log of the labels'
/// share of the vocabulary's mass), so label probabilities, calibration (a per-request
/// constant divides out) and abstention are the same; only the absolute values of
/// `logprob_total`/`logprob_mean` differ. For labels of several tokens the probabilities
/// differ too: over the vocabulary a label also pays for its tokens that follow with
/// certainty once it is chosen (longer names lose mass to every other continuation); over
/// the labels `exp(logprob_total)` sums to 1 over the labels (measured on dev splits in
/// docs/accuracy.md, "Labels of several tokens").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogprobOver {
    /// Over the labels where the model allows it, else over the vocabulary (as asked for:
    /// a job's request; results say which one was used).
    #[default]
    Labels,
    Vocab,
}

/// log(sum(exp(x))) of a logits row, computed stably.
pub fn logsumexp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln()
}

/// Softmax over label scores, as probabilities.
pub fn softmax(scores: &[f64]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): the label
/// distribution the prompt gives content-free inputs, averaged over those inputs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prior {
    pub probs: Vec<f64>,
}

impl Prior {
    /// Averages the label probabilities measured on each content-free input.
    pub fn from_content_free(runs: &[Vec<f64>]) -> Option<Prior> {
        let first = runs.first()?;
        let mut probs = vec![0.0; first.len()];
        for run in runs {
            for (p, &q) in probs.iter_mut().zip(run) {
                *p += q / runs.len() as f64;
            }
        }
        Some(Prior { probs })
    }

    /// Divides the prior out: `log p(label) - log prior(label)` (then renormalised by
    /// the softmax the caller applies).
    pub fn apply(&self, scores: &[f64]) -> Vec<f64> {
        scores
            .iter()
            .zip(&self.probs)
            .map(|(&s, &p)| s - p.max(1e-12).ln())
            .collect()
    }
}

/// When to decline to answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AbstainRule {
    /// Abstain when the top label's probability is below this.
    #[serde(default)]
    pub min_confidence: f64,
    /// Abstain when top minus second probability is below this.
    #[serde(default)]
    pub min_margin: f64,
}

/// The outcome of ranking labels by probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub top: usize,
    pub confidence: f64,
    pub margin: f64,
    pub abstained: bool,
}

pub fn decide(probs: &[f64], rule: &AbstainRule) -> Decision {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let top = order.first().copied().unwrap_or(0);
    let confidence = probs.get(top).copied().unwrap_or(0.0);
    let second = order.get(1).map(|&i| probs[i]).unwrap_or(0.0);
    let margin = confidence - second;
    Decision {
        top,
        confidence,
        margin,
        abstained: confidence < rule.min_confidence || margin < rule.min_margin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_token_labels_decode_nothing() {
        let t = LabelTrie::new(&[vec![5], vec![7]]).unwrap();
        assert!(t.decoded.is_empty());
        assert_eq!(t.n_branches, 1);
        assert_eq!(t.needed(None), vec![5, 7]);
    }

    #[test]
    fn shared_prefixes_are_decoded_once_and_branch() {
        // "card lost" / "card stolen" / "refund": 1 shared node (card), 2 leaves not decoded.
        let t = LabelTrie::new(&[vec![1, 2], vec![1, 3], vec![4]]).unwrap();
        assert_eq!(t.decoded.len(), 1);
        assert_eq!(t.n_branches, 1);
        assert_eq!(t.needed(Some(0)), vec![2, 3]);
        // Two multi-token branches need two sequences.
        let t = LabelTrie::new(&[vec![1, 2, 9], vec![1, 3, 9], vec![4]]).unwrap();
        assert_eq!(t.decoded.len(), 3); // 1, 2, 3
        assert_eq!(t.n_branches, 2);
        assert_eq!(t.decoded_index[t.decoded[0]], Some(0));
        assert!(t.is_ancestor_or_self(t.decoded[0], t.decoded[2]));
        assert!(!t.is_ancestor_or_self(t.decoded[1], t.decoded[2]));
    }

    /// Feeds a search rows from a table of next-token log-probabilities keyed by the
    /// prefix, like a model would, and returns how many rounds it took.
    fn run_search(
        t: &LabelTrie,
        pruning: Option<Pruning>,
        lp: impl Fn(&[Token], Token) -> f64,
    ) -> (Vec<LabelLogprob>, usize, usize) {
        run_search_over(t, pruning, LogprobOver::Vocab, lp)
    }

    fn run_search_over(
        t: &LabelTrie,
        pruning: Option<Pruning>,
        over: LogprobOver,
        lp: impl Fn(&[Token], Token) -> f64,
    ) -> (Vec<LabelLogprob>, usize, usize) {
        let mut s = LabelSearch::new(t, pruning, over);
        s.record_row(None, |tok| lp(&[], tok));
        let (mut rounds, mut rows) = (0, 0);
        loop {
            let ks = s.next_round();
            if ks.is_empty() {
                break;
            }
            rounds += 1;
            for k in ks {
                // The prefix this row continues: the tokens from the root to the node.
                let mut prefix = Vec::new();
                let mut cur = Some(t.decoded[k]);
                while let Some(n) = cur {
                    prefix.insert(0, t.nodes[n].token);
                    cur = t.nodes[n].parent;
                }
                s.record_row(Some(k), |tok| lp(&prefix, tok));
                rows += 1;
            }
        }
        (s.finish(), rounds, rows)
    }

    /// Labels [1 2 3] [1 2 4] [5 6 7] [5 8] [9]: shared prefixes, single-child chains, a
    /// one-token label.
    fn five_labels() -> LabelTrie {
        LabelTrie::new(&[
            vec![1, 2, 3],
            vec![1, 2, 4],
            vec![5, 6, 7],
            vec![5, 8],
            vec![9],
        ])
        .unwrap()
    }

    #[test]
    fn pruned_search_keeps_the_top_label_and_bounds_the_rest() {
        let t = five_labels();
        // First tokens: 1 likely, 5 unlikely, 9 very unlikely; below 1 all likely.
        let lp = |prefix: &[Token], tok: Token| -> f64 {
            match (prefix, tok) {
                ([], 1) => -0.1,
                ([], 5) => -6.0,
                ([], 9) => -9.0,
                ([1, 2], 3) => -0.2,
                ([1, 2], 4) => -2.0,
                _ => -0.5,
            }
        };
        let (exact, rounds_exact, rows_exact) = run_search(&t, None, lp);
        assert_eq!(rounds_exact, 1);
        assert_eq!(rows_exact, t.decoded.len());
        assert!(exact.iter().all(|l| !l.pruned));
        assert!((exact[0].total - (-0.1 - 0.5 - 0.2)).abs() < 1e-12);
        let pruning = Pruning {
            margin_nats: 3.0,
            per_token: false,
        };
        let (pruned, rounds, rows) = run_search(&t, Some(pruning), lp);
        // The 5-subtree (2 decoded nodes: 5 and 6) is never expanded.
        assert_eq!(rows, t.decoded.len() - 2);
        assert!(rounds >= 1);
        for (e, p) in exact.iter().zip(&pruned) {
            if p.pruned {
                assert!(p.total >= e.total, "a pruned score is an upper bound");
                assert!(p.total < exact[0].total - 3.0);
            } else {
                assert!((p.total - e.total).abs() < 1e-12);
            }
        }
        assert_eq!(pruned.iter().filter(|l| l.pruned).count(), 2);
        assert!(!pruned[4].pruned, "single-token labels are always exact");
        // A margin wider than every gap scores everything exactly.
        let wide = Pruning {
            margin_nats: 100.0,
            per_token: true,
        };
        let (all, _, rows) = run_search(&t, Some(wide), lp);
        assert_eq!(rows, t.decoded.len());
        assert!(all.iter().all(|l| !l.pruned));
    }

    /// Over the labels, each row is normalized over the tokens that continue a label there
    /// (what the engine passes to `record_row`); a token no sibling competes with is certain
    /// and its parent's row is never read.
    #[test]
    fn over_labels_only_rows_where_labels_part_are_read() {
        // [1 2 3] [1 2 4] [5 6 7] [5 8] [9]: nodes 1, 2 (one child of 1), 5, 6 are decoded;
        // 1 has one child (2), 6 has one child (7): their rows hold no choice.
        let t = five_labels();
        assert_eq!(t.decoded.len(), 4);
        // A model's raw next-token scores; each row normalized over `needed` as the engine does.
        let raw = |prefix: &[Token], tok: Token| -> f64 {
            (prefix.len() as f64 + 1.0) * (tok as f64).sin()
        };
        let over_needed = |row: Option<usize>, prefix: &[Token], tok: Token| -> f64 {
            let lse = t
                .needed(row)
                .iter()
                .map(|&c| raw(prefix, c).exp())
                .sum::<f64>()
                .ln();
            raw(prefix, tok) - lse
        };
        let lp = |prefix: &[Token], tok: Token| {
            let row = match prefix {
                [] => None,
                _ => {
                    let node = t.paths.iter().find_map(|p| {
                        let toks: Vec<Token> = p.iter().map(|&n| t.nodes[n].token).collect();
                        toks.starts_with(prefix).then(|| p[prefix.len() - 1])
                    });
                    node.and_then(|n| t.decoded_index[n])
                }
            };
            over_needed(row, prefix, tok)
        };
        let (out, rounds, rows) = run_search_over(&t, None, LogprobOver::Labels, lp);
        assert_eq!((rounds, rows), (1, 2), "only the rows of 2 and 5 are read");
        // A proper distribution over the labels.
        let sum: f64 = out.iter().map(|l| l.total.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        // Certain tokens add nothing: label [5 6 7] scores its 5 and its 6 (vs 8) only.
        let expect = lp(&[], 5) + lp(&[5], 6);
        assert!((out[2].total - expect).abs() < 1e-12);
        assert_eq!(out[2].n_tokens, 3);
        // With pruning, the same exact labels and no row read twice.
        let p = Pruning {
            margin_nats: 100.0,
            per_token: false,
        };
        let (pruned, _, rows) = run_search_over(&t, Some(p), LogprobOver::Labels, lp);
        assert_eq!(rows, 2);
        for (a, b) in out.iter().zip(&pruned) {
            assert!((a.total - b.total).abs() < 1e-12 && !b.pruned);
        }
    }

    #[test]
    fn pruned_search_bound_divides_by_label_length_for_means() {
        // One long label with a good first token, one short exact label.
        let t = LabelTrie::new(&[vec![1, 2, 3, 4], vec![5]]).unwrap();
        let lp = |prefix: &[Token], tok: Token| match (prefix, tok) {
            ([], 1) => -4.0,
            ([], 5) => -1.5,
            _ => -0.1,
        };
        // Per-token bound of label 0 after its first token: -4/4 = -1.0, above -1.5: it
        // must be expanded (its mean ends at -1.075, the top label).
        let p = Pruning {
            margin_nats: 0.0,
            per_token: true,
        };
        let (out, _, _) = run_search(&t, Some(p), lp);
        assert!(!out[0].pruned);
        assert!(out[0].mean > out[1].mean);
        // As totals, -4 is below -1.5 by more than the margin: pruned.
        let p = Pruning {
            margin_nats: 1.0,
            per_token: false,
        };
        let (out, _, _) = run_search(&t, Some(p), lp);
        assert!(out[0].pruned);
        assert_eq!(out[0].total, -4.0);
    }

    #[test]
    fn label_logprobs_sum_along_paths() {
        let t = LabelTrie::new(&[vec![1, 2], vec![1, 3], vec![4]]).unwrap();
        // Row None: p(1) = 0.5, p(4) = 0.5; row Some(0) (after 1): p(2) = 0.25, p(3) = 0.75.
        let lp = t.label_logprobs(|row, tok| match (row, tok) {
            (None, 1) | (None, 4) => 0.5f64.ln(),
            (Some(0), 2) => 0.25f64.ln(),
            (Some(0), 3) => 0.75f64.ln(),
            other => panic!("unexpected lookup {other:?}"),
        });
        assert!((lp[0].total - (0.125f64).ln()).abs() < 1e-12);
        assert!((lp[1].total - (0.375f64).ln()).abs() < 1e-12);
        assert!((lp[1].mean - (0.375f64).ln() / 2.0).abs() < 1e-12);
        assert!((lp[2].total - 0.5f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn duplicate_and_empty_labels_are_errors() {
        assert_eq!(
            LabelTrie::new(&[vec![1], vec![1]]),
            Err(TrieError::Duplicate { a: 0, b: 1 })
        );
        assert_eq!(
            LabelTrie::new(&[vec![1], vec![]]),
            Err(TrieError::EmptyLabel { index: 1 })
        );
    }

    #[test]
    fn logsumexp_and_softmax() {
        let row = [0.0f32, (2.0f32).ln(), 1000.0];
        assert!((logsumexp(&row) - 1000.0).abs() < 1e-9);
        let p = softmax(&[0.0, (3.0f64).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-12 && (p[1] - 0.75).abs() < 1e-12);
    }

    #[test]
    fn calibration_removes_the_prior() {
        // The content-free prior leans 80/20 towards label 0.
        let prior = Prior::from_content_free(&[vec![0.9, 0.1], vec![0.7, 0.3]]).unwrap();
        assert!((prior.probs[0] - 0.8).abs() < 1e-12);
        // An input the raw model puts at 70/30 is, after calibration, leaning to label 1.
        let raw = [0.7f64.ln(), 0.3f64.ln()];
        let cal = softmax(&prior.apply(&raw));
        // 0.7/0.8 = 0.875, 0.3/0.2 = 1.5 -> 0.368 / 0.632
        assert!((cal[1] - 1.5 / 2.375).abs() < 1e-12);
        // A prior that is uniform changes nothing.
        let flat = Prior {
            probs: vec![0.5, 0.5],
        };
        let same = softmax(&flat.apply(&raw));
        assert!((same[0] - 0.7).abs() < 1e-12);
    }

    #[test]
    fn abstains_on_low_confidence_or_margin() {
        let d = decide(&[0.2, 0.5, 0.3], &AbstainRule::default());
        assert_eq!(d.top, 1);
        assert!((d.margin - 0.2).abs() < 1e-12);
        assert!(!d.abstained);
        let rule = AbstainRule {
            min_confidence: 0.6,
            min_margin: 0.0,
        };
        assert!(decide(&[0.45, 0.55], &rule).abstained);
        assert!(!decide(&[0.35, 0.65], &rule).abstained);
        let rule = AbstainRule {
            min_confidence: 0.0,
            min_margin: 0.3,
        };
        assert!(decide(&[0.4, 0.6], &rule).abstained);
        assert!(!decide(&[0.2, 0.8], &rule).abstained);
    }
}
