//! `mesh-peer`: a plain TCP client and server that the end-to-end tests run inside pods
//! as the applications whose traffic the mesh carries. It uses only `std::net` sockets
//! and has no code for the mesh, as an application in a real pod would.
//!
//! # Modes
//!
//! ```text
//! mesh-peer echo LISTEN_ADDR
//! mesh-peer banner LISTEN_ADDR TEXT
//! mesh-peer reset LISTEN_ADDR
//! mesh-peer client CONNECT_ADDR --bytes N [--expect-banner TEXT] [--no-half-close] [--repeat K | --for-seconds S]
//! mesh-peer stream CONNECT_ADDR --seconds S
//! mesh-peer connect-only CONNECT_ADDR
//! mesh-peer hold CONNECT_ADDR
//! ```
//!
//! - `echo` accepts connections, one thread each, and writes back every byte it reads.
//!   When the client shuts down its write side, the server shuts down its own, so the
//!   client sees the half-close come back as EOF.
//! - `banner` writes TEXT as soon as it accepts a connection, then echoes as `echo`.
//! - `reset` reads one chunk of a connection and then closes it with a RST
//!   (`SO_LINGER` with a zero timeout).
//! - `client` connects, reads TEXT first when `--expect-banner` is given (sending
//!   nothing before it), writes the first N bytes of
//!   `interceptor_tests::mesh_peer_payload`, shuts down its write side and reads the
//!   echo until EOF. With `--no-half-close` it keeps its write side open and stops
//!   reading after N bytes. Writing and reading run at the same time, so a large N
//!   cannot deadlock on full socket buffers. `--repeat K` runs K such connections one
//!   after another and reports the totals, stopping at the first failure.
//!   `--for-seconds S` instead runs connections one after another until S seconds have
//!   passed (at least one), and adds `connections=C` to the result line.
//! - `stream` keeps one connection open for S seconds and exchanges a 1 KiB chunk with
//!   the echo server every 20 ms, checking each echo. Each round has its own 10 s
//!   deadline.
//! - `connect-only` connects and closes, to check whether a connection is possible.
//! - `hold` connects, then reads and discards until the connection ends, with no
//!   deadline after the connect, to see whether and how an idle open connection is
//!   cut.
//!
//! Every step of `client` and `connect-only` shares one 10 s deadline, multiplied by
//! `INTERCEPTOR_TIME_SCALE` when that is set (see `interceptor_tests::mesh::time_scale`).
//!
//! # Output
//!
//! One line per event on stdout, flushed at once, with space-separated `key=value`
//! fields where the line has fields. An `error=` field is always last and runs to the
//! end of the line.
//!
//! ```text
//! listening ADDR                         servers, once bound (ADDR has the real port)
//! accepted PEER                          servers, per connection, PEER as the server sees it
//! closed PEER echoed=N [error=TEXT]      echo and banner, when a connection ends
//! reset PEER read=N                      reset, after sending the RST
//! result=ok sent=N received=M            client, on success
//! result=KIND sent=N received=M stage=STAGE error=TEXT
//!                                        client, on failure
//! result=ok rounds=R sent=N received=M   stream, on success
//! result=KIND rounds=R sent=N received=M stage=STAGE error=TEXT
//!                                        stream, on failure
//! result=connected local=ADDR peer=ADDR  connect-only, on success
//! result=KIND stage=connect error=TEXT   connect-only, on failure
//! connected local=ADDR                   hold, once connected
//! result=eof read=N                      hold, when the server closed the connection
//! result=KIND read=N stage=read error=TEXT
//!                                        hold, when reading failed
//! ```
//!
//! `sent` counts the bytes the kernel accepted for sending and `received` the echo bytes
//! read (a banner is not counted). STAGE is `connect`, `banner`, `write` or `read`.
//! Usage and bind errors go to stderr.
//!
//! # Exit codes
//!
//! | code | KIND        | meaning                                                  |
//! |------|-------------|----------------------------------------------------------|
//! | 0    | ok          | echo matched, or `connect-only` connected                 |
//! | 1    |             | a server could not bind or accept                        |
//! | 2    |             | invalid command line                                      |
//! | 10   | refused     | connection refused (RST in reply to the SYN)             |
//! | 11   | unreachable | network or host unreachable                              |
//! | 12   | reset       | connection reset, aborted, or broken pipe after connect  |
//! | 13   | timeout     | the deadline passed                                      |
//! | 14   | mismatch    | banner or echo bytes differ from what was expected       |
//! | 15   | eof-early   | EOF before the whole banner or echo arrived              |
//! | 16   | error       | any other socket error                                   |

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use interceptor_tests::mesh::{scaled, time_scale};
use interceptor_tests::mesh_peer_payload;

