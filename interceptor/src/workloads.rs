//! The workload directory: which workload owns which IP, under which identity, on which
//! node, and where its network namespace and cgroup are.
//!
//! The standalone source is a TOML file (documented in `docs/config.md`), read once at
//! start. Every daemon of the mesh reads the same file and takes its own node's
//! workloads from it; the rest tells the tunnel client which identity to expect at a
//! destination IP. The registry hands out immutable snapshots, so a later source (the
//! CNI plugin's enroll API) can replace the directory while connections use the old one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::identity::{SpiffeId, TrustDomain};

/// Maximum number of ports in each port list of a workload (`probe_ports` and the
/// exclusion lists), a fixed array size in the eBPF maps.
pub const MAX_PORTS: usize = interceptor_common::MAX_PORTS;
/// Maximum number of CIDRs in each exclusion list of a workload.
pub const MAX_CIDRS: usize = interceptor_common::MAX_CIDRS;

/// Errors of reading the workload directory. Validation errors are collected, so one
/// run reports every bad field at once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading workload directory {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid workload directory {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid workload directory {path}:\n  {}", problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The file as written by the operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    trust_domain: String,
    /// Mode of workloads whose namespace and entry set none.
    #[serde(default)]
    inbound_mode: InboundMode,
    #[serde(default)]
    namespaces: BTreeMap<String, NamespaceFile>,
    #[serde(default)]
    nodes: Vec<NodeFile>,
    #[serde(default)]
    workloads: Vec<WorkloadFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFile {
    inbound_mode: Option<InboundMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    cgroup: PathBuf,
    probe_addr: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    name: String,
    namespace: String,
    service_account: String,
    node: String,
    ip: String,
    netns: PathBuf,
    cgroup: PathBuf,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    inbound_mode: Option<InboundMode>,
    #[serde(default)]
    probe_ports: Vec<u16>,
    #[serde(default)]
    inbound_exclude_ports: Vec<u16>,
    #[serde(default)]
    inbound_exclude_cidrs: Vec<String>,
    #[serde(default)]
    outbound_exclude_ports: Vec<u16>,
    #[serde(default)]
    outbound_exclude_cidrs: Vec<String>,
}

/// Treatment of a workload's inbound plaintext: TCP connections from clients outside
/// the mesh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// Plaintext is reset; only mesh tunnels (and probes and exclusions) get through.
    Strict,
    /// Plaintext is allowed through the daemon's plaintext listener, subject to the
    /// policies, with the client's address kept. The default, as in Istio, so a
    /// workload keeps serving its clients outside the mesh when it is enrolled.
    #[default]
    Permissive,
}

impl InboundMode {
    /// Returns the mode's name as the file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

/// An IPv4 network in CIDR notation, `a.b.c.d/len`, with the host bits clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    /// Returns the network mask, `prefix_len` leading one bits.
    pub fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0)
    }

    /// Returns whether `addr` lies in the network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, len) = text
            .split_once('/')
            .ok_or("expected an IPv4 network such as 10.0.0.0/8")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| "not an IPv4 address")?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or("prefix length must be 0 to 32")?;
        let net = Self { addr, prefix_len };
        if u32::from(addr) & !net.mask() != 0 {
            return Err("host bits are set".into());
        }
        Ok(net)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Traffic of one direction that bypasses the mesh: destination ports, and networks of
/// the peer (the client for inbound, the destination for outbound).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    pub ports: Vec<u16>,
    pub cidrs: Vec<Ipv4Net>,
}

/// A node of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The node's cgroup, relative to the cgroup2 mount. The eBPF programs are attached
    /// here; every workload cgroup of the node lies beneath it.
    pub cgroup: PathBuf,
    /// Source address of the node's health checks: plaintext from it to a workload's
    /// `probe_ports` reaches the app in every mode.
    pub probe_addr: Option<Ipv4Addr>,
}

/// A workload of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Unique name, used in logs.
    pub name: String,
    pub spiffe_id: SpiffeId,
    pub node: String,
    pub ip: Ipv4Addr,
    /// Path of a file that refers to the workload's network namespace
    /// (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The workload's cgroup, relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// Labels that policies select the workload by.
    pub labels: BTreeMap<String, String>,
    /// The mode from the entry, else its namespace, else the file's default.
    pub inbound_mode: InboundMode,
    /// Ports that plaintext from the node's probe address reaches directly.
    pub probe_ports: Vec<u16>,
    pub inbound_exclude: Exclusions,
    pub outbound_exclude: Exclusions,
}

/// A validated workload directory.
#[derive(Debug)]
pub struct Directory {
    pub trust_domain: TrustDomain,
    pub nodes: Vec<Node>,
    pub workloads: Vec<Workload>,
    by_ip: HashMap<Ipv4Addr, usize>,
}

