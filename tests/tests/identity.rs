//! Privileged end-to-end tests of the workload identity lifecycle with the CA service:
//! renewals under live traffic, node authorization, root rotation, CA outages, a daemon
//! that starts before the CA and a CA that is an intermediate under an operator's root.
//!
//! SVID lifetimes are a few seconds, set through `--svid-lifetime`, and the trust
//! bundle is refreshed every second, so each test covers many renewals in a short run.
//! Checks wait for events in the logs instead of sleeping for fixed times where they
//! can, so they hold on a busy machine.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use interceptor::ca::client::{CaClient, NodeState};
use interceptor::identity::{self, CertificateAuthority, NodeId, SpiffeId, Svid, TrustDomain};
use interceptor_tests::clients::{self, in_netns, stdout_line, Traffic};
use interceptor_tests::mesh::{run_peer, scaled, spawn_peer, tail, Mesh, PeerServer, TRUST_DOMAIN};
use interceptor_tests::setup::{start_island, start_test_mesh, Enroll, MeshOptions, TestMesh};
use interceptor_tests::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Lifetime of workload SVIDs in most tests: renewals come about every 2 s.
const LIFETIME: &str = "4s";
/// Port of the echo servers.
const ECHO_PORT: u16 = 8080;

/// Builds a 2-node island with 1 pod per node, enrolls both pods and starts the CA
/// service and the daemons with SVIDs of `lifetime` and a bundle refresh every second.
/// Returns `None` when the test cannot run here (outside CI only).
fn setup(test: &str, prefix: &str, subnet: u8, lifetime: &str) -> Option<TestMesh> {
    setup_with(test, prefix, subnet, lifetime, 1, Enroll::All)
}

/// Builds the island as [`setup`] does, with `pods_per_node` pods per node of which
/// those that `enroll` names are enrolled.
fn setup_with(
    test: &str,
    prefix: &str,
    subnet: u8,
    lifetime: &str,
    pods_per_node: usize,
    enroll: Enroll,
) -> Option<TestMesh> {
    let daemon_args = [
        "--svid-lifetime",
        lifetime,
        "--bundle-refresh",
        "1s",
        "--kernel-tls",
        "off",
    ];
    let options = MeshOptions {
        pods_per_node,
        work_dir_kind: "identity",
        enroll,
        daemon_args: &daemon_args,
        ..MeshOptions::default()
    };
    start_test_mesh(test, prefix, subnet, options)
}

/// Starts the echo server on [`ECHO_PORT`] of pod n2-p1, the server of most tests.
fn start_echo_server(setup: &TestMesh) -> PeerServer {
    PeerServer::start(
        &setup.island,
        setup.island.pod(2, 1),
        &["echo", "0.0.0.0:8080"],
    )
    .expect("starting the echo server")
}

/// Returns the serials of the "renewed SVID" events of `workload` in `log`, in order.
fn renewed_serials(log: &str, workload: &str) -> Vec<String> {
    let tag = format!("workload={workload}");
    log.lines()
        .filter(|line| line.contains("renewed SVID") && line.contains(&tag))
        .filter_map(|line| field(line, "serial"))
        .collect()
}

/// Returns the value of `key=value` in a log line, without quotes.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_owned())
}

