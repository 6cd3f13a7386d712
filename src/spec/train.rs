//! The `[train]` table of a learned task file: where its train and dev rows come from
//! (labeled JSON lines and the split names, as `edgeact tune` chose them), so a retrain from
//! feedback (`edgeact learn`, `serve`'s feedback topic) rebuilds the same rows, adds the
//! corrections to the train rows and compares old and new on the same dev rows.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SpecError;

/// `[train]`: the data a task's head or stack was fitted on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSource {
    /// Labeled JSON lines (`{"text", "label", "split"}`), relative to the task file's
    /// folder or absolute.
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    /// Train rows per label (the first ones of the train split); absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<usize>,
    /// Dev rows at most (an evenly spaced sample); absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_limit: Option<usize>,
}

impl TrainSource {
    /// The `[train]` table of a `tune` run: `data` made absolute (the task file usually goes
    /// to another folder); `per_class` and `dev_limit` usize::MAX (all rows) are left out.
    pub fn of_run(
        data: &Path,
        train_split: &str,
        dev_split: &str,
        per_class: usize,
        dev_limit: usize,
    ) -> TrainSource {
        let given = |n: usize| (n != usize::MAX).then_some(n);
        TrainSource {
            data: std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf()),
            train_split: train_split.to_string(),
            dev_split: dev_split.to_string(),
            per_class: given(per_class),
            dev_limit: given(dev_limit),
        }
    }

    /// Checks the values; `has_head`: whether the task has a `[head]` (the only thing
    /// `[train]` is for).
    pub(super) fn validate(&self, path: &Path, has_head: bool) -> Result<(), SpecError> {
        let invalid = |key: &str, reason: &str| SpecError::invalid(path, key, reason);
        if !has_head {
            return Err(invalid(
                "train",
                "says where a learned method's rows come from, but the task has no [head]",
            ));
        }
        if self.data.as_os_str().is_empty() {
            return Err(invalid("train.data", "must name a labeled JSON-lines file"));
        }
        for (key, v) in [
            ("train.train_split", &self.train_split),
            ("train.dev_split", &self.dev_split),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.train_split == self.dev_split {
            return Err(invalid(
                "train.dev_split",
                "must differ from train_split (old and new are compared on rows neither saw)",
            ));
        }
        for (key, v) in [
            ("train.per_class", self.per_class),
            ("train.dev_limit", self.dev_limit),
        ] {
            if v == Some(0) {
                return Err(invalid(
                    key,
                    "must be at least 1 (leave it out for all rows)",
                ));
            }
        }
        Ok(())
    }

    /// The data file, resolved against the task file's folder.
    pub fn data_path(&self, task_path: &Path) -> PathBuf {
        match task_path.parent() {
            Some(dir) if self.data.is_relative() => dir.join(&self.data),
            _ => self.data.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::spec::Task;
    use std::path::Path;

    const BASE: &str = "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\nlabels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n";

    fn parse(extra: &str) -> Result<Task, String> {
        Task::parse(&format!("{BASE}{extra}"), Path::new("tasks/t.toml"), "t")
            .map_err(|e| e.to_string())
    }

    const HEAD: &str = "[head]\nfile = \"t.stack.json\"\nmethod = \"tfidf\"\n";

    #[test]
    fn a_train_source_round_trips_and_resolves_against_the_task_folder() {
        let t = parse(&format!(
            "{HEAD}[train]\ndata = \"../data/x.jsonl\"\ntrain_split = \"train\"\ndev_split = \"dev\"\nper_class = 8\n"
        ))
        .unwrap();
        let src = t.train.clone().unwrap();
        assert_eq!(src.per_class, Some(8));
        assert_eq!(src.dev_limit, None);
        assert_eq!(
            src.data_path(&t.path),
            Path::new("tasks").join("../data/x.jsonl")
        );
        let back = Task::parse(&t.to_toml(), &t.path, "t").unwrap();
        assert_eq!(back.train, t.train);
    }

    #[test]
    fn bad_train_sources_name_the_key() {
        let cases = [
            (
                "[train]\ndata = \"x\"\ntrain_split = \"train\"\ndev_split = \"dev\"\n".to_string(),
                "no [head]",
            ),
            (
                format!("{HEAD}[train]\ndata = \"\"\ntrain_split = \"train\"\ndev_split = \"dev\"\n"),
                "train.data",
            ),
            (
                format!("{HEAD}[train]\ndata = \"x\"\ntrain_split = \"train\"\ndev_split = \"train\"\n"),
                "must differ",
            ),
            (
                format!("{HEAD}[train]\ndata = \"x\"\ntrain_split = \" \"\ndev_split = \"dev\"\n"),
                "train.train_split",
            ),
            (
                format!("{HEAD}[train]\ndata = \"x\"\ntrain_split = \"a\"\ndev_split = \"b\"\nper_class = 0\n"),
                "train.per_class",
            ),
            (
                format!("{HEAD}[train]\ndata = \"x\"\ntrain_split = \"a\"\ndev_split = \"b\"\nsplit = \"c\"\n"),
                "unknown field",
            ),
        ];
        for (extra, want) in cases {
            let e = parse(&extra).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }
}
