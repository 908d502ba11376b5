//! Privileged end-to-end tests of authorization policies: a table of Istio
//! `AuthorizationPolicy` sets, clients and destinations run against real daemons, real
//! tunnels and real plaintext clients, and policy reloads under continuous traffic.
//!
//! Every test builds its own island (prefixes starting with `pt`, subnets 245 to 250),
//! so the tests run in parallel with each other and with the other test files.

use std::path::Path;
use std::time::Duration;

use interceptor_tests::clients::{
    accepted_count, assert_quick_reset, run_client, wait_until, Client, HeldConnection, Traffic,
};
use interceptor_tests::mesh::{scaled, Mesh, PeerServer};
use interceptor_tests::setup::{start_test_mesh, work_dir, Enroll, MeshOptions, TestMesh};
use interceptor_tests::{DirectoryExtras, Island, Pod};

/// The daemon's log line after each successful policy load from a changed file.
const RELOADED: &str = "reloaded authorization policies";

/// The daemon's log line after a changed file failed to load.
const RELOAD_FAILED: &str = "reloading authorization policies failed";

const ECHO_OK: &str = "result=ok sent=1000 received=1000";

/// A workload of the island: pod `pod` of node `node`, with its namespace and `app`
/// label.
struct Workload {
    node: usize,
    pod: usize,
    namespace: &'static str,
    app: &'static str,
}

const fn workload(node: usize, pod: usize, namespace: &'static str, app: &'static str) -> Workload {
    Workload {
        node,
        pod,
        namespace,
        app,
    }
}

/// Name of the policy file in the work directory.
const POLICY_FILE: &str = "policies.yaml";

/// Builds an island of 2 nodes with 3 pods each, enrolls `workloads`, writes
/// `policies` to the policy file and starts the daemons with `--policies` and
/// `daemon_args`. Returns `None` when the test cannot run here (outside CI only).
fn setup(
    test: &str,
    prefix: &str,
    subnet: u8,
    workloads: &[Workload],
    policies: &str,
    daemon_args: &[&str],
) -> Option<TestMesh> {
    let enrolled: Vec<(usize, usize)> = workloads.iter().map(|w| (w.node, w.pod)).collect();
    let extras = |island: &Island, work_dir: &Path| {
        std::fs::write(work_dir.join(POLICY_FILE), policies).expect("writing the policy file");
        let mut extras = DirectoryExtras::default();
        for workload in workloads {
            let pod = island.pod(workload.node, workload.pod);
            extras
                .namespaces
                .insert(pod.name.clone(), workload.namespace.to_owned());
            extras.sections.insert(
                pod.name.clone(),
                format!("labels = {{ app = \"{}\" }}\n", workload.app),
            );
        }
        extras
    };
    let policy_path = work_dir("e2e", prefix).join(POLICY_FILE);
    let policy_arg = policy_path.to_string_lossy().into_owned();
    let mut args = vec!["--policies", policy_arg.as_str()];
    args.extend_from_slice(daemon_args);
    let options = MeshOptions {
        pods_per_node: 3,
        enroll: Enroll::Pods(&enrolled),
        extras: Some(&extras),
        daemon_args: &args,
        ..MeshOptions::default()
    };
    start_test_mesh(test, prefix, subnet, options)
}

/// Replaces the policy file with `text` and waits until node 2's daemon logs `marker`
/// once more than before: [`RELOADED`] for a valid file, [`RELOAD_FAILED`] for a
/// broken one.
///
/// The new file is renamed into place, so the daemon's poll never reads it half
/// written.
fn replace_policies(setup: &TestMesh, text: &str, marker: &str) {
    let before = setup.mesh.log(2).matches(marker).count();
    let policy_path = setup.work_dir.join(POLICY_FILE);
    let staged = policy_path.with_extension("staged");
    std::fs::write(&staged, text).expect("writing the new policy file");
    std::fs::rename(&staged, &policy_path).expect("renaming the new policy file");
    let log = setup
        .mesh
        .log_when(2, |log| log.matches(marker).count() > before);
    assert!(
        log.matches(marker).count() > before,
        "node 2's daemon did not log {marker:?} after the policy file changed:\n{log}"
    );
}

