//! Memory budget arithmetic: what a model, its KV cache and compute buffers will take,
//! decided before anything is loaded, and the context size that fits.

use crate::model::gguf::Header;

const MIB: u64 = 1024 * 1024;

/// Fixed cost of the process besides the model: binary, tokenizer tables, allocator slack.
/// Measured: RSS of the process with a vocab-only load is about 60 MiB.
pub const OVERHEAD_BYTES: u64 = 64 * MIB;

/// Host-side compute buffer with GPU offload, in bytes per micro-batch token per embedding
/// dimension (input embeddings and the graph's CPU-side tensors): an allowance (two f32
/// copies of the micro-batch's embeddings), not fitted yet.
const HOST_COMPUTE_PER_UBATCH_TOKEN: u64 = 8;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    #[error("model metadata lacks `{key}`, needed to size the KV cache")]
    MissingKey { key: String },
    #[error(
        "the model does not fit the memory budget: needs {need_mib} MiB ({detail}) but memory_budget_mib is {budget_mib}; \
         raise memory_budget_mib, lower n_ctx or n_ubatch, use kv_cache_type = \"q8_0\", or set allow_ctx_shrink = true"
    )]
    DoesNotFit {
        need_mib: u64,
        budget_mib: u64,
        detail: String,
    },
    #[error(
        "even the smallest context ({min_ctx} tokens) needs {need_mib} MiB ({detail}), over memory_budget_mib {budget_mib}"
    )]
    CannotShrink {
        min_ctx: u32,
        need_mib: u64,
        budget_mib: u64,
        detail: String,
    },
}

/// KV cache element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheType {
    F16,
    Q8_0,
}

impl KvCacheType {
    /// Bytes per element, as a fraction (q8_0 stores 32 values in 34 bytes).
    fn bytes_per_elem(self) -> (u64, u64) {
        match self {
            KvCacheType::F16 => (2, 1),
            KvCacheType::Q8_0 => (34, 32),
        }
    }
}

/// The model dimensions that decide memory use.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub architecture: String,
    pub n_layer: u64,
    pub n_head_kv: u64,
    pub key_length: u64,
    pub value_length: u64,
    pub n_embd: u64,
    pub n_vocab: u64,
    pub n_ctx_train: u64,
    pub tensor_bytes: u64,
    /// The token-embedding matrix's bytes when the model ties its output projection to it
    /// (no `output.weight` tensor), else 0. Offloading the output layer makes llama.cpp load
    /// a second copy of it onto the GPU (the CPU keeps its own for the embedding lookup).
    pub tied_output_bytes: u64,
}

impl ModelShape {
    pub fn from_header(h: &Header) -> Result<Self, BudgetError> {
        let arch = h
            .architecture()
            .ok_or_else(|| BudgetError::MissingKey {
                key: "general.architecture".into(),
            })?
            .to_string();
        let need = |suffix: &str| {
            h.arch_uint(suffix).ok_or_else(|| BudgetError::MissingKey {
                key: format!("{arch}.{suffix}"),
            })
        };
        let n_embd = need("embedding_length")?;
        let n_head = need("attention.head_count")?;
        let n_head_kv = h.arch_uint("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = n_embd / n_head.max(1);
        let n_vocab = match h.metadata.get("tokenizer.ggml.tokens") {
            Some(crate::model::gguf::Value::Array { len }) => *len,
            _ => {
                return Err(BudgetError::MissingKey {
                    key: "tokenizer.ggml.tokens".into(),
                })
            }
        };
        Ok(ModelShape {
            n_layer: need("block_count")?,
            n_head_kv,
            key_length: h.arch_uint("attention.key_length").unwrap_or(head_dim),
            value_length: h.arch_uint("attention.value_length").unwrap_or(head_dim),
            n_embd,
            n_vocab,
            n_ctx_train: need("context_length")?,
            tensor_bytes: h.tensor_bytes(),
            tied_output_bytes: if h.tensors.iter().any(|t| t.name == "output.weight") {
                0
            } else {
                h.tensor_data_bytes("token_embd.weight").unwrap_or(0)
            },
            architecture: arch,
        })
    }
}

/// What the context will be created with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextPlan {
    pub n_ctx: u32,
    pub n_ubatch: u32,
    /// Most rows of logits one decode may return (each row is n_vocab f32).
    pub max_logit_rows: u32,
    /// Sequences in the KV cache; llama.cpp keeps a logits row per sequence at least.
    pub n_seq_max: u32,
    pub kv_cache_type: KvCacheType,
    /// Layers offloaded to a GPU (llama.cpp's n_gpu_layers: more than the model's layers
    /// offloads the output layer too).
    pub gpu_layers: u32,
}

/// The estimate, in bytes, itemised.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub logits_bytes: u64,
    /// What offloading adds on a board whose GPU shares its memory (Jetson, integrated GPUs,
    /// lavapipe): see [`offload_bytes`].
    pub offload_bytes: u64,
    pub overhead_bytes: u64,
}

