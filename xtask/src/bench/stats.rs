//! Summaries of repeated runs: median, range, and whether the runs disagree enough to
//! call a figure noisy.

use serde::Serialize;

/// Largest spread, (max − min) / |median|, of a figure whose runs agree. A figure with a
/// wider spread is noisy, and so is every difference or ratio computed from it.
pub const NOISE_SPREAD: f64 = 0.10;

/// Median and range of one figure over its runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Number of runs behind the figure.
    pub runs: usize,
    /// Whether the runs of this figure, or of a figure it was computed from, spread
    /// wider than [`NOISE_SPREAD`].
    pub noisy: bool,
}

impl Summary {
    /// Summarizes `samples`; `None` when there are none. NaN samples are dropped.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        let mut summary = Summary {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            runs: sorted.len(),
            noisy: false,
        };
        summary.noisy = summary.spread() > NOISE_SPREAD;
        Some(summary)
    }

    /// (max − min) / |median|; zero when all runs are equal, infinite when they differ
    /// around a zero median.
    pub fn spread(&self) -> f64 {
        let range = self.max - self.min;
        if range == 0.0 {
            0.0
        } else {
            range / self.median.abs()
        }
    }

    /// Returns the figure `self − other`, for example latency added over `plain`. Its range
    /// covers every pair of runs, and it is noisy when either operand is.
    pub fn minus(&self, other: &Summary) -> Summary {
        Summary {
            median: self.median - other.median,
            min: self.min - other.max,
            max: self.max - other.min,
            runs: self.runs.min(other.runs),
            noisy: self.noisy || other.noisy,
        }
    }

    /// Returns the ratio of the medians `self / other`. `None` unless `other`'s median is above
    /// zero and `self`'s is not below: a difference that noise pushed to zero or below
    /// (latency added over `plain`, say) has no meaningful ratio.
    pub fn ratio_to(&self, other: &Summary) -> Option<Ratio> {
        let defined = other.median > 0.0 && self.median >= 0.0;
        if !defined || !other.median.is_finite() || !self.median.is_finite() {
            return None;
        }
        Some(Ratio {
            value: self.median / other.median,
            noisy: self.noisy || other.noisy,
        })
    }
}

/// The ratio of two figures' medians.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratio {
    pub value: f64,
    /// Whether either figure is noisy.
    pub noisy: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even_counts() {
        let odd = Summary::of(&[3.0, 1.0, 2.0]).expect("summary");
        let even = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("summary");

        assert_eq!(odd.median, 2.0);
        assert_eq!(even.median, 2.5);
        assert_eq!((even.min, even.max, even.runs), (1.0, 4.0, 4));
    }

    #[test]
    fn empty_samples_have_no_summary() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn noisy_past_the_spread_limit() {
        let agree = Summary::of(&[100.0, 104.0, 109.0]).expect("summary");
        let disagree = Summary::of(&[100.0, 104.0, 111.0]).expect("summary");

        assert!(!agree.noisy, "spread {}", agree.spread());
        assert!(disagree.noisy, "spread {}", disagree.spread());
    }

    #[test]
    fn single_run_never_noisy() {
        let single = Summary::of(&[5.0]).expect("summary");

        assert_eq!(single.spread(), 0.0);
        assert!(!single.noisy);
    }

    #[test]
    fn difference_covers_all_run_pairs() {
        let mesh = Summary::of(&[50.0, 52.0, 54.0]).expect("summary");
        let plain = Summary::of(&[20.0, 21.0, 22.0]).expect("summary");

        let added = mesh.minus(&plain);

        assert_eq!(added.median, 31.0);
        assert_eq!((added.min, added.max), (28.0, 34.0));
        assert!(!added.noisy);
    }

    #[test]
    fn noise_carries_into_ratio_and_difference() {
        let noisy = Summary::of(&[10.0, 20.0]).expect("summary");
        let steady = Summary::of(&[10.0, 10.0]).expect("summary");

        assert!(noisy.minus(&steady).noisy);
        assert!(steady.ratio_to(&noisy).expect("ratio").noisy);
        assert!(!steady.ratio_to(&steady).expect("ratio").noisy);
    }

    #[test]
    fn ratio_to_non_positive_is_undefined() {
        let zero = Summary::of(&[0.0]).expect("summary");
        let one = Summary::of(&[1.0]).expect("summary");
        let negative = Summary::of(&[-2.0]).expect("summary");

        assert_eq!(one.ratio_to(&zero), None);
        assert_eq!(one.ratio_to(&negative), None);
        assert_eq!(negative.ratio_to(&one), None);
        assert_eq!(zero.ratio_to(&one).expect("ratio").value, 0.0);
    }
}
