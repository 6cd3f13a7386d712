//! The model: checks and loads a GGUF file through llama.cpp under the memory budget,
//! keeps task prefixes in the KV cache, and scores label token sequences. The only module
//! that touches llama-cpp-2; one inference thread owns an [`Engine`].

pub mod budget;
pub mod config;
pub mod gguf;
pub mod scoring;

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType as LlamaKv, LlamaContextParams};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use crate::model::budget::{BudgetError, ContextPlan, Fitted, KvCacheType, ModelShape};
use crate::model::config::EngineConfig;
use crate::model::config::LoraAdapter;
use crate::model::gguf::GgufError;
use crate::model::scoring::{logsumexp, LabelLogprob, LabelSearch, LabelTrie, Pruning, Token};
use crate::util::rng::SplitMix64;

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
}

/// What was loaded, for provenance and reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub architecture: String,
    pub board: String,
    pub n_ctx: u32,
    pub shrunk_from_ctx: Option<u32>,
    pub estimate_mib: u64,
    pub estimate: budget::Estimate,
    pub load_ms: f64,
}

/// One request to score: the whole prompt's tokens, and the labels.
pub struct ScoreJob<'a> {
    /// A prefix slot whose cached tokens may be reused.
    pub prefix: Option<usize>,
    pub tokens: &'a [Token],
    pub trie: &'a LabelTrie,
    /// Leave labels that cannot win unfinished (None: score every label fully).
    pub pruning: Option<Pruning>,
}

/// What scoring one job measured.
#[derive(Debug, Clone)]
pub struct ScoreOut {
    pub labels: Vec<LabelLogprob>,
    /// Prompt tokens taken from the cached prefix.
    pub reused_tokens: usize,
    /// Tokens this job decoded (suffix and label tokens).
    pub decoded_tokens: usize,
    /// Wall time in llama.cpp decode for the batch this job was in.
    pub decode_ms: f64,
    /// Wall time turning logits into label log-probabilities.
    pub scoring_ms: f64,
    /// How many jobs shared the decode.
    pub batch_jobs: usize,
}

/// How a prefix got into its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixSource {
    /// Decoded now (no cache configured, or none saved yet).
    Decoded,
    /// Loaded from the prefix cache on disk.
    Loaded,
    /// The saved state was stale or corrupt: decoded again and saved.
    Rebuilt,
}

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// llama.cpp's backend, initialised once per process; its logs go to `tracing`
/// (target `llama-cpp-2`), so they are quiet unless RUST_LOG asks for them.
/// The first GPU (discrete or integrated) llama.cpp can offload to, as "name (description)";
/// None on a CPU-only build or when the GPU backend found no device.
fn gpu_device() -> Option<String> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .find(|d| matches!(d.device_type, T::Gpu | T::IntegratedGpu))
        .map(|d| format!("{} ({})", d.name, d.description))
}

/// Why there is nothing to offload to, for the fallback log line.
fn no_gpu_reason() -> &'static str {
    if cfg!(feature = "vulkan") {
        "the Vulkan backend found no GPU device (no ICD, or only a CPU-type device such as \
         Mesa's lavapipe, which llama.cpp uses only with GGML_VK_VISIBLE_DEVICES=0)"
    } else if cfg!(feature = "cuda") {
        "the CUDA backend found no GPU device"
    } else {
        "this build has no GPU backend (build with --features vulkan or cuda)"
    }
}

