//! The model: checks and loads a GGUF file through llama.cpp under the memory budget,
//! keeps task prefixes in the KV cache, and scores label token sequences. The only module
//! that touches llama-cpp-2; one inference thread owns an [`Engine`].
//!
//! - `load`: file checks, checksum sidecar, memory preflight, context
//!   parameters, [`Engine::load`].
//! - `decode`: the one decode loop every path shares (tokens, positions, sequences, which
//!   rows of logits come back), and the KV-cache bookkeeping around it.
//! - `text`: tokens to text and back, the chat template.
//! - `prefix`: prefix slots and the prefix state cache on disk.
//! - `score`: label scoring; the batch plan is pure and tested without a model.
//! - `generate`: generation under a GBNF grammar, sampling.
//! - [`quantize`]: another weight type of a model file (`llama_model_quantize`).
//! - `label_rows`: one-token labels scored from the final hidden state and the labels'
//!   embedding rows when the output projection is tied to the embedding (no 262 144-wide
//!   logits row).
//! - `features`: a second, embeddings context for pooled hidden states; `tap`: its eval
//!   callback, which copies chosen layers' outputs and stops the graph after the deepest.
//! - [`budget`], [`config`], [`gguf`], [`scoring`]: pure parts (memory plan, board config,
//!   GGUF header, label math).

pub mod budget;
pub mod config;
mod decode;
mod features;
mod generate;
pub mod gguf;
mod label_rows;
mod load;
mod prefix;
pub mod quantize;
mod score;
pub mod scoring;
mod tap;
mod text;

use std::path::PathBuf;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};

use crate::model::budget::{BudgetError, KvCacheType};
use crate::model::gguf::GgufError;
use crate::model::scoring::Token;

pub use self::decode::{requests_per_decode, DecodeCounts};
pub use self::features::{FeatureContext, FeatureParams, PooledStates};
pub use self::generate::{GenCache, GenerateRequest, GenerateStop, Generated};
pub use self::load::{backend, file_sha256, planned_info, preflight, ModelInfo};
pub use self::prefix::PrefixSource;
pub use self::score::{ScoreJob, ScoreOut};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "model file {path} has sha256 {actual}, expected {expected}: the download is corrupt or it is another model \
         (run scripts/fetch-model, or fix model_sha256)"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Budget { path: PathBuf, source: BudgetError },
    #[error("llama.cpp could not initialise: {0}")]
    Backend(String),
    #[error("llama.cpp could not load {path} (RUST_LOG=llama-cpp-2=info shows its reason)")]
    Load { path: PathBuf },
    #[error("llama.cpp could not create a context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    #[error("LoRA adapter {path}: {reason}")]
    Lora { path: PathBuf, reason: String },
    #[error("the KV cache cannot hold {need} more tokens ({free} free of n_ctx {n_ctx})")]
    ContextFull {
        need: usize,
        free: usize,
        n_ctx: u32,
    },
    #[error("grammar: {0}")]
    Grammar(String),
    #[error(
        "the model's weights were not loaded: the run's tasks read neither its hidden states \
         nor its label scores"
    )]
    NotLoaded,
}

/// A loaded model and its scoring context. Its methods live beside what they do: loading in
/// `load`, prefixes in `prefix`, scoring in `score`, generation in `generate`, features in
/// `features`.
pub struct Engine {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    /// After `ctx`: the scoring context's eval callback points into it, so the context is
    /// dropped first. Present when the label-rows path is available (see `tied`).
    tap: Option<tap::TapBox>,
    batch: LlamaBatch<'static>,
    pub info: ModelInfo,
    n_batch: usize,
    n_ubatch: usize,
    max_logit_rows: usize,
    n_prefix_slots: usize,
    n_seq_max: usize,
    /// Tokens held in each prefix slot's sequence (slot i is sequence i).
    prefixes: Vec<Vec<Token>>,
    prefix_cache_dir: Option<PathBuf>,
    kv_cache_type: KvCacheType,
    /// The applied LoRA adapter (kept with the context that uses it) and its identity
    /// (`sha256|scale`) for the prefix-state key.
    lora: Option<(LlamaLoraAdapter, String)>,
    /// Work done by `run_entries` so far (benchmarks read it; see [`DecodeCounts`]).
    decode_counts: DecodeCounts,
    /// The model's output rows tied to its embedding, or why the label-rows path is off.
    tied: Result<label_rows::TiedOutput, String>,
    /// Output rows read so far, one entry per one-token label set scored over its labels
    /// (None: they could not be read, the set stays on the full rows).
    label_rows: Vec<(Vec<Token>, Option<label_rows::LabelRows>)>,
}

impl Engine {
    pub fn n_ctx(&self) -> usize {
        self.info.n_ctx as usize
    }

    pub fn n_batch(&self) -> usize {
        self.n_batch
    }
}
