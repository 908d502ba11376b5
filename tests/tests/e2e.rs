//! Privileged end-to-end tests: real network namespaces, cgroups, eBPF programs and
//! TLS on the wire, with the `interceptor` daemon and `mesh-peer` apps as separate
//! processes. Run as root through `cargo xtask test`, which builds the eBPF object and
//! the binaries first.
//!
//! Every test builds its own island with its own prefix and subnet, so the tests run
//! in parallel and never touch each other's state.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use interceptor_tests::clients::{run_client, spiffe_id, stdout_line, Client};
use interceptor_tests::mesh::{scaled, PeerServer};
use interceptor_tests::setup::{start_test_mesh, work_dir, Enroll, MeshOptions, TestMesh, WorkDir};
use interceptor_tests::{
    contains, mesh_peer_payload, require_privileges, tls_record_counts, Capture, Pod,
};

#[test]
fn cross_node_bytes_arrive_over_mtls() {
    let Some(setup) = start_test_mesh(
        "cross_node_bytes_arrive_over_mtls",
        "xn",
        211,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 2);
    let server_pod = setup.island.pod(2, 1);
    let server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let pcap = setup.work_dir.join("wire.pcap");
    let capture =
        Capture::start(&setup.island.node(1).netns_path, "wire", &pcap).expect("starting tcpdump");

    let dst = format!("{}:8080", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "300000"],
    );
    assert_eq!(result, "result=ok sent=300000 received=300000");
    // A dual-stack socket connecting to the IPv4-mapped address takes connect6.
    let mapped = format!("[::ffff:{}]:8080", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &mapped, "--bytes", "1000"],
    );
    assert_eq!(result, "result=ok sent=1000 received=1000");
    capture.stop().expect("stopping tcpdump");

    let marker = &mesh_peer_payload(19 * 43)[19 * 42..];
    assert!(
        !contains(&pcap, marker),
        "the wire carried the payload in cleartext"
    );
    let (handshakes, records) = tls_record_counts(&pcap, 15008);
    assert!(
        handshakes >= 2,
        "expected TLS handshake records on the wire, saw {handshakes}"
    );
    assert!(
        records >= 20,
        "expected TLS application data records on the wire, saw {records}"
    );
    assert_eq!(
        server.accepted().len(),
        2,
        "server accepts: {:?}",
        server.accepted()
    );

    let identities = format!(
        "src_identity=\"{}\" dst_identity=\"{}\"",
        spiffe_id(client_pod),
        spiffe_id(server_pod)
    );
    let closed_cleanly = |log: &str| {
        log.lines().any(|l| {
            l.contains("connection closed") && l.contains(&identities) && !l.contains("error=")
        })
    };
    let client_log = setup.mesh.log_when(1, |log| closed_cleanly(log));
    let server_log = setup.mesh.log_when(2, |log| closed_cleanly(log));
    assert!(
        closed_cleanly(&client_log),
        "client-side log:\n{client_log}"
    );
    assert!(
        closed_cleanly(&server_log),
        "server-side log:\n{server_log}"
    );
    let metrics = setup
        .mesh
        .admin_get(1, "/metrics")
        .expect("fetching node 1 metrics");
    let tls = if expect_ktls() { "ktls" } else { "userspace" };
    let series = format!("interceptor_connections_closed_total{{direction=\"outbound\",mode=\"tunnel\",tls=\"{tls}\"");
    let closed: u64 = metrics
        .lines()
        .filter(|l| l.starts_with(&series) && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(closed, 2, "metrics:\n{metrics}");
    assert!(
        client_log.contains("bytes_sent=300000 bytes_received=300000"),
        "client-side log:\n{client_log}"
    );
}

