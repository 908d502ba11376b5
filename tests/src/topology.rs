//! The closed-island topology: names and addresses of nodes and pods, and the RAII
//! [`Island`] that builds it with `scripts/topology.sh` and removes it on drop.
//!
//! The names and addresses computed here must match the layout documented at the top of
//! `scripts/topology.sh`.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Path of the script that builds and removes islands.
const TOPOLOGY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/topology.sh");

/// Directory where `ip netns add` bind-mounts named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Cgroup directory, relative to the cgroup2 mount, that contains every island's cgroups.
const CGROUP_PARENT: &str = "interceptor";

/// Maximum number of nodes that the script accepts. One digit keeps interface and
/// cgroup names short and the address plan unambiguous.
const MAX_NODES: usize = 9;

/// Maximum number of pods per node that the script accepts, for the same reason.
const MAX_PODS_PER_NODE: usize = 9;

/// Maximum prefix length, which keeps `P-n<i>-p<j>` well under the 255-byte limit of a
/// namespace name.
const MAX_PREFIX_LEN: usize = 8;

/// Last octet of the CA service's address `10.K.0.100`, above every node's.
const CA_HOST_OCTET: u8 = 100;

/// Finds the mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo`.
///
/// It is `/sys/fs/cgroup` on most machines but `/sys/fs/cgroup/unified` on hybrid
/// cgroup v1/v2 hosts, so it is never hard-coded.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    parse_cgroup2_mount(&mountinfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount in /proc/self/mountinfo",
        )
    })
}

/// Returns the first cgroup2 mount point listed in mountinfo text (proc(5) format).
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        // Optional fields of variable count sit between field 6 and the " - " separator,
        // so split there: the filesystem type is the first field after it.
        let Some((mount_fields, fs_fields)) = line.split_once(" - ") else {
            continue;
        };
        if fs_fields.split(' ').next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = mount_fields.split(' ').nth(4) {
            return Some(PathBuf::from(unescape_mountinfo(mount_point)));
        }
    }
    None
}

/// Decodes the octal escapes (`\040` for a space) that mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|digits| {
            bytes[i] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, digit| acc * 8 + u32::from(digit - b'0'));
                decoded.push(value as u8);
                i += 4;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Shape of an island: what `scripts/topology.sh up` is called with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IslandSpec {
    /// Names every namespace, cgroup and pin of the island: 1 to 8 of `a-z0-9`, unique
    /// per test so that tests can run in parallel.
    pub prefix: String,
    /// Number of nodes, 1 to 9.
    pub nodes: usize,
    /// Number of pods on each node, 1 to 9.
    pub pods_per_node: usize,
    /// Second octet of the island's `10.K.0.0/16`, 1 to 254, unique per test.
    pub subnet: u8,
}

