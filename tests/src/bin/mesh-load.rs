//! `mesh-load`: the load generator of `cargo xtask bench` and the echo server it runs
//! against. Like `mesh-peer`, it uses plain TCP sockets and has no code for the mesh.
//!
//! # Modes
//!
//! ```text
//! mesh-load serve LISTEN_ADDR
//! mesh-load ping-pong ADDR [--size 64] [--seconds S] [--warmup-seconds S]
//! mesh-load fixed-rate ADDR [--size 1024] --rate R [--connections 16] [--seconds S]
//!                           [--warmup-seconds S]
//! mesh-load conn-rate ADDR [--size 64] [--concurrency 4] [--seconds S]
//!                          [--max-connections N]
//! mesh-load idle ADDR --connections N [--hold-seconds S]
//! ```
//!
//! - `serve` echoes every byte it reads on every connection it accepts, on an async
//!   runtime, so it holds tens of thousands of idle connections without a thread each.
//! - `ping-pong` sends SIZE bytes on one connection, waits for the echo, and repeats.
//! - `fixed-rate` sends SIZE-byte requests at R requests per second in total, spread
//!   evenly over CONNECTIONS connections with one request in flight per connection.
//!   Every request has an intended send time on a fixed schedule, and its latency runs
//!   from that time rather than from the actual send, so a stall delays and counts
//!   against every request queued behind it (the correction for coordinated omission
//!   that wrk2 applies).
//! - `conn-rate` runs CONCURRENCY workers that each connect, send SIZE bytes, read the
//!   echo and close, as fast as they can.
//! - `idle` opens N connections, checks each with a 1-byte echo, prints a `ready` line,
//!   and holds them until its standard input closes or HOLD seconds pass.
//!
//! Warm-up requests are sent but not recorded. Every client mode stops at its deadline.
//!
//! # Output
//!
//! Client modes print one JSON object on stdout when they finish (`idle`: when all its
//! connections are open). Latencies are in microseconds. `serve` prints
//! `listening ADDR` once bound. Any socket error ends a client mode with exit code 1 and
//! a message on stderr, because the benchmark must not report figures of a broken path.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Extra time a client mode may take past its scheduled end before it gives up.
const GRACE: Duration = Duration::from_secs(10);

/// Largest latency the histograms record: 60 s, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// Number of threads that open `idle` connections at the same time.
const IDLE_OPENERS: usize = 16;

#[derive(Parser)]
#[command(about = "Load generator and echo server of `cargo xtask bench`")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Echo every byte on every accepted connection.
    Serve { listen: SocketAddr },
    /// Send one request at a time on one connection and record each round trip.
    PingPong {
        addr: SocketAddr,
        /// Request size in bytes; the echo has the same size.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Duration of the recorded part of the run, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Duration of the unrecorded warm-up before it, in seconds.
        #[arg(long, default_value_t = 0.5)]
        warmup_seconds: f64,
    },
    /// Send requests on a fixed schedule over several connections.
    FixedRate {
        addr: SocketAddr,
        /// Request size in bytes; the echo has the same size.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Requests per second over all connections together.
        #[arg(long)]
        rate: f64,
        /// Number of connections, each with one request in flight at most.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Duration of the recorded part of the run, in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Duration of the unrecorded warm-up before it, in seconds.
        #[arg(long, default_value_t = 1.0)]
        warmup_seconds: f64,
    },
    /// Connect, exchange one request and its echo, close; as fast as possible.
    ConnRate {
        addr: SocketAddr,
        /// Request size in bytes; the echo has the same size.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Number of workers, each with one connection open at most.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Duration of the run, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Maximum number of connections over the whole run.
        #[arg(long, default_value_t = 20_000)]
        max_connections: u64,
    },
    /// Open idle connections and hold them.
    Idle {
        addr: SocketAddr,
        /// Number of connections to open.
        #[arg(long)]
        connections: usize,
        /// Maximum time to hold them before exiting, in seconds.
        #[arg(long, default_value_t = 300.0)]
        hold_seconds: f64,
    },
}

