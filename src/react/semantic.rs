//! Semantic evidence from the sentence encoder (all-MiniLM-L6-v2, [`crate::encoder`]):
//! a customer's paraphrase shares meaning with its passage, not always words, so word
//! matching alone (BM25, coverage) misses it. When the encoder is fetched beside the
//! model, every passage (title and text) and every sentence of it is embedded once at
//! knowledge-base load; a question is embedded once per run (a small cache), and its
//! cosine similarity to a passage is one more feature of retrieval ([`fused_scores`]),
//! of the "not found" decision ([`answerable`]) and of sentence choice. Without the
//! encoder nothing here is used and the kiosk works on words alone, as before.
//!
//! The weights below were chosen on the four dev sets (kb/kiosk-dev*.jsonl; the table is
//! in docs/accuracy.md, "Semantic evidence").

use std::sync::{Arc, Mutex};

use crate::encoder::{cosine, Encoder};

/// Weights and thresholds of the semantic evidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemanticConfig {
    /// Retrieval: score = w_bm25 * BM25 / best BM25 + w_cosine * cosine.
    pub w_bm25: f64,
    pub w_cosine: f64,
    /// A passage sharing no term with the question is retrieved only when its cosine
    /// reaches this (else it is noise).
    pub min_hit_cosine: f64,
    /// Passage choice among the retrieved: weight of the cosine added to the word score.
    pub w_passage: f64,
    /// Sentence choice: weight of the sentence's cosine added to its word score.
    pub w_sentence: f64,
    /// A passage whose word coverage is below `min_coverage` is still an answer when its
    /// cosine reaches this.
    pub min_cosine: f64,
    /// A question asking whether something exists, naming a word the knowledge base never
    /// uses ([`super::ground::unknown_object`]), is still answered when the best passage's
    /// cosine reaches this (the customer's word for a thing the passage names otherwise).
    pub known_cosine: f64,
    /// Tool choice: the knowledge base's semantic evidence is `w_tool * (best cosine -
    /// tool_floor)`, at least 0 (0: not used); it counts as the word coverage does.
    pub w_tool: f64,
    pub tool_floor: f64,
}

impl Default for SemanticConfig {
    fn default() -> Self {
        SemanticConfig {
            w_bm25: 0.5,
            w_cosine: 1.0,
            min_hit_cosine: 0.35,
            w_passage: 2.0,
            w_sentence: 0.5,
            min_cosine: 0.4,
            known_cosine: 0.6,
            w_tool: 1.0,
            tool_floor: 0.3,
        }
    }
}

/// The knowledge base's semantic evidence for tool choice from the question's cosines to
/// the passages: `w_tool * (best - tool_floor)`, at least 0.
pub fn kb_match(cosines: &[f64], cfg: &SemanticConfig) -> f64 {
    let best = cosines.iter().copied().fold(0.0, f64::max);
    (cfg.w_tool * (best - cfg.tool_floor)).max(0.0)
}

/// Retrieval scores of every passage: `w_bm25 * bm25 / best bm25 + w_cosine * cosine`
/// (`bm25` 0 for a passage sharing no term). A passage is left out (None) when it shares
/// no term and its cosine is below `min_hit_cosine`.
pub fn fused_scores(bm25: &[f64], cosines: &[f64], cfg: &SemanticConfig) -> Vec<Option<f64>> {
    let best = bm25.iter().copied().fold(0.0, f64::max);
    bm25.iter()
        .zip(cosines)
        .map(|(&b, &c)| {
            if b <= 0.0 && c < cfg.min_hit_cosine {
                return None;
            }
            let b = if best > 0.0 { b / best } else { 0.0 };
            Some(cfg.w_bm25 * b + cfg.w_cosine * c)
        })
        .collect()
}

/// Whether a passage answers the question: its word coverage reaches `min_coverage`, or
/// its meaning is close enough (`cosine` reaches `min_cosine`) though the words differ.
pub fn answerable(coverage: f64, min_coverage: f64, cosine: Option<f64>, min_cosine: f64) -> bool {
    coverage >= min_coverage || cosine.is_some_and(|c| c >= min_cosine)
}

/// The embeddings of a knowledge base: one per passage (title and text) and one per
/// sentence, in the order [`super::ground::split_sentences`] gives them.
pub struct SemanticIndex {
    encoder: Arc<Encoder>,
    pub passages: Vec<Vec<f32>>,
    pub sentences: Vec<Vec<Vec<f32>>>,
    pub cfg: SemanticConfig,
    /// Recent questions' embeddings: one run asks for the same question several times
    /// (tool choice, retrieval, selection).
    cache: Mutex<Vec<(String, Arc<Vec<f32>>)>>,
}

