//! The one percentile definition, shared by `bench`, the `serve` stats and the evaluation.

/// Nearest-rank percentile of an ascending slice: the smallest value with at least
/// `percent` % of the values at or below it (rank ceil(percent / 100 * n), at least 1, in
/// integers so that 95 % of 20 values is exactly the 19th). 0 when the slice is empty.
pub fn percentile(sorted: &[f64], percent: usize) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    sorted[(percent * n).div_ceil(100).clamp(1, n) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95), 19.0);
        assert_eq!(percentile(&v, 50), 10.0);
        assert_eq!(percentile(&v, 100), 20.0);
        assert_eq!(percentile(&v, 0), 1.0);
        assert_eq!(percentile(&[7.0], 99), 7.0);
        assert_eq!(percentile(&[], 50), 0.0);
    }
}
