//! The figures of a bench run: one row per figure and pair with each mode's summary,
//! the ratios between modes, the targets, and the Markdown that shows them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::stats::{Ratio, Summary, NOISE_SPREAD};
use super::testbed::Mode;
use super::workloads::{ConnRate, FixedRate, IdlePoint, PingPong, Run, Throughput};

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Raw results of one mode.
#[derive(Debug, Serialize)]
pub struct ModeResults {
    pub mode: Mode,
    /// Reason the mode was not measured, when it was not.
    pub not_measured: Option<String>,
    /// Cores kept busy by other work just before each run, see
    /// [`super::workloads::background_busy_cores`].
    pub background_busy_cores: Vec<f64>,
    pub pairs: Vec<PairResults>,
    /// Proxy footprint with idle cross-node connections open, the first point with none.
    pub idle: Vec<IdlePoint>,
    /// Workload runs that failed; their figures are left out.
    pub failures: Vec<Failure>,
}

impl ModeResults {
    pub fn new(mode: Mode, not_measured: Option<String>) -> ModeResults {
        ModeResults {
            mode,
            not_measured,
            background_busy_cores: Vec::new(),
            pairs: Vec::new(),
            idle: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Reports whether other work kept more than [`BACKGROUND_MAX_CORES`] busy before
    /// any run of this mode.
    pub fn machine_was_busy(&self) -> bool {
        self.background_busy_cores
            .iter()
            .any(|&cores| cores > BACKGROUND_MAX_CORES)
    }

    /// Returns the results of pair `name`, adding an empty entry on first use.
    pub fn pair_mut(&mut self, name: &'static str) -> &mut PairResults {
        let index = match self.pairs.iter().position(|pair| pair.pair == name) {
            Some(index) => index,
            None => {
                self.pairs.push(PairResults::new(name));
                self.pairs.len() - 1
            }
        };
        &mut self.pairs[index]
    }
}

/// Raw results of one mode and pair, one entry per run.
#[derive(Debug, Serialize)]
pub struct PairResults {
    pub pair: &'static str,
    pub throughput: Vec<Run<Throughput>>,
    pub ping_pong: Vec<Run<PingPong>>,
    pub fixed_rate: Vec<Run<FixedRate>>,
    pub conn_rate: Vec<Run<ConnRate>>,
}

impl PairResults {
    fn new(pair: &'static str) -> PairResults {
        PairResults {
            pair,
            throughput: Vec::new(),
            ping_pong: Vec::new(),
            fixed_rate: Vec::new(),
            conn_rate: Vec::new(),
        }
    }
}

/// A kind of load the bench puts on a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// One iperf3 TCP stream.
    Throughput,
    /// 64-byte requests, one at a time on one connection.
    PingPong,
    /// 1 KiB requests on a fixed schedule over 16 connections.
    FixedRate,
    /// Connect, one 64-byte request and response, close.
    ConnRate,
    /// Idle connections held open while the proxies' footprint is read.
    Idle,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Throughput => "iperf3",
            Workload::PingPong => "64 B ping-pong",
            Workload::FixedRate => "1 KiB fixed rate",
            Workload::ConnRate => "connection rate",
            Workload::Idle => "idle connections",
        }
    }
}

/// A workload run that failed, or after which the proxies stayed busy.
#[derive(Debug, Serialize)]
pub struct Failure {
    /// Run number, starting at 1; `None` for idle points, which run once.
    pub run: Option<usize>,
    pub pair: &'static str,
    pub workload: Workload,
    pub error: String,
}

/// Relation of a row's values to the measured figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowKind {
    /// The figure as measured.
    Absolute,
    /// The figure minus the same figure of `plain`: what the mesh adds.
    AddedOverPlain,
}

/// One figure of one pair in every mode.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Stable name of the figure, for the chart and for tools that read the JSON.
    pub id: &'static str,
    pub label: String,
    pub unit: &'static str,
    pub pair: &'static str,
    pub kind: RowKind,
    /// Workload the figure comes from.
    pub workload: Workload,
    /// Summary per measured mode; `None` where the mode has no such figure (`plain` has
    /// no proxies to weigh).
    pub values: BTreeMap<Mode, Option<Summary>>,
}

