//! BERT's tokenizer as `tokenizer.json` of all-MiniLM-L6-v2 describes it (BertNormalizer
//! with lowercase, accent stripping, CJK splitting; BertPreTokenizer; WordPiece with `##`
//! continuations): clean the text (drop control characters, whitespace to spaces), put
//! spaces around CJK ideographs, NFD and drop nonspacing marks, lowercase, split on
//! whitespace and around each punctuation character, then greedy longest-match-first
//! against the vocabulary; a word with no full match is `[UNK]`. Unicode classes come from
//! `regex` (`\p{P}`, `\p{Mn}`, ...), the same tables the HF tokenizer reads.

use std::collections::HashMap;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// Words longer than this many characters are `[UNK]` (tokenizer.json's
/// `max_input_chars_per_word`).
const MAX_CHARS_PER_WORD: usize = 100;

pub struct WordPiece {
    vocab: HashMap<String, u32>,
    pub cls: u32,
    pub sep: u32,
    unk: u32,
    /// Control and format characters that cleaning drops (tab, newline, CR are whitespace).
    control: Regex,
    mark: Regex,
    /// Punctuation: Unicode P* and the ASCII symbols BERT counts as punctuation too.
    punct: Regex,
}

impl WordPiece {
    /// From `tokenizer.json`'s text: `model.vocab` (token -> id) and the special tokens.
    pub fn from_tokenizer_json(text: &str) -> Result<WordPiece, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let model = &v["model"];
        if model["type"].as_str() != Some("WordPiece") {
            return Err(format!("model type {} is not WordPiece", model["type"]));
        }
        let vocab: HashMap<String, u32> = model["vocab"]
            .as_object()
            .ok_or("no model.vocab")?
            .iter()
            .map(|(k, id)| Some((k.clone(), u32::try_from(id.as_u64()?).ok()?)))
            .collect::<Option<_>>()
            .ok_or("model.vocab has a non-integer id")?;
        WordPiece::new(vocab)
    }

    pub fn new(vocab: HashMap<String, u32>) -> Result<WordPiece, String> {
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| format!("vocabulary has no {t}"))
        };
        let re = |p: &str| Regex::new(p).map_err(|e| e.to_string());
        Ok(WordPiece {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            unk: id("[UNK]")?,
            control: re(r"[\p{Cc}\p{Cf}\x{0}\x{FFFD}]")?,
            mark: re(r"\p{Mn}")?,
            punct: re(r"[\p{P}\x21-\x2F\x3A-\x40\x5B-\x60\x7B-\x7E]")?,
            vocab,
        })
    }

    pub fn vocab_len(&self) -> usize {
        self.vocab.len()
    }

    /// The normalized words of `text` (before WordPiece).
    pub fn words(&self, text: &str) -> Vec<String> {
        let mut clean = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_whitespace() {
                clean.push(' ');
            } else if is_cjk(c) {
                clean.push(' ');
                clean.push(c);
                clean.push(' ');
            } else {
                let mut b = [0u8; 4];
                if !self.control.is_match(c.encode_utf8(&mut b)) {
                    clean.push(c);
                }
            }
        }
        let nfd: String = clean.nfd().collect();
        let lower = self.mark.replace_all(&nfd, "").to_lowercase();
        let mut out = Vec::new();
        for word in lower.split(' ').filter(|w| !w.is_empty()) {
            let mut last = 0;
            for m in self.punct.find_iter(word) {
                if m.start() > last {
                    out.push(word[last..m.start()].to_string());
                }
                out.push(m.as_str().to_string());
                last = m.end();
            }
            if last < word.len() {
                out.push(word[last..].to_string());
            }
        }
        out
    }

    /// Token ids with `[CLS]` first and `[SEP]` last, at most `max_tokens` in all (the
    /// word pieces past that are dropped, as the sentence-transformers truncation does).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Vec<u32> {
        let mut ids = vec![self.cls];
        let room = max_tokens.saturating_sub(2);
        'words: for w in self.words(text) {
            for id in self.pieces(&w) {
                if ids.len() > room {
                    break 'words;
                }
                ids.push(id);
            }
        }
        ids.push(self.sep);
        ids
    }

    /// Greedy longest-match-first pieces of one word; `[UNK]` alone when any part fails.
    fn pieces(&self, word: &str) -> Vec<u32> {
        let chars: Vec<(usize, char)> = word.char_indices().collect();
        if chars.len() > MAX_CHARS_PER_WORD {
            return vec![self.unk];
        }
        let mut out = Vec::new();
        let mut start = 0;
        let mut piece = String::new();
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = None;
            while end > start {
                let b0 = chars[start].0;
                let b1 = chars.get(end).map_or(word.len(), |c| c.0);
                piece.clear();
                if start > 0 {
                    piece.push_str("##");
                }
                piece.push_str(&word[b0..b1]);
                if let Some(&id) = self.vocab.get(&piece) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => out.push(id),
                None => return vec![self.unk],
            }
            start = end;
        }
        out
    }
}

/// CJK ideographs (the blocks BERT's `_is_chinese_char` lists): each is its own word.
fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> WordPiece {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "cafe", "!", ",", "好",
            "我", "card", "'", "t", "don",
        ];
        WordPiece::new(
            words
                .iter()
                .enumerate()
                .map(|(i, w)| (w.to_string(), i as u32))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn normalizes_like_bert() {
        let t = tok();
        assert_eq!(
            t.words("Café,\tDON'T!\u{200b} 我好x"),
            vec!["cafe", ",", "don", "'", "t", "!", "我", "好", "x"]
        );
    }

    #[test]
    fn wordpiece_is_greedy_longest_match_and_unk_on_failure() {
        let t = tok();
        assert_eq!(t.encode("unaffable", 64), vec![2, 4, 5, 6, 3]);
        assert_eq!(t.encode("unaffablex card", 64), vec![2, 1, 12, 3]);
        assert_eq!(t.encode(&"x".repeat(101), 64), vec![2, 1, 3]);
    }

    #[test]
    fn truncates_to_max_tokens_with_cls_and_sep() {
        let t = tok();
        let ids = t.encode(&"card ".repeat(50), 8);
        assert_eq!(ids.len(), 8);
        assert_eq!((ids[0], ids[7]), (2, 3));
        assert!(WordPiece::new(HashMap::new()).is_err());
    }
}
