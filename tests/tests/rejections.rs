//! Privileged end-to-end test of the rejection reports. Connections that the
//! `sk_lookup` program resets in the kernel show up in the daemon's log and in
//! `/metrics`. A port scan is rate-limited in the log but fully counted. A rejection
//! while the daemon is down is logged by the next daemon, and a flood that overflows
//! the ring buffer meanwhile is counted as lost.
//!
//! The island uses prefix `dlrej` and subnet 251.

use std::fs::File;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use interceptor_tests::mesh::{scaled, Mesh};
use interceptor_tests::{require_privileges, DirectoryExtras, Island, IslandSpec, Pod};

/// Ports of the port scan, none of which has a server.
const SCAN_PORTS: std::ops::RangeInclusive<u16> = 9001..=9100;

/// Connections made while the daemon is down: more than the 4095 records that the
/// 256 KiB ring buffer has room for, so some are lost.
const FLOOD_PROBES: usize = 5000;

/// Connects from a thread inside the network namespace at `netns` to each of `addrs`
/// in turn and returns the error kind of each attempt (`None` when it connected).
fn connect_each(netns: &Path, addrs: Vec<SocketAddr>) -> Vec<Option<io::ErrorKind>> {
    let netns = netns.to_owned();
    // setns moves only the calling thread, so a short-lived thread enters the pod.
    std::thread::spawn(move || {
        let file = File::open(&netns).expect("opening the pod's namespace");
        // SAFETY: `file` is an open namespace file; only this thread moves.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "entering {}: {}",
            netns.display(),
            io::Error::last_os_error()
        );
        addrs
            .iter()
            .map(|addr| {
                TcpStream::connect_timeout(addr, scaled(Duration::from_secs(5)))
                    .err()
                    .map(|error| error.kind())
            })
            .collect()
    })
    .join()
    .expect("the connecting thread panicked")
}

/// Returns the link-local IPv6 address of `pod`'s `eth0` once duplicate address
/// detection has finished with it.
fn link_local_addr(pod: &Pod) -> Ipv6Addr {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let output = Command::new("ip")
            .args(["netns", "exec", &pod.name, "ip", "-6", "-o", "addr", "show"])
            .args(["dev", "eth0", "scope", "link", "-tentative"])
            .output()
            .expect("running ip");
        assert!(output.status.success(), "ip addr show failed: {output:?}");
        // "2: eth0    inet6 fe80::1/64 scope link ..."
        let text = String::from_utf8_lossy(&output.stdout);
        let addr = text
            .split_whitespace()
            .skip_while(|word| *word != "inet6")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|addr| addr.parse().ok());
        if let Some(addr) = addr {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no usable link-local address",
            pod.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Returns the interface index of `pod`'s `eth0`, the scope of link-local addresses
/// dialed from it.
fn eth0_index(pod: &Pod) -> u32 {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.name,
            "cat",
            "/sys/class/net/eth0/ifindex",
        ])
        .output()
        .expect("running ip");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no interface index of eth0 in {}: {output:?}", pod.name))
}

/// Returns the `connection rejected` lines of `log` for `workload` and `reason`.
fn rejected_lines<'a>(log: &'a str, workload: &str, reason: &str) -> Vec<&'a str> {
    let workload = format!("workload=\"{workload}\"");
    let reason = format!("reason=\"{reason}\"");
    log.lines()
        .filter(|l| {
            l.contains("connection rejected") && l.contains(&workload) && l.contains(&reason)
        })
        .collect()
}

