//! The candidates of `edgeact tune` (the command itself is `cmd::tune`): every template x
//! K-shot example set x calibration on/off, in a fixed order, and the pick of the best.

use crate::eval::{self, EvalError, Example};
use crate::spec::{DemoSimilarity, Demos, Task};

/// One candidate: a task (template + examples) and the calibration switch.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub task: Task,
    pub calibrate: bool,
    /// e.g. `sentiment, 8-shot, calibrated`.
    pub label: String,
}

/// The retrieved-demonstration candidates (`[demos]`) of `tune`.
#[derive(Debug, Clone, Default)]
pub struct DemoGrid {
    /// Similarities tried (none: no such candidates).
    pub by: Vec<DemoSimilarity>,
    /// Pool examples per label (the first ones of the train split).
    pub pool_per_label: usize,
}

/// Every combination, in a fixed order: template, then examples (the file's own, then each
/// K, then each K retrieved per request by each of `demos.by` from the pool), then
/// calibration off / on.
pub fn candidates(
    templates: &[Task],
    shots: &[usize],
    pool: &[Example],
    demos: &DemoGrid,
) -> Result<Vec<Candidate>, EvalError> {
    let mut out = Vec::new();
    for t in templates {
        let mut variants = vec![(
            t.clone(),
            format!("{}, own {} examples", t.name, t.examples.len()),
        )];
        for &k in shots {
            let v = if k == 0 {
                let mut z = t.clone();
                z.examples.clear();
                z.name = format!("{}-0shot", t.name);
                z
            } else {
                eval::with_shots(t, pool, k)?
            };
            variants.push((v, format!("{}, {k}-shot", t.name)));
        }
        for &by in &demos.by {
            for &k in shots.iter().filter(|&&k| k > 0) {
                let d = Demos { per_label: k, by };
                let v = eval::with_demos(t, pool, demos.pool_per_label, d);
                let label = format!(
                    "{}, {k} of {} per label retrieved by {}",
                    t.name,
                    demos.pool_per_label,
                    by.name()
                );
                variants.push((v, label));
            }
        }
        for (task, label) in variants {
            for calibrate in [false, true] {
                out.push(Candidate {
                    task: task.clone(),
                    calibrate,
                    label: format!("{label}{}", if calibrate { ", calibrated" } else { "" }),
                });
            }
        }
    }
    Ok(out)
}

/// The best score's index; the earliest wins ties (simpler candidates come first). Candidates
/// that failed (None) never win.
pub fn pick_best(scores: &[Option<f64>]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, s) in scores.iter().enumerate() {
        if let Some(s) = s {
            if best.is_none_or(|(_, b)| *s > b) {
                best = Some((i, *s));
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Request;
    use std::path::Path;

    #[test]
    fn pick_best_takes_the_highest_and_the_earliest_on_ties() {
        assert_eq!(pick_best(&[Some(0.5), Some(0.7), Some(0.6)]), Some(1));
        assert_eq!(pick_best(&[Some(0.7), None, Some(0.7)]), Some(0));
        assert_eq!(pick_best(&[None, Some(0.1)]), Some(1));
        assert_eq!(pick_best(&[None, None]), None);
    }

    #[test]
    fn candidates_cover_examples_and_calibration() {
        let t = Task::parse(
            "instruction = \"x\"\nquery = \"R: {text}\\nS:\"\nlabels = [{ name = \"pos\", text = \" p\" }, { name = \"neg\", text = \" n\" }]\nexamples = [{ text = \"a\", label = \"pos\" }]\n",
            Path::new("t.toml"),
            "t",
        )
        .unwrap();
        let pool: Vec<Example> = ["pos", "neg", "pos", "neg"]
            .iter()
            .enumerate()
            .map(|(i, l)| Example {
                request: Request::text(i.to_string(), format!("text {i}")),
                label: l.to_string(),
                split: Some("train".into()),
            })
            .collect();
        let none = DemoGrid::default();
        let c = candidates(std::slice::from_ref(&t), &[0, 2], &pool, &none).unwrap();
        let labels: Vec<&str> = c.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(
            labels,
            vec![
                "t, own 1 examples",
                "t, own 1 examples, calibrated",
                "t, 0-shot",
                "t, 0-shot, calibrated",
                "t, 2-shot",
                "t, 2-shot, calibrated"
            ]
        );
        assert_eq!(c[2].task.examples.len(), 0);
        assert_eq!(c[4].task.examples.len(), 4);
        assert!(
            candidates(std::slice::from_ref(&t), &[3], &pool, &none).is_err(),
            "3 per label are not in the pool"
        );
        // Retrieved demonstrations: one more variant per K > 0 and similarity, the pool
        // taking what each label has.
        let grid = DemoGrid {
            by: vec![DemoSimilarity::Tfidf],
            pool_per_label: 8,
        };
        let c = candidates(&[t], &[0, 1], &pool, &grid).unwrap();
        assert_eq!(c.len(), 8);
        assert_eq!(c[6].label, "t, 1 of 8 per label retrieved by tfidf");
        assert_eq!(
            c[7].label,
            "t, 1 of 8 per label retrieved by tfidf, calibrated"
        );
        assert_eq!(c[6].task.examples.len(), 4);
        assert_eq!(c[6].task.demos.map(|d| d.per_label), Some(1));
    }
}
