//! The workloads. Each runs a client in a pair's client pod against the servers that
//! [`Testbed`] started, and records the CPU time the machine and the mode's proxies
//! spent meanwhile.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use interceptor_tests::spawn_in;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::sys::{self, CpuTicks};
use super::testbed::{mesh_load_bin, Pair, Testbed, ECHO_PORT, IPERF_PORT};

/// Time a client may run past its own duration before the bench kills it.
const CLIENT_GRACE: Duration = Duration::from_secs(15);

/// Largest CPU share, in cores, that the proxies may use while no workload runs. A
/// proxy above it is spinning, and every figure measured after it would pay for that.
const IDLE_PROXY_MAX_CORES: f64 = 0.25;

/// Time the mode's proxies get to close the connections of one idle point before the
/// next point opens its own.
const IDLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// CPU time spent while a workload ran.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUsage {
    /// Busy time of the whole machine, in core-seconds. It includes the apps, the
    /// kernel and whatever else the machine ran meanwhile.
    pub machine_busy_s: f64,
    /// User and system time of the mode's proxy processes, in core-seconds. Softirq
    /// work that the kernel does outside the proxies' context is not in it.
    pub mesh_s: f64,
    /// Wall-clock time of the client, in seconds.
    pub wall_s: f64,
}

/// Readings at the start of a workload, turned into [`CpuUsage`] at its end.
struct CpuMeter {
    machine: CpuTicks,
    mesh: Vec<(u32, u64)>,
    started: Instant,
}

impl CpuMeter {
    fn start(pids: &[u32]) -> anyhow::Result<CpuMeter> {
        let mesh = pids
            .iter()
            .map(|&pid| Ok((pid, sys::process_cpu_ticks(pid)?)))
            .collect::<std::io::Result<_>>()
            .context("reading the proxies' CPU time")?;
        Ok(CpuMeter {
            machine: CpuTicks::read().context("reading /proc/stat")?,
            mesh,
            started: Instant::now(),
        })
    }

    fn stop(self) -> anyhow::Result<CpuUsage> {
        let wall_s = self.started.elapsed().as_secs_f64();
        let machine = CpuTicks::read().context("reading /proc/stat")?;
        let mut mesh_ticks = 0;
        for (pid, before) in self.mesh {
            let after = sys::process_cpu_ticks(pid)
                .with_context(|| format!("reading the CPU time of proxy {pid}; did it exit?"))?;
            mesh_ticks += after.saturating_sub(before);
        }
        let hz = sys::clock_ticks_per_second();
        Ok(CpuUsage {
            machine_busy_s: machine.busy.saturating_sub(self.machine.busy) as f64 / hz,
            mesh_s: mesh_ticks as f64 / hz,
            wall_s,
        })
    }
}

/// Measures how many cores the machine keeps busy over `window` while the bench itself
/// sent nothing: the load of other work, which adds to every CPU figure.
pub fn background_busy_cores(window: Duration) -> anyhow::Result<f64> {
    let before = CpuTicks::read().context("reading /proc/stat")?;
    let started = Instant::now();
    thread::sleep(window);
    let after = CpuTicks::read().context("reading /proc/stat")?;
    let busy_s = after.busy.saturating_sub(before.busy) as f64 / sys::clock_ticks_per_second();
    Ok(busy_s / started.elapsed().as_secs_f64())
}

/// Checks that the mode's proxies went idle after a workload. Fails when they keep more
/// than [`IDLE_PROXY_MAX_CORES`] busy, which means one is stuck.
pub fn ensure_proxies_idle(testbed: &Testbed) -> anyhow::Result<()> {
    let pids = testbed.mesh_pids();
    if pids.is_empty() {
        return Ok(());
    }
    // Closing the workload's connections takes the proxies a moment.
    thread::sleep(Duration::from_millis(200));
    let meter = CpuMeter::start(&pids)?;
    thread::sleep(Duration::from_millis(500));
    let usage = meter.stop()?;
    let cores = usage.mesh_s / usage.wall_s;
    if cores > IDLE_PROXY_MAX_CORES {
        bail!(
            "the proxies kept {cores:.2} cores busy after the workload ended: a proxy is \
             stuck, and later figures would pay for it"
        );
    }
    Ok(())
}

/// One run of a workload: the client's report and the CPU time spent meanwhile.
#[derive(Debug, Clone, Serialize)]
pub struct Run<T> {
    pub output: T,
    pub cpu: CpuUsage,
}

/// Latency percentiles as `mesh-load` prints them, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// Report of `mesh-load ping-pong`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingPong {
    pub requests: u64,
    pub seconds: f64,
    pub latency: Latency,
}

/// Report of `mesh-load fixed-rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FixedRate {
    pub target_rps: f64,
    pub achieved_rps: f64,
    pub requests: u64,
    pub sent_requests: u64,
    pub connections: usize,
    pub latency: Latency,
    pub send_lag: Latency,
}

