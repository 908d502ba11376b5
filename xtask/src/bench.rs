//! `cargo xtask bench`: what the mesh costs, measured against plain TCP.
//!
//! Every mode (`plain`, `sidecar`, `ambient`, and `ambient-ktls` where the kernel has
//! kTLS) gets its own fresh 2-node island with 2 pods per node. Every workload runs from
//! n1-p1 to a server on the other node (n2-p1) and to one on the same node (n1-p2):
//!
//! - bulk throughput: one iperf3 TCP stream;
//! - latency: 64-byte ping-pong on one connection, and 1 KiB requests at a fixed rate
//!   over 16 connections, measured from each request's intended send time;
//! - connection rate: connect, one 64-byte request and response, close;
//! - CPU: busy time of the whole machine (`/proc/stat`) and of the proxy processes
//!   during each workload;
//! - memory: the proxies' RSS and open descriptors with idle connections open.
//!
//! The islands stay up side by side, and each run of the workloads visits every mode
//! in turn, starting with a different mode each time, so slow drift in the machine's
//! other load spreads over all modes instead of landing on one.
//!
//! Output: a progress line per step on stderr, the Markdown table on stdout, and
//! `target/bench/bench.{json,md,png}`. The bench fails only when it cannot measure
//! (a tool, island, proxy or workload fails), never because a figure is noisy or
//! misses its target.

mod chart;
mod markdown;
mod measure;
mod results;
mod rows;
mod stats;
mod sys;
mod targets;
mod testbed;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};
use interceptor_tests::require_privileges;
use serde::Serialize;

use results::ModeResults;
use rows::Row;
use sys::{Machine, NofileLimit};
use targets::TargetCheck;
use testbed::{Mode, Testbed};

#[derive(clap::Args)]
pub struct Options {
    /// Short workloads, one run each and at most 1000 idle connections: checks that the
    /// harness works (about 2 minutes), not what the mesh costs.
    #[arg(long)]
    quick: bool,
    /// Runs of each repeated figure [default: 3, or 1 with --quick].
    #[arg(long)]
    runs: Option<usize>,
    /// Requests per second of the 1 KiB fixed-rate workload, over all 16 connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measure only these modes (repeat or separate with commas) [default: all]. `plain`
    /// is always measured, because every other figure is compared with it.
    #[arg(long = "mode", value_enum, value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Use the debug binaries (`target/debug`) instead of building release ones. For
    /// `cargo xtask test`, which runs `--quick` this way to keep the harness working;
    /// the figures then say nothing about what the mesh costs.
    #[arg(long)]
    debug_build: bool,
}

impl Options {
    /// The quick run over the debug binaries that `cargo xtask test` makes.
    pub fn harness_check() -> Self {
        Self {
            quick: true,
            runs: None,
            rate: 1000.0,
            modes: Vec::new(),
            debug_build: true,
        }
    }

    /// Whether the bench needs a release build first.
    pub fn needs_release_build(&self) -> bool {
        !self.debug_build
    }
}

/// Durations and counts of one bench run.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    quick: bool,
    runs: usize,
    iperf_seconds: u32,
    ping_pong_seconds: f64,
    ping_pong_warmup_seconds: f64,
    fixed_rate_rps: f64,
    fixed_rate_seconds: f64,
    fixed_rate_warmup_seconds: f64,
    conn_rate_seconds: f64,
    conn_rate_max_connections: u64,
    /// Numbers of idle connections at which the proxies' footprint is read.
    idle_points: Vec<usize>,
    /// Seconds of idle machine before each mode's run, to read other work's load.
    background_seconds: f64,
}