/// Returns the sum of `suppressed=N` over the `suppressed similar rejections` lines of
/// `log` for `workload` and `reason`.
fn suppressed_sum(log: &str, workload: &str, reason: &str) -> u64 {
    let workload = format!("workload=\"{workload}\"");
    let reason = format!("reason=\"{reason}\"");
    log.lines()
        .filter(|l| {
            l.contains("suppressed similar rejections")
                && l.contains(&workload)
                && l.contains(&reason)
        })
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("suppressed="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Returns the value of `interceptor_inbound_rejected_total` for `workload` and
/// `reason` on node 1, or 0 when the series is missing.
fn rejected_metric(mesh: &Mesh, workload: &str, reason: &str) -> u64 {
    let metrics = mesh.admin_get(1, "/metrics").expect("fetching /metrics");
    let series = format!(
        "interceptor_inbound_rejected_total{{workload=\"{workload}\",reason=\"{reason}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|n| n.parse().expect("a counter value"))
        .unwrap_or(0)
}

/// Returns the value of `interceptor_inbound_rejections_lost_total` on node 1.
fn lost_metric(mesh: &Mesh) -> u64 {
    let metrics = mesh.admin_get(1, "/metrics").expect("fetching /metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("interceptor_inbound_rejections_lost_total "))
        .map(|n| n.parse().expect("a counter value"))
        .expect("the lost rejections counter in /metrics")
}

/// Polls `condition` every 100 ms until it holds, for up to 10 s (scaled).
fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Island `dlrej`, one node: p1 is an enrolled strict server, p2 a plaintext client
/// outside the mesh, p3 an enrolled permissive server. Pods of one node share a
/// bridge, so p2 also reaches p3's link-local IPv6 address.
#[test]
fn rejections_are_logged_and_counted() {
    let test = "rejections_are_logged_and_counted";
    if !require_privileges(test) {
        return;
    }
    let island = Island::up(IslandSpec {
        prefix: "dlrej".to_owned(),
        nodes: 1,
        pods_per_node: 3,
        subnet: 251,
    })
    .expect("building the island");
    let work_dir = std::env::temp_dir().join("interceptor-e2e-dlrej");
    let _ = std::fs::remove_dir_all(&work_dir);
    let (strict, client, permissive) = (island.pod(1, 1), island.pod(1, 2), island.pod(1, 3));
    let mut extras = DirectoryExtras::default();
    extras.sections.insert(
        strict.name.clone(),
        "inbound_mode = \"strict\"\n".to_owned(),
    );
    let mut mesh = Mesh::start_with(&island, &work_dir, &[strict, permissive], &extras, &[])
        .expect("starting the mesh");

    // One plaintext connection to the strict workload: reset, logged with the
    // workload, the client's address, the destination and the reason, and counted.
    let dst = SocketAddr::from((strict.ip, 8080));
    let outcome = connect_each(&client.netns_path, vec![dst]);
    assert_eq!(
        outcome,
        [Some(io::ErrorKind::ConnectionRefused)],
        "plaintext to strict"
    );
    let log = mesh.log_when(1, |log| {
        !rejected_lines(log, &strict.name, "strict_plaintext").is_empty()
    });
    let lines = rejected_lines(&log, &strict.name, "strict_plaintext");
    assert_eq!(lines.len(), 1, "one rejection line expected:\n{log}");
    assert!(
        lines[0].contains(&format!("src=\"{}:", client.ip)),
        "the line does not name the client's address {}: {}",
        client.ip,
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("dst=\"{dst}\"")),
        "the line does not name the destination {dst}: {}",
        lines[0]
    );
    assert_eq!(rejected_metric(&mesh, &strict.name, "strict_plaintext"), 1);

    // A port scan from one process: every probe is counted, but the log keeps at most
    // its per-second limit of lines and sums up the rest.
    let scan: Vec<SocketAddr> = SCAN_PORTS
        .map(|port| SocketAddr::from((strict.ip, port)))
        .collect();
    let probes = scan.len() as u64;
    let outcome = connect_each(&client.netns_path, scan);
    assert!(
        outcome
            .iter()
            .all(|kind| *kind == Some(io::ErrorKind::ConnectionRefused)),
        "every probe of the scan must be refused: {outcome:?}"
    );
    let total = probes + 1;
    let accounted = |log: &str| {
        rejected_lines(log, &strict.name, "strict_plaintext").len() as u64
            + suppressed_sum(log, &strict.name, "strict_plaintext")
    };
    let log = mesh.log_when(1, |log| accounted(log) >= total);
    assert_eq!(
        accounted(&log),
        total,
        "logged plus suppressed rejections must add up to the connections made:\n{log}"
    );
    assert!(
        suppressed_sum(&log, &strict.name, "strict_plaintext") > 0,
        "a scan of {probes} ports was not rate-limited:\n{log}"
    );
    wait_until("the metric counts every probe", || {
        rejected_metric(&mesh, &strict.name, "strict_plaintext") == total
    });

    // IPv6 to an enrolled pod is reset, and the daemon finds the workload from the
    // pods' IPv6 addresses.
    link_local_addr(client);
    let dst = SocketAddr::V6(SocketAddrV6::new(
        link_local_addr(permissive),
        8086,
        0,
        eth0_index(client),
    ));
    let outcome = connect_each(&client.netns_path, vec![dst]);
    assert_eq!(
        outcome,
        [Some(io::ErrorKind::ConnectionRefused)],
        "IPv6 to an enrolled pod"
    );
    let log = mesh.log_when(1, |log| {
        !rejected_lines(log, &permissive.name, "ipv6").is_empty()
    });
    let lines = rejected_lines(&log, &permissive.name, "ipv6");
    assert_eq!(lines.len(), 1, "one IPv6 rejection line expected:\n{log}");
    assert!(
        lines[0].contains("src=\"[fe80:") && lines[0].contains("]:8086\""),
        "the line does not name the link-local client and port 8086: {}",
        lines[0]
    );
    assert_eq!(rejected_metric(&mesh, &permissive.name, "ipv6"), 1);

    // With the daemon down, the permissive workload's listener is gone and the
    // connection is reset. The record waits in the pinned ring buffer, and the next
    // daemon logs and counts it. A flood of plaintext to the strict workload then
    // fills the buffer, and the records that did not fit are counted as lost.
    mesh.kill_daemon(1).expect("killing the daemon");
    let dst = SocketAddr::from((permissive.ip, 8080));
    let outcome = connect_each(&client.netns_path, vec![dst]);
    assert_eq!(
        outcome,
        [Some(io::ErrorKind::ConnectionRefused)],
        "with the daemon down"
    );
    let flood = vec![SocketAddr::from((strict.ip, 8080)); FLOOD_PROBES];
    let outcome = connect_each(&client.netns_path, flood);
    assert!(
        outcome
            .iter()
            .all(|kind| *kind == Some(io::ErrorKind::ConnectionRefused)),
        "every connection of the flood must be refused"
    );
    let before_restart = mesh.log(1).len();
    mesh.start_daemon(1).expect("restarting the daemon");
    let log = mesh.log_when(1, |log| {
        !rejected_lines(&log[before_restart..], &permissive.name, "no_listener").is_empty()
    });
    let lines = rejected_lines(&log[before_restart..], &permissive.name, "no_listener");
    assert_eq!(
        lines.len(),
        1,
        "the restarted daemon did not log the rejection from while it was down:\n{log}"
    );
    assert!(
        lines[0].contains(&format!("src=\"{}:", client.ip)),
        "the line does not name the client {}: {}",
        client.ip,
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("dst=\"{dst}\"")),
        "the line does not name the destination {dst}: {}",
        lines[0]
    );
    assert_eq!(rejected_metric(&mesh, &permissive.name, "no_listener"), 1);

    let flood_accounted =
        || rejected_metric(&mesh, &strict.name, "strict_plaintext") + lost_metric(&mesh);
    wait_until("the flood is counted or lost in full", || {
        flood_accounted() >= FLOOD_PROBES as u64
    });
    assert_eq!(
        flood_accounted(),
        FLOOD_PROBES as u64,
        "rejections counted plus lost must add up to the flood"
    );
    assert!(
        lost_metric(&mesh) > 0,
        "a flood larger than the ring buffer lost nothing"
    );
    let log = mesh.log(1);
    assert!(
        log[before_restart..].contains("inbound rejection records lost"),
        "the restarted daemon did not warn about the lost records:\n{}",
        &log[before_restart..]
    );
}