impl Directory {
    /// Reads and validates the directory file at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates directory text; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let file: File = toml::from_str(text).map_err(|error| Error::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        let mut problems = Vec::new();

        let trust_domain = match file.trust_domain.parse::<TrustDomain>() {
            Ok(td) => Some(td),
            Err(error) => {
                problems.push(format!("trust_domain = {:?}: {error}", file.trust_domain));
                None
            }
        };

        let mut nodes: Vec<Node> = Vec::new();
        for (i, node) in file.nodes.into_iter().enumerate() {
            if node.name.is_empty() {
                problems.push(format!("nodes[{i}].name: must not be empty"));
            }
            if nodes.iter().any(|n| n.name == node.name) {
                problems.push(format!("nodes[{i}].name = {:?}: duplicate node", node.name));
            }
            check_cgroup_path(&mut problems, &format!("nodes[{i}].cgroup"), &node.cgroup);
            let probe_addr = node
                .probe_addr
                .and_then(|text| match text.parse::<Ipv4Addr>() {
                    Ok(addr) if !addr.is_unspecified() && !addr.is_loopback() => Some(addr),
                    _ => {
                        problems.push(format!(
                            "nodes[{i}].probe_addr = {text:?}: not a unicast IPv4 address"
                        ));
                        None
                    }
                });
            nodes.push(Node {
                name: node.name,
                cgroup: node.cgroup,
                probe_addr,
            });
        }

        let mut workloads = Vec::new();
        let mut by_ip = HashMap::new();
        let mut names = HashSet::new();
        for (i, w) in file.workloads.into_iter().enumerate() {
            let field = |name: &str| format!("workloads[{i}].{name}");
            if !names.insert(w.name.clone()) {
                problems.push(format!(
                    "{} = {:?}: duplicate workload name",
                    field("name"),
                    w.name
                ));
            }
            let ip = match w.ip.parse::<Ipv4Addr>() {
                Ok(ip) if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() => {
                    problems.push(format!(
                        "{} = {:?}: not a unicast pod address",
                        field("ip"),
                        w.ip
                    ));
                    None
                }
                Ok(ip) => Some(ip),
                Err(_) => {
                    problems.push(format!("{} = {:?}: not an IPv4 address", field("ip"), w.ip));
                    None
                }
            };
            if let Some(ip) = ip {
                if by_ip.insert(ip, workloads.len()).is_some() {
                    problems.push(format!(
                        "{} = \"{ip}\": address used by two workloads",
                        field("ip")
                    ));
                }
            }
            let node = nodes.iter().find(|n| n.name == w.node);
            match node {
                None => problems.push(format!(
                    "{} = {:?}: no such node in [[nodes]]",
                    field("node"),
                    w.node
                )),
                Some(node) if !w.cgroup.starts_with(&node.cgroup) || w.cgroup == node.cgroup => {
                    problems.push(format!(
                        "{} = {:?}: must lie beneath its node's cgroup {:?}",
                        field("cgroup"),
                        w.cgroup,
                        node.cgroup
                    ));
                }
                Some(_) => {}
            }
            check_cgroup_path(&mut problems, &field("cgroup"), &w.cgroup);
            if !w.netns.is_absolute() {
                problems.push(format!(
                    "{} = {:?}: must be an absolute path",
                    field("netns"),
                    w.netns
                ));
            }
            let spiffe_id = trust_domain.as_ref().and_then(|td| {
                SpiffeId::new(td.clone(), &w.namespace, &w.service_account)
                    .map_err(|error| {
                        problems.push(format!(
                            "{}/{}: {error}",
                            field("namespace"),
                            field("service_account")
                        ))
                    })
                    .ok()
            });
            check_ports(&mut problems, &field("probe_ports"), &w.probe_ports);
            check_ports(
                &mut problems,
                &field("inbound_exclude_ports"),
                &w.inbound_exclude_ports,
            );
            check_ports(
                &mut problems,
                &field("outbound_exclude_ports"),
                &w.outbound_exclude_ports,
            );
            let inbound_exclude = Exclusions {
                ports: w.inbound_exclude_ports,
                cidrs: parse_cidrs(
                    &mut problems,
                    &field("inbound_exclude_cidrs"),
                    &w.inbound_exclude_cidrs,
                ),
            };
            let outbound_exclude = Exclusions {
                ports: w.outbound_exclude_ports,
                cidrs: parse_cidrs(
                    &mut problems,
                    &field("outbound_exclude_cidrs"),
                    &w.outbound_exclude_cidrs,
                ),
            };
            let inbound_mode = w
                .inbound_mode
                .or_else(|| file.namespaces.get(&w.namespace)?.inbound_mode)
                .unwrap_or(file.inbound_mode);
            if let (Some(ip), Some(spiffe_id)) = (ip, spiffe_id) {
                workloads.push(Workload {
                    name: w.name,
                    spiffe_id,
                    node: w.node,
                    ip,
                    netns: w.netns,
                    cgroup: w.cgroup,
                    labels: w.labels,
                    inbound_mode,
                    probe_ports: w.probe_ports,
                    inbound_exclude,
                    outbound_exclude,
                });
            }
        }

