//! The demo's checks and its printed account.

mod access;

use std::fmt::Write as _;

use anyhow::bail;

use super::access::AccessControl;
use super::close_events::{find_event, CloseEvent, Direction};
use super::traffic::{cleartext_markers, CaptureFacts, FlowRun, TlsStat};
use super::*;

/// Everything the demo observed.
pub(super) struct Report {
    pub(super) runs: Vec<FlowRun>,
    pub(super) events: Vec<CloseEvent>,
    /// Kernel TLS description from each daemon's start line.
    pub(super) daemon_tls: Vec<String>,
    pub(super) wire: CaptureFacts,
    pub(super) pod_link: CaptureFacts,
    pub(super) available_ulp: String,
    pub(super) tls_stats: Vec<TlsStat>,
    pub(super) access: AccessControl,
}

/// One PASS or FAIL line of the output.
struct Check {
    passed: bool,
    text: String,
}

impl Check {
    /// Makes a check that passed when `problems` is empty.
    fn new(problems: Vec<String>, summary: String) -> Check {
        if problems.is_empty() {
            Check {
                passed: true,
                text: summary,
            }
        } else {
            Check {
                passed: false,
                text: format!("{summary}: {}", problems.join("; ")),
            }
        }
    }
}

impl Report {
    fn checks(&self) -> Vec<Check> {
        let mut checks: Vec<Check> = self.runs.iter().map(|run| self.check_run(run)).collect();
        checks.extend(self.check_wire());
        checks.push(check_pod_link(&self.pod_link));
        checks.extend(self.access.checks());
        checks
    }

    /// Checks that the client got its bytes back and that both daemons closed the
    /// connection cleanly, under the expected identities, with the same byte counts.
    fn check_run(&self, run: &FlowRun) -> Check {
        let flow = run.flow;
        let mut problems = Vec::new();
        let expected_result = format!("result=ok sent={0} received={0}", flow.bytes);
        if run.result != expected_result {
            problems.push(format!("client printed {:?}", run.result));
        }
        for direction in [Direction::Outbound, Direction::Inbound] {
            let Some(event) = find_event(&self.events, run, direction) else {
                problems.push(format!("no {} close event", direction.as_str()));
                continue;
            };
            let side = format!("{} {}", event.node, direction.as_str());
            if event.src_identity != spiffe_id(&run.client)
                || event.dst_identity != spiffe_id(&run.server)
            {
                problems.push(format!(
                    "{side}: identities {} -> {}",
                    event.src_identity, event.dst_identity
                ));
            }
            if event.mode != "tunnel" {
                problems.push(format!("{side}: mode {}", event.mode));
            }
            if let Some(error) = &event.error {
                problems.push(format!("{side}: error {error}"));
            }
            if event.client_server_bytes() != (flow.bytes as u64, flow.bytes_back()) {
                let (up, down) = event.client_server_bytes();
                problems.push(format!("{side}: moved {up} B and {down} B"));
            }
        }
        let summary = format!(
            "{} -> {}: {} returned, clean close on both daemons",
            run.client.name,
            run.server.name,
            flow.describe()
        );
        Check::new(problems, summary)
    }

    /// Checks the capture of node 1's `wire`, which carries the cross-node tunnels.
    fn check_wire(&self) -> Vec<Check> {
        let tunnels = self
            .runs
            .iter()
            .filter(|run| run.client.node != run.server.node)
            .count();
        vec![
            tls_check("wire", &self.wire, tunnels),
            cleartext_check("wire", &self.wire),
            app_port_check("wire", &self.wire),
        ]
    }

    /// Renders the account: connections, TLS carrier, checks and the result.
    pub(super) fn render(&self) -> String {
        // Writing to a String cannot fail, so the fmt::Results below are ignored.
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Island {PREFIX}: {} and {} on 10.{SUBNET}.0.0/16, {PODS_PER_NODE} pods each, all enrolled (logs in target/demo)",
            node_name(1),
            node_name(2)
        );

