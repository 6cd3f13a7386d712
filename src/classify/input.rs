//! Requests from JSON lines: one object (`id`, `text`, other template fields) or one JSON
//! string per line. Each bad line becomes an error naming the line; nothing is skipped.
//! And the same from one MQTT payload ([`decode_payload`]).
//! Control characters other than tab and line ends are removed from every field: they carry
//! no meaning for the model and can garble logs and terminals.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::classify::Request;

/// Why one input line was not a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("line {line}: not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { line: usize, offset: usize },
    #[error("line {line}: not valid JSON: {reason}")]
    Json { line: usize, reason: String },
    #[error("line {line}: {reason}")]
    Shape { line: usize, reason: String },
}

impl InputError {
    pub fn kind(&self) -> &'static str {
        match self {
            InputError::InvalidUtf8 { .. } => "invalid_utf8",
            InputError::Json { .. } => "invalid_json",
            InputError::Shape { .. } => "invalid_request",
        }
    }
    pub fn line(&self) -> usize {
        match self {
            InputError::InvalidUtf8 { line, .. }
            | InputError::Json { line, .. }
            | InputError::Shape { line, .. } => *line,
        }
    }
}

/// Largest request accepted, in bytes of JSON.
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// Parses one line (1-based `line`) into JSON, checking its encoding and size. `Ok(None)`
/// for a blank line.
pub fn parse_line_value(bytes: &[u8], line: usize) -> Result<Option<Value>, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| InputError::InvalidUtf8 {
        line,
        offset: e.valid_up_to(),
    })?;
    let text = text.trim_end_matches(['\r', '\n']);
    if text.trim().is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_LINE_BYTES {
        return Err(InputError::Shape {
            line,
            reason: format!(
                "request is {} bytes, over the limit of {MAX_LINE_BYTES}",
                text.len()
            ),
        });
    }
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| InputError::Json {
            line,
            reason: e.to_string(),
        })
}

/// Parses one line (1-based `line`) into a request. `Ok(None)` for a blank line.
pub fn parse_line(bytes: &[u8], line: usize) -> Result<Option<Request>, InputError> {
    let Some(value) = parse_line_value(bytes, line)? else {
        return Ok(None);
    };
    request_from_json(value, &line.to_string())
        .map(Some)
        .map_err(|reason| InputError::Shape { line, reason })
}

/// Builds a request from a JSON value; `default_id` is used when it carries no `id`.
pub fn request_from_json(value: Value, default_id: &str) -> Result<Request, String> {
    let obj = match value {
        Value::String(s) => return Ok(Request::text(default_id, strip_controls(s))),
        Value::Object(o) => o,
        other => {
            return Err(format!(
                "expected an object with `text` (or a JSON string), got {}",
                kind_of(&other)
            ))
        }
    };
    let mut id = default_id.to_string();
    let mut fields = BTreeMap::new();
    for (k, v) in obj {
        let s = match v {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => continue,
            other => {
                return Err(format!(
                    "field `{k}` must be a string or number, got {}",
                    kind_of(&other)
                ))
            }
        };
        let s = strip_controls(s);
        if k == "id" {
            id = s;
        } else {
            fields.insert(k, s);
        }
    }
    if !fields.contains_key("text") {
        return Err("missing field `text`".into());
    }
    Ok(Request { id, fields })
}

/// Why an MQTT request payload is not a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("request is {bytes} bytes, over the limit of {max_bytes}")]
    TooLarge { bytes: usize, max_bytes: usize },
    #[error("payload is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 { offset: usize },
    #[error("payload is not valid JSON: {reason}")]
    Json { reason: String },
    #[error("{0}")]
    Shape(String),
}

impl PayloadError {
    /// The `kind` of the error record.
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::TooLarge { .. } => "too_large",
            PayloadError::InvalidUtf8 { .. } => "invalid_utf8",
            PayloadError::Json { .. } => "invalid_json",
            PayloadError::Shape(_) => "invalid_request",
        }
    }
}

/// Decodes one MQTT request payload (at most `max_bytes`): a JSON object or string, as in
/// [`request_from_json`]; `default_id` is used when it carries no `id`.
pub fn decode_payload(
    payload: &[u8],
    max_bytes: usize,
    default_id: &str,
) -> Result<Request, PayloadError> {
    decode_payload_with(payload, max_bytes, |v| request_from_json(v, default_id))
}

