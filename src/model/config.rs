//! Board profiles (`board-configs/<board>.toml`) and CLI overrides, validated once into
//! the [`EngineConfig`] the rest of edgeact runs on. Errors name the file and the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::budget::KvCacheType;
use crate::util::invalid::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown board `{name}`: no {name}.toml in {searched}")]
    UnknownBoard { name: String, searched: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key whose value is wrong: `{path}: `{key}`: {reason}`.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

/// A board profile as written in its TOML file. Every field can be overridden from the CLI.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BoardFile {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Threads for single-token decoding.
    pub threads: Option<u32>,
    /// Threads for prompt (batch) processing.
    pub threads_batch: Option<u32>,
    pub memory_budget_mib: Option<u64>,
    /// Shrink n_ctx to fit the budget instead of refusing.
    pub allow_ctx_shrink: Option<bool>,
    pub n_ctx: Option<u32>,
    pub n_batch: Option<u32>,
    pub n_ubatch: Option<u32>,
    /// Most logits rows (n_vocab f32 each) one decode may return.
    pub max_logit_rows: Option<u32>,
    pub kv_cache_type: Option<KvCacheType>,
    pub gpu_layers: Option<u32>,
    pub use_mmap: Option<bool>,
    pub use_mlock: Option<bool>,
    pub model_path: Option<PathBuf>,
    pub model_sha256: Option<String>,
    /// The cargo build profile this board wants (see the README's cross-build section).
    pub build: Option<String>,
    /// Folder where decoded task prefixes are saved, so a restart skips them.
    pub prefix_cache_dir: Option<PathBuf>,
}

impl BoardFile {
    /// Values set in `over` replace ours.
    pub fn overlay(mut self, over: &BoardFile) -> BoardFile {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(
            name,
            description,
            threads,
            threads_batch,
            memory_budget_mib,
            allow_ctx_shrink,
            n_ctx,
            n_batch,
            n_ubatch,
            max_logit_rows,
            kv_cache_type,
            gpu_layers,
            use_mmap,
            use_mlock,
            model_path,
            model_sha256,
            build,
            prefix_cache_dir
        );
        self
    }
}

/// The validated settings of the model and its context.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub board: String,
    pub threads: u32,
    pub threads_batch: u32,
    pub memory_budget_mib: u64,
    pub allow_ctx_shrink: bool,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
    pub max_logit_rows: u32,
    pub kv_cache_type: KvCacheType,
    pub gpu_layers: u32,
    pub use_mmap: bool,
    pub use_mlock: bool,
    pub model_path: PathBuf,
    pub model_sha256: Option<String>,
    pub prefix_cache_dir: Option<PathBuf>,
    /// A LoRA adapter applied when the model loads (from the task file, not the board).
    pub lora: Option<LoraAdapter>,
    /// `n_batch_tokens` of each feature context the run creates (learned-head tasks; from
    /// the task files, not the board): counted in the memory estimate.
    pub feature_batch_tokens: Vec<u32>,
    /// Bytes of the sentence encoder when a task's stack reads it (from the task files):
    /// counted in the memory estimate.
    pub encoder_bytes: u64,
    /// Whether the run loads the model's weights (from the task files): false when no task
    /// reads the model's hidden states or label scores (a stack of TF-IDF and encoder
    /// blocks alone), so only the file is checked and the estimate leaves the model out.
    pub load_weights: bool,
}

/// Where board profiles are looked for, in order.
pub fn board_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("EDGEACT_BOARD_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("board-configs"));
    dirs.push(PathBuf::from("/etc/edgeact/board-configs"));
    dirs
}

/// Where task files are looked for, in order.
pub fn task_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("EDGEACT_TASK_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("tasks"));
    dirs.push(PathBuf::from("/etc/edgeact/tasks"));
    dirs
}

/// Finds a board by name or path, reads it, applies `overrides`, validates.
pub fn load_board(
    name: &str,
    dirs: &[PathBuf],
    overrides: &BoardFile,
) -> Result<EngineConfig, ConfigError> {
    let path = if name.contains('/') || name.ends_with(".toml") {
        PathBuf::from(name)
    } else {
        dirs.iter()
            .map(|d| d.join(format!("{name}.toml")))
            .find(|p| p.is_file())
            .ok_or_else(|| ConfigError::UnknownBoard {
                name: name.into(),
                searched: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?
    };
    let src = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
        path: path.clone(),
        source,
    })?;
    let file = parse_board(&src, &path)?;
    validate(file.overlay(overrides), &path)
}

