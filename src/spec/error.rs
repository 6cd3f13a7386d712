//! The one error type of the spec layer: a task file that cannot be found, read, parsed or
//! validated, whichever kind it is (classify, rank or ReAct).

use std::path::PathBuf;

use crate::util::invalid::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// No task file by that name. `what` is "task", or "ReAct task" when the caller asked
    /// for a ReAct task (the message says which kind was looked for).
    #[error("unknown {what} `{name}`: no {name}.toml in {searched}")]
    Unknown {
        what: &'static str,
        name: String,
        searched: String,
    },
    #[error("cannot read task file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the shape of its kind (a missing or unknown key).
    #[error("task file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key whose value is wrong: `task file {path}: `{key}`: {reason}`.
    #[error("task file {0}")]
    Invalid(#[from] Invalid),
}

impl SpecError {
    pub(crate) fn invalid(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> SpecError {
        SpecError::Invalid(Invalid::new(path, key, reason))
    }

    /// A TOML error of the file at `path`, on one line.
    pub(crate) fn parse(path: impl Into<PathBuf>, e: &toml::de::Error) -> SpecError {
        SpecError::Parse {
            path: path.into(),
            message: e.to_string().trim().replace('\n', " "),
        }
    }
}