impl IslandSpec {
    /// Checks the same limits as the script, so a bad spec fails before any command runs.
    pub fn validate(&self) -> io::Result<()> {
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= MAX_PREFIX_LEN
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(invalid_input(format!(
                "invalid island prefix {:?}: expected 1 to {MAX_PREFIX_LEN} characters from a-z and 0-9",
                self.prefix
            )));
        }
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(invalid_input(format!(
                "invalid node count {}: expected 1 to {MAX_NODES}",
                self.nodes
            )));
        }
        if !(1..=MAX_PODS_PER_NODE).contains(&self.pods_per_node) {
            return Err(invalid_input(format!(
                "invalid pod count per node {}: expected 1 to {MAX_PODS_PER_NODE}",
                self.pods_per_node
            )));
        }
        if !(1..=254).contains(&self.subnet) {
            return Err(invalid_input(format!(
                "invalid subnet octet {}: expected 1 to 254",
                self.subnet
            )));
        }
        Ok(())
    }

    /// Computes every node of the island, in index order. Call only on a valid spec.
    pub(crate) fn nodes(&self) -> Vec<Node> {
        (1..=self.nodes).map(|index| self.node(index)).collect()
    }

    /// Computes every pod of the island, ordered by node index and then pod index. Call
    /// only on a valid spec.
    pub(crate) fn pods(&self) -> Vec<Pod> {
        (1..=self.nodes)
            .flat_map(|node| (1..=self.pods_per_node).map(move |pod| (node, pod)))
            .map(|(node, pod)| self.pod(node, pod))
            .collect()
    }

    fn node(&self, index: usize) -> Node {
        let name = format!("{}-n{index}", self.prefix);
        // Validation keeps the index at 9 or less, so it fits an address octet.
        let octet = index as u8;
        Node {
            netns_path: Path::new(NETNS_DIR).join(&name),
            cgroup: Path::new(CGROUP_PARENT).join(&name),
            wire_ip: Ipv4Addr::new(10, self.subnet, 0, octet),
            pod_gateway_ip: Ipv4Addr::new(10, self.subnet, octet, 1),
            index,
            name,
        }
    }

    /// Computes the CA host of the island. Call only on a valid spec.
    pub(crate) fn ca_host(&self) -> CaHost {
        let name = format!("{}-ca", self.prefix);
        CaHost {
            netns_path: Path::new(NETNS_DIR).join(&name),
            ip: Ipv4Addr::new(10, self.subnet, 0, CA_HOST_OCTET),
            name,
        }
    }

    fn pod(&self, node_index: usize, index: usize) -> Pod {
        let node = format!("{}-n{node_index}", self.prefix);
        let short_name = format!("p{index}");
        let name = format!("{node}-{short_name}");
        Pod {
            netns_path: Path::new(NETNS_DIR).join(&name),
            cgroup: Path::new(CGROUP_PARENT).join(&node).join(&short_name),
            // Validation keeps both indexes at 9 or less, so they fit address octets.
            ip: Ipv4Addr::new(10, self.subnet, node_index as u8, 10 + index as u8),
            name,
            short_name,
            node,
            node_index,
            index,
        }
    }
}

/// A node of an island: a network namespace on the switch with a cgroup for its daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `P-n<i>`: the netns name, also the node name in the mesh config.
    pub name: String,
    /// Node number, starting at 1.
    pub index: usize,
    /// Bind mount of the node's netns, `/run/netns/P-n<i>`.
    pub netns_path: PathBuf,
    /// The node's cgroup relative to the cgroup2 mount, `interceptor/P-n<i>`.
    pub cgroup: PathBuf,
    /// Address of the node's `wire` interface on the switch, `10.K.0.<i>`.
    pub wire_ip: Ipv4Addr,
    /// Address of the node's `pods` bridge and the pods' gateway, `10.K.<i>.1`.
    pub pod_gateway_ip: Ipv4Addr,
}

/// The host of the CA service: a network namespace on the switch, reached by every node
/// on the switch's subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaHost {
    /// `P-ca`: the netns name.
    pub name: String,
    /// Bind mount of the netns, `/run/netns/P-ca`.
    pub netns_path: PathBuf,
    /// Address of its `wire` interface on the switch, `10.K.0.100`.
    pub ip: Ipv4Addr,
}

/// A pod of an island: a network namespace behind its node with its own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// `P-n<i>-p<j>`: the netns name, also the workload name in the mesh config.
    pub name: String,
    /// `p<j>`: the name within its node, also the pod's service account.
    pub short_name: String,
    /// Name of the node the pod runs on, `P-n<i>`.
    pub node: String,
    /// Index of that node, starting at 1.
    pub node_index: usize,
    /// Pod number on its node, starting at 1.
    pub index: usize,
    /// Bind mount of the pod's netns, `/run/netns/P-n<i>-p<j>`.
    pub netns_path: PathBuf,
    /// The pod's cgroup relative to the cgroup2 mount, `interceptor/P-n<i>/p<j>`.
    pub cgroup: PathBuf,
    /// Address of the pod's `eth0`, `10.K.<i>.<10+j>`.
    pub ip: Ipv4Addr,
}

