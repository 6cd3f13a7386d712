//! The LoRA adapter a task file names: checked at load, and the one adapter an engine runs
//! with for a set of tasks.

use std::path::Path;

use super::task::Task;
use super::SpecError;
use crate::model::config::{EngineConfig, LoraAdapter};
use crate::model::{EngineError, FeatureParams};
use crate::spec::Method;

impl LoraAdapter {
    /// Resolves the path against the folder of the task file at `task_path` and checks
    /// the file is a LoRA adapter GGUF. Errors name `lora.scale` or `lora.path`.
    pub(super) fn validated(&self, task_path: &Path) -> Result<LoraAdapter, SpecError> {
        let invalid = |key: &str, reason: String| SpecError::invalid(task_path, key, reason);
        if !self.scale.is_finite() {
            return Err(invalid(
                "lora.scale",
                format!("{} is not a finite number", self.scale),
            ));
        }
        let path = task_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.path);
        if !path.is_file() {
            return Err(invalid(
                "lora.path",
                format!("{} does not exist", path.display()),
            ));
        }
        let header = crate::model::gguf::read_header(&path)
            .map_err(|e| invalid("lora.path", e.to_string()))?;
        for (k, want) in [("general.type", "adapter"), ("adapter.type", "lora")] {
            if header.str(k) != Some(want) {
                return Err(invalid(
                    "lora.path",
                    format!(
                        "{} is not a LoRA adapter: its `{k}` is {:?}, expected \"{want}\"",
                        path.display(),
                        header.str(k).unwrap_or("missing")
                    ),
                ));
            }
        }
        let path = std::fs::canonicalize(&path)
            .map_err(|e| invalid("lora.path", format!("{}: {e}", path.display())))?;
        if path.to_str().is_none() {
            return Err(invalid(
                "lora.path",
                format!(
                    "{} is not valid UTF-8 (llama.cpp takes the path as text)",
                    path.display()
                ),
            ));
        }
        Ok(LoraAdapter {
            path,
            scale: self.scale,
        })
    }
}

/// The LoRA adapter one engine runs with for `tasks`: they must agree, since llama.cpp
/// applies an adapter set to the whole context.
pub fn lora_for_tasks<'a>(
    tasks: impl IntoIterator<Item = &'a Task>,
) -> Result<Option<LoraAdapter>, EngineError> {
    let mut first: Option<&Task> = None;
    for t in tasks {
        let Some(f) = first else {
            first = Some(t);
            continue;
        };
        if f.lora != t.lora {
            let path = t.lora.as_ref().or(f.lora.as_ref()).map(|l| l.path.clone());
            return Err(EngineError::Lora {
                path: path.unwrap_or_default(),
                reason: format!(
                    "tasks `{}` and `{}` name different adapters or scales; one engine runs with one",
                    f.name, t.name
                ),
            });
        }
    }
    Ok(first.and_then(|t| t.lora.clone()))
}

/// `cfg` with the LoRA adapter that `tasks` name (see [`lora_for_tasks`]), a feature
/// context (default size) for each task classified from model features (head, both,
/// stack), and the sentence encoder when a stack or the demonstrations' choice reads it, so
/// the memory estimate counts them.
pub fn config_for_tasks<'a>(
    cfg: &EngineConfig,
    tasks: impl IntoIterator<Item = &'a Task>,
) -> Result<EngineConfig, EngineError> {
    let tasks: Vec<&Task> = tasks.into_iter().collect();
    let mut cfg = cfg.clone();
    cfg.lora = lora_for_tasks(tasks.iter().copied())?;
    cfg.feature_batch_tokens = tasks
        .iter()
        // Only a scorer that reads the model's hidden states needs a feature context: a head,
        // or a stack with a model-feature block (not TF-IDF or encoder blocks alone).
        .filter(|t| match t.head.as_ref().map(|h| h.method) {
            None | Some(Method::Prompt | Method::Tfidf) => false,
            Some(m) if m.uses_stack_file() => stack_has_block(t, "dense"),
            Some(_) => true,
        })
        .map(|_| FeatureParams::default().n_batch_tokens)
        .collect();
    // No task set is planned without the model: `plan` with no task counts it.
    cfg.load_weights = tasks.is_empty() || tasks.iter().any(|t| needs_model(t, None));
    // One encoder serves every task whose stack reads it; none is counted (or loaded)
    // otherwise. A missing encoder counts 0 here: loading the task names the missing file.
    cfg.encoder_bytes = if tasks
        .iter()
        .any(|t| stack_has_block(t, "encoder") || demos_use_encoder(t))
    {
        crate::encoder::planned_bytes(&crate::encoder::dir_beside(&cfg.model_path)).unwrap_or(0)
    } else {
        0
    };
    Ok(cfg)
}

