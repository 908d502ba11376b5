//! `cargo xtask demo`: two nodes with two pods each on this machine, real traffic
//! through the mesh, and a short account of what the daemons and the wire showed.
//!
//! The demo builds island `demo` (`10.200.0.0/16`, see `scripts/topology.sh`), enrolls
//! every pod, starts one daemon per node with its work files in `target/demo`, and starts
//! three servers. While tcpdump captures two of node 1's interfaces, three clients run:
//! a cross-node echo, a cross-node server-first banner, and a same-node echo.
//!
//! An access-control act follows. Workload `demo-n2-p1` is STRICT and labelled
//! `app=echo`, and the daemons load one DENY policy for the principal of `demo-n1-p2`
//! (service account `p2`) to it. A plaintext client in node `demo-n1`'s own namespace
//! and the mesh client `demo-n1-p2` connect to `demo-n2-p1:8080`. Both must be reset,
//! and node 2's daemon must log a `connection rejected` event for the first and a close
//! event denied by the policy for the second.
//!
//! The demo then reads both daemons' logs and the captures, prints a PASS or FAIL line
//! per check, and fails when any check fails.
//!
//! Everything is removed at the end, after a failure, and on SIGINT, SIGTERM or SIGHUP,
//! unless `--keep` is given.

mod access;
mod close_events;
mod report;
mod traffic;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context as _};
use interceptor_tests::mesh::{interceptor_bin, mesh_peer_bin, Mesh, PeerServer, TRUST_DOMAIN};
use interceptor_tests::{cgroup2_mount, require_privileges, Island, IslandSpec, Pod};

use traffic::exercise;

/// Prefix of every namespace, cgroup and bpffs pin of the demo island.
const PREFIX: &str = "demo";
/// Second octet of the island's `10.K.0.0/16`.
const SUBNET: u8 = 200;
const NODES: usize = 2;
const PODS_PER_NODE: usize = 2;

/// The daemon's tunnel listener port (`interceptor run --tunnel-port`, default).
const TUNNEL_PORT: u16 = 15008;
const ECHO_PORT: u16 = 8080;
const BANNER_PORT: u16 = 8081;
/// Text the banner server sends before it reads anything.
const BANNER: &str = "220 demo-n2-p2 ready";

/// Bytes the cross-node echo client sends (and expects back).
const LARGE_BYTES: usize = 4 << 20;
/// Bytes the other two clients send.
const SMALL_BYTES: usize = 64 << 10;
/// Number of the `mesh_peer_payload` line searched for in the captures. Every client
/// sends it, because it starts below `SMALL_BYTES`.
const MARKER_LINE: usize = 3000;
/// Length of a `mesh_peer_payload` line while its number has 8 digits.
const PAYLOAD_LINE_LEN: usize = 19;
const _: () = assert!(MARKER_LINE * PAYLOAD_LINE_LEN + PAYLOAD_LINE_LEN <= SMALL_BYTES);

/// How long the daemons may take to log the close events after the last client ends.
const CLOSE_EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status after a signal, as shells report an interrupted command.
const INTERRUPTED_EXIT: i32 = 130;

/// Held while a step creates or removes island state. The signal handler takes it
/// before its teardown, so it never runs in the middle of such a step, and keeps it
/// until the process exits, so no step starts after it.
static STATE_LOCK: Mutex<()> = Mutex::new(());

#[derive(clap::Args)]
pub struct Options {
    /// Leave the island, the daemons and the servers running afterwards, and print how
    /// to remove them.
    #[arg(long)]
    pub keep: bool,
    /// Run the demo inside the QEMU guest with Debian's stock kernel, where kernel TLS
    /// carries the tunnels (`scripts/ktls-vm-run.sh`); the build stays on this host.
    #[arg(long, conflicts_with = "keep")]
    pub ktls_guest: bool,
    /// Skip setup and build and run only the demo: what `--ktls-guest` runs inside the
    /// guest, where cargo does not run.
    #[arg(long, hide = true)]
    pub no_build: bool,
}

/// Runs the demo. Needs root.
pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    if !require_privileges("cargo xtask demo") {
        bail!("the demo cannot run on this machine (the reason is printed above)");
    }
    install_signal_handler(root)?;
    let outcome = run_demo(root, options);
    // After a signal the handler holds the lock, tears down and exits. Waiting here
    // keeps this thread from returning an error that would end the process first.
    let _state = lock_state();
    outcome
}

