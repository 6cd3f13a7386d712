//! TF-IDF text features, no language model involved: word 1-2 grams (single CJK ideographs
//! count as words, so Chinese gets character 1-2 grams) and optionally character n-grams
//! within word boundaries (spelling variants, compounds, keyword-heavy reports). Each block
//! is L2-normalized on its own. Fitted on training texts and saved with a stacked model, so
//! `classify`, `eval` and `serve` featurize a request the same way.

use std::collections::HashMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::linear::SparseRow;

/// Words (runs of letters, digits, underscore) and single CJK ideographs.
pub const TOKEN_REGEX: &str = r"\p{Han}|[^\W\p{Han}]+";

/// What the featurizer extracts and how much of it it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TextParams {
    /// Word n-grams 1..=word_ngrams.
    pub word_ngrams: usize,
    /// Character n-grams of these lengths (inclusive), inside space-padded words; (0, 0) for
    /// none.
    pub char_ngrams: (usize, usize),
    /// Most word n-grams kept (by document frequency), then most character n-grams.
    pub max_words: usize,
    pub max_chars: usize,
    /// N-grams seen in fewer training texts are dropped (when that leaves any).
    pub min_df: usize,
}

impl TextParams {
    /// The plain baseline: word 1-2 grams only (what a user reaches for first).
    pub fn words() -> TextParams {
        TextParams {
            word_ngrams: 2,
            char_ngrams: (0, 0),
            max_words: 50_000,
            max_chars: 0,
            min_df: 1,
        }
    }

    /// Words and character 2-4 grams: the default of the stacked scorer.
    pub fn words_and_chars() -> TextParams {
        TextParams {
            word_ngrams: 2,
            char_ngrams: (2, 4),
            max_words: 20_000,
            max_chars: 20_000,
            min_df: 1,
        }
    }
}

/// A fitted vocabulary with inverse document frequencies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextFeaturizer {
    pub params: TextParams,
    /// Word n-grams, then character n-grams (prefixed `#`), with their idf; the index is the
    /// feature's column.
    pub vocab: Vec<(String, f32)>,
    /// Columns below this are word n-grams.
    pub n_word: usize,
    #[serde(skip)]
    index: HashMap<String, u32>,
}

fn token_regex() -> Regex {
    // A constant pattern: it compiles.
    Regex::new(TOKEN_REGEX).unwrap_or_else(|_| unreachable!("TOKEN_REGEX compiles"))
}

/// The word and character n-grams of a text (with repeats), lowercase.
fn grams(re: &Regex, p: &TextParams, text: &str) -> (Vec<String>, Vec<String>) {
    let lower = text.to_lowercase();
    let words: Vec<&str> = re.find_iter(&lower).map(|m| m.as_str()).collect();
    let mut w = Vec::new();
    for n in 1..=p.word_ngrams.max(1) {
        for win in words.windows(n) {
            w.push(win.join(" "));
        }
    }
    let mut c = Vec::new();
    let (lo, hi) = p.char_ngrams;
    if lo > 0 && hi >= lo {
        for word in &words {
            let chars: Vec<char> = format!(" {word} ").chars().collect();
            for n in lo..=hi {
                for win in chars.windows(n) {
                    let mut g = String::from("#");
                    g.extend(win);
                    c.push(g);
                }
            }
        }
    }
    (w, c)
}

impl TextFeaturizer {
    /// Learns the vocabulary and idf (smooth: ln((1 + n) / (1 + df)) + 1, as scikit-learn)
    /// from `texts`. Deterministic: ties in document frequency break by the n-gram.
    pub fn fit(texts: &[&str], params: TextParams) -> TextFeaturizer {
        let re = token_regex();
        let mut df_w: HashMap<String, usize> = HashMap::new();
        let mut df_c: HashMap<String, usize> = HashMap::new();
        for t in texts {
            let (mut w, mut c) = grams(&re, &params, t);
            w.sort_unstable();
            w.dedup();
            c.sort_unstable();
            c.dedup();
            for g in w {
                *df_w.entry(g).or_default() += 1;
            }
            for g in c {
                *df_c.entry(g).or_default() += 1;
            }
        }
        let n = texts.len();
        let keep = |df: HashMap<String, usize>, max: usize| -> Vec<(String, f32)> {
            let mut v: Vec<(String, usize)> = df.into_iter().collect();
            if v.iter().any(|(_, d)| *d >= params.min_df) {
                v.retain(|(_, d)| *d >= params.min_df);
            }
            v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(max);
            v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            v.into_iter()
                .map(|(g, d)| (g, (((1 + n) as f64 / (1 + d) as f64).ln() + 1.0) as f32))
                .collect()
        };
        let mut vocab = keep(df_w, params.max_words);
        let n_word = vocab.len();
        vocab.extend(keep(df_c, params.max_chars));
        let mut f = TextFeaturizer {
            params,
            vocab,
            n_word,
            index: HashMap::new(),
        };
        f.build_index();
        f
    }