/// Checks a payload's size and encoding, parses its JSON, and hands it to `parse` (which
/// names what is wrong with its shape).
pub fn decode_payload_with<T>(
    payload: &[u8],
    max_bytes: usize,
    parse: impl FnOnce(Value) -> Result<T, String>,
) -> Result<T, PayloadError> {
    if payload.len() > max_bytes {
        return Err(PayloadError::TooLarge {
            bytes: payload.len(),
            max_bytes,
        });
    }
    let text = std::str::from_utf8(payload).map_err(|e| PayloadError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| PayloadError::Json {
        reason: e.to_string(),
    })?;
    parse(value).map_err(PayloadError::Shape)
}

/// `s` without control characters (C0, DEL, C1) other than tab, line feed and carriage
/// return. A text of nothing else becomes empty, and gets the `empty_text` error.
pub fn strip_controls(s: String) -> String {
    let bad = |c: char| c.is_control() && !matches!(c, '\t' | '\n' | '\r');
    if s.chars().any(bad) {
        s.chars().filter(|&c| !bad(c)).collect()
    } else {
        s
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_strings_and_ids() {
        let r = parse_line(
            r#"{"id":"a1","text":"非常高兴","district":4}"#.as_bytes(),
            1,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.id, "a1");
        assert_eq!(r.fields["text"], "非常高兴");
        assert_eq!(r.fields["district"], "4");
        let r = parse_line(br#""just text""#, 7).unwrap().unwrap();
        assert_eq!(
            (r.id.as_str(), r.fields["text"].as_str()),
            ("7", "just text")
        );
        let r = parse_line(br#"{"id":12,"text":"x"}"#, 2).unwrap().unwrap();
        assert_eq!(r.id, "12");
        assert_eq!(parse_line(b"  \r\n", 3).unwrap(), None);
    }

    #[test]
    fn control_characters_are_removed() {
        let r = parse_line(
            br#"{"id":"c\u0000","text":"\u0000great\u0007 food\u001b[31m\ttoday\u0085"}"#,
            1,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.id, "c");
        assert_eq!(r.fields["text"], "great food[31m\ttoday");
        let r = parse_line(br#""\u0001\u0002""#, 2).unwrap().unwrap();
        assert_eq!(r.fields["text"], "");
        assert_eq!(strip_controls("line\r\nnext".into()), "line\r\nnext");
    }

    #[test]
    fn bad_lines_name_the_line_and_problem() {
        let e = parse_line(b"{\"text\":\"caf\xff\"}", 4).unwrap_err();
        assert_eq!(
            e,
            InputError::InvalidUtf8 {
                line: 4,
                offset: 12
            }
        );
        assert_eq!(e.kind(), "invalid_utf8");
        let e = parse_line(b"{\"text\": ", 5).unwrap_err();
        assert!(matches!(e, InputError::Json { line: 5, .. }), "{e}");
        let e = parse_line(br#"{"id":"x"}"#, 6).unwrap_err();
        assert!(
            e.to_string().contains("line 6") && e.to_string().contains("`text`"),
            "{e}"
        );
        let e = parse_line(br#"{"text":["a"]}"#, 8).unwrap_err();
        assert!(e.to_string().contains("an array"), "{e}");
        let e = parse_line(b"[1,2]", 9).unwrap_err();
        assert!(e.to_string().contains("expected an object"), "{e}");
        let big = format!("{{\"text\":\"{}\"}}", "a".repeat(MAX_LINE_BYTES));
        assert!(parse_line(big.as_bytes(), 10)
            .unwrap_err()
            .to_string()
            .contains("over the limit"));
    }

    #[test]
    fn payloads_decode_or_say_what_is_wrong() {
        let r = decode_payload(br#"{"text":"hi","n":1.5}"#, 100, "dev-1").unwrap();
        assert_eq!((r.id.as_str(), r.fields["n"].as_str()), ("dev-1", "1.5"));
        let cases: [(&[u8], &str, &str); 5] = [
            (
                b"{\"text\":\"0123456789\"}",
                "too_large",
                "over the limit of 16",
            ),
            (b"\"caf\xc3\"", "invalid_utf8", "offset 4"),
            (b"{\"text\":", "invalid_json", "not valid JSON"),
            (b"[[[1]]]", "invalid_request", "an array"),
            (b"{\"id\":\"x\"}", "invalid_request", "missing field `text`"),
        ];
        for (payload, kind, says) in cases {
            let e = decode_payload(payload, 16, "d").unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
