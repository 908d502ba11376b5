//! Support for interceptor's privileged end-to-end tests and for `cargo xtask demo`.
//!
//! - [`Island`]: a closed set of network namespaces (nodes behind one switch, pods
//!   behind each node) with cgroups, built by `scripts/topology.sh` and removed on drop.
//! - [`spawn_in`]: runs a program inside a pod's or node's namespace and cgroup.
//! - [`write_mesh_config`]: writes the daemon's workload directory file for an island.
//! - [`Capture`] and [`pcap`]: tcpdump captures and a reader for what they hold.
//! - [`require_privileges`]: the first line of every privileged test.
//! - [`mesh::Mesh`]: the workload directory, a CA and one daemon per node of an island.
//! - [`setup::start_test_mesh`]: the start of a test, an island with a mesh on it.
//! - [`clients`]: `mesh-peer` clients in pods or nodes, held connections, continuous
//!   traffic and the checks tests make with them.
//! - [`sidecar::SidecarMesh`]: the same with one `interceptor sidecar` per pod, the
//!   benchmark baseline.
//!
//! The `mesh-peer` binary of this crate is the plain TCP client and server that tests
//! run inside pods; [`mesh_peer_payload`] is the data its client sends.

mod capture;
pub mod clients;
pub mod mesh;
mod mesh_config;
pub mod pcap;
mod privileges;
mod process;
pub mod setup;
pub mod sidecar;
mod topology;

pub use capture::Capture;
pub use mesh_config::{write_mesh_config, write_mesh_config_with, DirectoryExtras};
pub use pcap::{contains, tcp_payloads, tls_record_counts, Segment};
pub use privileges::require_privileges;
pub use process::spawn_in;
pub use topology::{cgroup2_mount, Island, IslandSpec, Node, Pod};

/// Returns the first `len` bytes that `mesh-peer client --bytes LEN` sends.
///
/// The data is the lines `mesh-peer 00000000\n`, `mesh-peer 00000001\n` and so on,
/// cut at `len`. It is printable, so a test can search a capture for a line, and
/// every line is numbered, so a shifted or reordered echo does not match.
pub fn mesh_peer_payload(len: usize) -> Vec<u8> {
    let mut payload = Vec::with_capacity(len + MESH_PEER_LINE_LEN);
    let mut line = 0u64;
    while payload.len() < len {
        payload.extend_from_slice(format!("mesh-peer {line:08}\n").as_bytes());
        line += 1;
    }
    payload.truncate(len);
    payload
}

/// Length of one line of [`mesh_peer_payload`] while the line number has 8 digits.
const MESH_PEER_LINE_LEN: usize = 19;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_lines_numbered() {
        let payload = mesh_peer_payload(45);

        assert_eq!(payload, b"mesh-peer 00000000\nmesh-peer 00000001\nmesh-pe");
    }

    #[test]
    fn payload_length_exact() {
        for len in [0, 1, 18, 19, 20, 100_000] {
            assert_eq!(mesh_peer_payload(len).len(), len, "len {len}");
        }
    }
}
