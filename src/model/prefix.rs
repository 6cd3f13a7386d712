//! Prefix slots: a task's fixed prompt beginning decoded once into its own sequence (slot i
//! is sequence i) and copied by later jobs; optionally saved to and loaded from a state
//! cache on disk, keyed by model, context settings, adapter and tokens.

use std::path::{Path, PathBuf};

use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use super::decode::Entry;
use super::load::file_sha256_uncached;
use super::{Engine, EngineError};
use crate::model::scoring::Token;

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

impl Engine {
    /// Tokens held in a prefix slot.
    pub fn prefix_tokens(&self, slot: usize) -> &[Token] {
        &self.prefixes[slot]
    }

    /// Sets the folder of the prefix cache on disk (None: off); returns the previous one.
    pub fn set_prefix_cache_dir(&mut self, dir: Option<PathBuf>) -> Option<PathBuf> {
        std::mem::replace(&mut self.prefix_cache_dir, dir)
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
}