#[test]
fn tcp_semantics_survive_the_tunnel() {
    let Some(setup) = start_test_mesh(
        "tcp_semantics_survive_the_tunnel",
        "ts",
        212,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _banner = PeerServer::start(
        &setup.island,
        server_pod,
        &["banner", "0.0.0.0:8081", "220-hello"],
    )
    .expect("banner server");
    let _reset = PeerServer::start(&setup.island, server_pod, &["reset", "0.0.0.0:8082"])
        .expect("reset server");

    // A server that speaks first is heard before the client sends anything.
    let dst = format!("{}:8081", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &[
            "client",
            &dst,
            "--expect-banner",
            "220-hello",
            "--bytes",
            "5000",
        ],
    );
    assert_eq!(result, "result=ok sent=5000 received=5000");

    // The server's reset reaches the client as a reset.
    let dst = format!("{}:8082", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "100000"],
    );
    assert!(result.starts_with("result=reset"), "{result}");

    // Nothing listens on 8090: the app's connect succeeded on loopback, so it sees a
    // reset, within a second (times the time scale, like every time limit here).
    let dst = format!("{}:8090", server_pod.ip);
    let (result, took) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "10"],
    );
    assert!(
        result.starts_with("result=reset") || result.starts_with("result=eof-early"),
        "{result}"
    );
    assert!(
        took < scaled(Duration::from_secs(2)),
        "refused destination took {took:?}"
    );

    // The tunnel delivers to its own pod only, never to the daemon's ports.
    let dst = format!("{}:15008", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "10"],
    );
    assert!(!result.starts_with("result=ok"), "{result}");
    let server_log = setup.mesh.log_when(2, |log| log.contains("which this pod"));
    assert!(
        server_log.contains("which this pod"),
        "server-side log:\n{server_log}"
    );
}

fn first_pod_of_each_node(pod: &Pod) -> bool {
    pod.index == 1
}

