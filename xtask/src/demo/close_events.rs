//! The daemons' log lines that the demo reads: `connection closed` and `connection
//! rejected` events and the `daemon started` line, in tracing-subscriber's text format.

use std::collections::HashMap;

use super::traffic::FlowRun;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// The client's node: the app's connection, sent into the tunnel.
    Outbound,
    /// The server's node: the tunnel, delivered to the app.
    Inbound,
}

impl Direction {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// One `connection closed` event of a daemon log. Missing fields are empty or 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct CloseEvent {
    pub(super) node: String,
    /// The span's `dir`: `outbound` or `inbound`.
    pub(super) direction: String,
    pub(super) workload: String,
    pub(super) dst: String,
    pub(super) src_identity: String,
    pub(super) dst_identity: String,
    /// `namespace/name` of the policy that decided on an inbound connection.
    pub(super) policy: String,
    pub(super) mode: String,
    pub(super) tls: String,
    /// The cipher kernel TLS runs, empty when rustls carries the tunnel.
    pub(super) cipher: String,
    /// From the daemon's app socket into the tunnel: the client's bytes on the outbound
    /// side, the server's on the inbound side.
    pub(super) bytes_sent: u64,
    pub(super) bytes_received: u64,
    pub(super) duration_ms: u64,
    pub(super) error: Option<String>,
}

impl CloseEvent {
    /// Returns (client to server, server to client) bytes.
    pub(super) fn client_server_bytes(&self) -> (u64, u64) {
        if self.direction == Direction::Inbound.as_str() {
            (self.bytes_received, self.bytes_sent)
        } else {
            (self.bytes_sent, self.bytes_received)
        }
    }
}

/// Parses a close event of node `node` from a log line such as
/// `INFO conn{id=1 dir="outbound" workload=w src=..}: connection closed dst="..." ...`.
pub(super) fn parse_close_event(node: &str, line: &str) -> Option<CloseEvent> {
    let (head, tail) = line.split_once(": connection closed")?;
    let span = head.split_once("conn{")?.1.strip_suffix('}')?;
    let span_fields = parse_fields(span);
    let fields = parse_fields(tail);
    let text = |key: &str| fields.get(key).cloned().unwrap_or_default();
    let number = |key: &str| fields.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(CloseEvent {
        node: node.to_owned(),
        direction: span_fields.get("dir").cloned().unwrap_or_default(),
        workload: span_fields.get("workload").cloned().unwrap_or_default(),
        dst: text("dst"),
        src_identity: text("src_identity"),
        dst_identity: text("dst_identity"),
        policy: text("policy"),
        mode: text("mode"),
        tls: text("tls"),
        cipher: text("cipher"),
        bytes_sent: number("bytes_sent"),
        bytes_received: number("bytes_received"),
        duration_ms: number("duration_ms"),
        error: fields.get("error").cloned(),
    })
}

/// One `connection rejected` event: an inbound connection that the `sk_lookup` program
/// reset in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Rejection {
    pub(super) workload: String,
    /// The client's address and port.
    pub(super) src: String,
    /// The pod's address and port.
    pub(super) dst: String,
    pub(super) reason: String,
}

/// Parses a log line such as `INFO connection rejected workload="w" src="10.200.0.1:4000"
/// dst="10.200.2.11:8080" reason="strict_plaintext" age_ms=0`.
pub(super) fn parse_rejection(line: &str) -> Option<Rejection> {
    let (_, tail) = line.split_once("connection rejected ")?;
    let mut fields = parse_fields(tail);
    let mut take = |key: &str| fields.remove(key).unwrap_or_default();
    Some(Rejection {
        workload: take("workload"),
        src: take("src"),
        dst: take("dst"),
        reason: take("reason"),
    })
}

/// Returns the TLS description of a log's `daemon started` line: its `kernel_tls` field,
/// which is written last and unquoted so it runs to the end of the line, or the `tls`
/// field of daemons built before kernel TLS support.
pub(super) fn daemon_tls(log: &str) -> Option<String> {
    let line = log.lines().find(|line| line.contains("daemon started"))?;
    let (_, fields) = line.split_once("daemon started")?;
    if let Some((_, kernel_tls)) = fields.split_once(" kernel_tls=") {
        return Some(format!("kernel TLS {}", kernel_tls.trim()));
    }
    parse_fields(fields).remove("tls")
}

/// Parses `key=value` fields as tracing-subscriber's text format writes them: string
/// values quoted with Rust escapes, others bare. `error`, written last with `Display`,
/// runs to the end of the line.
fn parse_fields(text: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    let mut rest = text.trim_start();
    while let Some((key, after)) = rest.split_once('=') {
        let (value, remainder) = if key == "error" {
            (after.to_owned(), "")
        } else if let Some(quoted) = after.strip_prefix('"') {
            take_quoted(quoted)
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        fields.insert(key.to_owned(), value);
        rest = remainder.trim_start();
    }
    fields
}

/// Unescapes a quoted value up to its closing quote and returns it with the text after.
fn take_quoted(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return (value, &text[at + 1..]),
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            _ => value.push(c),
        }
    }
    (value, "")
}