/// Report of `mesh-load conn-rate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRate {
    pub connections: u64,
    pub seconds: f64,
    pub connections_per_second: f64,
    pub latency: Latency,
}

/// Result of one iperf3 run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub gbit_per_s: f64,
    /// Bytes the server received.
    pub bytes: u64,
}

/// The parts of `iperf3 --json` output the bench reads.
#[derive(Deserialize)]
struct IperfReport {
    error: Option<String>,
    end: Option<IperfEnd>,
}

#[derive(Deserialize)]
struct IperfEnd {
    sum_received: IperfSum,
}

#[derive(Deserialize)]
struct IperfSum {
    bytes: u64,
    bits_per_second: f64,
}

/// Runs iperf3 for `seconds` from the client pod to the server pod, one TCP stream.
pub fn throughput(testbed: &Testbed, pair: &Pair, seconds: u32) -> anyhow::Result<Run<Throughput>> {
    let mut command = Command::new("iperf3");
    command.args([
        "--client",
        &pair.server.ip.to_string(),
        "--port",
        &IPERF_PORT.to_string(),
        "--time",
        &seconds.to_string(),
        "--connect-timeout",
        "5000",
        "--json",
    ]);
    let timeout = Duration::from_secs(u64::from(seconds)) + CLIENT_GRACE;
    let (output, cpu) = run_client(testbed, pair, command, timeout)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: IperfReport = serde_json::from_str(&stdout)
        .with_context(|| format!("parsing iperf3 --json output: {}", first_line(&stdout)))?;
    if let Some(error) = report.error {
        bail!("iperf3 to {} failed: {error}", pair.server.name);
    }
    if !output.status.success() {
        bail!(
            "iperf3 to {} failed with {}",
            pair.server.name,
            output.status
        );
    }
    let end = report
        .end
        .context("iperf3 --json output has no \"end\" summary")?;
    Ok(Run {
        output: Throughput {
            gbit_per_s: end.sum_received.bits_per_second / 1e9,
            bytes: end.sum_received.bytes,
        },
        cpu,
    })
}

/// Runs `mesh-load ping-pong` with 64-byte requests on one connection.
pub fn ping_pong(
    testbed: &Testbed,
    pair: &Pair,
    seconds: f64,
    warmup_seconds: f64,
) -> anyhow::Result<Run<PingPong>> {
    mesh_load(
        testbed,
        pair,
        &[
            "ping-pong",
            &echo_addr(pair),
            "--size",
            "64",
            "--seconds",
            &seconds.to_string(),
            "--warmup-seconds",
            &warmup_seconds.to_string(),
        ],
        seconds + warmup_seconds,
    )
}

/// Runs `mesh-load fixed-rate` with 1 KiB requests at `rate` per second over 16
/// connections.
pub fn fixed_rate(
    testbed: &Testbed,
    pair: &Pair,
    rate: f64,
    seconds: f64,
    warmup_seconds: f64,
) -> anyhow::Result<Run<FixedRate>> {
    mesh_load(
        testbed,
        pair,
        &[
            "fixed-rate",
            &echo_addr(pair),
            "--size",
            "1024",
            "--rate",
            &rate.to_string(),
            "--connections",
            "16",
            "--seconds",
            &seconds.to_string(),
            "--warmup-seconds",
            &warmup_seconds.to_string(),
        ],
        seconds + warmup_seconds,
    )
}

/// Runs `mesh-load conn-rate`: 4 workers that each connect, exchange 64 bytes and
/// close, for `seconds` and at most `max_connections` connections.
pub fn conn_rate(
    testbed: &Testbed,
    pair: &Pair,
    seconds: f64,
    max_connections: u64,
) -> anyhow::Result<Run<ConnRate>> {
    mesh_load(
        testbed,
        pair,
        &[
            "conn-rate",
            &echo_addr(pair),
            "--size",
            "64",
            "--concurrency",
            "4",
            "--seconds",
            &seconds.to_string(),
            "--max-connections",
            &max_connections.to_string(),
        ],
        seconds,
    )
}

/// The proxies' footprint while a number of idle connections is open.
#[derive(Debug, Clone, Serialize)]
pub struct IdlePoint {
    pub connections: usize,
    /// Sum of `VmRSS` over the mode's proxy processes, in KiB.
    pub mesh_rss_kib: u64,
    /// Sum of open file descriptors over the mode's proxy processes.
    pub mesh_fds: u64,
    /// Time `mesh-load idle` took to open and check every connection, in seconds.
    pub open_seconds: f64,
}

/// Returns the summed `VmRSS` (KiB) and open file descriptors of the mode's proxies.
pub fn mesh_footprint(testbed: &Testbed) -> anyhow::Result<(u64, u64)> {
    let mut rss_kib = 0;
    let mut fds = 0;
    for pid in testbed.mesh_pids() {
        rss_kib += sys::vm_rss_kib(pid).with_context(|| format!("reading VmRSS of proxy {pid}"))?;
        fds +=
            sys::open_fds(pid).with_context(|| format!("counting descriptors of proxy {pid}"))?;
    }
    Ok((rss_kib, fds))
}

