//! Evaluation metrics (accuracy, F1, confusion, calibration, coverage, latency) of `edgeact eval`.
//!
//! Everything here is pure: [`evaluate`] turns a list of [`Outcome`]s into [`Metrics`] and
//! [`latency_summary`] summarises per-request latencies. The SVG plots of these numbers are
//! in [`super::plots`].
//!
//! # Conventions
//!
//! - Classes are indices into the task's label list. An index at or beyond the end of that
//!   list (a bug upstream, or a gold label the task does not know) is not dropped: the class
//!   list grows to cover it and the extra class is named `#<index>`.
//! - Accuracy, precision, recall and F1 use the top prediction (`predicted`) of every
//!   example; abstention is ignored there. The effect of abstention is reported separately
//!   ([`Metrics::abstentions`], [`Metrics::answered_accuracy`]) and, independently of the
//!   flag, by the confidence/coverage curve ([`Metrics::coverage`]).
//! - A confidence is clamped into `[0, 1]`; NaN counts as 0.

use serde::{Deserialize, Serialize};

use crate::util::stats::percentile;

/// Number of points of the coverage curve: thresholds `0.00, 0.05, ..., 0.95`.
const COVERAGE_STEPS: usize = 20;

/// One evaluated example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Index of the gold label.
    pub gold: usize,
    /// Index of the top-scoring label (reported even when the classifier abstained).
    pub predicted: usize,
    /// Probability of `predicted` (the top probability), used for calibration and coverage.
    pub confidence: f64,
    /// Whether the classifier abstained on this example (its configured policy).
    pub abstained: bool,
    /// Probability of every label, in label order (carried for reports; not used here).
    pub probs: Vec<f64>,
}

/// Everything `edgeact eval` reports about one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Number of examples.
    pub n: usize,
    /// Share of examples whose top prediction is the gold label (0 when `n == 0`).
    pub accuracy: f64,
    /// Mean F1 over the classes that occur in the data, as gold or as prediction
    /// (`support + predicted > 0`); a class absent from both is left out, like sklearn's
    /// `f1_score(average="macro")` over the labels present. 0 when no class occurs.
    pub macro_f1: f64,
    /// Expected calibration error: `sum over bins of count / n * |accuracy - mean confidence|`,
    /// over the bins of [`Metrics::reliability`].
    pub ece: f64,
    /// One entry per class, in label order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[gold][predicted]` = number of examples; square, one row per class.
    pub confusion: Vec<Vec<usize>>,
    /// Accuracy when abstaining below a confidence threshold, at thresholds
    /// `0.00, 0.05, ..., 0.95` (a fixed grid, so runs compare point by point).
    pub coverage: Vec<CoveragePoint>,
    /// Equal-width confidence bins over `[0, 1]`, empty bins included (count 0).
    pub reliability: Vec<ReliabilityBin>,
    /// Number of examples on which the classifier abstained (its own policy).
    pub abstentions: usize,
    /// Accuracy on the examples it did not abstain on (0 when it abstained on all).
    pub answered_accuracy: f64,
}

/// Precision, recall and F1 of one class (one-vs-rest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    /// Label name (`#<index>` for a class beyond the label list).
    pub label: String,
    /// `TP / (TP + FP)`, 0 when the class is never predicted.
    pub precision: f64,
    /// `TP / (TP + FN)`, 0 when the class never is the gold label.
    pub recall: f64,
    /// Harmonic mean of precision and recall, 0 when both are 0.
    pub f1: f64,
    /// Number of examples with this gold label.
    pub support: usize,
}

/// One point of the confidence/coverage curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CoveragePoint {
    /// Examples with a confidence below this are abstained on.
    pub threshold: f64,
    /// Share of examples kept (`confidence >= threshold`); 0 when there are no examples.
    pub coverage: f64,
    /// Accuracy on the examples kept; 0 when none is kept.
    pub accuracy: f64,
}

