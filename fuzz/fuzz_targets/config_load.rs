//! Fuzz target: config loading from text: board profiles (parse and validate), task files
//! (with their [monitor] and [rank] sections) and ReAct task files. Each is a value or an
//! error naming the file; a valid one also survives its own checks again.

#![no_main]

use std::path::Path;

use edgeact::model::config::{parse_board, validate, ConfigError};
use edgeact::monitor::MonitorConfig;
use edgeact::rank::RankConfig;
use edgeact::spec::react::{is_react_file, ReactSpec};
use edgeact::spec::{SpecError, Task};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/fuzz/input.toml");
    match parse_board(src, path) {
        Ok(b) => match validate(b, path) {
            Ok(c) => {
                assert!((1..=256).contains(&c.threads));
                assert!(c.n_ubatch <= c.n_batch && c.n_batch <= c.n_ctx);
                assert!(c.max_logit_rows >= 1 && c.max_logit_rows <= c.n_batch);
            }
            Err(e) => assert!(matches!(e, ConfigError::Invalid(_))),
        },
        Err(e) => assert!(e.to_string().starts_with("/nonexistent/fuzz/input.toml: ")),
    }
    match Task::parse(src, path, "input") {
        Ok(t) => {
            assert!(t.labels.len() >= 2);
            assert!(t.query.fields().contains(&"text"));
            // The prefix renders; the file the task writes reads back to the same prompts.
            let prefix = t.render_prefix();
            let again = Task::parse(&t.to_toml(), path, "input").expect("to_toml reads back");
            assert_eq!(again.render_prefix(), prefix);
            if let Ok(Some(m)) = MonitorConfig::from_task(&t) {
                let _ = m.validate(path, Some(&t));
            }
            let _ = RankConfig::from_task(&t);
        }
        Err(e) => {
            let s = e.to_string();
            assert!(s.contains("/nonexistent/fuzz/input.toml"), "{s}");
            assert!(!matches!(e, SpecError::Unknown { .. }));
        }
    }
    let react = ReactSpec::parse(src, path, "input");
    if react.is_ok() {
        assert!(is_react_file(src));
    }
});
