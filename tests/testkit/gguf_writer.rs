//! A minimal GGUF v3 writer for tests: string / f32 / u32 metadata and F32 tensors, enough
//! to build LoRA adapter files for the real model's shapes.

use std::io::{self, Write};
use std::path::Path;

/// One metadata value.
pub enum Meta {
    Str(String),
    F32(f32),
    U32(u32),
}

/// One F32 tensor; `dims[0]` is the fastest-varying dimension (ggml's `ne[0]`).
pub struct F32Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub data: Vec<f32>,
}

const ALIGNMENT_BYTES: usize = 32;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(ALIGNMENT_BYTES) {
        out.push(0);
    }
}

/// The bytes of a GGUF v3 file with `meta` and `tensors`, each tensor aligned to 32 bytes.
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[F32Tensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
        }
    }
    let mut offset = 0usize;
    for t in tensors {
        assert_eq!(
            t.dims.iter().product::<u64>() as usize,
            t.data.len(),
            "tensor {}: dims do not match the data",
            t.name
        );
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // GGML_TYPE_F32
        out.extend((offset as u64).to_le_bytes());
        offset += (t.data.len() * 4).div_ceil(ALIGNMENT_BYTES) * ALIGNMENT_BYTES;
    }
    pad(&mut out);
    for t in tensors {
        for v in &t.data {
            out.extend(v.to_le_bytes());
        }
        pad(&mut out);
    }
    out
}

pub fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[F32Tensor]) -> io::Result<()> {
    std::fs::File::create(path)?.write_all(&gguf_bytes(meta, tensors))
}

/// Deterministic values in [-amplitude, amplitude] (xorshift64*).
pub fn noise(seed: u64, n: usize, amplitude: f32) -> Vec<f32> {
    let mut x = seed.max(1);
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * amplitude
        })
        .collect()
}