/// `cfg` with the sentence encoder counted when a ReAct task of `specs` has a knowledge
/// base and the encoder is beside the model: the knowledge base then embeds its passages
/// with it (`react::Kb::load_beside`). One encoder serves every task, so it counts once.
pub fn count_kb_encoder<'a>(
    mut cfg: EngineConfig,
    specs: impl IntoIterator<Item = &'a super::react::ReactSpec>,
) -> EngineConfig {
    if cfg.encoder_bytes == 0 && specs.into_iter().any(|s| s.kb.is_some()) {
        cfg.encoder_bytes =
            crate::encoder::planned_bytes(&crate::encoder::dir_beside(&cfg.model_path))
                .unwrap_or(0);
    }
    cfg
}

/// Whether the task retrieves its demonstrations by the encoder's similarity.
fn demos_use_encoder(t: &Task) -> bool {
    t.demos
        .is_some_and(|d| d.by == super::DemoSimilarity::Encoder)
}

/// Whether classifying with `task` (by `method`, else its own `[head] method`) needs the
/// model's weights: the prompt's label scores, a head on hidden states, or a stack with a
/// model-feature (`dense`) or `prompt` block do; a stack of TF-IDF and encoder blocks alone
/// does not. A stack file that cannot be read counts as needing it (the run then names
/// the file's problem).
pub fn needs_model(task: &Task, method: Option<Method>) -> bool {
    let method = method.unwrap_or(task.head.as_ref().map_or(Method::Prompt, |h| h.method));
    let blocks = match method.uses_stack_file() {
        true => stack_blocks(task),
        false => None,
    };
    method_needs_model(method, blocks.as_deref())
}

/// [`needs_model`] on what it read: the method and, for a stack file, its blocks present.
pub fn method_needs_model(method: Method, stack_blocks: Option<&[String]>) -> bool {
    match method {
        Method::Prompt | Method::Head | Method::Both => true,
        Method::Stack | Method::Tfidf => stack_blocks
            .is_none_or(|blocks| blocks.iter().any(|b| MODEL_BLOCKS.contains(&b.as_str()))),
    }
}

/// The stack blocks that read the model: its hidden states (`dense`), its label scores
/// (`prompt`).
const MODEL_BLOCKS: [&str; 2] = ["dense", "prompt"];

