//! Metrics of the daemon and the admin endpoint that serves them.
//!
//! The endpoint listens on the node's loopback only (127.0.0.1:15020 by default, in the
//! daemon's own network namespace) and answers `GET /metrics` in the Prometheus text
//! format and `GET /healthz`. It speaks just enough HTTP/1.1 for that: one request per
//! connection, then close.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::ktls;

/// Labels of one closed-connection series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConnectionLabels {
    /// "outbound" or "inbound".
    pub direction: &'static str,
    /// "tunnel", "passthrough", or "plaintext" for inbound plaintext of a permissive
    /// workload.
    pub mode: &'static str,
    /// "userspace", "ktls" or "none".
    pub tls: &'static str,
    /// The kTLS cipher, empty when kTLS does not carry the connection.
    pub cipher: &'static str,
    /// "copy", "splice" or a mix per direction.
    pub relay: &'static str,
    /// "ok", "denied" when an authorization policy denied the connection (at accept or
    /// when a reload cut it), or "error" for any other failure.
    pub result: &'static str,
}

#[derive(Debug, Default)]
struct Counters {
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
}

/// State of one workload's SVID, for the identity metrics.
#[derive(Debug, Default)]
struct SvidState {
    not_after: Option<SystemTime>,
    lifetime: Duration,
    renewals_ok: u64,
    renewals_failed: u64,
}

/// Counters of closed connections, by [`ConnectionLabels`], the state of the
/// workloads' SVIDs, and the inbound connections the `sk_lookup` program rejected.
#[derive(Debug, Default)]
pub struct Metrics {
    closed: Mutex<BTreeMap<ConnectionLabels, Counters>>,
    /// By workload name.
    svids: Mutex<BTreeMap<String, SvidState>>,
    /// This node's clock minus the CA's at the CA's last response, in seconds.
    clock_skew_seconds: AtomicI64,
    /// Rejections by (workload, reason).
    rejected: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Rejection records lost because the ring buffer was full, as last read.
    rejections_lost: AtomicU64,
}

impl Metrics {
    /// Counts one closed connection that moved `sent` bytes from its app and `received`
    /// bytes to it.
    pub fn record_close(&self, labels: ConnectionLabels, sent: u64, received: u64) {
        let mut closed = self
            .closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let counters = closed.entry(labels).or_default();
        counters.connections += 1;
        counters.bytes_sent += sent;
        counters.bytes_received += received;
    }

    /// Records that `workload` has an SVID valid until `not_after`, issued for
    /// `lifetime`. With `renewed`, it also counts a successful renewal.
    pub fn record_svid(
        &self,
        workload: &str,
        not_after: SystemTime,
        lifetime: Duration,
        renewed: bool,
    ) {
        let mut svids = self
            .svids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = svids.entry(workload.to_owned()).or_default();
        state.not_after = Some(not_after);
        state.lifetime = lifetime;
        if renewed {
            state.renewals_ok += 1;
        }
    }

    /// Counts a failed renewal attempt of `workload`'s SVID.
    pub fn record_renewal_failure(&self, workload: &str) {
        let mut svids = self
            .svids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        svids
            .entry(workload.to_owned())
            .or_default()
            .renewals_failed += 1;
    }

    /// Records this node's clock minus the CA's, in seconds.
    pub fn record_clock_skew(&self, seconds: i64) {
        self.clock_skew_seconds.store(seconds, Ordering::Relaxed);
    }

    /// Counts one inbound connection that the `sk_lookup` program rejected.
    pub fn record_rejection(&self, workload: &str, reason: &'static str) {
        let mut rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *rejected.entry((workload.to_owned(), reason)).or_default() += 1;
    }

    /// Sets the number of rejection records lost so far, read from the kernel's counter.
    pub fn set_rejections_lost(&self, total: u64) {
        self.rejections_lost.store(total, Ordering::Relaxed);
    }

