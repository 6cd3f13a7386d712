//! The plain baseline users would otherwise reach for: TF-IDF over word 1-2 grams (single
//! CJK characters count as words, so Chinese gets character 1-2 grams) into a multinomial
//! logistic regression with scikit-learn's defaults (C = 1, no class weights). The same
//! featurizer and learner the stacked scorer uses ([`crate::classify::tfidf`],
//! [`crate::classify::linear`]), with the baseline's settings; no language model involved.

use crate::classify::linear::{Design, LrParams, SoftmaxLr};
use crate::classify::tfidf::{TextFeaturizer, TextParams};

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("logistic regression: {0}")]
    Fit(String),
}

/// Settings of the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineParams {
    pub text: TextParams,
    pub lr: LrParams,
}

impl Default for BaselineParams {
    fn default() -> Self {
        BaselineParams {
            text: TextParams::words(),
            lr: LrParams {
                alpha: 1.0,
                max_iterations: 200,
                balanced: false,
            },
        }
    }
}

/// A fitted TF-IDF + logistic regression classifier.
pub struct TfIdfLr {
    text: TextFeaturizer,
    model: SoftmaxLr,
}

impl TfIdfLr {
    /// Fits on `texts` with label indices `y` (every label below `n_labels` must occur).
    pub fn fit(
        texts: &[&str],
        y: &[usize],
        n_labels: usize,
        params: BaselineParams,
    ) -> Result<TfIdfLr, BaselineError> {
        let text = TextFeaturizer::fit(texts, params.text);
        let rows = text.transform_all(texts);
        let x = Design {
            sparse: &rows,
            dense: &[],
            n_sparse: text.width(),
            n_dense: 0,
        };
        let model = SoftmaxLr::fit(x, y, n_labels, params.lr)
            .map_err(|e| BaselineError::Fit(e.to_string()))?;
        Ok(TfIdfLr { text, model })
    }

    /// Vocabulary size (n-grams kept).
    pub fn n_features(&self) -> usize {
        self.text.width()
    }

    /// Label probabilities for each text.
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<Vec<f64>>, BaselineError> {
        let re = TextFeaturizer::regex();
        Ok(texts
            .iter()
            .map(|t| self.model.predict(&self.text.transform(&re, t), &[]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argmax(p: &[f64]) -> usize {
        (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap()
    }

    #[test]
    fn tfidf_baseline_learns_a_toy_set() {
        let train = [
            ("my card was stolen yesterday", 0),
            ("someone stole my card", 0),
            ("card stolen please block it", 0),
            ("what is the exchange rate today", 1),
            ("exchange rate for dollars", 1),
            ("bad exchange rate on my transfer", 1),
            ("how do I top up my account", 2),
            ("top up with a bank transfer", 2),
            ("top up failed again", 2),
        ];
        let texts: Vec<&str> = train.iter().map(|t| t.0).collect();
        let y: Vec<usize> = train.iter().map(|t| t.1).collect();
        let m = TfIdfLr::fit(&texts, &y, 3, BaselineParams::default()).unwrap();
        assert!(
            m.n_features() > 20,
            "unigrams and bigrams: {}",
            m.n_features()
        );
        let test = [
            ("my card got stolen", 0),
            ("the exchange rate is wrong", 1),
            ("can I top up now", 2),
        ];
        let probs = m
            .predict(&test.iter().map(|t| t.0).collect::<Vec<_>>())
            .unwrap();
        for ((text, gold), p) in test.iter().zip(&probs) {
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6);
            assert_eq!(argmax(p), *gold, "{text}: {p:?}");
        }
        // Unknown words only: no evidence, so the prediction is not confident.
        let p = &m.predict(&["zzz qqq"]).unwrap()[0];
        assert!(p.iter().all(|&v| v < 0.6), "{p:?}");
    }

    #[test]
    fn chinese_is_split_into_characters() {
        let train = ["很好很满意", "非常好", "太差了", "很差劲"];
        let m = TfIdfLr::fit(&train, &[0, 0, 1, 1], 2, BaselineParams::default()).unwrap();
        let p = m.predict(&["好", "差"]).unwrap();
        assert_eq!((argmax(&p[0]), argmax(&p[1])), (0, 1));
    }

    #[test]
    fn a_label_without_texts_is_an_error() {
        let Err(e) = TfIdfLr::fit(&["a b", "c d"], &[0, 0], 2, BaselineParams::default()) else {
            panic!("a label without texts was accepted");
        };
        assert!(e.to_string().contains("label index 1"), "{e}");
    }
}