impl Settings {
    fn new(options: &Options) -> anyhow::Result<Settings> {
        let runs = options.runs.unwrap_or(if options.quick { 1 } else { 3 });
        if runs == 0 {
            bail!("invalid --runs 0: expected at least 1");
        }
        if !(options.rate.is_finite() && options.rate > 0.0) {
            bail!(
                "invalid --rate {}: expected requests per second above 0",
                options.rate
            );
        }
        let settings = if options.quick {
            Settings {
                quick: true,
                runs,
                iperf_seconds: 2,
                ping_pong_seconds: 1.0,
                ping_pong_warmup_seconds: 0.2,
                fixed_rate_rps: options.rate,
                fixed_rate_seconds: 2.0,
                fixed_rate_warmup_seconds: 0.5,
                conn_rate_seconds: 1.0,
                conn_rate_max_connections: 5_000,
                idle_points: vec![1, 100, 1_000],
                background_seconds: 0.5,
            }
        } else {
            Settings {
                quick: false,
                runs,
                iperf_seconds: 10,
                ping_pong_seconds: 4.0,
                ping_pong_warmup_seconds: 0.5,
                fixed_rate_rps: options.rate,
                fixed_rate_seconds: 8.0,
                fixed_rate_warmup_seconds: 1.0,
                conn_rate_seconds: 4.0,
                conn_rate_max_connections: 20_000,
                idle_points: vec![1, 1_000, 10_000],
                background_seconds: 1.0,
            }
        };
        Ok(settings)
    }
}

/// Descriptors that the busiest proxy process keeps open per idle cross-node connection: the
/// app-side socket and the tunnel socket.
const PROXY_FDS_PER_CONNECTION: u64 = 2;

/// Descriptors a proxy process keeps open besides its connections (listeners, eBPF maps and
/// links, logs, the runtime), with room to spare. An estimate: the first idle point
/// reads the real count.
const PROXY_FD_RESERVE: u64 = 500;

/// Returns the largest number of idle connections, at most `wanted`, that fits in a
/// proxy's descriptor limit, rounded down to a hundred.
fn idle_connections_that_fit(wanted: usize, hard_limit: u64) -> usize {
    let fit = hard_limit.saturating_sub(PROXY_FD_RESERVE) / PROXY_FDS_PER_CONNECTION;
    let fit = usize::try_from(fit).unwrap_or(usize::MAX);
    wanted.min(fit / 100 * 100)
}

/// Contents of bench.json.
#[derive(Serialize)]
struct Record<'a> {
    date_utc: String,
    command: String,
    machine: Machine,
    settings: &'a Settings,
    nofile: NofileLimit,
    /// Spread above which a figure is noisy, see [`stats::NOISE_SPREAD`].
    noise_spread: f64,
    notes: &'a [String],
    duration_seconds: f64,
    modes: &'a [ModeResults],
    rows: &'a [Row],
    targets: &'a [TargetCheck],
}

/// Prints one progress line.
fn progress(message: impl std::fmt::Display) {
    eprintln!("bench: {message}");
}

