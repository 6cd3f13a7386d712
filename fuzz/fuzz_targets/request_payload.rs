//! Fuzz target: the MQTT request payload decoder (`input::decode_payload`) and the JSON-lines
//! parser (`input::parse_line`) on arbitrary bytes. Either a request with a `text` field or
//! an error; and the two agree on a payload that is one non-blank line.

#![no_main]

use edgeact::classify::input::{decode_payload, parse_line, MAX_LINE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = decode_payload(data, MAX_LINE_BYTES, "dev-1");
    if let Ok(r) = &decoded {
        assert!(r.fields.contains_key("text"), "a request without text");
        assert!(
            !r.fields.contains_key("id"),
            "the id is not a template field"
        );
    }
    if let Err(e) = &decoded {
        // Every refusal has a kind and a message for the error record.
        assert!(!e.kind().is_empty() && !e.to_string().is_empty());
    }
    let line = parse_line(data, 7);
    if let Err(e) = &line {
        assert_eq!(e.line(), 7);
        assert!(e.to_string().starts_with("line 7: "), "{e}");
    }
    let one_line = !data.contains(&b'\n')
        && !data.contains(&b'\r')
        && std::str::from_utf8(data).is_ok_and(|s| !s.trim().is_empty());
    if one_line {
        match (&decoded, &line) {
            (Ok(a), Ok(Some(b))) => {
                assert_eq!(a.fields, b.fields);
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("decode_payload {a:?} but parse_line {b:?}"),
        }
    }
});