/// Deadline for every step of `client` and `connect-only` together, before
/// [`client_timeout`] scales it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of each read and write.
const CHUNK_LEN: usize = 64 * 1024;

const EXIT_SERVER_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

const USAGE: &str = "\
usage: mesh-peer echo LISTEN_ADDR
       mesh-peer banner LISTEN_ADDR TEXT
       mesh-peer reset LISTEN_ADDR
       mesh-peer client CONNECT_ADDR --bytes N [--expect-banner TEXT] [--no-half-close] [--repeat K | --for-seconds S]
       mesh-peer stream CONNECT_ADDR --seconds S
       mesh-peer connect-only CONNECT_ADDR
       mesh-peer hold CONNECT_ADDR
ADDR is IP:PORT, for example 10.9.2.11:8080";

/// Why a client run failed; each kind has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    Refused,
    Unreachable,
    Reset,
    Timeout,
    Mismatch,
    EofEarly,
    Error,
}

impl FailureKind {
    fn from_io(err: &io::Error) -> FailureKind {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => {
                FailureKind::Unreachable
            }
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            // A socket timeout shows as EAGAIN (WouldBlock) on Linux.
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureKind::Timeout,
            _ => FailureKind::Error,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::Mismatch => "mismatch",
            FailureKind::EofEarly => "eof-early",
            FailureKind::Error => "error",
        }
    }

    fn exit_code(self) -> u8 {
        match self {
            FailureKind::Refused => 10,
            FailureKind::Unreachable => 11,
            FailureKind::Reset => 12,
            FailureKind::Timeout => 13,
            FailureKind::Mismatch => 14,
            FailureKind::EofEarly => 15,
            FailureKind::Error => 16,
        }
    }
}

/// A failed client step, printed as `result=KIND ... stage=STAGE error=TEXT`.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    stage: &'static str,
    error: String,
}

impl Failure {
    fn io(stage: &'static str, err: &io::Error) -> Failure {
        let kind = FailureKind::from_io(err);
        // EAGAIN from a socket timeout would print as "Resource temporarily unavailable".
        let error = if kind == FailureKind::Timeout {
            format!("no progress before the {:?} deadline", client_timeout())
        } else {
            err.to_string()
        };
        Failure { kind, stage, error }
    }
}

/// Bytes moved by a client run so far, reported on success and on failure.
#[derive(Debug, Default)]
struct Progress {
    sent: usize,
    received: Vec<u8>,
}

/// What the server does with each accepted connection.
#[derive(Debug, Clone)]
enum ServerMode {
    Echo { banner: Option<String> },
    Reset,
}

#[derive(Debug)]
struct ClientOptions {
    addr: SocketAddr,
    bytes: usize,
    expect_banner: Option<String>,
    half_close: bool,
    /// Connections to make one after another, each with the whole exchange.
    repeat: usize,
    /// Time during which to make connections one after another, instead of `repeat`.
    for_duration: Option<Duration>,
}

/// Bytes per round of `stream`.
const STREAM_CHUNK_LEN: usize = 1024;
/// Pause between rounds of `stream`.
const STREAM_INTERVAL: Duration = Duration::from_millis(20);

fn main() -> ExitCode {
    // Checked once here, so that `client_timeout` cannot fail later.
    if let Err(message) = time_scale() {
        eprintln!("mesh-peer: {message}");
        return ExitCode::from(EXIT_USAGE);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["echo", addr] => {
            parse_addr(addr).map(|addr| serve(addr, ServerMode::Echo { banner: None }))
        }
        ["banner", addr, text] => parse_addr(addr).map(|addr| {
            serve(
                addr,
                ServerMode::Echo {
                    banner: Some((*text).to_owned()),
                },
            )
        }),
        ["reset", addr] => parse_addr(addr).map(|addr| serve(addr, ServerMode::Reset)),
        ["client", addr, options @ ..] => parse_client(addr, options).map(run_client),
        ["connect-only", addr] => parse_addr(addr).map(connect_only),
        ["hold", addr] => parse_addr(addr).map(hold),
        ["stream", addr, "--seconds", seconds] => parse_addr(addr).and_then(|addr| {
            let seconds: u64 = seconds
                .parse()
                .map_err(|_| format!("invalid --seconds {seconds:?}: expected a whole number"))?;
            Ok(stream(addr, Duration::from_secs(seconds)))
        }),
        _ => Err("unknown mode or wrong number of arguments".to_owned()),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("mesh-peer: {message}\n{USAGE}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid address {text:?}: expected IP:PORT"))
}

