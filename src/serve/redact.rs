//! Redaction of personal data before it leaves the device: e-mail addresses, phone numbers,
//! card-like numbers (Luhn-checked) and configurable regex patterns, in trace and error
//! payloads and in log lines. Pure string work, no I/O. Request ids are never touched, so
//! the operator can still match every trace and error to its request.

use std::borrow::Cow;

use regex::Regex;
use serde_json::Value;

/// A built-in kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Email,
    Phone,
    Card,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Email, Kind::Phone, Kind::Card];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
            Kind::Card => "card",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// What replaces a match.
    fn mask(self) -> &'static str {
        match self {
            Kind::Email => "[email]",
            Kind::Phone => "[phone]",
            Kind::Card => "[card]",
        }
    }
}

/// What replaces a match of a configured pattern.
pub const PATTERN_MASK: &str = "[redacted]";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RedactError {
    #[error("`redact`: unknown kind `{0}` (known: email, phone, card, none)")]
    UnknownKind(String),
    #[error("`redact_patterns`: `{pattern}` is not a valid regex: {reason}")]
    Pattern { pattern: String, reason: String },
}

/// JSON keys whose values are never redacted: ids and content hashes (a hash's digits are
/// not personal data, and the id is what ties a trace to its request).
fn keep_key(key: &str) -> bool {
    key == "id" || key == "request_id" || key.ends_with("sha256")
}

/// The configured redaction; [`Redactor::off`] changes nothing.
#[derive(Debug, Clone)]
pub struct Redactor {
    kinds: Vec<Kind>,
    email: Regex,
    card: Regex,
    phone: Regex,
    patterns: Vec<Regex>,
}

impl Redactor {
    /// `kinds`: names from [`Kind`] (or just `none`); `patterns`: extra regexes.
    pub fn new(kinds: &[String], patterns: &[String]) -> Result<Redactor, RedactError> {
        let mut ks = Vec::new();
        for k in kinds {
            let k = k.trim();
            if k == "none" {
                continue;
            }
            let kind = Kind::parse(k).ok_or_else(|| RedactError::UnknownKind(k.to_string()))?;
            if !ks.contains(&kind) {
                ks.push(kind);
            }
        }
        let mut pats = Vec::new();
        for p in patterns {
            let re = Regex::new(p).map_err(|e| RedactError::Pattern {
                pattern: p.clone(),
                reason: e.to_string().replace('\n', " "),
            })?;
            pats.push(re);
        }
        // The three built-in expressions are constants; they are checked by the unit tests,
        // so compiling them cannot fail.
        let re = |s: &str| Regex::new(s).expect("built-in redaction regex");
        Ok(Redactor {
            kinds: ks,
            email: re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
            card: re(r"\d(?:[ -]?\d){12,18}"),
            phone: re(r"\+?\(?\d[\d ().-]{5,24}\d"),
            patterns: pats,
        })
    }

    /// Every built-in kind, no extra pattern: the default.
    pub fn all_kinds() -> Redactor {
        let names: Vec<String> = Kind::ALL.iter().map(|k| k.name().to_string()).collect();
        // Only known names: cannot fail.
        Redactor::new(&names, &[]).expect("built-in kinds")
    }

    /// Redacts nothing.
    pub fn off() -> Redactor {
        // No kinds, no patterns: cannot fail.
        Redactor::new(&[], &[]).expect("empty redactor")
    }

    pub fn is_off(&self) -> bool {
        self.kinds.is_empty() && self.patterns.is_empty()
    }

    /// The kinds in use, by name (for logs).
    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.name()).collect()
    }

    /// `s` with every match replaced by its mask (`[email]`, `[phone]`, `[card]`,
    /// `[redacted]`); borrowed when nothing matched.
    pub fn redact<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if self.is_off() || s.is_empty() {
            return Cow::Borrowed(s);
        }
        let mut out = Cow::Borrowed(s);
        // E-mail first (addresses may hold digits), then cards (Luhn), then phones. Each
        // looks at the text with every script's digits folded to ASCII (０７７, ٠٧٧, ०७७),
        // and masks the matching span of the text itself.
        if self.kinds.contains(&Kind::Email) {
            out = mask_spans(out, Kind::Email.mask(), |t| {
                self.email.find_iter(t).map(|m| m.range()).collect()
            });
        }
        if self.kinds.contains(&Kind::Card) {
            out = mask_spans(out, Kind::Card.mask(), |t| {
                spans_checked(t, &self.card, card_span)
            });
        }
        if self.kinds.contains(&Kind::Phone) {
            out = mask_spans(out, Kind::Phone.mask(), |t| {
                spans_checked(t, &self.phone, phone_span)
            });
        }
        for p in &self.patterns {
            out = replace_cow(out, |t| p.replace_all(t, PATTERN_MASK).into_owned());
        }
        out
    }

    /// Redacts every string in a JSON value in place, except under id and hash keys.
    /// Returns how many strings changed.
    pub fn redact_json(&self, v: &mut Value) -> usize {
        if self.is_off() {
            return 0;
        }
        match v {
            Value::String(s) => {
                if let Cow::Owned(r) = self.redact(s) {
                    *s = r;
                    1
                } else {
                    0
                }
            }
            Value::Array(a) => a.iter_mut().map(|x| self.redact_json(x)).sum(),
            Value::Object(o) => o
                .iter_mut()
                .filter(|(k, _)| !keep_key(k))
                .map(|(_, x)| self.redact_json(x))
                .sum(),
            _ => 0,
        }
    }

    /// A message payload: JSON is redacted value by value (ids kept), anything else as text.
    pub fn redact_payload(&self, payload: &str) -> String {
        if self.is_off() {
            return payload.to_string();
        }
        match serde_json::from_str::<Value>(payload) {
            Ok(mut v) => {
                if self.redact_json(&mut v) == 0 {
                    payload.to_string()
                } else {
                    v.to_string()
                }
            }
            Err(_) => self.redact(payload).into_owned(),
        }
    }
}

