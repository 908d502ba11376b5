//! The demo's access-control act. Workload `demo-n2-p1` runs in STRICT inbound mode
//! with label `app=echo`, and one DENY policy names the principal of `demo-n1-p2`
//! (service account `p2`). After the other flows, a plaintext client in node
//! `demo-n1`'s own namespace and the mesh client `demo-n1-p2` both connect to
//! `demo-n2-p1:8080`. Each must be reset, and node 2's daemon must log why.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use interceptor_tests::mesh::{mesh_peer_bin, run_peer, scaled};
use interceptor_tests::{spawn_in, DirectoryExtras, Island, Pod};

use super::close_events::{parse_close_event, parse_rejection, CloseEvent, Direction, Rejection};
use super::*;

/// The STRICT workload that the policy protects, by node and pod index.
const PROTECTED: (usize, usize) = (2, 1);
/// The mesh client whose principal the policy denies.
const DENIED_CLIENT: (usize, usize) = (1, 2);
/// The node whose own network namespace runs the plaintext client. Its source address
/// towards node 2's pods is its `wire` address, so `sk_lookup` does not take it for a
/// probe of node 2.
const PLAINTEXT_NODE: usize = 1;

/// `app` label of the protected workload, which the policy's selector matches.
const APP_LABEL: &str = "echo";
/// Inbound mode of the protected workload: plaintext is reset in the kernel.
const INBOUND_MODE: &str = "strict";
/// The policy's namespace and name.
const POLICY_NAMESPACE: &str = "default";
const POLICY_NAME: &str = "deny-p2-to-echo";
/// Bytes each client of the act sends if its connection is not reset first.
const CLIENT_BYTES: &str = "1000";

/// Maximum time a denied mesh client may wait for its reset, before `scaled`.
const RESET_LIMIT: Duration = Duration::from_secs(1);
/// Pause before the last look at the server's accept lines, so that a line still on
/// its way can make the check fail.
const ACCEPT_SETTLE: Duration = Duration::from_millis(200);

/// Returns the directory lines that make the protected workload STRICT and label it.
pub(super) fn directory_extras(island: &Island) -> DirectoryExtras {
    let mut extras = DirectoryExtras::default();
    extras.sections.insert(
        island.pod(PROTECTED.0, PROTECTED.1).name.clone(),
        format!("labels = {{ app = \"{APP_LABEL}\" }}\ninbound_mode = \"{INBOUND_MODE}\"\n"),
    );
    extras
}

