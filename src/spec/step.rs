//! One ReAct step as text: `Thought: …` then `Action: tool[arg]` or `Final Answer: …`.
//! The strict parser accepts exactly the language of the task's grammar (so a
//! grammar-guarded step that fails it is a bug, and is counted); the loose parser is the
//! regex parsing peers use on free text, kept as the no-grammar baseline.

use std::sync::OnceLock;

use regex::Regex;

use super::react::ReactSpec;
use super::tool::ToolName;

/// What a step does after its thought.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepAction {
    /// Call a tool. `tool` is the name as written (the loose parser may give one that is
    /// not a tool, or not allowed: it is then refused, never run).
    Tool {
        tool: String,
        arg: String,
    },
    Final(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub thought: String,
    pub action: StepAction,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    #[error("does not start with `Thought: `")]
    NoThought,
    #[error("the thought is empty or longer than {max} characters")]
    ThoughtLength { max: usize },
    #[error("the thought line is not followed by `Action: ` or `Final Answer: `")]
    NoAction,
    #[error("the step does not end with a newline after its action")]
    Unterminated,
    #[error("the answer is empty or longer than {max} characters")]
    AnswerLength { max: usize },
    #[error("`{0}` is not a tool of this task")]
    UnknownTool(String),
    #[error("no `[argument]` after the tool name")]
    NoBrackets,
    #[error("argument `{arg}` does not fit the schema of {tool}")]
    BadArgument { tool: String, arg: String },
    #[error("both an Action and a Final Answer")]
    Both,
}

/// Parses `text` as the grammar generates it: `Thought: T\n` then `Action: tool[arg]\n`
/// (an allowed tool, an argument that fits its schema) or `Final Answer: A\n`.
pub fn parse_step(text: &str, spec: &ReactSpec) -> Result<Step, StepError> {
    let rest = text.strip_prefix("Thought: ").ok_or(StepError::NoThought)?;
    let (thought, rest) = rest.split_once('\n').ok_or(StepError::NoAction)?;
    let n = thought.chars().count();
    if n == 0 || n > spec.max_thought_chars {
        return Err(StepError::ThoughtLength {
            max: spec.max_thought_chars,
        });
    }
    let line = rest.strip_suffix('\n').ok_or(StepError::Unterminated)?;
    if line.contains('\n') {
        return Err(StepError::Unterminated);
    }
    let action = if let Some(answer) = line.strip_prefix("Final Answer: ") {
        let n = answer.chars().count();
        if n == 0 || n > spec.max_answer_chars {
            return Err(StepError::AnswerLength {
                max: spec.max_answer_chars,
            });
        }
        StepAction::Final(answer.to_string())
    } else if let Some(call) = line.strip_prefix("Action: ") {
        let (name, arg) = call.split_once('[').ok_or(StepError::NoBrackets)?;
        let arg = arg.strip_suffix(']').ok_or(StepError::NoBrackets)?;
        let tool = ToolName::parse(name)
            .and_then(|t| spec.tool(t))
            .ok_or_else(|| StepError::UnknownTool(name.to_string()))?;
        if !tool.arg.accepts(arg) {
            return Err(StepError::BadArgument {
                tool: name.to_string(),
                arg: arg.to_string(),
            });
        }
        StepAction::Tool {
            tool: name.to_string(),
            arg: arg.to_string(),
        }
    } else {
        return Err(StepError::NoAction);
    };
    Ok(Step {
        thought: thought.to_string(),
        action,
    })
}

fn re(cell: &'static OnceLock<Regex>, src: &str) -> &'static Regex {
    // The patterns are constants, checked by the unit tests: they compile.
    cell.get_or_init(|| Regex::new(src).expect("constant regex"))
}

/// The peers' way: regexes over free text. `Action: name[arg]` anywhere, or
/// `Final Answer: …` to the end of its line; both, or neither, is a parse failure.
pub fn parse_step_loose(text: &str) -> Result<Step, StepError> {
    static ACTION: OnceLock<Regex> = OnceLock::new();
    static FINAL: OnceLock<Regex> = OnceLock::new();
    static THOUGHT: OnceLock<Regex> = OnceLock::new();
    let action = re(&ACTION, r"Action\s*:\s*([A-Za-z_][\w-]*)\s*\[([^\]\n]*)\]").captures(text);
    let fin = re(&FINAL, r"Final Answer\s*:\s*([^\n]+)").captures(text);
    let thought = re(&THOUGHT, r"^\s*(?:Thought\s*:\s*)?([^\n]*)")
        .captures(text)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().trim().to_string())
        .unwrap_or_default();
    let action = match (action, fin) {
        (Some(_), Some(_)) => return Err(StepError::Both),
        (None, None) => {
            return Err(if text.contains("Action") {
                StepError::NoBrackets
            } else {
                StepError::NoAction
            })
        }
        (Some(a), None) => StepAction::Tool {
            tool: a[1].to_string(),
            arg: a[2].trim().to_string(),
        },
        (None, Some(f)) => StepAction::Final(f[1].trim().to_string()),
    };
    Ok(Step { thought, action })
}