/// Waits until `until` holds for the log of `node_index`, or fails after `timeout`
/// (scaled) with the log's tail.
fn wait_for_log(
    mesh: &Mesh,
    node_index: usize,
    timeout: Duration,
    what: &str,
    until: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        let log = mesh.log(node_index);
        if until(&log) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node_index}: {what} did not happen within {timeout:?}; log:\n{}",
            tail(&log, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spiffe_id(pod: &Pod) -> SpiffeId {
    clients::spiffe_id(pod).parse().expect("SPIFFE ID of a pod")
}

/// What a test's own tunnel to a pod saw.
struct Handshake {
    serial: String,
    kind: Option<rustls::HandshakeKind>,
}

/// Opens a tunnel from `from_pod`'s namespace to `server_pod`'s tunnel port, as a
/// daemon would, presenting `svid` and trusting `bundle`, and requests the echo server
/// of `server_pod`. Succeeds once the server has sent the connected status. A
/// certificate that either side rejects fails it.
fn handshake(
    from_pod: &Pod,
    server_pod: &Pod,
    svid: &Svid,
    bundle: &[CertificateDer<'static>],
) -> Result<Handshake, String> {
    let config = interceptor::tls::client_config(svid, bundle).expect("client config");
    let tunnel = SocketAddr::from((server_pod.ip, 15008));
    let server_ip = server_pod.ip;
    in_netns(from_pod.netns_path.clone(), move || {
        let mut socket = std::net::TcpStream::connect(tunnel).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(scaled(Duration::from_secs(10))))
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(IpAddr::V4(server_ip).into());
        let mut conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut socket).map_err(|e| e.to_string())?;
        }
        let leaf = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("no peer certificate")?;
        let outcome = Handshake {
            serial: identity::serial_of(leaf).map_err(|e| e.to_string())?,
            kind: conn.handshake_kind(),
        };
        // In TLS 1.3 the server checks the client's certificate after the client has
        // finished, so only the status sent after the preamble shows whether it was accepted.
        let mut tls = rustls::StreamOwned::new(conn, socket);
        let dst = SocketAddr::from((server_ip, ECHO_PORT));
        let mut preamble = [0u8; interceptor::protocol::MAX_PREAMBLE_LEN];
        let len = interceptor::protocol::encode_preamble(dst, &mut preamble);
        tls.write_all(&preamble[..len]).map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        let mut status = [0u8; 2];
        tls.read_exact(&mut status).map_err(|e| e.to_string())?;
        if status != interceptor::protocol::Status::Connected.encode() {
            return Err(format!("tunnel status {status:?}"));
        }
        Ok(outcome)
    })
}

/// Starts `mesh-peer client` runs from `from_pod` to the echo server of `to_pod`, one
/// after another until stopped, each making connections for 2 s.
fn start_traffic(setup: &TestMesh, from_pod: &Pod, to_pod: &Pod) -> Traffic {
    let target = format!("{}:{ECHO_PORT}", to_pod.ip);
    let args = ["client", &target, "--bytes", "1000", "--for-seconds", "2"];
    Traffic::start(&setup.island, from_pod, &args)
}

/// Checks that every traffic run succeeded and returns the number of connections.
fn assert_no_failures(results: &[String]) -> u64 {
    assert!(!results.is_empty(), "no traffic ran");
    let mut connections = 0;
    for result in results {
        assert!(
            result.starts_with("result=ok "),
            "a traffic run failed: {result}"
        );
        connections += field(&format!(" {result}"), "connections")
            .and_then(|count| count.parse::<u64>().ok())
            .unwrap_or(0);
    }
    connections
}

#[test]
fn long_connection_survives_renewals() {
    let Some(setup) = setup("long_connection_survives_renewals", "id1", 225, LIFETIME) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _server = start_echo_server(&setup);
    let before = renewed_serials(&setup.mesh.log(1), &client_pod.name).len();
    let server_before = renewed_serials(&setup.mesh.log(2), &server_pod.name).len();

    let target = format!("{}:{ECHO_PORT}", server_pod.ip);
    let stream = spawn_peer(
        &setup.island,
        client_pod,
        &["stream", &target, "--seconds", "16"],
    )
    .expect("starting the streaming client");
    // The stream runs 16 s and each SVID is renewed every 1.8 to 2.2 s, so about 7
    // renewals of each end fall inside it. Only those counted here, as the stream
    // ends, count.
    let output = stream.wait_with_output().expect("waiting for the client");
    let client_renewals = renewed_serials(&setup.mesh.log(1), &client_pod.name).len() - before;
    let server_renewals =
        renewed_serials(&setup.mesh.log(2), &server_pod.name).len() - server_before;
    let result = stdout_line(&output);

    assert!(
        result.starts_with("result=ok "),
        "the long connection failed: {result}"
    );
    let rounds: u64 = field(&format!(" {result}"), "rounds")
        .and_then(|rounds| rounds.parse().ok())
        .expect("rounds in the result");
    assert!(rounds > 100, "only {rounds} echo rounds: {result}");
    assert!(
        client_renewals >= 5,
        "{client_renewals} renewals of the client SVID"
    );
    assert!(
        server_renewals >= 5,
        "{server_renewals} renewals of the server SVID"
    );
    // One connection carried the whole exchange: one tunnel close on the server's node.
    let log = setup
        .mesh
        .log_when(2, |log| log.contains("connection closed"));
    let closes: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("connection closed") && line.contains("dir=\"inbound\""))
        .collect();
    assert_eq!(
        closes.len(),
        1,
        "tunnel closes on the server's node: {closes:?}"
    );
    assert!(!closes[0].contains("error="), "{}", closes[0]);
}