/// Opens `connections` idle connections through the pair with `mesh-load idle`,
/// measures the proxies' footprint, closes them, and waits until the proxies have
/// closed their side too.
pub fn idle_point(testbed: &Testbed, pair: &Pair, connections: usize) -> anyhow::Result<IdlePoint> {
    let (_, fds_before) = mesh_footprint(testbed)?;
    // Each connection takes a few milliseconds to open through a proxy on a busy
    // machine; the fixed part covers start-up.
    let open_timeout = Duration::from_secs(30) + Duration::from_millis(20) * connections as u32;
    let mut command = Command::new(mesh_load_bin());
    command.args([
        "idle",
        &echo_addr(pair),
        "--connections",
        &connections.to_string(),
        "--hold-seconds",
        &(open_timeout.as_secs() + 60).to_string(),
    ]);
    // Its stderr goes to the bench's, so a failure to open shows there.
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let island = testbed.island();
    let mut child = spawn_in(
        &pair.client.netns_path,
        Some(&island.cgroup_dir(&pair.client.cgroup)),
        &mut command,
    )?;
    let stdout = child.stdout.take().context("mesh-load stdout not piped")?;
    let holder = IdleHolder {
        stdin: child.stdin.take(),
        child,
    };

    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let _ = line_tx.send(first);
    });
    let ready = line_rx.recv_timeout(open_timeout).map_err(|_| {
        anyhow::anyhow!(
            "mesh-load idle did not open {connections} connections within {open_timeout:?}"
        )
    })?;
    let ready: IdleReady = serde_json::from_str(ready.trim()).with_context(|| {
        format!("mesh-load idle failed to open {connections} connections (its error is above)")
    })?;

    // Let the proxies finish the last handshakes before reading their footprint.
    thread::sleep(Duration::from_secs(1));
    let (mesh_rss_kib, mesh_fds) = mesh_footprint(testbed)?;
    holder.close()?;

    let deadline = Instant::now() + IDLE_DRAIN_TIMEOUT;
    while mesh_footprint(testbed)?.1 > fds_before + 8 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    Ok(IdlePoint {
        connections: ready.ready,
        mesh_rss_kib,
        mesh_fds,
        open_seconds: ready.open_seconds,
    })
}

/// The `ready` line of `mesh-load idle`.
#[derive(Deserialize)]
struct IdleReady {
    ready: usize,
    open_seconds: f64,
}

/// A running `mesh-load idle`; closing its stdin makes it close every connection and
/// exit. Dropping it kills the process.
struct IdleHolder {
    stdin: Option<ChildStdin>,
    child: Child,
}

impl IdleHolder {
    fn close(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let deadline = Instant::now() + CLIENT_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("mesh-load idle exited with {status}");
                }
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("mesh-load idle did not exit within {CLIENT_GRACE:?} of its stdin closing")
    }
}

impl Drop for IdleHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_addr(pair: &Pair) -> String {
    format!("{}:{ECHO_PORT}", pair.server.ip)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Runs `mesh-load ARGS` in the client pod and parses its JSON report.
fn mesh_load<T: DeserializeOwned>(
    testbed: &Testbed,
    pair: &Pair,
    args: &[&str],
    seconds: f64,
) -> anyhow::Result<Run<T>> {
    let mut command = Command::new(mesh_load_bin());
    command.args(args);
    let timeout = Duration::from_secs_f64(seconds) + CLIENT_GRACE;
    let (output, cpu) = run_client(testbed, pair, command, timeout)?;
    if !output.status.success() {
        bail!(
            "mesh-load {} to {} failed with {}: {}",
            args[0],
            pair.server.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "parsing the mesh-load {} report {:?}",
            args[0],
            stdout.trim()
        )
    })?;
    Ok(Run {
        output: report,
        cpu,
    })
}

/// Runs `command` in the pair's client pod (its network namespace and cgroup) and
/// returns its output and the CPU time spent while it ran. Kills it after `timeout`.
fn run_client(
    testbed: &Testbed,
    pair: &Pair,
    mut command: Command,
    timeout: Duration,
) -> anyhow::Result<(Output, CpuUsage)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = command.get_program().to_string_lossy().into_owned();
    let island = testbed.island();
    let meter = CpuMeter::start(&testbed.mesh_pids())?;
    let child = spawn_in(
        &pair.client.netns_path,
        Some(&island.cgroup_dir(&pair.client.cgroup)),
        &mut command,
    )?;
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(timeout) {
        Ok(output) => output.with_context(|| format!("waiting for {program}"))?,
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child that `waiter` has not reaped yet,
            // because it has not sent its result.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = waiter.join();
            bail!(
                "{program} in {} did not finish within {timeout:?}",
                pair.client.name
            );
        }
    };
    let cpu = meter.stop()?;
    Ok((output, cpu))
}
