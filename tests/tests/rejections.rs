//! Privileged end-to-end test of the rejection reports. Connections that the
//! `sk_lookup` program resets in the kernel show up in the daemon's log and in
//! `/metrics`. A port scan is rate-limited in the log but fully counted. A rejection
//! while the daemon is down is logged by the next daemon, and a flood that overflows
//! the ring buffer meanwhile is counted as lost.
//!
//! The island uses prefix `dlrej` and subnet 251.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV6, TcpStream};
use std::path::Path;
use std::time::Duration;

use interceptor_tests::clients::{eth0_index, in_netns, link_local_addr, wait_until};
use interceptor_tests::mesh::{scaled, Mesh};
use interceptor_tests::setup::{start_test_mesh, Enroll, MeshOptions};
use interceptor_tests::{DirectoryExtras, Island};

/// Ports of the port scan, none of which has a server.
const SCAN_PORTS: std::ops::RangeInclusive<u16> = 9001..=9100;

/// Connections made while the daemon is down: more than the 4095 records that the
/// 256 KiB ring buffer has room for, so some are lost.
const FLOOD_PROBES: usize = 5000;

/// Connects from a thread inside the network namespace at `netns` to each of `addrs`
/// in turn and returns the error kind of each attempt (`None` when it connected).
fn connect_each(netns: &Path, addrs: Vec<SocketAddr>) -> Vec<Option<io::ErrorKind>> {
    in_netns(netns.to_owned(), move || {
        addrs
            .iter()
            .map(|addr| {
                TcpStream::connect_timeout(addr, scaled(Duration::from_secs(5)))
                    .err()
                    .map(|error| error.kind())
            })
            .collect()
    })
}

/// Returns the lines of `log` with `message` for `workload` and `reason`.
fn report_lines<'a>(log: &'a str, message: &str, workload: &str, reason: &str) -> Vec<&'a str> {
    let workload = format!("workload=\"{workload}\"");
    let reason = format!("reason=\"{reason}\"");
    log.lines()
        .filter(|l| l.contains(message) && l.contains(&workload) && l.contains(&reason))
        .collect()
}

/// Returns the `connection rejected` lines of `log` for `workload` and `reason`.
fn rejected_lines<'a>(log: &'a str, workload: &str, reason: &str) -> Vec<&'a str> {
    report_lines(log, "connection rejected", workload, reason)
}