/// Returns the `interceptor_connections_closed_total` count of node `node` for
/// `direction` and `result`, summed over the other labels.
fn closed_count(mesh: &Mesh, node: usize, direction: &str, result: &str) -> u64 {
    let metrics = mesh
        .admin_get(node, "/metrics")
        .unwrap_or_else(|error| panic!("fetching node {node}'s metrics failed: {error}"));
    let series = format!("interceptor_connections_closed_total{{direction=\"{direction}\",");
    let result = format!("result=\"{result}\"}}");
    metrics
        .lines()
        .filter(|line| line.starts_with(&series) && line.contains(&result))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Returns node 2's first `connection closed` line after byte `offset` of its log for
/// a connection from `source_ip` to `dst`, waiting up to 10 s (scaled) for it.
fn close_event(mesh: &Mesh, offset: usize, source_ip: &str, dst: &str) -> Option<String> {
    let src = format!("src={source_ip}:");
    let dst = format!("dst=\"{dst}\"");
    let find = |log: &str| -> Option<String> {
        log.get(offset..)?
            .lines()
            .find(|l| l.contains("connection closed") && l.contains(&src) && l.contains(&dst))
            .map(str::to_owned)
    };
    find(&mesh.log_when(2, |log| find(log).is_some()))
}

/// An `AuthorizationPolicy` document. `rules` is the YAML flow sequence of
/// `spec.rules`, for example `[{from: [{source: {namespaces: ["shop"]}}]}]`.
#[derive(Clone, Copy)]
struct Policy<'a> {
    namespace: &'a str,
    name: &'a str,
    /// `app` label of `spec.selector.matchLabels`, or `None` for no selector.
    app: Option<&'a str>,
    action: &'a str,
    rules: &'a str,
    dry_run: bool,
}

impl Policy<'_> {
    fn render(&self) -> String {
        let annotations = if self.dry_run {
            "  annotations:\n    istio.io/dry-run: \"true\"\n"
        } else {
            ""
        };
        let selector = match self.app {
            Some(app) => format!("  selector:\n    matchLabels:\n      app: {app}\n"),
            None => String::new(),
        };
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
             name: {}\n  namespace: {}\n{annotations}spec:\n{selector}  action: {}\n  \
             rules: {}\n",
            self.name, self.namespace, self.action, self.rules
        )
    }
}

/// Renders `policies` as one YAML stream.
fn policy_file(policies: &[Policy]) -> String {
    policies
        .iter()
        .map(Policy::render)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// What a client of a table row must see.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// The echo completes, the server accepts the connection from the client's address,
    /// and the close event names `policy` (empty when no ALLOW policy decided) and lists
    /// `dry_run` (`namespace/name=allow|deny`, comma-separated).
    Delivered {
        policy: &'static str,
        dry_run: &'static str,
    },
    /// The client is reset within a second, the server never accepts, and the close
    /// event's error is `error`: `denied by policy <namespace/name>` or
    /// `no ALLOW policy matched`.
    Denied { error: &'static str },
}

const fn delivered(policy: &'static str) -> Expect {
    Expect::Delivered {
        policy,
        dry_run: "",
    }
}

const fn denied(error: &'static str) -> Expect {
    Expect::Denied { error }
}

const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

/// A destination workload of the table, by its pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dst {
    /// n2-p1: namespace `default`, `app=web`, ports 8080 and 8081.
    Web,
    /// n2-p2: namespace `default`, `app=db`, port 8080.
    Db,
    /// n2-p3: namespace `shop`, `app=web`, port 8080.
    ShopWeb,
}

impl Dst {
    fn pod(self) -> usize {
        match self {
            Self::Web => 1,
            Self::Db => 2,
            Self::ShopWeb => 3,
        }
    }
}

/// One row of the table: a client, a destination and what the client must see.
struct Row {
    name: &'static str,
    from: Client,
    dst: Dst,
    port: u16,
    expect: Expect,
}

