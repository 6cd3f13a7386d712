//! Loading: the file checks a user meets in order (missing, not GGUF, wrong checksum, does
//! not fit), the checksum sidecar, the memory preflight, llama.cpp's model and context
//! parameters, and [`Engine::load`].

use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType as LlamaKv, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaLoraAdapter, LlamaModel};
use sha2::{Digest, Sha256};

use super::label_rows;
use super::tap::{self, TapBox};
use super::{Engine, EngineError};
use crate::model::budget::{self, ContextPlan, Fitted, KvCacheType, ModelShape};
use crate::model::config::{EngineConfig, LoraAdapter};
use crate::model::gguf::{self, GgufError};

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

static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

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
pub(super) fn file_sha256_uncached(path: &Path) -> std::io::Result<String> {
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
    preflight_header(cfg, n_prefix_slots).map(|(sha, shape, fitted, _)| (sha, shape, fitted))
}

/// [`preflight`], also returning the header it read.
fn preflight_header(
    cfg: &EngineConfig,
    n_prefix_slots: usize,
) -> Result<(String, ModelShape, Fitted, gguf::Header), EngineError> {
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
    let extras = budget::Extras {
        load_weights: cfg.load_weights,
        feature_batch_tokens: cfg.feature_batch_tokens.clone(),
        // llama.cpp reads the adapter's tensors into memory (not mapped).
        lora_bytes: match &cfg.lora {
            Some(l) => gguf::read_header(&l.path)?.tensor_bytes(),
            None => 0,
        },
        encoder_bytes: cfg.encoder_bytes,
    };
    let fitted = budget::fit(
        &shape,
        wanted,
        &extras,
        cfg.memory_budget_mib,
        cfg.allow_ctx_shrink,
        256,
    )
    .map_err(|source| EngineError::Budget {
        path: cfg.model_path.clone(),
        source,
    })?;
    Ok((sha, shape, fitted, header))
}

/// The model as planned without loading it: the file checked (GGUF header, checksum) and
/// the memory fitted to the budget for `n_prefix_slots` prefix slots. What a run reports
/// when it does not load the weights (yet, or at all).
pub fn planned_info(cfg: &EngineConfig, n_prefix_slots: usize) -> Result<ModelInfo, EngineError> {
    let (sha256, shape, fitted) = preflight(cfg, n_prefix_slots)?;
    Ok(ModelInfo {
        path: cfg.model_path.clone(),
        sha256,
        architecture: shape.architecture.clone(),
        board: cfg.board.clone(),
        n_ctx: fitted.plan.n_ctx,
        shrunk_from_ctx: fitted.shrunk_from_ctx,
        estimate_mib: fitted.estimate.total_mib(),
        estimate: fitted.estimate.clone(),
        load_ms: 0.0,
    })
}

/// Sequences: one per prefix slot, plus work sequences for requests and label branches.
fn n_seq_max(cfg: &EngineConfig, n_prefix_slots: usize) -> u32 {
    (n_prefix_slots as u32 + cfg.max_logit_rows.max(4)).min(256)
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

/// Model parameters from the config; layers asked for a GPU that is not there run on the
/// CPU, with a warning that says why.
fn model_params(cfg: &EngineConfig) -> LlamaModelParams {
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
    mparams
}

/// The scoring context's parameters for the fitted plan and the decode size `n_batch`.
fn context_params(cfg: &EngineConfig, plan: &ContextPlan, n_batch: u32) -> LlamaContextParams {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(plan.n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(cfg.n_ubatch.min(n_batch))
        .with_n_seq_max(plan.n_seq_max)
        .with_n_threads(cfg.threads as i32)
        .with_n_threads_batch(cfg.threads_batch as i32)
        .with_type_k(llama_kv(cfg.kv_cache_type))
        .with_type_v(llama_kv(cfg.kv_cache_type))
        .with_kv_unified(true)
        .with_swa_full(true);
    // llama.cpp keeps at least one logits row per sequence (it asserts this).
    with_n_outputs_max(params, cfg.max_logit_rows.max(plan.n_seq_max))
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

impl Engine {
    /// Checks, plans and loads. `n_prefix_slots` is how many fixed prefixes (one per task)
    /// stay cached.
    pub fn load(cfg: &EngineConfig, n_prefix_slots: usize) -> Result<Engine, EngineError> {
        let started = Instant::now();
        // Loading the engine loads the weights, whatever the tasks planned: count them.
        let cfg = &EngineConfig {
            load_weights: true,
            ..cfg.clone()
        };
        let (sha256, shape, fitted, header) = preflight_header(cfg, n_prefix_slots)?;
        let tied = label_rows::tied_output(&cfg.model_path, &header).and_then(|t| {
            // A GPU computes the projection with its own kernels, and an adapter on the
            // embedding changes the output rows: both keep the full logits row.
            if cfg.gpu_layers > 0 {
                return Err("layers are offloaded to a GPU".to_string());
            }
            if let Some(l) = &cfg.lora {
                let adapter = gguf::read_header(&l.path).map_err(|e| e.to_string())?;
                if label_rows::adapter_changes_output(&adapter) {
                    return Err("the LoRA adapter changes the token embedding".to_string());
                }
            }
            Ok(t)
        });
        if let Err(why) = &tied {
            tracing::info!("labels are scored from the full logits rows: {why}");
        }
        if let Some(from) = fitted.shrunk_from_ctx {
            tracing::warn!(
                from,
                to = fitted.plan.n_ctx,
                budget_mib = cfg.memory_budget_mib,
                "n_ctx shrunk to fit the memory budget"
            );
        }
        let backend = backend()?;
        let mparams = model_params(cfg);
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
        let params = context_params(cfg, &plan, n_batch);
        let tap = tied.is_ok().then(TapBox::new);
        let params = match &tap {
            Some(t) => tap::with_tap(params, t),
            None => params,
        };
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
            tap,
            batch: LlamaBatch::new(n_batch as usize, n_seq_max as i32),
            info,
            n_batch: n_batch as usize,
            n_ubatch: cfg.n_ubatch.min(n_batch) as usize,
            max_logit_rows: cfg.max_logit_rows as usize,
            n_prefix_slots,
            n_seq_max: n_seq_max as usize,
            prefixes: vec![Vec::new(); n_prefix_slots],
            prefix_cache_dir: cfg.prefix_cache_dir.clone(),
            kv_cache_type: cfg.kv_cache_type,
            lora,
            decode_counts: super::DecodeCounts::default(),
            tied,
            label_rows: Vec::new(),
        })
    }
}