    /// Renders every metric in the Prometheus text format, with what the kernel supports
    /// as gauges.
    pub fn render(&self, ktls: &ktls::Support) -> String {
        let mut out = String::new();
        let closed = self
            .closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let series = [
            (
                "interceptor_connections_closed_total",
                "Connections closed, by how they were carried.",
                0,
            ),
            (
                "interceptor_sent_bytes_total",
                "Bytes from the app into the mesh, of closed connections.",
                1,
            ),
            (
                "interceptor_received_bytes_total",
                "Bytes from the mesh to the app, of closed connections.",
                2,
            ),
        ];
        for (name, help, field) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, counters) in closed.iter() {
                let value = [
                    counters.connections,
                    counters.bytes_sent,
                    counters.bytes_received,
                ][field];
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{}\",mode=\"{}\",tls=\"{}\",cipher=\"{}\",relay=\"{}\",result=\"{}\"}} {value}",
                    labels.direction, labels.mode, labels.tls, labels.cipher, labels.relay, labels.result
                );
            }
        }
        let name = "interceptor_kernel_tls_offload";
        let _ = writeln!(
            out,
            "# HELP {name} 1 when kernel TLS carries tunnels of this cipher here.\n# TYPE {name} gauge"
        );
        for cipher in ktls::Cipher::ALL {
            let offloaded = ktls.offloads_cipher(cipher);
            let _ = writeln!(
                out,
                "{name}{{cipher=\"{}\"}} {}",
                cipher.as_str(),
                u8::from(offloaded)
            );
        }
        drop(closed);
        self.render_svids(&mut out);
        for (name, help, value) in [
            (
                "interceptor_kernel_tls_splice_rx",
                "1 when splice out of kTLS sockets is used.",
                ktls.splice_rx,
            ),
            (
                "interceptor_kernel_tls_splice_tx",
                "1 when splice into kTLS sockets is used.",
                ktls.splice_tx,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                u8::from(value)
            );
        }
        self.render_rejections(&mut out);
        out
    }

    fn render_rejections(&self, out: &mut String) {
        let name = "interceptor_inbound_rejected_total";
        let _ = writeln!(
            out,
            "# HELP {name} Inbound connections the sk_lookup program reset, by workload and reason.\n# TYPE {name} counter"
        );
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for ((workload, reason), count) in rejected.iter() {
            let _ = writeln!(
                out,
                "{name}{{workload=\"{}\",reason=\"{reason}\"}} {count}",
                escape_label(workload)
            );
        }
        let name = "interceptor_inbound_rejections_lost_total";
        let _ = writeln!(
            out,
            "# HELP {name} Inbound rejections not logged or counted by workload, because the ring buffer was full.\n# TYPE {name} counter\n{name} {}",
            self.rejections_lost.load(Ordering::Relaxed)
        );
    }
}

/// Escapes a label value for the Prometheus text format, where backslash, double quote
/// and line feed must be written as `\\`, `\"` and `\n`.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Renders the SVID gauges and counters. A workload counts as close to expiry when
    /// less than a quarter of its SVID's lifetime remains, which happens only when
    /// renewals at half the lifetime have failed.
    fn render_svids(&self, out: &mut String) {
        let svids = self
            .svids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = SystemTime::now();
        let remaining = |state: &SvidState| -> f64 {
            match state.not_after {
                Some(not_after) => match not_after.duration_since(now) {
                    Ok(left) => left.as_secs_f64(),
                    Err(past) => -past.duration().as_secs_f64(),
                },
                None => 0.0,
            }
        };

        let name = "interceptor_svid_expiry_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Seconds until the workload's SVID expires; negative once expired.\n# TYPE {name} gauge"
        );
        for (workload, state) in svids.iter() {
            let workload = escape_label(workload);
            let _ = writeln!(
                out,
                "{name}{{workload=\"{workload}\"}} {:.0}",
                remaining(state)
            );
        }

        let name = "interceptor_svid_near_expiry";
        let _ = writeln!(
            out,
            "# HELP {name} 1 when less than a quarter of the SVID's lifetime remains.\n# TYPE {name} gauge"
        );
        for (workload, state) in svids.iter() {
            let workload = escape_label(workload);
            let near = remaining(state) < state.lifetime.as_secs_f64() / 4.0;
            let _ = writeln!(out, "{name}{{workload=\"{workload}\"}} {}", u8::from(near));
        }

        let name = "interceptor_svid_renewals_total";
        let _ = writeln!(
            out,
            "# HELP {name} SVID renewal attempts, by result.\n# TYPE {name} counter"
        );
        for (workload, state) in svids.iter() {
            let workload = escape_label(workload);
            let _ = writeln!(
                out,
                "{name}{{workload=\"{workload}\",result=\"ok\"}} {}\n{name}{{workload=\"{workload}\",result=\"error\"}} {}",
                state.renewals_ok, state.renewals_failed
            );
        }

        let name = "interceptor_clock_skew_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} This node's clock minus the CA's, at the CA's last answer.\n# TYPE {name} gauge\n{name} {}",
            self.clock_skew_seconds.load(Ordering::Relaxed)
        );
    }
}

/// Maximum length of a request head the endpoint reads.
const MAX_REQUEST: usize = 4096;