impl Estimate {
    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.logits_bytes
            + self.offload_bytes
            + self.overhead_bytes
    }
    pub fn total_mib(&self) -> u64 {
        self.total_bytes().div_ceil(MIB)
    }
    pub fn detail(&self) -> String {
        format!(
            "weights {} + KV cache {} + compute {} + logits {} + {}overhead {} MiB",
            self.weights_bytes.div_ceil(MIB),
            self.kv_bytes.div_ceil(MIB),
            self.compute_bytes.div_ceil(MIB),
            self.logits_bytes.div_ceil(MIB),
            if self.offload_bytes > 0 {
                format!("GPU offload {} + ", self.offload_bytes.div_ceil(MIB))
            } else {
                String::new()
            },
            self.overhead_bytes.div_ceil(MIB)
        )
    }
}

/// llama.cpp rounds the context up to a multiple of 256.
pub fn padded_ctx(n_ctx: u32) -> u32 {
    n_ctx.div_ceil(256).max(1) * 256
}

/// KV cache bytes for `n_ctx` cells over all layers (sliding-window layers are counted
/// full: edgeact creates the context with a full-size SWA cache so prefixes can be reused).
pub fn kv_bytes(shape: &ModelShape, n_ctx: u32, kv: KvCacheType) -> u64 {
    let (num, den) = kv.bytes_per_elem();
    let elems = padded_ctx(n_ctx) as u64
        * shape.n_layer
        * shape.n_head_kv
        * (shape.key_length + shape.value_length);
    (elems * num).div_ceil(den)
}

/// Compute (scratch) buffer of one micro-batch: the output projection of up to
/// `max_logit_rows` rows of n_vocab logits dominates for small models, plus activations
/// and attention scores of `n_ubatch` tokens. Fitted against llama.cpp's own "compute buffer size" log lines (README).
pub fn compute_bytes(shape: &ModelShape, plan: &ContextPlan) -> u64 {
    let u = plan.n_ubatch as u64;
    let ctx = padded_ctx(plan.n_ctx) as u64;
    plan.max_logit_rows.min(plan.n_ubatch) as u64 * shape.n_vocab * 4
        + u * shape.n_embd * 4 * 8
        + u * ctx * 4
}

/// Extra memory when layers are offloaded to a GPU that shares the board's memory (the
/// Jetson's unified memory, an integrated GPU, Mesa's lavapipe): the offloaded weights, KV
/// cache and compute buffer move to GPU buffers in the same RAM, so they are already
/// counted; what is added is a second copy of a tied output matrix when the output layer is
/// offloaded, and the host-side compute buffer that feeds the GPU. The tied-matrix copy comes
/// from the GGUF tensor table; the host compute term is an allowance not yet fitted against
/// llama.cpp's buffer-size log lines (README, "GPU offload"). On a discrete GPU the estimate
/// is an upper bound on host memory.
pub fn offload_bytes(shape: &ModelShape, plan: &ContextPlan) -> u64 {
    if plan.gpu_layers == 0 {
        return 0;
    }
    let output_copy = if plan.gpu_layers as u64 > shape.n_layer {
        shape.tied_output_bytes
    } else {
        0
    };
    output_copy + HOST_COMPUTE_PER_UBATCH_TOKEN * shape.n_embd * plan.n_ubatch as u64
}

pub fn estimate(shape: &ModelShape, plan: &ContextPlan) -> Estimate {
    Estimate {
        weights_bytes: shape.tensor_bytes,
        kv_bytes: kv_bytes(shape, plan.n_ctx, plan.kv_cache_type),
        compute_bytes: compute_bytes(shape, plan),
        logits_bytes: plan.max_logit_rows.max(plan.n_seq_max) as u64 * shape.n_vocab * 4,
        offload_bytes: offload_bytes(shape, plan),
        overhead_bytes: OVERHEAD_BYTES,
    }
}

/// The decision: the plan that fits, and whether n_ctx was shrunk to make it fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub plan: ContextPlan,
    pub estimate: Estimate,
    pub shrunk_from_ctx: Option<u32>,
}

