//! The learned candidates of `edgeact tune` (besides its prompt candidates,
//! [`super::tune`]): plain TF-IDF (the baseline's own settings first, so a tuned task is
//! never worse on dev than the baseline), TF-IDF with character n-grams, the head on model
//! features (each pooling), and the stack of them (with the prompt's label log-probabilities
//! as a third block when the caller has them), each over a few L2 strengths; all scored on
//! the same dev rows by macro-F1. Pure: features and prompt scores come in, fitted models go
//! out.

use std::time::Instant;

use crate::classify::features::{layers_name, FeatureSpec, Pooling};
use crate::classify::head::HeadError;
use crate::classify::linear::LrParams;
use crate::classify::stack::{StackModel, StackParams};
use crate::classify::temperature;
use crate::classify::tfidf::{TextFeaturizer, TextParams};
use crate::eval::learn::score_probs;
use crate::eval::metrics::Metrics;
use crate::model::scoring::LogprobOver;
use crate::model::PooledStates;
use crate::spec::Method;

/// What to try.
#[derive(Debug, Clone)]
pub struct LearnGrid {
    /// Which of head, stack, tfidf (others are ignored).
    pub methods: Vec<Method>,
    /// The feature prompt (its pooling is replaced by each of `poolings`); its `layers` are
    /// the ones the splits' states were taken at.
    pub feature: FeatureSpec,
    /// The layer choices the head tries, each a subset of `feature.layers` (empty list: the
    /// states as taken). [`final_layer`](LearnGrid::final_layer) in a choice is the final
    /// output; a choice that is only that is saved as `[]` (the final output).
    pub layer_choices: Vec<Vec<u32>>,
    /// The model's layer count: its index is the final normed output.
    pub final_layer: u32,
    pub poolings: Vec<Pooling>,
    pub alphas: Vec<f64>,
    /// Weights of the model block against the TF-IDF blocks in the stack.
    pub stack_weights: Vec<f64>,
    pub max_iterations: usize,
}

impl LearnGrid {
    /// Fixes the layers for a model of `n_layer` layers: each choice explicit (`[]`, the
    /// final output, becomes `[n_layer]`), and `feature.layers` (what is extracted, once for
    /// all choices) their union in model order. Only the final output keeps `[]`.
    pub fn resolve_layers(&mut self, n_layer: u32) {
        self.final_layer = n_layer;
        if self.layer_choices.is_empty() {
            return;
        }
        // A default choice deeper than a smaller model goes; the final output stays.
        self.layer_choices
            .retain(|c| c.iter().all(|&l| l <= n_layer));
        if self.layer_choices.is_empty() {
            self.layer_choices.push(Vec::new());
        }
        for c in self.layer_choices.iter_mut() {
            if c.is_empty() {
                c.push(n_layer);
            }
        }
        let mut union: Vec<u32> = self.layer_choices.iter().flatten().copied().collect();
        union.sort_unstable();
        union.dedup();
        if union == [n_layer] {
            union.clear();
            self.layer_choices.clear();
        }
        self.feature.layers = union;
    }

    pub fn needs_features(&self) -> bool {
        self.methods
            .iter()
            .any(|m| matches!(m, Method::Head | Method::Stack))
    }
}

/// One labeled split: texts, their pooled states (empty when no model block is tried) and
/// label indices.
#[derive(Debug, Clone, Copy)]
pub struct Split<'a> {
    pub texts: &'a [&'a str],
    pub states: &'a [PooledStates],
    pub y: &'a [usize],
}

impl<'a> Split<'a> {
    /// The states at `feature`'s layers (taken at `from`; `final_layer` is the final
    /// output), as a file saved with that feature will read them; all of them without one.
    pub fn states_at(
        &self,
        feature: Option<&FeatureSpec>,
        (from, final_layer): (&[u32], u32),
    ) -> std::borrow::Cow<'a, [PooledStates]> {
        match feature {
            Some(f) => states_for(self.states, from, f, final_layer),
            None => std::borrow::Cow::Borrowed(self.states),
        }
    }
}

