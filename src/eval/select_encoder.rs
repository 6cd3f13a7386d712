//! The encoder candidates of `edgeact tune` (method `encoder` in `--methods`): learned
//! scorers with the sentence encoder's embedding as a block ([`crate::encoder`]), fitted
//! and scored on dev like the others ([`super::select`]); all are stacks (a stack file):
//! the embedding alone (a head on the encoder), the embedding with TF-IDF n-grams at each
//! block weight, that with the model's features, and, when the caller has them, the
//! embedding, TF-IDF and the prompt's label scores at each prompt weight. Pure: embeddings come in, fitted models go out.

use std::time::Instant;

use crate::classify::features::FeatureSpec;
use crate::classify::head::HeadError;
use crate::classify::linear::LrParams;
use crate::classify::stack::{EncoderFit, StackModel, StackParams};
use crate::classify::tfidf::{TextFeaturizer, TextParams};
use crate::eval::learn::score_probs;
use crate::eval::select::{fit_temperature, LearnGrid, LearnedCandidate, PromptScores, Split};
use crate::spec::Method;

/// The encoder's identity and its embedding of every train and dev text.
#[derive(Debug, Clone, Copy)]
pub struct Embedded<'a> {
    pub sha256: &'a str,
    pub train: &'a [Vec<f32>],
    pub dev: &'a [Vec<f32>],
}

/// One parameter set: its label, the encoder block's weight (negative: unscaled), and
/// the other blocks.
type Step = (String, f64, StackParams);

fn lr(alpha: f64, max_iterations: usize) -> LrParams {
    LrParams {
        alpha,
        max_iterations,
        balanced: true,
    }
}

/// The parameter sets, simpler first (ties go to the earlier). `feature`: the model block
/// (the best head's pooling) when there are model features; `prompt`: whether the prompt
/// block can be fitted.
fn plan(grid: &LearnGrid, feature: Option<&FeatureSpec>, prompt: bool) -> Vec<Step> {
    let it = grid.max_iterations;
    let mut out = Vec::new();
    let params = |dense: Option<(FeatureSpec, f64)>, text, prompt, a| StackParams {
        dense,
        text,
        prompt,
        lr: lr(a, it),
    };
    for &a in &grid.alphas {
        out.push((
            format!("stack, encoder alone, alpha {a}"),
            -1.0,
            params(None, None, None, a),
        ));
    }
    for &w in &grid.stack_weights {
        for &a in &grid.alphas {
            out.push((
                format!("stack, encoder weight {w} + tfidf, alpha {a}"),
                w,
                params(None, Some(TextParams::words_and_chars()), None, a),
            ));
        }
    }
    if let Some(f) = feature {
        for &a in &grid.alphas {
            out.push((
                format!(
                    "stack, encoder + {} pooling + tfidf, alpha {a}",
                    f.pooling.name()
                ),
                1.0,
                params(
                    Some((f.clone(), 1.0)),
                    Some(TextParams::words_and_chars()),
                    None,
                    a,
                ),
            ));
        }
    }
    // The prompt block beside the encoder and TF-IDF, without the model features: with a
    // few dozen training texts each extra block dilutes the prompt (docs/accuracy.md).
    if prompt {
        for &w in &grid.stack_weights {
            for &a in &grid.alphas {
                out.push((
                    format!("stack, encoder + tfidf + prompt weight {w}, alpha {a}"),
                    1.0,
                    params(None, Some(TextParams::words_and_chars()), Some(w), a),
                ));
            }
        }
    }
    out
}

