//! The SVG plots of `edgeact eval`: the confusion matrix as a heat map and the reliability
//! diagram.
//!
//! [`confusion_svg`] and [`reliability_svg`] render SVG documents into a `String`
//! (plotters' SVG backend, no font files: text is emitted as SVG `<text>` and laid out by
//! the viewer) from the numbers [`super::metrics`] computes.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::metrics::{ece_of, ratio, ReliabilityBin};

/// Errors from the plot functions.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
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

fn plot_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Plot(e.to_string())
}

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
/// `#i`, as [`super::metrics::evaluate`] names them), more is an error, as is a non-square
/// or empty matrix.
pub fn confusion_svg(labels: &[String], confusion: &[Vec<usize>]) -> Result<String, PlotError> {
    let k = confusion.len();
    if k == 0 {
        return Err(PlotError::EmptyConfusion);
    }
    if let Some((row, r)) = confusion.iter().enumerate().find(|(_, r)| r.len() != k) {
        return Err(PlotError::NotSquare {
            row,
            len: r.len(),
            classes: k,
        });
    }
    if labels.len() > k {
        return Err(PlotError::LabelCount {
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
) -> Result<(), PlotError> {
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
pub fn reliability_svg(bins: &[ReliabilityBin]) -> Result<String, PlotError> {
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
    use crate::eval::metrics::evaluate;
    use crate::eval::metrics::tests::{labels, ten};

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
            Err(PlotError::EmptyConfusion)
        ));
        assert!(matches!(
            confusion_svg(&[], &[vec![1, 0], vec![1]]),
            Err(PlotError::NotSquare {
                row: 1,
                len: 1,
                classes: 2
            })
        ));
        assert!(matches!(
            confusion_svg(&labels(&["a", "b", "c"]), &[vec![1, 0], vec![0, 1]]),
            Err(PlotError::LabelCount {
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