/// The prompt's label probabilities (task label order) of every train and dev row: the
/// stack's prompt block.
#[derive(Debug, Clone, Copy)]
pub struct PromptScores<'a> {
    pub train: &'a [Vec<f64>],
    pub dev: &'a [Vec<f64>],
    /// What the prompt runs normalized the label log-probabilities over (recorded in the
    /// prompt block, so inference runs the prompt the same way).
    pub logprob_over: LogprobOver,
}

impl PromptScores<'_> {
    /// Records in `model`'s prompt block (if it has one) what its scores were normalized over.
    pub fn record_in(&self, model: &mut StackModel) {
        if let Some(b) = model.prompt.as_mut() {
            b.logprob_over = self.logprob_over;
        }
    }
}

/// One fitted candidate with its dev figures.
pub struct LearnedCandidate {
    pub method: Method,
    /// e.g. `stack, last pooling, weight 1, alpha 0.1`.
    pub label: String,
    pub model: StackModel,
    pub dev: Metrics,
    pub fit_ms: f64,
}

/// Sets `model`'s temperature to the one that fits its dev `probs` best
/// ([`crate::classify::temperature`]). The candidate's dev metrics stay those of the
/// unscaled probabilities: the top labels are the same, and an ECE measured on the rows the
/// temperature was fitted on would flatter it (`eval` on another split shows it).
pub fn fit_temperature(model: &mut StackModel, probs: &[Vec<f64>], gold: &[usize]) {
    model.model.temperature = temperature::fit(probs, gold);
}

fn lr(alpha: f64, max_iterations: usize) -> LrParams {
    LrParams {
        alpha,
        max_iterations,
        balanced: true,
    }
}

/// The baseline's TF-IDF settings (word 1-2 grams, C = 1, no class weights).
fn baseline(max_iterations: usize) -> StackParams {
    StackParams {
        dense: None,
        text: Some(TextParams::words()),
        prompt: None,
        lr: LrParams {
            alpha: 1.0,
            max_iterations,
            balanced: false,
        },
    }
}

/// The parameter sets to fit, in order (simpler first: ties go to the earlier), each with its
/// method and label. The stack's pooling is filled in after the heads (`None` here).
fn plan(grid: &LearnGrid) -> Vec<(Method, String, StackParams)> {
    let mut out = Vec::new();
    let has = |m| grid.methods.contains(&m);
    if has(Method::Tfidf) {
        out.push((
            Method::Tfidf,
            "tfidf, words (the baseline: alpha 1, unweighted)".into(),
            baseline(grid.max_iterations),
        ));
        for &a in &grid.alphas {
            out.push((
                Method::Tfidf,
                format!("tfidf, words+chars, alpha {a}"),
                StackParams {
                    dense: None,
                    text: Some(TextParams::words_and_chars()),
                    prompt: None,
                    lr: lr(a, grid.max_iterations),
                },
            ));
        }
    }
    if has(Method::Head) {
        let whole = [grid.feature.layers.clone()];
        let choices = match grid.layer_choices.is_empty() {
            true => &whole[..],
            false => &grid.layer_choices[..],
        };
        for layers in choices {
            let layers = saved_layers(layers, grid.final_layer);
            let what = match layers.is_empty() {
                true => String::new(),
                false => format!("{}, ", layers_name(&layers)),
            };
            for &p in &grid.poolings {
                for &a in &grid.alphas {
                    let feature = FeatureSpec {
                        pooling: p,
                        layers: layers.clone(),
                        ..grid.feature.clone()
                    };
                    // Weight -1: unscaled standardized features (see `fit_one`), as `tune --head`.
                    out.push((
                        Method::Head,
                        format!("head, {what}{} pooling, alpha {a}", p.name()),
                        StackParams {
                            dense: Some((feature, -1.0)),
                            text: None,
                            prompt: None,
                            lr: lr(a, grid.max_iterations),
                        },
                    ));
                }
            }
        }
    }
    out
}