        let _ = writeln!(
            out,
            "\nConnections, from both daemons' close events (c->s: client to server)"
        );
        for run in &self.runs {
            self.render_run(&mut out, run);
        }

        let _ = writeln!(out, "\nTLS carrier");
        let mut daemon_tls = self.daemon_tls.clone();
        daemon_tls.dedup();
        for text in daemon_tls {
            let _ = writeln!(out, "  daemons at start: {text}");
        }
        let _ = writeln!(out, "  {}", self.carrier_line());
        for line in self.kernel_tls_lines() {
            let _ = writeln!(out, "  {line}");
        }

        self.access.render(&mut out);

        let checks = self.checks();
        let _ = writeln!(out, "\nChecks");
        for check in &checks {
            let verdict = if check.passed { "PASS" } else { "FAIL" };
            let _ = writeln!(out, "  {verdict}  {}", check.text);
        }
        let failed = checks.iter().filter(|check| !check.passed).count();
        let verdict = if failed == 0 { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "Result: {verdict} ({} of {} checks passed)",
            checks.len() - failed,
            checks.len()
        );
        out
    }

    fn render_run(&self, out: &mut String, run: &FlowRun) {
        let place = if run.client.node == run.server.node {
            "same node"
        } else {
            "cross-node"
        };
        let _ = writeln!(
            out,
            "  {} -> {}  {}  {place}, {}",
            run.client.name,
            run.server.name,
            run.dst,
            run.flow.describe()
        );
        let _ = writeln!(
            out,
            "    {} -> {}",
            spiffe_id(&run.client),
            spiffe_id(&run.server)
        );
        for direction in [Direction::Outbound, Direction::Inbound] {
            match find_event(&self.events, run, direction) {
                Some(event) => {
                    let (up, down) = event.client_server_bytes();
                    let _ = writeln!(
                        out,
                        "    {:<8} {:<9} c->s {up:>8} B  s->c {down:>8} B  {:>5} ms  tls={}{}{}",
                        event.node,
                        direction.as_str(),
                        event.duration_ms,
                        event.tls,
                        match event.cipher.as_str() {
                            "" => String::new(),
                            cipher => format!(" cipher={cipher}"),
                        },
                        event
                            .error
                            .as_ref()
                            .map(|error| format!("  error={error}"))
                            .unwrap_or_default()
                    );
                }
                None => {
                    let _ = writeln!(out, "    no {} close event", direction.as_str());
                }
            }
        }
    }

    /// Says which TLS carried the tunnels' bytes, from the close events' `tls` fields.
    fn carrier_line(&self) -> String {
        let mut carriers: Vec<&str> = self
            .events
            .iter()
            .filter(|event| event.mode == "tunnel")
            .map(|event| event.tls.as_str())
            .collect();
        let count = carriers.len();
        carriers.sort_unstable();
        carriers.dedup();
        let names: Vec<&str> = carriers
            .iter()
            .map(|carrier| match *carrier {
                "userspace" => "userspace (rustls in the daemon)",
                "ktls" => "ktls (kernel TLS)",
                other => other,
            })
            .collect();
        format!(
            "close events: tls={} on all {count} tunnel ends",
            names.join(", ")
        )
    }

    /// Describes the kernel's TLS support and the namespaces' `/proc/net/tls_stat`.
    fn kernel_tls_lines(&self) -> Vec<String> {
        let ulp = if self
            .available_ulp
            .split_whitespace()
            .any(|ulp| ulp == "tls")
        {
            format!("tcp_available_ulp: {} (tls registered)", self.available_ulp)
        } else {
            format!("tcp_available_ulp: {:?} (no tls)", self.available_ulp)
        };
        let present: Vec<&TlsStat> = self
            .tls_stats
            .iter()
            .filter(|stat| stat.counters.is_some())
            .collect();
        if present.is_empty() {
            return vec![format!(
                "{ulp}; /proc/net/tls_stat absent in all {} namespaces",
                self.tls_stats.len()
            )];
        }
        let mut lines = vec![ulp];
        for stat in present {
            let counters = stat.counters.as_deref().unwrap_or_default();
            let shown: Vec<String> = ["TlsTxSw", "TlsRxSw", "TlsTxDevice", "TlsRxDevice"]
                .iter()
                .map(|name| {
                    let value = counters
                        .iter()
                        .find(|(counter, _)| counter == name)
                        .map_or(0, |(_, value)| *value);
                    format!("{name}={value}")
                })
                .collect();
            lines.push(format!(
                "tls_stat {:<11} {}",
                stat.namespace,
                shown.join(" ")
            ));
        }
        lines
    }

    pub(super) fn result(&self) -> anyhow::Result<()> {
        let failed = self.checks().iter().filter(|check| !check.passed).count();
        if failed > 0 {
            bail!("{failed} demo check(s) failed");
        }
        Ok(())
    }
}

