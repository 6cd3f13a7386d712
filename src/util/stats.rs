//! Summary statistics shared by `bench`, `serve` stats and the evaluation.

/// The value at quantile `q` of an ascending slice (rounded index); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
