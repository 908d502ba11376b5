//! A running mesh on an [`Island`]: the workload directory, the CA service in the
//! island's CA namespace, one `interceptor run` daemon per node, and helpers that run
//! `mesh-peer` apps inside pods.
//!
//! Daemons run from the root namespace with `--netns <node netns>`, so they keep the
//! machine's mount namespace (cgroup2 and bpffs stay visible) and live in the caller's
//! cgroup, outside every node's cgroup subtree. Each daemon attests its node with a
//! one-time join token at its first start and keeps its node SVID in
//! `<work dir>/<node>-state`. Each daemon's log goes to `<work dir>/<node>.log`, the CA
//! service's to `<work dir>/ca.log`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{spawn_in, write_mesh_config_with, DirectoryExtras, Island, Pod};

/// Trust domain of test and demo meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// How long a daemon, the CA service or a sidecar may take from start to its start
/// line, before [`scaled`] multiplies it.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a `mesh-peer` server may take to print its `listening` line, before
/// [`scaled`] multiplies it.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variable with a whole number from 1 up that multiplies the timeouts and
/// time limits of the tests and of `mesh-peer`; 1 when unset. The kTLS guest stage of
/// `cargo xtask test` sets it, because the emulated CPU of that QEMU guest runs code
/// about 10 times slower than the host.
pub const TIME_SCALE_VAR: &str = "INTERCEPTOR_TIME_SCALE";

/// Reads the time scale from [`TIME_SCALE_VAR`]: 1 when unset, an error naming the
/// variable and its value when that is not a whole number from 1 up.
pub fn time_scale() -> Result<u32, String> {
    let Some(value) = std::env::var_os(TIME_SCALE_VAR) else {
        return Ok(1);
    };
    value
        .to_str()
        .and_then(|text| text.parse().ok())
        .filter(|scale| *scale >= 1)
        .ok_or_else(|| {
            format!("invalid {TIME_SCALE_VAR} {value:?}: expected a whole number from 1 up")
        })
}

/// Multiplies `duration` by the time scale of [`time_scale`].
///
/// # Panics
///
/// When [`TIME_SCALE_VAR`] is set to anything but a whole number from 1 up.
pub fn scaled(duration: Duration) -> Duration {
    duration * time_scale().unwrap_or_else(|message| panic!("{message}"))
}