/// Latency percentiles of a run, in microseconds.
#[derive(Debug, Serialize)]
struct Latency {
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    mean_us: f64,
}

impl Latency {
    fn from_histogram(histogram: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1_000.0;
        Latency {
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p999_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
            mean_us: histogram.mean() / 1_000.0,
        }
    }
}

/// Output of `ping-pong`.
#[derive(Debug, Serialize)]
struct PingPongReport {
    requests: u64,
    seconds: f64,
    latency: Latency,
}

/// Output of `fixed-rate`.
#[derive(Debug, Serialize)]
struct FixedRateReport {
    /// Requests per second that the schedule asked for.
    target_rps: f64,
    /// Recorded requests divided by the time from the first recorded intended send to
    /// the last response. It falls below `target_rps` when the path cannot keep up.
    achieved_rps: f64,
    /// Recorded requests, which leave out the warm-up.
    requests: u64,
    /// Every request sent, warm-up included: the work behind the CPU time of the run.
    sent_requests: u64,
    connections: usize,
    /// Latency from each request's intended send time to its response.
    latency: Latency,
    /// How late the actual sends were against the schedule.
    send_lag: Latency,
}

/// Output of `conn-rate`.
#[derive(Debug, Serialize)]
struct ConnRateReport {
    connections: u64,
    seconds: f64,
    connections_per_second: f64,
    /// Time from connect to close of each connection.
    latency: Latency,
}

/// Output of `idle` once every connection is open.
#[derive(Debug, Serialize)]
struct IdleReport {
    ready: usize,
    open_seconds: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = raise_nofile_limit() {
        eprintln!("mesh-load: failed to raise RLIMIT_NOFILE: {err}");
    }
    // Timer slack (50 µs by default) would delay every scheduled send. Threads inherit
    // the value, so setting it here before spawning covers all of them.
    // SAFETY: prctl(2) with PR_SET_TIMERSLACK takes a plain integer and changes only the
    // calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };

    let result = match cli.mode {
        Mode::Serve { listen } => serve(listen),
        Mode::PingPong {
            addr,
            size,
            seconds,
            warmup_seconds,
        } => ping_pong(addr, size, seconds, warmup_seconds).and_then(|r| print_json(&r)),
        Mode::FixedRate {
            addr,
            size,
            rate,
            connections,
            seconds,
            warmup_seconds,
        } => fixed_rate(addr, size, rate, connections, seconds, warmup_seconds)
            .and_then(|r| print_json(&r)),
        Mode::ConnRate {
            addr,
            size,
            concurrency,
            seconds,
            max_connections,
        } => conn_rate(addr, size, concurrency, seconds, max_connections)
            .and_then(|r| print_json(&r)),
        Mode::Idle {
            addr,
            connections,
            hold_seconds,
        } => idle(addr, connections, hold_seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-load: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit of open files to the hard limit: `idle` and `serve` hold one
/// descriptor per connection.
fn raise_nofile_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the plain-data struct that `limit` points to.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit(2) reads the plain-data struct that `limit` points to.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn print_json(report: &impl Serialize) -> anyhow::Result<()> {
    let line = serde_json::to_string(report).context("encoding the report")?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).context("creating a latency histogram")
}

fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    // Values past the histogram's top are saturated, so a stall still counts.
    histogram.saturating_record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("invalid {flag} {value}: expected a non-negative number"))
}

/// Connects with TCP_NODELAY and read and write timeouts of [`GRACE`].
fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, GRACE)
        .with_context(|| format!("failed to connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(GRACE))?;
    stream.set_write_timeout(Some(GRACE))?;
    Ok(stream)
}

/// Sends `request` and reads its echo into `response`.
fn round_trip(stream: &mut TcpStream, request: &[u8], response: &mut [u8]) -> io::Result<()> {
    stream.write_all(request)?;
    stream.read_exact(response)
}

fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("failed to listen on {listen}"))?;
        let local = listener.local_addr().unwrap_or(listen);
        println!("listening {local}");
        io::stdout().flush()?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A client may reset between SYN and accept, and a full descriptor table
                // clears when connections close: neither ends the server.
                Err(err) => {
                    eprintln!("mesh-load: accept on {local} failed: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(echo(stream));
        }
    })
}

