//! The checks and the printed account of the access-control act.

use std::fmt::Write as _;

use super::super::access::{
    is_reset, policy_id, reset_limit, result_kind, AccessControl, DeniedAttempt, PlaintextAttempt,
};
use super::super::close_events::{CloseEvent, Direction};
use super::super::spiffe_id;
use super::Check;

/// The `reason` of a plaintext connection that a STRICT workload's `sk_lookup` reset.
const STRICT_PLAINTEXT: &str = "strict_plaintext";

impl AccessControl {
    pub(super) fn checks(&self) -> Vec<Check> {
        vec![check_plaintext(&self.plaintext), check_denied(&self.denied)]
    }

    /// Renders the section: the setup, then each client with its outcome and the log
    /// lines that explain it.
    pub(super) fn render(&self, out: &mut String) {
        // Writing to a String cannot fail, so the fmt::Results below are ignored.
        let _ = writeln!(
            out,
            "\nAccess control, after the flows (reasons from node 2's daemon log)"
        );
        let _ = writeln!(out, "  {}", self.setup);

        let plaintext = &self.plaintext;
        let _ = writeln!(
            out,
            "  {} (node namespace, {}, not enrolled) -> {}  {}  {} after {} ms",
            plaintext.node,
            plaintext.source_ip,
            plaintext.server.name,
            plaintext.dst,
            describe_result(&plaintext.result),
            plaintext.took.as_millis()
        );
        match &plaintext.rejection {
            Some(rejection) => {
                let _ = writeln!(
                    out,
                    "    {:<8} connection rejected  src={}  reason={}",
                    plaintext.server.node, rejection.src, rejection.reason
                );
            }
            None => {
                let _ = writeln!(out, "    no connection rejected event");
            }
        }

        let denied = &self.denied;
        let _ = writeln!(
            out,
            "  {} -> {}  {}  {} after {} ms, server accepted: {}",
            denied.client.name,
            denied.server.name,
            denied.dst,
            describe_result(&denied.result),
            denied.took.as_millis(),
            match denied.accepted.as_slice() {
                [] => "none".to_owned(),
                peers => peers.join(", "),
            }
        );
        let _ = writeln!(
            out,
            "    {} -> {}",
            spiffe_id(&denied.client),
            spiffe_id(&denied.server)
        );
        render_denied_event(out, Direction::Inbound, denied.inbound.as_ref());
        render_denied_event(out, Direction::Outbound, denied.outbound.as_ref());
    }
}

/// Names a client's outcome. `mesh-peer` reports a reset in reply to its SYN as
/// `refused`.
fn describe_result(result: &str) -> String {
    match result_kind(result) {
        "refused" => "refused (reset in reply to the SYN)".to_owned(),
        kind => kind.to_owned(),
    }
}

fn render_denied_event(out: &mut String, direction: Direction, event: Option<&CloseEvent>) {
    let direction = direction.as_str();
    let _ = match event {
        Some(event) => writeln!(
            out,
            "    {:<8} {direction:<9} {:>5} ms  error={}",
            event.node,
            event.duration_ms,
            event.error.as_deref().unwrap_or("none")
        ),
        None => writeln!(out, "    no {direction} close event"),
    };
}

/// Checks that the plaintext client was reset and that the protected workload's daemon
/// logged the rejection with the STRICT reason.
fn check_plaintext(attempt: &PlaintextAttempt) -> Check {
    let mut problems = Vec::new();
    if !is_reset(&attempt.result) {
        problems.push(format!("client printed {:?}", attempt.result));
    }
    match &attempt.rejection {
        None => problems.push(format!(
            "{} logged no connection rejected event from {}",
            attempt.server.node, attempt.source_ip
        )),
        Some(rejection) if rejection.reason != STRICT_PLAINTEXT => {
            problems.push(format!("rejection reason {:?}", rejection.reason));
        }
        Some(_) => {}
    }
    let summary = format!(
        "{} (plaintext) -> {}: reset, {} logged connection rejected reason=\"{STRICT_PLAINTEXT}\"",
        attempt.node, attempt.server.name, attempt.server.node
    );
    Check::new(problems, summary)
}

/// Checks that the denied mesh client was reset in time, that the server never
/// accepted the connection, and that the server's daemon logged the denial with both
/// SPIFFE IDs and the policy.
fn check_denied(attempt: &DeniedAttempt) -> Check {
    let mut problems = Vec::new();
    if !is_reset(&attempt.result) {
        problems.push(format!("client printed {:?}", attempt.result));
    }
    let limit = reset_limit();
    if attempt.took >= limit {
        problems.push(format!(
            "the reset took {} ms, not under {} ms",
            attempt.took.as_millis(),
            limit.as_millis()
        ));
    }
    if !attempt.accepted.is_empty() {
        problems.push(format!(
            "the server accepted {}",
            attempt.accepted.join(", ")
        ));
    }
    let expected_error = format!("denied by policy {}", policy_id());
    match &attempt.inbound {
        None => problems.push(format!(
            "{} logged no inbound close event",
            attempt.server.node
        )),
        Some(event) => {
            if event.src_identity != spiffe_id(&attempt.client)
                || event.dst_identity != spiffe_id(&attempt.server)
            {
                problems.push(format!(
                    "identities {} -> {}",
                    event.src_identity, event.dst_identity
                ));
            }
            match &event.error {
                Some(error) if *error == expected_error => {}
                Some(error) => problems.push(format!("error {error:?}")),
                None => problems.push("no error in the close event".to_owned()),
            }
        }
    }
    let summary = format!(
        "{} -> {}: reset in {} ms, not accepted, {} logged {expected_error}",
        attempt.client.name,
        attempt.server.name,
        attempt.took.as_millis(),
        attempt.server.node
    );
    Check::new(problems, summary)
}