    /// Rebuilds the n-gram -> column map (after loading from a file).
    pub fn build_index(&mut self) {
        self.index = self
            .vocab
            .iter()
            .enumerate()
            .map(|(i, (g, _))| (g.clone(), i as u32))
            .collect();
    }

    /// Number of columns.
    pub fn width(&self) -> usize {
        self.vocab.len()
    }

    /// The text's TF-IDF row: word block and character block each L2-normalized; unknown
    /// n-grams are ignored. Columns ascending.
    pub fn transform(&self, re: &Regex, text: &str) -> SparseRow {
        let (w, c) = grams(re, &self.params, text);
        let mut out = Vec::new();
        for block in [w, c] {
            let mut counts: HashMap<u32, f32> = HashMap::new();
            for g in block {
                if let Some(&j) = self.index.get(&g) {
                    *counts.entry(j).or_default() += 1.0;
                }
            }
            let mut row: Vec<(u32, f32)> = counts
                .into_iter()
                .map(|(j, c)| (j, c * self.vocab[j as usize].1))
                .collect();
            // Summed in column order, not the map's (which differs between maps), so a
            // text's row, and the probabilities after it, are the same bits every run.
            row.sort_unstable_by_key(|(j, _)| *j);
            let norm = row.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|(_, v)| *v /= norm);
            }
            out.extend(row);
        }
        out.sort_unstable_by_key(|(j, _)| *j);
        out
    }

    /// [`Self::transform`] of many texts.
    pub fn transform_all(&self, texts: &[&str]) -> Vec<SparseRow> {
        let re = token_regex();
        texts.iter().map(|t| self.transform(&re, t)).collect()
    }

    /// A compiled token pattern for [`Self::transform`] (compile once per caller).
    pub fn regex() -> Regex {
        token_regex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_the_same_bits_every_time() {
        // The norm was summed in hash-map order, which differs between maps: the last bits
        // of a stack's probabilities changed from run to run.
        let texts = [
            "I made a cash deposit to my account but i don't see it",
            "Could you help my figure out the exchange fee?",
            "my card payment was declined twice at the shop today",
        ];
        let f = TextFeaturizer::fit(&texts, TextParams::words_and_chars());
        let re = token_regex();
        let text = "why was my cash deposit declined, and what is the exchange fee for it?";
        let first = f.transform(&re, text);
        for _ in 0..50 {
            let again = f.transform(&re, text);
            assert!(first
                .iter()
                .zip(&again)
                .all(|(a, b)| a.0 == b.0 && a.1.to_bits() == b.1.to_bits()));
        }
    }

    #[test]
    fn words_bigrams_and_char_grams() {
        let re = token_regex();
        let p = TextParams::words_and_chars();
        let (w, c) = grams(&re, &p, "Top up, NOW");
        assert_eq!(w, vec!["top", "up", "now", "top up", "up now"]);
        assert!(c.contains(&"# t".to_string()) && c.contains(&"#top ".to_string()));
        // Chinese: every ideograph is a word, so bigrams are character bigrams.
        let (w, _) = grams(&re, &TextParams::words(), "很好吃");
        assert_eq!(w, vec!["很", "好", "吃", "很 好", "好 吃"]);
    }

    #[test]
    fn rows_are_normalized_per_block_and_unknowns_ignored() {
        let f = TextFeaturizer::fit(
            &["card stolen", "card lost", "exchange rate"],
            TextParams::words_and_chars(),
        );
        assert!(f.n_word > 0 && f.width() > f.n_word);
        let re = token_regex();
        let row = f.transform(&re, "stolen card");
        let (mut nw, mut nc) = (0.0f32, 0.0f32);
        for &(j, v) in &row {
            if (j as usize) < f.n_word {
                nw += v * v;
            } else {
                nc += v * v;
            }
        }
        assert!(
            (nw - 1.0).abs() < 1e-5 && (nc - 1.0).abs() < 1e-5,
            "{nw} {nc}"
        );
        assert!(row.windows(2).all(|p| p[0].0 < p[1].0));
        assert!(f
            .transform(&re, "zzz")
            .iter()
            .all(|(j, _)| *j as usize >= f.n_word));
        // A rarer n-gram weighs more: "stolen" (1 text) over "card" (2).
        let idf = |g: &str| f.vocab.iter().find(|(x, _)| x == g).unwrap().1;
        assert!(idf("stolen") > idf("card"));
    }

    #[test]
    fn vocabulary_caps_keep_the_most_frequent_and_survive_a_round_trip() {
        let mut p = TextParams::words();
        p.max_words = 2;
        let f = TextFeaturizer::fit(&["a b", "a c", "a b d", "b a"], p);
        let names: Vec<&str> = f.vocab.iter().map(|(g, _)| g.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        let json = serde_json::to_string(&f).unwrap();
        let mut g: TextFeaturizer = serde_json::from_str(&json).unwrap();
        g.build_index();
        let re = token_regex();
        assert_eq!(g.transform(&re, "b a"), f.transform(&re, "b a"));
    }
}
