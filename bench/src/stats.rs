//! Percentiles of samples: the one copy every scenario uses.

use std::time::Duration;

/// Milliseconds in `d`, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The nearest-rank percentile `p` (0..=1) of `samples` (any order); `NaN`
/// when there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.saturating_sub(1).min(sorted.len() - 1)]
}

/// Median of `samples`.
pub fn p50(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

/// 99th percentile of `samples`.
pub fn p99(samples: &[f64]) -> f64 {
    percentile(samples, 0.99)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p50(&s), 50.0);
        assert_eq!(p99(&s), 99.0);
        assert_eq!(percentile(&s, 1.0), 100.0);
        assert_eq!(percentile(&s, 0.0), 1.0);
    }

    #[test]
    fn small_samples() {
        assert_eq!(p50(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(p99(&[3.0, 1.0, 2.0]), 3.0);
        assert_eq!(p50(&[7.0]), 7.0);
        assert!(p50(&[]).is_nan());
    }
}
