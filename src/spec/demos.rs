//! The `[demos]` table of a classification task: the task's `examples` become a pool, and
//! each request is shown the examples most similar to it (a balanced number per label)
//! instead of all of them as a fixed prefix. The choice itself is `crate::classify::demos`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::SpecError;

/// What measures how similar a pool example is to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoSimilarity {
    /// Cosine of TF-IDF word 1-2 grams plus cosine of character 2-4 grams, fitted on the
    /// pool (CJK ideographs are words, so Chinese gets character n-grams either way).
    Tfidf,
    /// Cosine of the sentence encoder's embeddings (the encoder beside the model).
    Encoder,
}

impl DemoSimilarity {
    pub fn name(self) -> &'static str {
        match self {
            DemoSimilarity::Tfidf => "tfidf",
            DemoSimilarity::Encoder => "encoder",
        }
    }

    pub fn parse(s: &str) -> Option<DemoSimilarity> {
        match s {
            "tfidf" => Some(DemoSimilarity::Tfidf),
            "encoder" => Some(DemoSimilarity::Encoder),
            _ => None,
        }
    }
}

/// `[demos]`: retrieved demonstrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demos {
    /// The most similar examples of each label shown per request (a label with fewer in
    /// the pool shows what it has).
    pub per_label: usize,
    /// How similarity is measured.
    #[serde(default = "default_by")]
    pub by: DemoSimilarity,
}

fn default_by() -> DemoSimilarity {
    DemoSimilarity::Tfidf
}

impl Demos {
    pub(super) fn validate(&self, path: &Path, n_examples: usize) -> Result<(), SpecError> {
        if self.per_label == 0 {
            return Err(SpecError::invalid(
                path,
                "demos.per_label",
                "must be at least 1",
            ));
        }
        if n_examples == 0 {
            return Err(SpecError::invalid(
                path,
                "demos",
                "the demonstrations are chosen from the task's `examples`, and it has none",
            ));
        }
        Ok(())
    }
}