#[test]
fn new_connections_carry_new_serials() {
    let Some(setup) = setup("new_connections_carry_new_serials", "id2", 226, LIFETIME) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _server = start_echo_server(&setup);
    let ca = CertificateAuthority::load(&setup.mesh.ca_dir()).expect("loading the CA");
    let svid = ca
        .issue(&spiffe_id(client_pod), Duration::from_secs(600))
        .expect("issuing the test client's SVID");
    let bundle = ca.trust_bundle();

    let mut seen: Vec<String> = Vec::new();
    for renewal in 0..5 {
        let count = renewed_serials(&setup.mesh.log(2), &server_pod.name).len();
        wait_for_log(
            &setup.mesh,
            2,
            Duration::from_secs(20),
            "a renewal",
            |log| renewed_serials(log, &server_pod.name).len() > count,
        );
        let outcome = handshake(client_pod, server_pod, &svid, &bundle)
            .unwrap_or_else(|error| panic!("handshake after renewal {renewal} failed: {error}"));
        assert_eq!(
            outcome.kind,
            Some(rustls::HandshakeKind::Full),
            "handshake after renewal {renewal}"
        );
        let logged = renewed_serials(&setup.mesh.log(2), &server_pod.name);
        assert!(
            logged[count..].contains(&outcome.serial),
            "after renewal {renewal} the server presented {}, not a renewed serial {:?}",
            outcome.serial,
            &logged[count..]
        );
        assert!(
            !seen.contains(&outcome.serial),
            "serial {} was presented before",
            outcome.serial
        );
        seen.push(outcome.serial);
    }
}

#[test]
fn node_refused_other_nodes_workload() {
    // Pods of the same index share a service account, so node 2's workload is its
    // second pod, whose identity no workload of node 1 has.
    let Some(mut setup) = setup_with(
        "node_refused_other_nodes_workload",
        "id3",
        227,
        LIFETIME,
        2,
        Enroll::Pods(&[(1, 1), (2, 2)]),
    ) else {
        return;
    };
    let own_pod = setup.island.pod(1, 1).clone();
    let other_pod = setup.island.pod(2, 2).clone();
    let trust_domain: TrustDomain = TRUST_DOMAIN.parse().expect("trust domain");
    let node = NodeId::new(trust_domain.clone(), &setup.island.node(1).name).expect("node ID");
    let state = NodeState::open(&setup.mesh.state_dir(1)).expect("node 1's state directory");
    let node_svid = state
        .node_svid(&node, std::time::SystemTime::now(), Duration::from_secs(1))
        .expect("reading node 1's SVID")
        .expect("node 1 saved its SVID");
    let bundle = state
        .bundle()
        .expect("reading node 1's bundle")
        .expect("node 1 saved the bundle");
    let addr = setup.mesh.ca_addr();
    let netns = setup.island.node(1).netns_path.clone();

    // Node 1's credentials, used from node 1's namespace, as its daemon would.
    let token = std::fs::read_to_string(setup.mesh.token_path(1)).expect("node 1's join token");
    let (own, other, reattest) = in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let client =
                CaClient::new(addr, &trust_domain, &bundle, Some(&node_svid)).expect("CA client");
            let lifetime = Duration::from_secs(60);
            let own = client
                .sign(&spiffe_id(&own_pod).to_string(), lifetime)
                .await;
            let other = client
                .sign(&spiffe_id(&other_pod).to_string(), lifetime)
                .await;
            let anonymous = CaClient::new(addr, &trust_domain, &bundle, None).expect("CA client");
            let reattest = anonymous.attest(&node, &token, lifetime).await;
            (own, other, reattest)
        })
    });

    own.expect("node 1 may receive its own workload's SVID");
    let refusal = other.expect_err("node 1 must not receive node 2's workload's SVID");
    let message = refusal.to_string();
    assert!(
        message.contains("not assigned to node id3-n1"),
        "refusal: {message}"
    );
    assert!(message.contains("PermissionDenied"), "refusal: {message}");
    let ca_log = setup.mesh.ca_log();
    assert!(
        ca_log
            .lines()
            .any(|line| line.contains("certificate request rejected")
                && line.contains("node=id3-n1")),
        "the CA did not log the refusal:\n{ca_log}"
    );

    // The join token worked once, at the daemon's start.
    let reused = reattest.expect_err("a used join token must not work again");
    assert!(
        reused.to_string().contains("no unused join token"),
        "{reused}"
    );

    // A daemon whose clock is 90 s behind the CA's fails to start with the reason. The
    // CA reports whole seconds, so the difference shows as 89 to 91 s.
    setup.mesh.stop_daemon(1).expect("stopping daemon 1");
    let skewed = setup
        .mesh
        .restart_daemon_with(1, &["--test-clock-offset", "-90s"])
        .expect_err("a daemon with a skewed clock must not start");
    let message = skewed.to_string();
    assert!(
        message.contains("s behind the CA's, more than the allowed 30 s"),
        "{message}"
    );

    // A restarted daemon authenticates with its saved node SVID, without a token.
    setup
        .mesh
        .start_daemon(1)
        .expect("restarting daemon 1 without a new token");
    // The skewed start used the saved node SVID too, so this start adds the second line.
    assert!(
        setup
            .mesh
            .log(1)
            .matches("using the saved node SVID")
            .count()
            >= 2,
        "{}",
        tail(&setup.mesh.log(1), 20)
    );
}