/// The blocks present (not null) in the task's stack file (`dense`, `text`, `prompt`,
/// `encoder`), a look at the keys; the stack file itself is read and checked by
/// `classify::stack`. None: the task has no stack file or it cannot be read.
fn stack_blocks(t: &Task) -> Option<Vec<String>> {
    let path = t.head_path()?;
    let bytes = std::fs::read(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let stack = v.get("stack")?.as_object()?;
    Some(
        stack
            .iter()
            .filter(|(_, b)| b.is_object())
            .map(|(k, _)| k.clone())
            .collect(),
    )
}

/// Whether the task's stack file has the block `key` (`dense`: model features, `encoder`:
/// sentence-encoder embeddings), a look at the one key; the stack file itself is read and
/// checked by `classify::stack`. Unreadable: no.
fn stack_has_block(t: &Task, key: &str) -> bool {
    let Some(path) = t
        .head
        .as_ref()
        .filter(|h| h.method.uses_stack_file())
        .and_then(|_| t.head_path())
    else {
        return false;
    };
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| !v["stack"][key].is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{load_board, parse_board, validate, BoardFile};

    fn task_with_stack(dir: &Path, stack: &str) -> Task {
        std::fs::write(dir.join("t.stack.json"), stack).unwrap();
        let src = "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\n\
                   labels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n\
                   [head]\nfile = \"t.stack.json\"\nmethod = \"stack\"\n";
        Task::parse(src, &dir.join("t.toml"), "t").unwrap()
    }

    /// A minimal valid board (its file in `dir`).
    fn test_board(dir: &Path) -> EngineConfig {
        let p = dir.join("b.toml");
        validate(
            parse_board("memory_budget_mib = 1024\nmodel_path = \"m.gguf\"", &p).unwrap(),
            &p,
        )
        .unwrap()
    }

    #[test]
    fn only_a_stack_with_model_features_counts_a_feature_context() {
        let dir = tempfile::tempdir().unwrap();
        let board = test_board(dir.path());
        let words_only = task_with_stack(dir.path(), r#"{"stack": {"dense": null}}"#);
        let cfg = config_for_tasks(&board, [&words_only]).unwrap();
        assert!(cfg.feature_batch_tokens.is_empty());
        let with_features = task_with_stack(dir.path(), r#"{"stack": {"dense": {"x": 1}}}"#);
        let cfg = config_for_tasks(&board, [&with_features]).unwrap();
        assert_eq!(cfg.feature_batch_tokens.len(), 1);
    }

    #[test]
    fn only_prompt_heads_and_model_blocks_need_the_model() {
        let blocks = |b: &[&str]| b.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for m in [Method::Prompt, Method::Head, Method::Both] {
            assert!(method_needs_model(m, None), "{m:?}");
        }
        for m in [Method::Stack, Method::Tfidf] {
            assert!(!method_needs_model(m, Some(&blocks(&["text"]))), "{m:?}");
            assert!(!method_needs_model(m, Some(&blocks(&["text", "encoder"]))));
            assert!(!method_needs_model(m, Some(&blocks(&["encoder"]))));
            assert!(method_needs_model(m, Some(&blocks(&["text", "dense"]))));
            assert!(method_needs_model(m, Some(&blocks(&["text", "prompt"]))));
            // Unreadable: load it, and let the run say what is wrong with the file.
            assert!(method_needs_model(m, None));
        }
    }

    #[test]
    fn a_task_set_loads_the_weights_when_any_task_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let board = test_board(dir.path());
        let words = task_with_stack(dir.path(), r#"{"stack": {"dense": null, "text": {}}}"#);
        assert!(!needs_model(&words, None));
        // `--method prompt` on the same task needs the model.
        assert!(needs_model(&words, Some(Method::Prompt)));
        assert!(!config_for_tasks(&board, [&words]).unwrap().load_weights);
        let prompt = Task::parse(
            "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\n\
             labels = [{ name = \"a\", text = \" a\" }, { name = \"b\", text = \" b\" }]\n",
            &dir.path().join("p.toml"),
            "p",
        )
        .unwrap();
        assert!(
            config_for_tasks(&board, [&words, &prompt])
                .unwrap()
                .load_weights
        );
        // No task at all (`plan` alone): the model counts.
        assert!(
            config_for_tasks(&board, std::iter::empty::<&Task>())
                .unwrap()
                .load_weights
        );
        let dir2 = tempfile::tempdir().unwrap();
        let reads_prompt = task_with_stack(
            dir2.path(),
            r#"{"stack": {"dense": null, "text": {}, "prompt": {"w": 1}}}"#,
        );
        assert!(
            config_for_tasks(&board, [&reads_prompt])
                .unwrap()
                .load_weights
        );
    }

    #[test]
    fn the_encoder_counts_when_demonstrations_are_chosen_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let enc = crate::encoder::dir_beside(&dir.path().join("m.gguf"));
        std::fs::create_dir_all(&enc).unwrap();
        std::fs::write(enc.join("model.safetensors"), vec![0u8; 1000]).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cfg = load_board(
            "x86-dev",
            &[root.join("board-configs")],
            &BoardFile::default(),
        )
        .unwrap();
        cfg.model_path = dir.path().join("m.gguf");
        let task = |by: &str| {
            Task::parse(
                &format!(
                    "instruction = \"x\"\nquery = \"R: {{text}}\\nS:\"\nlabels = [{{ name = \"a\", text = \" a\" }}, {{ name = \"b\", text = \" b\" }}]\nexamples = [{{ text = \"t\", label = \"a\" }}]\n[demos]\nper_label = 1\nby = \"{by}\"\n"
                ),
                Path::new("t.toml"),
                "t",
            )
            .unwrap()
        };
        let (by_tfidf, by_encoder) = (task("tfidf"), task("encoder"));
        assert_eq!(
            config_for_tasks(&cfg, [&by_tfidf]).unwrap().encoder_bytes,
            0
        );
        assert!(config_for_tasks(&cfg, [&by_encoder]).unwrap().encoder_bytes > 1000);
    }

    #[test]
    fn a_kiosk_counts_the_encoder_when_it_is_beside_the_model() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let path = root.join("tasks/kiosk.toml");
        let src = std::fs::read_to_string(&path).unwrap();
        let kiosk = crate::spec::react::ReactSpec::parse(&src, &path, "kiosk").unwrap();
        assert!(kiosk.kb.is_some());
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = load_board(
            "x86-dev",
            &[root.join("board-configs")],
            &BoardFile::default(),
        )
        .unwrap();
        cfg.model_path = dir.path().join("m.gguf");
        // No encoder beside the model: nothing counted.
        let without = count_kb_encoder(cfg.clone(), [&kiosk]);
        assert_eq!(without.encoder_bytes, 0);
        let enc = crate::encoder::dir_beside(&cfg.model_path);
        std::fs::create_dir_all(&enc).unwrap();
        std::fs::write(enc.join("model.safetensors"), vec![0u8; 1000]).unwrap();
        assert!(count_kb_encoder(cfg.clone(), [&kiosk]).encoder_bytes > 1000);
        // A task set without a knowledge base does not count it.
        assert_eq!(count_kb_encoder(cfg, []).encoder_bytes, 0);
    }
}