/// Returns the directory of the workspace's debug binaries; `INTERCEPTOR_TARGET_DIR`
/// overrides it (for example to run release builds).
pub fn target_dir() -> PathBuf {
    std::env::var_os("INTERCEPTOR_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// Path of the `interceptor` binary.
pub fn interceptor_bin() -> PathBuf {
    target_dir().join("interceptor")
}

/// Path of the `mesh-peer` binary.
pub fn mesh_peer_bin() -> PathBuf {
    target_dir().join("mesh-peer")
}

/// Port of the CA service.
pub const CA_PORT: u16 = 15012;

/// A daemon process of one node.
#[derive(Debug)]
struct Daemon {
    child: Child,
}

/// The mesh processes of an island. Dropping it stops the daemons and removes their
/// pinned programs.
#[derive(Debug)]
pub struct Mesh {
    work_dir: PathBuf,
    nodes: Vec<String>,
    node_netns: Vec<PathBuf>,
    daemons: Vec<Option<Daemon>>,
    daemon_args: Vec<String>,
    ca: CaService,
}

/// The CA service process and where it runs.
#[derive(Debug)]
struct CaService {
    netns: PathBuf,
    addr: std::net::SocketAddr,
    child: Option<Child>,
    args: Vec<String>,
}

impl Mesh {
    /// Writes the directory enrolling `enrolled`, creates a CA in `work_dir` and starts
    /// one daemon per node with `daemon_args` added to `interceptor run`. Returns once
    /// every daemon has logged that it started.
    pub fn start(
        island: &Island,
        work_dir: &Path,
        enrolled: &[&Pod],
        daemon_args: &[&str],
    ) -> io::Result<Mesh> {
        Self::start_with(
            island,
            work_dir,
            enrolled,
            &DirectoryExtras::default(),
            daemon_args,
        )
    }

    /// Starts the mesh as [`Mesh::start`] does, with `extras` added to the directory.
    pub fn start_with(
        island: &Island,
        work_dir: &Path,
        enrolled: &[&Pod],
        extras: &DirectoryExtras,
        daemon_args: &[&str],
    ) -> io::Result<Mesh> {
        Self::start_with_ca_args(island, work_dir, enrolled, extras, daemon_args, &[])
    }

    /// Starts the mesh as [`Mesh::start_with`] does, with `ca_args` added to
    /// `interceptor ca serve`.
    pub fn start_with_ca_args(
        island: &Island,
        work_dir: &Path,
        enrolled: &[&Pod],
        extras: &DirectoryExtras,
        daemon_args: &[&str],
        ca_args: &[&str],
    ) -> io::Result<Mesh> {
        prepare_work_dir(island, work_dir, enrolled, extras)?;
        let ca_host = island.ca_host();
        let mut mesh = Mesh {
            work_dir: work_dir.to_owned(),
            nodes: island.nodes().iter().map(|n| n.name.clone()).collect(),
            node_netns: island
                .nodes()
                .iter()
                .map(|n| n.netns_path.clone())
                .collect(),
            daemons: island.nodes().iter().map(|_| None).collect(),
            daemon_args: daemon_args.iter().map(|a| a.to_string()).collect(),
            ca: CaService {
                netns: ca_host.netns_path,
                addr: std::net::SocketAddr::from((ca_host.ip, CA_PORT)),
                child: None,
                args: ca_args.iter().map(|a| a.to_string()).collect(),
            },
        };
        mesh.start_ca()?;
        for index in 0..mesh.nodes.len() {
            let node = mesh.nodes[index].clone();
            let token_path = mesh.token_path(index + 1);
            let token_path = token_path.to_string_lossy();
            mesh.ca_command(&["token", "--node", &node, "--out", &token_path])?;
            mesh.start_daemon(index + 1)?;
        }
        Ok(mesh)
    }

    /// Address of the CA service.
    pub fn ca_addr(&self) -> std::net::SocketAddr {
        self.ca.addr
    }

    /// Directory of the CA (keys, bundle, join tokens).
    pub fn ca_dir(&self) -> PathBuf {
        self.work_dir.join("ca")
    }

    /// Returns the root that daemons trust before their first bundle fetch: the
    /// operator's root when the CA is an intermediate, else the CA's own certificate.
    fn bootstrap_bundle(&self) -> PathBuf {
        let root = self.ca_dir().join("root-cert.pem");
        if root.exists() {
            root
        } else {
            self.ca_dir().join("ca-cert.pem")
        }
    }

    /// Returns the CA service's log so far.
    pub fn ca_log(&self) -> String {
        std::fs::read_to_string(self.work_dir.join("ca.log")).unwrap_or_default()
    }

    /// Path of node `node_index`'s join token file, which its daemon read at its first
    /// start.
    pub fn token_path(&self, node_index: usize) -> PathBuf {
        self.work_dir
            .join(format!("{}.token", self.nodes[node_index - 1]))
    }

    /// Directory of node `node_index`'s node key, node SVID and trust bundle.
    pub fn state_dir(&self, node_index: usize) -> PathBuf {
        self.work_dir
            .join(format!("{}-state", self.nodes[node_index - 1]))
    }

    /// Runs `interceptor ca ARGS --dir <CA dir>` and returns its stdout, or an error
    /// with its stderr when it fails.
    pub fn ca_command(&self, args: &[&str]) -> io::Result<String> {
        let output = Command::new(interceptor_bin())
            .arg("ca")
            .args(args)
            .arg("--dir")
            .arg(self.ca_dir())
            .env("NO_COLOR", "1")
            .output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "interceptor ca {} failed with {}: {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Starts the CA service in the island's CA namespace, appending to its log, and
    /// waits for its "CA service started" line.
    pub fn start_ca(&mut self) -> io::Result<()> {
        let log_path = self.work_dir.join("ca.log");
        let (log, already) = open_log(&log_path, "CA service started")?;
        let mut command = Command::new(interceptor_bin());
        command
            .args(["ca", "serve", "--dir"])
            .arg(self.ca_dir())
            .arg("--config")
            .arg(self.work_dir.join("mesh.toml"))
            .args(["--listen", &self.ca.addr.to_string()])
            .arg("--netns")
            .arg(&self.ca.netns)
            .args(&self.ca.args);
        log_to(&mut command, log)?;
        let child = command.spawn()?;
        let child = wait_for_line(
            child,
            &log_path,
            "CA service started",
            already,
            "CA service",
        )?;
        self.ca.child = Some(child);
        Ok(())
    }

    /// Stops the CA service with SIGTERM and waits for it to exit.
    pub fn stop_ca(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.ca.child.take() {
            terminate(&mut child)?;
        }
        Ok(())
    }

    /// Returns the process ids of the running daemons, for memory and CPU measurements.
    pub fn pids(&self) -> Vec<u32> {
        self.daemons
            .iter()
            .flatten()
            .map(|daemon| daemon.child.id())
            .collect()
    }

    /// Path of the log of node `node_index` (starting at 1).
    pub fn log_path(&self, node_index: usize) -> PathBuf {
        self.work_dir
            .join(format!("{}.log", self.nodes[node_index - 1]))
    }

    /// Returns the log of node `node_index` so far.
    pub fn log(&self, node_index: usize) -> String {
        std::fs::read_to_string(self.log_path(node_index)).unwrap_or_default()
    }

    /// Returns the log of node `node_index` once `until` holds for it, or as it is after
    /// 10 s (scaled). A daemon logs a connection's close event just after the app saw
    /// the end of it, so checks of close events wait here.
    pub fn log_when(&self, node_index: usize, until: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + scaled(Duration::from_secs(10));
        loop {
            let log = self.log(node_index);
            if until(&log) || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon of node `node_index` (starting at 1), appending to its log, and
    /// waits for its "daemon started" line.
    pub fn start_daemon(&mut self, node_index: usize) -> io::Result<()> {
        self.start_daemon_then(node_index, |_| Ok(()))
    }

    /// Starts the daemon of node `node_index` as [`Mesh::start_daemon`] does, but runs
    /// `meanwhile` after spawning it and before waiting for "daemon started", for
    /// example to start the CA service only once the daemon runs.
    pub fn start_daemon_then(
        &mut self,
        node_index: usize,
        meanwhile: impl FnOnce(&mut Mesh) -> io::Result<()>,
    ) -> io::Result<()> {
        let slot = node_index - 1;
        let log_path = self.log_path(node_index);
        let (log, already) = open_log(&log_path, "daemon started")?;
        let mut command = Command::new(interceptor_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(self.work_dir.join("mesh.toml"))
            .args(["--node", &self.nodes[slot]])
            .args(["--ca-addr", &self.ca.addr.to_string()])
            .arg("--ca-trust-bundle")
            .arg(self.bootstrap_bundle())
            .arg("--join-token-file")
            .arg(self.token_path(node_index))
            .arg("--state-dir")
            .arg(self.state_dir(node_index))
            .arg("--netns")
            .arg(&self.node_netns[slot])
            .args(&self.daemon_args);
        log_to(&mut command, log)?;
        let mut child = command.spawn()?;
        if let Err(error) = meanwhile(self) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error);
        }
        let process_name = format!("daemon of {}", self.nodes[slot]);
        let child = wait_for_line(child, &log_path, "daemon started", already, &process_name)?;
        self.daemons[slot] = Some(Daemon { child });
        Ok(())
    }

    /// Stops the daemon of node `node_index` with SIGTERM and waits for it to exit. The
    /// pinned programs stay, as after any daemon exit.
    pub fn stop_daemon(&mut self, node_index: usize) -> io::Result<()> {
        if let Some(mut daemon) = self.daemons[node_index - 1].take() {
            terminate(&mut daemon.child)?;
        }
        Ok(())
    }

    /// Fetches `path` from the admin endpoint of node `node_index` (127.0.0.1:15020 in the
    /// node's namespace) and returns the response body.
    pub fn admin_get(&self, node_index: usize, path: &str) -> io::Result<String> {
        let netns = self.node_netns[node_index - 1].clone();
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        // setns moves only the calling thread, so a short-lived thread enters the node.
        let response = std::thread::spawn(move || -> io::Result<String> {
            use std::io::{Read, Write};
            let file = File::open(&netns)?;
            // SAFETY: `file` is an open namespace file; only this thread moves.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }
                != 0
            {
                return Err(io::Error::last_os_error());
            }
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", 15020))?;
            stream.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .join()
        .map_err(|_| io::Error::other("the admin request thread panicked"))??;
        match response.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => Err(io::Error::other(format!(
                "unexpected admin response: {response}"
            ))),
        }
    }

    /// Kills the daemon of node `node_index` with SIGKILL, as a crash would: the kernel
    /// closes its sockets without a TLS `close_notify`.
    pub fn kill_daemon(&mut self, node_index: usize) -> io::Result<()> {
        if let Some(mut daemon) = self.daemons[node_index - 1].take() {
            daemon.child.kill()?;
            daemon.child.wait()?;
        }
        Ok(())
    }

    /// Starts the daemon of node `node_index` with `extra_args` added to the mesh's
    /// daemon arguments for this start only.
    pub fn restart_daemon_with(
        &mut self,
        node_index: usize,
        extra_args: &[&str],
    ) -> io::Result<()> {
        let saved = self.daemon_args.clone();
        self.daemon_args
            .extend(extra_args.iter().map(|a| a.to_string()));
        let result = self.start_daemon(node_index);
        self.daemon_args = saved;
        result
    }

    /// Runs `interceptor uninstall` for node `node_index`.
    pub fn uninstall(&self, node_index: usize) -> io::Result<Output> {
        Command::new(interceptor_bin())
            .args(["uninstall", "--node", &self.nodes[node_index - 1]])
            .output()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for daemon in self.daemons.iter_mut().filter_map(Option::take) {
            let mut child = daemon.child;
            if let Err(err) = terminate(&mut child) {
                eprintln!("stopping a daemon failed: {err}");
            }
        }
        if let Err(err) = self.stop_ca() {
            eprintln!("stopping the CA service failed: {err}");
        }
        for index in 0..self.nodes.len() {
            if let Err(err) = self.uninstall(index + 1) {
                eprintln!(
                    "interceptor uninstall for {} failed: {err}",
                    self.nodes[index]
                );
            }
        }
    }
}

/// Writes the workload directory enrolling `enrolled` to `<work_dir>/mesh.toml` and
/// creates a CA in `<work_dir>/ca` unless one is there.
pub(crate) fn prepare_work_dir(
    island: &Island,
    work_dir: &Path,
    enrolled: &[&Pod],
    extras: &DirectoryExtras,
) -> io::Result<()> {
    std::fs::create_dir_all(work_dir)?;
    write_mesh_config_with(
        island,
        &work_dir.join("mesh.toml"),
        TRUST_DOMAIN,
        enrolled,
        extras,
    )?;
    let ca_dir = work_dir.join("ca");
    if !ca_dir.join("ca-key.pem").exists() {
        let status = Command::new(interceptor_bin())
            .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--dir"])
            .arg(&ca_dir)
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "interceptor ca init failed with {status}"
            )));
        }
    }
    Ok(())
}

/// Opens the log at `log_path` for appending and returns it with the number of times
/// `line` is in it already, so that a wait for the next start line skips earlier ones.
pub(crate) fn open_log(log_path: &Path, line: &str) -> io::Result<(File, usize)> {
    let log = File::options().create(true).append(true).open(log_path)?;
    let already = std::fs::read_to_string(log_path)?.matches(line).count();
    Ok((log, already))
}

/// Sends the stdout and stderr of `command` to `log`, with the log filter of
/// `INTERCEPTOR_LOG` (default `info`) and without colors.
pub(crate) fn log_to(command: &mut Command, log: File) -> io::Result<()> {
    command
        .env(
            "INTERCEPTOR_LOG",
            std::env::var("INTERCEPTOR_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(())
}

/// Waits until `log_path` contains `line` more than `already` times, or fails with the
/// log's tail when `child` (named `process_name`) exits or the start timeout passes.
pub(crate) fn wait_for_line(
    mut child: Child,
    log_path: &Path,
    line: &str,
    already: usize,
    process_name: &str,
) -> io::Result<Child> {
    let start_timeout = scaled(START_TIMEOUT);
    let deadline = Instant::now() + start_timeout;
    loop {
        let text = std::fs::read_to_string(log_path)?;
        if text.matches(line).count() > already {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!(
                "{process_name} exited with {status} before it started; log:\n{}",
                tail(&text, 40)
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!(
                "{process_name} did not start within {start_timeout:?}; log:\n{}",
                tail(&text, 40)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGTERM, waits up to 5 s, then kills.
pub(crate) fn terminate(child: &mut Child) -> io::Result<()> {
    // SAFETY: kill(2) with a pid this process spawned and has not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait().map(|_| ())
}

/// Returns the last `lines` lines of `text`, for failure messages that show a log.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Returns the command `mesh-peer ARGS` with piped stdout and stderr, ready for
/// [`spawn_in`].
pub(crate) fn mesh_peer_command<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut command = Command::new(mesh_peer_bin());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Starts `mesh-peer ARGS` inside `pod`'s namespace and cgroup, with piped stdout and
/// stderr.
pub fn spawn_peer(island: &Island, pod: &Pod, args: &[&str]) -> io::Result<Child> {
    let mut command = mesh_peer_command(args);
    spawn_in(
        &pod.netns_path,
        Some(&island.cgroup_dir(&pod.cgroup)),
        &mut command,
    )
}

/// Runs `mesh-peer ARGS` inside `pod` to completion and returns its output.
pub fn run_peer(island: &Island, pod: &Pod, args: &[&str]) -> io::Result<Output> {
    spawn_peer(island, pod, args)?.wait_with_output()
}

/// A `mesh-peer` server running in a pod, with its stdout lines collected as they come.
#[derive(Debug)]
pub struct PeerServer {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl PeerServer {
    /// Starts `mesh-peer ARGS` (a server mode) in `pod` and waits for its `listening`
    /// line.
    pub fn start(island: &Island, pod: &Pod, args: &[&str]) -> io::Result<PeerServer> {
        use std::io::BufRead;
        let mut child = spawn_peer(island, pod, args)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("mesh-peer stdout not piped"))?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let collected = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines().map_while(Result::ok) {
                collected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(line);
            }
        });
        let server = PeerServer { child, lines };
        let deadline = Instant::now() + scaled(LISTEN_TIMEOUT);
        while !server.lines().iter().any(|l| l.starts_with("listening ")) {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "mesh-peer {args:?} did not start listening"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Returns the stdout lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Returns the peers of the `accepted PEER` lines so far.
    pub fn accepted(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("accepted ").map(str::to_owned))
            .collect()
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