fn parse_client(addr: &str, options: &[&str]) -> Result<ClientOptions, String> {
    let mut parsed = ClientOptions {
        addr: parse_addr(addr)?,
        bytes: 0,
        expect_banner: None,
        half_close: true,
        repeat: 1,
        for_duration: None,
    };
    let mut bytes = None;
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        match *option {
            "--bytes" => {
                let value = rest.next().ok_or("--bytes needs a value")?;
                let count = value
                    .parse()
                    .map_err(|_| format!("invalid --bytes {value:?}: expected a byte count"))?;
                bytes = Some(count);
            }
            "--expect-banner" => {
                let value = rest.next().ok_or("--expect-banner needs a value")?;
                parsed.expect_banner = Some((*value).to_owned());
            }
            "--no-half-close" => parsed.half_close = false,
            "--repeat" => {
                let value = rest.next().ok_or("--repeat needs a value")?;
                parsed.repeat = value
                    .parse()
                    .map_err(|_| format!("invalid --repeat {value:?}: expected a count"))?;
            }
            "--for-seconds" => {
                let value = rest.next().ok_or("--for-seconds needs a value")?;
                let seconds: u64 = value.parse().map_err(|_| {
                    format!("invalid --for-seconds {value:?}: expected a whole number")
                })?;
                parsed.for_duration = Some(Duration::from_secs(seconds));
            }
            other => return Err(format!("unknown client option {other:?}")),
        }
    }
    parsed.bytes = bytes.ok_or("client needs --bytes N")?;
    Ok(parsed)
}

/// Prints one output line and flushes it, so a test reading the pipe sees it at once.
fn emit(line: &str) {
    let mut stdout = io::stdout().lock();
    // A test that closed the pipe no longer reads the output, so errors are moot.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn serve(addr: SocketAddr, mode: ServerMode) -> ExitCode {
    let listener = match TcpListener::bind(addr) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("mesh-peer: failed to listen on {addr}: {err}");
            return ExitCode::from(EXIT_SERVER_FAILED);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    emit(&format!("listening {local}"));

    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            // The client may reset between SYN and accept; that concerns no one else.
            Err(err) if err.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(err) => {
                eprintln!("mesh-peer: failed to accept on {local}: {err}");
                return ExitCode::from(EXIT_SERVER_FAILED);
            }
        };
        emit(&format!("accepted {peer}"));
        let mode = mode.clone();
        thread::spawn(move || match mode {
            ServerMode::Echo { banner } => echo(stream, peer, banner.as_deref()),
            ServerMode::Reset => reset(stream, peer),
        });
    }
}

fn echo(mut stream: TcpStream, peer: SocketAddr, banner: Option<&str>) {
    let mut echoed = 0usize;
    let result = (|| -> io::Result<()> {
        if let Some(banner) = banner {
            stream.write_all(banner.as_bytes())?;
        }
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                // Pass the client's half-close back: the client reads EOF after the echo.
                return stream.shutdown(Shutdown::Write);
            }
            stream.write_all(&buf[..n])?;
            echoed += n;
        }
    })();
    match result {
        Ok(()) => emit(&format!("closed {peer} echoed={echoed}")),
        Err(err) => emit(&format!("closed {peer} echoed={echoed} error={err}")),
    }
}

fn reset(mut stream: TcpStream, peer: SocketAddr) {
    let mut buf = vec![0u8; CHUNK_LEN];
    let read = stream.read(&mut buf).unwrap_or(0);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid `struct linger` that outlives the call, and its size is
    // passed with it; the descriptor belongs to `stream`, which is open.
    let status = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if status != 0 {
        let err = io::Error::last_os_error();
        eprintln!("mesh-peer: failed to set SO_LINGER for {peer}: {err}");
    }
    // Closing with a zero linger timeout sends a RST instead of a FIN.
    drop(stream);
    emit(&format!("reset {peer} read={read}"));
}

fn run_client(options: ClientOptions) -> ExitCode {
    let payload = mesh_peer_payload(options.bytes);
    let (mut sent, mut got) = (0, 0);
    let mut result = Ok(());
    let started = Instant::now();
    let mut connections = 0;
    loop {
        let done = match options.for_duration {
            Some(duration) => connections > 0 && started.elapsed() >= duration,
            None => connections >= options.repeat,
        };
        if done {
            break;
        }
        connections += 1;
        let mut progress = Progress::default();
        result = exchange(&options, &payload, &mut progress);
        sent += progress.sent;
        got += progress.received.len();
        if result.is_err() {
            break;
        }
    }
    let counted = if options.for_duration.is_some() {
        format!(" connections={connections}")
    } else {
        String::new()
    };
    match result {
        Ok(()) => {
            emit(&format!("result=ok sent={sent} received={got}{counted}"));
            ExitCode::SUCCESS
        }
        Err(failure) => {
            emit(&format!(
                "result={} sent={sent} received={got}{counted} stage={} error={}",
                failure.kind.name(),
                failure.stage,
                failure.error
            ));
            ExitCode::from(failure.kind.exit_code())
        }
    }
}

