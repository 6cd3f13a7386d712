//! Label rows: when the model ties its output projection to the token embedding (Gemma 3:
//! the GGUF has no `output.weight`, llama.cpp reuses `token_embd.weight`) and every label is
//! one token, a label's logit is the dot product of the final normed hidden state
//! (`result_norm`) with that token's embedding row. Scoring then reads the hidden state
//! through the layer tap, stops the graph before the 262 144-wide output projection, and
//! computes only the labels' logits: the same arithmetic as llama.cpp's CPU matrix product
//! (the row stays in its stored type; the hidden state is quantized to the type's dot-product
//! partner, as `ggml_compute_forward_mul_mat` does), so the logits agree up to summation order.
//!
//! The label log-probabilities are then normalized over the labels, not the vocabulary
//! ([`LogprobOver::Labels`]): label probabilities, calibration and abstention are the
//! same; only the absolute log-likelihoods differ.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

use crate::model::gguf::{Header, Value};
use crate::model::scoring::{logsumexp, Token};

/// Architectures whose graph is known to end in `result_norm` followed by the output
/// projection alone (optionally soft-capped): checked in llama.cpp's `models/gemma3.cpp`.
const KNOWN_ARCHS: &[&str] = &["gemma3"];

/// Where the tied output rows are in the model file, and how to use them.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TiedOutput {
    path: PathBuf,
    /// File offset of `token_embd.weight`'s data.
    data_offset_bytes: u64,
    ggml_type: u32,
    n_embd: usize,
    n_vocab: usize,
    /// The model's final logit soft-capping (`c * tanh(logit / c)`), when its file sets one.
    softcap: Option<f32>,
}

/// Why the label-rows path is off for a model (None: it is available), from its GGUF
/// header alone. Pure: tested without a model.
pub(super) fn tied_output(path: &Path, header: &Header) -> Result<TiedOutput, String> {
    let arch = header.architecture().unwrap_or("");
    if !KNOWN_ARCHS.contains(&arch) {
        return Err(format!(
            "architecture {arch:?} is not one whose output graph was checked"
        ));
    }
    if header.tensors.iter().any(|t| t.name == "output.weight") {
        return Err(
            "the model has its own output.weight (output not tied to the embedding)".into(),
        );
    }
    let Some(embd) = header
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
    else {
        return Err("the model has no token_embd.weight".into());
    };
    let [n_embd, n_vocab] = embd.dims[..] else {
        return Err(format!("token_embd.weight has shape {:?}", embd.dims));
    };
    let softcap = match header
        .metadata
        .get(&format!("{arch}.final_logit_softcapping"))
    {
        Some(Value::Float(c)) if *c != 0.0 => Some(*c as f32),
        Some(Value::Float(_)) | None => None,
        Some(other) => return Err(format!("final_logit_softcapping is {other:?}")),
    };
    Ok(TiedOutput {
        path: path.to_path_buf(),
        data_offset_bytes: header.data_offset_bytes + embd.offset_bytes,
        ggml_type: embd.ggml_type,
        n_embd: n_embd as usize,
        n_vocab: n_vocab as usize,
        softcap,
    })
}

/// Whether a LoRA adapter (its GGUF header) changes the token embedding or the output
/// projection, i.e. the rows labels are scored with.
pub(super) fn adapter_changes_output(adapter: &Header) -> bool {
    adapter
        .tensors
        .iter()
        .any(|t| t.name.starts_with("token_embd.") || t.name.starts_with("output."))
}

/// The final logit soft-capping llama.cpp applies after the projection (None: none).
pub(super) fn softcapped(logit: f32, softcap: Option<f32>) -> f32 {
    match softcap {
        Some(c) => (logit / c).tanh() * c,
        None => logit,
    }
}

/// The output rows of one label set's tokens, in the model's stored type, and the CPU
/// dot product llama.cpp's matrix product uses for that type.
#[derive(Debug, Clone)]
pub(super) struct LabelRows {
    pub(super) tokens: Vec<Token>,
    ggml_type: u32,
    n_embd: usize,
    row_bytes: usize,
    /// `tokens.len()` rows of `row_bytes` each.
    rows: Vec<u8>,
    softcap: Option<f32>,
}

