//! Test clients: `mesh-peer` runs from pods or nodes, checks of a server's `accepted`
//! lines, held connections, continuous traffic, polling, and the link-local IPv6
//! address of a pod.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mesh::{mesh_peer_command, run_peer, scaled, spawn_peer, PeerServer, TRUST_DOMAIN};
use crate::{spawn_in, Island, Pod};

/// Where a test client runs.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// Pod (node, pod), in its namespace and cgroup.
    Pod(usize, usize),
    /// The node's own namespace, whose source address towards its pods is the probe
    /// address `10.K.<node>.1`.
    Node(usize),
}

impl Client {
    /// Returns the source address of the client's connections to pods.
    pub fn source_ip(self, island: &Island) -> String {
        match self {
            Self::Pod(node, pod) => island.pod(node, pod).ip.to_string(),
            Self::Node(node) => island.node(node).pod_gateway_ip.to_string(),
        }
    }
}

/// Runs `mesh-peer ARGS` at `client` and returns its stdout line and how long it took.
pub fn run_client(island: &Island, client: Client, args: &[&str]) -> (String, Duration) {
    let started = Instant::now();
    let output = match client {
        Client::Pod(node, pod) => run_peer(island, island.pod(node, pod), args),
        Client::Node(node) => {
            let mut command = mesh_peer_command(args);
            spawn_in(&island.node(node).netns_path, None, &mut command)
                .and_then(|child| child.wait_with_output())
        }
    }
    .expect("running mesh-peer");
    (stdout_line(&output), started.elapsed())
}

/// Returns the stdout of a `mesh-peer` run without surrounding white space: its
/// `result=` line for a client.
pub fn stdout_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Returns the SPIFFE ID that the directory of [`crate::write_mesh_config`] gives
/// `pod`: namespace `default`, service account the pod's short name.
pub fn spiffe_id(pod: &Pod) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{}", pod.short_name)
}

/// Returns how many connections from `ip` the server has printed an `accepted` line
/// for so far.
pub fn accepted_count(server: &PeerServer, ip: &str) -> usize {
    let prefix = format!("{ip}:");
    server
        .accepted()
        .iter()
        .filter(|peer| peer.starts_with(&prefix))
        .count()
}

/// Returns whether `server` printed an `accepted` line for a connection from `ip`,
/// waiting up to 5 s (scaled) for it. The server prints the line before it echoes,
/// but a thread collects its output, so the line can arrive after the client's result.
pub fn accepted_from(server: &PeerServer, ip: &str) -> bool {
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    while accepted_count(server, ip) == 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Returns whether `server` accepted a connection from `ip`, after a pause of 200 ms
/// for output still on its way, so a check that nothing was accepted can fail.
pub fn accepted_so_far(server: &PeerServer, ip: &str) -> bool {
    std::thread::sleep(Duration::from_millis(200));
    accepted_count(server, ip) > 0
}

/// Asserts that the client run of `case` printed `line` for a connection that was
/// reset or refused, and that it took less than 1 s (scaled), so no timeout ended it.
pub fn assert_quick_reset(case: &str, line: &str, took: Duration) {
    assert!(
        line.starts_with("result=reset") || line.starts_with("result=refused"),
        "{case}: expected a reset, got {line:?}"
    );
    assert!(
        took < scaled(Duration::from_secs(1)),
        "{case}: the reset took {took:?}"
    );
}

/// Polls `condition` every 50 ms until it holds, and panics naming `what` after 10 s
/// (scaled).
pub fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `work` on a new thread that has entered the network namespace at `netns`, and
/// returns its result. `setns` moves only the calling thread, so the test's own
/// threads stay where they are.
pub fn in_netns<T: Send + 'static>(netns: PathBuf, work: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let file = File::open(&netns).expect("opening the network namespace");
        // SAFETY: `file` is an open namespace file; only this thread moves.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "entering {}: {}",
            netns.display(),
            io::Error::last_os_error()
        );
        work()
    })
    .join()
    .expect("the thread in the network namespace panicked")
}

/// A `mesh-peer hold` client in a pod, with its `result=` line collected when it
/// comes. Dropping it kills the client.
pub struct HeldConnection {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl HeldConnection {
    /// Starts `mesh-peer hold DST` in `pod`.
    pub fn start(island: &Island, pod: &Pod, dst: &str) -> HeldConnection {
        let mut child = spawn_peer(island, pod, &["hold", dst]).expect("starting mesh-peer hold");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("result=") {
                    collected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line);
                }
            }
        });
        HeldConnection { child, lines }
    }

    /// Returns the `result=` lines so far, which stay empty while the connection is
    /// open.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Continuous traffic from one pod: a thread that runs `mesh-peer ARGS` in the pod,
/// one run after another, until it is stopped, and keeps the output line of each run.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    lines: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    /// Starts running `mesh-peer ARGS` in `pod`, typically a `client` with
    /// `--repeat` or `--for-seconds`.
    pub fn start(island: &Island, pod: &Pod, args: &[&str]) -> Traffic {
        let netns = pod.netns_path.clone();
        let cgroup = island.cgroup_dir(&pod.cgroup);
        let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (stop_flag, collected) = (Arc::clone(&stop), Arc::clone(&lines));
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                let mut command = mesh_peer_command(&args);
                let output = spawn_in(&netns, Some(&cgroup), &mut command)
                    .and_then(|child| child.wait_with_output())
                    .expect("running mesh-peer");
                collected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(stdout_line(&output));
            }
        });
        Traffic {
            stop,
            lines,
            thread: Some(thread),
        }
    }

    /// Returns the output line of every run so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops after the current run and returns the output line of every run.
    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the traffic thread panicked");
        }
        self.lines()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `ip ARGS` in `pod`'s network namespace and returns its stdout.
fn ip_in(pod: &Pod, args: &[&str]) -> String {
    let output = Command::new("ip")
        .args(["netns", "exec", &pod.name, "ip"])
        .args(args)
        .output()
        .expect("running ip");
    assert!(output.status.success(), "ip {args:?} failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Returns the link-local IPv6 address of `pod`'s `eth0` once duplicate address
/// detection has finished with it, waiting up to 10 s (scaled).
pub fn link_local_addr(pod: &Pod) -> Ipv6Addr {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let text = ip_in(
            pod,
            &[
                "-6",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
                "scope",
                "link",
                "-tentative",
            ],
        );
        // "2: eth0    inet6 fe80::1/64 scope link ..."
        let addr = text
            .split_whitespace()
            .skip_while(|word| *word != "inet6")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|addr| addr.parse().ok());
        if let Some(addr) = addr {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no usable link-local address",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Returns the interface index of `pod`'s `eth0`, the scope of link-local addresses
/// dialed from it.
pub fn eth0_index(pod: &Pod) -> u32 {
    let text = ip_in(pod, &["-o", "link", "show", "dev", "eth0"]);
    // "2: eth0@if5: <BROADCAST,..."
    text.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .unwrap_or_else(|| panic!("no interface index of eth0 in {}: {text}", pod.name))
}

impl From<&Pod> for Client {
    fn from(pod: &Pod) -> Client {
        Client::Pod(pod.node_index, pod.index)
    }
}