/// Applies `f` only when there is text; keeps a borrow when `f` changed nothing.
fn replace_cow<'a>(s: Cow<'a, str>, f: impl Fn(&str) -> String) -> Cow<'a, str> {
    let r = f(&s);
    if r == *s {
        s
    } else {
        Cow::Owned(r)
    }
}

/// The value of a decimal digit of any script (Unicode `Nd`: ASCII, fullwidth, Arabic-Indic,
/// Devanagari, ...). Unicode keeps each script's digits 0 to 9 in a run of ten
/// consecutive code points, and adjacent runs are whole, so a digit's value is the count
/// of digits just before it, mod 10.
fn digit_value(c: char) -> Option<u32> {
    if c.is_ascii() {
        return c.to_digit(10);
    }
    if !c.is_numeric() || !is_decimal_digit(c) {
        return None;
    }
    let mut k = 0;
    let mut cp = c as u32;
    while let Some(prev) = cp.checked_sub(1).and_then(char::from_u32) {
        if !is_decimal_digit(prev) {
            break;
        }
        k += 1;
        cp -= 1;
    }
    Some(k % 10)
}

/// A Unicode decimal digit (`Nd`), as the regex crate's `\d` knows it.
fn is_decimal_digit(c: char) -> bool {
    use std::sync::OnceLock;
    static ND: OnceLock<Regex> = OnceLock::new();
    // A constant expression: compiling it cannot fail.
    let re = ND.get_or_init(|| Regex::new(r"^\d$").expect("digit regex"));
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf))
}

/// `s` with every non-ASCII decimal digit as its ASCII digit, and, when any was folded,
/// for each byte offset of the folded text the byte offset in `s` it came from (plus the
/// end).
fn fold_digits(s: &str) -> (Cow<'_, str>, Option<Vec<usize>>) {
    if s.is_ascii() || !s.chars().any(|c| !c.is_ascii() && c.is_numeric()) {
        return (Cow::Borrowed(s), None);
    }
    let mut folded = String::with_capacity(s.len());
    let mut map = Vec::with_capacity(s.len() + 1);
    for (i, c) in s.char_indices() {
        match digit_value(c).filter(|_| !c.is_ascii()) {
            Some(d) => {
                folded.push(char::from(b'0' + d as u8));
                map.push(i);
            }
            None => {
                folded.push(c);
                map.extend(i..i + c.len_utf8());
            }
        }
    }
    map.push(s.len());
    (Cow::Owned(folded), Some(map))
}

/// Replaces with `mask` each span that `find` reports in the digit-folded text.
fn mask_spans<'a>(
    s: Cow<'a, str>,
    mask: &str,
    find: impl Fn(&str) -> Vec<std::ops::Range<usize>>,
) -> Cow<'a, str> {
    let (folded, map) = fold_digits(&s);
    let spans = find(&folded);
    if spans.is_empty() {
        return s;
    }
    let at = |i: usize| map.as_ref().map_or(i, |m| m[i]);
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for r in spans {
        let (a, b) = (at(r.start), at(r.end));
        out.push_str(&s[last..a]);
        out.push_str(mask);
        last = b;
    }
    out.push_str(&s[last..]);
    Cow::Owned(out)
}