/// A running island, removed with `scripts/topology.sh down` when dropped.
#[derive(Debug)]
pub struct Island {
    spec: IslandSpec,
    cgroup2_mount: PathBuf,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Set once `down` has run, so drop does not run it again.
    removed: bool,
}

impl Island {
    /// Builds the island with `scripts/topology.sh up`, first removing any stale island of
    /// the same prefix. Needs root.
    pub fn up(spec: IslandSpec) -> io::Result<Island> {
        spec.validate()?;
        let cgroup2_mount = cgroup2_mount()?;
        run_script(&[
            "up",
            "--prefix",
            &spec.prefix,
            "--nodes",
            &spec.nodes.to_string(),
            "--pods",
            &spec.pods_per_node.to_string(),
            "--subnet",
            &spec.subnet.to_string(),
        ])?;
        Ok(Island {
            nodes: spec.nodes(),
            pods: spec.pods(),
            spec,
            cgroup2_mount,
            removed: false,
        })
    }

    /// Removes the island now and reports a failure, which drop can only print.
    pub fn down(mut self) -> io::Result<()> {
        self.removed = true;
        run_script(&["down", "--prefix", &self.spec.prefix])
    }

    pub fn spec(&self) -> &IslandSpec {
        &self.spec
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Returns the host of the CA service.
    pub fn ca_host(&self) -> CaHost {
        self.spec.ca_host()
    }

    /// Returns node `node_index`, starting at 1.
    ///
    /// # Panics
    ///
    /// If the island has no such node, like slice indexing out of bounds.
    pub fn node(&self, node_index: usize) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.index == node_index)
            .unwrap_or_else(|| panic!("island {} has no node {node_index}", self.spec.prefix))
    }

    /// Returns pod `pod_index` of node `node_index`, both starting at 1.
    ///
    /// # Panics
    ///
    /// If the island has no such pod, like slice indexing out of bounds.
    pub fn pod(&self, node_index: usize, pod_index: usize) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.node_index == node_index && pod.index == pod_index)
            .unwrap_or_else(|| {
                panic!(
                    "island {} has no pod {pod_index} on node {node_index}",
                    self.spec.prefix
                )
            })
    }

    /// Mount point of the cgroup v2 hierarchy the island's cgroups live in.
    pub fn cgroup2_mount(&self) -> &Path {
        &self.cgroup2_mount
    }

    /// Turns a cgroup path relative to the cgroup2 mount (as in [`Node::cgroup`]) into
    /// the absolute directory that [`crate::spawn_in`] takes.
    pub fn cgroup_dir(&self, relative: &Path) -> PathBuf {
        self.cgroup2_mount.join(relative)
    }
}

impl Drop for Island {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(err) = run_script(&["down", "--prefix", &self.spec.prefix]) {
            // Drop may run during a panic, so report and go on. The next `up` of this
            // prefix removes what is left.
            eprintln!("failed to remove island {}: {err}", self.spec.prefix);
        }
    }
}

