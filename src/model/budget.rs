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

/// ggml type ids of the tensor types llama.cpp's CPU backend may repack.
const Q4_0: u32 = 2;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;
const Q6_K: u32 = 14;
const IQ4_NL: u32 = 20;

/// Tensor types llama.cpp's CPU backend (llama-cpp-sys-2 0.1.161) copies at load into its
/// interleaved layout for matrix products, and the row-count multiple it needs, on this
/// build's architecture. x86-64 with AVX2: Q4_0, Q4_K, IQ4_NL (measured: the Q4_K tensors'
/// 12.66 MiB, `CPU_REPACK model buffer size = 12.66 MiB`). aarch64: also Q6_K and Q8_0 with
/// the dot-product kernels (measured under qemu: 193.38 MiB = the tied output matrix and the
/// other Q8_0, Q4_K and Q6_K tensors); counted on every aarch64 build (the safe side: the
/// plain armv8-a build repacks nothing).
fn repacked_types() -> (&'static [u32], u64) {
    if cfg!(target_arch = "x86_64") {
        (&[Q4_0, Q4_K, IQ4_NL], 8)
    } else if cfg!(target_arch = "aarch64") {
        (&[Q4_0, Q4_K, Q6_K, Q8_0, IQ4_NL], 4)
    } else {
        (&[], 1)
    }
}

/// Bytes of the repacked copies: the mapped file pages they were read from stay resident
/// too (both count in RSS). The token-embedding matrix is only repacked as the tied output
/// projection (a lookup table is not repacked).
pub fn repack_bytes(h: &Header, types: &[u32], row_multiple: u64) -> u64 {
    let tied = !h.tensors.iter().any(|t| t.name == "output.weight");
    h.tensors
        .iter()
        .filter(|t| types.contains(&t.ggml_type))
        .filter(|t| t.dims.len() >= 2 && t.dims[1] % row_multiple == 0)
        .filter(|t| t.name != "token_embd.weight" || tied)
        .filter_map(|t| h.tensor_data_bytes(&t.name))
        .sum()
}

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
    /// What the CPU backend's repacking adds at load on this build ([`repack_bytes`]).
    pub repack_bytes: u64,
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
            repack_bytes: {
                let (types, rows) = repacked_types();
                repack_bytes(h, types, rows)
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

/// What the tasks add beside the scoring context, known before loading: the learned-head
/// feature contexts and the LoRA adapter's tensors. (Label-trie branches need no memory of
/// their own: they are sequences in the one KV cache, and their logits rows are the
/// `logits` and `compute` terms, sized by `max_logit_rows` and `n_seq_max`.)
#[derive(Debug, Clone, PartialEq)]
pub struct Extras {
    /// Whether the model's weights are loaded at all: false when every task reads neither
    /// the model's hidden states nor its label scores (a stack of TF-IDF and encoder blocks),
    /// so the weights, the scoring context and its buffers are not counted.
    pub load_weights: bool,
    /// `n_batch_tokens` of each feature context the tasks create (one per learned-head task).
    pub feature_batch_tokens: Vec<u32>,
    /// Tensor bytes of the LoRA adapter (llama.cpp reads them into memory, F32 as stored).
    pub lora_bytes: u64,
    /// The sentence encoder's f32 weights and one forward pass (`encoder::planned_bytes`),
    /// when a task's stack reads it (one copy, shared by the tasks).
    pub encoder_bytes: u64,
}

impl Default for Extras {
    fn default() -> Extras {
        Extras {
            load_weights: true,
            feature_batch_tokens: Vec::new(),
            lora_bytes: 0,
            encoder_bytes: 0,
        }
    }
}

/// A feature context (`model::FeatureContext`): `n_batch` cells of KV cache (padded to 256),
/// a compute buffer and an output buffer, each with `n_batch` rows of n_vocab logits (llama.cpp
/// keeps logits for every token of an embeddings batch), plus the hidden states.
pub fn feature_context_bytes(shape: &ModelShape, n_batch_tokens: u32) -> u64 {
    let n = n_batch_tokens.max(8);
    let plan = ContextPlan {
        n_ctx: padded_ctx(n),
        n_ubatch: n,
        max_logit_rows: n,
        n_seq_max: 1,
        kv_cache_type: KvCacheType::F16,
        gpu_layers: 0,
    };
    kv_bytes(shape, plan.n_ctx, KvCacheType::F16)
        + compute_bytes(shape, &plan)
        + n as u64 * (shape.n_vocab + shape.n_embd) * 4
}

/// The estimate, in bytes, itemised.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Estimate {
    pub weights_bytes: u64,
    /// The CPU backend's repacked copies of weights ([`repack_bytes`]).
    pub repack_bytes: u64,
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub logits_bytes: u64,
    /// What offloading adds on a board whose GPU shares its memory (Jetson, integrated GPUs,
    /// lavapipe): see [`offload_bytes`].
    pub offload_bytes: u64,
    /// Learned-head feature contexts ([`feature_context_bytes`]).
    pub features_bytes: u64,
    /// The LoRA adapter's tensors.
    pub lora_bytes: u64,
    /// The sentence encoder ([`Extras::encoder_bytes`]).
    pub encoder_bytes: u64,
    pub overhead_bytes: u64,
}