/// A policy set and the rows that run while it is in force.
struct Group {
    name: &'static str,
    policies: String,
    rows: Vec<Row>,
}

const P1: &str = "cluster.local/ns/default/sa/p1";
const P2: &str = "cluster.local/ns/other/sa/p2";

/// Builds the groups of [`policy_table`]. `p2_ip` is the mesh client n1-p2's address,
/// `plain_ip` the plaintext client n1-p3's.
fn table_groups(p2_ip: &str, plain_ip: &str) -> Vec<Group> {
    let p1 = Client::Pod(1, 1);
    let p2 = Client::Pod(1, 2);
    let plain = Client::Pod(1, 3);
    let node = Client::Node(2);
    let row = |name, from, dst, port, expect| Row {
        name,
        from,
        dst,
        port,
        expect,
    };
    let allow_p1_rules = format!("[{{from: [{{source: {{principals: [\"{P1}\"]}}}}]}}]");
    let plain_not_8080_rules = format!(
        "[{{from: [{{source: {{ipBlocks: [\"{plain_ip}/32\"]}}}}], \
         to: [{{operation: {{notPorts: [\"8080\"]}}}}]}}]"
    );
    let not_p1_rules = format!("[{{from: [{{source: {{notPrincipals: [\"{P1}\"]}}}}]}}]");
    let p2_address_rules = format!("[{{from: [{{source: {{ipBlocks: [\"{p2_ip}/32\"]}}}}]}}]");
    let not_plain_rules = format!("[{{from: [{{source: {{notIpBlocks: [\"{plain_ip}/32\"]}}}}]}}]");
    let dry_deny_p1_rules = allow_p1_rules.clone();
    let dry_allow_p2_rules = format!("[{{from: [{{source: {{principals: [\"{P2}\"]}}}}]}}]");

    vec![
        Group {
            name: "no policy",
            policies: String::new(),
            rows: vec![
                row("mesh peer allowed", p1, Dst::Web, 8080, delivered("")),
                row("other namespace allowed", p2, Dst::Db, 8080, delivered("")),
                row("plaintext allowed", plain, Dst::Web, 8080, delivered("")),
                row("node allowed", node, Dst::ShopWeb, 8080, delivered("")),
            ],
        },
        Group {
            name: "one ALLOW",
            policies: policy_file(&[Policy {
                namespace: "default",
                name: "allow-p1",
                app: Some("web"),
                action: "ALLOW",
                rules: &allow_p1_rules,
                dry_run: false,
            }]),
            rows: vec![
                row(
                    "ALLOW matches",
                    p1,
                    Dst::Web,
                    8080,
                    delivered("default/allow-p1"),
                ),
                row(
                    "ALLOW misses mesh peer",
                    p2,
                    Dst::Web,
                    8080,
                    denied(NO_ALLOW_MATCHED),
                ),
                row(
                    "ALLOW misses plaintext",
                    plain,
                    Dst::Web,
                    8081,
                    denied(NO_ALLOW_MATCHED),
                ),
                row(
                    "selector skips other labels",
                    p2,
                    Dst::Db,
                    8080,
                    delivered(""),
                ),
                row(
                    "policy skips other namespace",
                    p2,
                    Dst::ShopWeb,
                    8080,
                    delivered(""),
                ),
            ],
        },
        Group {
            name: "DENY and negations",
            policies: policy_file(&[
                Policy {
                    namespace: "default",
                    name: "allow-web",
                    app: Some("web"),
                    action: "ALLOW",
                    rules: "[{}]",
                    dry_run: false,
                },
                Policy {
                    namespace: "default",
                    name: "deny-other-namespace",
                    app: Some("web"),
                    action: "DENY",
                    rules: "[{from: [{source: {namespaces: [\"other\"]}}]}]",
                    dry_run: false,
                },
                Policy {
                    namespace: "default",
                    name: "deny-plain-not-8080",
                    app: Some("web"),
                    action: "DENY",
                    rules: &plain_not_8080_rules,
                    dry_run: false,
                },
                Policy {
                    namespace: "default",
                    name: "deny-not-p1",
                    app: Some("db"),
                    action: "DENY",
                    rules: &not_p1_rules,
                    dry_run: false,
                },
                Policy {
                    namespace: "shop",
                    name: "deny-not-default",
                    app: None,
                    action: "DENY",
                    rules: "[{from: [{source: {notNamespaces: [\"default\"]}}]}]",
                    dry_run: false,
                },
            ]),
            rows: vec![
                row(
                    "DENY overrides ALLOW",
                    p2,
                    Dst::Web,
                    8080,
                    denied("denied by policy default/deny-other-namespace"),
                ),
                row(
                    "ALLOW with empty rule",
                    p1,
                    Dst::Web,
                    8081,
                    delivered("default/allow-web"),
                ),
                row(
                    "namespaces skip plaintext",
                    plain,
                    Dst::Web,
                    8080,
                    delivered("default/allow-web"),
                ),
                row(
                    "notPorts matches other port",
                    plain,
                    Dst::Web,
                    8081,
                    denied("denied by policy default/deny-plain-not-8080"),
                ),
                row(
                    "notPrincipals spares listed peer",
                    p1,
                    Dst::Db,
                    8080,
                    delivered(""),
                ),
                row(
                    "notPrincipals matches other peer",
                    p2,
                    Dst::Db,
                    8080,
                    denied("denied by policy default/deny-not-p1"),
                ),
                row(
                    "notPrincipals matches plaintext",
                    node,
                    Dst::Db,
                    8080,
                    denied("denied by policy default/deny-not-p1"),
                ),
                row(
                    "notNamespaces spares listed namespace",
                    p1,
                    Dst::ShopWeb,
                    8080,
                    delivered(""),
                ),
                row(
                    "notNamespaces matches other namespace",
                    p2,
                    Dst::ShopWeb,
                    8080,
                    denied("denied by policy shop/deny-not-default"),
                ),
                row(
                    "notNamespaces matches plaintext",
                    plain,
                    Dst::ShopWeb,
                    8080,
                    denied("denied by policy shop/deny-not-default"),
                ),
            ],
        },
        Group {
            name: "root namespace, addresses and dry run",
            policies: policy_file(&[
                Policy {
                    namespace: "istio-system",
                    name: "deny-p2-address",
                    app: None,
                    action: "DENY",
                    rules: &p2_address_rules,
                    dry_run: false,
                },
                Policy {
                    namespace: "shop",
                    name: "allow-not-plain",
                    app: None,
                    action: "ALLOW",
                    rules: &not_plain_rules,
                    dry_run: false,
                },
                Policy {
                    namespace: "default",
                    name: "dry-deny-p1",
                    app: Some("web"),
                    action: "DENY",
                    rules: &dry_deny_p1_rules,
                    dry_run: true,
                },
                Policy {
                    namespace: "default",
                    name: "dry-allow-p2",
                    app: Some("db"),
                    action: "ALLOW",
                    rules: &dry_allow_p2_rules,
                    dry_run: true,
                },
            ]),
            rows: vec![
                row(
                    "root DENY by mesh peer address",
                    p2,
                    Dst::Web,
                    8080,
                    denied("denied by policy istio-system/deny-p2-address"),
                ),
                row(
                    "root DENY in other namespace",
                    p2,
                    Dst::ShopWeb,
                    8080,
                    denied("denied by policy istio-system/deny-p2-address"),
                ),
                row(
                    "notIpBlocks admits node",
                    node,
                    Dst::ShopWeb,
                    8080,
                    delivered("shop/allow-not-plain"),
                ),
                row(
                    "notIpBlocks admits mesh peer",
                    p1,
                    Dst::ShopWeb,
                    8080,
                    delivered("shop/allow-not-plain"),
                ),
                row(
                    "notIpBlocks rejects listed address",
                    plain,
                    Dst::ShopWeb,
                    8080,
                    denied(NO_ALLOW_MATCHED),
                ),
                row(
                    "dry-run DENY not enforced",
                    p1,
                    Dst::Web,
                    8080,
                    Expect::Delivered {
                        policy: "",
                        dry_run: "default/dry-deny-p1=deny",
                    },
                ),
                row(
                    "dry-run ALLOW not enforced",
                    p1,
                    Dst::Db,
                    8080,
                    Expect::Delivered {
                        policy: "",
                        dry_run: "default/dry-allow-p2=deny",
                    },
                ),
            ],
        },
    ]
}

