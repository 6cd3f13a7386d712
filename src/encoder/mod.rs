//! A small sentence encoder (all-MiniLM-L6-v2: a 6-layer, 384-wide BERT) as one more
//! feature source for the learned scorers: text -> WordPiece ids ([`wordpiece`]) -> BERT
//! forward in f32 ([`bert`], weights read from safetensors, [`safetensors`]) -> mean
//! pooling and L2 normalization, as sentence-transformers computes it. Pure Rust (the
//! boards' cross-builds need no more than the Debian gcc). Loaded only by tasks whose
//! stack file has an encoder block; `scripts/fetch-model --encoder` fetches the files.

pub mod bert;
pub mod safetensors;
pub mod wordpiece;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

use bert::{Bert, BertConfig};
use wordpiece::WordPiece;

/// The encoder's folder name, beside the GGUF model (`models/` in a clone,
/// `/var/lib/edgeact/models/` on a board).
pub const ENCODER_DIR: &str = "all-MiniLM-L6-v2";

/// Tokens per text, `[CLS]` and `[SEP]` included (sentence-transformers' `max_seq_length`
/// for this model: the rest of a longer text is not read).
pub const MAX_TOKENS: usize = 256;

/// The files read from the folder.
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("encoder file {path} is missing (fetch it with `scripts/fetch-model --encoder`)")]
    Missing { path: PathBuf },
    #[error("cannot read encoder file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoder file {path} is not usable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// A loaded encoder.
pub struct Encoder {
    tokenizer: WordPiece,
    bert: Bert,
    /// sha256 of model.safetensors (hex): the identity a stack's encoder block checks.
    pub sha256: String,
    pub dir: PathBuf,
}

/// The encoder folder for a GGUF model at `model_path`: [`ENCODER_DIR`] beside it.
pub fn dir_beside(model_path: &Path) -> PathBuf {
    model_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(ENCODER_DIR)
}

impl Encoder {
    /// Loads the three files of `dir`; a missing or damaged file is an error naming it.
    pub fn load(dir: &Path) -> Result<Encoder, EncoderError> {
        for f in FILES {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(EncoderError::Missing { path: p });
            }
        }
        let read = |f: &str| {
            let path = dir.join(f);
            std::fs::read_to_string(&path).map_err(|source| EncoderError::Io { path, source })
        };
        let corrupt = |f: &str, reason: String| EncoderError::Corrupt {
            path: dir.join(f),
            reason,
        };
        let config: BertConfig = serde_json::from_str(&read("config.json")?)
            .map_err(|e| corrupt("config.json", e.to_string()))?;
        if config.hidden_act != "gelu"
            || config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(corrupt(
                "config.json",
                format!(
                    "unsupported: activation {}, {} heads of width {}",
                    config.hidden_act, config.num_attention_heads, config.hidden_size
                ),
            ));
        }
        let tokenizer = WordPiece::from_tokenizer_json(&read("tokenizer.json")?)
            .map_err(|e| corrupt("tokenizer.json", e))?;
        if tokenizer.vocab_len() > config.vocab_size {
            return Err(corrupt(
                "tokenizer.json",
                format!(
                    "{} tokens for an embedding table of {}",
                    tokenizer.vocab_len(),
                    config.vocab_size
                ),
            ));
        }
        let weights = dir.join("model.safetensors");
        let sha256 = file_sha256(&weights)?;
        let mut st = safetensors::SafeTensors::open(&weights)?;
        let bert = Bert::load(&mut st, config)?;
        Ok(Encoder {
            tokenizer,
            bert,
            sha256,
            dir: dir.to_path_buf(),
        })
    }

    /// Width of an embedding.
    pub fn dim(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// The token ids of `text` (at most [`MAX_TOKENS`]).
    pub fn token_ids(&self, text: &str) -> Vec<u32> {
        let max = MAX_TOKENS.min(self.bert.config.max_position_embeddings);
        self.tokenizer.encode(text, max)
    }

    /// The L2-normalized sentence embedding of `text` (compare two with [`cosine`]).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        self.bert.embed(&self.token_ids(text))
    }

    /// Bytes held after loading: the f32 weights.
    pub fn weight_bytes(&self) -> u64 {
        self.bert.weight_bytes()
    }

    /// Peak bytes of one forward pass at [`MAX_TOKENS`].
    pub fn activation_bytes(&self) -> u64 {
        Bert::activation_bytes(&self.bert.config, MAX_TOKENS)
    }
}

/// Bytes the encoder in `dir` will take, before loading it (the budget's figure): the
/// safetensors file size (f32 weights; the unused position-id table is a few KiB) plus a
/// forward pass at [`MAX_TOKENS`] for this model's sizes (384 wide, 1536 intermediate).
pub fn planned_bytes(dir: &Path) -> Result<u64, EncoderError> {
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path)
        .map_err(|_| EncoderError::Missing { path: path.clone() })?
        .len();
    let config = BertConfig {
        vocab_size: 0,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
    };
    Ok(len + Bert::activation_bytes(&config, MAX_TOKENS))
}

/// The encoder of `dir`, loaded once: while one copy is alive, every task (and a reload)
/// shares it, so the memory budget counts it once.
pub fn shared(dir: &Path) -> Result<Arc<Encoder>, EncoderError> {
    static LOADED: Mutex<Vec<(PathBuf, Weak<Encoder>)>> = Mutex::new(Vec::new());
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    loaded.retain(|(_, w)| w.strong_count() > 0);
    if let Some(e) = loaded
        .iter()
        .find(|(d, _)| d == dir)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(e);
    }
    let e = Arc::new(Encoder::load(dir)?);
    loaded.push((dir.to_path_buf(), Arc::downgrade(&e)));
    Ok(e)
}

fn file_sha256(path: &Path) -> Result<String, EncoderError> {
    let io = |source| EncoderError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The cosine similarity of two [`Encoder::embed`] vectors: their dot product, since both
/// are L2-normalized (summed in f64).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x * y)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = Encoder::load(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("config.json") && e.contains("fetch-model --encoder"),
            "{e}"
        );
        for f in FILES {
            std::fs::write(dir.path().join(f), "{}").unwrap();
        }
        let e = Encoder::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("config.json") && e.contains("not usable"), "{e}");
        assert_eq!(
            dir_beside(Path::new("models/gemma.gguf")),
            Path::new("models").join(ENCODER_DIR)
        );
    }

    #[test]
    fn cosine_of_unit_vectors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-9);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-9);
    }
}
