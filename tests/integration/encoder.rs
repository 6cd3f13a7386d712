//! The sentence encoder (src/encoder/) against reference embeddings computed outside Rust
//! (tests/data/encoder_ref.py: a numpy BERT with the HF tokenizer): the same token ids, and
//! cosine >= 0.999 for each text (accents, CJK, punctuation, an unknown word, a text cut at
//! 256 tokens). Skipped without `scripts/fetch-model --encoder`.

use edgeact::encoder::{Encoder, EncoderError, ENCODER_DIR};

use crate::testkit::root;

fn encoder_dir() -> Option<std::path::PathBuf> {
    let dir = root().join("models").join(ENCODER_DIR);
    if dir.join("model.safetensors").exists() {
        Some(dir)
    } else {
        println!(
            "skipped: {} missing (run scripts/fetch-model --encoder)",
            dir.display()
        );
        None
    }
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn embeddings_match_the_reference() {
    let Some(dir) = encoder_dir() else { return };
    let enc = Encoder::load(&dir).unwrap();
    assert_eq!(enc.dim(), 384);
    let text = std::fs::read_to_string(root().join("tests/data/encoder_ref.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let t = c["text"].as_str().unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(enc.token_ids(t), want_ids, "token ids of {t:?}");
        let want: Vec<f64> = serde_json::from_value(c["embedding"].clone()).unwrap();
        let got = enc.embed(t);
        let cos = cosine(&got, &want);
        assert!(cos >= 0.999, "cosine {cos} for {t:?}");
        let norm: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not L2-normalized: {norm}");
    }
}

#[test]
fn a_truncated_weights_file_is_a_clear_error() {
    let Some(dir) = encoder_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    match Encoder::load(tmp.path()) {
        Err(e @ EncoderError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("model.safetensors"), "{msg}");
        }
        Err(e) => panic!("expected a corrupt-file error, got {e}"),
        Ok(_) => panic!("a truncated weights file loaded"),
    }
}