/// Island `pttable`: the clients run on node 1 (and node 2's own namespace), the
/// servers on node 2.
///
/// | pod   | namespace | service account | labels  | role                        |
/// | ----- | --------- | --------------- | ------- | --------------------------- |
/// | n1-p1 | default   | p1              | app=cli | mesh client                 |
/// | n1-p2 | other     | p2              | app=cli | mesh client                 |
/// | n1-p3 | -         | -               | -       | plaintext client            |
/// | n2-p1 | default   | p1              | app=web | servers on 8080 and 8081    |
/// | n2-p2 | default   | p2              | app=db  | server on 8080              |
/// | n2-p3 | shop      | p3              | app=web | server on 8080              |
///
/// Node 2's own namespace is a plaintext client too, from `10.K.2.1`. Every workload
/// is permissive, so plaintext reaches the policies.
#[test]
fn policy_table() {
    let workloads = [
        workload(1, 1, "default", "cli"),
        workload(1, 2, "other", "cli"),
        workload(2, 1, "default", "web"),
        workload(2, 2, "default", "db"),
        workload(2, 3, "shop", "web"),
    ];
    let Some(setup) = setup("policy_table", "pttable", 245, &workloads, "", &[]) else {
        return;
    };
    let island = &setup.island;
    let servers: Vec<((Dst, u16), PeerServer)> = [
        (Dst::Web, 8080),
        (Dst::Web, 8081),
        (Dst::Db, 8080),
        (Dst::ShopWeb, 8080),
    ]
    .into_iter()
    .map(|(dst, port)| {
        let listen = format!("0.0.0.0:{port}");
        let server = PeerServer::start(island, island.pod(2, dst.pod()), &["echo", &listen])
            .expect("starting a server");
        ((dst, port), server)
    })
    .collect();

    let p2_ip = island.pod(1, 2).ip.to_string();
    let plain_ip = island.pod(1, 3).ip.to_string();
    // Denied rows, counted on node 2's inbound side and, for the mesh clients n1-p1 and
    // n1-p2, on node 1's outbound side.
    let (mut denied_inbound, mut denied_outbound) = (0, 0);
    for (index, group) in table_groups(&p2_ip, &plain_ip).into_iter().enumerate() {
        // The daemons started with the first group's (empty) file.
        if index > 0 {
            replace_policies(&setup, &group.policies, RELOADED);
        }
        for row in &group.rows {
            let name = format!("{} / {}", group.name, row.name);
            let server = &servers
                .iter()
                .find(|(key, _)| *key == (row.dst, row.port))
                .expect("a server for every row")
                .1;
            check_row(&setup, &name, row, server);
            if matches!(row.expect, Expect::Denied { .. }) {
                denied_inbound += 1;
                if matches!(row.from, Client::Pod(1, 1 | 2)) {
                    denied_outbound += 1;
                }
            }
        }
    }

    // A denial is its own metric result, never "error". Node 1 may record the last
    // close just after its client saw the reset.
    let mesh = &setup.mesh;
    assert_eq!(closed_count(mesh, 2, "inbound", "denied"), denied_inbound);
    wait_until("node 1 counts every denied outbound connection", || {
        closed_count(mesh, 1, "outbound", "denied") == denied_outbound
    });
    assert_eq!(closed_count(mesh, 2, "inbound", "error"), 0);
    assert_eq!(closed_count(mesh, 1, "outbound", "error"), 0);

    // The connect hook sent each app to the outbound listener on 127.0.0.1, so the
    // outbound close event's src is the app socket's loopback address.
    let log = mesh.log(1);
    let outbound_closes: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("connection closed") && line.contains("outbound"))
        .collect();
    assert!(
        !outbound_closes.is_empty(),
        "node 1 logged no outbound close:\n{log}"
    );
    for line in outbound_closes {
        assert!(
            line.contains("src=127.0.0.1:"),
            "outbound close event: {line}"
        );
    }
}

