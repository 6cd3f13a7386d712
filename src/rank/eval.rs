//! What `edgeact rank-eval` (in the command layer) measures with: NDCG@k, the TF-IDF cosine
//! baseline (profile vs candidate), and a family of intents with the profile that
//! describes it.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// NDCG@k of a ranking given as relevance grades in ranked order (binary or graded).
/// `ideal` holds every candidate's grade (the best possible order is computed from it).
pub fn ndcg_at(ranked: &[f64], ideal: &[f64], k: usize) -> f64 {
    let dcg = |g: &[f64]| -> f64 {
        g.iter()
            .take(k)
            .enumerate()
            .map(|(i, &rel)| (2f64.powf(rel) - 1.0) / ((i + 2) as f64).log2())
            .sum()
    };
    let mut best = ideal.to_vec();
    best.sort_by(|a, b| b.total_cmp(a));
    let idcg = dcg(&best);
    if idcg == 0.0 {
        0.0
    } else {
        dcg(ranked) / idcg
    }
}

/// Lower-case word tokens (letters and digits).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Character n-grams (3 to 5 characters) of each word, the word padded with a space on
/// each side so that prefixes and suffixes are their own terms: "verify" and
/// "verification" share "ver", "eri", "rif", ... where their word terms share nothing.
pub fn char_ngrams(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in words(text) {
        let c: Vec<char> = format!(" {w} ").chars().collect();
        for n in 3..=5 {
            if c.len() < n {
                continue;
            }
            out.extend(c.windows(n).map(|g| g.iter().collect::<String>()));
        }
    }
    out
}

/// What a TF-IDF vector's terms are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terms {
    /// [`words`].
    Words,
    /// [`char_ngrams`].
    CharNgrams,
}

impl Terms {
    pub fn of(self, text: &str) -> Vec<String> {
        match self {
            Terms::Words => words(text),
            Terms::CharNgrams => char_ngrams(text),
        }
    }
}

/// TF-IDF with smoothed IDF, `ln((1 + n) / (1 + df)) + 1`, fitted on a corpus; vectors
/// are L2-normalised so their dot product is the cosine.
pub struct Tfidf {
    terms: Terms,
    idf: HashMap<String, f64>,
    default_idf: f64,
}

impl Tfidf {
    /// Word terms.
    pub fn fit<'a>(docs: impl IntoIterator<Item = &'a str>) -> Tfidf {
        Tfidf::fit_terms(Terms::Words, docs)
    }

    pub fn fit_terms<'a>(terms: Terms, docs: impl IntoIterator<Item = &'a str>) -> Tfidf {
        let mut df: HashMap<String, usize> = HashMap::new();
        let mut n = 0usize;
        for d in docs {
            n += 1;
            let mut seen: Vec<String> = terms.of(d);
            seen.sort();
            seen.dedup();
            for w in seen {
                *df.entry(w).or_default() += 1;
            }
        }
        let idf = |df: usize| ((1.0 + n as f64) / (1.0 + df as f64)).ln() + 1.0;
        Tfidf {
            terms,
            idf: df.into_iter().map(|(w, c)| (w, idf(c))).collect(),
            default_idf: idf(0),
        }
    }

    pub fn vector(&self, text: &str) -> BTreeMap<String, f64> {
        let mut v: BTreeMap<String, f64> = BTreeMap::new();
        for w in self.terms.of(text) {
            *v.entry(w).or_default() += 1.0;
        }
        for (w, x) in v.iter_mut() {
            *x *= self.idf.get(w).copied().unwrap_or(self.default_idf);
        }
        let norm = v.values().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.values_mut().for_each(|x| *x /= norm);
        }
        v
    }

    pub fn cosine(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> f64 {
        a.iter().filter_map(|(w, x)| b.get(w).map(|y| x * y)).sum()
    }
}

/// A family of intents with the profile text that describes it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub name: String,
    pub profile: String,
    pub intents: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_is_one_for_the_ideal_order_and_less_otherwise() {
        let g = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        let ideal = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        assert!((ndcg_at(&ideal, &g, 5) - 1.0).abs() < 1e-12);
        let worst = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0];
        let mid = ndcg_at(&g, &g, 5);
        assert!(mid < 1.0 && mid > ndcg_at(&worst, &g, 5));
        // Relevant items past k count for nothing.
        assert_eq!(ndcg_at(&worst, &g, 4), 0.0);
        assert_eq!(ndcg_at(&[0.0, 0.0], &[0.0, 0.0], 5), 0.0);
        // One relevant at rank 2 of 1: 1/log2(3).
        let x = ndcg_at(&[0.0, 1.0], &[0.0, 1.0], 5);
        assert!((x - 1.0 / 3f64.log2()).abs() < 1e-12);
    }

    #[test]
    fn tfidf_prefers_shared_rare_words() {
        let docs = [
            "my card has not arrived",
            "how do I top up",
            "top up failed",
            "the card is lost",
            "exchange rate for euros",
        ];
        let t = Tfidf::fit(docs);
        let q = t.vector("I want to top up my account");
        let a = t.vector("top up by bank transfer");
        let b = t.vector("exchange rate for dollars");
        assert!(Tfidf::cosine(&q, &a) > Tfidf::cosine(&q, &b));
        let self_sim = Tfidf::cosine(&a, &a);
        assert!((self_sim - 1.0).abs() < 1e-9);
        assert_eq!(words("Top-up, ATM!"), vec!["top", "up", "atm"]);
    }

    #[test]
    fn char_ngrams_relate_word_forms_that_words_do_not() {
        assert_eq!(
            char_ngrams("ab cde"),
            vec![" ab", "ab ", " ab ", " cd", "cde", "de ", " cde", "cde ", " cde "]
        );
        let docs = ["verify my identity", "top up failed", "exchange rate"];
        let w = Tfidf::fit(docs);
        let c = Tfidf::fit_terms(Terms::CharNgrams, docs);
        let (q, d) = ("identity verification", "how do I verify");
        assert_eq!(Tfidf::cosine(&w.vector(q), &w.vector(d)), 0.0);
        assert!(Tfidf::cosine(&c.vector(q), &c.vector(d)) > 0.1);
    }
}
