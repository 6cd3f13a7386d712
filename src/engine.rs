//! The model: checks and loads a GGUF file through llama.cpp under the memory budget,
//! keeps task prefixes in the KV cache, and scores label token sequences. The only module
//! that touches llama-cpp-2; one inference thread owns an [`Engine`].

use std::collections::HashMap;
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

use crate::budget::{self, BudgetError, ContextPlan, Fitted, KvCacheType, ModelShape};
use crate::config::EngineConfig;
use crate::gguf::{self, GgufError};
use crate::scoring::{logsumexp, LabelLogprob, LabelTrie, Token};
use crate::task::{LoraAdapter, Task};

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

/// `cfg` with the LoRA adapter that `tasks` name (see [`lora_for_tasks`]).
pub fn config_for_tasks<'a>(
    cfg: &EngineConfig,
    tasks: impl IntoIterator<Item = &'a Task>,
) -> Result<EngineConfig, EngineError> {
    let mut cfg = cfg.clone();
    cfg.lora = lora_for_tasks(tasks)?;
    Ok(cfg)
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
        if cfg.gpu_layers > 0 && !backend.supports_gpu_offload() {
            tracing::warn!(
                "gpu_layers = {} but this build has no GPU backend: running on the CPU",
                cfg.gpu_layers
            );
            mparams = mparams.with_n_gpu_layers(0);
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
        let mut logprobs: Vec<HashMap<(Option<usize>, Token), f64>> =
            vec![HashMap::new(); jobs.len()];
        let mut scoring_s = 0.0;
        let mut collect = |row: RowId, logits: &[f32], logprobs: &mut Vec<HashMap<_, f64>>| {
            let t = Instant::now();
            let lse = logsumexp(logits);
            for tok in jobs[row.job].trie.needed(row.node) {
                logprobs[row.job].insert((row.node, tok), logits[tok as usize] as f64 - lse);
            }
            scoring_s += t.elapsed().as_secs_f64();
        };
        self.run_entries(&entries, |row, logits| collect(row, logits, &mut logprobs))?;
        // Phase B: label-trie nodes, one sequence per branch, as many branches per decode
        // as free sequences allow. Each branch starts as a copy of its request sequence.
        let mut branches: Vec<(usize, usize)> = Vec::new();
        for (k, job) in jobs.iter().enumerate() {
            if !job.trie.decoded.is_empty() {
                branches.extend((0..job.trie.n_branches).map(|b| (k, b)));
            }
        }
        let per_pass = self.work_seqs() - jobs.len();
        for pass in branches.chunks(per_pass.max(1)) {
            let first = base + jobs.len();
            for (i, &(k, _)) in pass.iter().enumerate() {
                self.clear_seq(first + i);
                self.ctx
                    .copy_kv_cache_seq((base + k) as i32, (first + i) as i32, None, None)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
            let mut entries = Vec::new();
            for (k, job) in jobs.iter().enumerate() {
                let n = job.tokens.len();
                for (d, &node) in job.trie.decoded.iter().enumerate() {
                    let seqs: Vec<i32> = pass
                        .iter()
                        .enumerate()
                        .filter(|(_, &(pk, b))| pk == k && job.trie.branches_of[d].contains(&b))
                        .map(|(i, _)| (first + i) as i32)
                        .collect();
                    // A node shared with a branch of an earlier pass is decoded again: this
                    // pass's sequences start from the request and need it in their cache.
                    if seqs.is_empty() {
                        continue;
                    }
                    entries.push(Entry {
                        token: job.trie.nodes[node].token,
                        pos: (n - 1 + job.trie.nodes[node].depth) as i32,
                        seqs,
                        row: Some(RowId {
                            job: k,
                            node: Some(d),
                        }),
                    });
                }
            }
            self.run_entries(&entries, |row, logits| collect(row, logits, &mut logprobs))?;
            for i in 0..pass.len() {
                self.clear_seq(first + i);
            }
        }
        for k in 0..jobs.len() {
            self.clear_seq(base + k);
        }
        let total_s = t0.elapsed().as_secs_f64();
        Ok(jobs
            .iter()
            .zip(&reuse)
            .zip(&logprobs)
            .map(|((job, &r), lp)| ScoreOut {
                labels: job.trie.label_logprobs(|row, tok| {
                    lp.get(&(row, tok)).copied().unwrap_or(f64::NEG_INFINITY)
                }),
                reused_tokens: r,
                decoded_tokens: job.tokens.len() - r + job.trie.decoded.len(),
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