impl Row {
    pub fn value(&self, mode: Mode) -> Option<&Summary> {
        self.values.get(&mode).and_then(Option::as_ref)
    }

    /// Returns the ratio of `mode`'s median to `base`'s. A figure added over `plain` has
    /// no ratio to `plain`, whose own is zero by definition.
    pub fn ratio(&self, mode: Mode, base: Mode) -> Option<Ratio> {
        if self.kind == RowKind::AddedOverPlain && base == Mode::Plain {
            return None;
        }
        self.value(mode)?.ratio_to(self.value(base)?)
    }
}

/// A figure measured per pair and run.
struct PairFigure {
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    kind: RowKind,
    workload: Workload,
    basis: Basis,
    samples: fn(&PairResults) -> Vec<f64>,
}

/// What a per-pair figure is read from, which decides where it applies and when it is
/// noisy regardless of its spread.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Basis {
    /// The client's own report.
    Client,
    /// The whole machine's busy time: noisy when other work kept the machine busy.
    MachineCpu,
    /// The proxy processes' CPU time: `plain` has none.
    ProxyCpu,
}

/// Cores that other work may keep busy before a run (see
/// [`ModeResults::background_busy_cores`]) without making the mode's whole-machine CPU
/// figures noisy.
pub const BACKGROUND_MAX_CORES: f64 = 0.25;

fn throughput_gbps(pair: &PairResults) -> Vec<f64> {
    pair.throughput
        .iter()
        .map(|run| run.output.gbit_per_s)
        .collect()
}

fn ping_pong_p50(pair: &PairResults) -> Vec<f64> {
    pair.ping_pong
        .iter()
        .map(|run| run.output.latency.p50_us)
        .collect()
}

fn ping_pong_p90(pair: &PairResults) -> Vec<f64> {
    pair.ping_pong
        .iter()
        .map(|run| run.output.latency.p90_us)
        .collect()
}

fn ping_pong_p99(pair: &PairResults) -> Vec<f64> {
    pair.ping_pong
        .iter()
        .map(|run| run.output.latency.p99_us)
        .collect()
}

fn fixed_rate_p50(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.output.latency.p50_us)
        .collect()
}

fn fixed_rate_p90(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.output.latency.p90_us)
        .collect()
}

fn fixed_rate_p99(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.output.latency.p99_us)
        .collect()
}

fn fixed_rate_achieved(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.output.achieved_rps)
        .collect()
}

fn connections_per_second(pair: &PairResults) -> Vec<f64> {
    pair.conn_rate
        .iter()
        .map(|run| run.output.connections_per_second)
        .collect()
}

fn machine_cpu_per_gib(pair: &PairResults) -> Vec<f64> {
    pair.throughput
        .iter()
        .map(|run| run.cpu.machine_busy_s / (run.output.bytes as f64 / GIB))
        .collect()
}

fn proxy_cpu_per_gib(pair: &PairResults) -> Vec<f64> {
    pair.throughput
        .iter()
        .map(|run| run.cpu.mesh_s / (run.output.bytes as f64 / GIB))
        .collect()
}

/// Core-milliseconds per 1000 requests of the fixed-rate workload.
fn machine_cpu_per_1000_requests(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.cpu.machine_busy_s * 1e6 / run.output.sent_requests as f64)
        .collect()
}

fn proxy_cpu_per_1000_requests(pair: &PairResults) -> Vec<f64> {
    pair.fixed_rate
        .iter()
        .map(|run| run.cpu.mesh_s * 1e6 / run.output.sent_requests as f64)
        .collect()
}