impl TiedOutput {
    /// Reads the rows of `tokens` from the model file. An error says why (a type without
    /// a CPU dot product, a token out of range, a read error).
    pub(super) fn label_rows(&self, tokens: &[Token]) -> Result<LabelRows, String> {
        // SAFETY: ggml's CPU type traits are static tables; `ggml_cpu_init` (idempotent)
        // fills the half-precision tables their conversions read.
        let (row_bytes, has_dot) = unsafe {
            sys::ggml_cpu_init();
            let cpu = &*sys::ggml_get_type_traits_cpu(self.ggml_type);
            let partner = &*sys::ggml_get_type_traits_cpu(cpu.vec_dot_type);
            (
                sys::ggml_row_size(self.ggml_type, self.n_embd as i64),
                cpu.vec_dot.is_some() && partner.from_float.is_some(),
            )
        };
        if !has_dot {
            return Err(format!(
                "type {} of token_embd.weight has no CPU dot product",
                self.ggml_type
            ));
        }
        let mut f = std::fs::File::open(&self.path).map_err(|e| e.to_string())?;
        let mut rows = vec![0u8; row_bytes * tokens.len()];
        for (i, &t) in tokens.iter().enumerate() {
            if t < 0 || t as usize >= self.n_vocab {
                return Err(format!("token {t} is outside the vocabulary"));
            }
            f.seek(SeekFrom::Start(
                self.data_offset_bytes + t as u64 * row_bytes as u64,
            ))
            .and_then(|_| f.read_exact(&mut rows[i * row_bytes..(i + 1) * row_bytes]))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        }
        Ok(LabelRows {
            tokens: tokens.to_vec(),
            ggml_type: self.ggml_type,
            n_embd: self.n_embd,
            row_bytes,
            rows,
            softcap: self.softcap,
        })
    }
}

impl LabelRows {
    /// The log-probability of each of `among` (tokens of these rows) over `among`: the
    /// log-softmax of their logits for the final normed hidden state `h`. A token without a
    /// row gets -inf.
    pub(super) fn logprobs(&self, h: &[f32], among: &[Token]) -> Vec<f64> {
        let idx: Vec<Option<usize>> = among
            .iter()
            .map(|t| self.tokens.iter().position(|r| r == t))
            .collect();
        let logits = self.logits(h, idx.iter().flatten().copied());
        let mut it = logits.iter();
        let all: Vec<f32> = idx
            .iter()
            .map(|i| match i {
                Some(_) => it.next().copied().unwrap_or(f32::NEG_INFINITY),
                None => f32::NEG_INFINITY,
            })
            .collect();
        let lse = logsumexp(&all);
        all.iter().map(|&l| l as f64 - lse).collect()
    }

