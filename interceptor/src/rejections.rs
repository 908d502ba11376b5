//! Inbound connections that the `sk_lookup` program rejected in the kernel: plaintext
//! to a workload in strict mode, IPv6 from outside the pod, and connections whose
//! daemon listener is missing. The kernel replies to those SYNs with a reset and no
//! socket ever reaches the daemon, so the program writes a record of each one to a
//! ring buffer, which this module reads, logs and counts.
//!
//! Every rejection is counted in `/metrics` by workload and reason. The log gets one
//! `connection rejected` event per rejection, but at most [`LOG_LINES_PER_SECOND`] per
//! workload and reason in each one-second window. The rest of the window's rejections
//! are summed up in one `suppressed similar rejections` event once the window is over,
//! so a port scan cannot flood the log.
//!
//! The ring buffer is pinned with the other maps. The records of rejections while no
//! daemon runs (reason `no_listener`, mostly) wait there, and the next daemon logs them
//! when it starts, with their age. When the buffer is full, the program drops new
//! records and counts them in a per-CPU counter, which this module logs and exports.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use interceptor_common::{InboundReject, REJECT_IPV6, REJECT_NO_LISTENER, REJECT_STRICT_PLAINTEXT};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, info, warn};

use crate::admin::Metrics;
use crate::ebpf::RejectionMaps;
use crate::tunnel::LocalWorkload;

/// Maximum number of `connection rejected` events per workload and reason in each
/// [`LOG_WINDOW`].
pub const LOG_LINES_PER_SECOND: u32 = 10;

/// The window of the log rate limit, which is also how often suppressed rejections are
/// summed up and the lost-record counter is read.
pub const LOG_WINDOW: Duration = Duration::from_secs(1);

/// Minimum time between two scans of the pods' IPv6 addresses, so rejections for an
/// address that no pod has cannot make the daemon scan on every record.
const IPV6_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

const AF_INET: u32 = libc::AF_INET as u32;
const AF_INET6: u32 = libc::AF_INET6 as u32;

/// Cause of a reset by the `sk_lookup` program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Plaintext to a workload in strict mode.
    StrictPlaintext,
    /// IPv6 from outside the pod; the mesh carries IPv4 only.
    Ipv6,
    /// The daemon's listener was missing: the daemon was down or not started yet.
    NoListener,
}

impl Reason {
    fn from_code(code: u32) -> Option<Self> {
        match code {
            REJECT_STRICT_PLAINTEXT => Some(Self::StrictPlaintext),
            REJECT_IPV6 => Some(Self::Ipv6),
            REJECT_NO_LISTENER => Some(Self::NoListener),
            _ => None,
        }
    }

    /// Returns the name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StrictPlaintext => "strict_plaintext",
            Self::Ipv6 => "ipv6",
            Self::NoListener => "no_listener",
        }
    }
}

/// One rejected connection, decoded from an [`InboundReject`] record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// When the program ran, in nanoseconds of `CLOCK_MONOTONIC`.
    pub time_ns: u64,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The pod's address and port the client connected to.
    pub dst: SocketAddr,
    pub reason: Reason,
}

impl Rejection {
    /// Decodes a ring buffer record. Returns `None` for a record that is too short or
    /// has an unknown family or reason.
    pub fn decode(record: &[u8]) -> Option<Self> {
        if record.len() < size_of::<InboundReject>() {
            return None;
        }
        // SAFETY: `record` contains at least `size_of::<InboundReject>()` bytes, and the
        // type is plain integers, valid for any bit pattern; the read is unaligned.
        let raw: InboundReject = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let reason = Reason::from_code(raw.reason)?;
        let (client_ip, pod_ip) = match raw.family {
            AF_INET => (
                IpAddr::V4(ipv4(raw.client_addr_be[0])),
                IpAddr::V4(ipv4(raw.pod_addr_be[0])),
            ),
            AF_INET6 => (
                IpAddr::V6(ipv6(&raw.client_addr_be)),
                IpAddr::V6(ipv6(&raw.pod_addr_be)),
            ),
            _ => return None,
        };
        Some(Self {
            time_ns: raw.time_ns,
            client: SocketAddr::new(client_ip, raw.client_port),
            dst: SocketAddr::new(pod_ip, raw.pod_port),
            reason,
        })
    }
}

/// Converts a network byte order word as the kernel stores it.
fn ipv4(word_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(word_be.to_ne_bytes())
}

/// Converts four network byte order words as the kernel stores them.
fn ipv6(words_be: &[u32; 4]) -> Ipv6Addr {
    let mut bytes = [0u8; 16];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(words_be) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(bytes)
}