/// `layers 9, ` for a label; nothing for the final output.
fn layers_prefix(f: &FeatureSpec) -> String {
    match f.layers.is_empty() {
        true => String::new(),
        false => format!("{}, ", f.layers_name()),
    }
}

/// A layer choice as saved in the head or stack file: only the final output is `[]`.
fn saved_layers(layers: &[u32], final_layer: u32) -> Vec<u32> {
    match layers {
        [l] if *l == final_layer => Vec::new(),
        _ => layers.to_vec(),
    }
}

/// The states of `split` at the layers of `feature` (taken at `from`; `final_layer` is the
/// final output): borrowed when they are the same, else selected.
fn states_for<'a>(
    states: &'a [PooledStates],
    from: &[u32],
    feature: &FeatureSpec,
    final_layer: u32,
) -> std::borrow::Cow<'a, [PooledStates]> {
    let to: Vec<u32> = match feature.layers.is_empty() {
        true => vec![final_layer],
        false => feature.layers.clone(),
    };
    if feature.layers == from || states.is_empty() {
        return std::borrow::Cow::Borrowed(states);
    }
    // An unknown layer (none: choices are subsets) keeps the states as taken.
    std::borrow::Cow::Owned(
        states
            .iter()
            .map(|s| s.select(from, &to).unwrap_or_else(|| s.clone()))
            .collect(),
    )
}

/// Fits one parameter set and scores it on dev. A negative dense weight means "unscaled"
/// (weight sqrt(width): each standardized feature as is).
fn fit_one(
    labels: &[String],
    (train, dev): (Split<'_>, Split<'_>),
    at: (&[u32], u32),
    prompt: Option<PromptScores<'_>>,
    (method, label, mut p): (Method, String, StackParams),
) -> Result<LearnedCandidate, HeadError> {
    let feature = p.dense.as_ref().map(|(f, _)| f);
    let (train_states, dev_states) = (train.states_at(feature, at), dev.states_at(feature, at));
    let train = Split {
        states: &train_states,
        ..train
    };
    let dev = Split {
        states: &dev_states,
        ..dev
    };
    if let Some((f, w)) = p.dense.as_mut() {
        if *w < 0.0 {
            let width = train.states.first().map_or(1, |s| f.pooling.apply(s).len());
            *w = (width as f64).sqrt();
        }
    }
    let t0 = Instant::now();
    let (train_prompt, dev_prompt) = match (p.prompt, prompt) {
        (Some(_), Some(s)) => (s.train, s.dev),
        _ => (&[][..], &[][..]),
    };
    let mut model = StackModel::fit_blocks(
        train.texts,
        train.states,
        train_prompt,
        train.y,
        labels.len(),
        &p,
    )?;
    if let Some(s) = prompt {
        s.record_in(&mut model);
    }
    let fit_ms = t0.elapsed().as_secs_f64() * 1e3;
    let re = TextFeaturizer::regex();
    let probs: Vec<Vec<f64>> = dev
        .texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let pr = dev_prompt.get(i).map(Vec::as_slice);
            model.predict_with(&re, t, dev.states.get(i), pr)
        })
        .collect();
    fit_temperature(&mut model, &probs, dev.y);
    Ok(LearnedCandidate {
        method,
        label,
        model,
        dev: score_probs(labels, dev.y, &probs),
        fit_ms,
    })
}

/// Fits every candidate of `grid` (the stack on the best head's pooling, or on the first
/// pooling without head candidates), calling `on_fit` after each; in plan order. No prompt
/// block: see [`learned_candidates_with`].
pub fn learned_candidates(
    labels: &[String],
    train: Split<'_>,
    dev: Split<'_>,
    grid: &LearnGrid,
    on_fit: impl FnMut(&LearnedCandidate),
) -> Result<Vec<LearnedCandidate>, HeadError> {
    learned_candidates_with(labels, train, dev, None, grid, on_fit)
}