/// Runs the bench with the binaries already built under `root/target/release` (or
/// `target/debug` with `--debug-build`).
pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let date_utc = utc_now();
    let mut settings = Settings::new(options)?;
    let out_dir = root.join("target/bench");
    let release_dir = root.join(if options.debug_build {
        "target/debug"
    } else {
        "target/release"
    });
    if options.debug_build {
        progress("using the debug binaries: this run checks the harness, its figures say nothing about cost");
    }
    // Mesh and SidecarMesh start the binaries found through INTERCEPTOR_TARGET_DIR. No
    // other thread runs yet, so setting the variable races with nothing.
    std::env::set_var("INTERCEPTOR_TARGET_DIR", &release_dir);
    check_tools(&release_dir)?;
    if !require_privileges("cargo xtask bench") {
        bail!("the bench builds network namespaces and cgroups and loads eBPF: run it as root");
    }
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut notes = Vec::new();
    let nofile = sys::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    progress(format_args!(
        "RLIMIT_NOFILE soft limit raised from {} to the hard limit {}; proxies, servers and \
         clients inherit it",
        nofile.soft_before, nofile.hard
    ));
    if let Some(largest) = settings.idle_points.last_mut() {
        let fit = idle_connections_that_fit(*largest, nofile.hard);
        if fit < *largest {
            let note = format!(
                "largest idle point scaled from {} to {fit} connections: a proxy keeps \
                 {PROXY_FDS_PER_CONNECTION} descriptors open per connection, and \
                 {PROXY_FD_RESERVE} are left for its others, under the hard RLIMIT_NOFILE \
                 of {}",
                *largest, nofile.hard
            );
            progress(&note);
            notes.push(note);
            *largest = fit;
        }
    }
    if settings.quick {
        let note = "quick run: one run per figure and at most 1000 idle connections, so \
                    no figure has a spread and none is comparable with a full run"
            .to_owned();
        progress(&note);
        notes.push(note);
    }

    let work_root = out_dir.join("work");
    let mut results = Vec::new();
    let mut testbeds = Vec::new();
    for mode in Mode::ALL {
        if mode != Mode::Plain && !options.modes.is_empty() && !options.modes.contains(&mode) {
            continue;
        }
        if mode == Mode::AmbientKtls {
            if let Some(reason) = sys::kernel_tls_missing() {
                progress(format_args!("{}: not measured: {reason}", mode.name()));
                results.push(ModeResults::new(mode, Some(reason)));
                continue;
            }
        }
        progress(format_args!(
            "{}: building the island and starting its proxies",
            mode.name()
        ));
        testbeds.push(Testbed::start(mode, &work_root)?);
        results.push(ModeResults::new(mode, None));
    }

    measure::measure(&settings, &work_root, &mut testbeds, &mut results)?;
    progress("removing the islands");
    drop(testbeds);

    let rows = rows::rows(&results);
    let targets = targets::targets(&rows);
    let markdown = markdown::markdown(&results, &rows, &targets);
    let record = Record {
        date_utc,
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        machine: Machine::detect(),
        settings: &settings,
        nofile,
        noise_spread: stats::NOISE_SPREAD,
        notes: &notes,
        duration_seconds: started.elapsed().as_secs_f64(),
        modes: &results,
        rows: &rows,
        targets: &targets,
    };
    write_outputs(&out_dir, &record, &markdown)?;
    println!("{markdown}");
    progress(format_args!(
        "measured in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        out_dir.display()
    ));
    let failures: usize = results.iter().map(|mode| mode.failures.len()).sum();
    if failures > 0 {
        bail!("{failures} workload run(s) failed; bench.md lists them");
    }
    Ok(())
}

/// Fails early, with what to do, when a binary or tool the bench starts is missing.
fn check_tools(release_dir: &Path) -> anyhow::Result<()> {
    for name in ["interceptor", "mesh-load"] {
        let path = release_dir.join(name);
        if !path.exists() {
            bail!(
                "{} not found: build the release binaries with `cargo build --release --bins`",
                path.display()
            );
        }
    }
    let iperf3 = Command::new("iperf3").arg("--version").output();
    if !iperf3.is_ok_and(|output| output.status.success()) {
        bail!("iperf3 not found: install it with scripts/setup.sh (apt package iperf3)");
    }
    Ok(())
}

/// Writes bench.json, bench.md and bench.png into `out_dir`.
fn write_outputs(out_dir: &Path, record: &Record<'_>, markdown: &str) -> anyhow::Result<()> {
    let json_path = out_dir.join("bench.json");
    let json = serde_json::to_string_pretty(record).context("encoding bench.json")?;
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;

    let markdown_path = out_dir.join("bench.md");
    std::fs::write(&markdown_path, markdown)
        .with_context(|| format!("writing {}", markdown_path.display()))?;

    let chart_path: PathBuf = out_dir.join("bench.png");
    let modes: Vec<Mode> = record
        .modes
        .iter()
        .filter(|mode| mode.not_measured.is_none())
        .map(|mode| mode.mode)
        .collect();
    match chart::draw(&chart_path, record.rows, &modes)? {
        Some(font) => progress(format_args!("chart drawn with {font}")),
        None => progress(
            "no TrueType font found (install fonts-dejavu-core): the chart has bars and \
             range lines but no text; bench.md names what each shows",
        ),
    }
    progress(format_args!(
        "wrote {}, {} and {}",
        json_path.display(),
        markdown_path.display(),
        chart_path.display()
    ));
    Ok(())
}

/// Returns the current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let (days, time_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time_of_day / 3600,
        time_of_day / 60 % 60,
        time_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let month = month as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_point_scaled_to_limit() {
        assert_eq!(idle_connections_that_fit(10_000, 20_000), 9_700);
        assert_eq!(idle_connections_that_fit(10_000, 1_048_576), 10_000);
        assert_eq!(idle_connections_that_fit(1_000, 20_000), 1_000);
        assert_eq!(idle_connections_that_fit(10_000, 100), 0);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