/// Fits every encoder candidate, calling `on_fit` after each; in plan order. `feature` is
/// used only when `train.states` and `dev.states` are there; `prompt` only when its rows
/// match the splits.
pub fn encoder_candidates(
    labels: &[String],
    (train, dev): (Split<'_>, Split<'_>),
    emb: Embedded<'_>,
    feature: Option<&FeatureSpec>,
    prompt: Option<PromptScores<'_>>,
    grid: &LearnGrid,
    mut on_fit: impl FnMut(&LearnedCandidate),
) -> Result<Vec<LearnedCandidate>, HeadError> {
    let features = !train.states.is_empty() && !dev.states.is_empty();
    let feature = feature.filter(|_| features);
    // The model block reads the states at the feature's layers (taken at the union of the
    // layer choices), as the file written for it will.
    let at = (grid.feature.layers.as_slice(), grid.final_layer);
    let (train_states, dev_states) = (train.states_at(feature, at), dev.states_at(feature, at));
    let (train, dev) = (
        Split {
            states: &train_states,
            ..train
        },
        Split {
            states: &dev_states,
            ..dev
        },
    );
    let prompt = prompt.filter(|p| p.train.len() == train.y.len() && p.dev.len() == dev.y.len());
    let re = TextFeaturizer::regex();
    let mut out = Vec::new();
    for (label, weight, p) in plan(grid, feature, prompt.is_some()) {
        let t0 = Instant::now();
        let (tp, dp) = match (p.prompt, prompt) {
            (Some(_), Some(s)) => (s.train, s.dev),
            _ => (&[][..], &[][..]),
        };
        let fit = EncoderFit {
            sha256: emb.sha256,
            weight,
            rows: emb.train,
        };
        let mut model = StackModel::fit_all(
            train.texts,
            train.states,
            tp,
            Some(fit),
            train.y,
            labels.len(),
            &p,
        )?;
        if let Some(s) = prompt {
            s.record_in(&mut model);
        }
        let fit_ms = t0.elapsed().as_secs_f64() * 1e3;
        let probs: Vec<Vec<f64>> = dev
            .texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                model.predict_all(
                    &re,
                    t,
                    dev.states.get(i),
                    dp.get(i).map(Vec::as_slice),
                    emb.dev.get(i).map(Vec::as_slice),
                )
            })
            .collect();
        fit_temperature(&mut model, &probs, dev.y);
        let c = LearnedCandidate {
            method: Method::Stack,
            label,
            model,
            dev: score_probs(labels, dev.y, &probs),
            fit_ms,
        };
        on_fit(&c);
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::features::Pooling;
    use crate::model::PooledStates;

    /// Embeddings of four texts that separate labels 0, 1, 0, 1.
    fn embeddings() -> Vec<Vec<f32>> {
        [1.0f32, -1.0, 0.9, -0.8]
            .iter()
            .map(|&v| vec![v, 0.1])
            .collect()
    }

    #[test]
    fn encoder_candidates_read_the_embedding_and_cover_the_plan() {
        // The words are the same for both labels: only the embedding separates them.
        let texts = ["same words", "same words", "same words", "same words"];
        let y = [0, 1, 0, 1];
        let emb = embeddings();
        let states: Vec<PooledStates> = (0..4)
            .map(|i| PooledStates {
                last: vec![i as f32, 1.0],
                mean: vec![0.0, i as f32],
            })
            .collect();
        let split = Split {
            texts: &texts,
            states: &states,
            y: &y,
        };
        let grid = LearnGrid {
            methods: vec![Method::Stack],
            feature: FeatureSpec::prompt_eol(Pooling::Last),
            layer_choices: Vec::new(),
            final_layer: 18,
            poolings: vec![Pooling::Last],
            alphas: vec![0.1, 1.0],
            stack_weights: vec![1.0, 3.0],
            max_iterations: 100,
        };
        let labels = vec!["a".to_string(), "b".to_string()];
        let e = Embedded {
            sha256: "s",
            train: &emb,
            dev: &emb,
        };
        let feature = FeatureSpec::prompt_eol(Pooling::Last);
        let mut seen = 0;
        let all = encoder_candidates(
            &labels,
            (split, split),
            e,
            Some(&feature),
            None,
            &grid,
            |_| seen += 1,
        )
        .unwrap();
        // alone: 2 alphas; with tfidf: 2 weights x 2 alphas; with features: 2 alphas.
        assert_eq!(all.len(), 2 + 4 + 2);
        assert_eq!(seen, all.len());
        for c in &all {
            assert_eq!(c.model.needs_encoder(), Some("s"));
            assert_eq!(c.method, Method::Stack);
        }
        assert!(all[0].label.contains("encoder alone"));
        assert!(all[0].dev.accuracy > 0.99, "{}", all[0].label);
        assert!(all[6].model.needs_features().is_some());
    }

    /// Taken at two layers (the default `final;12` choices), the model block of an encoder
    /// stack reads only the layers of the feature it saves, so the file it writes loads.
    #[test]
    fn the_model_block_reads_the_saved_features_layers() {
        let texts = ["a b", "c d", "a c", "b d"];
        let y = [0, 1, 0, 1];
        let emb = embeddings();
        // Layer 12 then layer 18 (the final output), 2 wide each.
        let states: Vec<PooledStates> = (0..4)
            .map(|i| PooledStates {
                last: vec![i as f32, 1.0, -(i as f32), 2.0],
                mean: vec![0.0, i as f32, 1.0, 0.5 * i as f32],
            })
            .collect();
        let split = Split {
            texts: &texts,
            states: &states,
            y: &y,
        };
        let mut feature = FeatureSpec::prompt_eol(Pooling::Last);
        feature.layers = vec![12, 18];
        let grid = LearnGrid {
            methods: vec![Method::Stack],
            feature,
            layer_choices: vec![vec![18], vec![12]],
            final_layer: 18,
            poolings: vec![Pooling::Last],
            alphas: vec![1.0],
            stack_weights: vec![1.0],
            max_iterations: 50,
        };
        let e = Embedded {
            sha256: "s",
            train: &emb,
            dev: &emb,
        };
        // The best head's feature: the final output alone (saved as no layers).
        let saved = FeatureSpec::prompt_eol(Pooling::Last);
        let labels = vec!["a".to_string(), "b".to_string()];
        let all = encoder_candidates(
            &labels,
            (split, split),
            e,
            Some(&saved),
            None,
            &grid,
            |_| {},
        )
        .unwrap();
        let with_model: Vec<_> = all.iter().filter_map(|c| c.model.dense.as_ref()).collect();
        assert!(!with_model.is_empty());
        for d in with_model {
            assert_eq!(d.feature.layers, Vec::<u32>::new());
            assert_eq!(d.standardizer.mean.len(), 2, "one layer's width");
        }
    }
}
