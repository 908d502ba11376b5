//! Privileged end-to-end tests of the classic sidecar baseline: one `interceptor
//! sidecar` per enrolled pod, inside the pod's network namespace, with iptables
//! `REDIRECT` rules sending the pod's traffic to it. Run as root through `cargo xtask
//! test`, which builds the binaries first.
//!
//! Every test builds its own island with its own prefix and subnet, so the tests run
//! in parallel with each other and with the daemon's tests.

use std::time::{Duration, Instant};

use interceptor_tests::clients::{run_client, spiffe_id, Client};
use interceptor_tests::mesh::{scaled, PeerServer};
use interceptor_tests::setup::{start_island, WorkDir};
use interceptor_tests::sidecar::{nat_rules, SidecarMesh};
use interceptor_tests::{contains, mesh_peer_payload, tls_record_counts, Capture, Island, Pod};

/// A running island with sidecars on it. Fields drop in order: the sidecars stop
/// before the island's namespaces go.
struct Setup {
    sidecars: SidecarMesh,
    island: Island,
    work_dir: WorkDir,
}

/// Builds a 2-node island with 2 pods per node, enrolls the client pod n1-p2 and the
/// server pod n2-p1 and starts their sidecars. Returns `None` when the test cannot run
/// here (outside CI only).
///
/// A pod's service account is its short name, so the two enrolled pods have different
/// SPIFFE IDs and a log that swapped them would fail the checks.
fn setup(test: &str, prefix: &str, subnet: u8) -> Option<Setup> {
    let (island, work_dir) = start_island(test, prefix, subnet, 2, 2, "sidecar")?;
    let enrolled = [island.pod(1, 2), island.pod(2, 1)];
    let sidecars =
        SidecarMesh::start(&island, &work_dir, &enrolled, &[]).expect("starting the sidecars");
    Some(Setup {
        sidecars,
        island,
        work_dir,
    })
}

/// Runs `mesh-peer ARGS` in `pod` to completion and returns its result line.
fn client(setup: &Setup, pod: &Pod, args: &[&str]) -> String {
    run_client(&setup.island, Client::from(pod), args).0
}

/// Returns the lines of `pod`'s nat table that mention the sidecar's chains.
fn sidecar_rules(pod: &Pod) -> Vec<String> {
    nat_rules(pod)
        .expect("listing the nat table")
        .lines()
        .filter(|line| line.contains("INTERCEPTOR_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn sidecar_echo_over_mtls() {
    let Some(setup) = setup("sidecar_echo_over_mtls", "scx", 221) else {
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
    let result = client(&setup, client_pod, &["client", &dst, "--bytes", "300000"]);
    assert_eq!(result, "result=ok sent=300000 received=300000");
    capture.stop().expect("stopping tcpdump");

    let marker = &mesh_peer_payload(19 * 43)[19 * 42..];
    assert!(
        !contains(&pcap, marker),
        "the wire carried the payload in cleartext"
    );
    let (handshakes, records) = tls_record_counts(&pcap, 15008);
    assert!(
        handshakes >= 1,
        "expected TLS handshake records on the wire, saw {handshakes}"
    );
    assert!(
        records >= 20,
        "expected TLS application data records on the wire, saw {records}"
    );
    // The server's sidecar delivers from inside the pod, to the pod's own address.
    let accepted = server.accepted();
    assert_eq!(accepted.len(), 1, "server accepts: {accepted:?}");
    assert!(
        accepted[0].starts_with(&format!("{}:", server_pod.ip)),
        "server accepts: {accepted:?}"
    );

    let client_log = setup.sidecars.log(client_pod);
    let server_log = setup.sidecars.log(server_pod);
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
    assert!(
        closed_cleanly(&client_log),
        "client-side log:\n{client_log}"
    );
    assert!(
        closed_cleanly(&server_log),
        "server-side log:\n{server_log}"
    );
    assert!(
        client_log.contains("bytes_sent=300000 bytes_received=300000"),
        "client-side log:\n{client_log}"
    );
}

#[test]
fn sidecar_resets_plaintext_inbound() {
    let Some(setup) = setup("sidecar_resets_plaintext_inbound", "scp", 222) else {
        return;
    };
    let outsider = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let server = PeerServer::start(&setup.island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the server");

    // A pod without a sidecar sends plaintext straight to the app's port.
    let dst = format!("{}:8080", server_pod.ip);
    let result = client(&setup, outsider, &["client", &dst, "--bytes", "2000"]);
    assert!(result.starts_with("result=reset"), "{result}");
    assert!(
        server.accepted().is_empty(),
        "the app accepted plaintext: {:?}",
        server.accepted()
    );

    // The sidecar logs the denial after it reset the connection, so the client can
    // finish first.
    let denial = format!("connection denied dst=\"{dst}\"");
    let source = format!("src={}:", outsider.ip);
    let logged = |log: &str| {
        log.lines()
            .any(|l| l.contains(&denial) && l.contains(&source))
    };
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !logged(&setup.sidecars.log(server_pod)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let server_log = setup.sidecars.log(server_pod);
    assert!(logged(&server_log), "server-side log:\n{server_log}");
}

#[test]
fn sidecar_exit_removes_rules() {
    let Some(mut setup) = setup("sidecar_exit_removes_rules", "scr", 223) else {
        return;
    };
    let pod = setup.island.pod(1, 2).clone();
    let installed = sidecar_rules(&pod);
    assert_eq!(
        installed.len(),
        9,
        "rules of the running sidecar: {installed:?}"
    );

    setup.sidecars.stop(&pod).expect("stopping the sidecar");

    let left = sidecar_rules(&pod);
    assert!(left.is_empty(), "rules left after exit: {left:?}");
    let log = setup.sidecars.log(&pod);
    assert!(
        log.contains("removed its iptables rules"),
        "sidecar log:\n{log}"
    );
    assert_eq!(
        setup.sidecars.pids().len(),
        1,
        "the other sidecar still runs"
    );
}