/// The per-pair figures, in table order.
const PAIR_FIGURES: &[PairFigure] = &[
    PairFigure {
        id: "throughput",
        label: "bulk throughput, 1 iperf3 stream",
        unit: "Gbit/s",
        kind: RowKind::Absolute,
        workload: Workload::Throughput,
        basis: Basis::Client,
        samples: throughput_gbps,
    },
    PairFigure {
        id: "ping_pong_p50",
        label: "64 B ping-pong p50",
        unit: "µs",
        kind: RowKind::Absolute,
        workload: Workload::PingPong,
        basis: Basis::Client,
        samples: ping_pong_p50,
    },
    PairFigure {
        id: "ping_pong_p99",
        label: "64 B ping-pong p99",
        unit: "µs",
        kind: RowKind::Absolute,
        workload: Workload::PingPong,
        basis: Basis::Client,
        samples: ping_pong_p99,
    },
    PairFigure {
        id: "ping_pong_added_p50",
        label: "64 B ping-pong p50 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::PingPong,
        basis: Basis::Client,
        samples: ping_pong_p50,
    },
    PairFigure {
        id: "ping_pong_added_p90",
        label: "64 B ping-pong p90 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::PingPong,
        basis: Basis::Client,
        samples: ping_pong_p90,
    },
    PairFigure {
        id: "ping_pong_added_p99",
        label: "64 B ping-pong p99 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::PingPong,
        basis: Basis::Client,
        samples: ping_pong_p99,
    },
    PairFigure {
        id: "fixed_rate_p50",
        label: "1 KiB fixed-rate p50",
        unit: "µs",
        kind: RowKind::Absolute,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_p50,
    },
    PairFigure {
        id: "fixed_rate_p99",
        label: "1 KiB fixed-rate p99",
        unit: "µs",
        kind: RowKind::Absolute,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_p99,
    },
    PairFigure {
        id: "fixed_rate_added_p50",
        label: "1 KiB fixed-rate p50 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_p50,
    },
    PairFigure {
        id: "fixed_rate_added_p90",
        label: "1 KiB fixed-rate p90 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_p90,
    },
    PairFigure {
        id: "fixed_rate_added_p99",
        label: "1 KiB fixed-rate p99 added",
        unit: "µs",
        kind: RowKind::AddedOverPlain,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_p99,
    },
    PairFigure {
        id: "fixed_rate_achieved",
        label: "1 KiB fixed-rate achieved rate",
        unit: "req/s",
        kind: RowKind::Absolute,
        workload: Workload::FixedRate,
        basis: Basis::Client,
        samples: fixed_rate_achieved,
    },
    PairFigure {
        id: "conn_rate",
        label: "connect, 64 B request/response, close",
        unit: "conn/s",
        kind: RowKind::Absolute,
        workload: Workload::ConnRate,
        basis: Basis::Client,
        samples: connections_per_second,
    },
    PairFigure {
        id: "machine_cpu_per_gib",
        label: "machine CPU per GiB, iperf3",
        unit: "core-s/GiB",
        kind: RowKind::Absolute,
        workload: Workload::Throughput,
        basis: Basis::MachineCpu,
        samples: machine_cpu_per_gib,
    },
    PairFigure {
        id: "mesh_cpu_per_gib",
        label: "mesh CPU per GiB: machine CPU minus plain's",
        unit: "core-s/GiB",
        kind: RowKind::AddedOverPlain,
        workload: Workload::Throughput,
        basis: Basis::MachineCpu,
        samples: machine_cpu_per_gib,
    },
    PairFigure {
        id: "proxy_cpu_per_gib",
        label: "proxy processes' CPU per GiB",
        unit: "core-s/GiB",
        kind: RowKind::Absolute,
        workload: Workload::Throughput,
        basis: Basis::ProxyCpu,
        samples: proxy_cpu_per_gib,
    },
    PairFigure {
        id: "machine_cpu_per_1000_requests",
        label: "machine CPU per 1000 fixed-rate requests",
        unit: "core-ms",
        kind: RowKind::Absolute,
        workload: Workload::FixedRate,
        basis: Basis::MachineCpu,
        samples: machine_cpu_per_1000_requests,
    },
    PairFigure {
        id: "mesh_cpu_per_1000_requests",
        label: "mesh CPU per 1000 requests: machine CPU minus plain's",
        unit: "core-ms",
        kind: RowKind::AddedOverPlain,
        workload: Workload::FixedRate,
        basis: Basis::MachineCpu,
        samples: machine_cpu_per_1000_requests,
    },
    PairFigure {
        id: "proxy_cpu_per_1000_requests",
        label: "proxy processes' CPU per 1000 fixed-rate requests",
        unit: "core-ms",
        kind: RowKind::Absolute,
        workload: Workload::FixedRate,
        basis: Basis::ProxyCpu,
        samples: proxy_cpu_per_1000_requests,
    },
];

