//! The plain baseline users would otherwise reach for: TF-IDF over word 1-2 grams (single
//! CJK characters count as words, so Chinese gets character 1-2 grams) into a multinomial
//! logistic regression. Vocabulary and n-grams from linfa-preprocessing's CountVectorizer,
//! the classifier from linfa-logistic; no language model involved.

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use linfa_preprocessing::{CountVectorizer, Tokenizer};
use ndarray::{Array1, Array2};

use crate::model::scoring::softmax;

/// Words (runs of letters, digits, underscore) and single CJK ideographs.
pub const TOKEN_REGEX: &str = r"\p{Han}|[^\W\p{Han}]+";

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("TF-IDF: {0}")]
    Vectorize(String),
    #[error("logistic regression: {0}")]
    Fit(String),
    #[error("{0}")]
    Data(String),
}

/// Settings of the baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineParams {
    /// L2 penalty (alpha = 1 is scikit-learn's C = 1).
    pub alpha: f32,
    pub max_iterations: u64,
    /// Bytes the dense training matrix may take; the vocabulary is cut to the most
    /// frequent n-grams to stay under it.
    pub max_matrix_bytes: usize,
}

impl Default for BaselineParams {
    fn default() -> Self {
        BaselineParams {
            alpha: 1.0,
            max_iterations: 200,
            max_matrix_bytes: 256 << 20,
        }
    }
}

/// A fitted TF-IDF + logistic regression classifier.
pub struct TfIdfLr {
    vectorizer: CountVectorizer,
    /// Inverse document frequency of each vocabulary entry, from the training texts.
    idf: Vec<f32>,
    /// Features x labels.
    weights: Array2<f32>,
    bias: Array1<f32>,
    n_labels: usize,
}

impl TfIdfLr {
    /// Fits on `texts` with label indices `y` (every label below `n_labels` must occur).
    pub fn fit(
        texts: &[&str],
        y: &[usize],
        n_labels: usize,
        params: BaselineParams,
    ) -> Result<TfIdfLr, BaselineError> {
        if texts.is_empty() || texts.len() != y.len() {
            return Err(BaselineError::Data(format!(
                "{} texts for {} labels",
                texts.len(),
                y.len()
            )));
        }
        let mut seen = vec![false; n_labels];
        for &c in y {
            if c >= n_labels {
                return Err(BaselineError::Data(format!(
                    "label index {c} >= {n_labels}"
                )));
            }
            seen[c] = true;
        }
        if let Some(m) = seen.iter().position(|s| !s) {
            return Err(BaselineError::Data(format!(
                "label index {m} has no training text"
            )));
        }
        let n = texts.len();
        let cap = (params.max_matrix_bytes / (4 * n)).max(16);
        let docs = Array1::from(texts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        let vectorizer = CountVectorizer::params()
            .tokenizer(Tokenizer::Regex(TOKEN_REGEX.into()))
            .n_gram_range(1, 2)
            .convert_to_lowercase(true)
            .max_features(Some(cap))
            .fit(&docs)
            .map_err(|e| BaselineError::Vectorize(e.to_string()))?;
        let counts = vectorizer
            .transform(&docs)
            .map_err(|e| BaselineError::Vectorize(e.to_string()))?;
        let v = vectorizer.nentries();
        // linfa's TfIdfVectorizer takes document frequencies from the texts it transforms;
        // the baseline needs the training set's (as scikit-learn does): smooth idf,
        // ln((1 + n) / (1 + df)) + 1.
        let mut df = vec![0usize; v];
        for row in counts.outer_iterator() {
            for (j, _) in row.iter() {
                df[j] += 1;
            }
        }
        let idf: Vec<f32> = df
            .iter()
            .map(|&d| (((1 + n) as f64 / (1 + d) as f64).ln() + 1.0) as f32)
            .collect();
        let mut model = TfIdfLr {
            vectorizer,
            idf,
            weights: Array2::zeros((v, n_labels)),
            bias: Array1::zeros(n_labels),
            n_labels,
        };
        let x = model.features(texts)?;
        let ds = Dataset::new(x, Array1::from(y.to_vec()));
        let fitted = MultiLogisticRegression::default()
            .alpha(params.alpha)
            .max_iterations(params.max_iterations)
            .fit(&ds)
            .map_err(|e| BaselineError::Fit(e.to_string()))?;
        for (k, &c) in fitted.classes().iter().enumerate() {
            model
                .weights
                .column_mut(c)
                .assign(&fitted.params().column(k));
            model.bias[c] = fitted.intercept()[k];
        }
        Ok(model)
    }

    /// Vocabulary size (n-grams kept).
    pub fn n_features(&self) -> usize {
        self.idf.len()
    }

    /// L2-normalized TF-IDF rows (dense).
    fn features(&self, texts: &[&str]) -> Result<Array2<f32>, BaselineError> {
        let docs = Array1::from(texts.iter().map(|t| t.to_string()).collect::<Vec<_>>());
        let counts = self
            .vectorizer
            .transform(&docs)
            .map_err(|e| BaselineError::Vectorize(e.to_string()))?;
        let mut x = Array2::<f32>::zeros((texts.len(), self.idf.len()));
        for (i, row) in counts.outer_iterator().enumerate() {
            let mut norm = 0.0f32;
            for (j, &c) in row.iter() {
                let v = c as f32 * self.idf[j];
                x[[i, j]] = v;
                norm += v * v;
            }
            if norm > 0.0 {
                let inv = 1.0 / norm.sqrt();
                for (j, _) in row.iter() {
                    x[[i, j]] *= inv;
                }
            }
        }
        Ok(x)
    }

    /// Label probabilities for each text.
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<Vec<f64>>, BaselineError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(512) {
            let scores = self.features(chunk)?.dot(&self.weights) + &self.bias;
            for row in scores.rows() {
                let s: Vec<f64> = row.iter().map(|&v| v as f64).collect();
                out.push(softmax(&s));
            }
        }
        debug_assert!(out.iter().all(|p| p.len() == self.n_labels));
        Ok(out)
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