fn cleartext_check(name: &str, facts: &CaptureFacts) -> Check {
    let markers: Vec<String> = cleartext_markers()
        .iter()
        .map(|marker| format!("{marker:?}"))
        .collect();
    let problems = facts
        .cleartext_found
        .iter()
        .map(|marker| format!("found {marker:?}"))
        .collect();
    Check::new(
        problems,
        format!("{name}: no cleartext, {} absent", markers.join(" and ")),
    )
}

fn app_port_check(name: &str, facts: &CaptureFacts) -> Check {
    let problems = if facts.app_port_segments > 0 {
        vec![format!("{} segments on app ports", facts.app_port_segments)]
    } else {
        Vec::new()
    };
    Check::new(
        problems,
        format!(
            "{name}: no TCP payload on app ports {ECHO_PORT}, {BANNER_PORT} ({} of {} payload segments on {TUNNEL_PORT})",
            facts.tunnel_segments, facts.payload_segments
        ),
    )
}

/// Checks the capture of pod demo-n1-p1's link, which carries its two tunnels: the
/// cross-node one and the same-node one to demo-n1-p2.
fn check_pod_link(facts: &CaptureFacts) -> Check {
    let checks = [
        tls_check("p1", facts, 2),
        cleartext_check("p1", facts),
        app_port_check("p1", facts),
    ];
    let problems = checks
        .iter()
        .filter(|check| !check.passed)
        .map(|check| check.text.clone())
        .collect();
    Check::new(
        problems,
        format!(
            "p1 (pod demo-n1-p1's link, same-node pair too): TLS only, {} handshake and {} app-data records, no cleartext",
            facts.handshake_records, facts.application_data_records
        ),
    )
}

/// Checks that `tunnels` TLS connections to port 15008 show in a capture: each has at
/// least a ClientHello and a ServerHello in handshake records, and application-data
/// records both ways (the encrypted rest of the handshake, then the payload).
fn tls_check(name: &str, facts: &CaptureFacts, tunnels: usize) -> Check {
    let mut problems = Vec::new();
    if facts.handshake_records < 2 * tunnels {
        problems.push(format!(
            "expected at least {} handshake records",
            2 * tunnels
        ));
    }
    if facts.application_data_records < 2 * tunnels {
        problems.push(format!(
            "expected at least {} application-data records",
            2 * tunnels
        ));
    }
    // NOTE: tcpdump drops packets of the 4 MiB transfer on a busy machine, and the
    // record walk of a stream stops at its first gap, so the counts are lower bounds.
    let gaps = match facts.tunnel_gaps {
        0 => String::new(),
        gaps => format!(" (counted up to the first of {gaps} capture gaps)"),
    };
    Check::new(
        problems,
        format!(
            "{name}: TLS on port {TUNNEL_PORT}, {} handshake and {} app-data records{gaps}",
            facts.handshake_records, facts.application_data_records
        ),
    )
}
