//! Which companies or markets a message is about, so alert rules can count per company:
//! `$TICKER` cashtags and the names listed in the task file (`[monitor.entities]`), found in
//! a text field. Pure logic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `[monitor.entities]` section: a rule whose `key` is `key` (default `entity`) counts a
/// message once for each entity found in it, unless the message carries that field itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// The key name rules use for the extracted entity.
    #[serde(default = "default_key")]
    pub key: String,
    /// Input field searched.
    #[serde(default = "default_from")]
    pub from: String,
    /// `$` followed by 1-6 letters (and an optional `.` class suffix such as `$BRK.B`) is a
    /// ticker, upper-cased.
    #[serde(default = "default_cashtags")]
    pub cashtags: bool,
    /// Key (usually the ticker) -> names that mean it, matched as whole words, any case.
    #[serde(default)]
    pub names: BTreeMap<String, Vec<String>>,
    /// At most this many entities per message (the first found): one message naming fifty
    /// tickers is a list, not fifty opinions.
    #[serde(default = "default_max_per_message")]
    pub max_per_message: usize,
}

fn default_key() -> String {
    "entity".into()
}
fn default_from() -> String {
    "text".into()
}
fn default_cashtags() -> bool {
    true
}
fn default_max_per_message() -> usize {
    4
}

/// Longest ticker after `$` (letters), so `$` amounts and long words are not tickers.
const MAX_TICKER_LETTERS: usize = 6;

/// The entities a text is about, in order of first mention, each once, at most
/// `max_per_message`.
pub fn extract(cfg: &EntityConfig, text: &str) -> Vec<String> {
    let mut found: Vec<(usize, String)> = Vec::new();
    if cfg.cashtags {
        found.extend(cashtags(text));
    }
    let lower = text.to_lowercase();
    // Lower-casing can change byte offsets of non-ASCII text; positions only order the
    // matches, so an approximate order there is harmless.
    for (key, names) in &cfg.names {
        if let Some(pos) = names
            .iter()
            .filter_map(|n| find_word(&lower, &n.to_lowercase()))
            .min()
        {
            found.push((pos, key.clone()));
        }
    }
    found.sort_by_key(|(pos, _)| *pos);
    let mut out: Vec<String> = Vec::new();
    for (_, k) in found {
        if out.len() >= cfg.max_per_message {
            break;
        }
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// `$ABC` / `$abc` / `$BRK.B` with their byte offsets: not preceded by a letter or digit,
/// 1-6 ASCII letters, not followed by a letter or digit.
fn cashtags(text: &str) -> Vec<(usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for (i, _) in text.match_indices('$') {
        if i > 0 && b[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let letters = b[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        if letters == 0 || letters > MAX_TICKER_LETTERS {
            continue;
        }
        let mut end = i + 1 + letters;
        // A class suffix: `.` and 1-2 letters, then a word end.
        if b.get(end) == Some(&b'.') {
            let suffix = b[end + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphabetic())
                .count();
            let after = b.get(end + 1 + suffix);
            if (1..=2).contains(&suffix) && !after.is_some_and(|c| c.is_ascii_alphanumeric()) {
                end += 1 + suffix;
            }
        }
        if b.get(end).is_some_and(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        out.push((i, text[i + 1..end].to_ascii_uppercase()));
    }
    out
}

/// The first byte offset of `word` in `text` as a whole word (no letter or digit either
/// side).
fn find_word(text: &str, word: &str) -> Option<usize> {
    if word.is_empty() {
        return None;
    }
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !is_word(before) && !is_word(after)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EntityConfig {
        let mut names = BTreeMap::new();
        names.insert("AAPL".to_string(), vec!["Apple".to_string()]);
        names.insert(
            "NOKIA".to_string(),
            vec!["Nokia".to_string(), "Nokia Oyj".to_string()],
        );
        EntityConfig {
            key: default_key(),
            from: default_from(),
            cashtags: true,
            names,
            max_per_message: 4,
        }
    }

    #[test]
    fn cashtags_are_tickers_and_amounts_are_not() {
        let c = cfg();
        assert_eq!(extract(&c, "$tsla up 5%"), ["TSLA"]);
        assert_eq!(extract(&c, "Bought $BRK.B and $msft."), ["BRK.B", "MSFT"]);
        assert!(extract(&c, "costs $5 or US$20, $ABCDEFGH is too long").is_empty());
        assert!(extract(&c, "a$XYZ inside a word, $AB1 with a digit").is_empty());
        assert_eq!(extract(&c, "($NVDA)"), ["NVDA"]);
        assert_eq!(extract(&c, "$"), Vec::<String>::new());
    }

    #[test]
    fn names_match_whole_words_in_any_case() {
        let c = cfg();
        assert_eq!(extract(&c, "NOKIA OYJ cuts jobs"), ["NOKIA"]);
        assert_eq!(extract(&c, "apple pie"), ["AAPL"]);
        assert!(extract(&c, "Pineapples and Nokians").is_empty());
    }

    #[test]
    fn each_entity_once_in_order_of_mention_and_bounded() {
        let mut c = cfg();
        assert_eq!(
            extract(&c, "Nokia beats Apple; $AAPL falls, $NOKIA and Nokia rise"),
            ["NOKIA", "AAPL"]
        );
        c.max_per_message = 2;
        assert_eq!(extract(&c, "$A $B $C $D"), ["A", "B"]);
        c.cashtags = false;
        assert!(extract(&c, "$TSLA").is_empty());
    }

    #[test]
    fn non_ascii_text_does_not_panic() {
        let c = cfg();
        assert_eq!(
            extract(&c, "Ärger bei Apple — $ÄÖ €5 $sap"),
            ["AAPL", "SAP"]
        );
    }
}