fn run_demo(root: &Path, options: &Options) -> anyhow::Result<()> {
    let work_dir = root.join("target/demo");
    let demo = Demo::start(&work_dir)?;
    let report = exercise(demo.running()?, &work_dir)?;
    print!("{}", report.render());

    if options.keep {
        demo.keep();
        print_keep_hint(root);
    } else {
        demo.teardown()?;
        println!("Removed island {PREFIX}: namespaces, cgroups, daemons and pins.");
    }
    report.result()
}

fn lock_state() -> MutexGuard<'static, ()> {
    STATE_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `step` while holding [`STATE_LOCK`].
fn locked<T>(step: impl FnOnce() -> T) -> T {
    let _state = lock_state();
    step()
}

fn node_name(node_index: usize) -> String {
    format!("{PREFIX}-n{node_index}")
}

fn spiffe_id(pod: &Pod) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{}", pod.short_name)
}

/// The island with its mesh and servers. Fields drop in order: servers stop before the
/// daemons, and the daemons before the namespaces go.
struct Running {
    /// Each server with the name of the pod it runs in.
    servers: Vec<(String, PeerServer)>,
    mesh: Mesh,
    island: Island,
}

impl Running {
    /// Returns the server running in pod `pod_name`.
    fn server(&self, pod_name: &str) -> Option<&PeerServer> {
        self.servers
            .iter()
            .find(|(name, _)| name == pod_name)
            .map(|(_, server)| server)
    }
}

/// Owns [`Running`] and removes it under [`STATE_LOCK`] when dropped.
struct Demo {
    running: Option<Running>,
}

impl Demo {
    /// Builds the island (removing stale state of the prefix first), enrolls every pod,
    /// writes the policy file, starts the daemons and the servers.
    fn start(work_dir: &Path) -> anyhow::Result<Demo> {
        let spec = IslandSpec {
            prefix: PREFIX.to_owned(),
            nodes: NODES,
            pods_per_node: PODS_PER_NODE,
            subnet: SUBNET,
        };
        // Fresh logs and captures, so every close event read later is from this run.
        if work_dir.exists() {
            std::fs::remove_dir_all(work_dir)
                .with_context(|| format!("removing {}", work_dir.display()))?;
        }
        let island = locked(|| Island::up(spec)).context("building island demo")?;
        let enrolled: Vec<&Pod> = island.pods().iter().collect();
        let policies = match access::write_policy_file(work_dir) {
            Ok(path) => path.to_string_lossy().into_owned(),
            Err(err) => {
                locked(|| drop(island));
                return Err(err);
            }
        };
        let extras = access::directory_extras(&island);
        let daemon_args = ["--policies", policies.as_str()];
        let mesh = locked(|| Mesh::start_with(&island, work_dir, &enrolled, &extras, &daemon_args));
        let mesh = match mesh {
            Ok(mesh) => mesh,
            Err(err) => {
                locked(|| drop(island));
                return Err(err).context("starting the daemons");
            }
        };
        let mut demo = Demo {
            running: Some(Running {
                servers: Vec::new(),
                mesh,
                island,
            }),
        };

        let running = demo.running_mut()?;
        for (node, pod, args) in server_specs(&running.island) {
            let pod = running.island.pod(node, pod).clone();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server = locked(|| PeerServer::start(&running.island, &pod, &args))
                .with_context(|| format!("starting mesh-peer {} in {}", args[0], pod.name))?;
            running.servers.push((pod.name, server));
        }
        Ok(demo)
    }

    fn running(&self) -> anyhow::Result<&Running> {
        self.running
            .as_ref()
            .context("the demo island is already removed")
    }

    fn running_mut(&mut self) -> anyhow::Result<&mut Running> {
        self.running
            .as_mut()
            .context("the demo island is already removed")
    }

    /// Leaves everything running when the process exits.
    fn keep(mut self) {
        if let Some(running) = self.running.take() {
            // Forgetting skips the drops that stop the servers and the daemons and
            // remove the island.
            std::mem::forget(running);
        }
    }