/// Runs one client connection, recording in `progress` what it sent and received.
fn exchange(
    options: &ClientOptions,
    payload: &[u8],
    progress: &mut Progress,
) -> Result<(), Failure> {
    let deadline = Instant::now() + client_timeout();
    let stream = TcpStream::connect_timeout(&options.addr, remaining(deadline))
        .map_err(|err| Failure::io("connect", &err))?;

    if let Some(banner) = &options.expect_banner {
        let got = read_exact_until(&stream, banner.len(), deadline)
            .map_err(|err| Failure::io("banner", &err))?;
        if got.len() < banner.len() {
            return Err(Failure {
                kind: FailureKind::EofEarly,
                stage: "banner",
                error: format!("EOF after {} of {} banner bytes", got.len(), banner.len()),
            });
        }
        if got != banner.as_bytes() {
            return Err(Failure {
                kind: FailureKind::Mismatch,
                stage: "banner",
                error: format!(
                    "expected banner {banner:?}, got {:?}",
                    String::from_utf8_lossy(&got)
                ),
            });
        }
    }

    // Read on a second thread while writing, so that neither side blocks on a full
    // socket buffer when the payload is larger than the buffers.
    let reader_stream = stream
        .try_clone()
        .map_err(|err| Failure::io("connect", &err))?;
    let read_len = if options.half_close {
        None
    } else {
        Some(payload.len())
    };
    let reader = thread::spawn(move || {
        let mut echoed = Vec::new();
        let result = read_echo(&reader_stream, &mut echoed, read_len, deadline);
        (echoed, result)
    });

    let write_result = write_payload(
        &stream,
        payload,
        &mut progress.sent,
        deadline,
        options.half_close,
    );
    if write_result.is_err() {
        // Wake the reader now rather than at the deadline.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let (echoed, read_result) = reader.join().map_err(|_| Failure {
        kind: FailureKind::Error,
        stage: "read",
        error: "reader thread panicked".to_owned(),
    })?;
    progress.received = echoed;
    // The reader and the writer share the socket, and a reset's ECONNRESET is reported
    // to only one of them. When the reader took it, the writer gets another error
    // (ENOTCONN on Linux 6.18), so the reader's reset names the cause.
    if let (Err(_), Err(read_error)) = (&write_result, &read_result) {
        if FailureKind::from_io(read_error) == FailureKind::Reset {
            return Err(Failure::io("read", read_error));
        }
    }
    write_result.map_err(|err| Failure::io("write", &err))?;
    read_result.map_err(|err| Failure::io("read", &err))?;

    compare_echo(payload, &progress.received)
}

/// Writes `payload`, counting the bytes the kernel accepted in `sent`, then shuts down
/// the write side when `half_close` is set.
fn write_payload(
    mut stream: &TcpStream,
    payload: &[u8],
    sent: &mut usize,
    deadline: Instant,
    half_close: bool,
) -> io::Result<()> {
    while *sent < payload.len() {
        stream.set_write_timeout(Some(remaining_or_timeout(deadline)?))?;
        let end = payload.len().min(*sent + CHUNK_LEN);
        match stream.write(&payload[*sent..end]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => *sent += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    if half_close {
        stream.shutdown(Shutdown::Write)?;
    }
    Ok(())
}

/// Reads into `echoed` until EOF, or until `limit` bytes when one is given.
fn read_echo(
    mut stream: &TcpStream,
    echoed: &mut Vec<u8>,
    limit: Option<usize>,
    deadline: Instant,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        let want = match limit {
            Some(limit) if echoed.len() >= limit => return Ok(()),
            Some(limit) => (limit - echoed.len()).min(CHUNK_LEN),
            None => CHUNK_LEN,
        };
        stream.set_read_timeout(Some(remaining_or_timeout(deadline)?))?;
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Ok(());
        }
        echoed.extend_from_slice(&buf[..n]);
    }
}

/// Reads up to `len` bytes, fewer only at EOF.
fn read_exact_until(stream: &TcpStream, len: usize, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut got = Vec::with_capacity(len);
    read_echo(stream, &mut got, Some(len), deadline)?;
    Ok(got)
}