/// Fits `wanted` into `budget_mib`. If it does not fit and `allow_shrink`, halves n_ctx
/// (in llama.cpp's 256-token steps) down to `min_ctx`; otherwise refuses with the numbers.
pub fn fit(
    shape: &ModelShape,
    wanted: ContextPlan,
    budget_mib: u64,
    allow_shrink: bool,
    min_ctx: u32,
) -> Result<Fitted, BudgetError> {
    let budget_bytes = budget_mib * MIB;
    let est = estimate(shape, &wanted);
    if est.total_bytes() <= budget_bytes {
        return Ok(Fitted {
            plan: wanted,
            estimate: est,
            shrunk_from_ctx: None,
        });
    }
    if !allow_shrink {
        return Err(BudgetError::DoesNotFit {
            need_mib: est.total_mib(),
            budget_mib,
            detail: est.detail(),
        });
    }
    let min_ctx = padded_ctx(min_ctx);
    let mut n_ctx = padded_ctx(wanted.n_ctx);
    while n_ctx > min_ctx {
        n_ctx = padded_ctx((n_ctx / 2).max(min_ctx));
        let plan = ContextPlan { n_ctx, ..wanted };
        let est = estimate(shape, &plan);
        if est.total_bytes() <= budget_bytes {
            return Ok(Fitted {
                plan,
                estimate: est,
                shrunk_from_ctx: Some(wanted.n_ctx),
            });
        }
    }
    let est = estimate(
        shape,
        &ContextPlan {
            n_ctx: min_ctx,
            ..wanted
        },
    );
    Err(BudgetError::CannotShrink {
        min_ctx,
        need_mib: est.total_mib(),
        budget_mib,
        detail: est.detail(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gemma 3 270M's dimensions.
    fn gemma() -> ModelShape {
        ModelShape {
            architecture: "gemma3".into(),
            n_layer: 18,
            n_head_kv: 1,
            key_length: 256,
            value_length: 256,
            n_embd: 640,
            n_vocab: 262_144,
            n_ctx_train: 32_768,
            tensor_bytes: 250 * MIB,
            tied_output_bytes: 170 * MIB,
        }
    }

    fn plan(n_ctx: u32) -> ContextPlan {
        ContextPlan {
            n_ctx,
            n_ubatch: 128,
            max_logit_rows: 16,
            n_seq_max: 17,
            kv_cache_type: KvCacheType::F16,
            gpu_layers: 0,
        }
    }

    #[test]
    fn kv_cache_arithmetic() {
        // 1024 cells * 18 layers * 1 head * (256 + 256) * 2 bytes = 18 MiB.
        assert_eq!(kv_bytes(&gemma(), 1024, KvCacheType::F16), 18 * MIB);
        // q8_0 is 34/32 bytes per element.
        assert_eq!(
            kv_bytes(&gemma(), 1024, KvCacheType::Q8_0),
            18 * MIB / 2 * 34 / 32
        );
        // n_ctx is padded to 256 like llama.cpp does.
        assert_eq!(
            kv_bytes(&gemma(), 1000, KvCacheType::F16),
            kv_bytes(&gemma(), 1024, KvCacheType::F16)
        );
    }

    #[test]
    fn fits_or_refuses_with_numbers() {
        let est = estimate(&gemma(), &plan(2048));
        let need = est.total_mib();
        assert!(fit(&gemma(), plan(2048), need, false, 256).is_ok());
        match fit(&gemma(), plan(2048), need - 1, false, 256) {
            Err(BudgetError::DoesNotFit {
                need_mib,
                budget_mib,
                ..
            }) => {
                assert_eq!(need_mib, need);
                assert_eq!(budget_mib, need - 1);
            }
            other => panic!("expected DoesNotFit, got {other:?}"),
        }
    }

    #[test]
    fn shrinks_context_when_allowed() {
        let small = estimate(&gemma(), &plan(1024)).total_mib();
        let fitted = fit(&gemma(), plan(8192), small, true, 256).unwrap();
        assert_eq!(fitted.shrunk_from_ctx, Some(8192));
        assert!(fitted.plan.n_ctx <= 1024);
        assert!(fitted.estimate.total_mib() <= small);
        // Nothing can make weights fit into 100 MiB.
        assert!(matches!(
            fit(&gemma(), plan(8192), 100, true, 256),
            Err(BudgetError::CannotShrink { .. })
        ));
    }

    #[test]
    fn offloading_the_output_layer_counts_a_second_tied_output_matrix() {
        let cpu = estimate(&gemma(), &plan(1024));
        assert_eq!(cpu.offload_bytes, 0);
        let layers_only = estimate(
            &gemma(),
            &ContextPlan {
                gpu_layers: 18,
                ..plan(1024)
            },
        );
        let all = estimate(
            &gemma(),
            &ContextPlan {
                gpu_layers: 99,
                ..plan(1024)
            },
        );
        assert!(layers_only.offload_bytes > 0);
        assert!(layers_only.offload_bytes < 170 * MIB);
        assert_eq!(all.offload_bytes - layers_only.offload_bytes, 170 * MIB);
        assert!(all.detail().contains("GPU offload"));
        assert!(!cpu.detail().contains("GPU offload"));
        // A model with its own output matrix has nothing to copy.
        let untied = ModelShape {
            tied_output_bytes: 0,
            ..gemma()
        };
        let untied_all = estimate(
            &untied,
            &ContextPlan {
                gpu_layers: 99,
                ..plan(1024)
            },
        );
        assert_eq!(untied_all.offload_bytes, layers_only.offload_bytes);
    }
}