/// Pairs in table order.
const PAIRS: [&str; 2] = ["cross-node", "same-node"];

/// Builds every row from the raw results of the measured modes.
pub fn rows(results: &[ModeResults]) -> Vec<Row> {
    let measured: Vec<&ModeResults> = results
        .iter()
        .filter(|mode| mode.not_measured.is_none())
        .collect();
    let mut rows = Vec::new();
    for figure in PAIR_FIGURES {
        for pair in PAIRS {
            let absolute: BTreeMap<Mode, Option<Summary>> = measured
                .iter()
                .map(|mode| {
                    if figure.basis == Basis::ProxyCpu && mode.mode == Mode::Plain {
                        return (mode.mode, None);
                    }
                    let samples = mode
                        .pairs
                        .iter()
                        .find(|results| results.pair == pair)
                        .map(|results| (figure.samples)(results))
                        .unwrap_or_default();
                    let mut summary = Summary::of(&samples);
                    if figure.basis == Basis::MachineCpu && mode.machine_was_busy() {
                        if let Some(summary) = &mut summary {
                            summary.noisy = true;
                        }
                    }
                    (mode.mode, summary)
                })
                .collect();
            let values = match figure.kind {
                RowKind::Absolute => absolute,
                RowKind::AddedOverPlain => added_over_plain(&absolute),
            };
            rows.push(Row {
                id: figure.id,
                label: figure.label.to_owned(),
                unit: figure.unit,
                pair,
                kind: figure.kind,
                workload: figure.workload,
                values,
            });
        }
    }
    rows.extend(idle_rows(&measured));
    rows
}

/// Subtracts `plain`'s summary from every mode's; `None` everywhere without `plain`.
fn added_over_plain(absolute: &BTreeMap<Mode, Option<Summary>>) -> BTreeMap<Mode, Option<Summary>> {
    let plain = absolute.get(&Mode::Plain).copied().flatten();
    absolute
        .iter()
        .map(|(&mode, value)| {
            let added = match (value, plain) {
                (Some(value), Some(plain)) => Some(value.minus(&plain)),
                _ => None,
            };
            (mode, added)
        })
        .collect()
}

/// Rows of the proxies' footprint with idle cross-node connections: RSS and
/// descriptors at each point, and the growth per connection from no connection to the
/// largest point. Each point is measured once.
fn idle_rows(measured: &[&ModeResults]) -> Vec<Row> {
    let points: Vec<usize> = measured
        .iter()
        .flat_map(|mode| mode.idle.iter().map(|point| point.connections))
        .filter(|&connections| connections > 0)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let per_mode =
        |value: &dyn Fn(&ModeResults) -> Option<f64>| -> BTreeMap<Mode, Option<Summary>> {
            measured
                .iter()
                .map(|mode| (mode.mode, value(mode).and_then(|v| Summary::of(&[v]))))
                .collect()
        };
    let point = |mode: &ModeResults, connections: usize| -> Option<IdlePoint> {
        mode.idle
            .iter()
            .find(|point| point.connections == connections)
            .cloned()
    };

    let mut rows = Vec::new();
    for &connections in &points {
        rows.push(Row {
            id: "idle_rss",
            label: format!("proxy RSS with {}", idle_connections(connections)),
            unit: "MiB",
            pair: "cross-node",
            kind: RowKind::Absolute,
            workload: Workload::Idle,
            values: per_mode(&|mode| {
                point(mode, connections).map(|p| p.mesh_rss_kib as f64 / 1024.0)
            }),
        });
    }
    for &connections in &points {
        rows.push(Row {
            id: "idle_fds",
            label: format!("proxy open fds with {}", idle_connections(connections)),
            unit: "fds",
            pair: "cross-node",
            kind: RowKind::Absolute,
            workload: Workload::Idle,
            values: per_mode(&|mode| point(mode, connections).map(|p| p.mesh_fds as f64)),
        });
    }
    let growth = |mode: &ModeResults, field: fn(&IdlePoint) -> f64| -> Option<f64> {
        let baseline = mode.idle.iter().find(|point| point.connections == 0)?;
        let largest = mode.idle.iter().max_by_key(|point| point.connections)?;
        if largest.connections == 0 {
            return None;
        }
        Some((field(largest) - field(baseline)) / largest.connections as f64)
    };
    rows.push(Row {
        id: "idle_kib_per_connection",
        label: "proxy memory per idle connection, both ends".to_owned(),
        unit: "KiB",
        pair: "cross-node",
        kind: RowKind::Absolute,
        workload: Workload::Idle,
        values: per_mode(&|mode| growth(mode, |p| p.mesh_rss_kib as f64)),
    });
    rows.push(Row {
        id: "idle_fds_per_connection",
        label: "proxy fds per idle connection, both ends".to_owned(),
        unit: "fds",
        pair: "cross-node",
        kind: RowKind::Absolute,
        workload: Workload::Idle,
        values: per_mode(&|mode| growth(mode, |p| p.mesh_fds as f64)),
    });
    rows
}