pub fn backend() -> Result<&'static LlamaBackend, EngineError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(true),
            );
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// sha256 of a file, read in full.
fn file_sha256_uncached(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of a file, remembered in `<file>.sha256` beside the (canonical) file and trusted
/// while size and mtime match, so a restart does not hash 250 MB again.
pub fn file_sha256(path: &Path) -> Result<String, GgufError> {
    let io = |source| GgufError::Io {
        path: path.into(),
        source,
    };
    let real = std::fs::canonicalize(path).map_err(io)?;
    let meta = std::fs::metadata(&real).map_err(io)?;
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stamp = format!("{} {}", meta.len(), mtime_ns);
    let sidecar = PathBuf::from(format!("{}.sha256", real.display()));
    if let Ok(s) = std::fs::read_to_string(&sidecar) {
        if let Some((sha, rest)) = s.trim().split_once(' ') {
            if rest == stamp && sha.len() == 64 {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = file_sha256_uncached(&real).map_err(io)?;
    // Best effort: a read-only model folder just means hashing again next time.
    let _ = std::fs::write(&sidecar, format!("{sha} {stamp}\n"));
    Ok(sha)
}

/// Checks the file and plans memory without loading the weights: the order in which a
/// user learns what is wrong (missing, not GGUF, wrong checksum, does not fit).
pub fn preflight(
    cfg: &EngineConfig,
    n_prefix_slots: usize,
) -> Result<(String, ModelShape, Fitted), EngineError> {
    let header = gguf::read_header(&cfg.model_path)?;
    let sha = file_sha256(&cfg.model_path)?;
    if let Some(expected) = &cfg.model_sha256 {
        if &sha != expected {
            return Err(EngineError::Checksum {
                path: cfg.model_path.clone(),
                expected: expected.clone(),
                actual: sha,
            });
        }
    }
    let shape = ModelShape::from_header(&header).map_err(|source| EngineError::Budget {
        path: cfg.model_path.clone(),
        source,
    })?;
    let wanted = ContextPlan {
        n_ctx: cfg.n_ctx,
        n_ubatch: cfg.n_ubatch,
        max_logit_rows: cfg.max_logit_rows,
        n_seq_max: n_seq_max(cfg, n_prefix_slots),
        kv_cache_type: cfg.kv_cache_type,
        gpu_layers: cfg.gpu_layers,
    };
    let fitted = budget::fit(
        &shape,
        wanted,
        cfg.memory_budget_mib,
        cfg.allow_ctx_shrink,
        256,
    )
    .map_err(|source| EngineError::Budget {
        path: cfg.model_path.clone(),
        source,
    })?;
    Ok((sha, shape, fitted))
}

/// Sequences: one per prefix slot, plus work sequences for requests and label branches.
fn n_seq_max(cfg: &EngineConfig, n_prefix_slots: usize) -> u32 {
    (n_prefix_slots as u32 + cfg.max_logit_rows.max(4)).min(256)
}

pub struct Engine {
    model: &'static LlamaModel,
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    pub info: ModelInfo,
    n_batch: usize,
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
}

/// Loads a LoRA adapter for `model`, checking first what llama.cpp would only log.
/// Returns the adapter and its identity (`sha256|scale`).
fn init_lora(
    model: &mut LlamaModel,
    lora: &LoraAdapter,
    architecture: &str,
) -> Result<(LlamaLoraAdapter, String), EngineError> {
    let err = |reason: String| EngineError::Lora {
        path: lora.path.clone(),
        reason,
    };
    let header = gguf::read_header(&lora.path)?;
    if header.architecture() != Some(architecture) {
        return Err(err(format!(
            "it is for architecture {:?}, the model is {architecture:?}",
            header.architecture().unwrap_or("(none)")
        )));
    }
    let sha = file_sha256(&lora.path)?;
    let adapter = model.lora_adapter_init(&lora.path).map_err(|e| {
        err(format!(
            "llama.cpp could not load it: {e} (RUST_LOG=llama-cpp-2=info shows its reason)"
        ))
    })?;
    Ok((adapter, format!("{sha}|{}", lora.scale)))
}

impl Engine {
    /// Checks, plans and loads. `n_prefix_slots` is how many fixed prefixes (one per task)
    /// stay cached.
    pub fn load(cfg: &EngineConfig, n_prefix_slots: usize) -> Result<Engine, EngineError> {
        let started = Instant::now();
        let (sha256, shape, fitted) = preflight(cfg, n_prefix_slots)?;
        if let Some(from) = fitted.shrunk_from_ctx {
            tracing::warn!(
                from,
                to = fitted.plan.n_ctx,
                budget_mib = cfg.memory_budget_mib,
                "n_ctx shrunk to fit the memory budget"
            );
        }
        let backend = backend()?;
        let mut mparams = LlamaModelParams::default()
            .with_n_gpu_layers(cfg.gpu_layers)
            .with_use_mmap(cfg.use_mmap)
            .with_use_mlock(cfg.use_mlock);
        if cfg.gpu_layers > 0 {
            match gpu_device() {
                Some(device) => {
                    tracing::info!(gpu_layers = cfg.gpu_layers, "offloading layers to {device}")
                }
                None => {
                    tracing::warn!(
                        "gpu_layers = {} but {}: running all layers on the CPU",
                        cfg.gpu_layers,
                        no_gpu_reason()
                    );
                    mparams = mparams.with_n_gpu_layers(0);
                }
            }
        }
        let mut model =
            LlamaModel::load_from_file(backend, &cfg.model_path, &mparams).map_err(|_| {
                EngineError::Load {
                    path: cfg.model_path.clone(),
                }
            })?;
        // An adapter is loaded before any context borrows the model.
        let mut lora = match &cfg.lora {
            Some(l) => Some(init_lora(&mut model, l, &shape.architecture)?),
            None => None,
        };
        // The model lives as long as the process: the inference thread owns it and the
        // context that borrows it. Leaking gives the context a 'static borrow.
        let model: &'static LlamaModel = Box::leak(Box::new(model));
        let plan = fitted.plan;
        let n_seq_max = plan.n_seq_max;
        let n_batch = cfg.n_batch.min(plan.n_ctx);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(plan.n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(cfg.n_ubatch.min(n_batch))
            .with_n_seq_max(n_seq_max)
            .with_n_threads(cfg.threads as i32)
            .with_n_threads_batch(cfg.threads_batch as i32)
            .with_type_k(llama_kv(cfg.kv_cache_type))
            .with_type_v(llama_kv(cfg.kv_cache_type))
            .with_kv_unified(true)
            .with_swa_full(true);
        // llama.cpp keeps at least one logits row per sequence (it asserts this).
        let params = with_n_outputs_max(params, cfg.max_logit_rows.max(n_seq_max));
        let mut ctx = model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context {
                n_ctx: plan.n_ctx,
                reason: e.to_string(),
            })?;
        if let (Some((adapter, _)), Some(l)) = (lora.as_mut(), &cfg.lora) {
            ctx.lora_adapter_set(adapter, l.scale)
                .map_err(|e| EngineError::Lora {
                    path: l.path.clone(),
                    reason: format!("llama.cpp could not apply it: {e}"),
                })?;
        }
        let info = ModelInfo {
            path: cfg.model_path.clone(),
            sha256,
            architecture: shape.architecture.clone(),
            board: cfg.board.clone(),
            n_ctx: plan.n_ctx,
            shrunk_from_ctx: fitted.shrunk_from_ctx,
            estimate_mib: fitted.estimate.total_mib(),
            estimate: fitted.estimate.clone(),
            load_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        tracing::info!(
            model = %info.path.display(),
            n_ctx = info.n_ctx,
            estimate_mib = info.estimate_mib,
            load_ms = info.load_ms,
            "model loaded"
        );
        Ok(Engine {
            model,
            ctx,
            batch: LlamaBatch::new(n_batch as usize, n_seq_max as i32),
            info,
            n_batch: n_batch as usize,
            max_logit_rows: cfg.max_logit_rows as usize,
            n_prefix_slots,
            n_seq_max: n_seq_max as usize,
            prefixes: vec![Vec::new(); n_prefix_slots],
            prefix_cache_dir: cfg.prefix_cache_dir.clone(),
            kv_cache_type: cfg.kv_cache_type,
            lora,
        })
    }

    pub fn n_ctx(&self) -> usize {
        self.info.n_ctx as usize
    }

    /// Tokens of `text`. `bos` adds the model's begin-of-sequence token; `special` lets
    /// control-token text (such as `<start_of_turn>`) become control tokens: only for
    /// trusted template text, never for request fields.
    pub fn tokenize(&self, text: &str, bos: bool, special: bool) -> Vec<Token> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), bos, special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Text of `tokens` (lossy for a cut multi-byte character).
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let vocab = self.model.vocab();
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(vocab.token_to_piece(LlamaToken(t), false, None));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The model's chat template applied to one user turn, with the assistant turn opened.
    pub fn chat_wrap(&self, user: &str) -> Result<String, String> {
        let tmpl = self.model.chat_template(None).map_err(|e| e.to_string())?;
        let msg = llama_cpp_2::model::LlamaChatMessage::new("user".into(), user.into())
            .map_err(|e| e.to_string())?;
        self.model
            .apply_chat_template(&tmpl, &[msg], true)
            .map_err(|e| e.to_string())
    }

    /// Tokens held in a prefix slot.
    pub fn prefix_tokens(&self, slot: usize) -> &[Token] {
        &self.prefixes[slot]
    }

    /// Sets the folder of the prefix cache on disk (None: off); returns the previous one.
    pub fn set_prefix_cache_dir(&mut self, dir: Option<PathBuf>) -> Option<PathBuf> {
        std::mem::replace(&mut self.prefix_cache_dir, dir)
    }

    /// Like [`Engine::set_prefix`], but through the prefix cache on disk when the config
    /// names one: a state saved for the same model, context settings and tokens is loaded
    /// instead of decoded; a missing, stale or corrupt one is (re)built and saved.
    pub fn set_prefix_cached(
        &mut self,
        slot: usize,
        tokens: &[Token],
    ) -> Result<PrefixSource, EngineError> {
        let Some(dir) = self.prefix_cache_dir.clone() else {
            self.set_prefix(slot, tokens)?;
            return Ok(PrefixSource::Decoded);
        };
        let key = self.prefix_key(tokens);
        let state = dir.join(format!("{key}.state"));
        let sum = dir.join(format!("{key}.sha256"));
        let mut rebuilt = false;
        if state.exists() {
            match self.load_prefix(slot, tokens, &state, &sum) {
                Ok(()) => return Ok(PrefixSource::Loaded),
                Err(reason) => {
                    tracing::warn!(path = %state.display(), "prefix state rejected ({reason}); rebuilding it");
                    let _ = std::fs::remove_file(&state);
                    let _ = std::fs::remove_file(&sum);
                    rebuilt = true;
                }
            }
        }
        self.set_prefix(slot, tokens)?;
        if let Err(e) = self.save_prefix(slot, tokens, &dir, &state, &sum) {
            tracing::warn!(path = %state.display(), "cannot save the prefix state: {e}");
        }
        Ok(if rebuilt {
            PrefixSource::Rebuilt
        } else {
            PrefixSource::Decoded
        })
    }

    /// Names a prefix state: model file, context settings that shape the KV cache, tokens.
    fn prefix_key(&self, tokens: &[Token]) -> String {
        let mut h = Sha256::new();
        h.update(self.info.sha256.as_bytes());
        h.update(
            format!(
                "|{}|{:?}|{}|",
                self.info.n_ctx,
                self.kv_cache_type,
                env!("CARGO_PKG_VERSION")
            )
            .as_bytes(),
        );
        // A prefix decoded under an adapter is another prefix (no adapter: the key is as before).
        if let Some((_, id)) = &self.lora {
            h.update(format!("lora|{id}|").as_bytes());
        }
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }

    fn load_prefix(
        &mut self,
        slot: usize,
        tokens: &[Token],
        state: &Path,
        sum: &Path,
    ) -> Result<(), String> {
        let want = std::fs::read_to_string(sum).map_err(|e| format!("no checksum: {e}"))?;
        let got = file_sha256_uncached(state).map_err(|e| e.to_string())?;
        if want.trim() != got {
            return Err("checksum mismatch".into());
        }
        self.clear_seq(slot);
        let (loaded, _) = self
            .ctx
            .state_seq_load_file(state, slot as i32, tokens.len() + 1)
            .map_err(|e| format!("llama.cpp could not load it: {e}"))?;
        let loaded: Vec<Token> = loaded.into_iter().map(|t| t.0).collect();
        if loaded != tokens {
            self.clear_seq(slot);
            return Err("its tokens differ from the prompt's".into());
        }
        self.prefixes[slot] = tokens.to_vec();
        Ok(())
    }

    fn save_prefix(
        &self,
        slot: usize,
        tokens: &[Token],
        dir: &Path,
        state: &Path,
        sum: &Path,
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        // Unique per process: two processes may build the same prefix at once.
        let tmp = state.with_extension(format!("state.tmp{}", std::process::id()));
        let toks: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t)).collect();
        self.ctx
            .state_seq_save_file(&tmp, slot as i32, &toks)
            .map_err(|e| e.to_string())?;
        let sha = file_sha256_uncached(&tmp).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, state).map_err(|e| e.to_string())?;
        std::fs::write(sum, format!("{sha}\n")).map_err(|e| e.to_string())
    }

    /// Decodes `tokens` into prefix slot `slot` (sequence `slot`), once; later jobs copy
    /// its cells instead of decoding them again.
    pub fn set_prefix(&mut self, slot: usize, tokens: &[Token]) -> Result<(), EngineError> {
        assert!(
            slot < self.n_prefix_slots,
            "prefix slot {slot} out of range"
        );
        self.clear_seq(slot);
        self.prefixes[slot].clear();
        let entries: Vec<Entry> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| Entry {
                token: t,
                pos: i as i32,
                seqs: vec![slot as i32],
                row: None,
            })
            .collect();
        self.check_room(entries.len())?;
        self.run_entries(&entries, |_, _| {})?;
        self.prefixes[slot] = tokens.to_vec();
        Ok(())
    }

    fn work_seqs(&self) -> usize {
        self.n_seq_max - self.n_prefix_slots
    }

    fn clear_seq(&mut self, seq: usize) {
        // Removing a whole sequence cannot fail; the error is only for ids above i32::MAX.
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
    }

    fn used_cells(&self) -> usize {
        self.prefixes.iter().map(Vec::len).sum()
    }

    fn check_room(&self, need: usize) -> Result<(), EngineError> {
        let free = self.n_ctx().saturating_sub(self.used_cells());
        if need > free {
            return Err(EngineError::ContextFull {
                need,
                free,
                n_ctx: self.info.n_ctx,
            });
        }
        Ok(())
    }

    /// Reusable prompt length for `job`: the common prefix with its slot, always leaving
    /// the last prompt token to decode (its logits score the labels).
    fn reuse_len(&self, job: &ScoreJob) -> usize {
        let Some(slot) = job.prefix else { return 0 };
        let cached = &self.prefixes[slot];
        let common = cached
            .iter()
            .zip(job.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        common.min(job.tokens.len().saturating_sub(1))
    }

    /// Scores each job's labels, several jobs per decode where sequences and cells allow
    /// (micro-batching), reusing cached prefixes and decoding only the label-trie nodes
    /// whose logits are needed.
    pub fn score(&mut self, jobs: &[ScoreJob]) -> Result<Vec<ScoreOut>, EngineError> {
        let mut outs = Vec::with_capacity(jobs.len());
        let free_cells = self.n_ctx().saturating_sub(self.used_cells());
        // Half the work sequences at most hold requests; the rest are for label branches.
        let max_jobs = (self.work_seqs() / 2).max(1);
        let mut start = 0;
        while start < jobs.len() {
            let mut end = start;
            let mut cells = 0;
            while end < jobs.len() && end - start < max_jobs {
                let j = &jobs[end];
                let need = j.tokens.len() - self.reuse_len(j) + j.trie.decoded.len();
                if end > start && cells + need > free_cells {
                    break;
                }
                cells += need;
                end += 1;
            }
            outs.extend(self.score_group(&jobs[start..end])?);
            start = end;
        }
        Ok(outs)
    }

    fn score_group(&mut self, jobs: &[ScoreJob]) -> Result<Vec<ScoreOut>, EngineError> {
        let t0 = Instant::now();
        let base = self.n_prefix_slots;
        let reuse: Vec<usize> = jobs.iter().map(|j| self.reuse_len(j)).collect();
        let need: usize = jobs
            .iter()
            .zip(&reuse)
            .map(|(j, r)| j.tokens.len() - r + j.trie.decoded.len())
            .sum();
        self.check_room(need)?;
        // Phase A: every job's suffix on its own request sequence, one decode.
        let mut entries = Vec::new();
        for (k, (job, &r)) in jobs.iter().zip(&reuse).enumerate() {
            let seq = base + k;
            self.clear_seq(seq);
            if r > 0 {
                let slot = job.prefix.unwrap_or(0) as i32;
                self.ctx
                    .copy_kv_cache_seq(slot, seq as i32, Some(0), Some(r as u32))
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            let n = job.tokens.len();
            for (i, &t) in job.tokens.iter().enumerate().skip(r) {
                entries.push(Entry {
                    token: t,
                    pos: i as i32,
                    seqs: vec![seq as i32],
                    row: (i == n - 1).then_some(RowId { job: k, node: None }),
                });
            }
        }
        let mut searches: Vec<LabelSearch> = jobs
            .iter()
            .map(|j| LabelSearch::new(j.trie, j.pruning))
            .collect();
        let mut decoded: Vec<usize> = jobs
            .iter()
            .zip(&reuse)
            .map(|(j, r)| j.tokens.len() - r)
            .collect();
        let mut scoring_s = 0.0;
        let mut collect = |row: RowId, logits: &[f32], searches: &mut Vec<LabelSearch>| {
            let t = Instant::now();
            let lse = logsumexp(logits);
            searches[row.job].record_row(row.node, |tok| logits[tok as usize] as f64 - lse);
            scoring_s += t.elapsed().as_secs_f64();
        };
        self.run_entries(&entries, |row, logits| collect(row, logits, &mut searches))?;
        // Phase B: label-trie nodes in rounds (one round unless pruning asks for more). In a
        // round each branch (a chosen node with no chosen descendant) gets a sequence copied
        // from its request; its path from the first label token is decoded, with logits only
        // where a row is still needed. As many branches per decode as free sequences allow.
        let per_pass = (self.work_seqs() - jobs.len()).max(1);
        loop {
            let rounds: Vec<Vec<usize>> = searches.iter().map(LabelSearch::next_round).collect();
            if rounds.iter().all(Vec::is_empty) {
                break;
            }
            let mut branches: Vec<(usize, usize)> = Vec::new();
            for (k, chosen) in rounds.iter().enumerate() {
                let trie = jobs[k].trie;
                for &d in chosen {
                    let below = chosen.iter().any(|&o| {
                        o != d && trie.is_ancestor_or_self(trie.decoded[d], trie.decoded[o])
                    });
                    if !below {
                        branches.push((k, trie.decoded[d]));
                    }
                }
            }
            for pass in branches.chunks(per_pass) {
                let first = base + jobs.len();
                for (i, &(k, _)) in pass.iter().enumerate() {
                    self.clear_seq(first + i);
                    self.ctx
                        .copy_kv_cache_seq((base + k) as i32, (first + i) as i32, None, None)
                        .map_err(|e| EngineError::Decode(e.to_string()))?;
                }
                let mut entries = Vec::new();
                for (k, job) in jobs.iter().enumerate() {
                    let trie = job.trie;
                    let n = job.tokens.len();
                    // Breadth first keeps each sequence's positions increasing.
                    for &node in &trie.decoded {
                        let seqs: Vec<i32> = pass
                            .iter()
                            .enumerate()
                            .filter(|(_, &(pk, leaf))| {
                                pk == k && trie.is_ancestor_or_self(node, leaf)
                            })
                            .map(|(i, _)| (first + i) as i32)
                            .collect();
                        if seqs.is_empty() {
                            continue;
                        }
                        // Every node on a decoded path is itself a decoded node.
                        let d = trie.decoded_index[node].unwrap_or_default();
                        let want = rounds[k].contains(&d) && !searches[k].row_done(d);
                        decoded[k] += 1;
                        entries.push(Entry {
                            token: trie.nodes[node].token,
                            pos: (n - 1 + trie.nodes[node].depth) as i32,
                            seqs,
                            row: want.then_some(RowId {
                                job: k,
                                node: Some(d),
                            }),
                        });
                    }
                }
                self.run_entries(&entries, |row, logits| collect(row, logits, &mut searches))?;
                for i in 0..pass.len() {
                    self.clear_seq(first + i);
                }
            }
        }
        for k in 0..jobs.len() {
            self.clear_seq(base + k);
        }
        let total_s = t0.elapsed().as_secs_f64();
        Ok(searches
            .iter()
            .zip(&reuse)
            .zip(&decoded)
            .map(|((search, &r), &decoded_tokens)| ScoreOut {
                labels: search.finish(),
                reused_tokens: r,
                decoded_tokens,
                decode_ms: (total_s - scoring_s) * 1e3,
                scoring_ms: scoring_s * 1e3,
                batch_jobs: jobs.len(),
            })
            .collect())
    }

    /// The reference path: each label scored by decoding the whole prompt plus that
    /// label from an empty sequence. Slow on purpose; tests and benchmarks compare against it.
    ///
    /// llama.cpp's CPU kernels round differently with batch size and with where the cells
    /// sit in the KV cache (measured: up to 0.3 nats on unlikely labels, about 0.01 in label
    /// probability), so paths agree within a tolerance, not bit for bit. `split_at` decodes
    /// `tokens[..split_at]` and the rest as separate batches, like the prefix-reuse path.
    pub fn score_naive(
        &mut self,
        tokens: &[Token],
        trie: &LabelTrie,
        split_at: Option<usize>,
    ) -> Result<ScoreOut, EngineError> {
        let t0 = Instant::now();
        let seq = self.n_prefix_slots;
        let n = tokens.len();
        let mut labels = Vec::new();
        let mut decoded = 0;
        let mut scoring_s = 0.0;
        for path in &trie.paths {
            let label: Vec<Token> = path.iter().map(|&i| trie.nodes[i].token).collect();
            self.clear_seq(seq);
            let all: Vec<Token> = tokens
                .iter()
                .chain(&label[..label.len() - 1])
                .copied()
                .collect();
            self.check_room(all.len())?;
            let entries: Vec<Entry> = all
                .iter()
                .enumerate()
                .map(|(i, &t)| Entry {
                    token: t,
                    pos: i as i32,
                    seqs: vec![seq as i32],
                    row: (i + 1 >= n).then_some(RowId {
                        job: i + 1 - n,
                        node: None,
                    }),
                })
                .collect();
            decoded += entries.len();
            let mut total = 0.0;
            let split = split_at.unwrap_or(0).min(entries.len());
            for part in [&entries[..split], &entries[split..]] {
                self.run_entries(part, |row, logits| {
                    let t = Instant::now();
                    // row.job is the label token index this row predicts.
                    total += logits[label[row.job] as usize] as f64 - logsumexp(logits);
                    scoring_s += t.elapsed().as_secs_f64();
                })?;
            }
            labels.push(LabelLogprob {
                total,
                mean: total / label.len() as f64,
                n_tokens: label.len(),
                pruned: false,
            });
        }
        self.clear_seq(seq);
        let total_s = t0.elapsed().as_secs_f64();
        Ok(ScoreOut {
            labels,
            reused_tokens: 0,
            decoded_tokens: decoded,
            decode_ms: (total_s - scoring_s) * 1e3,
            scoring_ms: scoring_s * 1e3,
            batch_jobs: 1,
        })
    }

    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// Prompt-processing rate in tokens/s, measured like llama-bench's `pp` test: `n_tokens`
    /// tokens (at most the free cells) decoded on an empty sequence in batches of `batch`,
    /// logits for each batch's last token only.
    pub fn prompt_rate(&mut self, n_tokens: usize, batch: usize) -> Result<f64, EngineError> {
        let free = self.n_ctx().saturating_sub(self.used_cells());
        let n = n_tokens.min(free);
        let batch = batch.clamp(1, self.n_batch);
        let text = "The quick brown fox jumps over the lazy dog while the committee reviews \
                    the quarterly budget and the weather turns to rain over the harbour. ";
        let pool = self.tokenize(text, false, false);
        if n == 0 || pool.is_empty() {
            return Ok(0.0);
        }
        let seq = self.n_prefix_slots as i32;
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                token: pool[i % pool.len()],
                pos: i as i32,
                seqs: vec![seq],
                row: ((i + 1) % batch == 0 || i + 1 == n).then_some(RowId { job: 0, node: None }),
            })
            .collect();
        self.clear_seq(seq as usize);
        let t = Instant::now();
        for chunk in entries.chunks(batch) {
            self.run_entries(chunk, |_, _| {})?;
        }
        let s = t.elapsed().as_secs_f64();
        self.clear_seq(seq as usize);
        Ok(n as f64 / s)
    }

    /// Decodes entries in batches bounded by n_batch and by the logits rows one decode
    /// may return; calls `on_row` with each requested row's logits.
    fn run_entries(
        &mut self,
        entries: &[Entry],
        mut on_row: impl FnMut(RowId, &[f32]),
    ) -> Result<(), EngineError> {
        let mut i = 0;
        while i < entries.len() {
            self.batch.clear();
            let mut rows = Vec::new();
            while i < entries.len() && (self.batch.n_tokens() as usize) < self.n_batch {
                let e = &entries[i];
                if e.row.is_some() && rows.len() == self.max_logit_rows {
                    break;
                }
                let idx = self.batch.n_tokens();
                self.batch
                    .add(LlamaToken(e.token), e.pos, &e.seqs, e.row.is_some())
                    .map_err(|err| EngineError::Decode(err.to_string()))?;
                if let Some(r) = e.row {
                    rows.push((idx, r));
                }
                i += 1;
            }
            self.ctx.decode(&mut self.batch).map_err(|e| match e {
                llama_cpp_2::DecodeError::NoKvCacheSlot => EngineError::ContextFull {
                    need: self.batch.n_tokens() as usize,
                    free: 0,
                    n_ctx: self.info.n_ctx,
                },
                other => EngineError::Decode(other.to_string()),
            })?;
            for (idx, r) in rows {
                on_row(r, self.ctx.get_logits_ith(idx));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct RowId {
    job: usize,
    /// None: the prompt's last token; Some(k): decoded trie node k.
    node: Option<usize>,
}

struct Entry {
    token: Token,
    pos: i32,
    seqs: Vec<i32>,
    row: Option<RowId>,
}

fn llama_kv(t: KvCacheType) -> LlamaKv {
    match t {
        KvCacheType::F16 => LlamaKv::F16,
        KvCacheType::Q8_0 => LlamaKv::Q8_0,
    }
}

/// llama.cpp sizes its output buffers for `n_outputs_max` rows of logits (default: n_batch,
/// 1 MiB each for Gemma 3); llama-cpp-2 0.1.160 has no setter, so set the field directly.
fn with_n_outputs_max(params: LlamaContextParams, n: u32) -> LlamaContextParams {
    // SAFETY: LlamaContextParams is a struct with the single field
    // `context_params: llama_context_params` (llama-cpp-2 0.1.160, pinned with `=` in
    // Cargo.toml); transmute checks at compile time that the sizes are equal, and a struct
    // of one field has that field's layout.
    let mut raw: llama_cpp_sys_2::llama_context_params = unsafe { std::mem::transmute(params) };
    raw.n_outputs_max = n;
    // SAFETY: as above, the inverse conversion.
    unsafe { std::mem::transmute(raw) }
}

// ---------------------------------------------------------------------------------------
// Free generation under a GBNF grammar (the ReAct loop). Its own sequence, its own cache
// record; the scoring paths above are untouched.

/// What the generation sequence holds, owned by the caller so that successive prompts that
/// share a beginning (one ReAct run's steps, or runs of the same task) decode only the new
/// tokens. The engine checks it against the KV cache before trusting it.
#[derive(Debug, Default, Clone)]
pub struct GenCache {
    tokens: Vec<Token>,
}

impl GenCache {
    /// Tokens in the cache now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

/// One generation: the grammar (GBNF, root rule `root`), budgets and sampling.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    /// GBNF text; `None` generates freely (the no-grammar baseline).
    pub grammar: Option<&'a str>,
    /// Generated tokens at most.
    pub max_tokens: usize,
    /// 0: greedy (deterministic whatever the seed); above: top-k sampling at this
    /// temperature with a seeded generator.
    pub temperature: f32,
    pub seed: u64,
    /// Generation stops between tokens once this instant has passed.
    pub deadline: Option<Instant>,
    /// A prefix slot (see [`Engine::set_prefix_cached`]) whose cells are copied into the
    /// generation sequence when they match the prompt's beginning further than the cache.
    pub prefix_slot: Option<usize>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerateStop {
    /// An end-of-generation token: the grammar is complete (only end tokens were allowed)
    /// or, without a grammar, the model ended.
    Complete,
    /// The caller's stop rule said so.
    StopRule,
    /// `max_tokens` generated.
    MaxTokens,
    /// The deadline passed.
    Deadline,
}

/// What a generation produced and measured.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub tokens: Vec<Token>,
    pub stop: GenerateStop,
    /// Prompt tokens, and how many were already in the generation sequence.
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    /// Wall time decoding the new prompt tokens, and generating.
    pub prefill_ms: f64,
    pub generate_ms: f64,
}

/// Candidates checked one by one against the grammar before the whole vocabulary is.
const GRAMMAR_FAST_CANDIDATES: usize = 64;
/// Candidates kept for temperature sampling.
const SAMPLE_TOP_K: usize = 40;

/// Indices of the `k` largest logits, largest first (ties: lower id first).
fn top_k_tokens(logits: &[f32], k: usize) -> Vec<Token> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let cmp = |a: &usize, b: &usize| {
        logits[*b]
            .partial_cmp(&logits[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| i as Token).collect()
}

impl Engine {
    /// A grammar sampler for `gbnf` (root rule `root`); an error when llama.cpp cannot
    /// parse it (its log says where).
    fn grammar_sampler(
        &self,
        gbnf: &str,
    ) -> Result<llama_cpp_2::sampling::LlamaSampler, EngineError> {
        llama_cpp_2::sampling::LlamaSampler::grammar(self.model, gbnf, "root")
            .map_err(|e| EngineError::Grammar(format!("llama.cpp rejected the grammar: {e}")))
    }

    /// Whether the grammar lets `token` come next: the token alone in a candidate array,
    /// the grammar applied, its logit still finite.
    fn grammar_allows(grammar: &mut llama_cpp_2::sampling::LlamaSampler, token: Token) -> bool {
        use llama_cpp_2::token::data::LlamaTokenData;
        use llama_cpp_2::token::data_array::LlamaTokenDataArray;
        let mut one = LlamaTokenDataArray::new(
            vec![LlamaTokenData::new(LlamaToken(token), 0.0, 0.0)],
            false,
        );
        grammar.apply(&mut one);
        one.data.first().is_some_and(|d| d.logit().is_finite())
    }

    /// Tokens the grammar allows among all of the vocabulary, with their logits.
    fn grammar_survivors(
        grammar: &mut llama_cpp_2::sampling::LlamaSampler,
        logits: &[f32],
    ) -> Vec<(Token, f32)> {
        use llama_cpp_2::token::data::LlamaTokenData;
        use llama_cpp_2::token::data_array::LlamaTokenDataArray;
        let mut all = LlamaTokenDataArray::new(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0))
                .collect(),
            false,
        );
        grammar.apply(&mut all);
        all.data
            .iter()
            .filter(|d| d.logit().is_finite())
            .map(|d| (d.id().0, d.logit()))
            .collect()
    }

    /// The next token: greedy or seeded top-k sampling, restricted to what the grammar
    /// allows. The likeliest candidates are checked one at a time first (cheap); only when
    /// none passes is the grammar applied to the whole vocabulary.
    fn pick_token(
        grammar: Option<&mut llama_cpp_2::sampling::LlamaSampler>,
        logits: &[f32],
        temperature: f32,
        rng: &mut SplitMix64,
    ) -> Result<Token, EngineError> {
        let greedy = temperature <= 0.0;
        let k = if greedy {
            GRAMMAR_FAST_CANDIDATES
        } else {
            SAMPLE_TOP_K
        };
        let top = top_k_tokens(logits, k);
        let mut pool: Vec<(Token, f32)> = match grammar {
            None => top.iter().map(|&t| (t, logits[t as usize])).collect(),
            Some(g) => {
                let fast: Vec<(Token, f32)> = if greedy {
                    top.iter()
                        .copied()
                        .find(|&t| Self::grammar_allows(g, t))
                        .map(|t| vec![(t, logits[t as usize])])
                        .unwrap_or_default()
                } else {
                    top.iter()
                        .copied()
                        .filter(|&t| Self::grammar_allows(g, t))
                        .map(|t| (t, logits[t as usize]))
                        .collect()
                };
                if fast.is_empty() {
                    let mut all = Self::grammar_survivors(g, logits);
                    all.sort_by(|a, b| {
                        b.1.partial_cmp(&a.1)
                            .unwrap_or(std::cmp::Ordering::Equal)
                            .then(a.0.cmp(&b.0))
                    });
                    all.truncate(k);
                    all
                } else {
                    fast
                }
            }
        };
        if pool.is_empty() {
            return Err(EngineError::Grammar(
                "no token of the vocabulary is allowed here".into(),
            ));
        }
        if greedy || pool.len() == 1 {
            return Ok(pool[0].0);
        }
        let max = pool[0].1;
        let weights: Vec<f64> = pool
            .iter()
            .map(|&(_, l)| (((l - max) / temperature) as f64).exp())
            .collect();
        let sum: f64 = weights.iter().sum();
        let mut r = rng.next_f64() * sum;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return Ok(pool[i].0);
            }
            r -= w;
        }
        // Rounding left r at the end: the last candidate.
        Ok(pool.pop().map(|p| p.0).unwrap_or_default())
    }

    /// Generates after `prompt` on the generation sequence (the first work sequence),
    /// under `req.grammar`, until the grammar is complete (an end token is the only one
    /// allowed), `stop` says so for the text so far, `max_tokens`, or the deadline.
    /// Prompt tokens already in `cache` (a common beginning) are not decoded again.
    pub fn generate(
        &mut self,
        cache: &mut GenCache,
        prompt: &[Token],
        req: &GenerateRequest,
        stop: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generated, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::Decode("empty prompt".into()));
        }
        let t0 = Instant::now();
        let seq = self.n_prefix_slots;
        let mut grammar = match req.grammar {
            Some(g) => Some(self.grammar_sampler(g)?),
            None => None,
        };
        // Trust the record only when the sequence holds exactly that many cells (scoring
        // uses the same sequence ids and clears them).
        if self.ctx.kv_cache_seq_pos_max(seq as i32) + 1 != cache.tokens.len() as i32 {
            self.clear_seq(seq);
            cache.tokens.clear();
        }
        let mut common = cache
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        if let Some(slot) = req.prefix_slot.filter(|&s| s < self.n_prefix_slots) {
            let from_slot = self.prefixes[slot]
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1);
            if from_slot > common {
                // The unified KV cache makes this copy metadata only.
                self.clear_seq(seq);
                cache.tokens.clear();
                self.ctx
                    .copy_kv_cache_seq(slot as i32, seq as i32, Some(0), Some(from_slot as u32))
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
                cache.tokens = prompt[..from_slot].to_vec();
                common = from_slot;
            }
        }
        if common < cache.tokens.len() {
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(common as u32), None);
            cache.tokens.truncate(common);
        }
        let free = self
            .n_ctx()
            .saturating_sub(self.used_cells() + cache.tokens.len());
        let need = prompt.len() - common + req.max_tokens;
        if need > free {
            return Err(EngineError::ContextFull {
                need,
                free,
                n_ctx: self.info.n_ctx,
            });
        }
        let entries: Vec<Entry> = prompt
            .iter()
            .enumerate()
            .skip(common)
            .map(|(i, &t)| Entry {
                token: t,
                pos: i as i32,
                seqs: vec![seq as i32],
                row: (i + 1 == prompt.len()).then_some(RowId { job: 0, node: None }),
            })
            .collect();
        let mut logits: Vec<f32> = Vec::new();
        let decoded = self.run_entries(&entries, |_, l| logits = l.to_vec());
        // A failed decode leaves the sequence in an unknown state: start over next time.
        cache.tokens.clear();
        decoded?;
        cache.tokens = prompt.to_vec();
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut rng = SplitMix64(req.seed);
        let mut out = Generated {
            text: String::new(),
            tokens: Vec::new(),
            stop: GenerateStop::MaxTokens,
            prompt_tokens: prompt.len(),
            reused_tokens: common,
            prefill_ms,
            generate_ms: 0.0,
        };
        let mut bytes: Vec<u8> = Vec::new();
        while out.tokens.len() < req.max_tokens {
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                out.stop = GenerateStop::Deadline;
                break;
            }
            let tok = Self::pick_token(grammar.as_mut(), &logits, req.temperature, &mut rng)?;
            if self.model.vocab().is_eog(LlamaToken(tok)) {
                out.stop = GenerateStop::Complete;
                break;
            }
            if let Some(g) = grammar.as_mut() {
                g.try_accept(LlamaToken(tok)).map_err(|e| {
                    EngineError::Grammar(format!("the grammar refused token {tok}: {e}"))
                })?;
            }
            bytes.extend(
                self.model
                    .vocab()
                    .token_to_piece(LlamaToken(tok), false, None),
            );
            out.tokens.push(tok);
            out.text = String::from_utf8_lossy(&bytes).into_owned();
            if stop(&out.text) {
                out.stop = GenerateStop::StopRule;
                break;
            }
            if out.tokens.len() == req.max_tokens {
                break;
            }
            let pos = cache.tokens.len() as i32;
            let entry = Entry {
                token: tok,
                pos,
                seqs: vec![seq as i32],
                row: Some(RowId { job: 0, node: None }),
            };
            let decoded = self.run_entries(std::slice::from_ref(&entry), |_, l| {
                logits.clear();
                logits.extend_from_slice(l);
            });
            if decoded.is_err() {
                cache.tokens.clear();
            }
            decoded?;
            cache.tokens.push(tok);
        }
        out.generate_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }

    /// Whether llama.cpp's grammar engine accepts `text` as a complete sentence of `gbnf`
    /// (tokenized as the model would generate it). For tests and checks of task files.
    pub fn grammar_accepts(&self, gbnf: &str, text: &str) -> Result<bool, EngineError> {
        let mut g = self.grammar_sampler(gbnf)?;
        for t in self.tokenize(text, false, false) {
            if !Self::grammar_allows(&mut g, t) || g.try_accept(LlamaToken(t)).is_err() {
                return Ok(false);
            }
        }
        // Complete when an end-of-generation token is allowed now.
        let eos = self.model.vocab().eos().0;
        Ok(Self::grammar_allows(&mut g, eos))
    }
}
/// The final hidden states of one token sequence (after the model's output norm, the input
/// of the output projection), pooled two ways.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledStates {
    /// The last token's hidden state.
    pub last: Vec<f32>,
    /// The mean over every token but the first (the BOS token, whose state does not depend
    /// on the input); the one token's state for a one-token sequence.
    pub mean: Vec<f32>,
}