/// Runs one row's client and checks what it, the server and node 2's daemon saw.
fn check_row(setup: &TestMesh, name: &str, row: &Row, server: &PeerServer) {
    let island = &setup.island;
    let dst = format!("{}:{}", island.pod(2, row.dst.pod()).ip, row.port);
    let source = row.from.source_ip(island);
    // Accept lines of earlier rows may still be on their way.
    std::thread::sleep(Duration::from_millis(100));
    let accepted_before = accepted_count(server, &source);
    let log_offset = setup.mesh.log(2).len();

    let (line, took) = run_client(island, row.from, &["client", &dst, "--bytes", "1000"]);
    let close = close_event(&setup.mesh, log_offset, &source, &dst);
    let close = close.unwrap_or_else(|| {
        panic!(
            "{name}: node 2 logged no close event from {source} to {dst}:\n{}",
            setup.mesh.log(2)
        )
    });

    match row.expect {
        Expect::Delivered { policy, dry_run } => {
            assert_eq!(line, ECHO_OK, "{name}: client output");
            wait_until(&format!("{name}: the server accepts from {source}"), || {
                accepted_count(server, &source) > accepted_before
            });
            assert!(
                !close.contains(" error="),
                "{name}: the close event has an error: {close}"
            );
            assert!(
                close.contains(&format!(" policy=\"{policy}\"")),
                "{name}: the close event does not name policy {policy:?}: {close}"
            );
            assert!(
                close.contains(&format!(" dry_run=\"{dry_run}\"")),
                "{name}: the close event does not list dry run {dry_run:?}: {close}"
            );
        }
        Expect::Denied { error } => {
            assert_quick_reset(name, &line, took);
            assert!(
                close.contains(&format!(" error={error}")),
                "{name}: the close event does not give {error:?}: {close}"
            );
            // A pause for output still on its way, so that this check can fail.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(
                accepted_count(server, &source),
                accepted_before,
                "{name}: the server accepted a denied connection: {:?}",
                server.accepted()
            );
        }
    }
}