#[test]
fn root_rotation_under_traffic() {
    let Some(setup) = setup("root_rotation_under_traffic", "id4", 228, LIFETIME) else {
        return;
    };
    let client_pod = setup.island.pod(1, 1);
    let server_pod = setup.island.pod(2, 1);
    let _server = start_echo_server(&setup);
    let old_ca = CertificateAuthority::load(&setup.mesh.ca_dir()).expect("loading the old CA");
    let old_svid = old_ca
        .issue(&spiffe_id(client_pod), Duration::from_secs(600))
        .expect("issuing an SVID from the old root");
    let traffic = start_traffic(&setup, client_pod, server_pod);
    let changes = |log: &str| log.matches("trust bundle changed").count();

    setup
        .mesh
        .ca_command(&["rotate", "prepare"])
        .expect("rotate prepare");
    for node in [1, 2] {
        wait_for_log(
            &setup.mesh,
            node,
            Duration::from_secs(20),
            "the new bundle",
            |log| changes(log) >= 1,
        );
    }

    setup
        .mesh
        .ca_command(&["rotate", "activate"])
        .expect("rotate activate");
    for node in [1, 2] {
        wait_for_log(
            &setup.mesh,
            node,
            Duration::from_secs(20),
            "re-issue",
            |log| log.contains("the signing root changed; renewing now"),
        );
    }
    // Every SVID of the old root has expired after one lifetime plus a refresh.
    std::thread::sleep(Duration::from_secs(6));
    // `finish` waits for the CA's --max-lifetime (24h by default) unless forced; the
    // workload SVIDs of this test live 4 s.

    setup
        .mesh
        .ca_command(&["rotate", "finish", "--force"])
        .expect("rotate finish");
    // Prepare and activate each changed the bundle once, finish a third time.
    for node in [1, 2] {
        wait_for_log(
            &setup.mesh,
            node,
            Duration::from_secs(20),
            "the final bundle",
            |log| changes(log) >= 3,
        );
        let log = setup.mesh.log(node);
        let last = log
            .lines()
            .rfind(|line| line.contains("trust bundle changed"))
            .expect("a bundle change");
        assert!(last.contains("roots=1"), "{last}");
    }
    // Traffic continues over the new root alone.
    std::thread::sleep(Duration::from_secs(3));
    let results = traffic.finish();
    let connections = assert_no_failures(&results);
    assert!(
        connections > 20,
        "only {connections} connections during the rotation"
    );

    // A peer of the old root is rejected now, and one of the new root is accepted.
    let new_ca = CertificateAuthority::load(&setup.mesh.ca_dir()).expect("loading the new CA");
    let both_roots = [new_ca.trust_bundle(), old_ca.trust_bundle()].concat();
    let refused = handshake(client_pod, server_pod, &old_svid, &both_roots);
    assert!(
        refused.is_err(),
        "a certificate of the removed root was accepted"
    );
    let new_svid = new_ca
        .issue(&spiffe_id(client_pod), Duration::from_secs(600))
        .expect("issuing an SVID from the new root");
    handshake(client_pod, server_pod, &new_svid, &new_ca.trust_bundle())
        .expect("the server presents an SVID of the new root");
}