/// Returns the sum of `suppressed=N` over the `suppressed similar rejections` lines of
/// `log` for `workload` and `reason`.
fn suppressed_sum(log: &str, workload: &str, reason: &str) -> u64 {
    report_lines(log, "suppressed similar rejections", workload, reason)
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|field| field.strip_prefix("suppressed="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Asserts that the one connection of `case` failed with ECONNREFUSED, which is how
/// the client sees the `sk_lookup` program's reset.
fn assert_refused(outcome: &[Option<io::ErrorKind>], case: &str) {
    assert_eq!(outcome, [Some(io::ErrorKind::ConnectionRefused)], "{case}");
}

/// Asserts that a rejection line names the client's address `client_ip` and the
/// destination `dst`.
fn assert_names_client_and_dst(line: &str, client_ip: Ipv4Addr, dst: SocketAddr) {
    assert!(
        line.contains(&format!("src=\"{client_ip}:")),
        "the line does not name the client's address {client_ip}: {line}"
    );
    assert!(
        line.contains(&format!("dst=\"{dst}\"")),
        "the line does not name the destination {dst}: {line}"
    );
}

/// Returns the value of the series `series` (name and labels) in node 1's
/// `/metrics`, or `None` when the series is missing.
fn metric(mesh: &Mesh, series: &str) -> Option<u64> {
    let metrics = mesh.admin_get(1, "/metrics").expect("fetching /metrics");
    let prefix = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.parse().expect("a counter value"))
}

/// Returns the value of `interceptor_inbound_rejected_total` for `workload` and
/// `reason` on node 1, or 0 when the series is missing.
fn rejected_metric(mesh: &Mesh, workload: &str, reason: &str) -> u64 {
    let series = format!(
        "interceptor_inbound_rejected_total{{workload=\"{workload}\",reason=\"{reason}\"}}"
    );
    metric(mesh, &series).unwrap_or(0)
}

/// Returns the value of `interceptor_inbound_rejections_lost_total` on node 1.
fn lost_metric(mesh: &Mesh) -> u64 {
    metric(mesh, "interceptor_inbound_rejections_lost_total")
        .expect("the lost rejections counter in /metrics")
}

/// Island `dlrej`, one node: p1 is an enrolled strict server, p2 a plaintext client
/// outside the mesh, p3 an enrolled permissive server. Pods of one node share a
/// bridge, so p2 also reaches p3's link-local IPv6 address.
#[test]
fn rejections_are_logged_and_counted() {
    let extras = |island: &Island, _work_dir: &Path| {
        let mut extras = DirectoryExtras::default();
        extras.sections.insert(
            island.pod(1, 1).name.clone(),
            "inbound_mode = \"strict\"\n".to_owned(),
        );
        extras
    };
    let Some(mut setup) = start_test_mesh(
        "rejections_are_logged_and_counted",
        "dlrej",
        251,
        MeshOptions {
            nodes: 1,
            pods_per_node: 3,
            enroll: Enroll::Pods(&[(1, 1), (1, 3)]),
            extras: Some(&extras),
            ..MeshOptions::default()
        },
    ) else {
        return;
    };
    let island = &setup.island;
    let mesh = &mut setup.mesh;
    let (strict, client, permissive) = (island.pod(1, 1), island.pod(1, 2), island.pod(1, 3));

    // One plaintext connection to the strict workload: reset, logged with the
    // workload, the client's address, the destination and the reason, and counted.
    let dst = SocketAddr::from((strict.ip, 8080));
    let outcome = connect_each(&client.netns_path, vec![dst]);
    assert_refused(&outcome, "plaintext to strict");
    let log = mesh.log_when(1, |log| {
        !rejected_lines(log, &strict.name, "strict_plaintext").is_empty()
    });
    let lines = rejected_lines(&log, &strict.name, "strict_plaintext");
    assert_eq!(lines.len(), 1, "one rejection line expected:\n{log}");
    assert_names_client_and_dst(lines[0], client.ip, dst);
    assert_eq!(rejected_metric(mesh, &strict.name, "strict_plaintext"), 1);

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
        rejected_metric(mesh, &strict.name, "strict_plaintext") == total
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
    assert_refused(&outcome, "IPv6 to an enrolled pod");
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
    assert_eq!(rejected_metric(mesh, &permissive.name, "ipv6"), 1);

    // With the daemon down, the permissive workload's listener is gone and the
    // connection is reset. The record waits in the pinned ring buffer, and the next
    // daemon logs and counts it. A flood of plaintext to the strict workload then
    // fills the buffer, and the records that did not fit are counted as lost.
    mesh.kill_daemon(1).expect("killing the daemon");
    let dst = SocketAddr::from((permissive.ip, 8080));
    let outcome = connect_each(&client.netns_path, vec![dst]);
    assert_refused(&outcome, "with the daemon down");
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
    assert_names_client_and_dst(lines[0], client.ip, dst);
    assert_eq!(rejected_metric(mesh, &permissive.name, "no_listener"), 1);

    let flood_accounted =
        || rejected_metric(mesh, &strict.name, "strict_plaintext") + lost_metric(mesh);
    wait_until("the flood is counted or lost in full", || {
        flood_accounted() >= FLOOD_PROBES as u64
    });
    assert_eq!(
        flood_accounted(),
        FLOOD_PROBES as u64,
        "rejections counted plus lost must add up to the flood"
    );
    assert!(
        lost_metric(mesh) > 0,
        "a flood larger than the ring buffer lost nothing"
    );
    let log = mesh.log(1);
    assert!(
        log[before_restart..].contains("inbound rejection records lost"),
        "the restarted daemon did not warn about the lost records:\n{}",
        &log[before_restart..]
    );
}