pub fn parse_board(src: &str, path: &Path) -> Result<BoardFile, ConfigError> {
    toml::from_str(src).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// Checks ranges and fills defaults. `path` is named in errors.
pub fn validate(b: BoardFile, path: &Path) -> Result<EngineConfig, ConfigError> {
    let invalid = |key: &str, reason: String| ConfigError::from(Invalid::new(path, key, reason));
    let threads = b.threads.unwrap_or(4);
    if !(1..=256).contains(&threads) {
        return Err(invalid(
            "threads",
            format!("{threads} is not within 1..=256"),
        ));
    }
    let threads_batch = b.threads_batch.unwrap_or(threads);
    if !(1..=256).contains(&threads_batch) {
        return Err(invalid(
            "threads_batch",
            format!("{threads_batch} is not within 1..=256"),
        ));
    }
    let memory_budget_mib = b
        .memory_budget_mib
        .ok_or_else(|| invalid("memory_budget_mib", "is required".into()))?;
    if memory_budget_mib < 16 {
        return Err(invalid(
            "memory_budget_mib",
            format!("{memory_budget_mib} MiB is too small to load any model"),
        ));
    }
    let n_ctx = b.n_ctx.unwrap_or(1024);
    if !(256..=131_072).contains(&n_ctx) {
        return Err(invalid(
            "n_ctx",
            format!("{n_ctx} is not within 256..=131072"),
        ));
    }
    let n_batch = b.n_batch.unwrap_or(512).min(n_ctx);
    if n_batch < 32 {
        return Err(invalid("n_batch", format!("{n_batch} is below 32")));
    }
    let n_ubatch = b.n_ubatch.unwrap_or(n_batch.min(512));
    if n_ubatch < 16 || n_ubatch > n_batch {
        return Err(invalid(
            "n_ubatch",
            format!("{n_ubatch} must be within 16..=n_batch ({n_batch})"),
        ));
    }
    let max_logit_rows = b.max_logit_rows.unwrap_or(32);
    if max_logit_rows == 0 || max_logit_rows > n_batch {
        return Err(invalid(
            "max_logit_rows",
            format!("{max_logit_rows} must be within 1..=n_batch ({n_batch})"),
        ));
    }
    let model_path = b
        .model_path
        .ok_or_else(|| invalid("model_path", "is required (or pass --model)".into()))?;
    if let Some(sha) = &b.model_sha256 {
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid(
                "model_sha256",
                "must be 64 hexadecimal characters".into(),
            ));
        }
    }
    Ok(EngineConfig {
        board: b.name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into())
        }),
        threads,
        threads_batch,
        memory_budget_mib,
        allow_ctx_shrink: b.allow_ctx_shrink.unwrap_or(false),
        n_ctx,
        n_batch,
        n_ubatch,
        max_logit_rows,
        kv_cache_type: b.kv_cache_type.unwrap_or(KvCacheType::F16),
        gpu_layers: b.gpu_layers.unwrap_or(0),
        use_mmap: b.use_mmap.unwrap_or(true),
        use_mlock: b.use_mlock.unwrap_or(false),
        model_path,
        model_sha256: b.model_sha256.map(|s| s.to_ascii_lowercase()),
        prefix_cache_dir: b.prefix_cache_dir,
        lora: None,
        feature_batch_tokens: Vec::new(),
        encoder_bytes: 0,
        load_weights: true,
    })
}

/// A LoRA adapter (GGUF, `general.type = "adapter"`) that llama.cpp applies to the model
/// when it loads: `lora = { path = "adapters/x.gguf", scale = 1.0 }`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraAdapter {
    /// The adapter file. Relative to the task file's folder when read; absolute once loaded.
    pub path: PathBuf,
    /// Multiplier on the adapter's update (llama.cpp also applies alpha / rank); 0 turns
    /// the adapter off.
    #[serde(default = "default_lora_scale")]
    pub scale: f32,
}

fn default_lora_scale() -> f32 {
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(src: &str) -> Result<EngineConfig, ConfigError> {
        let p = Path::new("board-configs/test.toml");
        validate(parse_board(src, p)?, p)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = board("memory_budget_mib = 1024\nmodel_path = \"m.gguf\"\nthreads = 2").unwrap();
        assert_eq!(c.board, "test");
        assert_eq!(c.threads_batch, 2);
        assert_eq!(c.n_ctx, 1024);
        let over = BoardFile {
            threads: Some(3),
            n_ctx: Some(512),
            ..Default::default()
        };
        let p = Path::new("x.toml");
        let c = validate(
            parse_board(
                "memory_budget_mib = 1024\nmodel_path = \"m.gguf\"\nthreads = 2",
                p,
            )
            .unwrap()
            .overlay(&over),
            p,
        )
        .unwrap();
        assert_eq!((c.threads, c.n_ctx, c.n_batch), (3, 512, 512));
    }

    #[test]
    fn errors_name_file_and_key() {
        let e = board("memory_budget_mib = 1024\nmodel_path = \"m\"\nthreads = 0").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("board-configs/test.toml") && m.contains("`threads`"),
            "{m}"
        );

        let e = board("memory_budget_mib = 1024\nmodel_path = \"m\"\nthread = 2").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("board-configs/test.toml") && m.contains("thread"),
            "{m}"
        );

        let e = board("model_path = \"m\"").unwrap_err();
        assert!(e.to_string().contains("memory_budget_mib"), "{e}");

        let e = board("memory_budget_mib = 1024\nmodel_path = \"m\"\nkv_cache_type = \"q4\"")
            .unwrap_err();
        assert!(
            e.to_string().contains("kv_cache_type") || e.to_string().contains("q4"),
            "{e}"
        );

        let e = board("memory_budget_mib = 1024\nmodel_path = \"m\"\nmodel_sha256 = \"abc\"")
            .unwrap_err();
        assert!(e.to_string().contains("model_sha256"), "{e}");

        let e =
            board("memory_budget_mib = 1024\nmodel_path = \"m\"\nn_ubatch = 4096\nn_batch = 512")
                .unwrap_err();
        assert!(e.to_string().contains("n_ubatch"), "{e}");
    }

    #[test]
    fn unknown_board_lists_where_it_looked() {
        let e =
            load_board("nope", &[PathBuf::from("/tmp/none")], &BoardFile::default()).unwrap_err();
        assert!(e.to_string().contains("nope") && e.to_string().contains("/tmp/none"));
    }

    #[test]
    fn shipped_boards_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("board-configs");
        for name in ["x86-dev", "rpi4", "rpi5", "jetson-orin-nano"] {
            let c = load_board(name, std::slice::from_ref(&dir), &BoardFile::default())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.board, name);
        }
    }
}
