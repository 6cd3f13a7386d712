//! Fuzz target: the ReAct step parsers on model output (arbitrary text). The strict parser
//! accepts exactly the grammar's language, so whatever it accepts prints back to the same
//! text, names an allowed tool, and has an argument the tool can use: a `notify` argument is
//! a JSON object of strings with the schema's keys, a `calculator` argument evaluates
//! without a panic. The loose (regex) parser and the trajectory splitter never panic, and
//! neither does the calculator on any expression of its characters.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use edgeact::spec::react::ReactSpec;
use edgeact::spec::step::{parse_step, parse_step_loose, split_trajectory, StepAction};
use edgeact::react::tools::calculate;
use edgeact::spec::tool::{ArgSchema, ToolName, EXPR_CHARS};
use libfuzzer_sys::fuzz_target;

fn kiosk() -> &'static ReactSpec {
    static S: OnceLock<ReactSpec> = OnceLock::new();
    S.get_or_init(|| {
        ReactSpec::parse(
            include_str!("../../tasks/kiosk.toml"),
            Path::new("tasks/kiosk.toml"),
            "kiosk",
        )
        .expect("the shipped kiosk task parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let spec = kiosk();
    if let Ok(step) = parse_step(text, spec) {
        let printed = match &step.action {
            StepAction::Final(a) => format!("Thought: {}\nFinal Answer: {a}\n", step.thought),
            StepAction::Tool { tool, arg } => {
                format!("Thought: {}\nAction: {tool}[{arg}]\n", step.thought)
            }
        };
        assert_eq!(printed, text);
        if let StepAction::Tool { tool, arg } = &step.action {
            let name = ToolName::parse(tool).expect("an accepted tool has a known name");
            let schema = &spec.tool(name).expect("an accepted tool is allowed").arg;
            match (name, schema) {
                (ToolName::Notify, ArgSchema::Json { keys, .. }) => {
                    let v: serde_json::Value = serde_json::from_str(arg).unwrap_or_else(|e| {
                        panic!("notify accepted {arg:?}, which is not JSON: {e}")
                    });
                    let obj = v.as_object().expect("a JSON object");
                    for (k, v) in obj {
                        assert!(keys.contains(k) && v.is_string(), "{arg:?}");
                    }
                }
                (ToolName::Calculator, _) => {
                    let _ = calculate(arg);
                }
                _ => {}
            }
        }
    }
    let _ = parse_step_loose(text);
    if let Ok(steps) = split_trajectory(text) {
        for (s, _) in steps {
            assert!(s.starts_with("Thought: ") && s.ends_with('\n'));
        }
    }
    if !text.is_empty() && text.chars().all(|c| EXPR_CHARS.contains(c)) {
        let _ = calculate(text);
    }
});