/// Echo requests per `mesh-peer client --repeat` run of [`Traffic`].
const REQUESTS_PER_RUN: usize = 5;

/// Starts continuous request and response traffic from `pod` to `dst`: `mesh-peer
/// client DST --bytes 1000 --repeat 5`, one run after another, until it is stopped.
/// Each run opens 5 connections in turn and prints one line.
fn start_traffic(island: &Island, pod: &Pod, dst: &str) -> Traffic {
    let repeat = REQUESTS_PER_RUN.to_string();
    Traffic::start(
        island,
        pod,
        &["client", dst, "--bytes", "1000", "--repeat", &repeat],
    )
}

/// Island `ptreload`: n1-p1 (namespace `default`, service account `p1`) and n1-p2
/// (namespace `other`, service account `p2`) are mesh clients, n1-p3 a plaintext
/// client, and n2-p1 (namespace `default`, `app=web`) runs servers on 8080 and 8081.
/// The daemons run with `--policy-reload-cuts-denied`.
///
/// n1-p1 and n1-p3 send continuous traffic to 8080, two streams each, and each client
/// keeps one connection open, while the policy file is rewritten: a new DENY on 8081,
/// a broken file, a new DENY for n1-p2, and a last change. No allowed request may
/// fail, the broken file must leave the previous policies in force, and from the
/// DENY for n1-p2 on, n1-p2's open connection is cut and its new ones are reset.
#[test]
fn policy_reload_under_traffic() {
    let workloads = [
        workload(1, 1, "default", "cli"),
        workload(1, 2, "other", "cli"),
        workload(2, 1, "default", "web"),
    ];
    // The island's addresses are fixed by its subnet, so the policies can be written
    // before it is built. The assert below checks this address.
    let plain_ip = "10.246.1.13";
    let allow_web = Policy {
        namespace: "default",
        name: "allow-web",
        app: Some("web"),
        action: "ALLOW",
        rules: &format!(
            "[{{from: [{{source: {{principals: [\"{P1}\", \"{P2}\"]}}}}]}}, \
             {{from: [{{source: {{ipBlocks: [\"{plain_ip}/32\"]}}}}]}}]"
        ),
        dry_run: false,
    };
    let deny_plain_8081 = Policy {
        namespace: "default",
        name: "deny-plain-8081",
        app: Some("web"),
        action: "DENY",
        rules: &format!(
            "[{{from: [{{source: {{ipBlocks: [\"{plain_ip}/32\"]}}}}], \
             to: [{{operation: {{ports: [\"8081\"]}}}}]}}]"
        ),
        dry_run: false,
    };
    let deny_p2 = Policy {
        namespace: "default",
        name: "deny-p2",
        app: Some("web"),
        action: "DENY",
        rules: &format!("[{{from: [{{source: {{principals: [\"{P2}\"]}}}}]}}]"),
        dry_run: false,
    };
    let dry_deny_p1 = Policy {
        namespace: "default",
        name: "dry-deny-p1",
        app: Some("web"),
        action: "DENY",
        rules: &format!("[{{from: [{{source: {{principals: [\"{P1}\"]}}}}]}}]"),
        dry_run: true,
    };

    let Some(setup) = setup(
        "policy_reload_under_traffic",
        "ptreload",
        246,
        &workloads,
        &policy_file(&[allow_web]),
        &["--policy-reload-cuts-denied"],
    ) else {
        return;
    };
    let island = &setup.island;
    assert_eq!(island.pod(1, 3).ip.to_string(), plain_ip);
    let server_pod = island.pod(2, 1);
    let server = PeerServer::start(island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server on 8080");
    let _server_8081 = PeerServer::start(island, server_pod, &["echo", "0.0.0.0:8081"])
        .expect("starting the server on 8081");
    let dst = format!("{}:8080", server_pod.ip);
    let dst_8081 = format!("{}:8081", server_pod.ip);
    let (p2, plain) = (Client::Pod(1, 2), Client::Pod(1, 3));
    let echo =
        |from: Client, dst: &str| run_client(island, from, &["client", dst, "--bytes", "1000"]);

    // One held connection per client pod of node 1, each accepted before the traffic
    // starts.
    let held_connections: Vec<(usize, HeldConnection)> = [1, 2, 3]
        .into_iter()
        .map(|pod| {
            let source = island.pod(1, pod).ip.to_string();
            let connection = HeldConnection::start(island, island.pod(1, pod), &dst);
            wait_until(
                &format!("the server accepts {source}'s held connection"),
                || accepted_count(&server, &source) == 1,
            );
            (pod, connection)
        })
        .collect();
    let traffic: Vec<Traffic> = [(1, 1), (1, 1), (1, 3), (1, 3)]
        .into_iter()
        .map(|(node, pod)| start_traffic(island, island.pod(node, pod), &dst))
        .collect();
    let wait_for_runs = |what: &str| {
        let counts: Vec<usize> = traffic.iter().map(|t| t.lines().len()).collect();
        wait_until(
            &format!("every traffic stream completes a run {what}"),
            || {
                traffic
                    .iter()
                    .zip(&counts)
                    .all(|(stream, count)| stream.lines().len() > *count)
            },
        );
    };
    wait_for_runs("before the first reload");
    let assert_plain_8081_denied = |when: &str| {
        let log_offset = setup.mesh.log(2).len();
        let (line, _) = echo(plain, &dst_8081);
        assert!(
            line.starts_with("result=reset"),
            "plaintext to 8081 {when}: expected a reset, got {line:?}"
        );
        let close = close_event(&setup.mesh, log_offset, plain_ip, &dst_8081);
        assert!(
            close
                .as_deref()
                .is_some_and(|l| l.contains(" error=denied by policy default/deny-plain-8081")),
            "plaintext to 8081 {when}: no close event naming deny-plain-8081: {close:?}"
        );
    };

    // A new DENY for another port leaves n1-p2 allowed on 8080.
    replace_policies(
        &setup,
        &policy_file(&[allow_web, deny_plain_8081]),
        RELOADED,
    );
    wait_for_runs("after the DENY on 8081");
    assert_plain_8081_denied("after the DENY on 8081");
    assert_eq!(echo(p2, &dst).0, ECHO_OK, "n1-p2 after the DENY on 8081");

    // A broken file keeps the previous policies: 8081 stays denied, 8080 allowed.
    let broken = format!(
        "{}---\n{}",
        policy_file(&[allow_web]),
        Policy {
            rules: "[{from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]}]",
            ..deny_p2
        }
        .render()
    );
    replace_policies(&setup, &broken, RELOAD_FAILED);
    wait_for_runs("after the broken file");
    assert_plain_8081_denied("after the broken file");
    assert_eq!(echo(p2, &dst).0, ECHO_OK, "n1-p2 after the broken file");

    // A DENY for n1-p2 cuts its open connection and resets its new ones.
    let denied_before_cut = closed_count(&setup.mesh, 2, "inbound", "denied");
    replace_policies(
        &setup,
        &policy_file(&[allow_web, deny_plain_8081, deny_p2]),
        RELOADED,
    );
    let p2_held = &held_connections[1].1;
    wait_until("the reload cuts n1-p2's held connection", || {
        !p2_held.lines().is_empty()
    });
    assert!(
        p2_held.lines()[0].starts_with("result=reset"),
        "n1-p2's held connection did not see a reset: {:?}",
        p2_held.lines()
    );
    let p2_ip = island.pod(1, 2).ip.to_string();
    let log = setup
        .mesh
        .log_when(2, |log| log.contains("denied by policy default/deny-p2"));
    assert!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains(&format!("src={p2_ip}:"))
            && l.contains("error=denied by policy default/deny-p2")),
        "no close event for n1-p2's cut connection:\n{log}"
    );
    // The close event is logged after the metric is counted, and n1-p2 opened no other
    // connection since the reload.
    assert_eq!(
        closed_count(&setup.mesh, 2, "inbound", "denied"),
        denied_before_cut + 1,
        "the cut connection is counted as denied"
    );
    let assert_p2_reset = |when: &str| {
        let accepted_before = accepted_count(&server, &p2_ip);
        let (line, took) = echo(p2, &dst);
        assert!(
            line.starts_with("result=reset"),
            "n1-p2 {when}: expected a reset, got {line:?}"
        );
        assert!(
            took < scaled(Duration::from_secs(1)),
            "n1-p2 {when}: the reset took {took:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            accepted_count(&server, &p2_ip),
            accepted_before,
            "n1-p2 {when}: the server accepted a denied connection"
        );
    };
    assert_p2_reset("after the DENY for n1-p2");
    wait_for_runs("after the DENY for n1-p2");

    // One more change, and the DENY for n1-p2 stays in force.
    replace_policies(
        &setup,
        &policy_file(&[deny_p2, allow_web, deny_plain_8081, dry_deny_p1]),
        RELOADED,
    );
    assert_p2_reset("after the last reload");
    wait_for_runs("after the last reload");

    for (pod, connection) in held_connections.iter().filter(|(pod, _)| *pod != 2) {
        assert!(
            connection.lines().is_empty(),
            "a reload cut the allowed held connection of n1-p{pod}: {:?}",
            connection.lines()
        );
    }
    // Each run echoes 5 requests of 1000 bytes, and any failure ends it.
    let bytes = REQUESTS_PER_RUN * 1000;
    let run_ok = format!("result=ok sent={bytes} received={bytes}");
    for (index, stream) in traffic.into_iter().enumerate() {
        let lines = stream.finish();
        let failed: Vec<&String> = lines.iter().filter(|l| **l != run_ok).collect();
        assert!(
            failed.is_empty(),
            "traffic stream {index} had failed runs out of {}: {failed:?}",
            lines.len()
        );
        // One run before the first change and one after each of the four changes.
        assert!(
            lines.len() >= 5,
            "traffic stream {index} completed only {} runs of {REQUESTS_PER_RUN} requests",
            lines.len()
        );
    }
}
