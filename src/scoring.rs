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
    /// For each decoded node, the branches (0-based) whose sequence it belongs to. A branch is
    /// one decoded node without decoded children; each branch gets its own KV sequence so
    /// that sibling tokens cannot attend to each other.
    pub branches_of: Vec<Vec<usize>>,
    /// Number of branches (at least 1: the prompt itself needs a sequence).
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
        // Branch leaves: decoded nodes none of whose children are decoded.
        let is_decoded = |n: usize| !nodes[n].children.is_empty();
        let leaves: Vec<usize> = decoded
            .iter()
            .copied()
            .filter(|&n| !nodes[n].children.iter().any(|&c| is_decoded(c)))
            .collect();
        let mut branches_of = vec![Vec::new(); decoded.len()];
        for (b, &leaf) in leaves.iter().enumerate() {
            let mut cur = Some(leaf);
            while let Some(n) = cur {
                // Every ancestor of a decoded node is decoded (it has a child).
                if let Some(k) = decoded.iter().position(|&d| d == n) {
                    branches_of[k].push(b);
                }
                cur = nodes[n].parent;
            }
        }
        Ok(LabelTrie {
            nodes,
            paths,
            decoded,
            branches_of,
            n_branches: leaves.len().max(1),
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
                    row = self.decoded.iter().position(|&d| d == n);
                }
                LabelLogprob {
                    total,
                    mean: total / path.len() as f64,
                    n_tokens: path.len(),
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
        assert_eq!(t.branches_of[0], vec![0, 1]); // the shared "1" is in both branches
        assert_eq!(t.branches_of[1].len(), 1);
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
