//! The one task-file loader: find a file by name or path, read it once, tell its kind once
//! (`type = "react"`, a `[rank]` section, or neither) and parse it as that kind.

use std::path::{Path, PathBuf};

use super::react::ReactSpec;
use super::task::Task;
use super::SpecError;

/// A loaded, validated task file of any kind.
#[derive(Debug, Clone)]
pub enum TaskFile {
    /// Label scoring: a task file without `[rank]`.
    Classify(Task),
    /// Ranking: a classification-style task file with a `[rank]` section. Only the
    /// classification part is validated here; the section is checked by
    /// `crate::rank::RankConfig::from_task` (the ranking layer owns its format).
    Rank(Task),
    /// The ReAct loop: a task file with `type = "react"`.
    React(ReactSpec),
}

impl TaskFile {
    /// Finds `name` as a path (contains `/` or ends in `.toml`) or as `<dir>/<name>.toml`
    /// in the first of `dirs` that has it, and loads it.
    pub fn find(name: &str, dirs: &[PathBuf]) -> Result<TaskFile, SpecError> {
        TaskFile::load(&locate(name, dirs, "task")?)
    }

    pub fn load(path: &Path) -> Result<TaskFile, SpecError> {
        let (src, stem) = read(path)?;
        TaskFile::parse(&src, path, &stem)
    }

    /// Parses the text of the file at `path` as the kind it declares; `default_name` names
    /// a task whose file has no `name`.
    pub fn parse(src: &str, path: &Path, default_name: &str) -> Result<TaskFile, SpecError> {
        if is_react_file(src) {
            return ReactSpec::parse(src, path, default_name).map(TaskFile::React);
        }
        let task = Task::parse_classify(src, path, default_name)?;
        Ok(if task.rank.is_some() {
            TaskFile::Rank(task)
        } else {
            TaskFile::Classify(task)
        })
    }

    pub fn name(&self) -> &str {
        match self {
            TaskFile::Classify(t) | TaskFile::Rank(t) => &t.name,
            TaskFile::React(s) => &s.name,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            TaskFile::Classify(t) | TaskFile::Rank(t) => &t.path,
            TaskFile::React(s) => &s.path,
        }
    }
}

/// True when a task file declares `type = "react"`. The one place the kind is sniffed: a
/// file that is not TOML is not a ReAct file (its parse error then comes from the
/// classification parser, as it always has).
pub fn is_react_file(src: &str) -> bool {
    toml::from_str::<toml::Table>(src)
        .ok()
        .and_then(|t| t.get("type").and_then(|v| v.as_str()).map(|s| s == "react"))
        .unwrap_or(false)
}

/// Where a task file named `name` is: the name itself when it is a path (contains `/` or
/// ends in `.toml`), else `<dir>/<name>.toml` in the first of `dirs` that has it.
pub fn find_task_file(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    if name.contains('/') || name.ends_with(".toml") {
        return Some(PathBuf::from(name));
    }
    dirs.iter()
        .map(|d| d.join(format!("{name}.toml")))
        .find(|p| p.is_file())
}

/// The task folders searched, for "unknown task" errors.
pub fn searched_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`find_task_file`], or an "unknown `what`" error listing the folders searched.
pub(super) fn locate(
    name: &str,
    dirs: &[PathBuf],
    what: &'static str,
) -> Result<PathBuf, SpecError> {
    find_task_file(name, dirs).ok_or_else(|| SpecError::Unknown {
        what,
        name: name.into(),
        searched: searched_dirs(dirs),
    })
}

/// The file's text and its stem (the task's name when the file gives none).
pub(super) fn read(path: &Path) -> Result<(String, String), SpecError> {
    let src = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
        path: path.into(),
        source,
    })?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((src, stem))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLASSIFY: &str = r#"
instruction = "Classify."
query = "Text: {text}\nLabel:"
labels = [{ name = "yes", text = " yes" }, { name = "no", text = " no" }]
"#;

    fn parse(src: &str) -> Result<TaskFile, SpecError> {
        TaskFile::parse(src, Path::new("tasks/t.toml"), "t")
    }

    #[test]
    fn react_files_are_recognised() {
        assert!(is_react_file(super::super::react::tests_support::SPEC));
        assert!(!is_react_file("instruction = \"x\""));
        assert!(!is_react_file("not toml ["));
    }

    #[test]
    fn the_kind_is_told_once_from_the_file() {
        assert!(matches!(parse(CLASSIFY), Ok(TaskFile::Classify(_))));
        let rank = format!("{CLASSIFY}\n[rank]\ntop_k = 3\n");
        assert!(matches!(parse(&rank), Ok(TaskFile::Rank(_))));
        let react = parse(super::super::react::tests_support::SPEC).unwrap();
        assert!(matches!(react, TaskFile::React(_)));
        assert_eq!(react.name(), "unit");
        assert_eq!(react.path(), Path::new("tasks/t.toml"));
        // A broken ReAct file reports the ReAct parser's error, not a classify one.
        let e = parse(&format!(
            "{}\nfoo = 1",
            super::super::react::tests_support::SPEC
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("foo") && !e.contains("a ReAct task"), "{e}");
    }

    #[test]
    fn errors_keep_their_messages() {
        let e = Task::parse(
            super::super::react::tests_support::SPEC,
            Path::new("tasks/k.toml"),
            "k",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task file tasks/k.toml: `type`: a ReAct task: use `edgeact react` or `edgeact qa`"
        );
        let e = TaskFile::find(
            "no-such-task",
            &[PathBuf::from("tasks"), PathBuf::from("x")],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown task `no-such-task`: no no-such-task.toml in tasks, x"
        );
        let e = ReactSpec::find("no-such-task", &[PathBuf::from("tasks")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown ReAct task `no-such-task`: no no-such-task.toml in tasks"
        );
        let e = parse("instruction = ").unwrap_err();
        assert!(
            matches!(&e, SpecError::Parse { .. })
                && e.to_string().starts_with("task file tasks/t.toml: "),
            "{e}"
        );
    }
}