#[test]
fn ca_outage_short_then_long() {
    let Some(mut setup) = setup("ca_outage_short_then_long", "id5", 229, "12s") else {
        return;
    };
    let client_pod = setup.island.pod(1, 1).clone();
    let server_pod = setup.island.pod(2, 1).clone();
    let _server = start_echo_server(&setup);
    let target = format!("{}:{ECHO_PORT}", server_pod.ip);

    // Short outage. Every SVID lives 12 s and is renewed after 5.4 to 6.6 s, so none
    // has less than 5.4 s left at any time. The CA goes away 5 s after a renewal of the
    // client's SVID, for 2.5 s, so the client's next renewal fails. Any renewal that
    // fails in the outage is retried (backoff 1 s, then 2 s) before its SVID expires.
    let count = renewed_serials(&setup.mesh.log(1), &client_pod.name).len();
    wait_for_log(
        &setup.mesh,
        1,
        Duration::from_secs(30),
        "a renewal",
        |log| renewed_serials(log, &client_pod.name).len() > count,
    );
    let traffic = start_traffic(&setup, &client_pod, &server_pod);
    std::thread::sleep(Duration::from_secs(5));
    setup.mesh.stop_ca().expect("stopping the CA");
    std::thread::sleep(Duration::from_millis(2500));
    setup.mesh.start_ca().expect("restarting the CA");
    let after_short = renewed_serials(&setup.mesh.log(1), &client_pod.name).len();
    wait_for_log(
        &setup.mesh,
        1,
        Duration::from_secs(20),
        "a renewal after the outage",
        |log| renewed_serials(log, &client_pod.name).len() > after_short,
    );
    let results = traffic.finish();
    assert_no_failures(&results);
    let log = setup.mesh.log(1);
    assert!(
        log.contains("renewing SVID failed; the current one stays in use")
            || log.contains("SVID close to expiry and renewing it failed"),
        "no renewal failed during the outage:\n{}",
        tail(&log, 30)
    );
    assert!(!log.contains("SVID expired"), "{}", tail(&log, 30));

    // Long outage: the SVIDs expire, new connections fail closed with a clear error.
    setup.mesh.stop_ca().expect("stopping the CA");
    wait_for_log(
        &setup.mesh,
        1,
        Duration::from_secs(40),
        "the expiry",
        |log| log.contains("SVID expired and renewing it failed"),
    );
    let output = run_peer(
        &setup.island,
        &client_pod,
        &["client", &target, "--bytes", "1000"],
    )
    .expect("running mesh-peer");
    let result = stdout_line(&output);
    assert!(
        !result.starts_with("result=ok"),
        "a connection succeeded with an expired SVID"
    );
    wait_for_log(
        &setup.mesh,
        1,
        Duration::from_secs(10),
        "the expired-SVID close",
        |log| {
            log.lines()
                .any(|line| line.contains("connection closed") && line.contains("SVID (serial"))
        },
    );
    let metrics = setup.mesh.admin_get(1, "/metrics").expect("metrics");
    let near = format!(
        "interceptor_svid_near_expiry{{workload=\"{}\"}} 1",
        client_pod.name
    );
    assert!(metrics.contains(&near), "{metrics}");

    // The CA is back: the daemons renew by themselves and traffic works again.
    setup.mesh.start_ca().expect("restarting the CA");
    // Node 1 saw its SVID expire. Node 2's may have been renewed just in time, so only
    // node 1 is sure to log a recovery.
    wait_for_log(&setup.mesh, 1, Duration::from_secs(30), "recovery", |log| {
        log.contains("renewed the expired SVID; new tunnels work again")
    });
    let output = run_peer(
        &setup.island,
        &client_pod,
        &["client", &target, "--bytes", "1000"],
    )
    .expect("running mesh-peer");
    let result = stdout_line(&output);
    assert_eq!(result, "result=ok sent=1000 received=1000");
}