/// A log rate limit per key: at most `max_lines` events in each window, which starts
/// with the first event of the key after the previous window ended.
#[derive(Debug)]
pub struct RateLimiter<K> {
    max_lines: u32,
    window: Duration,
    windows: HashMap<K, Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Decision of [`RateLimiter::admit`] for one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// Whether to log the event.
    pub log: bool,
    /// Events of the key suppressed in its previous window, which this event ended.
    /// The caller logs their summary before the event.
    pub suppressed_before: u64,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(max_lines: u32, window: Duration) -> Self {
        Self {
            max_lines,
            window,
            windows: HashMap::new(),
        }
    }

    /// Decides whether an event of `key` at `now` is logged or suppressed.
    pub fn admit(&mut self, key: K, now: Instant) -> Admission {
        let window = self.windows.entry(key).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        let mut suppressed_before = 0;
        if now.duration_since(window.start) >= self.window {
            suppressed_before = window.suppressed;
            *window = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        let log = window.logged < self.max_lines;
        if log {
            window.logged += 1;
        } else {
            window.suppressed += 1;
        }
        Admission {
            log,
            suppressed_before,
        }
    }

    /// Ends the windows that are over at `now` and returns the keys whose windows
    /// suppressed events, with the number suppressed. The ended keys are forgotten,
    /// so the limiter keeps only keys seen within the last window.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, u64)> {
        let mut summaries = Vec::new();
        let ended: Vec<K> = self
            .windows
            .iter()
            .filter(|(_, w)| now.duration_since(w.start) >= self.window)
            .map(|(key, _)| key.clone())
            .collect();
        for key in ended {
            if let Some(w) = self.windows.remove(&key) {
                if w.suppressed > 0 {
                    summaries.push((key, w.suppressed));
                }
            }
        }
        summaries
    }
}

/// Finds the workload of a rejected connection from the pod address it was for.
struct PodNames {
    by_ipv4: HashMap<Ipv4Addr, String>,
    /// The pods' IPv6 addresses, scanned from their namespaces when an IPv6 rejection
    /// names an address not seen yet, since the directory lists IPv4 addresses only.
    by_ipv6: HashMap<Ipv6Addr, String>,
    locals: Vec<Arc<LocalWorkload>>,
    last_scan: Option<Instant>,
}

impl PodNames {
    fn new(locals: Vec<Arc<LocalWorkload>>) -> Self {
        let by_ipv4 = locals
            .iter()
            .map(|local| (local.workload.ip, local.workload.name.clone()))
            .collect();
        Self {
            by_ipv4,
            by_ipv6: HashMap::new(),
            locals,
            last_scan: None,
        }
    }

    /// Returns the name of the workload at `addr`, or an empty string when no workload
    /// of this node has it (a pod that left the directory before the daemon started).
    async fn name(&mut self, addr: IpAddr) -> String {
        match addr {
            IpAddr::V4(addr) => self.by_ipv4.get(&addr).cloned().unwrap_or_default(),
            IpAddr::V6(addr) => {
                let scan_due = self
                    .last_scan
                    .is_none_or(|last| last.elapsed() >= IPV6_RESCAN_INTERVAL);
                if !self.by_ipv6.contains_key(&addr) && scan_due {
                    self.scan_ipv6().await;
                }
                self.by_ipv6.get(&addr).cloned().unwrap_or_default()
            }
        }
    }

    // NOTE: two pods with the same IPv6 address (for example a link-local address set
    // by hand on both) are not distinguished. The address then names the pod scanned last.
    async fn scan_ipv6(&mut self) {
        self.last_scan = Some(Instant::now());
        self.by_ipv6.clear();
        for local in &self.locals {
            match local.netns.ipv6_addrs().await {
                Ok(addrs) => {
                    for addr in addrs.into_iter().filter(|a| !a.is_loopback()) {
                        self.by_ipv6.insert(addr, local.workload.name.clone());
                    }
                }
                Err(error) => {
                    debug!(workload = %local.workload.name, %error, "reading the pod's IPv6 addresses failed")
                }
            }
        }
    }
}

/// Reads the rejection records of `maps` forever: logs each rejection within the rate
/// limit, counts it in `metrics`, and once per [`LOG_WINDOW`] logs the suppressed
/// summaries and reads the lost-record counter. `locals` are this node's workloads.
pub async fn watch(maps: RejectionMaps, locals: Vec<Arc<LocalWorkload>>, metrics: Arc<Metrics>) {
    let RejectionMaps { records, lost } = maps;
    // SAFETY: the ring buffer owns its map's file descriptor and returns that same
    // descriptor from `as_raw_fd` until it is dropped, which the `AsyncFd` does.
    let registered = unsafe { AsyncFd::register_with_interest(records, Interest::READABLE) };
    let mut records = match registered {
        Ok(records) => records,
        Err(error) => {
            warn!(%error, "watching the inbound rejection ring buffer failed; rejections by the sk_lookup program are not logged or counted");
            return;
        }
    };
    let mut reader = Reader {
        names: PodNames::new(locals),
        limiter: RateLimiter::new(LOG_LINES_PER_SECOND, LOG_WINDOW),
        metrics,
    };
    let mut lost_seen = LostCounter::default();
    let mut tick = tokio::time::interval(LOG_WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = records.readable_mut() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(%error, "waiting for inbound rejection records failed; rejections by the sk_lookup program are no longer logged or counted");
                        return;
                    }
                };
                let batch = drain(guard.get_inner_mut());
                // Readiness that arrived after the drain stays set, because tokio
                // clears only the readiness this guard observed.
                guard.clear_ready();
                for rejection in batch {
                    reader.handle(rejection).await;
                }
            }
            _ = tick.tick() => {
                reader.log_summaries(Instant::now());
                lost_seen.check(&lost, &reader.metrics);
            }
        }
    }
}