        match trust_domain {
            Some(trust_domain) if problems.is_empty() => Ok(Self {
                trust_domain,
                nodes,
                workloads,
                by_ip,
            }),
            _ => Err(Error::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// Returns the node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Returns the workload that owns `ip`, on any node.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    /// Returns the workloads placed on node `name`.
    pub fn on_node<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.node == name)
    }
}

/// Checks a port list: at most [`MAX_PORTS`] entries, none of them 0.
fn check_ports(problems: &mut Vec<String>, field: &str, ports: &[u16]) {
    if ports.len() > MAX_PORTS {
        problems.push(format!(
            "{field} = {ports:?}: at most {MAX_PORTS} ports are allowed"
        ));
    }
    if ports.contains(&0) {
        problems.push(format!("{field} = {ports:?}: port 0 is not a valid port"));
    }
}

/// Parses a CIDR list of at most [`MAX_CIDRS`] entries, recording each invalid one.
fn parse_cidrs(problems: &mut Vec<String>, field: &str, texts: &[String]) -> Vec<Ipv4Net> {
    if texts.len() > MAX_CIDRS {
        problems.push(format!(
            "{field} = {texts:?}: at most {MAX_CIDRS} networks are allowed"
        ));
    }
    texts
        .iter()
        .filter_map(|text| match text.parse::<Ipv4Net>() {
            Ok(net) => Some(net),
            Err(message) => {
                problems.push(format!("{field}: {text:?}: {message}"));
                None
            }
        })
        .collect()
}

/// A cgroup path in the file is relative to the cgroup2 mount and may not climb out of
/// it, so the daemon never attaches at, or enrolls, the cgroup2 root.
fn check_cgroup_path(problems: &mut Vec<String>, field: &str, path: &Path) {
    use std::path::Component;
    let valid = !path.as_os_str().is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)));
    if !valid {
        problems.push(format!(
            "{field} = {path:?}: must be a non-empty path relative to the cgroup2 mount, without `..`"
        ));
    }
}

/// The current workload directory, replaceable while the daemon runs.
#[derive(Debug)]
pub struct Registry {
    current: RwLock<Arc<Directory>>,
}

impl Registry {
    pub fn new(directory: Directory) -> Self {
        Self {
            current: RwLock::new(Arc::new(directory)),
        }
    }