/// One bin of the reliability diagram.
///
/// Bin `i` of `b` holds the confidences `c` with `i/b <= c < (i+1)/b`; the last bin also
/// holds `c == 1`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// Lower bound (inclusive).
    pub lower: f64,
    /// Upper bound (exclusive, except 1 for the last bin).
    pub upper: f64,
    /// Number of examples in the bin.
    pub count: usize,
    /// Mean confidence of those examples (0 when empty).
    pub mean_confidence: f64,
    /// Share of those examples whose top prediction is right (0 when empty).
    pub accuracy: f64,
}

/// Latency percentiles in milliseconds (nearest-rank: the smallest value with at least
/// `p`% of the values at or below it).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LatencySummary {
    /// Number of finite values summarised.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median (nearest-rank).
    pub p50: f64,
    /// 95th percentile (nearest-rank).
    pub p95: f64,
    /// 99th percentile (nearest-rank).
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

/// `num / den`, or 0 when `den == 0`.
pub(crate) fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Confidence clamped into `[0, 1]`, NaN as 0.
fn clamp_confidence(c: f64) -> f64 {
    if c.is_nan() {
        0.0
    } else {
        c.clamp(0.0, 1.0)
    }
}

/// Lower bound of bin `i` of `n_bins`.
fn bin_lower(i: usize, n_bins: usize) -> f64 {
    i as f64 / n_bins as f64
}

/// Bin of a clamped confidence, consistent with the bounds [`bin_lower`] reports (the
/// floor of `c * n_bins` can be off by one ulp-wise at a boundary).
fn bin_index(c: f64, n_bins: usize) -> usize {
    let mut i = ((c * n_bins as f64).floor() as usize).min(n_bins - 1);
    if i > 0 && c < bin_lower(i, n_bins) {
        i -= 1;
    }
    if i + 1 < n_bins && c >= bin_lower(i + 1, n_bins) {
        i += 1;
    }
    i
}

/// Evaluates outcomes against `labels` (the task's label list, index = class).
///
/// `n_bins` is the number of equal-width confidence bins for [`Metrics::reliability`] and
/// [`Metrics::ece`]; 0 is treated as 1. See the module docs for the conventions.
pub fn evaluate(labels: &[String], outcomes: &[Outcome], n_bins: usize) -> Metrics {
    let n = outcomes.len();
    let k = outcomes
        .iter()
        .map(|o| o.gold.max(o.predicted) + 1)
        .fold(labels.len(), usize::max);

    let mut confusion = vec![vec![0usize; k]; k];
    for o in outcomes {
        // In range: k > max(gold, predicted) by construction.
        confusion[o.gold][o.predicted] += 1;
    }

    let mut predicted_count = vec![0usize; k];
    for row in &confusion {
        for (col, &count) in row.iter().enumerate() {
            predicted_count[col] += count;
        }
    }

    let mut correct = 0usize;
    let mut f1_sum = 0.0;
    let mut present = 0usize;
    let per_class: Vec<ClassMetrics> = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let tp = row[c];
            let support: usize = row.iter().sum();
            let predicted = predicted_count[c];
            correct += tp;
            // Harmonic mean of tp/predicted and tp/support, written exactly.
            let f1 = ratio(2 * tp, support + predicted);
            if support + predicted > 0 {
                present += 1;
                f1_sum += f1;
            }
            ClassMetrics {
                label: labels.get(c).cloned().unwrap_or_else(|| format!("#{c}")),
                precision: ratio(tp, predicted),
                recall: ratio(tp, support),
                f1,
                support,
            }
        })
        .collect();
    let macro_f1 = if present == 0 {
        0.0
    } else {
        f1_sum / present as f64
    };

    let reliability = reliability_bins(outcomes, n_bins.max(1));
    let ece = ece_of(&reliability);

    let answered: Vec<&Outcome> = outcomes.iter().filter(|o| !o.abstained).collect();
    let answered_correct = answered.iter().filter(|o| o.gold == o.predicted).count();

    Metrics {
        n,
        accuracy: ratio(correct, n),
        macro_f1,
        ece,
        per_class,
        confusion,
        coverage: coverage_curve(outcomes),
        reliability,
        abstentions: n - answered.len(),
        answered_accuracy: ratio(answered_correct, answered.len()),
    }
}

