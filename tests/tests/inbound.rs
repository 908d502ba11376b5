//! Privileged end-to-end tests of inbound capture: the `sk_lookup` program in each
//! enrolled pod, strict and permissive modes, probes, exclusions in both directions,
//! the client addresses that apps see, failing closed while the daemon is down, and
//! the policy enforcement point.
//!
//! Every test builds its own island (prefixes starting with `in`, subnets 232 to 239),
//! so the tests run in parallel with each other and with the other test files.

use std::path::Path;
use std::time::Duration;

use interceptor_tests::clients::{
    accepted_count, accepted_from, accepted_so_far, assert_quick_reset, eth0_index,
    link_local_addr, run_client, wait_until, Client, HeldConnection,
};
use interceptor_tests::mesh::PeerServer;
use interceptor_tests::setup::{start_test_mesh, work_dir, Enroll, MeshOptions};
use interceptor_tests::{DirectoryExtras, Island};

const ECHO_OK: &str = "result=ok sent=1000 received=1000";

/// What a client should see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The echo (or banner and echo) completes, and the server saw the client's own
    /// address as the peer.
    Delivered,
    /// The connection is refused (a reset in reply to the SYN), and the server never
    /// accepts it.
    Refused,
}

/// One row of the inbound table: a client, a server `(node, pod, port)` and what the
/// client must see.
struct Case {
    name: &'static str,
    from: Client,
    server: (usize, usize, u16),
    expect_banner: Option<&'static str>,
    expect: Expect,
}

const BANNER: &str = "220-server-first";

/// Island `inmode`: the clients run on node 1, the servers on node 2.
///
/// | pod    | enrolled | role                                                        |
/// | ------ | -------- | ----------------------------------------------------------- |
/// | n1-p1  | yes      | mesh client, outbound exclusions: port 7000, 10.K.1.13/32   |
/// | n1-p2  | no       | plaintext client                                            |
/// | n1-p3  | no       | plaintext client in the strict server's excluded network    |
/// | n2-p1  | yes      | strict server (from its namespace's mode), probe port 8081, |
/// |        |          | excluded inbound port 9000 and network 10.K.1.13/32         |
/// | n2-p2  | yes      | permissive server (its own mode), banner on 8082            |
/// | n2-p3  | no       | plain servers on 7000 and 7001                              |
fn modes_extras(island: &Island, _work_dir: &Path) -> DirectoryExtras {
    let mut extras = DirectoryExtras {
        top: "[namespaces.default]\ninbound_mode = \"strict\"\n".to_owned(),
        ..DirectoryExtras::default()
    };
    let probe = island.node(2).pod_gateway_ip;
    extras.sections.insert(
        island.node(2).name.clone(),
        format!("probe_addr = \"{probe}\"\n"),
    );
    let excluded_client = island.pod(1, 3).ip;
    extras.sections.insert(
        island.pod(1, 1).name.clone(),
        format!(
            "outbound_exclude_ports = [7000]\noutbound_exclude_cidrs = [\"{excluded_client}/32\"]\n"
        ),
    );
    extras.sections.insert(
        island.pod(2, 1).name.clone(),
        format!(
            "labels = {{ app = \"strict\" }}\nprobe_ports = [8081]\n\
             inbound_exclude_ports = [9000]\ninbound_exclude_cidrs = [\"{excluded_client}/32\"]\n"
        ),
    );
    extras.sections.insert(
        island.pod(2, 2).name.clone(),
        "labels = { app = \"permissive\" }\ninbound_mode = \"permissive\"\n".to_owned(),
    );
    extras
}

