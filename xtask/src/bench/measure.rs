//! The measuring loop. Every run visits every mode, both pairs and every workload; the
//! idle-connection points follow once per mode.
//!
//! A workload that fails, or after which the proxies do not go idle, is recorded as a
//! failure. Its mode's testbed is then rebuilt on a fresh island before the next step,
//! so one stuck proxy neither ends the bench nor burns CPU under later figures.

use std::path::Path;

use anyhow::Context as _;

use super::results::{Failure, ModeResults, Workload};
use super::rows::idle_connections;
use super::testbed::{Mode, Pair, Testbed};
use super::{progress, workloads, Settings};

/// Workloads of one run, in the order each pair runs them.
const RUN_WORKLOADS: [Workload; 4] = [
    Workload::Throughput,
    Workload::PingPong,
    Workload::FixedRate,
    Workload::ConnRate,
];

/// Runs every workload `settings.runs` times and then the idle points, filling
/// `results` (one entry per mode of `testbeds`). Fails only when a testbed cannot be
/// built again or `/proc` cannot be read; workload failures land in `results`.
pub fn measure(
    settings: &Settings,
    work_root: &Path,
    testbeds: &mut Vec<Testbed>,
    results: &mut [ModeResults],
) -> anyhow::Result<()> {
    for run in 0..settings.runs {
        // Start each run with a different mode, so that a drift in the machine's other
        // load does not always land on the same mode.
        for offset in 0..testbeds.len() {
            let index = (run + offset) % testbeds.len();
            let mode = testbeds[index].mode;
            let mode_results = results_of(results, mode)?;

            let window = std::time::Duration::from_secs_f64(settings.background_seconds);
            let background = workloads::background_busy_cores(window)?;
            progress(format_args!(
                "run {}/{} {}: other work kept {background:.2} cores busy",
                run + 1,
                settings.runs,
                mode.name()
            ));
            mode_results.background_busy_cores.push(background);

            for pair_index in 0..2 {
                for workload in RUN_WORKLOADS {
                    let testbed = &testbeds[index];
                    let pair = testbed.pairs()[pair_index].clone();
                    let step = format!(
                        "run {}/{} {} {} {}",
                        run + 1,
                        settings.runs,
                        mode.name(),
                        pair.name,
                        workload.name()
                    );
                    let outcome =
                        run_workload(testbed, &pair, workload, settings, mode_results, &step)
                            .and_then(|()| workloads::ensure_proxies_idle(testbed));
                    if let Err(error) = outcome {
                        fail(
                            testbeds,
                            index,
                            work_root,
                            mode_results,
                            Failure {
                                run: Some(run + 1),
                                pair: pair.name,
                                workload,
                                error: format!("{error:#}"),
                            },
                            &step,
                        )?;
                    }
                }
            }
        }
    }

    for index in 0..testbeds.len() {
        let mode = testbeds[index].mode;
        if mode == Mode::Plain {
            continue;
        }
        let mode_results = results_of(results, mode)?;
        measure_idle(testbeds, index, work_root, settings, mode_results)?;
    }
    Ok(())
}

fn results_of(results: &mut [ModeResults], mode: Mode) -> anyhow::Result<&mut ModeResults> {
    results
        .iter_mut()
        .find(|result| result.mode == mode)
        .with_context(|| format!("no results entry for mode {}", mode.name()))
}

/// Records `failure`, prints it, and rebuilds the testbed at `index`.
fn fail(
    testbeds: &mut Vec<Testbed>,
    index: usize,
    work_root: &Path,
    results: &mut ModeResults,
    failure: Failure,
    step: &str,
) -> anyhow::Result<()> {
    let mode = testbeds[index].mode;
    progress(format_args!(
        "{step}: FAILED: {} (logs in {}); rebuilding the {} island",
        failure.error,
        testbeds[index].work_dir().display(),
        mode.name()
    ));
    results.failures.push(failure);
    // The old island must be gone before the new one takes its prefix.
    drop(testbeds.remove(index));
    let fresh = Testbed::start(mode, work_root)
        .with_context(|| format!("rebuilding the {} testbed", mode.name()))?;
    testbeds.insert(index, fresh);
    Ok(())
}

