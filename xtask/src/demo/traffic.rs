//! The demo's traffic and what it leaves behind: the clients' results, the daemons'
//! close events, the captures, the kernel TLS counters and the access-control act.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use interceptor_tests::mesh::{run_peer, Mesh};
use interceptor_tests::pcap::tcp_flows;
use interceptor_tests::{
    contains, mesh_peer_payload, spawn_in, tcp_payloads, tls_record_counts, Capture, Island, Pod,
};

use super::close_events::{daemon_tls, find_event, parse_close_event, CloseEvent, Direction};
use super::report::Report;
use super::*;

/// One client connection of the demo, by node and pod index (starting at 1).
pub(super) struct Flow {
    pub(super) client: (usize, usize),
    pub(super) server: (usize, usize),
    pub(super) port: u16,
    pub(super) bytes: usize,
    pub(super) banner: bool,
}

const FLOWS: [Flow; 3] = [
    Flow {
        client: (1, 1),
        server: (2, 1),
        port: ECHO_PORT,
        bytes: LARGE_BYTES,
        banner: false,
    },
    Flow {
        client: (1, 2),
        server: (2, 2),
        port: BANNER_PORT,
        bytes: SMALL_BYTES,
        banner: true,
    },
    Flow {
        client: (1, 1),
        server: (1, 2),
        port: ECHO_PORT,
        bytes: SMALL_BYTES,
        banner: false,
    },
];

impl Flow {
    /// Bytes the server sends back: the echo plus the banner, if any.
    pub(super) fn bytes_back(&self) -> u64 {
        let banner = if self.banner { BANNER.len() } else { 0 };
        (self.bytes + banner) as u64
    }

    pub(super) fn describe(&self) -> String {
        let kind = if self.banner { "banner + echo" } else { "echo" };
        format!("{kind} {} B", self.bytes)
    }
}

/// A flow after its client ran.
pub(super) struct FlowRun {
    pub(super) flow: &'static Flow,
    pub(super) client: Pod,
    pub(super) server: Pod,
    pub(super) dst: SocketAddrV4,
    /// The client's result line.
    pub(super) result: String,
}

/// Facts read from one capture.
pub(super) struct CaptureFacts {
    pub(super) handshake_records: usize,
    pub(super) application_data_records: usize,
    /// Cleartext strings found in the capture.
    pub(super) cleartext_found: Vec<String>,
    pub(super) payload_segments: usize,
    /// Segments with payload to or from the tunnel port.
    pub(super) tunnel_segments: usize,
    /// Segments with payload to or from an app port.
    pub(super) app_port_segments: usize,
    /// Stretches of the tunnels' byte streams that tcpdump missed. The record count
    /// stops at the first one of each stream.
    pub(super) tunnel_gaps: usize,
}

/// One `kTLS` counter snapshot: namespace name and `/proc/net/tls_stat`, if present.
pub(super) struct TlsStat {
    pub(super) namespace: String,
    pub(super) counters: Option<Vec<(String, u64)>>,
}

/// Runs the clients while tcpdump captures node 1's `wire` and pod 1's link, then
/// collects the daemons' close events and what the captures show. The access-control
/// act runs last, after the captures stopped and the flows' close events were read,
/// so its connections count in neither.
pub(super) fn exercise(running: &Running, work_dir: &Path) -> anyhow::Result<Report> {
    let island = &running.island;
    let node1 = &island.node(1).netns_path;
    let wire_pcap = work_dir.join("wire.pcap");
    let pod_link_pcap = work_dir.join("p1.pcap");
    let wire = locked(|| Capture::start(node1, "wire", &wire_pcap))
        .context("starting tcpdump on demo-n1's wire")?;
    let pod_link = locked(|| Capture::start(node1, "p1", &pod_link_pcap))
        .context("starting tcpdump on demo-n1's p1")?;

    let mut runs = Vec::new();
    for flow in &FLOWS {
        runs.push(run_flow(island, flow)?);
    }
    wire.stop().context("stopping tcpdump on demo-n1's wire")?;
    pod_link
        .stop()
        .context("stopping tcpdump on demo-n1's p1")?;

    let events = wait_for_close_events(&running.mesh, &runs);
    let daemon_tls = (1..=NODES)
        .filter_map(|node| daemon_tls(&running.mesh.log(node)))
        .collect();
    let available_ulp = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default();
    let mut tls_stats = Vec::new();
    for namespace in island
        .nodes()
        .iter()
        .map(|node| (&node.name, &node.netns_path))
        .chain(island.pods().iter().map(|pod| (&pod.name, &pod.netns_path)))
    {
        tls_stats.push(read_tls_stat(namespace.0, namespace.1)?);
    }
    let access = access::exercise(running).context("running the access-control act")?;
    Ok(Report {
        runs,
        events,
        daemon_tls,
        wire: inspect_capture(&wire_pcap),
        pod_link: inspect_capture(&pod_link_pcap),
        available_ulp,
        tls_stats,
        access,
    })
}

