//! Temperature scaling of a learned scorer's probabilities: one number `T`, fitted on the
//! dev split by `edgeact tune` (and by a retrain), divides the linear scores before the
//! softmax. The top label never changes; the confidences follow how often the scorer is
//! right (a class-balanced, L2-regularized regression over many labels is underconfident:
//! a BANKING77 stack said 0.5 where it was right 0.83 of the time). Pure code.

use crate::model::scoring::softmax;

/// The temperature of a scorer fitted before temperatures existed, or with nothing to fit on.
pub const UNIT: f64 = 1.0;

/// Bounds of the search (a temperature outside them says the dev rows are too few or all
/// right, not that the scorer is that far off).
const MIN: f64 = 0.05;
const MAX: f64 = 20.0;

/// serde default for files written without a temperature.
pub fn unit() -> f64 {
    UNIT
}

/// `scores` divided by `t`, then the softmax.
pub fn softmax_at(scores: &[f64], t: f64) -> Vec<f64> {
    if t == UNIT {
        return softmax(scores);
    }
    let scaled: Vec<f64> = scores.iter().map(|s| s / t).collect();
    softmax(&scaled)
}

/// Probabilities `probs` (a softmax of some scores) as they would be at temperature `t`.
pub fn rescale(probs: &[f64], t: f64) -> Vec<f64> {
    softmax_at(&log_probs(probs), t)
}

/// The temperature that minimizes the mean negative log-likelihood of the `gold` labels
/// under `probs` (rows of label probabilities at temperature 1). The likelihood is convex
/// in 1/T, so a golden-section search over 1/T finds it. [`UNIT`] when there is nothing
/// to fit (no rows).
pub fn fit(probs: &[Vec<f64>], gold: &[usize]) -> f64 {
    let rows: Vec<(Vec<f64>, usize)> = probs
        .iter()
        .zip(gold)
        .filter(|(p, &g)| g < p.len())
        .map(|(p, &g)| (log_probs(p), g))
        .collect();
    if rows.is_empty() {
        return UNIT;
    }
    let nll = |beta: f64| -> f64 {
        rows.iter()
            .map(|(z, g)| {
                let m = z.iter().map(|v| v * beta).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v * beta - m).exp()).sum::<f64>().ln();
                lse - z[*g] * beta
            })
            .sum::<f64>()
    };
    let (mut lo, mut hi) = (1.0 / MAX, 1.0 / MIN);
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let mut a = hi - phi * (hi - lo);
    let mut b = lo + phi * (hi - lo);
    let (mut fa, mut fb) = (nll(a), nll(b));
    for _ in 0..80 {
        if fa <= fb {
            hi = b;
            b = a;
            fb = fa;
            a = hi - phi * (hi - lo);
            fa = nll(a);
        } else {
            lo = a;
            a = b;
            fa = fb;
            b = lo + phi * (hi - lo);
            fb = nll(b);
        }
    }
    // Round so that a file written twice from the same fit is the same file.
    let t = 2.0 / (lo + hi);
    (t * 1e4).round() / 1e4
}

/// Natural logs of probabilities, a zero kept finite (it stays the least likely label).
fn log_probs(p: &[f64]) -> Vec<f64> {
    p.iter().map(|&v| v.max(1e-300).ln()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows right with probability `acc` whose top label says `conf`.
    fn rows(n: usize, acc: f64, conf: f64) -> (Vec<Vec<f64>>, Vec<usize>) {
        let mut probs = Vec::new();
        let mut gold = Vec::new();
        for i in 0..n {
            probs.push(vec![conf, (1.0 - conf) / 2.0, (1.0 - conf) / 2.0]);
            let right = (i as f64 + 0.5) / n as f64 <= acc;
            gold.push(if right { 0 } else { 1 + i % 2 });
        }
        (probs, gold)
    }

    #[test]
    fn an_underconfident_scorer_is_sharpened_and_an_overconfident_one_softened() {
        let (p, g) = rows(100, 0.9, 0.5);
        let t = fit(&p, &g);
        assert!(t < 1.0, "underconfident: {t}");
        let top = rescale(&p[0], t)[0];
        assert!(
            (top - 0.9).abs() < 0.01,
            "confidence {top} should match accuracy 0.9"
        );

        let (p, g) = rows(100, 0.6, 0.95);
        let t = fit(&p, &g);
        assert!(t > 1.0, "overconfident: {t}");
        let top = rescale(&p[0], t)[0];
        assert!(
            (top - 0.6).abs() < 0.01,
            "confidence {top} should match accuracy 0.6"
        );
    }

    #[test]
    fn the_top_label_never_changes_and_unit_is_identity() {
        let p = vec![0.2, 0.5, 0.3];
        for t in [0.1, 0.5, 1.0, 3.0] {
            let q = rescale(&p, t);
            let top = q
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(top, 1, "t {t}: {q:?}");
            assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let q = rescale(&p, UNIT);
        assert!(p.iter().zip(&q).all(|(a, b)| (a - b).abs() < 1e-12));
        assert_eq!(softmax_at(&[1.0, 2.0], UNIT), softmax(&[1.0, 2.0]));
    }

    #[test]
    fn nothing_to_fit_is_unit_and_the_search_stays_in_bounds() {
        assert_eq!(fit(&[], &[]), UNIT);
        // Always right with confidence near 1: the fit sharpens until the likelihood is 1 to
        // the last bit, and stays within the bounds.
        let p = vec![vec![0.99, 0.01]; 10];
        let t = fit(&p, &[0; 10]);
        assert!((MIN..=MAX).contains(&t) && t < 0.2, "{t}");
        // A gold index outside the row is ignored, not a panic.
        assert_eq!(fit(&[vec![0.5, 0.5]], &[7]), UNIT);
    }
}