/// Runs `workload` once between `pair` and records its result in `results`.
fn run_workload(
    testbed: &Testbed,
    pair: &Pair,
    workload: Workload,
    settings: &Settings,
    results: &mut ModeResults,
    step: &str,
) -> anyhow::Result<()> {
    match workload {
        Workload::Throughput => {
            let run = workloads::throughput(testbed, pair, settings.iperf_seconds)?;
            progress(format_args!(
                "{step} {} s: {:.2} Gbit/s, machine {:.2} core-s, proxies {:.2} core-s",
                settings.iperf_seconds,
                run.output.gbit_per_s,
                run.cpu.machine_busy_s,
                run.cpu.mesh_s
            ));
            results.pair_mut(pair.name).throughput.push(run);
        }
        Workload::PingPong => {
            let run = workloads::ping_pong(
                testbed,
                pair,
                settings.ping_pong_seconds,
                settings.ping_pong_warmup_seconds,
            )?;
            progress(format_args!(
                "{step}: p50 {:.1} µs, p99 {:.1} µs over {} requests",
                run.output.latency.p50_us, run.output.latency.p99_us, run.output.requests
            ));
            results.pair_mut(pair.name).ping_pong.push(run);
        }
        Workload::FixedRate => {
            let run = workloads::fixed_rate(
                testbed,
                pair,
                settings.fixed_rate_rps,
                settings.fixed_rate_seconds,
                settings.fixed_rate_warmup_seconds,
            )?;
            progress(format_args!(
                "{step} at {} req/s: p50 {:.1} µs, p99 {:.1} µs, achieved {:.0} req/s",
                settings.fixed_rate_rps,
                run.output.latency.p50_us,
                run.output.latency.p99_us,
                run.output.achieved_rps
            ));
            if run.output.achieved_rps < 0.95 * settings.fixed_rate_rps {
                progress(format_args!(
                    "{step}: the rate was not held, so its latencies include the backlog"
                ));
            }
            results.pair_mut(pair.name).fixed_rate.push(run);
        }
        Workload::ConnRate => {
            let run = workloads::conn_rate(
                testbed,
                pair,
                settings.conn_rate_seconds,
                settings.conn_rate_max_connections,
            )?;
            progress(format_args!(
                "{step}: {:.0} connections/s",
                run.output.connections_per_second
            ));
            results.pair_mut(pair.name).conn_rate.push(run);
        }
        Workload::Idle => anyhow::bail!("idle points run through measure_idle"),
    }
    Ok(())
}

/// Reads the proxies' footprint with no connection and at every idle point of the
/// cross-node pair. Points run from small to large; each closes its connections and
/// waits for the proxies to close theirs before the next. A failed point is recorded,
/// and the points after it run on a rebuilt testbed.
fn measure_idle(
    testbeds: &mut Vec<Testbed>,
    index: usize,
    work_root: &Path,
    settings: &Settings,
    results: &mut ModeResults,
) -> anyhow::Result<()> {
    let mode = testbeds[index].mode.name();
    let (rss_kib, fds) = workloads::mesh_footprint(&testbeds[index])?;
    progress(format_args!(
        "{mode}: proxies with no connection: {:.1} MiB RSS, {fds} fds",
        rss_kib as f64 / 1024.0
    ));
    results.idle.push(workloads::IdlePoint {
        connections: 0,
        mesh_rss_kib: rss_kib,
        mesh_fds: fds,
        open_seconds: 0.0,
    });

    for &connections in &settings.idle_points {
        let testbed = &testbeds[index];
        let [cross_node, _] = testbed.pairs();
        let step = format!("{mode} cross-node {}", idle_connections(connections));
        let outcome = workloads::idle_point(testbed, &cross_node, connections)
            .and_then(|point| workloads::ensure_proxies_idle(testbed).map(|()| point));
        match outcome {
            Ok(point) => {
                progress(format_args!(
                    "{step}: proxies {:.1} MiB RSS, {} fds (opened in {:.1} s)",
                    point.mesh_rss_kib as f64 / 1024.0,
                    point.mesh_fds,
                    point.open_seconds
                ));
                results.idle.push(point);
            }
            Err(error) => fail(
                testbeds,
                index,
                work_root,
                results,
                Failure {
                    run: None,
                    pair: cross_node.name,
                    workload: Workload::Idle,
                    error: format!("{error:#}"),
                },
                &step,
            )?,
        }
    }
    Ok(())
}