#[test]
fn inbound_modes_probes_and_exclusions() {
    let Some(setup) = start_test_mesh(
        "inbound_modes_probes_and_exclusions",
        "inmode",
        232,
        MeshOptions {
            pods_per_node: 3,
            enroll: Enroll::Pods(&[(1, 1), (2, 1), (2, 2)]),
            extras: Some(&modes_extras),
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let island = &setup.island;
    let start = |node: usize, pod: usize, args: &[&str]| {
        PeerServer::start(island, island.pod(node, pod), args).expect("starting a server")
    };
    let servers = [
        ((2, 1, 8080), start(2, 1, &["echo", "0.0.0.0:8080"])),
        ((2, 1, 8081), start(2, 1, &["echo", "0.0.0.0:8081"])),
        ((2, 1, 9000), start(2, 1, &["echo", "0.0.0.0:9000"])),
        ((2, 2, 8080), start(2, 2, &["echo", "0.0.0.0:8080"])),
        (
            (2, 2, 8082),
            start(2, 2, &["banner", "0.0.0.0:8082", BANNER]),
        ),
    ];
    let mesh_client = Client::Pod(1, 1);
    let plain_client = Client::Pod(1, 2);
    let excluded_client = Client::Pod(1, 3);
    let probe = Client::Node(2);
    let cases = [
        Case {
            name: "mesh client to strict",
            from: mesh_client,
            server: (2, 1, 8080),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "mesh client to permissive",
            from: mesh_client,
            server: (2, 2, 8080),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "plaintext to strict",
            from: plain_client,
            server: (2, 1, 8080),
            expect_banner: None,
            expect: Expect::Refused,
        },
        Case {
            name: "plaintext to permissive",
            from: plain_client,
            server: (2, 2, 8080),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "plaintext server-first to permissive",
            from: plain_client,
            server: (2, 2, 8082),
            expect_banner: Some(BANNER),
            expect: Expect::Delivered,
        },
        Case {
            name: "mesh client server-first to permissive",
            from: mesh_client,
            server: (2, 2, 8082),
            expect_banner: Some(BANNER),
            expect: Expect::Delivered,
        },
        Case {
            name: "plaintext to strict excluded port",
            from: plain_client,
            server: (2, 1, 9000),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "plaintext to strict from excluded network",
            from: excluded_client,
            server: (2, 1, 8080),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "plaintext to strict probe port from a pod",
            from: plain_client,
            server: (2, 1, 8081),
            expect_banner: None,
            expect: Expect::Refused,
        },
        Case {
            name: "probe address to strict probe port",
            from: probe,
            server: (2, 1, 8081),
            expect_banner: None,
            expect: Expect::Delivered,
        },
        Case {
            name: "probe address to strict other port",
            from: probe,
            server: (2, 1, 8080),
            expect_banner: None,
            expect: Expect::Refused,
        },
    ];

    for case in &cases {
        let (node, pod, port) = case.server;
        let server = &servers
            .iter()
            .find(|(key, _)| *key == case.server)
            .expect("a server for every case")
            .1;
        let dst = format!("{}:{port}", island.pod(node, pod).ip);
        let mut args = vec!["client", dst.as_str(), "--bytes", "1000"];
        if let Some(banner) = case.expect_banner {
            args.extend(["--expect-banner", banner]);
        }
        let source = case.from.source_ip(island);
        let accepted_before = accepted_so_far(server, &source);
        let (line, _) = run_client(island, case.from, &args);
        match case.expect {
            Expect::Delivered => {
                assert_eq!(line, ECHO_OK, "{}", case.name);
                assert!(
                    accepted_from(server, &source),
                    "{}: the server did not see the client's address {source}; it saw {:?}",
                    case.name,
                    server.accepted()
                );
            }
            Expect::Refused => {
                assert!(
                    line.starts_with("result=refused"),
                    "{}: expected a refused connection, got {line:?}",
                    case.name
                );
                assert!(
                    !accepted_before && !accepted_so_far(server, &source),
                    "{}: the server accepted a connection it must not see: {:?}",
                    case.name,
                    server.accepted()
                );
            }
        }
    }

    // The permissive server's plaintext went through the daemon's plaintext listener,
    // and the mesh client's connections through the tunnel.
    let permissive_dst = format!("{}:8080", island.pod(2, 2).ip);
    let log = setup.mesh.log_when(2, |log| {
        log.lines()
            .filter(|l| l.contains("connection closed") && l.contains(&permissive_dst))
            .count()
            >= 2
    });
    let closes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains(&permissive_dst))
        .collect();
    assert!(
        closes.iter().any(|l| l.contains("mode=\"plaintext\"")),
        "no plaintext close event for {permissive_dst}:\n{log}"
    );
    assert!(
        closes.iter().any(|l| l.contains("mode=\"tunnel\"")),
        "no tunnel close event for {permissive_dst}:\n{log}"
    );
}

#[test]
fn outbound_exclusions_bypass_the_mesh() {
    let Some(setup) = start_test_mesh(
        "outbound_exclusions_bypass_the_mesh",
        "inexcl",
        235,
        MeshOptions {
            pods_per_node: 3,
            enroll: Enroll::Pods(&[(1, 1)]),
            extras: Some(&modes_extras),
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let island = &setup.island;
    let _servers = [
        PeerServer::start(island, island.pod(2, 3), &["echo", "0.0.0.0:7000"]),
        PeerServer::start(island, island.pod(2, 3), &["echo", "0.0.0.0:7001"]),
        PeerServer::start(island, island.pod(1, 3), &["echo", "0.0.0.0:7001"]),
    ]
    .map(|server| server.expect("starting a server"));
    let excluded_port = format!("{}:7000", island.pod(2, 3).ip);
    let excluded_network = format!("{}:7001", island.pod(1, 3).ip);
    let captured = format!("{}:7001", island.pod(2, 3).ip);

    // `connect-only` prints the local address of its socket: the pod's address when
    // the connect was left alone, loopback when it was redirected to the outbound
    // listener.
    let pod_local = format!("local={}:", island.pod(1, 1).ip);
    for (name, dst, local) in [
        ("excluded port", &excluded_port, pod_local.as_str()),
        ("excluded network", &excluded_network, pod_local.as_str()),
        ("captured", &captured, "local=127.0.0.1:"),
    ] {
        let (line, _) = run_client(island, Client::Pod(1, 1), &["connect-only", dst]);
        assert!(
            line.starts_with(&format!("result=connected {local}")),
            "{name}: expected {local}, got {line:?}"
        );
    }
    let log = setup
        .mesh
        .log_when(1, |log| log.contains(&format!("dst=\"{captured}\"")));
    assert!(
        log.contains(&format!("dst=\"{captured}\"")),
        "no close event for the captured connect:\n{log}"
    );
    for dst in [&excluded_port, &excluded_network] {
        assert!(
            !log.contains(&format!("dst=\"{dst}\"")),
            "the daemon carried the excluded connect to {dst}:\n{log}"
        );
    }
}

/// Island `inclosed`: n1-p1 is a mesh client, n1-p2 a plaintext client, n2-p1 a
/// permissive server with probe port 8081 and excluded port 9000.
fn closed_extras(island: &Island, _work_dir: &Path) -> DirectoryExtras {
    let mut extras = DirectoryExtras::default();
    let probe = island.node(2).pod_gateway_ip;
    extras.sections.insert(
        island.node(2).name.clone(),
        format!("probe_addr = \"{probe}\"\n"),
    );
    extras.sections.insert(
        island.pod(2, 1).name.clone(),
        "probe_ports = [8081]\ninbound_exclude_ports = [9000]\n".to_owned(),
    );
    extras
}

#[test]
fn inbound_fails_closed_without_daemon() {
    let Some(mut setup) = start_test_mesh(
        "inbound_fails_closed_without_daemon",
        "inclosed",
        233,
        MeshOptions {
            pods_per_node: 2,
            enroll: Enroll::Pods(&[(1, 1), (2, 1)]),
            extras: Some(&closed_extras),
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let island = &setup.island;
    let server_pod = island.pod(2, 1);
    let app =
        PeerServer::start(island, server_pod, &["echo", "0.0.0.0:8080"]).expect("starting the app");
    let probe_app = PeerServer::start(island, server_pod, &["echo", "0.0.0.0:8081"])
        .expect("starting the probe app");
    let excluded_app = PeerServer::start(island, server_pod, &["echo", "0.0.0.0:9000"])
        .expect("starting the excluded app");
    let _ipv6_app = PeerServer::start(island, server_pod, &["echo", "[::]:8086"])
        .expect("starting the IPv6 app");
    // Pods of one node share a bridge, so n2-p2 reaches n2-p1's link-local address
    // once both addresses have left duplicate address detection.
    let ipv6_client = Client::Pod(2, 2);
    link_local_addr(island.pod(2, 2));
    let ipv6_addr = format!(
        "[{}%{}]:8086",
        link_local_addr(server_pod),
        eth0_index(island.pod(2, 2))
    );
    let app_addr = format!("{}:8080", server_pod.ip);
    let probe_addr = format!("{}:8081", server_pod.ip);
    let excluded_addr = format!("{}:9000", server_pod.ip);
    let plain_client = Client::Pod(1, 2);
    let mesh_client = Client::Pod(1, 1);
    let echo =
        |from: Client, dst: &str| run_client(island, from, &["client", dst, "--bytes", "1000"]).0;

    let plain_ip = island.pod(1, 2).ip.to_string();
    let mesh_ip = island.pod(1, 1).ip.to_string();
    assert_eq!(echo(plain_client, &app_addr), ECHO_OK, "with the daemon up");
    let ipv6 = echo(ipv6_client, &ipv6_addr);
    assert!(
        ipv6.starts_with("result=refused"),
        "plaintext over IPv6 to an enrolled pod: {ipv6:?}"
    );
    assert!(
        accepted_from(&app, &plain_ip),
        "no accept with the daemon up"
    );
    setup.mesh.kill_daemon(2).expect("killing the daemon");

    let plain = echo(plain_client, &app_addr);
    assert!(
        plain.starts_with("result=refused"),
        "plaintext with the daemon down: {plain:?}"
    );
    let mesh = echo(mesh_client, &app_addr);
    assert!(
        !mesh.starts_with("result=ok"),
        "mesh client with the daemon down: {mesh:?}"
    );
    assert!(
        !accepted_so_far(&app, &mesh_ip) && accepted_count(&app, &plain_ip) == 1,
        "the app accepted a connection while the daemon was down: {:?}",
        app.accepted()
    );
    assert_eq!(
        echo(Client::Node(2), &probe_addr),
        ECHO_OK,
        "probe with the daemon down"
    );
    assert!(accepted_from(
        &probe_app,
        &island.node(2).pod_gateway_ip.to_string()
    ));
    assert_eq!(
        echo(plain_client, &excluded_addr),
        ECHO_OK,
        "excluded port with the daemon down"
    );
    assert!(accepted_from(&excluded_app, &plain_ip));

    setup.mesh.start_daemon(2).expect("restarting the daemon");
    let log = setup.mesh.log(2);
    assert!(
        log.contains("took over pinned link") && log.contains("interceptor_sk_lookup@netns-"),
        "the restarted daemon did not take over the sk_lookup link:\n{log}"
    );
    assert_eq!(echo(plain_client, &app_addr), ECHO_OK, "after the restart");
    assert_eq!(
        echo(mesh_client, &app_addr),
        ECHO_OK,
        "mesh after the restart"
    );
    assert!(
        accepted_from(&app, &mesh_ip),
        "the app did not see the mesh client's address after the restart"
    );

    // Uninstall detaches sk_lookup: plaintext reaches the app directly again.
    setup.mesh.stop_daemon(2).expect("stopping the daemon");
    let output = setup
        .mesh
        .uninstall(2)
        .expect("running interceptor uninstall");
    assert!(output.status.success(), "uninstall failed: {output:?}");
    assert_eq!(echo(plain_client, &app_addr), ECHO_OK, "after uninstall");
    assert_eq!(
        echo(ipv6_client, &ipv6_addr),
        ECHO_OK,
        "IPv6 after uninstall"
    );
}

fn deny_policy(name: &str, from: &str, port: u16) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: default
spec:
  selector:
    matchLabels:
      app: web
  action: DENY
  rules:
  - from:
    - source:
        {from}
    to:
    - operation:
        ports: [\"{port}\"]
"
    )
}

/// Island `inpolicy`: n1-p1 is a mesh client (service account `p1`), n1-p2 a plaintext
/// client, n2-p1 a permissive server labelled `app=web`. The policy file denies the
/// plaintext client on port 8080 and the mesh client on port 8083; port 8084 is open.
#[test]
fn denied_clients_are_reset() {
    let policy_path = work_dir("e2e", "inpolicy").join("policies.yaml");
    let policy_arg = policy_path.to_string_lossy().into_owned();
    let extras = |island: &Island, _work_dir: &Path| {
        let plain = island.pod(1, 2).ip;
        let text = [
            deny_policy("deny-plain", &format!("ipBlocks: [\"{plain}/32\"]"), 8080),
            deny_policy(
                "deny-mesh",
                "principals: [\"cluster.local/ns/default/sa/p1\"]",
                8083,
            ),
        ]
        .join("---\n");
        std::fs::write(&policy_path, text).expect("writing the policy file");
        let mut extras = DirectoryExtras::default();
        extras.sections.insert(
            island.pod(2, 1).name.clone(),
            "labels = { app = \"web\" }\n".to_owned(),
        );
        extras
    };
    let Some(setup) = start_test_mesh(
        "denied_clients_are_reset",
        "inpolicy",
        234,
        MeshOptions {
            enroll: Enroll::Pods(&[(1, 1), (2, 1)]),
            extras: Some(&extras),
            daemon_args: &["--policies", &policy_arg],
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let island = &setup.island;
    let server_pod = island.pod(2, 1);
    let servers: Vec<(u16, PeerServer)> = [8080, 8083, 8084]
        .into_iter()
        .map(|port| {
            let listen = format!("0.0.0.0:{port}");
            let server = PeerServer::start(island, server_pod, &["echo", &listen])
                .expect("starting a server");
            (port, server)
        })
        .collect();
    let plain_client = Client::Pod(1, 2);
    let mesh_client = Client::Pod(1, 1);
    let cases = [
        ("plaintext denied", plain_client, 8080, false),
        ("mesh denied", mesh_client, 8083, false),
        ("plaintext allowed", plain_client, 8084, true),
        ("mesh allowed", mesh_client, 8084, true),
    ];
    for (name, from, port, allowed) in cases {
        let server = &servers
            .iter()
            .find(|(p, _)| *p == port)
            .expect("a server per port")
            .1;
        let dst = format!("{}:{port}", server_pod.ip);
        let source = from.source_ip(island);
        let (line, took) = run_client(island, from, &["client", &dst, "--bytes", "1000"]);
        if allowed {
            assert_eq!(line, ECHO_OK, "{name}");
            assert!(
                accepted_from(server, &source),
                "{name}: no accept from {source}"
            );
            continue;
        }
        assert_quick_reset(name, &line, took);
        assert!(
            !accepted_so_far(server, &source),
            "{name}: the app accepted a denied connection"
        );
    }

    let log = setup
        .mesh
        .log_when(2, |log| log.matches("denied by policy").count() >= 2);
    let denials: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains("denied by policy"))
        .collect();
    assert!(
        denials.iter().any(|l| l.contains("default/deny-plain")
            && l.contains(&format!("{}:8080", server_pod.ip))
            && l.contains("spiffe://cluster.local/ns/default/sa/p1")),
        "no denial naming deny-plain, the port and the destination identity:\n{log}"
    );
    assert!(
        denials.iter().any(|l| l.contains("default/deny-mesh")
            && l.contains(&format!("{}:8083", server_pod.ip))
            && l.contains("src_identity=\"spiffe://cluster.local/ns/default/sa/p1\"")),
        "no denial naming deny-mesh and the source identity:\n{log}"
    );

    // A reloaded file takes effect for new connections without a restart, and by
    // default an open connection that the new file denies keeps running.
    let server_8084 = &servers[2].1;
    let dst_8084 = format!("{}:8084", server_pod.ip);
    let plain_ip = island.pod(1, 2).ip.to_string();
    let open_8084 = || {
        // Lines of earlier connections may still be on their way.
        std::thread::sleep(Duration::from_millis(200));
        let before = accepted_count(server_8084, &plain_ip);
        let open_connection = HeldConnection::start(island, island.pod(1, 2), &dst_8084);
        wait_until("the held connection is accepted", || {
            accepted_count(server_8084, &plain_ip) > before
        });
        open_connection
    };
    let open_connection = open_8084();
    let plain = island.pod(1, 2).ip;
    let deny_8084 = deny_policy("deny-8084", &format!("ipBlocks: [\"{plain}/32\"]"), 8084);
    std::fs::write(&policy_path, &deny_8084).expect("rewriting the policy file");
    wait_until("the reloaded policy denies new connections", || {
        let (line, _) = run_client(
            island,
            plain_client,
            &["client", &dst_8084, "--bytes", "10"],
        );
        line.starts_with("result=reset")
    });
    assert!(
        open_connection.lines().is_empty(),
        "the reload cut an open connection by default: {:?}",
        open_connection.lines()
    );
    drop(open_connection);

    // With --policy-reload-cuts-denied, the reload resets it.
    let mut mesh = setup.mesh;
    mesh.stop_daemon(2).expect("stopping the daemon");
    let allow_8084 = deny_policy("deny-other", "ipBlocks: [\"192.0.2.1/32\"]", 1);
    std::fs::write(&policy_path, allow_8084).expect("rewriting the policy file");
    mesh.restart_daemon_with(2, &["--policy-reload-cuts-denied"])
        .expect("restarting the daemon");
    let open_connection = open_8084();
    std::fs::write(&policy_path, &deny_8084).expect("rewriting the policy file");
    wait_until("the reload cuts the open connection", || {
        !open_connection.lines().is_empty()
    });
    assert!(
        open_connection.lines()[0].starts_with("result=reset"),
        "the cut connection did not see a reset: {:?}",
        open_connection.lines()
    );
    let log = mesh.log_when(2, |log| log.contains("default/deny-8084"));
    assert!(
        log.lines()
            .any(|l| l.contains("connection closed")
                && l.contains("denied by policy default/deny-8084")),
        "no close event for the cut connection:\n{log}"
    );
}