pub(super) fn find_event<'a>(
    events: &'a [CloseEvent],
    run: &FlowRun,
    direction: Direction,
) -> Option<&'a CloseEvent> {
    let (node, workload) = match direction {
        Direction::Outbound => (&run.client.node, &run.client.name),
        Direction::Inbound => (&run.server.node, &run.server.name),
    };
    let dst = run.dst.to_string();
    events.iter().find(|event| {
        event.node == *node
            && event.direction == direction.as_str()
            && event.workload == *workload
            && event.dst == dst
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLOSED: &str = "2026-01-01T00:00:00.000000Z  INFO conn{id=1 dir=\"outbound\" \
        workload=demo-n1-p2 src=127.0.0.1:45468}: connection closed dst=\"10.200.2.11:8080\" \
        src_identity=\"spiffe://cluster.local/ns/default/sa/p2\" \
        dst_identity=\"spiffe://cluster.local/ns/default/sa/p1\" mode=\"tunnel\" \
        tls=\"userspace\" cipher=\"\" bytes_sent=300000 bytes_received=300001 duration_ms=5";

    #[test]
    fn close_event_fields_parsed() {
        let event = parse_close_event("demo-n1", CLOSED).expect("a close event");

        assert_eq!(event.node, "demo-n1");
        assert_eq!(event.direction, "outbound");
        assert_eq!(event.workload, "demo-n1-p2");
        assert_eq!(event.dst, "10.200.2.11:8080");
        assert_eq!(
            event.src_identity,
            "spiffe://cluster.local/ns/default/sa/p2"
        );
        assert_eq!(
            event.dst_identity,
            "spiffe://cluster.local/ns/default/sa/p1"
        );
        assert_eq!(event.mode, "tunnel");
        assert_eq!(event.tls, "userspace");
        assert_eq!(event.cipher, "");
        assert_eq!(event.bytes_sent, 300000);
        assert_eq!(event.bytes_received, 300001);
        assert_eq!(event.duration_ms, 5);
        assert_eq!(event.error, None);
    }

    #[test]
    fn close_event_error_runs_to_line_end() {
        let line = format!("{CLOSED} error=connecting to 10.200.2.11:8080 failed: refused");

        let event = parse_close_event("demo-n1", &line).expect("a close event");

        assert_eq!(
            event.error.as_deref(),
            Some("connecting to 10.200.2.11:8080 failed: refused")
        );
        assert_eq!(event.duration_ms, 5);
    }

    #[test]
    fn close_event_ktls_cipher_parsed() {
        let line = CLOSED.replace(
            "tls=\"userspace\" cipher=\"\"",
            "tls=\"ktls\" cipher=\"CHACHA20-POLY1305\"",
        );

        let event = parse_close_event("demo-n1", &line).expect("a close event");

        assert_eq!(event.tls, "ktls");
        assert_eq!(event.cipher, "CHACHA20-POLY1305");
        assert_eq!(event.bytes_sent, 300000);
    }

    #[test]
    fn inbound_bytes_swapped_to_client_view() {
        let line = CLOSED.replace("dir=\"outbound\"", "dir=\"inbound\"");

        let event = parse_close_event("demo-n2", &line).expect("a close event");

        assert_eq!(event.client_server_bytes(), (300001, 300000));
    }

    #[test]
    fn close_event_denial_parsed() {
        let line = format!(
            "{} policy=\"default/deny-p2\" dry_run=\"\" error=denied by policy default/deny-p2",
            CLOSED.replace("dir=\"outbound\"", "dir=\"inbound\"")
        );

        let event = parse_close_event("demo-n2", &line).expect("a close event");

        assert_eq!(event.policy, "default/deny-p2");
        assert_eq!(
            event.error.as_deref(),
            Some("denied by policy default/deny-p2")
        );
    }

    #[test]
    fn rejection_fields_parsed() {
        let line = "2026-01-01T00:00:00.000000Z  INFO connection rejected \
                    workload=\"demo-n2-p1\" src=\"10.200.0.1:40000\" dst=\"10.200.2.11:8080\" \
                    reason=\"strict_plaintext\" age_ms=0";

        let rejection = parse_rejection(line).expect("a rejection");

        assert_eq!(rejection.workload, "demo-n2-p1");
        assert_eq!(rejection.src, "10.200.0.1:40000");
        assert_eq!(rejection.dst, "10.200.2.11:8080");
        assert_eq!(rejection.reason, "strict_plaintext");
    }

    #[test]
    fn other_lines_not_rejections() {
        assert_eq!(parse_rejection(CLOSED), None);
    }

    #[test]
    fn other_lines_not_close_events() {
        let line = "2026-01-01T00:00:00Z  INFO daemon started node=demo-n1 tls=\"userspace\"";

        assert_eq!(parse_close_event("demo-n1", line), None);
    }

    #[test]
    fn daemon_tls_unescaped() {
        let log = "x\n2026-01-01T00:00:00Z  INFO daemon started node=demo-n1 workloads=2 \
                   tls=\"userspace \\\"rustls\\\"\"\n";

        assert_eq!(daemon_tls(log).as_deref(), Some("userspace \"rustls\""));
    }

    #[test]
    fn daemon_kernel_tls_runs_to_line_end() {
        let log = "2026-01-01T00:00:00Z  INFO daemon started node=demo-n1 workloads=2 \
                   kernel_tls=unavailable (no tls ULP); tunnels use userspace rustls\n";

        assert_eq!(
            daemon_tls(log).as_deref(),
            Some("kernel TLS unavailable (no tls ULP); tunnels use userspace rustls")
        );
    }
}