/// Takes every record out of the ring buffer and decodes it, so the buffer has room
/// again before the slower logging starts.
fn drain(records: &mut RingBuf<MapData>) -> Vec<Rejection> {
    let mut batch = Vec::new();
    while let Some(record) = records.next() {
        match Rejection::decode(&record) {
            Some(rejection) => batch.push(rejection),
            None => debug!(
                len = record.len(),
                "skipped an inbound rejection record that does not decode"
            ),
        }
    }
    batch
}

struct Reader {
    names: PodNames,
    limiter: RateLimiter<(String, Reason)>,
    metrics: Arc<Metrics>,
}

impl Reader {
    async fn handle(&mut self, rejection: Rejection) {
        let workload = self.names.name(rejection.dst.ip()).await;
        let reason = rejection.reason;
        self.metrics.record_rejection(&workload, reason.as_str());
        let admission = self
            .limiter
            .admit((workload.clone(), reason), Instant::now());
        if admission.suppressed_before > 0 {
            log_suppressed(&workload, reason, admission.suppressed_before);
        }
        if admission.log {
            log_rejection(&workload, &rejection);
        }
    }

    fn log_summaries(&mut self, now: Instant) {
        for ((workload, reason), suppressed) in self.limiter.expire(now) {
            log_suppressed(&workload, reason, suppressed);
        }
    }
}

/// Logs one rejection. A missing listener is a warning, because the daemon should
/// have been there; the other reasons are the policy working as configured.
fn log_rejection(workload: &str, rejection: &Rejection) {
    let age_ms = monotonic_ns().saturating_sub(rejection.time_ns) / 1_000_000;
    let reason = rejection.reason.as_str();
    let (src, dst) = (rejection.client.to_string(), rejection.dst.to_string());
    match rejection.reason {
        Reason::NoListener => warn!(workload, src, dst, reason, age_ms, "connection rejected"),
        Reason::StrictPlaintext | Reason::Ipv6 => {
            info!(workload, src, dst, reason, age_ms, "connection rejected")
        }
    }
}

fn log_suppressed(workload: &str, reason: Reason, suppressed: u64) {
    let window_ms = LOG_WINDOW.as_millis() as u64;
    let reason_name = reason.as_str();
    match reason {
        Reason::NoListener => warn!(
            workload,
            reason = reason_name,
            suppressed,
            window_ms,
            "suppressed similar rejections"
        ),
        Reason::StrictPlaintext | Reason::Ipv6 => info!(
            workload,
            reason = reason_name,
            suppressed,
            window_ms,
            "suppressed similar rejections"
        ),
    }
}

/// The last value read from the lost-record counter.
#[derive(Default)]
struct LostCounter {
    seen: u64,
    read_failed: bool,
}

impl LostCounter {
    /// Reads the counter, exports it, and logs a warning when it grew. The counter is
    /// pinned, so the first read also reports losses from before this daemon started.
    fn check(&mut self, lost: &PerCpuArray<MapData, u64>, metrics: &Metrics) {
        let total = match lost.get(&0, 0) {
            Ok(values) => values.iter().sum::<u64>(),
            Err(error) => {
                if !self.read_failed {
                    warn!(%error, "reading the lost inbound rejection counter failed; interceptor_inbound_rejections_lost_total stays at its last value");
                    self.read_failed = true;
                }
                return;
            }
        };
        self.read_failed = false;
        metrics.set_rejections_lost(total);
        if total > self.seen {
            warn!(
                lost = total - self.seen,
                lost_total = total,
                "inbound rejection records lost because the ring buffer was full; those rejections are neither logged nor counted by workload"
            );
        }
        self.seen = total;
    }
}