/// Writes the policy file into `work_dir` and returns its path, for `--policies`.
pub(super) fn write_policy_file(work_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let path = work_dir.join("policies.yaml");
    std::fs::write(&path, policy_yaml()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Renders the one `AuthorizationPolicy` of the demo.
fn policy_yaml() -> String {
    format!(
        "apiVersion: security.istio.io/v1\n\
         kind: AuthorizationPolicy\n\
         metadata:\n  name: {POLICY_NAME}\n  namespace: {POLICY_NAMESPACE}\n\
         spec:\n  selector:\n    matchLabels:\n      app: {APP_LABEL}\n  action: DENY\n  \
         rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n",
        denied_principal()
    )
}

/// Returns the denied principal in Istio's form, `<trust domain>/ns/<namespace>/sa/<account>`.
fn denied_principal() -> String {
    format!("{TRUST_DOMAIN}/ns/default/sa/p{}", DENIED_CLIENT.1)
}

/// Returns the policy's name as a denial gives it: `namespace/name`.
pub(super) fn policy_id() -> String {
    format!("{POLICY_NAMESPACE}/{POLICY_NAME}")
}

/// Outcome of the act's two clients, with the log events about them.
pub(super) struct AccessControl {
    /// The protected workload and the policy, in one line.
    pub(super) setup: String,
    pub(super) plaintext: PlaintextAttempt,
    pub(super) denied: DeniedAttempt,
}

/// The plaintext client's connection from a node namespace, outside the mesh.
pub(super) struct PlaintextAttempt {
    pub(super) node: String,
    pub(super) source_ip: Ipv4Addr,
    pub(super) server: Pod,
    pub(super) dst: SocketAddrV4,
    /// The client's result line.
    pub(super) result: String,
    /// Time from starting the client process until it exited.
    pub(super) took: Duration,
    /// Node 2's `connection rejected` event for it, if logged in time.
    pub(super) rejection: Option<Rejection>,
}

/// The mesh client's connection, which the policy denies.
pub(super) struct DeniedAttempt {
    pub(super) client: Pod,
    pub(super) server: Pod,
    pub(super) dst: SocketAddrV4,
    /// The client's result line.
    pub(super) result: String,
    /// Time from starting the client process until it exited.
    pub(super) took: Duration,
    /// The server's `accepted` lines from the client's address during the attempt.
    pub(super) accepted: Vec<String>,
    /// Node 2's inbound close event for it, if logged in time.
    pub(super) inbound: Option<CloseEvent>,
    /// Node 1's outbound close event for it, if logged in time.
    pub(super) outbound: Option<CloseEvent>,
}

/// Runs both clients of the act, one after the other, and reads the evidence.
pub(super) fn exercise(running: &Running) -> anyhow::Result<AccessControl> {
    let plaintext = run_plaintext(running)?;
    let denied = run_denied(running)?;
    Ok(AccessControl {
        setup: describe_setup(&running.island),
        plaintext,
        denied,
    })
}

fn run_plaintext(running: &Running) -> anyhow::Result<PlaintextAttempt> {
    let island = &running.island;
    let node = island.node(PLAINTEXT_NODE);
    let server = island.pod(PROTECTED.0, PROTECTED.1).clone();
    let dst = SocketAddrV4::new(server.ip, ECHO_PORT);
    let dst_text = dst.to_string();
    let log_offset = running.mesh.log(PROTECTED.0).len();

    let mut client = Command::new(mesh_peer_bin());
    client
        .args(["client", &dst_text, "--bytes", CLIENT_BYTES])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let output = spawn_in(&node.netns_path, None, &mut client)
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("running mesh-peer client in {}", node.name))?;
    let took = started.elapsed();

    let source = format!("{}:", node.wire_ip);
    let find = |log: &str| {
        log.get(log_offset..)?
            .lines()
            .filter_map(parse_rejection)
            .find(|rejection| {
                rejection.workload == server.name
                    && rejection.dst == dst_text
                    && rejection.src.starts_with(&source)
            })
    };
    // The daemon reads rejections from a ring buffer, so its event may come later.
    let rejection = find(
        &running
            .mesh
            .log_when(PROTECTED.0, |log| find(log).is_some()),
    );
    Ok(PlaintextAttempt {
        node: node.name.clone(),
        source_ip: node.wire_ip,
        server,
        dst,
        result: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        took,
        rejection,
    })
}

fn run_denied(running: &Running) -> anyhow::Result<DeniedAttempt> {
    let island = &running.island;
    let client = island.pod(DENIED_CLIENT.0, DENIED_CLIENT.1).clone();
    let server = island.pod(PROTECTED.0, PROTECTED.1).clone();
    let dst = SocketAddrV4::new(server.ip, ECHO_PORT);
    let dst_text = dst.to_string();
    let echo = running
        .server(&server.name)
        .with_context(|| format!("no server runs in {}", server.name))?;
    let client_prefix = format!("{}:", client.ip);
    let accepted_from_client = || -> Vec<String> {
        echo.accepted()
            .into_iter()
            .filter(|peer| peer.starts_with(&client_prefix))
            .collect()
    };
    let accepted_before = accepted_from_client().len();
    let log_offsets = [
        running.mesh.log(client.node_index).len(),
        running.mesh.log(server.node_index).len(),
    ];

    let started = Instant::now();
    let output = run_peer(
        island,
        &client,
        &["client", &dst_text, "--bytes", CLIENT_BYTES],
    )
    .with_context(|| format!("running mesh-peer client in {}", client.name))?;
    let took = started.elapsed();

    let find = |node_index: usize, log_offset: usize, workload: &str, direction: Direction| {
        let node = node_name(node_index);
        let matches = |event: &CloseEvent| {
            event.direction == direction.as_str()
                && event.workload == workload
                && event.dst == dst_text
        };
        let log = running.mesh.log_when(node_index, |log| {
            events_after(&node, log, log_offset).iter().any(matches)
        });
        events_after(&node, &log, log_offset)
            .into_iter()
            .find(matches)
    };
    let outbound = find(
        client.node_index,
        log_offsets[0],
        &client.name,
        Direction::Outbound,
    );
    let inbound = find(
        server.node_index,
        log_offsets[1],
        &server.name,
        Direction::Inbound,
    );
    std::thread::sleep(ACCEPT_SETTLE);
    let accepted = accepted_from_client().split_off(accepted_before);
    Ok(DeniedAttempt {
        client,
        server,
        dst,
        result: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        took,
        accepted,
        inbound,
        outbound,
    })
}

/// Returns the close events of `log` after byte `offset`.
fn events_after(node: &str, log: &str, offset: usize) -> Vec<CloseEvent> {
    log.get(offset..)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| parse_close_event(node, line))
        .collect()
}

/// Returns the `KIND` of a `mesh-peer` result line (`ok`, `reset`, `refused`, ...).
pub(super) fn result_kind(result: &str) -> &str {
    result
        .split_whitespace()
        .next()
        .and_then(|field| field.strip_prefix("result="))
        .unwrap_or("none")
}

/// Returns true when a client result shows a reset. A reset in reply to the SYN reads as
/// `refused`, and a reset after the connect (by the client's own daemon) as `reset`.
pub(super) fn is_reset(result: &str) -> bool {
    matches!(result_kind(result), "reset" | "refused")
}

/// Returns the reset time limit of a denied mesh client, with the time scale applied.
pub(super) fn reset_limit() -> Duration {
    scaled(RESET_LIMIT)
}

/// Describes the protected workload and the policy in one line.
fn describe_setup(island: &Island) -> String {
    format!(
        "{}: inbound_mode={INBOUND_MODE}, app={APP_LABEL}; policy {}: DENY from principal {}",
        island.pod(PROTECTED.0, PROTECTED.1).name,
        policy_id(),
        denied_principal()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_denies_p2_to_echo() {
        let yaml = policy_yaml();

        assert!(yaml.contains("  name: deny-p2-to-echo\n  namespace: default\n"));
        assert!(yaml.contains("      app: echo\n  action: DENY\n"));
        assert!(yaml.contains("principals: [\"cluster.local/ns/default/sa/p2\"]"));
    }

    #[test]
    fn result_kind_read() {
        assert_eq!(
            result_kind("result=refused stage=connect error=x"),
            "refused"
        );
        assert_eq!(result_kind(""), "none");
        assert!(is_reset(
            "result=reset sent=0 received=0 stage=read error=x"
        ));
        assert!(!is_reset("result=ok sent=1000 received=1000"));
    }
}
