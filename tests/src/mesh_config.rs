//! The daemon's workload directory file for an island, written as TOML.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use crate::topology::{Island, Node, Pod};

/// Writes the workload directory file that `interceptor run` reads: the trust domain,
/// every node of `island`, and one workload per pod in `enrolled`.
///
/// Each workload is in namespace `default` with the pod's short name (`p<j>`) as its
/// service account. [`write_mesh_config_with`] can set other namespaces. Fails with `InvalidInput` when a pod is not on one of the island's
/// nodes.
pub fn write_mesh_config(
    island: &Island,
    path: &Path,
    trust_domain: &str,
    enrolled: &[&Pod],
) -> io::Result<()> {
    write_mesh_config_with(
        island,
        path,
        trust_domain,
        enrolled,
        &DirectoryExtras::default(),
    )
}

/// TOML lines added to a workload directory. `top` goes at the end of the file, where
/// tables such as `[namespaces.NAME]` belong. Each entry of `sections` goes at the end
/// of the `[[nodes]]` or `[[workloads]]` entry of the node or pod of that name.
/// `namespaces` maps a pod's name to its workload's namespace, `default` when absent.
#[derive(Clone, Debug, Default)]
pub struct DirectoryExtras {
    pub top: String,
    pub sections: BTreeMap<String, String>,
    pub namespaces: BTreeMap<String, String>,
}

/// Writes the workload directory as [`write_mesh_config`] does, with `extras` added.
pub fn write_mesh_config_with(
    island: &Island,
    path: &Path,
    trust_domain: &str,
    enrolled: &[&Pod],
    extras: &DirectoryExtras,
) -> io::Result<()> {
    let text = render_mesh_config(island.nodes(), trust_domain, enrolled, extras)?;
    fs::write(path, text).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("failed to write {}: {err}", path.display()),
        )
    })
}

fn render_mesh_config(
    nodes: &[Node],
    trust_domain: &str,
    enrolled: &[&Pod],
    extras: &DirectoryExtras,
) -> io::Result<String> {
    let mut text = String::new();
    // Writing to a String cannot fail, so the fmt::Results below are ignored.
    let _ = writeln!(text, "trust_domain = {}", toml_string(trust_domain));
    let section_extra = |name: &str| extras.sections.get(name).cloned().unwrap_or_default();

    for node in nodes {
        let _ = write!(
            text,
            "\n[[nodes]]\nname = {}\ncgroup = {}\n{}",
            toml_string(&node.name),
            toml_string(&node.cgroup.to_string_lossy()),
            section_extra(&node.name),
        );
    }

    for pod in enrolled {
        if !nodes.iter().any(|node| node.name == pod.node) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pod {} is on node {}, which is not in the island",
                    pod.name, pod.node
                ),
            ));
        }
        let _ = write!(
            text,
            "\n[[workloads]]\nname = {}\nnamespace = {}\nservice_account = {}\n\
             node = {}\nip = {}\nnetns = {}\ncgroup = {}\n{}",
            toml_string(&pod.name),
            toml_string(
                extras
                    .namespaces
                    .get(&pod.name)
                    .map_or("default", String::as_str)
            ),
            toml_string(&pod.short_name),
            toml_string(&pod.node),
            toml_string(&pod.ip.to_string()),
            toml_string(&pod.netns_path.to_string_lossy()),
            toml_string(&pod.cgroup.to_string_lossy()),
            section_extra(&pod.name),
        );
    }
    if !extras.top.is_empty() {
        let _ = write!(text, "\n{}", extras.top);
    }
    Ok(text)
}

/// Quotes `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04X}", u32::from(c));
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::IslandSpec;

    fn spec() -> IslandSpec {
        IslandSpec {
            prefix: "tst".to_owned(),
            nodes: 2,
            pods_per_node: 2,
            subnet: 203,
        }
    }

    #[test]
    fn config_lists_nodes_and_enrolled_pods() {
        let spec = spec();
        let pods = spec.pods();
        let enrolled = [&pods[0], &pods[3]];

        let text = render_mesh_config(
            &spec.nodes(),
            "cluster.local",
            &enrolled,
            &DirectoryExtras::default(),
        )
        .expect("render config");

        let expected = r#"trust_domain = "cluster.local"

[[nodes]]
name = "tst-n1"
cgroup = "interceptor/tst-n1"

[[nodes]]
name = "tst-n2"
cgroup = "interceptor/tst-n2"

[[workloads]]
name = "tst-n1-p1"
namespace = "default"
service_account = "p1"
node = "tst-n1"
ip = "10.203.1.11"
netns = "/run/netns/tst-n1-p1"
cgroup = "interceptor/tst-n1/p1"

[[workloads]]
name = "tst-n2-p2"
namespace = "default"
service_account = "p2"
node = "tst-n2"
ip = "10.203.2.12"
netns = "/run/netns/tst-n2-p2"
cgroup = "interceptor/tst-n2/p2"
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn config_sets_workload_namespace() {
        let spec = spec();
        let pods = spec.pods();
        let mut extras = DirectoryExtras::default();
        extras
            .namespaces
            .insert(pods[1].name.clone(), "shop".to_owned());

        let text = render_mesh_config(
            &spec.nodes(),
            "cluster.local",
            &[&pods[0], &pods[1]],
            &extras,
        )
        .expect("render config");

        let namespaces: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("namespace = "))
            .collect();
        assert_eq!(
            namespaces,
            ["namespace = \"default\"", "namespace = \"shop\""]
        );
    }

    #[test]
    fn config_rejects_foreign_pod() {
        let other = IslandSpec {
            prefix: "other".to_owned(),
            ..spec()
        };
        let foreign = other.pods().remove(0);

        let err = render_mesh_config(
            &spec().nodes(),
            "cluster.local",
            &[&foreign],
            &DirectoryExtras::default(),
        )
        .expect_err("pod of another island");

        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn toml_string_escapes() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_string("tab\there"), r#""tab\there""#);
        assert_eq!(toml_string("\u{1}"), r#""\u0001""#);
    }
}
