//! The BERT encoder forward pass in f32 (post-LayerNorm, exact GELU, absolute positions),
//! one text at a time (no padding, so no attention mask), then mean pooling over the tokens
//! and L2 normalization: what sentence-transformers computes for all-MiniLM-L6-v2. Matrix
//! products go through `matrixmultiply`'s pure-Rust sgemm (no C/C++ toolchain needed for
//! the board builds).

use super::safetensors::SafeTensors;
use super::EncoderError;

/// The architecture's sizes (config.json).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f32 {
    1e-12
}

fn default_act() -> String {
    "gelu".into()
}

/// A dense layer: `weight` is `[out, in]` row-major (PyTorch's layout).
struct Linear {
    weight: Vec<f32>,
    bias: Vec<f32>,
    n_in: usize,
    n_out: usize,
}

impl Linear {
    fn load(
        st: &mut SafeTensors,
        name: &str,
        n_in: usize,
        n_out: usize,
    ) -> Result<Linear, EncoderError> {
        Ok(Linear {
            weight: st.f32(&format!("{name}.weight"), &[n_out, n_in])?,
            bias: st.f32(&format!("{name}.bias"), &[n_out])?,
            n_in,
            n_out,
        })
    }

    /// `x` is `[n, n_in]`; returns `[n, n_out]` = x W^T + b.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y: Vec<f32> = (0..n).flat_map(|_| self.bias.iter().copied()).collect();
        // SAFETY: the pointers and strides describe x ([n, n_in], row-major), W^T (W is
        // [n_out, n_in] row-major: element (k, j) of W^T at j * n_in + k) and y ([n, n_out]),
        // all of which are allocated with those sizes.
        unsafe {
            matrixmultiply::sgemm(
                n,
                self.n_in,
                self.n_out,
                1.0,
                x.as_ptr(),
                self.n_in as isize,
                1,
                self.weight.as_ptr(),
                1,
                self.n_in as isize,
                1.0,
                y.as_mut_ptr(),
                self.n_out as isize,
                1,
            );
        }
        y
    }

    fn bytes(&self) -> u64 {
        4 * (self.weight.len() + self.bias.len()) as u64
    }
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(
        st: &mut SafeTensors,
        name: &str,
        d: usize,
        eps: f32,
    ) -> Result<LayerNorm, EncoderError> {
        Ok(LayerNorm {
            weight: st.f32(&format!("{name}.weight"), &[d])?,
            bias: st.f32(&format!("{name}.bias"), &[d])?,
            eps,
        })
    }

    /// Normalizes each row of `x` in place.
    fn apply(&self, x: &mut [f32]) {
        let d = self.weight.len();
        for row in x.chunks_exact_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

pub struct Bert {
    pub config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
}

impl Bert {
    pub fn load(st: &mut SafeTensors, config: BertConfig) -> Result<Bert, EncoderError> {
        let c = config.clone();
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                query: Linear::load(st, &format!("{p}.attention.self.query"), d, d)?,
                key: Linear::load(st, &format!("{p}.attention.self.key"), d, d)?,
                value: Linear::load(st, &format!("{p}.attention.self.value"), d, d)?,
                attn_out: Linear::load(st, &format!("{p}.attention.output.dense"), d, d)?,
                attn_norm: LayerNorm::load(st, &format!("{p}.attention.output.LayerNorm"), d, eps)?,
                up: Linear::load(
                    st,
                    &format!("{p}.intermediate.dense"),
                    d,
                    c.intermediate_size,
                )?,
                down: Linear::load(st, &format!("{p}.output.dense"), c.intermediate_size, d)?,
                out_norm: LayerNorm::load(st, &format!("{p}.output.LayerNorm"), d, eps)?,
            });
        }
        Ok(Bert {
            word: st.f32("embeddings.word_embeddings.weight", &[c.vocab_size, d])?,
            position: st.f32(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, d],
            )?,
            token_type: st.f32(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, d],
            )?,
            emb_norm: LayerNorm::load(st, "embeddings.LayerNorm", d, eps)?,
            layers,
            config,
        })
    }

    /// Bytes of the weights held.
    pub fn weight_bytes(&self) -> u64 {
        let norm = |n: &LayerNorm| 8 * n.weight.len() as u64;
        4 * (self.word.len() + self.position.len() + self.token_type.len()) as u64
            + norm(&self.emb_norm)
            + self
                .layers
                .iter()
                .map(|l| {
                    l.query.bytes()
                        + l.key.bytes()
                        + l.value.bytes()
                        + l.attn_out.bytes()
                        + l.up.bytes()
                        + l.down.bytes()
                        + norm(&l.attn_norm)
                        + norm(&l.out_norm)
                })
                .sum::<u64>()
    }

    /// Peak bytes of the buffers of one forward pass over `n` tokens: the hidden states and
    /// Q, K, V, the attention output (5 x n x d), one head's scores (n x n), and the
    /// intermediate activations (n x intermediate), with the residual copy (n x d).
    pub fn activation_bytes(config: &BertConfig, n: usize) -> u64 {
        let d = config.hidden_size;
        4 * (6 * n * d + n * n + n * config.intermediate_size) as u64
    }

    /// The pooled, L2-normalized embedding of token ids (`ids` no longer than the
    /// position table; ids are checked by the caller against the vocabulary).
    pub fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let c = &self.config;
        let d = c.hidden_size;
        let n = ids.len().min(c.max_position_embeddings);
        let mut x = vec![0f32; n * d];
        for (t, &id) in ids.iter().take(n).enumerate() {
            let w = &self.word[id as usize * d..][..d];
            let p = &self.position[t * d..][..d];
            for (j, v) in x[t * d..][..d].iter_mut().enumerate() {
                *v = w[j] + p[j] + self.token_type[j];
            }
        }
        self.emb_norm.apply(&mut x);
        for l in &self.layers {
            let a = self.attention(l, &x, n);
            let mut h = l.attn_out.forward(&a, n);
            add(&mut h, &x);
            l.attn_norm.apply(&mut h);
            let mut up = l.up.forward(&h, n);
            up.iter_mut().for_each(|v| *v = gelu(*v));
            let mut out = l.down.forward(&up, n);
            add(&mut out, &h);
            l.out_norm.apply(&mut out);
            x = out;
        }
        let mut mean = vec![0f32; d];
        for row in x.chunks_exact(d) {
            add(&mut mean, row);
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        mean.iter_mut().for_each(|v| *v /= norm);
        mean
    }

    /// Multi-head self-attention over all `n` tokens; returns the heads' outputs `[n, d]`.
    fn attention(&self, l: &Layer, x: &[f32], n: usize) -> Vec<f32> {
        let d = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let hd = d / heads;
        let q = l.query.forward(x, n);
        let k = l.key.forward(x, n);
        let v = l.value.forward(x, n);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; n * d];
        let mut s = vec![0f32; n * n];
        for h in 0..heads {
            let off = h * hd;
            // SAFETY: q, k, v, out are [n, d] row-major and s is [n, n]; head h's columns
            // are off..off + hd, so every index the strides reach is inside the buffers.
            unsafe {
                // s = scale * Q_h K_h^T
                matrixmultiply::sgemm(
                    n,
                    hd,
                    n,
                    scale,
                    q.as_ptr().add(off),
                    d as isize,
                    1,
                    k.as_ptr().add(off),
                    1,
                    d as isize,
                    0.0,
                    s.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for row in s.chunks_exact_mut(n) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                row.iter_mut().for_each(|v| *v /= sum);
            }
            // SAFETY: as above; out_h = S V_h.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    n,
                    hd,
                    1.0,
                    s.as_ptr(),
                    n as isize,
                    1,
                    v.as_ptr().add(off),
                    d as isize,
                    1,
                    0.0,
                    out.as_mut_ptr().add(off),
                    d as isize,
                    1,
                );
            }
        }
        out
    }
}

fn add(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// The exact GELU, x * Phi(x), with erf from Abramowitz-Stegun 7.1.26 (error below 1.5e-7,
/// well under f32 noise of the layer sums).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}

fn erf(x: f32) -> f32 {
    let s = x.signum();
    let x = x.abs() as f64;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    s * y as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_and_gelu_match_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.5204999),
            (1.0, 0.8427008),
            (-2.0, -0.9953223),
        ] {
            assert!((erf(x) - want).abs() < 1e-6, "erf({x}) = {}", erf(x));
        }
        assert!((gelu(1.0) - 0.8413447).abs() < 1e-6);
        assert!((gelu(-3.0) - -0.0040496).abs() < 1e-6);
    }

    #[test]
    fn linear_computes_x_w_transposed_plus_b() {
        let l = Linear {
            weight: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            bias: vec![0.5, -0.5],
            n_in: 3,
            n_out: 2,
        };
        // rows x = [1, 0, 1] and [0, 1, 0]
        let y = l.forward(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], 2);
        assert_eq!(y, vec![4.5, 9.5, 2.5, 4.5]);
    }
}
