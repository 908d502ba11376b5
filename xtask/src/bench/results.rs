//! Raw results of a bench run: what each mode measured per pair and run, and which
//! workload runs failed.

use serde::Serialize;

use super::testbed::Mode;
use super::workloads::{ConnRate, FixedRate, IdlePoint, PingPong, Run, Throughput};

/// Cores that other work may keep busy before a run (see
/// [`ModeResults::background_busy_cores`]) without making the mode's whole-machine CPU
/// figures noisy.
pub const BACKGROUND_MAX_CORES: f64 = 0.25;

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

/// Builds the results of `mode` with one cross-node iperf3 run per entry of `gbps`,
/// each moving 1 GiB for 1 core-second of machine time.
#[cfg(test)]
pub fn mode_with_throughput(mode: Mode, gbps: &[f64]) -> ModeResults {
    use super::workloads::CpuUsage;

    let mut results = ModeResults::new(mode, None);
    let pair = results.pair_mut("cross-node");
    for &gbit_per_s in gbps {
        pair.throughput.push(Run {
            output: Throughput {
                gbit_per_s,
                bytes: 1 << 30,
            },
            cpu: CpuUsage {
                machine_busy_s: 1.0,
                mesh_s: 0.5,
                wall_s: 1.0,
            },
        });
    }
    results
}
