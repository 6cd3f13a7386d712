//! The features a learned head reads: the text put into a fixed feature prompt (PromptEOL
//! by default), the prompt's final hidden states from the model's embeddings context
//! ([`crate::model::FeatureContext`]), pooled into one vector per text.

use serde::{Deserialize, Serialize};

use super::head::HeadError;
use crate::classify::Truncation;
use crate::model::scoring::Token;
use crate::model::{Engine, FeatureContext, PooledStates};
use crate::spec::{Template, TruncatePolicy, TRUNCATED_FIELD};

/// The feature prompt of PromptEOL (Jiang et al. 2023): the last token's state has to
/// predict a one-word summary of the sentence.
pub const PROMPT_EOL: &str = "This sentence : \"{text}\" means in one word:\"";

/// How the token states of the feature prompt become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The last token's state.
    Last,
    /// The mean over the prompt's tokens (BOS excluded).
    Mean,
    /// Both, concatenated (twice the width).
    LastMean,
}

impl Pooling {
    pub const ALL: [Pooling; 3] = [Pooling::Last, Pooling::Mean, Pooling::LastMean];

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Last => "last",
            Pooling::Mean => "mean",
            Pooling::LastMean => "last_mean",
        }
    }

    pub fn parse(s: &str) -> Option<Pooling> {
        Pooling::ALL
            .into_iter()
            .find(|p| p.name() == s || (s == "last+mean" && *p == Pooling::LastMean))
    }

    /// The feature vector of one sequence's states.
    pub fn apply(self, s: &PooledStates) -> Vec<f32> {
        match self {
            Pooling::Last => s.last.clone(),
            Pooling::Mean => s.mean.clone(),
            Pooling::LastMean => [s.last.as_slice(), s.mean.as_slice()].concat(),
        }
    }
}

/// What the features are: the prompt the text is put into, the pooling, the text budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Template with one `{text}` placeholder.
    pub prompt: String,
    pub pooling: Pooling,
    /// Most tokens of the text kept (the head of the text).
    pub max_text_tokens: usize,
    /// The layers whose outputs are pooled, concatenated in this order (0 = the first
    /// layer's output); empty: the model's final normed output, as before layers could be
    /// chosen (files without this key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<u32>,
}

impl FeatureSpec {
    pub fn prompt_eol(pooling: Pooling) -> FeatureSpec {
        FeatureSpec {
            prompt: PROMPT_EOL.into(),
            pooling,
            max_text_tokens: 96,
            layers: Vec::new(),
        }
    }

    /// Width of one pooled feature vector for a model of width `n_embd`.
    pub fn width(&self, n_embd: usize) -> usize {
        let per = match self.pooling {
            Pooling::LastMean => 2,
            _ => 1,
        };
        per * self.layers.len().max(1) * n_embd
    }

    /// How the layers are named in candidate labels and reports: `final` or `layers 6,9`.
    pub fn layers_name(&self) -> String {
        layers_name(&self.layers)
    }

    /// The prompt's literal text before and after `{text}`.
    pub(super) fn split(&self) -> Result<(String, String), HeadError> {
        let bad = |reason: &str| HeadError::Prompt {
            prompt: self.prompt.clone(),
            reason: reason.into(),
        };
        let t = Template::parse(&self.prompt).map_err(|r| bad(&r))?;
        if t.fields() != [TRUNCATED_FIELD] {
            return Err(bad("needs exactly one placeholder, {text}"));
        }
        let mark = "\u{1}";
        let r = t.render(|_| Some(mark)).map_err(|r| bad(&r))?;
        match r.split_once(mark) {
            Some((a, b)) if !b.contains(mark) => Ok((a.to_string(), b.to_string())),
            _ => Err(bad("{text} may appear once")),
        }
    }
}

/// `final` for no layers, else `layers 6,9,12`.
pub fn layers_name(layers: &[u32]) -> String {
    if layers.is_empty() {
        return "final".into();
    }
    let l: Vec<String> = layers.iter().map(u32::to_string).collect();
    format!("layers {}", l.join(","))
}

/// Parses a layer list as users write it: `final` (or empty) for the final output, else
/// comma-separated layer indices (`6,9,12`).
pub fn parse_layers(s: &str) -> Option<Vec<u32>> {
    let s = s.trim();
    if s.is_empty() || s == "final" {
        return Some(Vec::new());
    }
    s.split(',').map(|p| p.trim().parse().ok()).collect()
}

