//! One island per measured mode, with the mode's proxies and the servers that the
//! workloads run against.
//!
//! Each mode gets its own island (own namespaces, cgroups, pins and iptables rules),
//! built fresh by `scripts/topology.sh up`, which first removes whatever a previous,
//! interrupted bench left under the same prefix.

use std::io::{self, BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use interceptor_tests::mesh::{target_dir, Mesh};
use interceptor_tests::sidecar::SidecarMesh;
use interceptor_tests::{spawn_in, Island, IslandSpec, Pod};
use serde::Serialize;

/// Port of the `mesh-load serve` echo server in each server pod.
pub const ECHO_PORT: u16 = 9000;

/// Port of the `iperf3 -s` server in each server pod.
pub const IPERF_PORT: u16 = 5201;

/// How long a server may take to print that it listens.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the `mesh-load` binary, next to the other binaries the mesh runs.
pub fn mesh_load_bin() -> PathBuf {
    target_dir().join("mesh-load")
}

/// A way of carrying pod traffic, measured on its own island.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No mesh: pods talk plain TCP. Every other mode is compared with it.
    Plain,
    /// One `interceptor sidecar` proxy per pod behind iptables REDIRECT.
    Sidecar,
    /// eBPF connect redirection to the node daemon, TLS in userspace rustls.
    Ambient,
    /// As `Ambient`, with tunnels handed to kernel TLS where the kernel can carry them.
    AmbientKtls,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Plain, Mode::Sidecar, Mode::Ambient, Mode::AmbientKtls];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Sidecar => "sidecar",
            Mode::Ambient => "ambient",
            Mode::AmbientKtls => "ambient-ktls",
        }
    }

    /// Island prefix, distinct from those of the tests and the demo.
    fn prefix(self) -> &'static str {
        match self {
            Mode::Plain => "bplain",
            Mode::Sidecar => "bside",
            Mode::Ambient => "bamb",
            Mode::AmbientKtls => "bktls",
        }
    }

    /// Second octet of the island's `10.K.0.0/16`, distinct from the tests' and demo's.
    fn subnet(self) -> u8 {
        match self {
            Mode::Plain => 241,
            Mode::Sidecar => 242,
            Mode::Ambient => 243,
            Mode::AmbientKtls => 244,
        }
    }
}

/// A client pod and a server pod that workloads run between.
#[derive(Debug, Clone)]
pub struct Pair {
    /// `cross-node` or `same-node`.
    pub name: &'static str,
    pub client: Pod,
    pub server: Pod,
}

/// The proxies of a mode, stopped on drop.
#[derive(Debug)]
enum Proxies {
    None,
    Sidecar(SidecarMesh),
    Ambient(Mesh),
}

/// A running island with a mode's proxies and servers. Fields drop in order: servers,
/// then proxies, then the island's namespaces.
#[derive(Debug)]
pub struct Testbed {
    pub mode: Mode,
    servers: Vec<Server>,
    proxies: Proxies,
    island: Island,
    work_dir: PathBuf,
}