/// Returns `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    // SAFETY: `timespec` is plain data.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` is valid for writes; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(raw: InboundReject) -> Vec<u8> {
        // SAFETY: `InboundReject` is plain integers with explicit padding, so all of
        // its bytes are initialized.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw as *const InboundReject).cast::<u8>(),
                size_of::<InboundReject>(),
            )
        };
        bytes.to_vec()
    }

    fn be(addr: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(addr.octets())
    }

    #[test]
    fn ipv4_record_decodes() {
        let raw = InboundReject {
            time_ns: 7,
            pod_addr_be: [be(Ipv4Addr::new(10, 1, 2, 11)), 0, 0, 0],
            client_addr_be: [be(Ipv4Addr::new(10, 1, 1, 12)), 0, 0, 0],
            family: AF_INET,
            reason: REJECT_STRICT_PLAINTEXT,
            client_port: 40000,
            pod_port: 8080,
            _pad: 0,
        };

        let rejection = Rejection::decode(&record(raw)).expect("a valid record");

        assert_eq!(rejection.time_ns, 7);
        assert_eq!(
            rejection.client,
            "10.1.1.12:40000".parse().expect("address")
        );
        assert_eq!(rejection.dst, "10.1.2.11:8080".parse().expect("address"));
        assert_eq!(rejection.reason, Reason::StrictPlaintext);
    }

    #[test]
    fn ipv6_record_decodes() {
        let words = |addr: Ipv6Addr| {
            let octets = addr.octets();
            std::array::from_fn(|i| {
                u32::from_ne_bytes([
                    octets[4 * i],
                    octets[4 * i + 1],
                    octets[4 * i + 2],
                    octets[4 * i + 3],
                ])
            })
        };
        let pod: Ipv6Addr = "fe80::1".parse().expect("address");
        let client: Ipv6Addr = "fe80::2:3".parse().expect("address");
        let raw = InboundReject {
            pod_addr_be: words(pod),
            client_addr_be: words(client),
            family: AF_INET6,
            reason: REJECT_IPV6,
            client_port: 50000,
            pod_port: 8086,
            ..InboundReject::default()
        };

        let rejection = Rejection::decode(&record(raw)).expect("a valid record");

        assert_eq!(rejection.client, SocketAddr::new(client.into(), 50000));
        assert_eq!(rejection.dst, SocketAddr::new(pod.into(), 8086));
        assert_eq!(rejection.reason, Reason::Ipv6);
    }

    #[test]
    fn invalid_records_are_skipped() {
        let valid = InboundReject {
            family: AF_INET,
            reason: REJECT_NO_LISTENER,
            ..InboundReject::default()
        };
        assert!(Rejection::decode(&record(valid)).is_some());

        let short = record(valid);
        assert!(Rejection::decode(&short[..short.len() - 1]).is_none());
        let unknown_reason = InboundReject {
            reason: 99,
            ..valid
        };
        assert!(Rejection::decode(&record(unknown_reason)).is_none());
        let unknown_family = InboundReject { family: 1, ..valid };
        assert!(Rejection::decode(&record(unknown_family)).is_none());
    }

    #[test]
    fn rate_limiter_logs_up_to_limit() {
        let mut limiter = RateLimiter::new(3, Duration::from_secs(1));
        let start = Instant::now();

        let logged = (0..10)
            .filter(|i| limiter.admit("web", start + Duration::from_millis(*i)).log)
            .count();

        assert_eq!(logged, 3);
    }

    #[test]
    fn rate_limiter_keys_are_independent() {
        let mut limiter = RateLimiter::new(1, Duration::from_secs(1));
        let now = Instant::now();

        assert!(limiter.admit("web", now).log);
        assert!(!limiter.admit("web", now).log);
        assert!(limiter.admit("db", now).log);
    }

    #[test]
    fn next_window_reports_the_suppressed_count() {
        let mut limiter = RateLimiter::new(2, Duration::from_secs(1));
        let start = Instant::now();
        for i in 0..5 {
            limiter.admit("web", start + Duration::from_millis(i));
        }

        let admission = limiter.admit("web", start + Duration::from_secs(1));

        assert_eq!(
            admission,
            Admission {
                log: true,
                suppressed_before: 3
            }
        );
        assert!(limiter.expire(start + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn expire_summarizes_only_ended_windows_that_suppressed() {
        let mut limiter = RateLimiter::new(1, Duration::from_secs(1));
        let start = Instant::now();
        for _ in 0..4 {
            limiter.admit("scanned", start);
        }
        limiter.admit("quiet", start);
        limiter.admit("recent", start + Duration::from_millis(900));
        limiter.admit("recent", start + Duration::from_millis(900));

        let mut summaries = limiter.expire(start + Duration::from_secs(1));
        summaries.sort();

        assert_eq!(summaries, [("scanned", 3)]);
        assert_eq!(limiter.windows.len(), 1, "only the running window stays");
        assert_eq!(
            limiter.expire(start + Duration::from_millis(1900)),
            [("recent", 1)]
        );
        assert!(limiter.windows.is_empty());
    }
}