/// Turns texts into feature-prompt tokens that always fit the feature context:
/// BOS + tokens(prompt before `{text}`) + the text's first tokens + tokens(after).
pub struct FeatureTokenizer {
    before: Vec<Token>,
    after: Vec<Token>,
    /// Most text tokens kept.
    pub text_budget: usize,
}

impl FeatureTokenizer {
    pub fn new(
        engine: &Engine,
        spec: &FeatureSpec,
        max_tokens: usize,
    ) -> Result<FeatureTokenizer, HeadError> {
        let (a, b) = spec.split()?;
        let before = engine.tokenize(&a, true, false);
        let after = engine.tokenize(&b, false, false);
        let room = max_tokens.saturating_sub(before.len() + after.len());
        if room == 0 {
            return Err(HeadError::Prompt {
                prompt: spec.prompt.clone(),
                reason: format!("leaves no room for text in {max_tokens} tokens"),
            });
        }
        Ok(FeatureTokenizer {
            before,
            after,
            text_budget: room.min(spec.max_text_tokens.max(1)),
        })
    }

    /// The tokens for `text`, and the truncation when the text was cut.
    pub fn tokens(&self, engine: &Engine, text: &str) -> (Vec<Token>, Option<Truncation>) {
        let t = engine.tokenize(text, false, false);
        let kept = t.len().min(self.text_budget);
        let cut = (kept < t.len()).then_some(Truncation {
            policy: TruncatePolicy::KeepHead,
            input_tokens: t.len(),
            kept_tokens: kept,
        });
        let mut out = self.before.clone();
        out.extend_from_slice(&t[..kept]);
        out.extend_from_slice(&self.after);
        (out, cut)
    }
}

/// Pooled states of `texts` under `spec`'s prompt (pooling not applied yet: one pass gives
/// every pooling), with an indicatif bar when `progress`.
pub fn extract_states(
    engine: &Engine,
    fctx: &mut FeatureContext,
    spec: &FeatureSpec,
    texts: &[&str],
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<PooledStates>, HeadError> {
    let tok = FeatureTokenizer::new(engine, spec, fctx.max_tokens())?;
    let seqs: Vec<Vec<Token>> = texts.iter().map(|t| tok.tokens(engine, t).0).collect();
    let base = progress.map(|b| b.position()).unwrap_or(0);
    Ok(fctx.hidden_states(&seqs, &spec.layers, |done| {
        if let Some(b) = progress {
            b.set_position(base + done as u64);
        }
    })?)
}

/// A progress bar in the house style (hidden when not wanted).
pub fn progress_bar(len: usize, msg: &str, show: bool) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_prompt_needs_one_text_placeholder() {
        let mut s = FeatureSpec::prompt_eol(Pooling::Mean);
        let (a, b) = s.split().unwrap();
        assert_eq!(a, "This sentence : \"");
        assert_eq!(b, "\" means in one word:\"");
        s.prompt = "no placeholder".into();
        assert!(s.split().is_err());
        s.prompt = "{text} and {text}".into();
        assert!(s.split().is_err());
        s.prompt = "{text} {other}".into();
        assert!(s.split().is_err());
    }

    #[test]
    fn layers_parse_name_size_and_default_to_the_final_output() {
        assert_eq!(parse_layers("final"), Some(vec![]));
        assert_eq!(parse_layers(" 6, 9 "), Some(vec![6, 9]));
        assert_eq!(parse_layers("six"), None);
        assert_eq!(layers_name(&[]), "final");
        assert_eq!(layers_name(&[6, 9]), "layers 6,9");
        let mut s = FeatureSpec::prompt_eol(Pooling::LastMean);
        assert_eq!(s.width(640), 1280);
        s.layers = vec![6, 9, 12];
        assert_eq!(s.width(640), 3 * 1280);
        // A file written before layers could be chosen reads as the final output, and a
        // spec on the final output writes no `layers` key.
        let old = r#"{"prompt":"T: {text}","pooling":"last","max_text_tokens":96}"#;
        let f: FeatureSpec = serde_json::from_str(old).unwrap();
        assert!(f.layers.is_empty());
        assert_eq!(serde_json::to_string(&f).unwrap(), old);
        let back: FeatureSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn pooling_names_and_widths() {
        let st = PooledStates {
            last: vec![1.0, 2.0],
            mean: vec![3.0, 4.0],
        };
        assert_eq!(Pooling::Last.apply(&st), vec![1.0, 2.0]);
        assert_eq!(Pooling::LastMean.apply(&st), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(Pooling::parse("last+mean"), Some(Pooling::LastMean));
        assert_eq!(Pooling::parse("mean"), Some(Pooling::Mean));
        assert_eq!(Pooling::parse("max"), None);
    }
}