#[test]
fn non_enrolled_pods_and_passthrough() {
    let Some(setup) = start_test_mesh(
        "non_enrolled_pods_and_passthrough",
        "ne",
        213,
        MeshOptions {
            enroll: Enroll::Matching(first_pod_of_each_node),
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let enrolled_client = setup.island.pod(1, 1);
    let plain_client = setup.island.pod(1, 2);
    let plain_server = setup.island.pod(2, 2);
    let server = PeerServer::start(&setup.island, plain_server, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let pcap = setup.work_dir.join("wire.pcap");
    let capture =
        Capture::start(&setup.island.node(1).netns_path, "wire", &pcap).expect("starting tcpdump");

    // A pod that is not enrolled talks plain TCP, untouched: its bytes are on the wire.
    let dst = format!("{}:8080", plain_server.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(plain_client),
        &["client", &dst, "--bytes", "2000"],
    );
    assert_eq!(result, "result=ok sent=2000 received=2000");
    capture.stop().expect("stopping tcpdump");
    assert!(
        contains(&pcap, &mesh_peer_payload(2000)[1900..1919]),
        "non-enrolled traffic was not plain TCP"
    );
    assert!(
        !setup.mesh.log(1).contains("connection closed"),
        "the daemon saw a non-enrolled pod's connection"
    );

    // An enrolled pod reaching a destination outside the mesh goes through the daemon
    // as plain passthrough; the daemon's own upstream connect from inside the pod is not
    // redirected again, or this would loop back to the daemon.
    let (result, _) = run_client(
        &setup.island,
        Client::from(enrolled_client),
        &["client", &dst, "--bytes", "2000"],
    );
    assert_eq!(result, "result=ok sent=2000 received=2000");
    let log = setup
        .mesh
        .log_when(1, |log| log.contains("mode=\"passthrough\""));
    assert!(
        log.lines()
            .any(|l| l.contains("mode=\"passthrough\"") || l.contains("mode=passthrough")),
        "log:\n{log}"
    );
    // The server's output is collected by a thread, so its accept line may lag a little.
    let from_enrolled = |sources: &[String]| {
        sources
            .iter()
            .any(|s| s.starts_with(&format!("{}:", enrolled_client.ip)))
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    while !from_enrolled(&server.accepted()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sources = server.accepted();
    assert!(
        from_enrolled(&sources),
        "passthrough should come from the enrolled pod's address: {sources:?}"
    );
}

#[test]
fn daemon_down_fails_closed_and_restart_takes_over() {
    let Some(mut setup) = start_test_mesh(
        "daemon_down_fails_closed_and_restart_takes_over",
        "fc",
        214,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1).clone();
    let server_pod = setup.island.pod(2, 1).clone();
    let node = setup.island.node(1).name.clone();
    let _server = PeerServer::start(&setup.island, &server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = format!("{}:8080", server_pod.ip);
    let pins = PathBuf::from("/sys/fs/bpf/interceptor").join(&node);
    let links = |pins: &PathBuf| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(pins)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains('@'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    // Three cgroup programs on the node, and sk_lookup in each of its two pods.
    assert_eq!(links(&pins).len(), 5, "pinned links: {:?}", links(&pins));

    setup.mesh.stop_daemon(1).expect("stopping the daemon");
    let pcap = setup.work_dir.join("wire.pcap");
    let capture =
        Capture::start(&setup.island.node(1).netns_path, "wire", &pcap).expect("starting tcpdump");
    let (result, _) = run_client(
        &setup.island,
        Client::from(&client_pod),
        &["connect-only", &dst],
    );
    assert!(
        result.starts_with("result=refused"),
        "with the daemon down: {result}"
    );
    let (result, _) = run_client(
        &setup.island,
        Client::from(&client_pod),
        &["client", &dst, "--bytes", "500"],
    );
    assert!(
        !result.starts_with("result=ok"),
        "with the daemon down: {result}"
    );
    capture.stop().expect("stopping tcpdump");
    let leaked = interceptor_tests::tcp_payloads(&pcap);
    assert!(
        leaked.is_empty(),
        "bytes reached the wire with the daemon down: {leaked:?}"
    );

    let before = links(&pins);
    setup.mesh.start_daemon(1).expect("restarting the daemon");
    assert_eq!(
        links(&pins),
        before,
        "a restart must take the pinned links over, not add more"
    );
    assert!(
        setup.mesh.log(1).contains("took over pinned link"),
        "log:\n{}",
        setup.mesh.log(1)
    );
    let (result, _) = run_client(
        &setup.island,
        Client::from(&client_pod),
        &["client", &dst, "--bytes", "500"],
    );
    assert_eq!(result, "result=ok sent=500 received=500");

    setup.mesh.stop_daemon(1).expect("stopping the daemon");
    let output = setup.mesh.uninstall(1).expect("running uninstall");
    assert!(
        output.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!pins.exists(), "uninstall left {}", pins.display());
}

#[test]
fn bad_peers_are_rejected_and_others_served() {
    let handshake_timeout = scaled(Duration::from_secs(1));
    let handshake_timeout_arg = format!("{}ms", handshake_timeout.as_millis());
    let Some(setup) = start_test_mesh(
        "bad_peers_are_rejected_and_others_served",
        "bp",
        215,
        MeshOptions {
            enroll: Enroll::Matching(first_pod_of_each_node),
            daemon_args: &["--handshake-timeout", &handshake_timeout_arg],
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let outsider = setup.island.pod(1, 2);
    let server_pod = setup.island.pod(2, 1);
    let _server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let tunnel = format!("{}:15008", server_pod.ip);

    // Plaintext garbage at the tunnel port from a pod outside the mesh.
    let (result, _) = run_client(
        &setup.island,
        Client::from(outsider),
        &["client", &tunnel, "--bytes", "4000"],
    );
    assert!(!result.starts_with("result=ok"), "{result}");
    // A peer that sends nothing is cut off at the handshake timeout.
    let (result, took) = run_client(
        &setup.island,
        Client::from(outsider),
        &[
            "client",
            &tunnel,
            "--expect-banner",
            "never",
            "--bytes",
            "1",
        ],
    );
    assert!(!result.starts_with("result=ok"), "{result}");
    assert!(
        took < scaled(Duration::from_secs(5)),
        "silent peer held for {took:?}"
    );

    let log = setup.mesh.log_when(2, |log| {
        log.contains("TLS handshake with") && log.contains("did not complete within")
    });
    assert!(
        log.contains("TLS handshake with"),
        "server-side log:\n{log}"
    );
    assert!(
        log.contains(&format!("did not complete within {handshake_timeout:?}")),
        "server-side log:\n{log}"
    );

    let dst = format!("{}:8080", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "1000"],
    );
    assert_eq!(result, "result=ok sent=1000 received=1000");
}

/// Whether the kernel under test must carry the tunnels with kernel TLS (set by the
/// QEMU guest runner, whose stock kernel has the `tls` module).
fn expect_ktls() -> bool {
    std::env::var("INTERCEPTOR_EXPECT_KTLS").as_deref() == Ok("1")
}

/// The `tls=` field every tunnelled close event must carry on this kernel.
fn expected_tls_field() -> &'static str {
    if expect_ktls() {
        "tls=\"ktls\" cipher=\"CHACHA20-POLY1305\""
    } else {
        "tls=\"userspace\""
    }
}

/// Reads the kernel TLS counters of `pod`'s namespace (`/proc/net/tls_stat`); empty
/// when the kernel has no TLS module loaded.
fn tls_stat(pod: &Pod) -> std::collections::HashMap<String, u64> {
    let mut command = std::process::Command::new("cat");
    command
        .arg("/proc/net/tls_stat")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let child = interceptor_tests::spawn_in(&pod.netns_path, None, &mut command)
        .expect("running cat in the pod");
    let output = child.wait_with_output().expect("reading tls_stat");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.parse().ok()?))
        })
        .collect()
}

fn tunnel_closes(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("connection closed") && l.contains("mode=\"tunnel\""))
        .collect()
}

#[test]
fn transfers_of_every_size_arrive_intact() {
    let Some(setup) = start_test_mesh(
        "transfers_of_every_size_arrive_intact",
        "sz",
        216,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = format!("{}:8080", server_pod.ip);
    let sizes: &[usize] = &[1, 100, 16_384, 16_385, 1 << 20, 64 << 20];
    for size in sizes {
        let bytes = size.to_string();
        let (result, _) = run_client(
            &setup.island,
            Client::from(client_pod),
            &["client", &dst, "--bytes", &bytes],
        );
        assert_eq!(
            result,
            format!("result=ok sent={size} received={size}"),
            "transfer of {size} bytes"
        );
    }

    for node in [1, 2] {
        let log = setup
            .mesh
            .log_when(node, |log| tunnel_closes(log).len() >= sizes.len());
        let closes = tunnel_closes(&log);
        assert_eq!(closes.len(), sizes.len(), "node {node} log:\n{log}");
        for line in closes {
            assert!(
                line.contains(expected_tls_field()),
                "expected {}: {line}",
                expected_tls_field()
            );
            assert!(!line.contains("error="), "{line}");
        }
    }
    if expect_ktls() {
        // The counters of both pods' namespaces count the offloaded sockets.
        for pod in [client_pod, server_pod] {
            let stat = tls_stat(pod);
            for counter in ["TlsTxSw", "TlsRxSw"] {
                let value = stat.get(counter).copied().unwrap_or(0);
                assert!(
                    value >= sizes.len() as u64,
                    "{counter} in {}: {value}, all: {stat:?}",
                    pod.name
                );
            }
        }
    }
}

#[test]
fn first_bytes_after_handshake_are_not_lost() {
    let Some(setup) = start_test_mesh(
        "first_bytes_after_handshake_are_not_lost",
        "fb",
        217,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = format!("{}:8080", server_pod.ip);
    // A thousand connections, each sending its first bytes right behind the preamble.
    let connections = 1000;
    let repeat = connections.to_string();
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "300", "--repeat", &repeat],
    );
    assert_eq!(
        result,
        format!(
            "result=ok sent={} received={}",
            300 * connections,
            300 * connections
        )
    );
    let clean_closes = |log: &str| {
        tunnel_closes(log)
            .iter()
            .filter(|l| !l.contains("error="))
            .count()
    };
    let log = setup
        .mesh
        .log_when(2, |log| clean_closes(log) >= connections);
    let clean = clean_closes(&log);
    assert_eq!(clean, connections, "server-side clean closes");
}

#[test]
fn truncated_tunnel_resets_the_app() {
    let Some(mut setup) = start_test_mesh(
        "truncated_tunnel_resets_the_app",
        "tr",
        218,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1).clone();
    let server_pod = setup.island.pod(2, 1).clone();
    let server = PeerServer::start(&setup.island, &server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = format!("{}:8080", server_pod.ip);
    // The client waits for a banner the echo server never sends; meanwhile the server
    // node's daemon dies, and its kernel closes the tunnel with a FIN and no TLS
    // close_notify.
    let waiting = interceptor_tests::mesh::spawn_peer(
        &setup.island,
        &client_pod,
        &["client", &dst, "--expect-banner", "never", "--bytes", "1"],
    )
    .expect("starting the client");
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.accepted().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !server.accepted().is_empty(),
        "the connection never reached the server"
    );
    setup
        .mesh
        .kill_daemon(2)
        .expect("killing the server node's daemon");
    let output = waiting.wait_with_output().expect("waiting for the client");
    let result = stdout_line(&output);
    assert!(
        result.starts_with("result=reset"),
        "truncation must reach the app as a reset: {result}"
    );
    let log = setup.mesh.log_when(1, |log| {
        log.contains("truncated") || log.contains("close_notify")
    });
    assert!(
        log.contains("truncated") || log.contains("close_notify"),
        "client-side log:\n{log}"
    );
}

#[test]
fn record_limit_follows_the_rekey_policy() {
    // Node 1 keeps its tunnels in userspace and rekeys after every 64 records; node 2
    // runs kernel TLS where the kernel has it. Node 2's client talks to node 1's
    // server, so node 1 sends KeyUpdates on a tunnel whose receive side node 2 may have
    // handed to the kernel.
    let Some(mut setup) = start_test_mesh(
        "record_limit_follows_the_rekey_policy",
        "rk",
        219,
        MeshOptions::default(),
    ) else {
        return;
    };
    setup.mesh.stop_daemon(1).expect("stopping node 1");
    setup
        .mesh
        .restart_daemon_with(1, &["--kernel-tls", "off", "--tls-record-limit", "64"])
        .expect("restarting node 1 with a record limit");
    let client_pod = setup.island.pod(2, 1);
    let server_pod = setup.island.pod(1, 1);
    let _server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = format!("{}:8080", server_pod.ip);
    let (result, _) = run_client(
        &setup.island,
        Client::from(client_pod),
        &["client", &dst, "--bytes", "4194304"],
    );
    if expect_ktls() {
        // The kernel cannot follow a KeyUpdate before Linux 6.14: the tunnel closes and
        // the app sees a reset, never corrupted bytes.
        assert!(result.starts_with("result=reset"), "{result}");
        let log = setup.mesh.log_when(2, |log| log.contains("KeyUpdate"));
        assert!(log.contains("KeyUpdate"), "client-side log:\n{log}");
    } else {
        // Userspace rustls on both ends rekeys as often as it must.
        assert_eq!(result, "result=ok sent=4194304 received=4194304");
    }
}

#[test]
fn bad_config_is_rejected_before_the_kernel() {
    if !require_privileges("bad_config_is_rejected_before_the_kernel") {
        return;
    }
    let dir = WorkDir::create(work_dir("e2e", "badconfig"));
    let config = dir.join("mesh.toml");
    std::fs::write(
        &config,
        r#"trust_domain = "cluster.local"

[[nodes]]
name = "badcfg-n1"
cgroup = "interceptor/badcfg-n1"

[[workloads]]
name = "p1"
namespace = "default"
service_account = "p1"
node = "badcfg-n1"
ip = "10.1.1.300"
netns = "/run/netns/badcfg-n1-p1"
cgroup = "interceptor/badcfg-n1/p1"
"#,
    )
    .expect("writing the config");
    let output = std::process::Command::new(interceptor_tests::mesh::interceptor_bin())
        .args(["run", "--node", "badcfg-n1", "--config"])
        .arg(&config)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .env("NO_COLOR", "1")
        .output()
        .expect("running interceptor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a bad config must fail: {stderr}");
    assert!(
        stderr.contains("workloads[0].ip = \"10.1.1.300\""),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new("/sys/fs/bpf/interceptor/badcfg-n1").exists(),
        "the daemon touched the kernel before rejecting its config"
    );
}

/// Opens a tunnel to `server_pod`'s tunnel port from inside `from_pod`'s namespace, as a
/// daemon would, with a valid SVID of `from_pod`'s identity, asks for `dst`, and returns
/// the TLS stream once the server answered with its status byte pair.
fn rogue_tunnel(
    setup: &TestMesh,
    from_pod: &Pod,
    server_pod: &Pod,
    dst: std::net::SocketAddr,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use interceptor::identity::{CertificateAuthority, SpiffeId};
    use std::io::{Read, Write};
    let ca = CertificateAuthority::load(&setup.work_dir.join("ca")).expect("loading the test CA");
    let id: SpiffeId = spiffe_id(from_pod).parse().expect("SPIFFE ID");
    let svid = ca
        .issue(&id, Duration::from_secs(600))
        .expect("issuing an SVID");
    let config = interceptor::tls::client_config(&svid, &ca.trust_bundle()).expect("client config");
    let netns = from_pod.netns_path.clone();
    let tunnel = std::net::SocketAddr::from((server_pod.ip, 15008));
    // setns moves only the calling thread, so a short-lived thread creates the socket.
    let socket = std::thread::spawn(move || {
        let file = std::fs::File::open(&netns).expect("opening the pod's namespace");
        // SAFETY: `file` is an open namespace file; only this thread moves.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "entering the pod's namespace");
        std::net::TcpStream::connect(tunnel).expect("connecting to the tunnel port")
    })
    .join()
    .expect("the connecting thread");
    socket
        .set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .expect("read timeout");
    let name = rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::V4(server_pod.ip).into());
    let conn = rustls::ClientConnection::new(config, name).expect("TLS client");
    let mut tls = rustls::StreamOwned::new(conn, socket);
    let mut preamble = [0u8; interceptor::protocol::MAX_PREAMBLE_LEN];
    let len = interceptor::protocol::encode_preamble(dst, &mut preamble);
    tls.write_all(&preamble[..len])
        .expect("sending the preamble");
    tls.flush().expect("flushing the preamble");
    let mut status = [0u8; 2];
    tls.read_exact(&mut status).expect("reading the status");
    assert_eq!(
        status,
        interceptor::protocol::Status::Connected.encode(),
        "tunnel status"
    );
    tls
}

#[test]
fn forged_record_resets_the_app() {
    use std::io::{Read, Write};
    let Some(setup) = start_test_mesh(
        "forged_record_resets_the_app",
        "fr",
        220,
        MeshOptions::default(),
    ) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");
    let dst = std::net::SocketAddr::from((server_pod.ip, 8080));
    let mut tls = rogue_tunnel(&setup, client_pod, server_pod, dst);

    // A real exchange first, so the forged record arrives on a working tunnel.
    tls.write_all(b"ping").expect("sending app bytes");
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).expect("reading the echo");
    assert_eq!(&echo, b"ping");

    // An application-data record whose ciphertext is garbage: it cannot authenticate.
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x30];
    forged.extend((0..0x30).map(|i| i as u8));
    tls.sock
        .write_all(&forged)
        .expect("sending the forged record");
    let mut rest = Vec::new();
    let outcome = tls.read_to_end(&mut rest);
    assert!(
        outcome.is_err() || rest.is_empty(),
        "the tunnel went on after a forged record: {rest:?}"
    );

    let log = setup.mesh.log_when(2, |log| {
        tunnel_closes(log).iter().any(|l| l.contains("error="))
    });
    let closes = tunnel_closes(&log);
    assert!(
        closes.iter().any(|l| l.contains("error=")),
        "server-side log:\n{log}"
    );
    // The app never sees a clean end: its connection is reset.
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    while !server.lines().iter().any(|l| l.starts_with("closed ")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let closed: Vec<String> = server
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("closed "))
        .collect();
    assert_eq!(closed.len(), 1, "server lines: {:?}", server.lines());
    assert!(
        closed[0].contains("error="),
        "the app saw a clean end: {}",
        closed[0]
    );
}
