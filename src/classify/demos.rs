//! Retrieved demonstrations (a task's `[demos]`): for each request, the examples of the
//! task's pool most similar to its text, `per_label` of each label, ordered so the most
//! similar one sits next to the query. The choice is plain functions over similarities
//! ([`arrange`]); [`DemoPicker`] computes the similarities (TF-IDF cosine fitted on the
//! pool, or the sentence encoder's cosine) and is what the classifier holds.

use std::sync::Arc;

use regex::Regex;

use super::linear::SparseRow;
use super::tfidf::{TextFeaturizer, TextParams};
use crate::encoder::Encoder;
use crate::spec::{DemoSimilarity, Task, TRUNCATED_FIELD};

/// The pool's indices to show, given each pool example's similarity to the request and its
/// label: the `per_label` most similar of each label (ties: the earlier in the pool), laid
/// out in rounds from the least similar round to the most similar, each round ordered by
/// similarity ascending, so the labels stay balanced along the prompt and the single most
/// similar example is the last one before the query.
pub fn arrange(sims: &[f32], labels: &[usize], n_labels: usize, per_label: usize) -> Vec<usize> {
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); n_labels];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = by_label.get_mut(l) {
            v.push(i);
        }
    }
    let sim = |i: usize| sims.get(i).copied().unwrap_or(f32::NEG_INFINITY);
    for v in &mut by_label {
        // Stable: equal similarity keeps pool order.
        v.sort_by(|&a, &b| sim(b).total_cmp(&sim(a)));
        v.truncate(per_label);
    }
    let rounds = by_label.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for r in (0..rounds).rev() {
        let mut round: Vec<usize> = by_label.iter().filter_map(|v| v.get(r).copied()).collect();
        round.sort_by(|&a, &b| sim(a).total_cmp(&sim(b)).then(b.cmp(&a)));
        out.extend(round);
    }
    out
}