/// Echoes until EOF or an error. The client sees an error as a broken request, so the
/// server has nothing to add.
async fn echo(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn ping_pong(
    addr: SocketAddr,
    size: usize,
    recorded_seconds: f64,
    warmup_seconds: f64,
) -> anyhow::Result<PingPongReport> {
    let warmup = seconds(warmup_seconds, "--warmup-seconds")?;
    let recorded = seconds(recorded_seconds, "--seconds")?;
    let mut stream = connect(addr)?;
    let request = vec![b'p'; size];
    let mut response = vec![0u8; size];
    let mut histogram = new_histogram()?;

    let start = Instant::now();
    let record_from = start + warmup;
    let end = record_from + recorded;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        round_trip(&mut stream, &request, &mut response)
            .with_context(|| format!("request to {addr} failed"))?;
        if sent >= record_from {
            record(&mut histogram, sent.elapsed());
        }
    }
    Ok(PingPongReport {
        requests: histogram.len(),
        seconds: recorded.as_secs_f64(),
        latency: Latency::from_histogram(&histogram),
    })
}

/// Histograms of one `fixed-rate` connection.
struct ScheduleResult {
    sent: u64,
    latency: Histogram<u64>,
    send_lag: Histogram<u64>,
    last_response: Option<Instant>,
}

