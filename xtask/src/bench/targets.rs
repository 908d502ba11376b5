//! The targets a bench run is reported against. They are never asserted: a missed
//! target does not fail the bench.

use serde::Serialize;

use super::rows::Row;
use super::testbed::Mode;

/// A target the figures are reported against; never asserted.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    pub target: &'static str,
    pub pair: &'static str,
    /// The ratio or value compared with the limit.
    pub measured: Option<f64>,
    /// `met`, `missed`, `inconclusive` (the figures exist but one is zero or below, so
    /// their ratio means nothing) or `not measured`.
    pub status: &'static str,
    pub noisy: bool,
}

/// Comparison a target makes with its figure.
enum Check {
    /// `row`'s ratio of `mode` to `base` at least `min`.
    RatioAtLeast { mode: Mode, base: Mode, min: f64 },
    /// `row`'s ratio of `mode` to `base` at most `max`.
    RatioAtMost { mode: Mode, base: Mode, max: f64 },
    /// `row`'s value of `mode` below `limit`.
    ValueBelow { mode: Mode, limit: f64 },
}

/// The targets: (description, row id, check).
const TARGETS: &[(&str, &str, Check)] = &[
    (
        "ambient throughput ≥ 1.3× sidecar's",
        "throughput",
        Check::RatioAtLeast {
            mode: Mode::Ambient,
            base: Mode::Sidecar,
            min: 1.3,
        },
    ),
    (
        "ambient added p99 (1 KiB fixed-rate) ≤ 0.5× sidecar's",
        "fixed_rate_added_p99",
        Check::RatioAtMost {
            mode: Mode::Ambient,
            base: Mode::Sidecar,
            max: 0.5,
        },
    ),
    (
        "ambient added p99 (64 B ping-pong) ≤ 0.5× sidecar's",
        "ping_pong_added_p99",
        Check::RatioAtMost {
            mode: Mode::Ambient,
            base: Mode::Sidecar,
            max: 0.5,
        },
    ),
    (
        "ambient mesh CPU per GiB ≤ 0.5× sidecar's",
        "mesh_cpu_per_gib",
        Check::RatioAtMost {
            mode: Mode::Ambient,
            base: Mode::Sidecar,
            max: 0.5,
        },
    ),
    (
        "ambient daemon memory < 10 KiB per idle connection",
        "idle_kib_per_connection",
        Check::ValueBelow {
            mode: Mode::Ambient,
            limit: 10.0,
        },
    ),
    (
        "ambient-ktls throughput within 25% of plain's (ratio ≥ 0.75)",
        "throughput",
        Check::RatioAtLeast {
            mode: Mode::AmbientKtls,
            base: Mode::Plain,
            min: 0.75,
        },
    ),
];

/// Checks every target against the rows.
pub fn targets(rows: &[Row]) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for (target, id, check) in TARGETS {
        for row in rows.iter().filter(|row| row.id == *id) {
            let (mode, base) = match *check {
                Check::RatioAtLeast { mode, base, .. } | Check::RatioAtMost { mode, base, .. } => {
                    (mode, Some(base))
                }
                Check::ValueBelow { mode, .. } => (mode, None),
            };
            let measured = match *check {
                Check::RatioAtLeast { min, .. } => row
                    .ratio(mode, base.unwrap_or(mode))
                    .map(|ratio| (ratio.value, ratio.value >= min, ratio.noisy)),
                Check::RatioAtMost { max, .. } => row
                    .ratio(mode, base.unwrap_or(mode))
                    .map(|ratio| (ratio.value, ratio.value <= max, ratio.noisy)),
                Check::ValueBelow { limit, .. } => row
                    .value(mode)
                    .map(|value| (value.median, value.median < limit, value.noisy)),
            };
            let inputs_present =
                row.value(mode).is_some() && base.is_none_or(|base| row.value(base).is_some());
            let (measured, status, noisy) = match measured {
                Some((value, true, noisy)) => (Some(value), "met", noisy),
                Some((value, false, noisy)) => (Some(value), "missed", noisy),
                // Both figures exist but their ratio does not, because one is zero or
                // below (noise around an added figure of zero).
                None if inputs_present => (None, "inconclusive", true),
                None => (None, "not measured", false),
            };
            checks.push(TargetCheck {
                target,
                pair: row.pair,
                measured,
                status,
                noisy,
            });
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::{mode_with_throughput, ModeResults};
    use crate::bench::rows::rows;

    #[test]
    fn targets_met_missed_and_not_measured() {
        let results = [
            mode_with_throughput(Mode::Plain, &[10.0]),
            mode_with_throughput(Mode::Sidecar, &[2.0]),
            mode_with_throughput(Mode::Ambient, &[3.0]),
            ModeResults::new(Mode::AmbientKtls, Some("no TLS ULP".to_owned())),
        ];

        let checks = targets(&rows(&results));
        let status = |target_prefix: &str| {
            checks
                .iter()
                .find(|check| check.target.starts_with(target_prefix) && check.pair == "cross-node")
                .map(|check| check.status)
                .expect("check present")
        };

        assert_eq!(status("ambient throughput"), "met");
        assert_eq!(status("ambient-ktls throughput"), "not measured");
        assert_eq!(status("ambient daemon memory"), "not measured");
        // Every mode spends the same CPU per GiB, so the mesh adds zero and the ratio of
        // what ambient and the sidecar add is undefined.
        assert_eq!(status("ambient mesh CPU"), "inconclusive");
    }
}