/// Questions whose embeddings are kept.
const CACHE_LEN: usize = 8;

impl SemanticIndex {
    /// Embeds each passage (`title. text`) and each of its sentences (`title: sentence`,
    /// so a sentence keeps its topic).
    pub fn build(encoder: Arc<Encoder>, passages: &[(String, Vec<String>, String)]) -> Self {
        let mut p_emb = Vec::with_capacity(passages.len());
        let mut s_emb = Vec::with_capacity(passages.len());
        for (title, sentences, text) in passages {
            let whole = if title.is_empty() {
                text.clone()
            } else {
                format!("{title}. {text}")
            };
            p_emb.push(encoder.embed(&whole));
            s_emb.push(
                sentences
                    .iter()
                    .map(|s| {
                        if title.is_empty() {
                            encoder.embed(s)
                        } else {
                            encoder.embed(&format!("{title}: {s}"))
                        }
                    })
                    .collect(),
            );
        }
        SemanticIndex {
            encoder,
            passages: p_emb,
            sentences: s_emb,
            cfg: SemanticConfig::default(),
            cache: Mutex::new(Vec::new()),
        }
    }

    /// The embedding of `text`, from the cache when it was asked recently.
    pub fn embed(&self, text: &str) -> Arc<Vec<f32>> {
        let key = text.trim().to_string();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, e)) = cache.iter().find(|(k, _)| *k == key) {
            return e.clone();
        }
        let e = Arc::new(self.encoder.embed(&key));
        if cache.len() >= CACHE_LEN {
            cache.remove(0);
        }
        cache.push((key, e.clone()));
        e
    }

    /// Cosine of `question` to each passage: the best of the whole passage and its
    /// sentences (a passage of several topics matches by the sentence that answers).
    pub fn passage_cosines(&self, question: &str) -> Vec<f64> {
        let q = self.embed(question);
        self.passages
            .iter()
            .zip(&self.sentences)
            .map(|(p, ss)| {
                ss.iter()
                    .map(|s| cosine(&q, s))
                    .fold(cosine(&q, p), f64::max)
            })
            .collect()
    }

    /// Cosine of `question` to each sentence of passage `index`.
    pub fn sentence_cosines(&self, question: &str, index: usize) -> Vec<f64> {
        let q = self.embed(question);
        self.sentences
            .get(index)
            .map(|ss| ss.iter().map(|s| cosine(&q, s)).collect())
            .unwrap_or_default()
    }

    /// Bytes the embeddings take.
    pub fn bytes(&self) -> u64 {
        let n: usize = self.passages.len() + self.sentences.iter().map(Vec::len).sum::<usize>();
        (n * self.encoder.dim() * std::mem::size_of::<f32>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_keeps_word_hits_and_close_meanings_only() {
        let cfg = SemanticConfig::default();
        let s = fused_scores(&[4.0, 0.0, 0.0, 2.0], &[0.2, 0.6, 0.1, 0.5], &cfg);
        assert_eq!(s[2], None, "no shared word, far meaning");
        let (a, b, d) = (s[0].unwrap(), s[1].unwrap(), s[3].unwrap());
        assert!((a - (0.5 + 0.2)).abs() < 1e-9);
        assert!(
            (b - 0.6).abs() < 1e-9,
            "a paraphrase is retrieved by meaning"
        );
        assert!((d - (0.25 + 0.5)).abs() < 1e-9);
        assert!(d > a && a > 0.0 && b < d);
        // Without any word hit the cosines alone rank.
        let s = fused_scores(&[0.0, 0.0], &[0.5, 0.4], &cfg);
        assert!(s[0] > s[1]);
    }

    #[test]
    fn a_close_meaning_answers_low_word_coverage() {
        assert!(answerable(0.3, 0.22, None, 0.55));
        assert!(!answerable(0.1, 0.22, None, 0.55));
        assert!(answerable(0.1, 0.22, Some(0.6), 0.55));
        assert!(!answerable(0.1, 0.22, Some(0.3), 0.55));
    }

    #[test]
    fn tool_evidence_counts_the_cosine_above_the_floor() {
        let cfg = SemanticConfig::default();
        assert_eq!(kb_match(&[0.1, 0.2], &cfg), 0.0);
        assert!((kb_match(&[0.1, 0.7, 0.5], &cfg) - 0.4).abs() < 1e-9);
        assert_eq!(kb_match(&[], &cfg), 0.0);
    }
}