/// Splits a few-shot trajectory into steps (`Thought:` up to the action line, newline
/// included) and the observation that follows each, if any.
pub fn split_trajectory(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    let mut cur = String::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(obs) = line.strip_prefix("Observation: ") {
            if cur.is_empty() {
                return Err(format!(
                    "line {}: an Observation with no step before it",
                    i + 1
                ));
            }
            out.push((std::mem::take(&mut cur), Some(obs.to_string())));
        } else if line.starts_with("Thought: ") {
            if !cur.is_empty() {
                out.push((std::mem::take(&mut cur), None));
            }
            cur.push_str(line);
            cur.push('\n');
        } else if cur.is_empty() {
            return Err(format!(
                "line {}: expected `Thought: ` or `Observation: `, found `{line}`",
                i + 1
            ));
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    if !cur.is_empty() {
        out.push((cur, None));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::react::tests_support::spec;

    #[test]
    fn strict_parser_accepts_the_grammar_language() {
        let s = spec();
        let st = parse_step(
            "Thought: I should look it up.\nAction: kb_search[sunday hours]\n",
            &s,
        )
        .unwrap();
        assert_eq!(st.thought, "I should look it up.");
        assert_eq!(
            st.action,
            StepAction::Tool {
                tool: "kb_search".into(),
                arg: "sunday hours".into()
            }
        );
        let st = parse_step("Thought: Done.\nFinal Answer: 10:00 to 16:00.\n", &s).unwrap();
        assert_eq!(st.action, StepAction::Final("10:00 to 16:00.".into()));
        assert!(parse_step("Thought: t\nAction: clock[]\n", &s).is_ok());
        assert!(parse_step("Thought: t\nAction: calculator[3 * 2.5]\n", &s).is_ok());
    }

    #[test]
    fn strict_parser_rejects_malformed_steps() {
        let s = spec();
        let bad = [
            ("I think\nFinal Answer: x\n", StepError::NoThought),
            ("Thought: x\nAnswer: y\n", StepError::NoAction),
            ("Thought: x\nFinal Answer: y", StepError::Unterminated),
            (
                "Thought: \nFinal Answer: y\n",
                StepError::ThoughtLength { max: 160 },
            ),
            (
                "Thought: x\nAction: shell[rm -rf /]\n",
                StepError::UnknownTool("shell".into()),
            ),
            (
                // A real tool, but not on this task's allow-list.
                "Thought: x\nAction: notify[{\"reason\": \"x\"}]\n",
                StepError::UnknownTool("notify".into()),
            ),
            (
                "Thought: x\nAction: kb_search hours\n",
                StepError::NoBrackets,
            ),
            (
                "Thought: x\nAction: calculator[2 + two]\n",
                StepError::BadArgument {
                    tool: "calculator".into(),
                    arg: "2 + two".into(),
                },
            ),
            (
                "Thought: x\nAction: clock[now]\n",
                StepError::BadArgument {
                    tool: "clock".into(),
                    arg: "now".into(),
                },
            ),
            (
                "Thought: x\nFinal Answer: y\nObservation: z\n",
                StepError::Unterminated,
            ),
        ];
        for (text, want) in bad {
            assert_eq!(parse_step(text, &s), Err(want), "{text:?}");
        }
    }

    #[test]
    fn loose_parser_is_the_regex_baseline() {
        let st = parse_step_loose("Thought: hmm\nAction: kb_search [ lost card ]\nblah").unwrap();
        assert_eq!(
            st.action,
            StepAction::Tool {
                tool: "kb_search".into(),
                arg: "lost card".into()
            }
        );
        assert_eq!(st.thought, "hmm");
        let st = parse_step_loose(" we close at six.\nFinal Answer: 18:00\n").unwrap();
        assert_eq!(st.action, StepAction::Final("18:00".into()));
        assert_eq!(
            parse_step_loose("Thought: x\nAction: kb_search\n"),
            Err(StepError::NoBrackets)
        );
        assert_eq!(parse_step_loose("I am not sure."), Err(StepError::NoAction));
        assert_eq!(
            parse_step_loose("Action: clock[]\nFinal Answer: noon"),
            Err(StepError::Both)
        );
        // The loose parser returns any name; the toolbox refuses it.
        let st = parse_step_loose("Action: shell[ls]").unwrap();
        assert_eq!(
            st.action,
            StepAction::Tool {
                tool: "shell".into(),
                arg: "ls".into()
            }
        );
    }

    #[test]
    fn trajectories_split_into_steps_and_observations() {
        let t = "Thought: a\nAction: clock[]\nObservation: Sunday\n\nThought: b\nFinal Answer: c\n";
        let steps = split_trajectory(t).unwrap();
        assert_eq!(
            steps,
            vec![
                (
                    "Thought: a\nAction: clock[]\n".to_string(),
                    Some("Sunday".to_string())
                ),
                ("Thought: b\nFinal Answer: c\n".to_string(), None),
            ]
        );
        assert!(split_trajectory("Observation: x\n").is_err());
        assert!(split_trajectory("Question: x\n").is_err());
    }
}
