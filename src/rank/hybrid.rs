//! Hybrid ranking: a lexical first stage (TF-IDF cosine with both sides expanded from an
//! unlabelled corpus, i.e. pseudo-relevance feedback: the profile gains the words of the
//! corpus texts most like it, each short candidate the words of its nearest corpus texts),
//! then the model's P(yes) as one more feature, fused by z-scores over the candidates.
//! The expansion sizes and the fusion weight were chosen on the dev split (docs/rank.md).

use std::collections::{BTreeMap, HashMap};

use super::eval::Tfidf;

/// A sparse, L2-normalised term vector.
pub type Vector = BTreeMap<String, f64>;

/// The knobs of the hybrid ranker (defaults chosen on the dev split).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HybridConfig {
    /// Corpus texts added to the profile, and their weight (0 texts: no expansion).
    pub profile_docs: usize,
    pub profile_beta: f64,
    /// Corpus texts added to each candidate, their weight, and the share of the expanded
    /// candidate's cosine in the lexical score.
    pub candidate_docs: usize,
    pub candidate_beta: f64,
    pub candidate_mix: f64,
    /// Weight of the model's P(yes) (z-scored) against the lexical score (z-scored, 1).
    pub w_model: f64,
}

impl Default for HybridConfig {
    fn default() -> Self {
        HybridConfig {
            profile_docs: 30,
            profile_beta: 2.0,
            candidate_docs: 20,
            candidate_beta: 1.0,
            candidate_mix: 0.5,
            w_model: 0.25,
        }
    }
}

/// Scales `v` to unit length (unchanged when it is zero).
pub fn normalize(mut v: Vector) -> Vector {
    let n = v.values().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 {
        v.values_mut().for_each(|x| *x /= n);
    }
    v
}

/// The unlabelled corpus, vectorised, with an inverted index for nearest texts.
pub struct Expander {
    docs: Vec<Vector>,
    index: HashMap<String, Vec<usize>>,
}

impl Expander {
    pub fn new<'a>(tfidf: &Tfidf, docs: impl IntoIterator<Item = &'a str>) -> Expander {
        let docs: Vec<Vector> = docs.into_iter().map(|d| tfidf.vector(d)).collect();
        let mut index: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, d) in docs.iter().enumerate() {
            for w in d.keys() {
                index.entry(w.clone()).or_default().push(i);
            }
        }
        Expander { docs, index }
    }

    /// The `m` corpus texts with the highest cosine to `v` (ties to the earlier text).
    pub fn nearest(&self, v: &Vector, m: usize) -> Vec<usize> {
        let mut score: HashMap<usize, f64> = HashMap::new();
        for (w, x) in v {
            for &i in self.index.get(w).map_or(&[][..], Vec::as_slice) {
                *score.entry(i).or_default() += x * self.docs[i].get(w).copied().unwrap_or(0.0);
            }
        }
        let mut s: Vec<(usize, f64)> = score.into_iter().collect();
        s.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        s.into_iter().take(m).map(|(i, _)| i).collect()
    }

    /// `v` plus `beta` times the mean of its `m` nearest corpus texts, normalised.
    pub fn expand(&self, v: &Vector, m: usize, beta: f64) -> Vector {
        let near = self.nearest(v, m);
        let mut out = v.clone();
        if near.is_empty() || beta == 0.0 {
            return out;
        }
        let w = beta / near.len() as f64;
        for i in near {
            for (t, x) in &self.docs[i] {
                *out.entry(t.clone()).or_default() += w * x;
            }
        }
        normalize(out)
    }
}

/// The lexical stage: each candidate's cosine to the expanded profile, mixed with its
/// expanded self's cosine.
pub fn lexical_scores(
    tfidf: &Tfidf,
    expander: &Expander,
    profile: &str,
    candidates: &[&str],
    cfg: &HybridConfig,
) -> Vec<f64> {
    let q = expander.expand(&tfidf.vector(profile), cfg.profile_docs, cfg.profile_beta);
    candidates
        .iter()
        .map(|c| {
            let v = tfidf.vector(c);
            let plain = Tfidf::cosine(&q, &v);
            if cfg.candidate_mix == 0.0 {
                return plain;
            }
            let e = expander.expand(&v, cfg.candidate_docs, cfg.candidate_beta);
            (1.0 - cfg.candidate_mix) * plain + cfg.candidate_mix * Tfidf::cosine(&q, &e)
        })
        .collect()
}

