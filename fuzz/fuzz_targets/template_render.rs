//! Fuzz target: template parsing and rendering with hostile field values. The first part
//! of the input (up to a 0xff byte) is a query template, the rest a field value. A value is
//! pasted verbatim, never expanded (a `{label}` or `}}` in it stays as written), and the
//! fixed prompt prefix does not depend on the request.

#![no_main]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use edgeact::spec::{Task, Template};
use libfuzzer_sys::fuzz_target;

fn sentiment() -> &'static (Task, String) {
    static T: OnceLock<(Task, String)> = OnceLock::new();
    T.get_or_init(|| {
        let src = include_str!("../../tasks/sentiment.toml");
        let t = Task::parse(src, Path::new("tasks/sentiment.toml"), "sentiment")
            .expect("the shipped sentiment task parses");
        let prefix = t.render_prefix();
        (t, prefix)
    })
}

fuzz_target!(|data: &[u8]| {
    let (src, value) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let src = String::from_utf8_lossy(src);
    let value = String::from_utf8_lossy(value);

    // Any template: parse, then render with every field set to "", "\u{1}" and the value.
    if let Ok(t) = Template::parse(&src) {
        let empty = t.render(|_| Some("")).expect("every field given");
        let one = t.render(|_| Some("\u{1}")).expect("every field given");
        let uses = one.len() - empty.len();
        let hostile = t.render(|_| Some(&value)).expect("every field given");
        assert_eq!(hostile.len(), empty.len() + uses * value.len());
        // A field it cannot give is an error naming a field of the template.
        if let Err(f) = t.render(|_| None) {
            assert!(t.fields().contains(&f.as_str()));
        } else {
            assert!(t.fields().is_empty());
        }
    }

    // The shipped task with hostile values in `text` and another field.
    let (task, prefix) = sentiment();
    let mut fields = BTreeMap::new();
    fields.insert("text".to_string(), value.to_string());
    fields.insert("label".to_string(), src.to_string());
    let q = task.render_query(&fields).expect("text is given");
    assert!(q.contains(value.as_ref()));
    let plain = task
        .render_query(&BTreeMap::from([("text".to_string(), String::new())]))
        .expect("text is given");
    assert_eq!(q.len(), plain.len() + value.len());
    assert_eq!(&task.render_prefix(), prefix);
});
