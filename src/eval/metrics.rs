//! Evaluation metrics (accuracy, F1, confusion, calibration, coverage, latency) and the SVG plots of `edgeact eval`.
//!
//! Everything here is pure: [`evaluate`] turns a list of [`Outcome`]s into [`Metrics`],
//! [`latency_summary`] summarises per-request latencies, and [`confusion_svg`] /
//! [`reliability_svg`] render SVG documents into a `String` (plotters' SVG backend, no
//! font files: text is emitted as SVG `<text>` and laid out by the viewer).
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

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

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

/// Errors from the plot functions.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The confusion matrix has no class.
    #[error("the confusion matrix is empty")]
    EmptyConfusion,
    /// A row of the confusion matrix does not have one entry per class.
    #[error("the confusion matrix is not square: row {row} has {len} entries, expected {classes}")]
    NotSquare {
        /// Index of the offending row.
        row: usize,
        /// Its length.
        len: usize,
        /// Number of rows (classes).
        classes: usize,
    },
    /// More label names than classes in the confusion matrix.
    #[error("{labels} label names for a confusion matrix of {classes} classes")]
    LabelCount {
        /// Number of names given.
        labels: usize,
        /// Number of classes in the matrix.
        classes: usize,
    },
    /// plotters failed to draw.
    #[error("drawing the plot failed: {0}")]
    Plot(String),
}

fn plot_err(e: impl std::fmt::Display) -> MetricsError {
    MetricsError::Plot(e.to_string())
}