/// Runs the topology script with `args`, returning its stderr in the error on failure.
fn run_script(args: &[&str]) -> io::Result<()> {
    let output = Command::new("bash")
        .arg(TOPOLOGY_SCRIPT)
        .args(args)
        .output()
        .map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("failed to run {TOPOLOGY_SCRIPT}: {err}"),
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{TOPOLOGY_SCRIPT} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    )))
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> IslandSpec {
        IslandSpec {
            prefix: "tst".to_owned(),
            nodes: 2,
            pods_per_node: 3,
            subnet: 203,
        }
    }

    #[test]
    fn node_names_and_addresses() {
        let nodes = spec().nodes();

        assert_eq!(nodes.len(), 2);
        let second = &nodes[1];
        assert_eq!(second.name, "tst-n2");
        assert_eq!(second.index, 2);
        assert_eq!(second.netns_path, Path::new("/run/netns/tst-n2"));
        assert_eq!(second.cgroup, Path::new("interceptor/tst-n2"));
        assert_eq!(second.wire_ip, Ipv4Addr::new(10, 203, 0, 2));
        assert_eq!(second.pod_gateway_ip, Ipv4Addr::new(10, 203, 2, 1));
    }

    #[test]
    fn ca_host_name_and_address() {
        let ca = spec().ca_host();

        assert_eq!(ca.name, "tst-ca");
        assert_eq!(ca.netns_path, Path::new("/run/netns/tst-ca"));
        assert_eq!(ca.ip, Ipv4Addr::new(10, 203, 0, 100));
    }

    #[test]
    fn pod_names_and_addresses() {
        let pods = spec().pods();

        assert_eq!(pods.len(), 6);
        let pod = &pods[4];
        assert_eq!(pod.name, "tst-n2-p2");
        assert_eq!(pod.short_name, "p2");
        assert_eq!(pod.node, "tst-n2");
        assert_eq!((pod.node_index, pod.index), (2, 2));
        assert_eq!(pod.netns_path, Path::new("/run/netns/tst-n2-p2"));
        assert_eq!(pod.cgroup, Path::new("interceptor/tst-n2/p2"));
        assert_eq!(pod.ip, Ipv4Addr::new(10, 203, 2, 12));
    }

    #[test]
    fn pods_ordered_by_node_then_pod() {
        let names: Vec<String> = spec().pods().into_iter().map(|pod| pod.name).collect();

        assert_eq!(
            names,
            [
                "tst-n1-p1",
                "tst-n1-p2",
                "tst-n1-p3",
                "tst-n2-p1",
                "tst-n2-p2",
                "tst-n2-p3"
            ]
        );
    }

    #[test]
    fn spec_limits_rejected() {
        let cases = [
            (
                "empty prefix",
                IslandSpec {
                    prefix: String::new(),
                    ..spec()
                },
            ),
            (
                "long prefix",
                IslandSpec {
                    prefix: "abcdefghi".to_owned(),
                    ..spec()
                },
            ),
            (
                "uppercase prefix",
                IslandSpec {
                    prefix: "Tst".to_owned(),
                    ..spec()
                },
            ),
            (
                "dash in prefix",
                IslandSpec {
                    prefix: "a-b".to_owned(),
                    ..spec()
                },
            ),
            ("no nodes", IslandSpec { nodes: 0, ..spec() }),
            (
                "ten nodes",
                IslandSpec {
                    nodes: 10,
                    ..spec()
                },
            ),
            (
                "no pods",
                IslandSpec {
                    pods_per_node: 0,
                    ..spec()
                },
            ),
            (
                "ten pods",
                IslandSpec {
                    pods_per_node: 10,
                    ..spec()
                },
            ),
            (
                "subnet 0",
                IslandSpec {
                    subnet: 0,
                    ..spec()
                },
            ),
            (
                "subnet 255",
                IslandSpec {
                    subnet: 255,
                    ..spec()
                },
            ),
        ];
        for (case, bad) in cases {
            let err = bad.validate().expect_err(case);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{case}");
        }
    }

    #[test]
    fn spec_limits_accepted() {
        let largest = IslandSpec {
            prefix: "abcd1234".to_owned(),
            nodes: 9,
            pods_per_node: 9,
            subnet: 254,
        };
        largest.validate().expect("largest spec is valid");
        spec().validate().expect("test spec is valid");
    }

    #[test]
    fn cgroup2_mount_found_in_mountinfo() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 master:2 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cgroup2_mount_missing() {
        let mountinfo = "40 31 0:37 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(mountinfo), None);
    }

    #[test]
    fn cgroup2_mount_unescapes_space() {
        let mountinfo = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            parse_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }
}