fn reliability_bins(outcomes: &[Outcome], n_bins: usize) -> Vec<ReliabilityBin> {
    let mut count = vec![0usize; n_bins];
    let mut correct = vec![0usize; n_bins];
    let mut conf_sum = vec![0.0f64; n_bins];
    for o in outcomes {
        let c = clamp_confidence(o.confidence);
        let i = bin_index(c, n_bins);
        count[i] += 1;
        conf_sum[i] += c;
        if o.gold == o.predicted {
            correct[i] += 1;
        }
    }
    (0..n_bins)
        .map(|i| ReliabilityBin {
            lower: bin_lower(i, n_bins),
            upper: bin_lower(i + 1, n_bins),
            count: count[i],
            mean_confidence: if count[i] == 0 {
                0.0
            } else {
                conf_sum[i] / count[i] as f64
            },
            accuracy: ratio(correct[i], count[i]),
        })
        .collect()
}

/// ECE from bins: `sum count/n * |accuracy - mean confidence|`, 0 when all are empty.
pub(crate) fn ece_of(bins: &[ReliabilityBin]) -> f64 {
    let n: usize = bins.iter().map(|b| b.count).sum();
    bins.iter()
        .map(|b| ratio(b.count, n) * (b.accuracy - b.mean_confidence).abs())
        .sum()
}

fn coverage_curve(outcomes: &[Outcome]) -> Vec<CoveragePoint> {
    let n = outcomes.len();
    (0..COVERAGE_STEPS)
        .map(|i| {
            // i / 20 rather than i * 0.05: the nearest double to each grid value.
            let threshold = i as f64 / COVERAGE_STEPS as f64;
            let (kept, right) = outcomes
                .iter()
                .filter(|o| clamp_confidence(o.confidence) >= threshold)
                .fold((0usize, 0usize), |(kept, right), o| {
                    (kept + 1, right + usize::from(o.gold == o.predicted))
                });
            CoveragePoint {
                threshold,
                coverage: ratio(kept, n),
                accuracy: ratio(right, kept),
            }
        })
        .collect()
}