/// `num / den`, or 0 when `den == 0`.
fn ratio(num: usize, den: usize) -> f64 {
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
fn ece_of(bins: &[ReliabilityBin]) -> f64 {
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
    // Nearest rank: ceil(p/100 * n), at least 1, in integers so 95% of 20 is exactly 19.
    let pct = |p: usize| v[((p * n).div_ceil(100)).clamp(1, n) - 1];
    LatencySummary {
        n,
        mean: v.iter().sum::<f64>() / n as f64,
        p50: pct(50),
        p95: pct(95),
        p99: pct(99),
        max: v[n - 1],
    }
}

// ---------------------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------------------

/// Up to this many classes, each cell of the heat map shows its count.
const MAX_CLASSES_WITH_COUNTS: usize = 30;
/// Up to this many classes, the axes show label names; beyond, class indices every few.
const MAX_CLASSES_WITH_NAMES: usize = 40;
/// Label names longer than this are cut with an ellipsis.
const MAX_NAME_CHARS: usize = 24;
const FONT: &str = "sans-serif";

/// Empty-ish color for a cell with a small share, and the color of a full share.
const CELL_LIGHT: (f64, f64, f64) = (222.0, 235.0, 247.0);
const CELL_DARK: (f64, f64, f64) = (8.0, 48.0, 107.0);

fn cell_color(share: f64) -> RGBColor {
    let t = share.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(
        mix(CELL_LIGHT.0, CELL_DARK.0),
        mix(CELL_LIGHT.1, CELL_DARK.1),
        mix(CELL_LIGHT.2, CELL_DARK.2),
    )
}

fn short_name(name: &str) -> String {
    if name.chars().count() <= MAX_NAME_CHARS {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(MAX_NAME_CHARS - 1).collect();
        s.push('…');
        s
    }
}

/// Tick step for class indices: the smallest of 1, 2, 5, 10, 20, 50, ... giving at most
/// 20 ticks.
fn index_step(k: usize) -> usize {
    let mut base = 1usize;
    loop {
        for m in [1, 2, 5] {
            let step = base * m;
            if k.div_ceil(step) <= 20 {
                return step;
            }
        }
        base *= 10;
    }
}

/// Renders the confusion matrix as an SVG heat map: row = gold, column = predicted.
///
/// A cell's color is its share of the gold row (the row's recall profile), so classes of
/// different support compare; empty cells are not drawn (one `<rect>` per non-empty cell,
/// plus the white background and the frame). Up to 30 classes each cell also shows its
/// count; up to 40 the axes show label names (cut to 24 characters), beyond that class
/// indices every few classes (index = position in `labels` / `Metrics::per_class`), so a
/// 77-class matrix stays readable.
///
/// `labels[i]` names class `i`; fewer names than classes is allowed (the rest show as
/// `#i`, as [`evaluate`] names them), more is an error, as is a non-square or empty matrix.
pub fn confusion_svg(labels: &[String], confusion: &[Vec<usize>]) -> Result<String, MetricsError> {
    let k = confusion.len();
    if k == 0 {
        return Err(MetricsError::EmptyConfusion);
    }
    if let Some((row, r)) = confusion.iter().enumerate().find(|(_, r)| r.len() != k) {
        return Err(MetricsError::NotSquare {
            row,
            len: r.len(),
            classes: k,
        });
    }
    if labels.len() > k {
        return Err(MetricsError::LabelCount {
            labels: labels.len(),
            classes: k,
        });
    }

    let names: Vec<String> = (0..k)
        .map(|i| short_name(labels.get(i).map_or(&format!("#{i}"), |s| s)))
        .collect();
    let show_names = k <= MAX_CLASSES_WITH_NAMES;
    let show_counts = k <= MAX_CLASSES_WITH_COUNTS;
    let n: usize = confusion.iter().flatten().sum();

    // Layout in pixels. A cell is 8..60 px, the grid about 800 px at most.
    let cell = (800 / k as i32).clamp(8, 60);
    let grid = cell * k as i32;
    let tick_font = 12;
    let tick_chars = if show_names {
        names.iter().map(|s| s.chars().count()).max().unwrap_or(1)
    } else {
        k.to_string().len()
    };
    // Estimate of a label's width: 0.6 em per character, the SVG backend writing a font of
    // size `s` as `font-size = s / 1.24`.
    let tick_len = (tick_chars as f64 * tick_font as f64 / 1.24 * 0.6).ceil() as i32 + 10;
    let axis_title = 28;
    let left = axis_title + tick_len;
    let top = 44;
    let x0 = left;
    let y0 = top;
    // Column labels: rotated names below the grid, or horizontal indices.
    let below = if show_names { tick_len } else { tick_font + 10 };
    let width = (left + grid + 20).max(520);
    let height = top + grid + below + axis_title + 10;

    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (width as u32, height as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw_heat_map(
            &root,
            confusion,
            &names,
            HeatLayout {
                x0,
                y0,
                cell,
                grid,
                show_names,
                show_counts,
                tick_font,
                below,
            },
        )?;
        let title = format!(
            "Confusion matrix: {k} classes, n = {n} (color: share of the gold row{})",
            if show_counts { "; cells: counts" } else { "" }
        );
        root.draw(&Text::new(
            title,
            (10, 12),
            (FONT, 16)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Top)),
        ))
        .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Pixel layout of the heat map.
struct HeatLayout {
    x0: i32,
    y0: i32,
    cell: i32,
    grid: i32,
    show_names: bool,
    show_counts: bool,
    tick_font: i32,
    below: i32,
}

fn draw_heat_map(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    confusion: &[Vec<usize>],
    names: &[String],
    l: HeatLayout,
) -> Result<(), MetricsError> {
    let HeatLayout {
        x0,
        y0,
        cell,
        grid,
        show_names,
        show_counts,
        tick_font,
        below,
    } = l;
    let k = confusion.len();
    let count_font = ((cell as f64 * 0.38).round() as i32).clamp(8, 14);

    for (i, row) in confusion.iter().enumerate() {
        let row_total: usize = row.iter().sum();
        for (j, &count) in row.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let share = ratio(count, row_total);
            let color = cell_color(share);
            let (cx0, cy0) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
            root.draw(&Rectangle::new(
                [(cx0, cy0), (cx0 + cell, cy0 + cell)],
                color.filled(),
            ))
            .map_err(plot_err)?;
            if show_counts {
                let ink = if share > 0.5 { &WHITE } else { &BLACK };
                root.draw(&Text::new(
                    count.to_string(),
                    (cx0 + cell / 2, cy0 + cell / 2),
                    (FONT, count_font)
                        .into_font()
                        .color(ink)
                        .pos(Pos::new(HPos::Center, VPos::Center)),
                ))
                .map_err(plot_err)?;
            }
        }
    }
    // Frame around the grid.
    root.draw(&Rectangle::new(
        [(x0, y0), (x0 + grid, y0 + grid)],
        ShapeStyle::from(&RGBColor(120, 120, 120)).stroke_width(1),
    ))
    .map_err(plot_err)?;

    // Ticks: every class with names, else every `step`-th index.
    let step = if show_names { 1 } else { index_step(k) };
    let tick_style = (FONT, tick_font).into_font().color(&BLACK);
    for i in (0..k).step_by(step) {
        let text = if show_names {
            names[i].clone()
        } else {
            i.to_string()
        };
        let mid = i as i32 * cell + cell / 2;
        // Row label, right-aligned left of the grid.
        root.draw(&Text::new(
            text.clone(),
            (x0 - 6, y0 + mid),
            tick_style.pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(plot_err)?;
        // Column label below the grid: names read bottom-to-top ending at the grid.
        let col_style = if show_names {
            tick_style
                .pos(Pos::new(HPos::Right, VPos::Center))
                .transform(FontTransform::Rotate270)
        } else {
            tick_style.pos(Pos::new(HPos::Center, VPos::Top))
        };
        root.draw(&Text::new(text, (x0 + mid, y0 + grid + 6), col_style))
            .map_err(plot_err)?;
    }

    // Axis titles.
    let index_note = if show_names { "" } else { " (class index)" };
    let title_style = (FONT, 14).into_font().color(&BLACK);
    root.draw(&Text::new(
        format!("predicted{index_note}"),
        (x0 + grid / 2, y0 + grid + below + 8),
        title_style.pos(Pos::new(HPos::Center, VPos::Top)),
    ))
    .map_err(plot_err)?;
    root.draw(&Text::new(
        format!("gold{index_note}"),
        (8, y0 + grid / 2),
        title_style
            .pos(Pos::new(HPos::Center, VPos::Top))
            .transform(FontTransform::Rotate270),
    ))
    .map_err(plot_err)?;
    Ok(())
}

/// Bar color of the reliability diagram (its tests count `<rect>`s of this color).
const BAR_COLOR: RGBColor = RGBColor(100, 149, 237);

/// Renders a reliability diagram: one bar per non-empty bin up to its accuracy, the
/// diagonal of perfect calibration, and each bin's (mean confidence, accuracy) point. The
/// caption gives the ECE computed from the bins and their total count; with at most 20
/// bins each bar is labeled with its count.
///
/// One `<rect>` of the bar color per non-empty bin, plus one in the legend.
pub fn reliability_svg(bins: &[ReliabilityBin]) -> Result<String, MetricsError> {
    let n: usize = bins.iter().map(|b| b.count).sum();
    let ece = ece_of(bins);
    let filled: Vec<&ReliabilityBin> = bins.iter().filter(|b| b.count > 0).collect();
    let clamp01 = |x: f64| if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Reliability diagram: ECE {ece:.3}, n = {n}"),
                (FONT, 20),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_labels(11)
            .y_labels(11)
            .x_label_formatter(&|x| format!("{x:.1}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .x_desc("confidence (top probability)")
            .y_desc("accuracy")
            .light_line_style(WHITE)
            .draw()
            .map_err(plot_err)?;

        let bar_style = BAR_COLOR.mix(0.75).filled();
        chart
            .draw_series(filled.iter().map(|b| {
                let lower = clamp01(b.lower);
                let upper = clamp01(b.upper);
                let inset = (upper - lower) * 0.04;
                Rectangle::new(
                    [(lower + inset, 0.0), (upper - inset, clamp01(b.accuracy))],
                    bar_style,
                )
            }))
            .map_err(plot_err)?
            .label("accuracy per bin")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], bar_style));

        let grey = RGBColor(90, 90, 90);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                6,
                4,
                grey.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label("perfect calibration")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], grey));

        let points: Vec<(f64, f64)> = filled
            .iter()
            .map(|b| (clamp01(b.mean_confidence), clamp01(b.accuracy)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), RED.stroke_width(2)))
            .map_err(plot_err)?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(plot_err)?
            .label("mean confidence vs accuracy")
            .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));

        if bins.len() <= 20 {
            chart
                .draw_series(filled.iter().map(|b| {
                    Text::new(
                        b.count.to_string(),
                        ((clamp01(b.lower) + clamp01(b.upper)) / 2.0, 0.01),
                        (FONT, 11)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))
                .map_err(plot_err)?;
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(grey)
            .label_font((FONT, 13))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn labels(names: &[&str]) -> Vec<String> {
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
    fn ten() -> Vec<Outcome> {
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

    /// Checks that every tag is closed in order (a small XML well-formedness check:
    /// tags balance, attributes are quoted, text has no raw `<` or `&`).
    fn assert_well_formed(svg: &str) {
        let body = svg.trim();
        assert!(body.starts_with("<svg"), "starts with {:?}", &body[..20]);
        assert!(body.ends_with("</svg>"));
        let mut stack: Vec<String> = Vec::new();
        let mut rest = body;
        while let Some(start) = rest.find('<') {
            let text = &rest[..start];
            assert!(!text.contains('<'));
            for (i, _) in text.match_indices('&') {
                let entity = &text[i..];
                assert!(
                    ["&lt;", "&gt;", "&amp;", "&quot;", "&apos;", "&#"]
                        .iter()
                        .any(|e| entity.starts_with(e)),
                    "raw & in {text:?}"
                );
            }
            let end = rest[start..].find('>').expect("unterminated tag") + start;
            let tag = &rest[start + 1..end];
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "close {name}");
            } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
                let name = tag.split_whitespace().next().expect("tag name");
                stack.push(name.to_string());
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty());
    }

    #[test]
    fn confusion_svg_small_has_a_rect_per_nonempty_cell_and_counts() {
        let m = evaluate(&labels(&["alpha", "b<&>", "c"]), &ten(), 10);
        let svg = confusion_svg(&labels(&["alpha", "b<&>", "c"]), &m.confusion).expect("svg");
        assert_well_formed(&svg);
        let nonempty = m.confusion.iter().flatten().filter(|&&c| c > 0).count();
        assert_eq!(nonempty, 7);
        // Cells, plus the background and the frame.
        assert_eq!(svg.matches("<rect").count(), nonempty + 2);
        assert!(svg.contains("alpha"));
        assert!(svg.contains("b&lt;&amp;&gt;"));
        // Counts written in cells: three diagonal 2s and four 1s.
        let cell_texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split('>').nth(1))
            .map(|t| t.split('<').next().unwrap_or("").trim())
            .filter(|t| *t == "1" || *t == "2")
            .collect();
        assert_eq!(cell_texts.len(), 7);
    }

    #[test]
    fn confusion_svg_scales_to_77_classes() {
        let k = 77;
        let names: Vec<String> = (0..k)
            .map(|i| format!("banking_intent_{i}_long_name"))
            .collect();
        let mut confusion = vec![vec![0usize; k]; k];
        for (i, row) in confusion.iter_mut().enumerate() {
            row[i] = 30 + i % 7;
            row[(i * 5 + 3) % k] += 2;
        }
        let nonempty = confusion.iter().flatten().filter(|&&c| c > 0).count();
        let svg = confusion_svg(&names, &confusion).expect("svg");
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<rect").count(), nonempty + 2);
        // No per-cell numbers and no names: index ticks every 5 (16 per axis), two axis
        // titles and the title.
        assert_eq!(svg.matches("<text").count(), 2 * 16 + 3);
        assert!(!svg.contains("banking_intent"));
        // Stays a sane size.
        let width: u32 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .expect("width");
        assert!((600..=1200).contains(&width), "width {width}");
    }

    #[test]
    fn confusion_svg_rejects_bad_shapes() {
        assert!(matches!(
            confusion_svg(&[], &[]),
            Err(MetricsError::EmptyConfusion)
        ));
        assert!(matches!(
            confusion_svg(&[], &[vec![1, 0], vec![1]]),
            Err(MetricsError::NotSquare {
                row: 1,
                len: 1,
                classes: 2
            })
        ));
        assert!(matches!(
            confusion_svg(&labels(&["a", "b", "c"]), &[vec![1, 0], vec![0, 1]]),
            Err(MetricsError::LabelCount {
                labels: 3,
                classes: 2
            })
        ));
    }

    #[test]
    fn reliability_svg_has_a_bar_per_nonempty_bin() {
        let m = evaluate(&labels(&["a", "b", "c"]), &ten(), 10);
        let svg = reliability_svg(&m.reliability).expect("svg");
        assert_well_formed(&svg);
        let nonempty = m.reliability.iter().filter(|b| b.count > 0).count();
        assert_eq!(nonempty, 7);
        let bar_fill = format!(
            "fill=\"#{:02X}{:02X}{:02X}\"",
            BAR_COLOR.0, BAR_COLOR.1, BAR_COLOR.2
        );
        // Bars plus the legend's sample.
        assert_eq!(svg.matches(&bar_fill).count(), nonempty + 1, "{bar_fill}");
        assert!(svg.contains("ECE 0.230"));
        assert!(svg.contains("accuracy"));

        // No bins at all still gives a document (axes, diagonal, legend).
        let empty = reliability_svg(&[]).expect("svg");
        assert_well_formed(&empty);
        assert_eq!(empty.matches(&bar_fill).count(), 1);
    }
}