    /// The logits of the rows `which` (indices into `tokens`) for the final normed hidden
    /// state `h` (`n_embd` floats).
    pub(super) fn logits(&self, h: &[f32], which: impl Iterator<Item = usize>) -> Vec<f32> {
        assert_eq!(h.len(), self.n_embd, "hidden state width");
        // SAFETY: the traits are static; `q` is sized by ggml_row_size for the partner type
        // and `n_embd` values (validated when the rows were read); each row is `row_bytes`.
        unsafe {
            let cpu = &*sys::ggml_get_type_traits_cpu(self.ggml_type);
            let partner_type = cpu.vec_dot_type;
            let partner = &*sys::ggml_get_type_traits_cpu(partner_type);
            let n = self.n_embd as i64;
            let mut q = vec![0u8; sys::ggml_row_size(partner_type, n)];
            let (Some(from_float), Some(vec_dot)) = (partner.from_float, cpu.vec_dot) else {
                unreachable!("checked when the rows were read")
            };
            from_float(h.as_ptr(), q.as_mut_ptr().cast(), n);
            which
                .map(|i| {
                    let mut s = 0f32;
                    vec_dot(
                        self.n_embd as i32,
                        &mut s,
                        0,
                        self.rows[i * self.row_bytes..].as_ptr().cast(),
                        0,
                        q.as_ptr().cast(),
                        0,
                        1,
                    );
                    softcapped(s, self.softcap)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::gguf::TensorInfo;

    const Q8_0: u32 = 8;

    fn tensor(name: &str, dims: &[u64], offset_bytes: u64) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: Q8_0,
            offset_bytes,
        }
    }

    fn header(arch: &str, tensors: Vec<TensorInfo>, meta: &[(&str, Value)]) -> Header {
        let mut metadata = BTreeMap::new();
        metadata.insert("general.architecture".into(), Value::Str(arch.into()));
        for (k, v) in meta {
            metadata.insert(k.to_string(), v.clone());
        }
        Header {
            version: 3,
            metadata,
            n_tensors: tensors.len() as u64,
            tensors,
            data_offset_bytes: 1000,
            file_size_bytes: 1 << 20,
        }
    }

    #[test]
    fn tied_output_only_for_a_checked_graph_without_its_own_output() {
        let p = Path::new("m.gguf");
        let embd = || tensor("token_embd.weight", &[64, 100], 256);
        let t = tied_output(p, &header("gemma3", vec![embd()], &[])).unwrap();
        assert_eq!((t.n_embd, t.n_vocab, t.data_offset_bytes), (64, 100, 1256));
        assert_eq!(t.softcap, None);
        let own = header(
            "gemma3",
            vec![embd(), tensor("output.weight", &[64, 100], 0)],
            &[],
        );
        assert!(tied_output(p, &own).unwrap_err().contains("output.weight"));
        let other = header("llama", vec![embd()], &[]);
        assert!(tied_output(p, &other).unwrap_err().contains("llama"));
        assert!(tied_output(p, &header("gemma3", vec![], &[])).is_err());
        let capped = header(
            "gemma3",
            vec![embd()],
            &[("gemma3.final_logit_softcapping", Value::Float(30.0))],
        );
        assert_eq!(tied_output(p, &capped).unwrap().softcap, Some(30.0));
        let zero = header(
            "gemma3",
            vec![embd()],
            &[("gemma3.final_logit_softcapping", Value::Float(0.0))],
        );
        assert_eq!(tied_output(p, &zero).unwrap().softcap, None);
    }

    #[test]
    fn adapters_on_the_embedding_change_the_output() {
        let qv = header(
            "gemma3",
            vec![tensor("blk.0.attn_q.weight.lora_a", &[4], 0)],
            &[],
        );
        assert!(!adapter_changes_output(&qv));
        let e = header(
            "gemma3",
            vec![tensor("token_embd.weight.lora_a", &[4], 0)],
            &[],
        );
        assert!(adapter_changes_output(&e));
    }

    #[test]
    fn softcap_is_off_without_a_value() {
        assert_eq!(softcapped(12.5, None), 12.5);
        let c = softcapped(100.0, Some(30.0));
        assert!((c - 30.0 * (100.0f32 / 30.0).tanh()).abs() < 1e-5);
        assert!(c < 30.0);
    }

    /// Rows written to a file in Q8_0 and read back as label rows: their logits are the
    /// dot products with the hidden state (within Q8_0's rounding), their log-probabilities
    /// a log-softmax over the labels.
    #[test]
    fn label_rows_dot_the_stored_rows_and_normalize_over_labels() {
        let n_embd = 64usize;
        let n_vocab = 5usize;
        let rows_f32: Vec<Vec<f32>> = (0..n_vocab)
            .map(|r| {
                (0..n_embd)
                    .map(|i| ((r * 31 + i * 7) % 13) as f32 / 13.0 - 0.5)
                    .collect()
            })
            .collect();
        // SAFETY: ggml's static type traits; buffers sized by ggml_row_size.
        let row_bytes = unsafe { sys::ggml_row_size(Q8_0, n_embd as i64) };
        let mut data = vec![0u8; 16];
        for r in &rows_f32 {
            let mut q = vec![0u8; row_bytes];
            unsafe {
                sys::ggml_cpu_init();
                let from = (*sys::ggml_get_type_traits_cpu(Q8_0)).from_float.unwrap();
                from(r.as_ptr(), q.as_mut_ptr().cast(), n_embd as i64);
            }
            data.extend(q);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.bin");
        std::fs::write(&path, &data).unwrap();
        let tied = TiedOutput {
            path,
            data_offset_bytes: 16,
            ggml_type: Q8_0,
            n_embd,
            n_vocab,
            softcap: None,
        };
        let h: Vec<f32> = (0..n_embd).map(|i| (i as f32 * 0.37).sin()).collect();
        let rows = tied.label_rows(&[3, 1, 4]).unwrap();
        let logits = rows.logits(&h, 0..3);
        for (k, &tok) in [3usize, 1, 4].iter().enumerate() {
            let exact: f32 = rows_f32[tok].iter().zip(&h).map(|(a, b)| a * b).sum();
            assert!((logits[k] - exact).abs() < 0.05, "{} vs {exact}", logits[k]);
        }
        // Normalized over the tokens asked for, in their order.
        let lp = rows.logprobs(&h, &[1, 3]);
        let total: f64 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(((lp[1] - lp[0]) - (logits[0] - logits[1]) as f64).abs() < 1e-6);
        let all = rows.logprobs(&h, &[3, 1, 4]);
        assert!(all[0] < lp[1], "a third token takes its share");
        assert_eq!(rows.logprobs(&h, &[3, 2])[1], f64::NEG_INFINITY);
        assert!(tied.label_rows(&[5]).unwrap_err().contains("outside"));
        assert!(tied.label_rows(&[-1]).is_err());
    }
}