impl Testbed {
    /// Builds a 2-node island with 2 pods per node for `mode`, enrolls every pod, starts
    /// the mode's proxies, and starts an echo and an iperf3 server in each server pod.
    pub fn start(mode: Mode, work_root: &Path) -> anyhow::Result<Testbed> {
        let spec = IslandSpec {
            prefix: mode.prefix().to_owned(),
            nodes: 2,
            pods_per_node: 2,
            subnet: mode.subnet(),
        };
        let island =
            Island::up(spec).with_context(|| format!("building the {} island", mode.name()))?;
        tune_namespaces(&island)?;

        let work_dir = work_root.join(mode.name());
        let _ = std::fs::remove_dir_all(&work_dir);
        let enrolled: Vec<&Pod> = island.pods().iter().collect();
        let proxies = match mode {
            Mode::Plain => Proxies::None,
            // The sidecar and `ambient` keep TLS in userspace rustls like each other.
            Mode::Sidecar => {
                let sidecars =
                    SidecarMesh::start(&island, &work_dir, &enrolled, &["--kernel-tls", "off"])
                        .with_context(|| {
                            format!("starting the sidecars; logs in {}", work_dir.display())
                        })?;
                Proxies::Sidecar(sidecars)
            }
            // NOTE: with `auto` the daemon hands a tunnel to the kernel only for ciphers
            // the kernel carries correctly, and the bench does not check from the daemon
            // logs that kTLS carried its connections.
            Mode::Ambient | Mode::AmbientKtls => {
                let kernel_tls = if mode == Mode::Ambient { "off" } else { "auto" };
                let mesh =
                    Mesh::start(&island, &work_dir, &enrolled, &["--kernel-tls", kernel_tls])
                        .with_context(|| {
                            format!("starting the daemons; logs in {}", work_dir.display())
                        })?;
                Proxies::Ambient(mesh)
            }
        };

        let mut testbed = Testbed {
            mode,
            servers: Vec::new(),
            proxies,
            island,
            work_dir,
        };
        for pair in testbed.pairs() {
            let server = &pair.server;
            let echo = Server::start(
                &testbed.island,
                server,
                Command::new(mesh_load_bin()).args(["serve", &format!("0.0.0.0:{ECHO_PORT}")]),
                "listening ",
            )?;
            // iperf3 buffers stdout when it is a pipe; --forceflush makes the listening
            // line arrive at once.
            let iperf = Server::start(
                &testbed.island,
                server,
                Command::new("iperf3").args(["-s", "--forceflush", "-p", &IPERF_PORT.to_string()]),
                "Server listening",
            )?;
            testbed.servers.extend([echo, iperf]);
        }
        Ok(testbed)
    }

    pub fn island(&self) -> &Island {
        &self.island
    }

    /// Directory of the mode's daemon logs, workload directory and CA.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Returns the process ids of the mode's proxies: nothing for `plain`.
    pub fn mesh_pids(&self) -> Vec<u32> {
        match &self.proxies {
            Proxies::None => Vec::new(),
            Proxies::Sidecar(sidecars) => sidecars.pids(),
            Proxies::Ambient(mesh) => mesh.pids(),
        }
    }

    /// Returns the client pod n1-p1 paired with a server on the other node (n2-p1) and on its own node
    /// (n1-p2).
    pub fn pairs(&self) -> [Pair; 2] {
        let client = self.island.pod(1, 1).clone();
        [
            Pair {
                name: "cross-node",
                client: client.clone(),
                server: self.island.pod(2, 1).clone(),
            },
            Pair {
                name: "same-node",
                client,
                server: self.island.pod(1, 2).clone(),
            },
        ]
    }
}

/// Lets every namespace of the island reuse TIME_WAIT ports for new outgoing
/// connections (`net.ipv4.tcp_tw_reuse=1`, per network namespace), so the
/// connection-rate workload's closed connections do not use up the ephemeral ports
/// before later runs. Every mode's island gets the same setting.
fn tune_namespaces(island: &Island) -> anyhow::Result<()> {
    let namespaces = island
        .nodes()
        .iter()
        .map(|node| &node.netns_path)
        .chain(island.pods().iter().map(|pod| &pod.netns_path));
    for netns in namespaces {
        let mut command = Command::new("sysctl");
        command.args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
        let status = spawn_in(netns, None, &mut command)?.wait()?;
        if !status.success() {
            bail!(
                "sysctl net.ipv4.tcp_tw_reuse=1 in {} failed with {status}",
                netns.display()
            );
        }
    }
    Ok(())
}

/// A server process in a pod, killed on drop.
#[derive(Debug)]
struct Server {
    child: Child,
}

impl Server {
    /// Starts `command` in `pod` and waits until a line of its stdout starts with
    /// `ready_prefix`. Later output is read and dropped so the server never blocks on a
    /// full pipe.
    fn start(
        island: &Island,
        pod: &Pod,
        command: &mut Command,
        ready_prefix: &str,
    ) -> anyhow::Result<Server> {
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = spawn_in(
            &pod.netns_path,
            Some(&island.cgroup_dir(&pod.cgroup)),
            command,
        )?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("server stdout not piped"))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let prefix = ready_prefix.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with(&prefix) {
                    let _ = ready_tx.send(());
                }
            }
        });
        let server = Server { child };
        if ready_rx.recv_timeout(SERVER_START_TIMEOUT).is_err() {
            bail!(
                "{program} in {} did not print {ready_prefix:?} within {SERVER_START_TIMEOUT:?}",
                pod.name
            );
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