fn fixed_rate(
    addr: SocketAddr,
    size: usize,
    rate: f64,
    connections: usize,
    recorded_seconds: f64,
    warmup_seconds: f64,
) -> anyhow::Result<FixedRateReport> {
    if !(rate.is_finite() && rate > 0.0) || connections == 0 {
        bail!("invalid --rate {rate} or --connections {connections}: both must be positive");
    }
    let warmup = seconds(warmup_seconds, "--warmup-seconds")?;
    let recorded = seconds(recorded_seconds, "--seconds")?;
    // Each connection sends every `interval`; connection i starts i/rate after the
    // first, so the sends of all connections together are evenly spaced at 1/rate.
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let spacing = Duration::from_secs_f64(1.0 / rate);

    let streams = (0..connections)
        .map(|_| connect(addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Start after every thread exists, so the first sends are not late by thread start.
    let start = Instant::now() + Duration::from_millis(50);
    let record_from = start + warmup;
    let end = record_from + recorded;

    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| {
            let first = start + spacing * index as u32;
            thread::spawn(move || {
                run_schedule(stream, size, first, interval, record_from, end)
                    .with_context(|| format!("connection {index} to {addr} failed"))
            })
        })
        .collect();

    let mut latency = new_histogram()?;
    let mut send_lag = new_histogram()?;
    let mut last_response = record_from;
    let mut sent_requests = 0;
    for worker in workers {
        let result = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a fixed-rate worker panicked"))??;
        sent_requests += result.sent;
        latency.add(&result.latency).context("merging histograms")?;
        send_lag
            .add(&result.send_lag)
            .context("merging histograms")?;
        if let Some(at) = result.last_response {
            last_response = last_response.max(at);
        }
    }
    let span = last_response
        .saturating_duration_since(record_from)
        .max(recorded)
        .as_secs_f64();
    Ok(FixedRateReport {
        target_rps: rate,
        achieved_rps: latency.len() as f64 / span,
        requests: latency.len(),
        sent_requests,
        connections,
        latency: Latency::from_histogram(&latency),
        send_lag: Latency::from_histogram(&send_lag),
    })
}

/// Sends on one connection at `first`, `first + interval`, … until `end`. A request
/// whose intended time has passed goes out at once, and its latency still counts from
/// the intended time.
fn run_schedule(
    mut stream: TcpStream,
    size: usize,
    first: Instant,
    interval: Duration,
    record_from: Instant,
    end: Instant,
) -> anyhow::Result<ScheduleResult> {
    let request = vec![b'r'; size];
    let mut response = vec![0u8; size];
    let mut result = ScheduleResult {
        sent: 0,
        latency: new_histogram()?,
        send_lag: new_histogram()?,
        last_response: None,
    };
    let give_up = end + GRACE;
    let mut intended = first;
    while intended < end {
        let now = Instant::now();
        if now > give_up {
            bail!("fell more than {GRACE:?} behind the schedule");
        }
        if intended > now {
            thread::sleep(intended - now);
        }
        let sent_at = Instant::now();
        round_trip(&mut stream, &request, &mut response)?;
        let done = Instant::now();
        result.sent += 1;
        if intended >= record_from {
            record(&mut result.latency, done - intended);
            record(
                &mut result.send_lag,
                sent_at.saturating_duration_since(intended),
            );
            result.last_response = Some(done);
        }
        intended += interval;
    }
    Ok(result)
}

fn conn_rate(
    addr: SocketAddr,
    size: usize,
    concurrency: usize,
    run_seconds: f64,
    max_connections: u64,
) -> anyhow::Result<ConnRateReport> {
    if concurrency == 0 {
        bail!("invalid --concurrency 0: must be at least 1");
    }
    let duration = seconds(run_seconds, "--seconds")?;
    let claimed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;

    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let claimed = Arc::clone(&claimed);
            thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
                let request = vec![b'c'; size];
                let mut response = vec![0u8; size];
                let mut histogram = new_histogram()?;
                while Instant::now() < end
                    && claimed.fetch_add(1, Ordering::Relaxed) < max_connections
                {
                    let began = Instant::now();
                    let mut stream = connect(addr)?;
                    round_trip(&mut stream, &request, &mut response)
                        .with_context(|| format!("request to {addr} failed"))?;
                    drop(stream);
                    record(&mut histogram, began.elapsed());
                }
                Ok(histogram)
            })
        })
        .collect();

    let mut latency = new_histogram()?;
    for worker in workers {
        let histogram = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a conn-rate worker panicked"))??;
        latency.add(&histogram).context("merging histograms")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(ConnRateReport {
        connections: latency.len(),
        seconds: elapsed,
        connections_per_second: latency.len() as f64 / elapsed,
        latency: Latency::from_histogram(&latency),
    })
}

fn idle(addr: SocketAddr, connections: usize, hold_seconds: f64) -> anyhow::Result<()> {
    let hold = seconds(hold_seconds, "--hold-seconds")?;
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let openers: Vec<_> = (0..IDLE_OPENERS.min(connections.max(1)))
        .map(|_| {
            let next = Arc::clone(&next);
            thread::spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                let mut opened = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < connections as u64 {
                    let mut stream = connect(addr)?;
                    // The echo proves that the whole path, proxies included, is open.
                    let mut byte = [0u8; 1];
                    round_trip(&mut stream, b"i", &mut byte)
                        .with_context(|| format!("first byte to {addr} failed"))?;
                    opened.push(stream);
                }
                Ok(opened)
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(connections);
    for opener in openers {
        let opened = opener
            .join()
            .map_err(|_| anyhow::anyhow!("an idle opener panicked"))?
            .with_context(|| format!("opening idle connections to {addr}"))?;
        streams.extend(opened);
    }
    print_json(&IdleReport {
        ready: streams.len(),
        open_seconds: start.elapsed().as_secs_f64(),
    })?;

    // Hold until the harness closes standard input, or until the hold time ends if the
    // harness is gone without closing it.
    thread::spawn(move || {
        thread::sleep(hold);
        eprintln!("mesh-load: held idle connections for {hold:?}; exiting");
        std::process::exit(0);
    });
    let mut rest = Vec::new();
    let _ = io::stdin().read_to_end(&mut rest);
    drop(streams);
    Ok(())
}