/// Summarises latencies in milliseconds: mean, nearest-rank p50/p95/p99 and max.
///
/// Non-finite values (NaN, infinities) are left out; with no finite value every field is 0.
pub fn latency_summary(ms: &[f64]) -> LatencySummary {
    let mut v: Vec<f64> = ms.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return LatencySummary::default();
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let pct = |p: usize| percentile(&v, p);
    LatencySummary {
        n,
        mean: v.iter().sum::<f64>() / n as f64,
        p50: pct(50),
        p95: pct(95),
        p99: pct(99),
        max: v[n - 1],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::eval::plots::confusion_svg;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    pub(crate) fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn out(gold: usize, predicted: usize, confidence: f64) -> Outcome {
        Outcome {
            gold,
            predicted,
            confidence,
            abstained: false,
            probs: vec![],
        }
    }

    /// Ten examples over classes a=0, b=1, c=2 (gold -> predicted, confidence):
    ///
    /// ```text
    /// a->a .9   a->a .8   a->b .6   a->c .4
    /// b->b .95  b->b .7   b->a .55
    /// c->c .85  c->b .3   c->c .65
    /// ```
    ///
    /// Confusion (rows gold, cols predicted): a [2 1 1], b [1 2 0], c [0 1 2].
    /// Correct: 6 of 10, accuracy 0.6.
    /// a: TP 2, predicted 3 (col a), support 4: P 2/3, R 1/2, F1 = 2*2/(4+3) = 4/7.
    /// b: TP 2, predicted 4, support 3: P 1/2, R 2/3, F1 = 4/7.
    /// c: TP 2, predicted 3, support 3: P 2/3, R 2/3, F1 = 2/3.
    /// Macro-F1 = (4/7 + 4/7 + 2/3) / 3 = 38/63.
    pub(crate) fn ten() -> Vec<Outcome> {
        vec![
            out(0, 0, 0.9),
            out(0, 0, 0.8),
            out(0, 1, 0.6),
            out(0, 2, 0.4),
            out(1, 1, 0.95),
            out(1, 1, 0.7),
            out(1, 0, 0.55),
            out(2, 2, 0.85),
            out(2, 1, 0.3),
            out(2, 2, 0.65),
        ]
    }

    #[test]
    fn hand_computed_three_classes() {
        let m = evaluate(&labels(&["a", "b", "c"]), &ten(), 10);
        assert_eq!(m.n, 10);
        assert_eq!(
            m.confusion,
            vec![vec![2, 1, 1], vec![1, 2, 0], vec![0, 1, 2]]
        );
        assert!(close(m.accuracy, 0.6));
        let expect = [
            ("a", 2.0 / 3.0, 0.5, 4.0 / 7.0, 4),
            ("b", 0.5, 2.0 / 3.0, 4.0 / 7.0, 3),
            ("c", 2.0 / 3.0, 2.0 / 3.0, 2.0 / 3.0, 3),
        ];
        assert_eq!(m.per_class.len(), 3);
        for (cm, (label, p, r, f1, support)) in m.per_class.iter().zip(expect) {
            assert_eq!(cm.label, label);
            assert!(close(cm.precision, p), "{label} precision {}", cm.precision);
            assert!(close(cm.recall, r), "{label} recall {}", cm.recall);
            assert!(close(cm.f1, f1), "{label} f1 {}", cm.f1);
            // F1 is the harmonic mean of precision and recall.
            assert!(close(cm.f1, 2.0 * p * r / (p + r)));
            assert_eq!(cm.support, support);
        }
        assert!(close(m.macro_f1, 38.0 / 63.0), "macro {}", m.macro_f1);
        assert_eq!(m.abstentions, 0);
        assert!(close(m.answered_accuracy, 0.6));
    }

    #[test]
    fn macro_f1_skips_absent_classes_but_counts_predicted_only_ones() {
        // A fourth label "d" that never occurs: listed, all zeros, not averaged.
        let m = evaluate(&labels(&["a", "b", "c", "d"]), &ten(), 10);
        assert_eq!(m.per_class.len(), 4);
        let d = &m.per_class[3];
        assert_eq!((d.precision, d.recall, d.f1, d.support), (0.0, 0.0, 0.0, 0));
        assert!(close(m.macro_f1, 38.0 / 63.0));

        // "d" predicted once but never gold: F1 0, and it counts in the mean.
        // c->b (0.3) becomes c->d: b has TP 2, predicted 3, support 3 -> F1 2/3;
        // c unchanged (2/3); a unchanged (4/7); d: 0.
        let mut outcomes = ten();
        outcomes[8].predicted = 3;
        let m = evaluate(&labels(&["a", "b", "c", "d"]), &outcomes, 10);
        assert!(close(m.per_class[1].f1, 2.0 / 3.0));
        assert!(close(m.per_class[3].f1, 0.0));
        let expect = (4.0 / 7.0 + 2.0 / 3.0 + 2.0 / 3.0 + 0.0) / 4.0;
        assert!(close(m.macro_f1, expect), "macro {}", m.macro_f1);
    }

    #[test]
    fn out_of_range_indices_grow_the_class_list() {
        let outcomes = vec![out(0, 0, 0.9), out(3, 1, 0.6)];
        let m = evaluate(&labels(&["a", "b"]), &outcomes, 5);
        assert_eq!(m.per_class.len(), 4);
        assert_eq!(m.per_class[2].label, "#2");
        assert_eq!(m.per_class[3].label, "#3");
        assert_eq!(m.per_class[3].support, 1);
        assert_eq!(m.confusion[3][1], 1);
        // Plotting the grown matrix with the short label list works.
        let svg = confusion_svg(&labels(&["a", "b"]), &m.confusion).expect("svg");
        assert!(svg.contains("#3"));
    }

    #[test]
    fn empty_input_is_all_zeros() {
        let m = evaluate(&labels(&["a", "b"]), &[], 10);
        assert_eq!(m.n, 0);
        assert_eq!((m.accuracy, m.macro_f1, m.ece), (0.0, 0.0, 0.0));
        assert_eq!(m.confusion, vec![vec![0, 0], vec![0, 0]]);
        assert_eq!(m.reliability.len(), 10);
        assert!(m
            .coverage
            .iter()
            .all(|p| p.coverage == 0.0 && p.accuracy == 0.0));
    }

    #[test]
    fn ece_hand_computed() {
        // Two bins [0, .5) and [.5, 1]:
        // bin 0: .2 (wrong), .4 (right): count 2, mean conf .3, acc .5, gap .2
        // bin 1: .5 (wrong, boundary goes up), 1.0 (right, last bin is closed),
        //        .9 (right), .6 (wrong): count 4, mean conf .75, acc .5, gap .25
        // ECE = 2/6 * .2 + 4/6 * .25 = (0.4 + 1.0) / 6 = 1.4 / 6.
        let outcomes = vec![
            out(0, 1, 0.2),
            out(0, 0, 0.4),
            out(0, 1, 0.5),
            out(1, 1, 1.0),
            out(1, 1, 0.9),
            out(1, 0, 0.6),
        ];
        let m = evaluate(&labels(&["a", "b"]), &outcomes, 2);
        assert_eq!(m.reliability.len(), 2);
        let (b0, b1) = (m.reliability[0], m.reliability[1]);
        assert_eq!((b0.lower, b0.upper, b0.count), (0.0, 0.5, 2));
        assert_eq!((b1.lower, b1.upper, b1.count), (0.5, 1.0, 4));
        assert!(close(b0.mean_confidence, 0.3) && close(b0.accuracy, 0.5));
        assert!(close(b1.mean_confidence, 0.75) && close(b1.accuracy, 0.5));
        assert!(close(m.ece, 1.4 / 6.0), "ece {}", m.ece);
    }

    #[test]
    fn ece_ten_bins_on_the_ten_examples() {
        // Bins of width .1 holding (confidence, right?):
        // [.3,.4): .3 wrong            -> |0 - .3|   * 1/10
        // [.4,.5): .4 wrong            -> |0 - .4|   * 1/10
        // [.5,.6): .55 wrong           -> |0 - .55|  * 1/10
        // [.6,.7): .6 wrong, .65 right -> |.5 - .625| * 2/10
        // [.7,.8): .7 right            -> |1 - .7|   * 1/10
        // [.8,.9): .8 right, .85 right -> |1 - .825| * 2/10
        // [.9,1]:  .9 right, .95 right -> |1 - .925| * 2/10
        // ECE = (.3 + .4 + .55 + .25 + .3 + .35 + .15) / 10 = 2.3 / 10.
        let m = evaluate(&labels(&["a", "b", "c"]), &ten(), 10);
        assert!((m.ece - 0.23).abs() < 1e-9, "ece {}", m.ece);
        assert_eq!(m.reliability.iter().map(|b| b.count).sum::<usize>(), 10);
        assert_eq!(m.reliability[6].count, 2);
        assert_eq!(m.reliability[0].count, 0);
        // Perfectly calibrated: confidence 1 and always right.
        let perfect = vec![out(0, 0, 1.0), out(1, 1, 1.0)];
        assert_eq!(evaluate(&labels(&["a", "b"]), &perfect, 10).ece, 0.0);
    }

    #[test]
    fn bins_agree_with_their_bounds_and_odd_confidences_are_clamped() {
        for n_bins in [1, 3, 7, 10, 15] {
            for i in 0..=1000 {
                let c = i as f64 / 1000.0;
                let b = bin_index(c, n_bins);
                assert!(bin_lower(b, n_bins) <= c, "{c} in bin {b} of {n_bins}");
                assert!(c < bin_lower(b + 1, n_bins) || b == n_bins - 1);
            }
        }
        let odd = vec![out(0, 0, f64::NAN), out(0, 0, 1.5), out(0, 0, -0.2)];
        let m = evaluate(&labels(&["a"]), &odd, 0);
        assert_eq!(m.reliability.len(), 1);
        assert_eq!(m.reliability[0].count, 3);
        assert!(close(m.reliability[0].mean_confidence, 1.0 / 3.0));
    }

    #[test]
    fn coverage_curve_grid_and_values() {
        let m = evaluate(&labels(&["a", "b", "c"]), &ten(), 10);
        assert_eq!(m.coverage.len(), 20);
        for (i, p) in m.coverage.iter().enumerate() {
            assert!(close(p.threshold, 0.05 * i as f64));
        }
        for w in m.coverage.windows(2) {
            assert!(w[1].coverage <= w[0].coverage, "coverage must not increase");
        }
        // Threshold 0: everything kept.
        assert_eq!((m.coverage[0].coverage, m.coverage[0].accuracy), (1.0, 0.6));
        // Threshold .5 (index 10): keeps .9 .8 .6 .95 .7 .55 .85 .65 = 8, of which
        // wrong .6 and .55 -> 6/8.
        assert!(close(m.coverage[10].coverage, 0.8));
        assert!(close(m.coverage[10].accuracy, 0.75));
        // Threshold .7 (index 14): keeps .9 .8 .95 .7 .85, all right.
        assert!(close(m.coverage[14].coverage, 0.5));
        assert!(close(m.coverage[14].accuracy, 1.0));
        // Threshold .95 (index 19): keeps .95 only.
        assert!(close(m.coverage[19].coverage, 0.1));
        assert!(close(m.coverage[19].accuracy, 1.0));
    }

    #[test]
    fn abstentions_are_reported_but_do_not_change_accuracy() {
        let mut outcomes = ten();
        // Abstain on the two lowest: .3 (wrong) and .4 (wrong).
        outcomes[8].abstained = true;
        outcomes[3].abstained = true;
        let m = evaluate(&labels(&["a", "b", "c"]), &outcomes, 10);
        assert!(close(m.accuracy, 0.6));
        assert_eq!(m.abstentions, 2);
        assert!(close(m.answered_accuracy, 6.0 / 8.0));
    }

    #[test]
    fn latency_nearest_rank() {
        // 1..=100 in a scrambled order: p50 = 50, p95 = 95, p99 = 99, mean 50.5.
        let ms: Vec<f64> = (0..100).map(|i| ((i * 37) % 100 + 1) as f64).collect();
        let s = latency_summary(&ms);
        assert_eq!(s.n, 100);
        assert_eq!((s.p50, s.p95, s.p99, s.max), (50.0, 95.0, 99.0, 100.0));
        assert!(close(s.mean, 50.5));

        // Wikipedia's nearest-rank example: 15 20 35 40 50 -> p50 = 35 (rank 3),
        // p95 and p99 = 50 (rank 5).
        let s = latency_summary(&[50.0, 15.0, 40.0, 20.0, 35.0]);
        assert_eq!((s.p50, s.p95, s.p99), (35.0, 50.0, 50.0));
        assert!(close(s.mean, 32.0));

        // 20 values: 95% of 20 = 19 exactly -> the 19th, not the 20th.
        let s = latency_summary(&(1..=20).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.p50, s.p95, s.p99), (10.0, 19.0, 20.0));

        assert_eq!(latency_summary(&[]), LatencySummary::default());
        assert_eq!(latency_summary(&[f64::NAN]), LatencySummary::default());
        let s = latency_summary(&[7.0, f64::INFINITY]);
        assert_eq!((s.n, s.p50, s.p99, s.mean), (1, 7.0, 7.0, 7.0));
    }
}