/// z-scores over the candidates (all 0 when they do not vary).
pub fn zscores(x: &[f64]) -> Vec<f64> {
    let n = x.len().max(1) as f64;
    let mean = x.iter().sum::<f64>() / n;
    let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    if sd <= 1e-12 {
        return vec![0.0; x.len()];
    }
    x.iter().map(|v| (v - mean) / sd).collect()
}

/// The fused score: z(lexical) + w_model * z(model).
pub fn fuse(lexical: &[f64], model: &[f64], w_model: f64) -> Vec<f64> {
    let l = zscores(lexical);
    let m = zscores(model);
    l.iter()
        .zip(m.iter().chain(std::iter::repeat(&0.0)))
        .map(|(a, b)| a + w_model * b)
        .collect()
}

/// The fusion weight that feedback supports: of the given weights, the one whose fused
/// order puts clicked items (grade 1) highest, by mean reciprocal rank of the clicks; ties
/// to the first. Each event is one ranking: its lexical and model scores, and the clicks.
pub fn learn_w_model(events: &[(Vec<f64>, Vec<f64>, Vec<bool>)], weights: &[f64]) -> Option<f64> {
    let mut best: Option<(f64, f64)> = None;
    for &w in weights {
        let mut mrr = 0.0;
        for (lex, model, clicked) in events {
            let s = fuse(lex, model, w);
            let mut order: Vec<usize> = (0..s.len()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            if let Some(r) = order
                .iter()
                .position(|&i| clicked.get(i).copied().unwrap_or(false))
            {
                mrr += 1.0 / (r + 1) as f64;
            }
        }
        if best.is_none_or(|(_, m)| mrr > m) {
            best = Some((w, mrr));
        }
    }
    best.map(|(w, _)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<&'static str> {
        vec![
            "my card has not arrived yet",
            "when will my new card be delivered",
            "card delivery is taking too long",
            "how do I top up by bank transfer",
            "top up failed again",
            "exchange rate for euros",
        ]
    }

    #[test]
    fn expansion_adds_the_words_of_similar_texts() {
        let c = corpus();
        let t = Tfidf::fit(c.iter().copied());
        let e = Expander::new(&t, c.iter().copied());
        let v = t.vector("card delivered");
        assert_eq!(e.nearest(&v, 1), vec![1]);
        let x = e.expand(&v, 2, 1.0);
        // "arrived" or "new" came in from the neighbours.
        assert!(x.contains_key("new") || x.contains_key("arrived"), "{x:?}");
        assert!((x.values().map(|a| a * a).sum::<f64>() - 1.0).abs() < 1e-9);
        // An expanded profile reaches a candidate that shares no word with it.
        let cfg = HybridConfig {
            profile_docs: 3,
            candidate_mix: 0.0,
            ..Default::default()
        };
        let s = lexical_scores(
            &t,
            &e,
            "card delivered",
            &["has not arrived yet", "exchange rate"],
            &cfg,
        );
        assert!(s[0] > s[1], "{s:?}");
    }

    #[test]
    fn fusion_uses_z_scores_and_the_weight() {
        assert_eq!(zscores(&[2.0, 2.0]), vec![0.0, 0.0]);
        let f = fuse(&[1.0, 0.0], &[0.0, 1.0], 0.0);
        assert!(f[0] > f[1]);
        let f = fuse(&[1.0, 0.0], &[0.0, 1.0], 2.0);
        assert!(f[1] > f[0]);
    }

    #[test]
    fn feedback_picks_the_weight_that_ranks_clicks_first() {
        // The model is right, the lexical score wrong: a positive weight wins.
        let ev = vec![(
            vec![1.0, 0.0, 0.5],
            vec![0.0, 1.0, 0.2],
            vec![false, true, false],
        )];
        assert_eq!(learn_w_model(&ev, &[0.0, 2.0]), Some(2.0));
        let ev = vec![(
            vec![1.0, 0.0, 0.5],
            vec![0.0, 1.0, 0.2],
            vec![true, false, false],
        )];
        assert_eq!(learn_w_model(&ev, &[0.0, 2.0]), Some(0.0));
        assert_eq!(learn_w_model(&ev, &[]), None);
    }
}
