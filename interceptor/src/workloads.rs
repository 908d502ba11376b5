//! The workload directory: which workload owns which IP, under which identity, on which
//! node, and where its network namespace and cgroup are.
//!
//! The standalone source is a TOML file (documented in `docs/config.md`), read once at
//! start. Every daemon of the mesh reads the same file and takes its own node's
//! workloads from it; the rest tells the tunnel client which identity to expect at a
//! destination IP. The registry hands out immutable snapshots, so a later source (the
//! CNI plugin's enroll API) can replace the directory while connections use the old one.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::identity::{SpiffeId, TrustDomain};

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
    #[serde(default)]
    nodes: Vec<NodeFile>,
    #[serde(default)]
    workloads: Vec<WorkloadFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    cgroup: PathBuf,
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
}

/// A node of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The node's cgroup, relative to the cgroup2 mount. The eBPF programs are attached
    /// here; every workload cgroup of the node lies beneath it.
    pub cgroup: PathBuf,
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
            nodes.push(Node {
                name: node.name,
                cgroup: node.cgroup,
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
            if let (Some(ip), Some(spiffe_id)) = (ip, spiffe_id) {
                workloads.push(Workload {
                    name: w.name,
                    spiffe_id,
                    node: w.node,
                    ip,
                    netns: w.netns,
                    cgroup: w.cgroup,
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
    fn bad_trust_domain_is_rejected() {
        let message = problems(&VALID.replace("cluster.local", "Cluster Local"));
        assert!(
            message.contains("trust_domain = \"Cluster Local\""),
            "{message}"
        );
    }
}
