//! Multinomial logistic regression over sparse (TF-IDF) and dense (model feature) columns
//! together, L2-regularized and optionally class-balanced, fitted by L-BFGS from zero
//! weights (deterministic: no sampling). Pure code, no model: the learner under the stacked
//! scorer ([`super::stack`]) and the TF-IDF baseline.

use serde::{Deserialize, Serialize};

use crate::model::scoring::softmax;

/// Non-zero (column, value) pairs of one row, columns ascending.
pub type SparseRow = Vec<(u32, f32)>;

/// The training rows: a sparse block (columns `0..n_sparse`) and a dense block after it.
#[derive(Debug, Clone, Copy)]
pub struct Design<'a> {
    pub sparse: &'a [SparseRow],
    pub dense: &'a [Vec<f32>],
    pub n_sparse: usize,
    pub n_dense: usize,
}

impl Design<'_> {
    fn n_rows(&self) -> usize {
        self.sparse.len().max(self.dense.len())
    }

    /// (column, value) pairs of row `i`, sparse then dense.
    fn row(&self, i: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let s = self.sparse.get(i).into_iter().flatten();
        let d = self.dense.get(i).into_iter().flatten();
        s.map(|&(j, v)| (j as usize, v))
            .chain(d.enumerate().map(move |(j, &v)| (self.n_sparse + j, v)))
    }
}

/// How the regression is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrParams {
    /// L2 penalty: the loss is the (weighted) summed log-loss plus alpha/2 |W|^2, so alpha = 1
    /// is scikit-learn's C = 1. The bias is not penalized.
    pub alpha: f64,
    pub max_iterations: usize,
    /// Weight each example by n / (labels x examples of its label), so rare labels count as
    /// much as common ones (scikit-learn's `class_weight="balanced"`).
    pub balanced: bool,
}

