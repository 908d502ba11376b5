//! The Markdown of a bench run: one table with every mode's figures and ratios, the
//! modes not measured, the failed runs, and the targets.

use std::fmt::Write as _;

use super::results::{Failure, ModeResults, BACKGROUND_MAX_CORES};
use super::rows::{Row, RowKind};
use super::stats::{Ratio, Summary, NOISE_SPREAD};
use super::targets::TargetCheck;
use super::testbed::Mode;

/// Formats a figure with three significant digits, or as a whole number from 100 up.
pub fn number(value: f64) -> String {
    let magnitude = value.abs();
    if value == 0.0 {
        "0".to_owned()
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// Formats a summary as `median ±half-range%`, with `*` when it is noisy.
fn summary_cell(summary: &Summary) -> String {
    let mut cell = number(summary.median);
    if summary.runs > 1 && summary.median != 0.0 {
        let half_range = (summary.max - summary.min) / 2.0 / summary.median.abs() * 100.0;
        let _ = write!(cell, " ±{half_range:.0}%");
    }
    if summary.noisy {
        cell.push('*');
    }
    cell
}

fn ratio_cell(ratio: Option<Ratio>) -> String {
    match ratio {
        Some(ratio) => format!("{:.2}×{}", ratio.value, if ratio.noisy { "*" } else { "" }),
        None => "—".to_owned(),
    }
}

/// Renders the rows as one Markdown table (each mode's figure, then its ratios to
/// `plain` and to `sidecar`), followed by the targets.
pub fn markdown(results: &[ModeResults], rows: &[Row], targets: &[TargetCheck]) -> String {
    let modes: Vec<Mode> = results.iter().map(|mode| mode.mode).collect();
    let mut header = vec!["figure".to_owned(), "pair".to_owned()];
    for &mode in &modes {
        header.push(mode.name().to_owned());
        if mode != Mode::Plain {
            header.push("÷ plain".to_owned());
        }
        if mode != Mode::Plain && mode != Mode::Sidecar {
            header.push("÷ sidecar".to_owned());
        }
    }

    let mut text = String::new();
    let _ = writeln!(text, "| {} |", header.join(" | "));
    let _ = writeln!(text, "|{}", " --- |".repeat(header.len()));
    for row in rows {
        let mut cells = vec![format!("{} ({})", row.label, row.unit), row.pair.to_owned()];
        for result in results {
            let mode = result.mode;
            let value = if result.not_measured.is_some() {
                "not measured".to_owned()
            } else if row.kind == RowKind::AddedOverPlain && mode == Mode::Plain {
                "—".to_owned()
            } else if let Some(value) = row.value(mode) {
                summary_cell(value)
            } else if result
                .failures
                .iter()
                .any(|failure| failure.pair == row.pair && failure.workload == row.workload)
            {
                "failed".to_owned()
            } else {
                "—".to_owned()
            };
            cells.push(value);
            if mode != Mode::Plain {
                cells.push(ratio_cell(row.ratio(mode, Mode::Plain)));
            }
            if mode != Mode::Plain && mode != Mode::Sidecar {
                cells.push(ratio_cell(row.ratio(mode, Mode::Sidecar)));
            }
        }
        let _ = writeln!(text, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(
        text,
        "\nFigures are the median of the runs, ±half their range as a share of the median. \
         `*` marks a figure whose runs spread by more than {:.0}% (max − min over the median), \
         or a ratio or difference computed from one: read it as noisy. Whole-machine CPU \
         figures are also marked when other work kept more than {BACKGROUND_MAX_CORES} cores \
         busy before a run. \
         \"added\" rows subtract `plain`'s figure; \"—\" is a figure the mode does not have.",
        NOISE_SPREAD * 100.0
    );
    for result in results {
        if let Some(reason) = &result.not_measured {
            let _ = writeln!(text, "\n{}: not measured: {reason}.", result.mode.name());
        }
    }

    let failures: Vec<(Mode, &Failure)> = results
        .iter()
        .flat_map(|result| {
            result
                .failures
                .iter()
                .map(move |failure| (result.mode, failure))
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(
            text,
            "\nFailed workload runs (their figures are left out, and the mode's island was \
             rebuilt after each):\n"
        );
        for (mode, failure) in failures {
            let run = failure
                .run
                .map_or_else(String::new, |run| format!("run {run}, "));
            let _ = writeln!(
                text,
                "- {}, {}, {run}{}: {}",
                mode.name(),
                failure.pair,
                failure.workload.name(),
                failure.error.replace('\n', " ")
            );
        }
    }

    let _ = writeln!(
        text,
        "\n| target | pair | measured | status |\n| --- | --- | --- | --- |"
    );
    for check in targets {
        let measured = check.measured.map_or_else(|| "—".to_owned(), number);
        let noisy = if check.noisy { " (noisy)" } else { "" };
        let _ = writeln!(
            text,
            "| {} | {} | {measured} | {}{noisy} |",
            check.target, check.pair, check.status
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_digits() {
        assert_eq!(number(1234.4), "1234");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.2345), "1.23");
        assert_eq!(number(0.012345), "0.012");
        assert_eq!(number(-45.67), "-45.7");
        assert_eq!(number(0.0), "0");
    }
}