#[test]
fn intermediate_ca_serves_mesh() {
    let Some((island, work_dir)) =
        start_island("intermediate_ca_serves_mesh", "id6", 230, 2, 1, "identity")
    else {
        return;
    };
    let operator_dir = work_dir.join("operator");
    let ca_dir = work_dir.join("ca");
    let init = |args: &[&str]| {
        let output = Command::new(interceptor_tests::mesh::interceptor_bin())
            .args(["ca", "init", "--trust-domain", TRUST_DOMAIN])
            .args(args)
            .output()
            .expect("running interceptor ca init");
        assert!(
            output.status.success(),
            "ca init {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let operator_path = operator_dir.to_string_lossy().into_owned();
    init(&["--dir", &operator_path]);
    init(&[
        "--dir",
        &ca_dir.to_string_lossy(),
        "--root-cert",
        &operator_dir.join("ca-cert.pem").to_string_lossy(),
        "--root-key",
        &operator_dir.join("ca-key.pem").to_string_lossy(),
    ]);
    let enrolled: Vec<&Pod> = island.pods().iter().collect();
    let mesh = Mesh::start(&island, &work_dir, &enrolled, &["--kernel-tls", "off"])
        .expect("starting the mesh under the intermediate");
    let client_pod = island.pod(1, 1);
    let server_pod = island.pod(2, 1);
    let _server = PeerServer::start(&island, server_pod, &["echo", "0.0.0.0:8080"])
        .expect("starting the echo server");

    let target = format!("{}:{ECHO_PORT}", server_pod.ip);
    let output = run_peer(&island, client_pod, &["client", &target, "--bytes", "1000"])
        .expect("running mesh-peer");
    let result = stdout_line(&output);
    assert_eq!(result, "result=ok sent=1000 received=1000");

    // The published bundle is the operator's root alone.
    let operator = CertificateAuthority::load(&operator_dir).expect("loading the operator's root");
    let state = NodeState::open(&mesh.state_dir(1)).expect("node 1's state directory");
    let bundle = state
        .bundle()
        .expect("reading node 1's bundle")
        .expect("node 1 saved the bundle");
    assert_eq!(bundle, operator.trust_bundle());

    // A peer with an SVID of the operator's root directly is accepted, and the server's
    // SVID chains to that root through the intermediate.
    let svid = operator
        .issue(&spiffe_id(client_pod), Duration::from_secs(600))
        .expect("issuing an SVID from the operator's root");
    handshake(client_pod, server_pod, &svid, &operator.trust_bundle())
        .expect("a tunnel that trusts only the operator's root");
}

#[test]
fn daemon_waits_for_late_ca() {
    let Some(mut setup) = setup("daemon_waits_for_late_ca", "iu", 231, "30s") else {
        return;
    };
    let client_pod = setup.island.pod(1, 1).clone();
    let server_pod = setup.island.pod(2, 1).clone();
    let _server = start_echo_server(&setup);
    let target = format!("{}:{ECHO_PORT}", server_pod.ip);

    // Node 1 starts over as a new node: no state, a new join token, and no CA.
    setup.mesh.stop_daemon(1).expect("stopping daemon 1");
    setup.mesh.stop_ca().expect("stopping the CA");
    std::fs::remove_dir_all(setup.mesh.state_dir(1)).expect("removing node 1's state");
    let token_path = setup.mesh.token_path(1);
    let node = setup.island.nodes()[0].name.clone();
    setup
        .mesh
        .ca_command(&[
            "token",
            "--node",
            &node,
            "--out",
            &token_path.to_string_lossy(),
        ])
        .expect("creating a new join token for node 1");
    let retry_line = "attesting this node failed; retrying";
    let retries_before = setup.mesh.log(1).matches(retry_line).count();

    let ca_addr = setup.mesh.ca_addr().to_string();
    setup
        .mesh
        .start_daemon_then(1, |mesh| {
            // Two failed attempts (1 s apart, with jitter) show the retry loop, then the
            // CA starts.
            wait_for_log(mesh, 1, Duration::from_secs(20), "two retries", |log| {
                log.matches(retry_line).count() >= retries_before + 2
            });
            mesh.start_ca()
        })
        .expect("daemon 1 comes up once the CA starts");

    let log = setup.mesh.log(1);
    let retry = log
        .lines()
        .rfind(|line| line.contains(retry_line))
        .expect("a retry line");
    assert!(retry.contains(&format!("ca={ca_addr}")), "{retry}");
    assert!(retry.contains("retry_in="), "{retry}");
    assert_eq!(
        retry.matches("Connection refused").count(),
        1,
        "the cause appears more than once: {retry}"
    );
    assert!(
        log.contains("attested this node with its join token"),
        "{}",
        tail(&log, 30)
    );

    // The first node SVID has the node lifetime (24 h by default), not the 30 s of the
    // workload SVIDs, which outlive the CA's absence here.
    let pem = std::fs::read(setup.mesh.state_dir(1).join("node-cert.pem")).expect("node SVID");
    let leaf = CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate in node-cert.pem")
        .expect("valid PEM");
    let (not_before, not_after) = identity::validity_of(&leaf).expect("validity");
    let lifetime = not_after
        .duration_since(not_before)
        .expect("not_after after not_before");
    assert!(
        lifetime > Duration::from_secs(3600),
        "the first node SVID lives {lifetime:?}"
    );

    let output = run_peer(
        &setup.island,
        &client_pod,
        &["client", &target, "--bytes", "1000"],
    )
    .expect("running mesh-peer");
    assert_eq!(stdout_line(&output), "result=ok sent=1000 received=1000");
}