/// Settings of a [`FeatureContext`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureParams {
    /// Tokens per decode; also the longest sequence accepted. llama.cpp keeps n_vocab f32 of
    /// logits for every token of an embeddings batch (1 MiB each for Gemma 3), twice (output
    /// buffer and compute buffer): this is the context's memory knob.
    pub n_batch_tokens: u32,
    /// Sequences decoded together at most.
    pub n_seq_max: u32,
    pub threads: u32,
}

impl FeatureParams {
    /// The defaults with the board's threads.
    pub fn for_config(cfg: &EngineConfig) -> FeatureParams {
        FeatureParams {
            threads: cfg.threads_batch.max(1),
            ..FeatureParams::default()
        }
    }
}

impl Default for FeatureParams {
    fn default() -> Self {
        FeatureParams {
            n_batch_tokens: 64,
            n_seq_max: 8,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)) as u32,
        }
    }
}

/// A second llama.cpp context on the engine's model, with embeddings on and no pooling:
/// reads every token's final hidden state. For frozen-feature heads (`edgeact tune --head`).
pub struct FeatureContext {
    ctx: LlamaContext<'static>,
    batch: LlamaBatch<'static>,
    n_embd: usize,
    n_batch: usize,
    n_seq_max: usize,
}

impl Engine {
    /// Width of the model's hidden states (the features a head reads).
    pub fn n_embd(&self) -> usize {
        self.model.n_embd_out().max(0) as usize
    }