    /// Stops the servers and the daemons, uninstalls the pins and removes the island,
    /// then checks that nothing of the prefix is left.
    fn teardown(mut self) -> anyhow::Result<()> {
        let _state = lock_state();
        let Some(Running {
            servers,
            mesh,
            island,
        }) = self.running.take()
        else {
            return Ok(());
        };
        drop(servers);
        drop(mesh);
        island.down().context("removing island demo")?;
        let leftovers = leftovers();
        if !leftovers.is_empty() {
            bail!(
                "removing island demo left {}",
                leftovers
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.running.is_some() {
            let _state = lock_state();
            self.running = None;
        }
    }
}

/// Returns the servers to start as (node, pod, mesh-peer arguments).
fn server_specs(island: &Island) -> Vec<(usize, usize, Vec<String>)> {
    let listen = |node, pod| format!("{}:{}", island.pod(node, pod).ip, ECHO_PORT);
    let banner_listen = format!("{}:{BANNER_PORT}", island.pod(2, 2).ip);
    vec![
        (2, 1, vec!["echo".to_owned(), listen(2, 1)]),
        (
            2,
            2,
            vec!["banner".to_owned(), banner_listen, BANNER.to_owned()],
        ),
        (1, 2, vec!["echo".to_owned(), listen(1, 2)]),
    ]
}

/// Lists what is left of the island: netns files, cgroups and pins with its prefix.
fn leftovers() -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/run/netns"),
        PathBuf::from("/sys/fs/bpf/interceptor"),
    ];
    if let Ok(cgroup2) = cgroup2_mount() {
        dirs.push(cgroup2.join("interceptor"));
    }
    let prefix = format!("{PREFIX}-");
    dirs.iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect()
}

/// Installs the SIGINT, SIGTERM and SIGHUP handler, which removes the island and the
/// daemons' pins and exits with status 130.
fn install_signal_handler(root: &Path) -> anyhow::Result<()> {
    let script = root.join("scripts/topology.sh");
    ctrlc::set_handler(move || {
        // Wait for a step in progress, then keep every other thread from printing
        // or starting another step until the process exits.
        let _state = lock_state();
        let _stdout = std::io::stdout().lock();
        let _stderr = std::io::stderr().lock();
        eprintln!("\ndemo: interrupted, removing island {PREFIX} and the daemons' pins");
        teardown_after_signal(&script);
        std::process::exit(INTERRUPTED_EXIT);
    })
    .context("installing the signal handler")
}

/// Removes the island with `topology.sh down`, which also kills the daemons because
/// they run in the node namespaces, then runs `interceptor uninstall` for each node.
fn teardown_after_signal(script: &Path) {
    let mut down = Command::new("bash");
    down.arg(script).args(["down", "--prefix", PREFIX]);
    report_failure(&mut down);
    for node_index in 1..=NODES {
        let mut uninstall = Command::new(interceptor_bin());
        uninstall.args(["uninstall", "--node", &node_name(node_index)]);
        report_failure(&mut uninstall);
    }
}

/// Runs `command` and prints its stderr when it fails. The teardown goes on either way.
fn report_failure(command: &mut Command) {
    match command.output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "demo: {command:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ),
        Err(err) => eprintln!("demo: starting {command:?} failed: {err}"),
    }
}

fn print_keep_hint(root: &Path) {
    let cgroup2 = cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
    let peer = readable_path(&mesh_peer_bin());
    let interceptor = readable_path(&interceptor_bin());
    let script = root.join("scripts/topology.sh");
    println!("Kept island {PREFIX} with its daemons and servers (logs in target/demo).");
    // `ip netns exec` mounts a fresh /sys, which hides the cgroup2 mount, so the shell
    // joins the pod's cgroup before it enters the pod's namespace.
    println!("Run an enrolled client in pod {PREFIX}-n1-p1:");
    println!(
        "  sh -c 'echo $$ > {}/interceptor/{PREFIX}-n1/p1/cgroup.procs && exec ip netns exec {PREFIX}-n1-p1 {} client 10.{SUBNET}.2.11:{ECHO_PORT} --bytes 1000'",
        cgroup2.display(),
        peer.display()
    );
    println!("Remove it with:");
    println!(
        "  bash {} down --prefix {PREFIX}; {} uninstall --node {PREFIX}-n1; {} uninstall --node {PREFIX}-n2",
        script.display(),
        interceptor.display(),
        interceptor.display()
    );
}

/// Resolves `..` in `path` for printing, leaving it as it is when that fails.
fn readable_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}