/// Serves the admin endpoint on `listener` forever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, ktls: ktls::Support) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting on the admin endpoint failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let ktls = ktls.clone();
        tokio::spawn(async move {
            let mut request = [0u8; MAX_REQUEST];
            let read =
                tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream, &mut request))
                    .await;
            let head = match read {
                Ok(Ok(len)) => String::from_utf8_lossy(&request[..len]).into_owned(),
                _ => return,
            };
            let (status, body) = match head.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["GET", "/metrics"] => ("200 OK", metrics.render(&ktls)),
                ["GET", "/healthz"] => ("200 OK", "ok\n".to_owned()),
                ["GET", _] => (
                    "404 Not Found",
                    "not found: try /metrics or /healthz\n".to_owned(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "only GET is supported\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, %error, "writing an admin response failed");
            }
        });
    }
}

/// Reads until the end of the request head (an empty line) or until `buffer` is full,
/// and returns the number of bytes read.
async fn read_head(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut [u8],
) -> std::io::Result<usize> {
    let mut len = 0;
    while len < buffer.len() {
        let n = stream.read(&mut buffer[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buffer[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(len)
}

/// Checks that the admin address is on loopback: the endpoint has no authentication.
pub fn check_addr(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!("--admin-addr {addr}: must be a loopback address, since the endpoint has no authentication"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(tls: &'static str) -> ConnectionLabels {
        ConnectionLabels {
            direction: "outbound",
            mode: "tunnel",
            tls,
            cipher: "",
            relay: "copy",
            result: "ok",
        }
    }

    #[test]
    fn closes_are_counted_per_path() {
        let metrics = Metrics::default();
        metrics.record_close(labels("userspace"), 10, 20);
        metrics.record_close(labels("userspace"), 1, 2);
        metrics.record_close(labels("ktls"), 5, 5);
        let text = metrics.render(&ktls::Support::none("test"));
        assert!(text.contains(
            "interceptor_connections_closed_total{direction=\"outbound\",mode=\"tunnel\",tls=\"userspace\",cipher=\"\",relay=\"copy\",result=\"ok\"} 2"
        ), "{text}");
        assert!(
            text.contains("tls=\"userspace\",cipher=\"\",relay=\"copy\",result=\"ok\"} 11"),
            "{text}"
        );
        assert!(
            text.contains("interceptor_kernel_tls_offload{cipher=\"CHACHA20-POLY1305\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn svid_metrics_show_expiry() {
        let metrics = Metrics::default();
        let lifetime = Duration::from_secs(100);
        let now = SystemTime::now();
        metrics.record_svid("fresh", now + Duration::from_secs(90), lifetime, true);
        metrics.record_svid("stale", now + Duration::from_secs(10), lifetime, false);
        metrics.record_renewal_failure("stale");
        metrics.record_clock_skew(-3);
        let text = metrics.render(&ktls::Support::none("test"));

        assert!(
            text.contains("interceptor_svid_near_expiry{workload=\"fresh\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("interceptor_svid_near_expiry{workload=\"stale\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("interceptor_svid_renewals_total{workload=\"fresh\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("interceptor_svid_renewals_total{workload=\"stale\",result=\"error\"} 1"),
            "{text}"
        );
        assert!(text.contains("interceptor_clock_skew_seconds -3"), "{text}");
        let expiry = text
            .lines()
            .find(|line| line.starts_with("interceptor_svid_expiry_seconds{workload=\"fresh\"}"))
            .expect("expiry of fresh");
        let seconds: f64 = expiry
            .rsplit(' ')
            .next()
            .and_then(|value| value.parse().ok())
            .expect("a number");
        assert!((88.0..=90.0).contains(&seconds), "{expiry}");
    }

    #[test]
    fn rejections_are_counted_per_workload_and_reason() {
        let metrics = Metrics::default();
        metrics.record_rejection("web", "strict_plaintext");
        metrics.record_rejection("web", "strict_plaintext");
        metrics.record_rejection("web", "no_listener");
        metrics.set_rejections_lost(3);

        let text = metrics.render(&ktls::Support::none("test"));

        assert!(
            text.contains("interceptor_inbound_rejected_total{workload=\"web\",reason=\"strict_plaintext\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "interceptor_inbound_rejected_total{workload=\"web\",reason=\"no_listener\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("interceptor_inbound_rejections_lost_total 3"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn admin_addr_must_be_loopback() {
        assert!(check_addr("127.0.0.1:15020".parse().expect("address")).is_ok());
        assert!(check_addr("0.0.0.0:15020".parse().expect("address")).is_err());
    }
}