impl Estimate {
    /// Nothing of the model is loaded: what is left is the encoder and the process.
    pub fn without_weights(encoder_bytes: u64) -> Estimate {
        Estimate {
            weights_bytes: 0,
            repack_bytes: 0,
            kv_bytes: 0,
            compute_bytes: 0,
            logits_bytes: 0,
            offload_bytes: 0,
            features_bytes: 0,
            lora_bytes: 0,
            encoder_bytes,
            overhead_bytes: OVERHEAD_BYTES,
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights_bytes
            + self.repack_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.logits_bytes
            + self.offload_bytes
            + self.features_bytes
            + self.lora_bytes
            + self.encoder_bytes
            + self.overhead_bytes
    }
    pub fn total_mib(&self) -> u64 {
        self.total_bytes().div_ceil(MIB)
    }
    pub fn detail(&self) -> String {
        // (name, bytes, shown when 0)
        let terms = [
            ("weights", self.weights_bytes, true),
            ("CPU repack", self.repack_bytes, false),
            ("KV cache", self.kv_bytes, true),
            ("compute", self.compute_bytes, true),
            ("logits", self.logits_bytes, true),
            ("GPU offload", self.offload_bytes, false),
            ("feature contexts", self.features_bytes, false),
            ("LoRA", self.lora_bytes, false),
            ("encoder", self.encoder_bytes, false),
            ("overhead", self.overhead_bytes, true),
        ];
        // Without the weights nothing of the model is loaded: only what is left is shown.
        let loaded = self.weights_bytes > 0;
        let shown: Vec<String> = terms
            .iter()
            .filter(|(_, bytes, always)| (*always && loaded) || *bytes > 0)
            .map(|(name, bytes, _)| format!("{name} {}", bytes.div_ceil(MIB)))
            .collect();
        let note = if loaded {
            ""
        } else {
            " (model weights not loaded)"
        };
        format!("{} MiB{note}", shown.join(" + "))
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

pub fn estimate(shape: &ModelShape, plan: &ContextPlan, extras: &Extras) -> Estimate {
    if !extras.load_weights {
        return Estimate::without_weights(extras.encoder_bytes);
    }
    Estimate {
        weights_bytes: shape.tensor_bytes,
        repack_bytes: shape.repack_bytes,
        kv_bytes: kv_bytes(shape, plan.n_ctx, plan.kv_cache_type),
        compute_bytes: compute_bytes(shape, plan),
        logits_bytes: plan.max_logit_rows.max(plan.n_seq_max) as u64 * shape.n_vocab * 4,
        offload_bytes: offload_bytes(shape, plan),
        features_bytes: extras
            .feature_batch_tokens
            .iter()
            .map(|&n| feature_context_bytes(shape, n))
            .sum(),
        lora_bytes: extras.lora_bytes,
        encoder_bytes: extras.encoder_bytes,
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
    extras: &Extras,
    budget_mib: u64,
    allow_shrink: bool,
    min_ctx: u32,
) -> Result<Fitted, BudgetError> {
    let budget_bytes = budget_mib * MIB;
    let est = estimate(shape, &wanted, extras);
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
        let est = estimate(shape, &plan, extras);
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
        extras,
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
            repack_bytes: 0,
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
        let est = estimate(&gemma(), &plan(2048), &Extras::default());
        let need = est.total_mib();
        assert!(fit(&gemma(), plan(2048), &Extras::default(), need, false, 256).is_ok());
        match fit(
            &gemma(),
            plan(2048),
            &Extras::default(),
            need - 1,
            false,
            256,
        ) {
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
        let small = estimate(&gemma(), &plan(1024), &Extras::default()).total_mib();
        let fitted = fit(&gemma(), plan(8192), &Extras::default(), small, true, 256).unwrap();
        assert_eq!(fitted.shrunk_from_ctx, Some(8192));
        assert!(fitted.plan.n_ctx <= 1024);
        assert!(fitted.estimate.total_mib() <= small);
        // Nothing can make weights fit into 100 MiB.
        assert!(matches!(
            fit(&gemma(), plan(8192), &Extras::default(), 100, true, 256),
            Err(BudgetError::CannotShrink { .. })
        ));
    }

    #[test]
    fn offloading_the_output_layer_counts_a_second_tied_output_matrix() {
        let cpu = estimate(&gemma(), &plan(1024), &Extras::default());
        assert_eq!(cpu.offload_bytes, 0);
        let layers_only = estimate(
            &gemma(),
            &ContextPlan {
                gpu_layers: 18,
                ..plan(1024)
            },
            &Extras::default(),
        );
        let all = estimate(
            &gemma(),
            &ContextPlan {
                gpu_layers: 99,
                ..plan(1024)
            },
            &Extras::default(),
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
            &Extras::default(),
        );
        assert_eq!(untied_all.offload_bytes, layers_only.offload_bytes);
    }

    #[test]
    fn without_weights_only_the_encoder_and_overhead_count() {
        let extras = Extras {
            load_weights: false,
            encoder_bytes: 5 * MIB,
            ..Extras::default()
        };
        let est = estimate(&gemma(), &plan(2048), &extras);
        assert_eq!(est.total_bytes(), 5 * MIB + OVERHEAD_BYTES);
        assert_eq!(est.weights_bytes + est.kv_bytes + est.compute_bytes, 0);
        assert_eq!(
            est.detail(),
            "encoder 5 + overhead 64 MiB (model weights not loaded)"
        );
        // With the weights: the same encoder on top of the model's terms.
        let with = estimate(
            &gemma(),
            &plan(2048),
            &Extras {
                load_weights: true,
                ..extras
            },
        );
        assert!(with.total_bytes() > est.total_bytes() + gemma().tensor_bytes);
    }

    #[test]
    fn extras_count_feature_contexts_and_lora_tensors() {
        let base = estimate(&gemma(), &plan(2048), &Extras::default());
        let extras = Extras {
            feature_batch_tokens: vec![64, 64],
            lora_bytes: 3 * MIB,
            encoder_bytes: 5 * MIB,
            ..Extras::default()
        };
        let with = estimate(&gemma(), &plan(2048), &extras);
        let one = feature_context_bytes(&gemma(), 64);
        // Two 64-token feature contexts: 64 rows of 1 MiB logits twice (output and compute
        // buffers) each, so over 128 MiB apiece.
        assert!(one > 128 * MIB, "{one}");
        assert_eq!(with.features_bytes, 2 * one);
        assert_eq!(with.total_bytes() - base.total_bytes(), 2 * one + 8 * MIB);
        assert!(with.detail().contains("encoder 5"), "{}", with.detail());
        assert!(
            with.detail().contains("feature contexts"),
            "{}",
            with.detail()
        );
        assert!(with.detail().contains("LoRA 3"), "{}", with.detail());
        assert!(!base.detail().contains("LoRA"));
        // The refusal counts them too.
        assert!(fit(
            &gemma(),
            plan(2048),
            &Extras::default(),
            base.total_mib(),
            false,
            256
        )
        .is_ok());
        assert!(matches!(
            fit(&gemma(), plan(2048), &extras, base.total_mib(), false, 256),
            Err(BudgetError::DoesNotFit { need_mib, .. }) if need_mib == with.total_mib()
        ));
    }

    #[test]
    fn repacked_weights_are_counted_once_more() {
        let shape = ModelShape {
            repack_bytes: 13 * MIB,
            ..gemma()
        };
        let a = estimate(&gemma(), &plan(2048), &Extras::default());
        let b = estimate(&shape, &plan(2048), &Extras::default());
        assert_eq!(b.total_bytes() - a.total_bytes(), 13 * MIB);
        assert!(b.detail().contains("CPU repack 13"), "{}", b.detail());
    }

    /// A header with Gemma 3's tensor types (tied output: no output.weight).
    fn header(tensors: &[(&str, u32, [u64; 2], u64)]) -> Header {
        let mut offset = 0;
        let mut infos = Vec::new();
        for &(name, ggml_type, dims, bytes) in tensors {
            infos.push(crate::model::gguf::TensorInfo {
                name: name.into(),
                dims: dims.to_vec(),
                ggml_type,
                offset_bytes: offset,
            });
            offset += bytes;
        }
        Header {
            version: 3,
            metadata: Default::default(),
            n_tensors: infos.len() as u64,
            tensors: infos,
            data_offset_bytes: 0,
            file_size_bytes: offset,
        }
    }

    #[test]
    fn repack_counts_the_types_and_shapes_the_cpu_backend_repacks() {
        let h = header(&[
            ("token_embd.weight", Q8_0, [640, 262_144], 170 * MIB),
            ("blk.0.attn_output.weight", Q4_K, [1024, 640], MIB),
            ("blk.0.ffn_down.weight", Q6_K, [2048, 640], 2 * MIB),
            ("blk.0.attn_q.weight", 6, [640, 1024], 4 * MIB),
            ("blk.0.odd.weight", Q4_K, [256, 7], 8 * MIB),
        ]);
        // x86-64 (AVX2): Q4_K with rows in multiples of 8.
        assert_eq!(repack_bytes(&h, &[Q4_0, Q4_K, IQ4_NL], 8), MIB);
        // aarch64 dot-product kernels: also Q6_K and Q8_0, and the tied output matrix.
        assert_eq!(
            repack_bytes(&h, &[Q4_0, Q4_K, Q6_K, Q8_0, IQ4_NL], 4),
            173 * MIB
        );
        // With its own output matrix, the embedding table is a lookup table: not repacked.
        let mut untied = h.clone();
        untied.tensors.push(crate::model::gguf::TensorInfo {
            name: "output.weight".into(),
            dims: vec![640, 262_144],
            ggml_type: 1,
            offset_bytes: 185 * MIB,
        });
        untied.file_size_bytes = 190 * MIB;
        assert_eq!(
            repack_bytes(&untied, &[Q4_0, Q4_K, Q6_K, Q8_0, IQ4_NL], 4),
            3 * MIB
        );
    }
}
