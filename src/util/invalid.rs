//! "This key of this file is invalid": the one shape every layer's loader reports a bad
//! value in, so the path, the key and the reason read the same way everywhere. Each layer
//! keeps its own error enum and carries this as a variant (with its own prefix, such as
//! `task file `).

use std::path::PathBuf;

/// A value at `key` (a dotted TOML key, such as `abstain.min_confidence` or `labels[2]`)
/// in the file at `path` is invalid for `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: `{key}`: {reason}", path.display())]
pub struct Invalid {
    pub path: PathBuf,
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Invalid {
            path: path.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_file_and_the_key() {
        let e = Invalid::new("tasks/t.toml", "input.max_tokens", "must be at least 1");
        assert_eq!(
            e.to_string(),
            "tasks/t.toml: `input.max_tokens`: must be at least 1"
        );
    }
}