/// Returns "1 idle connection" or "N idle connections".
pub fn idle_connections(count: usize) -> String {
    if count == 1 {
        "1 idle connection".to_owned()
    } else {
        format!("{count} idle connections")
    }
}

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
    use crate::bench::workloads::CpuUsage;

    fn cpu() -> CpuUsage {
        CpuUsage {
            machine_busy_s: 1.0,
            mesh_s: 0.5,
            wall_s: 1.0,
        }
    }

    fn mode_with_throughput(mode: Mode, gbps: &[f64]) -> ModeResults {
        let mut results = ModeResults::new(mode, None);
        let pair = results.pair_mut("cross-node");
        for &gbit_per_s in gbps {
            pair.throughput.push(Run {
                output: Throughput {
                    gbit_per_s,
                    bytes: 1 << 30,
                },
                cpu: cpu(),
            });
        }
        results
    }

    fn row<'a>(rows: &'a [Row], id: &str, pair: &str) -> &'a Row {
        rows.iter()
            .find(|row| row.id == id && row.pair == pair)
            .expect("row present")
    }

    #[test]
    fn ratios_to_plain_and_sidecar() {
        let results = [
            mode_with_throughput(Mode::Plain, &[10.0, 10.0, 10.0]),
            mode_with_throughput(Mode::Sidecar, &[2.0, 2.0, 2.0]),
            mode_with_throughput(Mode::Ambient, &[3.0, 3.1, 2.9]),
        ];

        let rows = rows(&results);
        let throughput = row(&rows, "throughput", "cross-node");

        let to_sidecar = throughput
            .ratio(Mode::Ambient, Mode::Sidecar)
            .expect("ratio");
        assert_eq!(to_sidecar.value, 1.5);
        assert!(!to_sidecar.noisy);
        let to_plain = throughput.ratio(Mode::Ambient, Mode::Plain).expect("ratio");
        assert!((to_plain.value - 0.3).abs() < 1e-9, "{to_plain:?}");
    }

    #[test]
    fn added_rows_subtract_plain() {
        let results = [
            mode_with_throughput(Mode::Plain, &[1.0]),
            mode_with_throughput(Mode::Sidecar, &[1.0]),
        ];

        let rows = rows(&results);
        let mesh_cpu = row(&rows, "mesh_cpu_per_gib", "cross-node");

        // Same CPU time per GiB in both modes: the mesh adds nothing.
        assert_eq!(mesh_cpu.value(Mode::Sidecar).expect("value").median, 0.0);
        assert_eq!(mesh_cpu.ratio(Mode::Sidecar, Mode::Plain), None);
    }

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

    #[test]
    fn busy_machine_marks_machine_cpu_noisy() {
        let mut busy = mode_with_throughput(Mode::Sidecar, &[2.0]);
        busy.background_busy_cores.push(1.5);
        let results = [mode_with_throughput(Mode::Plain, &[10.0]), busy];

        let rows = rows(&results);

        let machine = row(&rows, "machine_cpu_per_gib", "cross-node");
        assert!(machine.value(Mode::Sidecar).expect("value").noisy);
        assert!(!machine.value(Mode::Plain).expect("value").noisy);
        let proxies = row(&rows, "proxy_cpu_per_gib", "cross-node");
        assert!(!proxies.value(Mode::Sidecar).expect("value").noisy);
        assert_eq!(proxies.value(Mode::Plain), None);
    }

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