/// [`learned_candidates`], and with `prompt` scores also the stacks with the prompt block
/// (model features at weight 1 when there are features, TF-IDF, and the prompt block at
/// each of `grid.stack_weights`), after the others.
pub fn learned_candidates_with(
    labels: &[String],
    train: Split<'_>,
    dev: Split<'_>,
    prompt: Option<PromptScores<'_>>,
    grid: &LearnGrid,
    mut on_fit: impl FnMut(&LearnedCandidate),
) -> Result<Vec<LearnedCandidate>, HeadError> {
    let features = !train.states.is_empty() && !dev.states.is_empty();
    let prompt = prompt.filter(|p| p.train.len() == train.y.len() && p.dev.len() == dev.y.len());
    let at = (grid.feature.layers.as_slice(), grid.final_layer);
    let mut out: Vec<LearnedCandidate> = Vec::new();
    for step in plan(grid) {
        if step.2.dense.is_some() && !features {
            continue;
        }
        let c = fit_one(labels, (train, dev), at, None, step)?;
        on_fit(&c);
        out.push(c);
    }
    let stack = grid.methods.contains(&Method::Stack);
    let feature = stack_feature(grid, &out);
    if stack && features {
        let pooling = feature.pooling;
        for &w in &grid.stack_weights {
            for &a in &grid.alphas {
                let step = (
                    Method::Stack,
                    format!(
                        "stack, {}{} pooling, weight {w}, alpha {a}",
                        layers_prefix(&feature),
                        pooling.name()
                    ),
                    StackParams {
                        dense: Some((feature.clone(), w)),
                        text: Some(TextParams::words_and_chars()),
                        prompt: None,
                        lr: lr(a, grid.max_iterations),
                    },
                );
                let c = fit_one(labels, (train, dev), at, None, step)?;
                on_fit(&c);
                out.push(c);
            }
        }
    }
    if let (true, Some(scores)) = (stack, prompt) {
        for &w in &grid.stack_weights {
            for &a in &grid.alphas {
                let (dense, what) = if features {
                    (
                        Some((feature.clone(), 1.0)),
                        format!(
                            "{}{} pooling weight 1, ",
                            layers_prefix(&feature),
                            feature.pooling.name()
                        ),
                    )
                } else {
                    (None, String::new())
                };
                let step = (
                    Method::Stack,
                    format!("stack, {what}tfidf, prompt weight {w}, alpha {a}"),
                    StackParams {
                        dense,
                        text: Some(TextParams::words_and_chars()),
                        prompt: Some(w),
                        lr: lr(a, grid.max_iterations),
                    },
                );
                let c = fit_one(labels, (train, dev), at, Some(scores), step)?;
                on_fit(&c);
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// The stack's model features: the best head's pooling (or the first pooling tried).
pub fn stack_feature(grid: &LearnGrid, fitted: &[LearnedCandidate]) -> FeatureSpec {
    // The earliest (simplest) of equals, as `pick_best`.
    let best = fitted
        .iter()
        .filter(|c| c.method == Method::Head)
        .fold(None::<&LearnedCandidate>, |b, c| match b {
            Some(b) if b.dev.macro_f1 >= c.dev.macro_f1 => Some(b),
            _ => Some(c),
        })
        .and_then(|c| c.model.needs_features());
    if let Some(f) = best {
        return f.clone();
    }
    // No head fitted: the first pooling and layer choice.
    let layers = grid
        .layer_choices
        .first()
        .map_or(grid.feature.layers.clone(), |l| {
            saved_layers(l, grid.final_layer)
        });
    FeatureSpec {
        pooling: grid.poolings.first().copied().unwrap_or(Pooling::Last),
        layers,
        ..grid.feature.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(v: f32) -> PooledStates {
        PooledStates {
            last: vec![v, 0.5],
            mean: vec![-v, 0.1],
        }
    }

    #[test]
    fn every_method_is_fitted_and_scored_on_dev_in_plan_order() {
        let texts = ["good film", "bad film", "great plot", "awful plot"];
        let states = [st(1.0), st(-1.0), st(0.8), st(-0.9)];
        let y = [0, 1, 0, 1];
        let train = Split {
            texts: &texts,
            states: &states,
            y: &y,
        };
        let labels = vec!["pos".to_string(), "neg".to_string()];
        let grid = LearnGrid {
            methods: vec![Method::Tfidf, Method::Head, Method::Stack],
            feature: FeatureSpec::prompt_eol(Pooling::Last),
            poolings: vec![Pooling::Last, Pooling::Mean],
            layer_choices: Vec::new(),
            final_layer: 18,
            alphas: vec![0.1, 1.0],
            stack_weights: vec![1.0],
            max_iterations: 100,
        };
        let mut seen = 0;
        let all = learned_candidates(&labels, train, train, &grid, |_| seen += 1).unwrap();
        // tfidf: baseline + 2 alphas; head: 2 poolings x 2 alphas; stack: 1 weight x 2 alphas.
        assert_eq!(all.len(), 3 + 4 + 2);
        assert_eq!(seen, all.len());
        assert!(all[0].label.contains("baseline"));
        let kinds: Vec<&str> = all.iter().map(|c| c.model.kind()).collect();
        assert_eq!(kinds[..3], ["tfidf"; 3]);
        assert_eq!(kinds[3..7], ["head"; 4]);
        assert_eq!(kinds[7..], ["stack"; 2]);
        // On its own training rows every candidate is right.
        assert!(
            all.iter().all(|c| c.dev.accuracy == 1.0),
            "{:?}",
            all.iter().map(|c| c.dev.accuracy).collect::<Vec<_>>()
        );
        // Without features only the TF-IDF candidates run.
        let bare = Split {
            states: &[],
            ..train
        };
        let all = learned_candidates(&labels, bare, bare, &grid, |_| {}).unwrap();
        assert!(all.iter().all(|c| c.method == Method::Tfidf));
    }

    #[test]
    fn layer_choices_resolve_to_one_extraction_and_the_best_is_kept() {
        let mut g = LearnGrid {
            methods: vec![Method::Head, Method::Stack],
            feature: FeatureSpec::prompt_eol(Pooling::Last),
            poolings: vec![Pooling::Last],
            layer_choices: vec![vec![], vec![9], vec![3, 9]],
            final_layer: 0,
            alphas: vec![1.0],
            stack_weights: vec![1.0],
            max_iterations: 100,
        };
        g.resolve_layers(18);
        assert_eq!(g.feature.layers, vec![3, 9, 18]);
        assert_eq!(g.layer_choices, vec![vec![18], vec![9], vec![3, 9]]);
        // Only the final output: nothing to select, the key of the plain features.
        let mut f = LearnGrid {
            layer_choices: vec![vec![]],
            ..g.clone()
        };
        f.resolve_layers(18);
        assert!(f.feature.layers.is_empty() && f.layer_choices.is_empty());
        // A model with fewer layers drops the choices it does not have.
        let mut small = LearnGrid {
            layer_choices: vec![vec![], vec![12]],
            ..g.clone()
        };
        small.resolve_layers(6);
        assert!(small.feature.layers.is_empty() && small.layer_choices.is_empty());

        // Layer 9 separates the labels, layer 3 and the final output do not.
        let st = |sign: f32, k: f32| PooledStates {
            last: vec![0.1 * k, -0.1 * k, sign, 0.3 * sign + 0.2, 0.05 * k, 0.1],
            mean: vec![0.0; 6],
        };
        let states = [st(1.0, 1.0), st(-1.0, 2.0), st(1.0, 3.0), st(-1.0, 1.0)];
        let y = [0, 1, 0, 1];
        let texts = ["a b", "a b", "a b", "a b"];
        let split = Split {
            texts: &texts,
            states: &states,
            y: &y,
        };
        let labels = vec!["pos".to_string(), "neg".to_string()];
        let all = learned_candidates(&labels, split, split, &g, |_| {}).unwrap();
        let heads: Vec<&LearnedCandidate> =
            all.iter().filter(|c| c.method == Method::Head).collect();
        assert_eq!(heads.len(), 3);
        assert_eq!(heads[0].label, "head, last pooling, alpha 1");
        assert_eq!(heads[1].label, "head, layers 9, last pooling, alpha 1");
        // The final output is saved as [] (files and caches as before layers).
        let spec = |c: &LearnedCandidate| c.model.needs_features().unwrap().layers.clone();
        assert_eq!(spec(heads[0]), Vec::<u32>::new());
        assert_eq!(spec(heads[1]), vec![9]);
        assert_eq!(spec(heads[2]), vec![3, 9]);
        assert!(heads[1].dev.accuracy == 1.0, "{}", heads[1].dev.accuracy);
        assert!(heads[0].dev.accuracy < 1.0, "{}", heads[0].dev.accuracy);
        // The stack takes the best head's layers.
        let stack = all.iter().find(|c| c.method == Method::Stack).unwrap();
        assert!(stack.label.contains("layers 9"), "{}", stack.label);
    }

    #[test]
    fn prompt_scores_add_stacks_with_the_prompt_block() {
        // The words say nothing; the prompt's scores do.
        let texts = ["same words"; 6];
        let y = [0, 1, 0, 1, 0, 1];
        let probs: Vec<Vec<f64>> = y
            .iter()
            .map(|&c| {
                if c == 0 {
                    vec![0.7, 0.3]
                } else {
                    vec![0.4, 0.6]
                }
            })
            .collect();
        let split = Split {
            texts: &texts,
            states: &[],
            y: &y,
        };
        let labels = vec!["pos".to_string(), "neg".to_string()];
        let grid = LearnGrid {
            methods: vec![Method::Tfidf, Method::Stack],
            feature: FeatureSpec::prompt_eol(Pooling::Last),
            poolings: vec![Pooling::Last],
            layer_choices: Vec::new(),
            final_layer: 18,
            alphas: vec![0.1, 1.0],
            stack_weights: vec![1.0, 3.0],
            max_iterations: 100,
        };
        let scores = PromptScores {
            train: &probs,
            dev: &probs,
            logprob_over: LogprobOver::Vocab,
        };
        let all =
            learned_candidates_with(&labels, split, split, Some(scores), &grid, |_| {}).unwrap();
        // tfidf: baseline + 2 alphas; no features, so no head and no model-feature stack;
        // prompt block: 2 weights x 2 alphas.
        assert_eq!(all.len(), 3 + 4);
        let with_prompt: Vec<&LearnedCandidate> =
            all.iter().filter(|c| c.model.needs_prompt()).collect();
        assert_eq!(with_prompt.len(), 4);
        assert!(with_prompt.iter().all(|c| c.method == Method::Stack
            && c.label.contains("prompt weight")
            && c.dev.accuracy == 1.0));
        assert!(all[..3].iter().all(|c| c.dev.accuracy < 1.0));
        assert!(with_prompt
            .iter()
            .all(|c| c.model.prompt_over() == Some(LogprobOver::Vocab)));
        // Scores that do not cover the rows are not used.
        let short = PromptScores {
            train: &probs[..2],
            dev: &probs,
            logprob_over: LogprobOver::Labels,
        };
        let all =
            learned_candidates_with(&labels, split, split, Some(short), &grid, |_| {}).unwrap();
        assert_eq!(all.len(), 3);
    }
}
