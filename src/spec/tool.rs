//! The tools a ReAct task may allow, by name, and the schema of the argument each takes:
//! part of the task-file format. The tools themselves run in `crate::react::tools`.

use serde::Deserialize;
/// The tools edgeact knows. A task allows a subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    KbSearch,
    Calculator,
    Clock,
    Sensor,
    Notify,
}

impl ToolName {
    pub const ALL: [ToolName; 5] = [
        ToolName::KbSearch,
        ToolName::Calculator,
        ToolName::Clock,
        ToolName::Sensor,
        ToolName::Notify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::KbSearch => "kb_search",
            ToolName::Calculator => "calculator",
            ToolName::Clock => "clock",
            ToolName::Sensor => "sensor",
            ToolName::Notify => "notify",
        }
    }

    pub fn parse(s: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether calling it changes something outside edgeact.
    pub fn side_effecting(self) -> bool {
        matches!(self, ToolName::Notify)
    }
}

impl std::fmt::Display for ToolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What may stand between a tool's brackets. The grammar is built from it, and the step
/// parser checks the same rule.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ArgSchema {
    /// Empty brackets: `clock[]`.
    #[default]
    None,
    /// Free text on one line without `]`, 1..=max_chars characters.
    Text { max_chars: usize },
    /// An arithmetic expression: digits, `+ - * / ^ % ( ) . ,` and spaces.
    Expr { max_chars: usize },
    /// One of the listed names.
    Choice { values: Vec<String> },
    /// A flat JSON object with string values, keys from `keys`.
    Json {
        keys: Vec<String>,
        max_value_chars: usize,
    },
}

/// Characters an `expr` argument may use.
pub const EXPR_CHARS: &str = "0123456789+-*/^%()., ";

impl ArgSchema {
    pub fn validate(&self, tool: ToolName) -> Result<(), String> {
        let ok_for = match tool {
            ToolName::Clock => matches!(self, ArgSchema::None),
            ToolName::KbSearch => matches!(self, ArgSchema::Text { .. }),
            ToolName::Calculator => matches!(self, ArgSchema::Expr { .. }),
            ToolName::Sensor => matches!(self, ArgSchema::Choice { .. }),
            ToolName::Notify => matches!(self, ArgSchema::Json { .. }),
        };
        if !ok_for {
            return Err(format!(
                "this kind of argument does not fit the {tool} tool"
            ));
        }
        match self {
            ArgSchema::Text { max_chars } | ArgSchema::Expr { max_chars } if *max_chars == 0 => {
                Err("max_chars must be at least 1".into())
            }
            ArgSchema::Choice { values } => {
                if values.is_empty() {
                    return Err("values must not be empty".into());
                }
                for v in values {
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(format!("value `{v}`: use letters, digits, _ and -"));
                    }
                }
                Ok(())
            }
            ArgSchema::Json {
                keys,
                max_value_chars,
            } => {
                if keys.is_empty() || *max_value_chars == 0 {
                    return Err("keys must not be empty and max_value_chars at least 1".into());
                }
                for k in keys {
                    if k.is_empty() || !k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        return Err(format!("key `{k}`: use lowercase letters and _"));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Whether `arg` is allowed: the same language as the grammar rule.
    pub fn accepts(&self, arg: &str) -> bool {
        let n = arg.chars().count();
        match self {
            ArgSchema::None => arg.is_empty(),
            ArgSchema::Text { max_chars } => {
                (1..=*max_chars).contains(&n) && !arg.contains([']', '\n'])
            }
            ArgSchema::Expr { max_chars } => {
                (1..=*max_chars).contains(&n) && arg.chars().all(|c| EXPR_CHARS.contains(c))
            }
            ArgSchema::Choice { values } => values.iter().any(|v| v == arg),
            ArgSchema::Json {
                keys,
                max_value_chars,
            } => json_arg_ok(arg, keys, *max_value_chars),
        }
    }
}

/// The grammar's JSON: `{"k": "v", "k2": "v2"}`, keys from the list, values without `"`,
/// `\`, `]` or control characters (newlines included).
fn json_arg_ok(arg: &str, keys: &[String], max_value_chars: usize) -> bool {
    let Some(inner) = arg.strip_prefix('{').and_then(|a| a.strip_suffix('}')) else {
        return false;
    };
    let mut rest = inner;
    let mut first = true;
    loop {
        if !first {
            match rest.strip_prefix(", ") {
                Some(r) => rest = r,
                None => return rest.is_empty(),
            }
        }
        first = false;
        let Some(r) = rest.strip_prefix('"') else {
            return false;
        };
        let Some(key) = keys.iter().find(|k| {
            r.strip_prefix(k.as_str())
                .is_some_and(|t| t.starts_with("\": \""))
        }) else {
            return false;
        };
        let r = &r[key.len() + 4..];
        let Some(end) = r.find('"') else {
            return false;
        };
        let value = &r[..end];
        // JSON forbids raw control characters in a string: the notify tool could not read
        // the argument (the grammar excludes them too).
        if value.chars().count() > max_value_chars
            || value.contains(['\\', ']'])
            || value.chars().any(|c| c < ' ')
        {
            return false;
        }
        rest = &r[end + 1..];
    }
}
