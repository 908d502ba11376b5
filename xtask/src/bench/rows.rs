//! The rows of a bench run: each figure of each pair summarized per mode, from the raw
//! results, with the ratios between modes.

use std::collections::BTreeMap;

use serde::Serialize;

use super::results::{ModeResults, PairResults, Workload};
use super::stats::{Ratio, Summary};
use super::testbed::Mode;
use super::workloads::IdlePoint;

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::results::mode_with_throughput;

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
}