    /// Returns the directory in force now. Callers keep the snapshot for the life of
    /// one connection.
    pub fn snapshot(&self) -> Arc<Directory> {
        // A poisoned lock still holds a complete directory: replacement is one store.
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
trust_domain = "cluster.local"

[[nodes]]
name = "n1"
cgroup = "interceptor/n1"

[[nodes]]
name = "n2"
cgroup = "interceptor/n2"

[[workloads]]
name = "client"
namespace = "default"
service_account = "sleep"
node = "n1"
ip = "10.1.1.11"
netns = "/run/netns/client"
cgroup = "interceptor/n1/client"

[[workloads]]
name = "server"
namespace = "web"
service_account = "httpbin"
node = "n2"
ip = "10.1.2.11"
netns = "/run/netns/server"
cgroup = "interceptor/n2/server"
"#;

    fn parse(text: &str) -> Result<Directory, Error> {
        Directory::parse(Path::new("mesh.toml"), text)
    }

    fn problems(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("invalid directory accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn valid_directory_parses() {
        let dir = parse(VALID).expect("valid directory");
        let server = dir
            .by_ip("10.1.2.11".parse().expect("ip"))
            .expect("server by ip");
        assert_eq!(
            server.spiffe_id.to_string(),
            "spiffe://cluster.local/ns/web/sa/httpbin"
        );
        assert_eq!(dir.on_node("n1").count(), 1);
        assert!(dir.by_ip("10.9.9.9".parse().expect("ip")).is_none());
    }

    #[test]
    fn unknown_field_is_named() {
        let text = VALID.replace(
            "netns = \"/run/netns/client\"",
            "netns = \"/run/netns/client\"\nport = 1",
        );
        let message = problems(&text);
        assert!(message.contains("unknown field `port`"), "{message}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let text = VALID
            .replace("10.1.1.11", "10.1.1.300")
            .replace("node = \"n2\"", "node = \"n3\"")
            .replace(
                "cgroup = \"interceptor/n1/client\"",
                "cgroup = \"../escape\"",
            );
        let message = problems(&text);
        assert!(
            message.contains("workloads[0].ip = \"10.1.1.300\""),
            "{message}"
        );
        assert!(message.contains("workloads[1].node = \"n3\""), "{message}");
        assert!(
            message.contains("workloads[0].cgroup = \"../escape\""),
            "{message}"
        );
    }

    #[test]
    fn duplicate_ip_is_rejected() {
        let message = problems(&VALID.replace("10.1.2.11", "10.1.1.11"));
        assert!(
            message.contains("address used by two workloads"),
            "{message}"
        );
    }

    #[test]
    fn loopback_ip_is_rejected() {
        let message = problems(&VALID.replace("10.1.2.11", "127.0.0.1"));
        assert!(message.contains("not a unicast pod address"), "{message}");
    }

    #[test]
    fn workload_cgroup_outside_node_is_rejected() {
        let message = problems(&VALID.replace("interceptor/n2/server", "interceptor/n1/server"));
        assert!(
            message.contains("must lie beneath its node's cgroup"),
            "{message}"
        );
    }

    #[test]
    fn inbound_settings_parse() {
        let text = VALID
            .replace(
                "trust_domain = \"cluster.local\"",
                "trust_domain = \"cluster.local\"\ninbound_mode = \"strict\"\n\n[namespaces.web]\ninbound_mode = \"permissive\"",
            )
            .replace(
                "cgroup = \"interceptor/n1\"",
                "cgroup = \"interceptor/n1\"\nprobe_addr = \"10.1.1.1\"",
            )
            .replace(
                "cgroup = \"interceptor/n1/client\"",
                "cgroup = \"interceptor/n1/client\"\nlabels = { app = \"sleep\" }\nprobe_ports = [8081]\ninbound_exclude_ports = [9000]\ninbound_exclude_cidrs = [\"192.168.0.0/16\"]\noutbound_exclude_cidrs = [\"10.1.3.0/24\"]",
            );
        let dir = parse(&text).expect("valid directory");
        let client = &dir.workloads[0];
        assert_eq!(client.inbound_mode, InboundMode::Strict);
        assert_eq!(client.labels.get("app").map(String::as_str), Some("sleep"));
        assert_eq!(client.probe_ports, [8081]);
        assert_eq!(client.inbound_exclude.ports, [9000]);
        assert_eq!(
            client.inbound_exclude.cidrs,
            ["192.168.0.0/16".parse::<Ipv4Net>().expect("cidr")]
        );
        assert!(client.outbound_exclude.cidrs[0].contains(Ipv4Addr::new(10, 1, 3, 7)));
        assert_eq!(dir.workloads[1].inbound_mode, InboundMode::Permissive);
        assert_eq!(dir.nodes[0].probe_addr, Some(Ipv4Addr::new(10, 1, 1, 1)));
    }

    #[test]
    fn bad_inbound_settings_are_named() {
        let text = VALID.replace(
            "cgroup = \"interceptor/n1/client\"",
            "cgroup = \"interceptor/n1/client\"\nprobe_ports = [0]\ninbound_exclude_cidrs = [\"10.1.1.1/8\"]\noutbound_exclude_ports = [1, 2, 3, 4, 5, 6, 7, 8, 9]",
        );
        let message = problems(&text);
        assert!(
            message.contains("workloads[0].probe_ports = [0]"),
            "{message}"
        );
        assert!(
            message
                .contains("workloads[0].inbound_exclude_cidrs: \"10.1.1.1/8\": host bits are set"),
            "{message}"
        );
        assert!(
            message.contains("workloads[0].outbound_exclude_ports"),
            "{message}"
        );
    }

    #[test]
    fn cidr_parses_and_rejects() {
        let net: Ipv4Net = "10.0.0.0/8".parse().expect("cidr");
        assert_eq!(net.mask(), 0xff00_0000);
        assert!(net.contains(Ipv4Addr::new(10, 9, 9, 9)));
        assert!(!net.contains(Ipv4Addr::new(11, 0, 0, 0)));
        let all: Ipv4Net = "0.0.0.0/0".parse().expect("cidr");
        assert_eq!(all.mask(), 0);
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.1/24", "x/8"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn bad_trust_domain_is_rejected() {
        let message = problems(&VALID.replace("cluster.local", "Cluster Local"));
        assert!(
            message.contains("trust_domain = \"Cluster Local\""),
            "{message}"
        );
    }
}