/// The part of each candidate match that `check` accepts (a byte range within the
/// candidate), provided the match is not glued to letters or digits on either side.
fn spans_checked(
    s: &str,
    re: &Regex,
    check: fn(&str) -> Option<usize>,
) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    for m in re.find_iter(s) {
        let before = s[..m.start()].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(len) = check(m.as_str()) else {
            continue;
        };
        let end = m.start() + len;
        let after = s[end..].chars().next();
        if after.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        out.push(m.start()..end);
    }
    out
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// The Luhn checksum of a card number.
pub fn luhn_ok(ds: &[u32]) -> bool {
    let sum: u32 = ds
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The longest prefix of a candidate, ending at a digit, with 13 to 19 digits that passes
/// the Luhn check: a card number. Its length in bytes.
fn card_span(cand: &str) -> Option<usize> {
    let ends: Vec<usize> = cand
        .char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .map(|(i, _)| i + 1)
        .collect();
    for &end in ends.iter().rev() {
        let ds = digits(&cand[..end]);
        if (13..=19).contains(&ds.len()) && luhn_ok(&ds) && !ds.iter().all(|&d| d == ds[0]) {
            return Some(end);
        }
    }
    None
}

/// A phone number: 9 to 15 digits in groups (7 to 15 after a leading `+`), at most one
/// separator between digits, not an ISO date or a plain decimal number. Its length.
fn phone_span(cand: &str) -> Option<usize> {
    let n = digits(cand).len();
    let min = if cand.starts_with('+') { 7 } else { 9 };
    if !(min..=15).contains(&n) {
        return None;
    }
    let b = cand.as_bytes();
    // ISO date (2024-01-15 ...) or time stamps: leave them.
    if b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
    {
        return None;
    }
    // A decimal number like 3.14159265 or 12.5: one dot, digits only otherwise.
    if cand.matches('.').count() == 1 && cand.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    // No run of two separators other than ") " / ")-" / " (".
    let seps: Vec<char> = cand.chars().collect();
    for w in seps.windows(2) {
        let sep = |c: char| matches!(c, ' ' | '.' | '-');
        if sep(w[0]) && sep(w[1]) {
            return None;
        }
    }
    Some(cand.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redactor {
        Redactor::all_kinds()
    }

    #[test]
    fn emails() {
        assert_eq!(
            r().redact("write to jane.doe+kiosk@example.co.uk today"),
            "write to [email] today"
        );
        assert_eq!(
            r().redact("a@b.c is too short a domain"),
            "a@b.c is too short a domain"
        );
        assert_eq!(r().redact("no address @ here"), "no address @ here");
    }

    #[test]
    fn phones() {
        for (text, want) in [
            ("call +44 20 7946 0958 now", "call [phone] now"),
            ("call (555) 123-4567 now", "call [phone] now"),
            ("call 555-123-4567.", "call [phone]."),
            ("ring 0170 1234567", "ring [phone]"),
            ("+1-202-555-0143", "[phone]"),
            ("mobile 07700900123", "mobile [phone]"),
        ] {
            assert_eq!(r().redact(text), want, "{text}");
        }
        // Not phones: dates, times, short numbers, decimals, ids glued to letters.
        for text in [
            "on 2024-01-15 10:30 the door opened",
            "room 12, floor 3, 45 people",
            "pi is 3.14159265358979",
            "order r123456789 is late",
            "version 1.2.3",
            "price 1 250 euro",
        ] {
            assert_eq!(r().redact(text), text, "{text}");
        }
    }

    #[test]
    fn cards_need_the_luhn_check() {
        assert_eq!(
            r().redact("card 4111 1111 1111 1111 please"),
            "card [card] please"
        );
        assert_eq!(r().redact("card 4111-1111-1111-1111"), "card [card]");
        assert_eq!(r().redact("5500005555555559"), "[card]");
        // Same shape, wrong check digit: not a card (16 digits is too long for a phone too).
        assert_eq!(
            r().redact("ticket 4111 1111 1111 1112"),
            "ticket 4111 1111 1111 1112"
        );
        // A card followed by more digits: the valid prefix is cut.
        assert_eq!(r().redact("4111111111111111 22"), "[card] 22");
        assert!(luhn_ok(&digits("79927398713")));
        assert!(!luhn_ok(&digits("79927398710")));
    }

    #[test]
    fn kinds_and_patterns_are_configurable() {
        let only_email = Redactor::new(&["email".into()], &[]).unwrap();
        assert_eq!(
            only_email.redact("x@example.com +44 20 7946 0958"),
            "[email] +44 20 7946 0958"
        );
        let pat = Redactor::new(&["none".into()], &[r"EMP-\d{6}".into()]).unwrap();
        assert_eq!(pat.redact("badge EMP-123456 seen"), "badge [redacted] seen");
        assert!(Redactor::new(&["none".into()], &[]).unwrap().is_off());
        assert_eq!(
            Redactor::new(&["emial".into()], &[]).unwrap_err(),
            RedactError::UnknownKind("emial".into())
        );
        let e = Redactor::new(&[], &["(unclosed".into()]).unwrap_err();
        assert!(e.to_string().contains("(unclosed"), "{e}");
        let off = Redactor::off();
        assert!(matches!(off.redact("x@example.com"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_keeps_ids_and_hashes() {
        let payload = serde_json::json!({
            "id": "jane@example.com",
            "task": "kiosk",
            "template_sha256": "4111111111111111",
            "steps": [{"thought": "mail jane@example.com", "observation": "call 555-123-4567"}],
            "error": {"kind": "engine", "message": "card 4111 1111 1111 1111 rejected"},
            "tokens": 12345678901u64,
        })
        .to_string();
        let out: Value = serde_json::from_str(&r().redact_payload(&payload)).unwrap();
        assert_eq!(out["id"], "jane@example.com");
        assert_eq!(out["template_sha256"], "4111111111111111");
        assert_eq!(out["steps"][0]["thought"], "mail [email]");
        assert_eq!(out["steps"][0]["observation"], "call [phone]");
        assert_eq!(out["error"]["message"], "card [card] rejected");
        assert_eq!(out["tokens"], 12345678901u64, "numbers are not text");
        // Not JSON: redacted as text; unchanged JSON comes back byte for byte.
        assert_eq!(r().redact_payload("to x@example.com"), "to [email]");
        let clean = r#"{"id":"a","label":"positive"}"#;
        assert_eq!(r().redact_payload(clean), clean);
    }

    #[test]
    fn non_ascii_text_is_safe() {
        let s = "café ☕ 电话 13812345678 über";
        assert_eq!(r().redact(s), "café ☕ 电话 [phone] über");
        assert_eq!(r().redact("ß+4915112345678ß"), "ß+4915112345678ß");
    }

    /// Digits of other scripts: the same numbers written with fullwidth, Arabic-Indic,
    /// Devanagari or Eastern Arabic digits are masked too.
    #[test]
    fn digits_of_any_script_are_masked() {
        for (text, want) in [
            ("call ０７７００９００１２３ now", "call [phone] now"),
            ("call +٤٤ ٢٠ ٧٩٤٦ ٠٩٥٨ now", "call [phone] now"),
            ("फ़ोन ०७७००९००१२३", "फ़ोन [phone]"),
            ("card ۴۱۱۱ ۱۱۱۱ ۱۱۱۱ ۱۱۱۱ ok", "card [card] ok"),
            ("card ４１１１-１１１１-１１１１-１１１１", "card [card]"),
            ("mixed 0770０９００１２3", "mixed [phone]"),
        ] {
            assert_eq!(r().redact(text), want, "{text}");
        }
        // A wrong check digit is still no card, in any script.
        let t = "ticket ４１１１ １１１１ １１１１ １１１２";
        assert_eq!(r().redact(t), t);
    }

    /// Seeded random strings with a phone, a card or an e-mail address embedded, in
    /// random digit scripts and between random words: never left in the output, and the
    /// text around it is kept.
    #[test]
    fn embedded_personal_data_never_survives_random_surroundings() {
        use crate::util::rng::SplitMix64;
        const ZEROS: [u32; 6] = [0x30, 0xFF10, 0x660, 0x6F0, 0x966, 0x9E6];
        const WORDS: [&str; 10] = [
            "hello", "the room", "é", "电话", "ok,", "(note)", "at", "-", "x", "Zimmer",
        ];
        let mut rng = SplitMix64::new(16);
        let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
        let cards = ["4111111111111111", "5500005555555559", "378282246310005"];
        for case in 0..3000 {
            let zero = ZEROS[pick(ZEROS.len())];
            let script = |ascii: &str| -> String {
                ascii
                    .chars()
                    .map(|c| match c.to_digit(10) {
                        Some(d) => char::from_u32(zero + d).unwrap(),
                        None => c,
                    })
                    .collect()
            };
            let (secret, mask) = match pick(3) {
                0 => {
                    let mut n = String::from("07");
                    for _ in 0..9 {
                        n.push(char::from(b'0' + pick(10) as u8));
                    }
                    (script(&n), "[phone]")
                }
                1 => {
                    let c = cards[pick(cards.len())];
                    let sep = [" ", "-", ""][pick(3)];
                    let grouped: Vec<String> = c
                        .as_bytes()
                        .chunks(4)
                        .map(|g| String::from_utf8(g.to_vec()).unwrap())
                        .collect();
                    (script(&grouped.join(sep)), "[card]")
                }
                _ => (format!("user{}@example.org", pick(1000)), "[email]"),
            };
            let before = WORDS[pick(WORDS.len())];
            let after = WORDS[pick(WORDS.len())];
            let text = format!("{before} {secret} {after}");
            let out = r().redact(&text);
            assert_eq!(
                out,
                format!("{before} {mask} {after}"),
                "case {case}: {text}"
            );
        }
    }
}
