//! GBNF grammars built from a task: the ReAct step (`Thought:` then an allow-listed
//! `Action: tool[arg]` or `Final Answer:`) and the `qa` answer with a citation of one of the
//! retrieved passage ids. llama.cpp's grammar sampler enforces them token by token.

use crate::spec::react::ReactSpec;
use crate::spec::tool::{ArgSchema, ToolName};

/// A GBNF string literal for `s`.
pub fn lit(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The GBNF of an argument schema (between the brackets).
fn arg_rule(schema: &ArgSchema) -> String {
    match schema {
        ArgSchema::None => "\"\"".into(),
        ArgSchema::Text { max_chars } => format!("[^\\]\\n]{{1,{max_chars}}}"),
        // '-' last in the class is a literal.
        ArgSchema::Expr { max_chars } => format!("[0-9+*/^%()., -]{{1,{max_chars}}}"),
        ArgSchema::Choice { values } => {
            let alts: Vec<String> = values.iter().map(|v| lit(v)).collect();
            format!("( {} )", alts.join(" | "))
        }
        ArgSchema::Json {
            keys,
            max_value_chars,
        } => {
            let alts: Vec<String> = keys.iter().map(|k| lit(&format!("{k}\": \""))).collect();
            let pair = format!(
                "\"\\\"\" ( {} ) [^\"\\\\\\]\\x00-\\x1f]{{0,{max_value_chars}}} \"\\\"\"",
                alts.join(" | ")
            );
            format!(
                "\"{{\" {pair} ( \", \" {pair} ){{0,{}}} \"}}\"",
                keys.len() - 1
            )
        }
    }
}

fn rule_name(t: ToolName) -> String {
    format!("tool-{}", t.as_str().replace('_', "-"))
}

/// The step grammar of `spec`: only its tools, only arguments that fit their schemas, a
/// bounded thought and answer, each line ended by a newline.
pub fn step_grammar(spec: &ReactSpec) -> String {
    let mut g = String::new();
    g.push_str("root ::= \"Thought: \" thought \"\\n\" ( action | final )\n");
    g.push_str(&format!(
        "thought ::= [^\\n]{{1,{}}}\n",
        spec.max_thought_chars
    ));
    g.push_str(&format!(
        "final ::= \"Final Answer: \" [^\\n]{{1,{}}} \"\\n\"\n",
        spec.max_answer_chars
    ));
    let names: Vec<String> = spec.tools.iter().map(|t| rule_name(t.name)).collect();
    g.push_str(&format!(
        "action ::= \"Action: \" ( {} ) \"\\n\"\n",
        names.join(" | ")
    ));
    for t in &spec.tools {
        g.push_str(&format!(
            "{} ::= {} {} \"]\"\n",
            rule_name(t.name),
            lit(&format!("{}[", t.name)),
            arg_rule(&t.arg)
        ));
    }
    g
}

/// The `qa` answer: ` <text> [<id>]` where the id is one of `ids` (the retrieved passages).
pub fn qa_grammar(ids: &[String], max_answer_chars: usize) -> String {
    let alts: Vec<String> = ids.iter().map(|i| lit(i)).collect();
    format!(
        "root ::= \" \" [^\\n\\[\\]]{{1,{max_answer_chars}}} \" [\" ( {} ) \"]\\n\"\n",
        alts.join(" | ")
    )
}

/// One argument and the closing `]` and newline: constrained generation of an argument
/// after `Action: name[`.
pub fn arg_grammar(schema: &ArgSchema) -> String {
    format!("root ::= {} \"]\\n\"\n", arg_rule(schema))
}

/// A thought line after `Thought:`: a space, at most `max_chars` characters, a newline.
pub fn thought_grammar(max_chars: usize) -> String {
    format!("root ::= \" \" [^\\n]{{1,{max_chars}}} \"\\n\"\n")
}

/// How the prompt shows a tool's call shape: `kb_search[text]`, `clock[]`, …
pub fn signature(name: ToolName, schema: &ArgSchema) -> String {
    let arg = match schema {
        ArgSchema::None => String::new(),
        ArgSchema::Text { .. } => "text".into(),
        ArgSchema::Expr { .. } => "expression".into(),
        ArgSchema::Choice { values } => values.join("|"),
        ArgSchema::Json { keys, .. } => {
            let pairs: Vec<String> = keys.iter().map(|k| format!("\"{k}\": \"...\"")).collect();
            format!("{{{}}}", pairs.join(", "))
        }
    };
    format!("{name}[{arg}]")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::react::tests_support::spec;

    #[test]
    fn step_grammar_lists_only_allowed_tools() {
        let s = spec();
        let g = step_grammar(&s);
        assert!(
            g.contains("tool-kb-search ::= \"kb_search[\" [^\\]\\n]{1,60} \"]\""),
            "{g}"
        );
        assert!(g.contains("tool-calculator ::= \"calculator[\""), "{g}");
        assert!(g.contains("tool-clock ::= \"clock[\" \"\" \"]\""), "{g}");
        assert!(!g.contains("notify"), "{g}");
        assert!(g.contains("thought ::= [^\\n]{1,160}"), "{g}");
        assert!(g.starts_with("root ::= \"Thought: \""));
        // Every rule used is defined.
        for name in ["thought", "action", "final", "tool-kb-search"] {
            assert!(g.contains(&format!("\n{name} ::=")), "{name} in {g}");
        }
    }

    #[test]
    fn literals_and_json_arguments_are_escaped() {
        assert_eq!(lit("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        let r = arg_rule(&ArgSchema::Json {
            keys: vec!["reason".into(), "contact".into()],
            max_value_chars: 40,
        });
        assert_eq!(
            r,
            "\"{\" \"\\\"\" ( \"reason\\\": \\\"\" | \"contact\\\": \\\"\" ) [^\"\\\\\\]\\x00-\\x1f]{0,40} \"\\\"\" ( \", \" \"\\\"\" ( \"reason\\\": \\\"\" | \"contact\\\": \\\"\" ) [^\"\\\\\\]\\x00-\\x1f]{0,40} \"\\\"\" ){0,1} \"}\""
        );
        let r = arg_rule(&ArgSchema::Choice {
            values: vec!["door".into(), "temperature".into()],
        });
        assert_eq!(r, "( \"door\" | \"temperature\" )");
    }

    #[test]
    fn qa_grammar_cites_only_retrieved_ids() {
        let g = qa_grammar(&["hours-sunday".into(), "returns".into()], 200);
        assert!(g.contains("( \"hours-sunday\" | \"returns\" )"), "{g}");
        assert!(g.contains("{1,200}"));
    }

    #[test]
    fn signatures_show_the_call_shape() {
        assert_eq!(signature(ToolName::Clock, &ArgSchema::None), "clock[]");
        assert_eq!(
            signature(ToolName::KbSearch, &ArgSchema::Text { max_chars: 5 }),
            "kb_search[text]"
        );
        assert_eq!(
            signature(
                ToolName::Notify,
                &ArgSchema::Json {
                    keys: vec!["reason".into()],
                    max_value_chars: 5
                }
            ),
            "notify[{\"reason\": \"...\"}]"
        );
    }
}
