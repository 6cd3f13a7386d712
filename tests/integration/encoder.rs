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

fn edgeact(args: &[&str], cache: &std::path::Path, stdin: Option<&str>) -> std::process::Output {
    let input = stdin.unwrap_or_default().as_bytes();
    crate::testkit::edgeact(args, &[("EDGEACT_CACHE", cache)], input)
}

fn lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// `tune --methods encoder` writes a stack with the encoder block; `classify` and `serve`
/// run it through the same scorer (same scores), the trace says `stack`; without the
/// encoder beside the model the task refuses to load, naming the missing file.
#[test]
fn an_encoder_stack_is_tuned_and_runs_the_same_in_classify_and_serve() {
    if encoder_dir().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = crate::learned::split_data(dir.path());
    let task = dir.path().join("enc.toml");
    let o = edgeact(
        &crate::learned::tune_args(&data, "encoder", &task),
        dir.path(),
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("stack, encoder alone"), "{report}");
    let stack: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("enc.stack.json")).unwrap()).unwrap();
    assert!(
        stack["stack"]["encoder"]["sha256"].is_string(),
        "no encoder block"
    );

    let texts = [
        "What a wonderful, friendly place, I loved it.",
        "Terrible service, cold food, never again.",
    ];
    let t = task.to_str().unwrap();
    let o = edgeact(
        &["classify", "--task", t, texts[0], texts[1]],
        dir.path(),
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let classified = lines(&o.stdout);
    assert_eq!(classified[0]["provenance"]["method"], "stack");
    assert_eq!(classified[0]["top_label"], "positive", "{}", classified[0]);
    assert_eq!(classified[1]["top_label"], "negative", "{}", classified[1]);

    let input: String = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("r{i}"), "text": t})
            )
        })
        .collect();
    let o = edgeact(&["serve", "--task", t], dir.path(), Some(&input));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let served = lines(&o.stdout);
    assert_eq!(served.len(), 2);
    for (s, c) in served.iter().zip(&classified) {
        assert_eq!(s["provenance"]["method"], "stack", "{s}");
        for l in ["positive", "negative"] {
            let (a, b) = (
                s["scores"][l].as_f64().unwrap(),
                c["scores"][l].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-6, "{l}: serve {a} vs classify {b}");
        }
    }

    // A model folder without the encoder: the task cannot load, and says what to fetch.
    let lone = dir.path().join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    let model = root().join("models/gemma-3-270m-q4_k_m.gguf");
    std::os::unix::fs::symlink(std::fs::canonicalize(model).unwrap(), lone.join("m.gguf")).unwrap();
    let m = lone.join("m.gguf");
    let o = edgeact(
        &[
            "classify",
            "--task",
            t,
            "--model",
            m.to_str().unwrap(),
            texts[0],
        ],
        dir.path(),
        None,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "loaded without the encoder");
    assert!(err.contains("fetch-model --encoder"), "{err}");
}

/// `scripts/fetch-model --encoder` with both files in the cache downloads nothing: it checks
/// the encoder's weights against the manifest's sha256 and links the folder into the clone.
/// An unknown argument is refused.
#[test]
fn fetch_model_links_a_cached_encoder_and_refuses_unknown_arguments() {
    let Some(enc) = encoder_dir() else { return };
    let model = root().join("models/gemma-3-270m-q4_k_m.gguf");
    if !model.exists() {
        println!(
            "skipped: {} missing (run scripts/fetch-model)",
            model.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let clone = tmp.path().join("clone");
    for f in [
        "scripts/fetch-model",
        "models/gemma-3-270m-q4_k_m.toml",
        "models/all-minilm-l6-v2.toml",
    ] {
        let to = clone.join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(root().join(f), &to).unwrap();
    }
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join("models")).unwrap();
    let link = |from: &std::path::Path, name: &str| {
        std::os::unix::fs::symlink(
            std::fs::canonicalize(from).unwrap(),
            cache.join("models").join(name),
        )
        .unwrap()
    };
    link(&model, "gemma-3-270m-q4_k_m.gguf");
    link(&enc, ENCODER_DIR);
    let run = |args: &[&str]| {
        std::process::Command::new(clone.join("scripts/fetch-model"))
            .args(args)
            .env("EDGEACT_CACHE", &cache)
            .output()
            .unwrap()
    };
    let out = run(&["--encoder"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("sha256 ok").count(), 2, "{err}");
    assert!(clone
        .join("models")
        .join(ENCODER_DIR)
        .join("model.safetensors")
        .exists());
    let out = run(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}