fn run_flow(island: &Island, flow: &'static Flow) -> anyhow::Result<FlowRun> {
    let client = island.pod(flow.client.0, flow.client.1).clone();
    let server = island.pod(flow.server.0, flow.server.1).clone();
    let dst = SocketAddrV4::new(server.ip, flow.port);
    let dst_text = dst.to_string();
    let bytes = flow.bytes.to_string();
    let mut args = vec!["client", &dst_text, "--bytes", &bytes];
    if flow.banner {
        args.extend(["--expect-banner", BANNER]);
    }
    let output = run_peer(island, &client, &args)
        .with_context(|| format!("running mesh-peer client in {}", client.name))?;
    let result = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    Ok(FlowRun {
        flow,
        client,
        server,
        dst,
        result,
    })
}

/// Reads both daemons' close events until each run has its outbound and inbound event,
/// or [`CLOSE_EVENT_TIMEOUT`] has passed.
fn wait_for_close_events(mesh: &Mesh, runs: &[FlowRun]) -> Vec<CloseEvent> {
    let deadline = Instant::now() + CLOSE_EVENT_TIMEOUT;
    loop {
        let events: Vec<CloseEvent> = (1..=NODES)
            .flat_map(|node| {
                let name = node_name(node);
                mesh.log(node)
                    .lines()
                    .filter_map(|line| parse_close_event(&name, line))
                    .collect::<Vec<_>>()
            })
            .collect();
        let complete = runs.iter().all(|run| {
            find_event(&events, run, Direction::Outbound).is_some()
                && find_event(&events, run, Direction::Inbound).is_some()
        });
        if complete || Instant::now() > deadline {
            return events;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The strings that must not appear in a capture: a payload line and the banner.
pub(super) fn cleartext_markers() -> Vec<String> {
    let start = MARKER_LINE * PAYLOAD_LINE_LEN;
    let payload = mesh_peer_payload(start + PAYLOAD_LINE_LEN);
    let line = String::from_utf8_lossy(&payload[start..])
        .trim_end()
        .to_owned();
    vec![line, BANNER.to_owned()]
}

fn inspect_capture(pcap: &Path) -> CaptureFacts {
    let (handshake_records, application_data_records) = tls_record_counts(pcap, TUNNEL_PORT);
    let cleartext_found = cleartext_markers()
        .into_iter()
        .filter(|marker| contains(pcap, marker.as_bytes()))
        .collect();
    let tunnel_gaps = tcp_flows(pcap)
        .iter()
        .filter(|flow| flow.src.port() == TUNNEL_PORT || flow.dst.port() == TUNNEL_PORT)
        .map(|flow| flow.runs.len().saturating_sub(1))
        .sum();
    let segments = tcp_payloads(pcap);
    let app_ports = [ECHO_PORT, BANNER_PORT];
    let app_port_segments = segments
        .iter()
        .filter(|s| app_ports.contains(&s.src.port()) || app_ports.contains(&s.dst.port()))
        .count();
    CaptureFacts {
        handshake_records,
        application_data_records,
        cleartext_found,
        payload_segments: segments.len(),
        tunnel_segments: segments
            .iter()
            .filter(|s| s.src.port() == TUNNEL_PORT || s.dst.port() == TUNNEL_PORT)
            .count(),
        app_port_segments,
        tunnel_gaps,
    }
}

/// Reads `/proc/net/tls_stat` inside `netns` by running `cat` there, since `/proc/net`
/// shows the namespace of the reading process. The file exists only while the kernel's
/// `tls` module is loaded.
fn read_tls_stat(name: &str, netns: &Path) -> anyhow::Result<TlsStat> {
    let mut cat = Command::new("cat");
    cat.arg("/proc/net/tls_stat")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = spawn_in(netns, None, &mut cat)
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("reading /proc/net/tls_stat in {name}"))?;
    let counters = output
        .status
        .success()
        .then(|| parse_tls_stat(&String::from_utf8_lossy(&output.stdout)));
    Ok(TlsStat {
        namespace: name.to_owned(),
        counters,
    })
}

/// Parses `/proc/net/tls_stat`: one `Name<whitespace>value` per line.
fn parse_tls_stat(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_stat_counters_parsed() {
        let text = "TlsCurrTxSw                     \t1\nTlsTxSw                         \t7\n";

        assert_eq!(
            parse_tls_stat(text),
            [("TlsCurrTxSw".to_owned(), 1), ("TlsTxSw".to_owned(), 7)]
        );
    }

    #[test]
    fn marker_is_a_payload_line() {
        let markers = cleartext_markers();

        assert_eq!(markers[0], format!("mesh-peer {MARKER_LINE:08}"));
    }
}