    /// Creates a [`FeatureContext`] on this engine's model (the scoring context stays as it is).
    pub fn feature_context(&self, params: FeatureParams) -> Result<FeatureContext, EngineError> {
        let n_batch = params.n_batch_tokens.max(8);
        let n_seq_max = params.n_seq_max.clamp(1, 64);
        // Every sequence fits one decode and the cache is cleared after each: n_batch cells
        // are enough; llama.cpp pads n_ctx to 256.
        let n_ctx = n_batch.div_ceil(256) * 256;
        let cparams = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_seq_max(n_seq_max)
            .with_n_threads(params.threads as i32)
            .with_n_threads_batch(params.threads as i32)
            .with_kv_unified(true)
            .with_embeddings(true)
            .with_pooling_type(llama_cpp_2::context::params::LlamaPoolingType::None);
        let backend = backend()?;
        let ctx = self
            .model
            .new_context(backend, cparams)
            .map_err(|e| EngineError::Context {
                n_ctx,
                reason: e.to_string(),
            })?;
        Ok(FeatureContext {
            ctx,
            batch: LlamaBatch::new(n_batch as usize, 1),
            n_embd: self.n_embd(),
            n_batch: n_batch as usize,
            n_seq_max: n_seq_max as usize,
        })
    }
}

impl FeatureContext {
    /// Longest sequence [`FeatureContext::hidden_states`] accepts.
    pub fn max_tokens(&self) -> usize {
        self.n_batch
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// The pooled final hidden states of each sequence, in order. Whole sequences are packed
    /// into decodes (each on its own KV sequence); `on_progress` gets the number done after
    /// each decode. A sequence that is empty or longer than [`FeatureContext::max_tokens`] is
    /// an error: cut inputs before.
    pub fn hidden_states(
        &mut self,
        seqs: &[Vec<Token>],
        mut on_progress: impl FnMut(usize),
    ) -> Result<Vec<PooledStates>, EngineError> {
        if let Some((i, s)) = seqs
            .iter()
            .enumerate()
            .find(|(_, s)| s.is_empty() || s.len() > self.n_batch)
        {
            return Err(EngineError::Decode(format!(
                "feature sequence {i} has {} tokens; 1..={} fit one decode",
                s.len(),
                self.n_batch
            )));
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < seqs.len()
                && end - start < self.n_seq_max
                && tokens + seqs[end].len() <= self.n_batch
            {
                tokens += seqs[end].len();
                end += 1;
            }
            self.ctx.clear_kv_cache();
            self.batch.clear();
            for (k, s) in seqs[start..end].iter().enumerate() {
                for (pos, &t) in s.iter().enumerate() {
                    self.batch
                        .add(LlamaToken(t), pos as i32, &[k as i32], true)
                        .map_err(|e| EngineError::Decode(e.to_string()))?;
                }
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            let mut idx = 0i32;
            for s in &seqs[start..end] {
                let mut sum = vec![0f64; self.n_embd];
                let mut last = Vec::new();
                for pos in 0..s.len() {
                    let e = self.ctx.embeddings_ith(idx).map_err(|e| {
                        EngineError::Decode(format!("no hidden state for token {idx}: {e}"))
                    })?;
                    if pos > 0 || s.len() == 1 {
                        for (a, &v) in sum.iter_mut().zip(e) {
                            *a += v as f64;
                        }
                    }
                    if pos + 1 == s.len() {
                        last = e.to_vec();
                    }
                    idx += 1;
                }
                let n = (s.len() - 1).max(1) as f64;
                out.push(PooledStates {
                    last,
                    mean: sum.into_iter().map(|v| (v / n) as f32).collect(),
                });
            }
            self.ctx.clear_kv_cache();
            start = end;
            on_progress(start);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod generate_tests {
    use super::*;

    #[test]
    fn top_k_is_ordered_with_ties_by_id() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.0];
        assert_eq!(top_k_tokens(&logits, 3), vec![1, 3, 4]);
        assert_eq!(top_k_tokens(&logits, 10), vec![1, 3, 4, 0, 2]);
        assert!(top_k_tokens(&logits, 0).is_empty());
    }

    #[test]
    fn seeded_generator_repeats_and_stays_in_range() {
        let a: Vec<f64> = (0..5)
            .scan(SplitMix64(7), |g, _| Some(g.next_f64()))
            .collect();
        let b: Vec<f64> = (0..5)
            .scan(SplitMix64(7), |g, _| Some(g.next_f64()))
            .collect();
        let c: Vec<f64> = (0..5)
            .scan(SplitMix64(8), |g, _| Some(g.next_f64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|x| (0.0..1.0).contains(x)));
    }

    #[test]
    fn picking_without_a_grammar_is_greedy_or_seeded() {
        let logits = [0.0, 3.0, 2.9, -5.0];
        let mut rng = SplitMix64(1);
        assert_eq!(Engine::pick_token(None, &logits, 0.0, &mut rng).unwrap(), 1);
        let draw = |seed| {
            let mut rng = SplitMix64(seed);
            (0..20)
                .map(|_| Engine::pick_token(None, &logits, 1.0, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        assert!(d.contains(&1) && d.contains(&2), "{d:?}");
    }
}
