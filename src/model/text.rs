//! Text and tokens: the model's vocabulary both ways, and its chat template.

use llama_cpp_2::token::LlamaToken;

use super::Engine;
use crate::model::scoring::Token;

impl Engine {
    /// Tokens of `text`. `bos` adds the model's begin-of-sequence token; `special` lets
    /// control-token text (such as `<start_of_turn>`) become control tokens: only for
    /// trusted template text, never for request fields.
    pub fn tokenize(&self, text: &str, bos: bool, special: bool) -> Vec<Token> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), bos, special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Text of `tokens` (lossy for a cut multi-byte character).
    pub fn detokenize(&self, tokens: &[Token]) -> String {
        let vocab = self.model.vocab();
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend(vocab.token_to_piece(LlamaToken(t), false, None));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The model's chat template applied to one user turn, with the assistant turn opened.
    pub fn chat_wrap(&self, user: &str) -> Result<String, String> {
        let tmpl = self.model.chat_template(None).map_err(|e| e.to_string())?;
        let msg = llama_cpp_2::model::LlamaChatMessage::new("user".into(), user.into())
            .map_err(|e| e.to_string())?;
        self.model
            .apply_chat_template(&tmpl, &[msg], true)
            .map_err(|e| e.to_string())
    }
}