impl Default for LrParams {
    fn default() -> Self {
        LrParams {
            alpha: 1.0,
            max_iterations: 150,
            balanced: true,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LrError {
    #[error("{rows} rows for {labels} labels, or rows of the wrong width")]
    Shape { rows: usize, labels: usize },
    #[error("label index {0} has no training example")]
    MissingLabel(usize),
}

/// A fitted model: weights feature-major (`weights[j * n_labels + k]`), one bias per label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoftmaxLr {
    pub n_sparse: usize,
    pub n_dense: usize,
    pub n_labels: usize,
    #[serde(with = "f32_hex")]
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    /// L-BFGS iterations run.
    pub iterations: usize,
    /// The scores are divided by it before the softmax ([`super::temperature`]; 1 in files
    /// written before temperatures existed).
    #[serde(default = "super::temperature::unit")]
    pub temperature: f64,
}

impl SoftmaxLr {
    /// Fits on `x` with label indices `y` (each below `n_labels`, every label present).
    pub fn fit(
        x: Design<'_>,
        y: &[usize],
        n_labels: usize,
        params: LrParams,
    ) -> Result<SoftmaxLr, LrError> {
        let n = x.n_rows();
        let shape = LrError::Shape {
            rows: n,
            labels: y.len(),
        };
        if n == 0 || n != y.len() || n_labels < 2 {
            return Err(shape);
        }
        if (x.n_sparse > 0 && x.sparse.len() != n)
            || (x.n_dense > 0 && x.dense.len() != n)
            || x.dense.iter().any(|r| r.len() != x.n_dense)
            || x.sparse
                .iter()
                .flatten()
                .any(|&(j, _)| j as usize >= x.n_sparse)
        {
            return Err(shape);
        }
        let mut count = vec![0usize; n_labels];
        for &c in y {
            *count.get_mut(c).ok_or(LrError::MissingLabel(c))? += 1;
        }
        if let Some(m) = count.iter().position(|&c| c == 0) {
            return Err(LrError::MissingLabel(m));
        }
        let sample_w: Vec<f64> = y
            .iter()
            .map(|&c| {
                if params.balanced {
                    n as f64 / (n_labels * count[c]) as f64
                } else {
                    1.0
                }
            })
            .collect();
        let k = n_labels;
        let n_feat = x.n_sparse + x.n_dense;
        let loss = |theta: &[f64], grad: &mut [f64]| -> f64 {
            grad.iter_mut().for_each(|g| *g = 0.0);
            let (w, b) = theta.split_at(n_feat * k);
            let mut total = 0.0;
            let mut z = vec![0.0f64; k];
            for i in 0..n {
                z.copy_from_slice(b);
                for (j, v) in x.row(i) {
                    let wj = &w[j * k..(j + 1) * k];
                    z.iter_mut().zip(wj).for_each(|(z, w)| *z += w * v as f64);
                }
                let p = softmax(&z);
                total -= sample_w[i] * p[y[i]].max(1e-300).ln();
                let r: Vec<f64> = (0..k)
                    .map(|c| sample_w[i] * (p[c] - f64::from(u8::from(c == y[i]))))
                    .collect();
                let (gw, gb) = grad.split_at_mut(n_feat * k);
                for (j, v) in x.row(i) {
                    let gj = &mut gw[j * k..(j + 1) * k];
                    gj.iter_mut().zip(&r).for_each(|(g, r)| *g += r * v as f64);
                }
                gb.iter_mut().zip(&r).for_each(|(g, r)| *g += r);
            }
            let (gw, _) = grad.split_at_mut(n_feat * k);
            for (g, w) in gw.iter_mut().zip(w) {
                *g += params.alpha * w;
                total += 0.5 * params.alpha * w * w;
            }
            total
        };
        let mut theta = vec![0.0f64; n_feat * k + k];
        let iterations = lbfgs(loss, &mut theta, params.max_iterations, 6);
        let (w, b) = theta.split_at(n_feat * k);
        Ok(SoftmaxLr {
            n_sparse: x.n_sparse,
            n_dense: x.n_dense,
            n_labels: k,
            weights: w.iter().map(|&v| v as f32).collect(),
            bias: b.iter().map(|&v| v as f32).collect(),
            iterations,
            temperature: super::temperature::UNIT,
        })
    }

    /// Label probabilities of one row (unknown sparse columns and extra dense values are
    /// ignored).
    pub fn predict(&self, sparse: &[(u32, f32)], dense: &[f32]) -> Vec<f64> {
        let k = self.n_labels;
        let mut z: Vec<f64> = self.bias.iter().map(|&b| b as f64).collect();
        let mut add = |j: usize, v: f32| {
            if let Some(wj) = self.weights.get(j * k..(j + 1) * k) {
                z.iter_mut()
                    .zip(wj)
                    .for_each(|(z, &w)| *z += w as f64 * v as f64);
            }
        };
        for &(j, v) in sparse.iter().filter(|(j, _)| (*j as usize) < self.n_sparse) {
            add(j as usize, v);
        }
        for (j, &v) in dense.iter().take(self.n_dense).enumerate() {
            add(self.n_sparse + j, v);
        }
        super::temperature::softmax_at(&z, self.temperature)
    }

    /// Whether the shapes agree with each other.
    pub fn consistent(&self) -> bool {
        self.n_labels >= 2
            && self.bias.len() == self.n_labels
            && self.weights.len() == (self.n_sparse + self.n_dense) * self.n_labels
    }
}

/// Minimizes `f` (value, writing its gradient) from `x` by L-BFGS with `m` corrections and a
/// backtracking (Armijo) line search; returns the iterations run. Stops when the relative
/// decrease falls under 1e-7, the gradient vanishes, or the line search fails.
pub fn lbfgs(
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    x: &mut [f64],
    max_iterations: usize,
    m: usize,
) -> usize {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let n = x.len();
    let mut g = vec![0.0; n];
    let mut fx = f(x, &mut g);
    // Corrections kept as f32: half the memory, precision enough for a search direction.
    let mut hist: std::collections::VecDeque<(Vec<f32>, Vec<f32>, f64)> = Default::default();
    let mut g_new = vec![0.0; n];
    let mut x_new = vec![0.0; n];
    for it in 0..max_iterations {
        if g.iter().all(|v| v.abs() < 1e-6) {
            return it;
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut a = vec![0.0; hist.len()];
        for (h, (s, y, rho)) in hist.iter().enumerate().rev() {
            a[h] = rho * s.iter().zip(&q).map(|(&s, q)| s as f64 * q).sum::<f64>();
            q.iter_mut()
                .zip(y)
                .for_each(|(q, &y)| *q -= a[h] * y as f64);
        }
        if let Some((s, y, _)) = hist.back() {
            let sy: f64 = s.iter().zip(y).map(|(&s, &y)| s as f64 * y as f64).sum();
            let yy: f64 = y.iter().map(|&y| (y as f64).powi(2)).sum();
            q.iter_mut().for_each(|v| *v *= sy / yy.max(1e-300));
        }
        for (h, (s, y, rho)) in hist.iter().enumerate() {
            let b = rho * y.iter().zip(&q).map(|(&y, q)| y as f64 * q).sum::<f64>();
            q.iter_mut()
                .zip(s)
                .for_each(|(q, &s)| *q += (a[h] - b) * s as f64);
        }
        let mut d: Vec<f64> = q.into_iter().map(|v| -v).collect();
        let mut gd = dot(&g, &d);
        if gd >= 0.0 {
            hist.clear();
            d = g.iter().map(|v| -v).collect();
            gd = dot(&g, &d);
        }
        let mut step = if hist.is_empty() {
            1.0 / dot(&g, &g).sqrt().max(1.0)
        } else {
            1.0
        };
        let mut f_new = f64::INFINITY;
        for _ in 0..40 {
            x_new
                .iter_mut()
                .zip(x.iter().zip(&d))
                .for_each(|(xn, (x, d))| *xn = x + step * d);
            f_new = f(&x_new, &mut g_new);
            if f_new <= fx + 1e-4 * step * gd {
                break;
            }
            step *= 0.5;
        }
        if f_new > fx + 1e-4 * step * gd || !f_new.is_finite() {
            return it;
        }
        let s: Vec<f32> = x_new
            .iter()
            .zip(x.iter())
            .map(|(a, b)| (a - b) as f32)
            .collect();
        let y: Vec<f32> = g_new.iter().zip(&g).map(|(a, b)| (a - b) as f32).collect();
        let sy: f64 = s.iter().zip(&y).map(|(&s, &y)| s as f64 * y as f64).sum();
        if sy > 1e-12 {
            if hist.len() == m {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        let decrease = (fx - f_new) / fx.abs().max(f_new.abs()).max(1.0);
        x.copy_from_slice(&x_new);
        std::mem::swap(&mut g, &mut g_new);
        fx = f_new;
        if decrease < 1e-7 {
            return it + 1;
        }
    }
    max_iterations
}

/// f32 vectors as little-endian hex: a quarter of JSON's size for long weight vectors.
mod f32_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(
                "weights: not a whole number of f32",
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argmax(p: &[f64]) -> usize {
        (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap()
    }

    #[test]
    fn lbfgs_minimizes_a_quadratic() {
        // f = sum (i+1) (x_i - i)^2
        let f = |x: &[f64], g: &mut [f64]| {
            let mut v = 0.0;
            for (i, (x, g)) in x.iter().zip(g.iter_mut()).enumerate() {
                let c = (i + 1) as f64;
                v += c * (x - i as f64).powi(2);
                *g = 2.0 * c * (x - i as f64);
            }
            v
        };
        let mut x = vec![0.0; 5];
        lbfgs(f, &mut x, 100, 5);
        for (i, v) in x.iter().enumerate() {
            assert!((v - i as f64).abs() < 1e-3, "{x:?}");
        }
    }

    /// Label 0: sparse column 0; label 1: sparse column 1; label 2: dense value high.
    fn toy() -> (Vec<SparseRow>, Vec<Vec<f32>>, Vec<usize>) {
        let mut s = Vec::new();
        let mut d = Vec::new();
        let mut y = Vec::new();
        for i in 0..6 {
            let noise = (i as f32) * 0.01;
            s.push(vec![(0, 1.0), (2, 0.3)]);
            d.push(vec![-1.0 + noise]);
            y.push(0);
            s.push(vec![(1, 1.0), (2, 0.3)]);
            d.push(vec![-1.0 - noise]);
            y.push(1);
            s.push(vec![(2, 0.3)]);
            d.push(vec![2.0 + noise]);
            y.push(2);
        }
        (s, d, y)
    }

    #[test]
    fn learns_from_sparse_and_dense_columns_together() {
        let (s, d, y) = toy();
        let x = Design {
            sparse: &s,
            dense: &d,
            n_sparse: 3,
            n_dense: 1,
        };
        let m = SoftmaxLr::fit(x, &y, 3, LrParams::default()).unwrap();
        assert!(m.consistent());
        assert_eq!(argmax(&m.predict(&[(0, 1.0)], &[-1.0])), 0);
        assert_eq!(argmax(&m.predict(&[(1, 1.0)], &[-1.0])), 1);
        assert_eq!(argmax(&m.predict(&[], &[2.0])), 2);
        let p = m.predict(&[(7, 1.0)], &[2.0, 5.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // Deterministic, and the weights survive JSON.
        let again = SoftmaxLr::fit(x, &y, 3, LrParams::default()).unwrap();
        assert_eq!(m, again);
        let back: SoftmaxLr = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn balancing_lifts_a_rare_label() {
        // 20 examples of label 0 at x=0, 2 of label 1 at x=0.5 (overlapping): unbalanced, the
        // point in between goes to the common label; balanced, the rare label gets it.
        let mut d = vec![vec![0.0f32]; 20];
        d.extend([vec![0.5f32], vec![0.5]]);
        d.extend([vec![0.4f32], vec![0.1]]);
        let mut y = vec![0usize; 20];
        y.extend([1, 1, 0, 1]);
        let x = Design {
            sparse: &[],
            dense: &d,
            n_sparse: 0,
            n_dense: 1,
        };
        let fit = |balanced| {
            let p = LrParams {
                alpha: 0.01,
                balanced,
                ..LrParams::default()
            };
            SoftmaxLr::fit(x, &y, 2, p).unwrap().predict(&[], &[0.3])
        };
        assert_eq!(argmax(&fit(false)), 0);
        assert_eq!(argmax(&fit(true)), 1);
    }

    #[test]
    fn stronger_l2_gives_softer_probabilities() {
        let (s, d, y) = toy();
        let x = Design {
            sparse: &s,
            dense: &d,
            n_sparse: 3,
            n_dense: 1,
        };
        let conf = |alpha| {
            let p = LrParams {
                alpha,
                ..LrParams::default()
            };
            let m = SoftmaxLr::fit(x, &y, 3, p).unwrap();
            m.predict(&[(0, 1.0)], &[-1.0])[0]
        };
        assert!(conf(0.1) > conf(10.0));
    }

    #[test]
    fn refuses_missing_labels_and_bad_shapes() {
        let (s, d, y) = toy();
        let x = Design {
            sparse: &s,
            dense: &d,
            n_sparse: 3,
            n_dense: 1,
        };
        assert_eq!(
            SoftmaxLr::fit(x, &y, 4, LrParams::default()).unwrap_err(),
            LrError::MissingLabel(3)
        );
        assert!(SoftmaxLr::fit(x, &y[1..], 3, LrParams::default()).is_err());
        let narrow = Design { n_sparse: 2, ..x };
        assert!(SoftmaxLr::fit(narrow, &y, 3, LrParams::default()).is_err());
    }
}