fn compare_echo(payload: &[u8], received: &[u8]) -> Result<(), Failure> {
    if let Some(offset) = payload
        .iter()
        .zip(received)
        .position(|(sent, got)| sent != got)
    {
        return Err(Failure {
            kind: FailureKind::Mismatch,
            stage: "read",
            error: format!("echo differs from the sent bytes at offset {offset}"),
        });
    }
    if received.len() > payload.len() {
        return Err(Failure {
            kind: FailureKind::Mismatch,
            stage: "read",
            error: format!(
                "echo has {} bytes more than were sent",
                received.len() - payload.len()
            ),
        });
    }
    if received.len() < payload.len() {
        return Err(Failure {
            kind: FailureKind::EofEarly,
            stage: "read",
            error: format!(
                "EOF after {} of {} echo bytes",
                received.len(),
                payload.len()
            ),
        });
    }
    Ok(())
}

/// Runs `stream`: one connection, a checked echo round every [`STREAM_INTERVAL`] until
/// `duration` has passed.
fn stream(addr: SocketAddr, duration: Duration) -> ExitCode {
    let payload = mesh_peer_payload(STREAM_CHUNK_LEN);
    let started = Instant::now();
    let (mut rounds, mut sent, mut received) = (0u64, 0usize, 0usize);
    let result = (|| -> Result<(), Failure> {
        let mut stream = TcpStream::connect_timeout(&addr, client_timeout())
            .map_err(|err| Failure::io("connect", &err))?;
        while started.elapsed() < duration {
            let deadline = Instant::now() + client_timeout();
            stream
                .set_write_timeout(Some(client_timeout()))
                .and_then(|()| stream.write_all(&payload))
                .map_err(|err| Failure::io("write", &err))?;
            sent += payload.len();
            let echo = read_exact_until(&stream, payload.len(), deadline)
                .map_err(|err| Failure::io("read", &err))?;
            received += echo.len();
            compare_echo(&payload, &echo)?;
            rounds += 1;
            thread::sleep(STREAM_INTERVAL);
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            emit(&format!(
                "result=ok rounds={rounds} sent={sent} received={received}"
            ));
            ExitCode::SUCCESS
        }
        Err(failure) => {
            emit(&format!(
                "result={} rounds={rounds} sent={sent} received={received} stage={} error={}",
                failure.kind.name(),
                failure.stage,
                failure.error
            ));
            ExitCode::from(failure.kind.exit_code())
        }
    }
}

fn connect_only(addr: SocketAddr) -> ExitCode {
    match TcpStream::connect_timeout(&addr, client_timeout()) {
        Ok(stream) => {
            let local = stream
                .local_addr()
                .map_or_else(|_| "unknown".to_owned(), |local| local.to_string());
            emit(&format!("result=connected local={local} peer={addr}"));
            ExitCode::SUCCESS
        }
        Err(err) => {
            let kind = FailureKind::from_io(&err);
            emit(&format!("result={} stage=connect error={err}", kind.name()));
            ExitCode::from(kind.exit_code())
        }
    }
}

fn hold(addr: SocketAddr) -> ExitCode {
    let mut stream = match TcpStream::connect_timeout(&addr, client_timeout()) {
        Ok(stream) => stream,
        Err(err) => {
            let kind = FailureKind::from_io(&err);
            emit(&format!("result={} stage=connect error={err}", kind.name()));
            return ExitCode::from(kind.exit_code());
        }
    };
    let local = stream
        .local_addr()
        .map_or_else(|_| "unknown".to_owned(), |local| local.to_string());
    emit(&format!("connected local={local}"));
    let mut read = 0usize;
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                emit(&format!("result=eof read={read}"));
                return ExitCode::SUCCESS;
            }
            Ok(n) => read += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                let kind = FailureKind::from_io(&err);
                emit(&format!(
                    "result={} read={read} stage=read error={err}",
                    kind.name()
                ));
                return ExitCode::from(kind.exit_code());
            }
        }
    }
}

/// Returns [`CLIENT_TIMEOUT`] multiplied by the tests' time scale, which `main` has
/// checked.
fn client_timeout() -> Duration {
    scaled(CLIENT_TIMEOUT)
}

/// Time left until `deadline`; zero once it has passed.
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Time left until `deadline`, or a timeout error once it has passed: socket timeouts
/// must not be zero.
fn remaining_or_timeout(deadline: Instant) -> io::Result<Duration> {
    let left = remaining(deadline);
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client deadline passed",
        ));
    }
    Ok(left)
}