/// Dot product of two sparse rows (columns ascending).
pub fn sparse_dot(a: &SparseRow, b: &SparseRow) -> f32 {
    let (mut i, mut j, mut s) = (0, 0, 0.0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                s += a[i].1 * b[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    s
}

enum Index {
    Tfidf {
        featurizer: TextFeaturizer,
        re: Regex,
        rows: Vec<SparseRow>,
    },
    Encoder {
        encoder: Arc<Encoder>,
        rows: Vec<Vec<f32>>,
    },
}

/// A task's pool, indexed for similarity search.
pub struct DemoPicker {
    index: Index,
    labels: Vec<usize>,
    n_labels: usize,
    per_label: usize,
}

impl DemoPicker {
    /// The picker of `task`'s `[demos]` (None without one). `encoder` is needed only when
    /// similarity is by the encoder (the caller loads it beside the model).
    pub fn new(task: &Task, encoder: Option<Arc<Encoder>>) -> Result<Option<DemoPicker>, String> {
        let Some(d) = task.demos else {
            return Ok(None);
        };
        let texts: Vec<&str> = task
            .examples
            .iter()
            .map(|e| e.get(TRUNCATED_FIELD).map_or("", String::as_str))
            .collect();
        let labels = task
            .examples
            .iter()
            .map(|e| {
                e.get("label")
                    .and_then(|l| task.label_index(l))
                    .unwrap_or(usize::MAX)
            })
            .collect();
        let index = match (d.by, encoder) {
            (DemoSimilarity::Tfidf, _) => {
                let featurizer = TextFeaturizer::fit(&texts, TextParams::words_and_chars());
                let rows = featurizer.transform_all(&texts);
                Index::Tfidf {
                    featurizer,
                    re: TextFeaturizer::regex(),
                    rows,
                }
            }
            (DemoSimilarity::Encoder, Some(encoder)) => Index::Encoder {
                rows: texts.iter().map(|t| encoder.embed(t)).collect(),
                encoder,
            },
            (DemoSimilarity::Encoder, None) => {
                return Err("demonstrations by encoder similarity need the sentence encoder".into())
            }
        };
        Ok(Some(DemoPicker {
            index,
            labels,
            n_labels: task.labels.len(),
            per_label: d.per_label,
        }))
    }

    /// Each pool example's similarity to `text`.
    pub fn similarities(&self, text: &str) -> Vec<f32> {
        match &self.index {
            Index::Tfidf {
                featurizer,
                re,
                rows,
            } => {
                let q = featurizer.transform(re, text);
                rows.iter().map(|r| sparse_dot(&q, r)).collect()
            }
            Index::Encoder { encoder, rows } => {
                let q = encoder.embed(text);
                rows.iter()
                    .map(|r| crate::encoder::cosine(r, &q) as f32)
                    .collect()
            }
        }
    }

    /// The pool indices to show before the query for `text` (see [`arrange`]).
    pub fn pick(&self, text: &str) -> Vec<usize> {
        arrange(
            &self.similarities(text),
            &self.labels,
            self.n_labels,
            self.per_label,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn arrange_takes_the_nearest_of_each_label_most_similar_last() {
        // Labels: 0 0 0 1 1 1.
        let labels = [0, 0, 0, 1, 1, 1];
        let sims = [0.1, 0.9, 0.5, 0.3, 0.2, 0.8];
        // Nearest of label 0: 1 (0.9), 2 (0.5); of label 1: 5 (0.8), 3 (0.3).
        // Round 1 (the second nearest): 3 (0.3) then 2 (0.5); round 0: 5 (0.8) then 1 (0.9).
        assert_eq!(arrange(&sims, &labels, 2, 2), vec![3, 2, 5, 1]);
        assert_eq!(arrange(&sims, &labels, 2, 1), vec![5, 1]);
    }

    #[test]
    fn arrange_keeps_the_balance_when_a_label_is_short_and_breaks_ties_by_pool_order() {
        // Label 1 has one example only; label 2 none.
        let labels = [0, 0, 1, 0];
        let sims = [0.5, 0.5, 0.1, 0.5];
        let got = arrange(&sims, &labels, 3, 2);
        // Label 0's nearest two are 0 and 1 (ties: pool order); label 1 shows its one.
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], 1, "the second round first");
        assert_eq!(&got[1..], &[2, 0], "round 0 by similarity ascending");
        // A label index outside the task (an unknown label) is never shown.
        assert_eq!(arrange(&[1.0, 0.0], &[usize::MAX, 0], 1, 4), vec![1]);
    }

    #[test]
    fn tfidf_picker_finds_the_examples_sharing_words() {
        let t = Task::parse(
            r#"
instruction = "Classify."
query = "Q: {text}\nA:"
labels = [{ name = "card", text = " card" }, { name = "fx", text = " fx" }]
examples = [
  { text = "my card was stolen", label = "card" },
  { text = "the card does not work at the shop", label = "card" },
  { text = "what is the exchange rate for euros", label = "fx" },
  { text = "wrong rate applied to my transfer", label = "fx" },
]
[demos]
per_label = 1
"#,
            Path::new("t.toml"),
            "t",
        )
        .unwrap();
        let p = DemoPicker::new(&t, None).unwrap().unwrap();
        // One of each label, the one sharing the request's words last.
        let got = p.pick("my stolen card");
        assert!(got.len() == 2 && got[0] >= 2 && got[1] == 0, "{got:?}");
        let got = p.pick("euros exchange rate today");
        assert!(got.len() == 2 && got[0] < 2 && got[1] == 2, "{got:?}");
        assert_eq!(
            t.render_demos(&[2]),
            "Q: what is the exchange rate for euros\nA: fx\n\n"
        );
        assert_eq!(
            t.render_prefix(),
            "Classify.\n\n",
            "the pool is not in the prefix"
        );
    }
}
