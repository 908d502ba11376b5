//! The tunnel: outbound connections of enrolled workloads, carried over one mutual TLS
//! 1.3 connection each to the destination pod's tunnel listener, and the server side
//! that delivers them.
//!
//! Client side ([`serve_outbound`]): the eBPF connect hooks send the app's connect to
//! the outbound listener in its own pod. The daemon finds the original destination,
//! and for a mesh workload opens a TLS connection from the pod's namespace to
//! `<destination pod IP>:<tunnel port>`, presenting the source workload's SVID and
//! requiring exactly the SPIFFE ID the directory gives for the destination IP. It sends
//! the preamble and relays; the destination's status decides whether the app's socket
//! gets data or a reset. A destination outside the mesh gets a plain TCP passthrough.
//!
//! Server side ([`serve_tunnel`]): accepts TLS from any workload of the trust domain,
//! reads the preamble, delivers only to its own pod's IP and never to the daemon's
//! ports, checks the connection against the policies, sends a status and
//! relays. In ambient mode the delivery keeps the client's address as its source
//! (see [`crate::inbound`]).
//!
//! Each connection is one `conn` span and ends with exactly one `connection closed`
//! event carrying bytes each way, duration, identities and the error, if any.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use interceptor_common::ConnKey;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admin::{ConnectionLabels, Metrics};
use crate::config::RunConfig;
use crate::ebpf::NodePrograms;
use crate::identity::SpiffeId;
use crate::ktls::{self, KtlsStream, RecordBoundedIo};
use crate::netns::Netns;
use crate::policy::{ConnectionFacts, OpenConnections, PolicyStore, Registration};
use crate::policy::{Decision, Reason, Verdict};
use crate::protocol::{self, Status};
use crate::relay::{self, relay, BufferPool, End, SharedTcp, Splice, Transferred};
use crate::splice::PipePool;

/// Pipes kept for reuse when traffic on kernel TLS tunnels drops.
const POOLED_PIPES: usize = 64;
use crate::workloads::{Registry, Workload};

/// Errors that end a tunnelled connection before or while bytes flow.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no original destination recorded for this connection")]
    NoOrigDst,
    #[error("creating a socket in the pod's network namespace failed")]
    Socket(#[source] std::io::Error),
    #[error("connecting to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("the workload's SVID (serial {serial}) expired at {} and could not be renewed: check that the CA service is reachable", crate::identity::rfc3339(*.not_after))]
    SvidExpired {
        serial: String,
        not_after: SystemTime,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake and preamble did not complete within {timeout:?}")]
    HandshakeTimeout { timeout: Duration },
    #[error("reading the peer's identity failed")]
    PeerIdentity(#[source] crate::tls::Error),
    #[error("peer presented {actual}, but the directory gives {expected} for {addr}")]
    IdentityMismatch {
        addr: IpAddr,
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
    #[error("invalid preamble")]
    Preamble(#[source] protocol::Error),
    #[error("preamble names {dst}, which this pod ({pod_ip}) does not deliver to")]
    InvalidDestination { dst: SocketAddr, pod_ip: Ipv4Addr },
    #[error("sending to the tunnel failed")]
    Send(#[source] std::io::Error),
    #[error("the server sent {len} bytes before the tunnel status")]
    UnexpectedData { len: usize },
    #[error("handing the tunnel to kernel TLS failed")]
    Ktls(#[source] ktls::Error),
    /// The policies deny the connection. `policy` names the DENY policy that matched,
    /// and is `None` when ALLOW policies apply but none matched.
    #[error("{reason}{}", policy.as_ref().map(|policy| format!(" {policy}")).unwrap_or_default())]
    Denied {
        reason: Reason,
        policy: Option<String>,
    },
    #[error("registering the delivery connection for sk_lookup failed")]
    Delivery(#[source] Box<crate::ebpf::Error>),
    #[error(transparent)]
    Relay(#[from] relay::Error),
}

/// TLS configurations of one workload's current SVID.
#[derive(Debug)]
pub struct TlsConfigs {
    pub client: Arc<rustls::ClientConfig>,
    pub server: Arc<rustls::ServerConfig>,
    /// Serial of the SVID behind both, for logs.
    pub serial: String,
    /// End of the SVID's validity. Past it, new outbound tunnels fail at once, because
    /// every peer would reject the certificate.
    pub not_after: SystemTime,
}

/// A workload of this node, with the resources the daemon holds for it.
#[derive(Debug)]
pub struct LocalWorkload {
    pub workload: Workload,
    pub netns: Netns,
    /// Replaced whenever the SVID is renewed; each connection takes the current one.
    pub tls: RwLock<Arc<TlsConfigs>>,
}

impl LocalWorkload {
    pub fn tls(&self) -> Arc<TlsConfigs> {
        match self.tls.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// Source of the original destination of an outbound connection.
#[derive(Debug)]
pub enum OrigDstSource {
    /// The eBPF connect hooks' map, keyed by the namespace cookie and the app socket's
    /// address (ambient mode).
    Ebpf(Arc<NodePrograms>),
    /// `SO_ORIGINAL_DST` of the accepted socket, set by an iptables `REDIRECT` rule
    /// (the sidecar baseline).
    SoOriginalDst,
}

impl OrigDstSource {
    /// Returns the original destination of the redirected connection `app`, accepted
    /// from `peer` in `local`'s namespace, or `None` when none was recorded.
    fn take(
        &self,
        local: &LocalWorkload,
        app: &TcpStream,
        peer: SocketAddr,
    ) -> Option<SocketAddrV4> {
        match self {
            Self::Ebpf(programs) => {
                let IpAddr::V4(src_ip) = peer.ip() else {
                    return None;
                };
                let key = ConnKey {
                    netns_cookie: local.netns.cookie(),
                    src_addr_be: u32::from(src_ip).to_be(),
                    src_port: peer.port(),
                    _pad: 0,
                };
                let orig = programs.take_orig_dst(&key)?;
                let addr = Ipv4Addr::from(u32::from_be(orig.addr_be));
                Some(SocketAddrV4::new(addr, u16::from_be(orig.port_be)))
            }
            Self::SoOriginalDst => so_original_dst(app),
        }
    }
}

/// Reads `SO_ORIGINAL_DST`: the destination before a netfilter `REDIRECT`.
pub(crate) fn so_original_dst(stream: &TcpStream) -> Option<SocketAddrV4> {
    use std::os::fd::AsRawFd;
    // SAFETY: `sockaddr_in` is plain data.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 || i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    Some(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)))
}

/// State shared by every connection of the daemon.
#[derive(Debug)]
pub struct Shared {
    pub config: RunConfig,
    pub registry: Arc<Registry>,
    pub orig_dst: OrigDstSource,
    pub pool: Arc<BufferPool>,
    /// Pipes for splicing on kernel TLS tunnels.
    pub pipes: Arc<PipePool>,
    /// Counters of closed connections, served by the admin endpoint.
    pub metrics: Arc<Metrics>,
    /// Kernel TLS support here. Tunnels are offloaded per connection when their
    /// negotiated suite allows it.
    pub ktls: ktls::Support,
    /// Transparent delivery that keeps the client's address, or `None` to deliver
    /// from the pod's own address (the sidecar baseline).
    pub delivery: Option<crate::inbound::Delivery>,
    /// Policies that every inbound connection is checked against.
    pub policies: Arc<PolicyStore>,
    /// Open inbound connections, which a policy reload may cut.
    pub open: Arc<OpenConnections>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        config: RunConfig,
        registry: Arc<Registry>,
        orig_dst: OrigDstSource,
        pool: Arc<BufferPool>,
        ktls: ktls::Support,
    ) -> Self {
        Self {
            config,
            registry,
            orig_dst,
            pool,
            pipes: PipePool::new(POOLED_PIPES),
            metrics: Arc::new(Metrics::default()),
            ktls,
            delivery: None,
            policies: Arc::new(PolicyStore::new(crate::policy::Policies::empty(
                crate::policy::DEFAULT_ROOT_NAMESPACE,
            ))),
            open: Arc::new(OpenConnections::default()),
            next_id: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Accepts the redirected connections of `local`'s apps, forever.
pub async fn serve_outbound(listener: TcpListener, local: Arc<LocalWorkload>, shared: Arc<Shared>) {
    accept_loop(
        listener,
        local,
        shared,
        "outbound",
        |stream, peer, _id, local, shared| outbound(stream, peer, local, shared),
    )
    .await
}

/// Accepts tunnel connections for `local`, forever.
pub async fn serve_tunnel(listener: TcpListener, local: Arc<LocalWorkload>, shared: Arc<Shared>) {
    accept_loop(
        listener,
        local,
        shared,
        "inbound",
        |stream, _peer, id, local, shared| inbound(stream, id, local, shared),
    )
    .await
}

/// Accepts on `listener` forever and handles each connection in its own task, inside a
/// `conn` span with a daemon-wide id. Accept errors (such as running out of
/// descriptors) are logged and retried after a pause.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    local: Arc<LocalWorkload>,
    shared: Arc<Shared>,
    dir: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, u64, Arc<LocalWorkload>, Arc<Shared>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(workload = %local.workload.name, dir, %error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = shared.next_id();
        let span = info_span!("conn", id, dir, workload = %local.workload.name, src = %peer);
        tokio::spawn(
            handle(stream, peer, id, Arc::clone(&local), Arc::clone(&shared)).instrument(span),
        );
    }
}

/// Facts about a connection that its close event reports.
#[derive(Default)]
pub(crate) struct Summary {
    /// "outbound" for this node's apps connecting out, "inbound" for tunnels arriving.
    pub(crate) direction: &'static str,
    pub(crate) dst: Option<SocketAddr>,
    /// The connecting workload's identity: this node's workload on the outbound side,
    /// the authenticated peer on the inbound side.
    pub(crate) src_identity: Option<SpiffeId>,
    /// The destination workload's identity, authenticated on the outbound side.
    pub(crate) dst_identity: Option<SpiffeId>,
    pub(crate) mode: &'static str,
    /// Encryption of the tunnel's bytes: "userspace" (rustls), or "none" for
    /// passthrough.
    pub(crate) tls: &'static str,
    /// The cipher kernel TLS runs, when it carries the tunnel.
    pub(crate) cipher: Option<&'static str>,
    /// Path of the bytes through the daemon: "copy" through its memory, or "splice".
    pub(crate) relay: &'static str,
    pub(crate) moved: Transferred,
    /// `namespace/name` of the policy that decided on an inbound connection.
    pub(crate) policy: Option<String>,
    /// Dry-run policies that matched an inbound connection, as
    /// `namespace/name=allow|deny`, comma-separated.
    pub(crate) dry_run: String,
}

pub(crate) fn log_close(
    shared: &Shared,
    started: Instant,
    summary: &Summary,
    result: &Result<(), Error>,
) {
    let labels = ConnectionLabels {
        direction: summary.direction,
        mode: summary.mode,
        tls: summary.tls,
        cipher: summary.cipher.unwrap_or_default(),
        relay: summary.relay,
        result: close_result(result),
    };
    shared.metrics.record_close(
        labels,
        summary.moved.app_to_tunnel,
        summary.moved.tunnel_to_app,
    );
    let dst = summary.dst.map(|d| d.to_string()).unwrap_or_default();
    let identity = |id: &Option<SpiffeId>| id.as_ref().map(|id| id.to_string()).unwrap_or_default();
    let (src_identity, dst_identity) = (
        identity(&summary.src_identity),
        identity(&summary.dst_identity),
    );
    let duration_ms = started.elapsed().as_millis() as u64;
    let policy = summary.policy.as_deref().unwrap_or_default();
    let dry_run = summary.dry_run.as_str();
    // A `None` field is not recorded, so a clean close carries no `error` field.
    let error = result
        .as_ref()
        .err()
        .map(|error| tracing::field::display(ErrorChain(error)));
    info!(
        dst,
        src_identity,
        dst_identity,
        policy,
        dry_run,
        mode = summary.mode,
        tls = summary.tls,
        cipher = summary.cipher.unwrap_or_default(),
        relay = summary.relay,
        bytes_sent = summary.moved.app_to_tunnel,
        bytes_received = summary.moved.tunnel_to_app,
        duration_ms,
        error,
        "connection closed"
    );
}

/// Returns the `result` metric label of a closed connection: "ok", "denied" or
/// "error". A denial is one by this node's policies, at accept or by a reload cut, or
/// one by the destination's node, which sends the `denied` tunnel status.
fn close_result(result: &Result<(), Error>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(Error::Denied { .. })
        | Err(Error::Relay(relay::Error::Rejected {
            status: Status::Denied,
        })) => "denied",
        Err(_) => "error",
    }
}

/// Formats an error with its sources, `a: b: c`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

async fn outbound(
    app: TcpStream,
    peer: SocketAddr,
    local: Arc<LocalWorkload>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let mut summary = Summary {
        direction: "outbound",
        mode: "tunnel",
        tls: "userspace",
        src_identity: Some(local.workload.spiffe_id.clone()),
        ..Summary::default()
    };
    let app = SharedTcp::new(app);
    let result = outbound_inner(&app, peer, &local, &shared, &mut summary).await;
    if result.is_err() {
        relay::set_reset_on_close(app.raw_fd());
    }
    log_close(&shared, started, &summary, &result);
}

async fn outbound_inner(
    app: &SharedTcp,
    peer: SocketAddr,
    local: &LocalWorkload,
    shared: &Shared,
    summary: &mut Summary,
) -> Result<(), Error> {
    let dst = shared
        .orig_dst
        .take(local, &app.0, peer)
        .ok_or(Error::NoOrigDst)?;
    summary.dst = Some(dst.into());

    let directory = shared.registry.snapshot();
    let Some(target) = directory.by_ip(*dst.ip()) else {
        summary.mode = "passthrough";
        summary.tls = "none";
        summary.relay = "copy";
        return passthrough(app, dst.into(), local, shared, summary).await;
    };
    let expected = target.spiffe_id.clone();
    let tunnel_addr = SocketAddr::new(IpAddr::V4(*dst.ip()), shared.config.tunnel_port);
    let timeout = shared.config.handshake_timeout;
    let tls_configs = local.tls();
    if tls_configs.not_after <= SystemTime::now() {
        return Err(Error::SvidExpired {
            serial: tls_configs.serial.clone(),
            not_after: tls_configs.not_after,
        });
    }
    let (tunnel, tunnel_socket) = tokio::time::timeout(timeout, async {
        let stream = connect_from(local, tunnel_addr).await?;
        let socket = SharedTcp::new(stream);
        let connector = TlsConnector::from(Arc::clone(&tls_configs.client));
        let server_name = ServerName::IpAddress(IpAddr::V4(*dst.ip()).into());
        let ulp = prepare_offload(shared, &socket);
        let io = RecordBoundedIo::new(socket.clone(), ulp, Arc::clone(&shared.pool));
        let mut tls =
            connector
                .connect(server_name, io)
                .await
                .map_err(|source| Error::Handshake {
                    addr: tunnel_addr,
                    source,
                })?;
        let actual = crate::tls::peer_spiffe_id(tls.get_ref().1).map_err(Error::PeerIdentity)?;
        if actual != expected {
            return Err(Error::IdentityMismatch {
                addr: IpAddr::V4(*dst.ip()),
                expected: Box::new(expected.clone()),
                actual: Box::new(actual),
            });
        }
        summary.dst_identity = Some(actual);
        let mut preamble = [0u8; protocol::MAX_PREAMBLE_LEN];
        let len = protocol::encode_preamble(dst.into(), &mut preamble);
        let suite = tls.get_ref().1.negotiated_cipher_suite();
        let tunnel = match offload(shared, ulp, suite.map(|s| s.suite())) {
            Some(cipher) => {
                let (io, conn) = tls.into_inner();
                // The server sends nothing before it has read the preamble, so rustls
                // holds no plaintext here and has read nothing past the handshake.
                let mut stream = hand_over(&socket, io, conn, None)?;
                stream
                    .write_all(&preamble[..len])
                    .await
                    .map_err(Error::Send)?;
                summary.tls = "ktls";
                summary.cipher = Some(cipher.as_str());
                Tunnel::Kernel(stream)
            }
            None => {
                tls.get_mut().0.unbound();
                tls.write_all(&preamble[..len]).await.map_err(Error::Send)?;
                tls.flush().await.map_err(Error::Send)?;
                Tunnel::User(tls)
            }
        };
        Ok((tunnel, socket))
    })
    .await
    .map_err(|_| Error::HandshakeTimeout { timeout })??;

    let (moved, result) =
        relay_tunnel(app_end(app), tunnel, tunnel_socket, shared, true, summary).await;
    summary.moved = moved;
    result.map_err(Error::from)
}

/// A tunnel after its handshake: still in rustls, or handed to kernel TLS.
enum Tunnel<S> {
    User(S),
    Kernel(KtlsStream),
}

/// Relays between `app` and `tunnel`, whichever TLS implementation carries it, and
/// notes in `summary` how the bytes move. A kernel tunnel splices in each direction the
/// start-up probe found to work.
async fn relay_tunnel<AR, AW, S>(
    app: End<AR, AW>,
    tunnel: Tunnel<S>,
    socket: SharedTcp,
    shared: &Shared,
    await_status: bool,
    summary: &mut Summary,
) -> (Transferred, Result<(), relay::Error>)
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tunnel {
        Tunnel::User(tls) => {
            let (reader, writer) = tokio::io::split(tls);
            let end = End {
                reader,
                writer,
                socket,
                name: "tunnel",
                tls: true,
            };
            summary.relay = "copy";
            relay(app, end, &shared.pool, await_status, None).await
        }
        Tunnel::Kernel(stream) => {
            let end = End {
                reader: stream.clone(),
                writer: stream,
                socket,
                name: "tunnel",
                tls: true,
            };
            let splice = Splice {
                pipes: &shared.pipes,
                to_app: shared.ktls.splice_rx,
                to_tunnel: shared.ktls.splice_tx,
            };
            summary.relay = match (splice.to_app, splice.to_tunnel) {
                (true, true) => "splice",
                (true, false) => "splice from tunnel, copy to tunnel",
                (false, true) => "copy from tunnel, splice to tunnel",
                (false, false) => "copy",
            };
            relay(app, end, &shared.pool, await_status, Some(splice)).await
        }
    }
}

/// Sets the `tls` upper-layer protocol on a new tunnel socket when kernel TLS may carry
/// tunnels here, and returns whether it did.
///
/// The kernel accepts the protocol only on an established socket, and a short
/// connection's FIN can arrive before its handshake is over, so it is set before the
/// handshake. Without keys the socket still behaves as plain TCP, so a tunnel whose
/// suite cannot be offloaded goes on in rustls over the same socket.
fn prepare_offload(shared: &Shared, socket: &SharedTcp) -> bool {
    if !shared.ktls.any() || shared.config.tls_record_limit.is_some() {
        return false;
    }
    match ktls::set_ulp(socket.raw_fd()) {
        Ok(()) => true,
        Err(error) => {
            debug!(%error, "setting the tls upper-layer protocol failed; the tunnel stays in userspace");
            false
        }
    }
}

/// Returns the cipher to hand the tunnel to kernel TLS with, or `None` to keep it in
/// rustls: its socket has no `tls` upper-layer protocol ([`prepare_offload`]), or the
/// kernel cannot offload the suite under the rekey policy. A configured record limit
/// also keeps tunnels in rustls, since only rustls rekeys at it.
fn offload(shared: &Shared, ulp: bool, suite: Option<rustls::CipherSuite>) -> Option<ktls::Cipher> {
    if !ulp {
        return None;
    }
    let cipher = suite.and_then(|suite| shared.ktls.offloads(suite));
    if cipher.is_none() {
        debug!(?suite, "the kernel does not offload this suite under the rekey policy; the tunnel stays in userspace");
    }
    cipher
}

/// Moves a finished rustls connection into the kernel: takes the plaintext rustls
/// already decrypted into `prefix` (with `None`, any such plaintext is an error), checks
/// that rustls stopped at a record boundary, and arms both directions.
fn hand_over<C>(
    socket: &SharedTcp,
    io: RecordBoundedIo,
    mut conn: C,
    prefix: Option<&mut Vec<u8>>,
) -> Result<KtlsStream, Error>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<C::Data>> + ExtractSecrets,
{
    let mut chunk = [0u8; 4096];
    let mut drained = Vec::new();
    loop {
        match std::io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => drained.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(source) => {
                return Err(Error::Relay(relay::Error::Read {
                    side: "tunnel",
                    source,
                }))
            }
        }
    }
    match prefix {
        Some(prefix) => *prefix = drained,
        None if drained.is_empty() => {}
        None => return Err(Error::UnexpectedData { len: drained.len() }),
    }
    if !io.at_record_boundary() {
        return Err(Error::Ktls(ktls::Error::NotAtRecordBoundary));
    }
    ktls::arm(socket.raw_fd(), conn.extract()).map_err(Error::Ktls)?;
    Ok(KtlsStream::new(socket.clone()))
}

/// The secret extraction of both connection types under one name.
trait ExtractSecrets: Sized {
    type Data;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error>;
}

impl ExtractSecrets for rustls::ClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

impl ExtractSecrets for rustls::ServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        self.dangerous_extract_secrets()
    }
}

pub(crate) fn app_end(app: &SharedTcp) -> End<SharedTcp, SharedTcp> {
    End {
        reader: app.clone(),
        writer: app.clone(),
        socket: app.clone(),
        name: "app",
        tls: false,
    }
}

/// Connects to `dst` from `local`'s network namespace, within the connect timeout.
async fn connect_from(local: &LocalWorkload, dst: SocketAddr) -> Result<TcpStream, Error> {
    let socket = local.netns.tcp_socket().await.map_err(Error::Socket)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket
        .connect(dst)
        .await
        .map_err(|source| Error::Connect { addr: dst, source })
}

/// Relays an enrolled workload's connection to a destination outside the mesh as plain
/// TCP from the workload's namespace.
async fn passthrough(
    app: &SharedTcp,
    dst: SocketAddr,
    local: &LocalWorkload,
    shared: &Shared,
    summary: &mut Summary,
) -> Result<(), Error> {
    let timeout = shared.config.connect_timeout;
    let upstream = tokio::time::timeout(timeout, connect_from(local, dst))
        .await
        .map_err(|_| Error::ConnectTimeout { addr: dst })??;
    let upstream = SharedTcp::new(upstream);
    let end = End {
        reader: upstream.clone(),
        writer: upstream.clone(),
        socket: upstream,
        name: "upstream",
        tls: false,
    };
    let (moved, result) = relay(app_end(app), end, &shared.pool, false, None).await;
    summary.moved = moved;
    result.map_err(Error::from)
}

async fn inbound(stream: TcpStream, id: u64, local: Arc<LocalWorkload>, shared: Arc<Shared>) {
    let started = Instant::now();
    let mut summary = Summary {
        direction: "inbound",
        mode: "tunnel",
        tls: "userspace",
        dst_identity: Some(local.workload.spiffe_id.clone()),
        ..Summary::default()
    };
    let tunnel = SharedTcp::new(stream);
    let result = inbound_inner(&tunnel, id, &local, &shared, &mut summary).await;
    log_close(&shared, started, &summary, &result);
}

async fn inbound_inner(
    tunnel_socket: &SharedTcp,
    id: u64,
    local: &LocalWorkload,
    shared: &Shared,
    summary: &mut Summary,
) -> Result<(), Error> {
    let timeout = shared.config.handshake_timeout;
    let acceptor = TlsAcceptor::from(Arc::clone(&local.tls().server));
    let peer_addr = tunnel_socket.0.peer_addr().map_err(Error::Socket)?;
    let ulp = prepare_offload(shared, tunnel_socket);
    let io = RecordBoundedIo::new(tunnel_socket.clone(), ulp, Arc::clone(&shared.pool));
    let (mut tls, dst) = tokio::time::timeout(timeout, async {
        let mut tls = acceptor
            .accept(io)
            .await
            .map_err(|source| Error::Handshake {
                addr: peer_addr,
                source,
            })?;
        summary.src_identity =
            Some(crate::tls::peer_spiffe_id(tls.get_ref().1).map_err(Error::PeerIdentity)?);
        let dst = protocol::read_preamble(&mut tls)
            .await
            .map_err(Error::Preamble)?;
        Ok::<_, Error>((tls, dst))
    })
    .await
    .map_err(|_| Error::HandshakeTimeout { timeout })??;
    summary.dst = Some(dst);

    let pod_ip = local.workload.ip;
    if dst.ip() != IpAddr::V4(pod_ip) || shared.config.is_reserved_port(dst.port()) {
        send_final_status(&mut tls, Status::InvalidDestination).await;
        return Err(Error::InvalidDestination { dst, pod_ip });
    }

    let facts = ConnectionFacts {
        identity: summary.src_identity.clone(),
        source_ip: peer_addr.ip(),
        namespace: local.workload.spiffe_id.namespace().to_owned(),
        labels: local.workload.labels.clone(),
        port: dst.port(),
    };
    if let Err(error) = authorize(shared, &facts, summary) {
        send_final_status(&mut tls, Status::Denied).await;
        return Err(error);
    }
    let mut registration = shared.open.register(id, facts);

    let connect_timeout = shared.config.connect_timeout;
    let delivery = deliver(local, shared, peer_addr.ip(), dst);
    let upstream = match tokio::time::timeout(connect_timeout, delivery).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(error)) => {
            send_final_status(&mut tls, connect_status(&error)).await;
            return Err(error);
        }
        Err(_) => {
            send_final_status(&mut tls, Status::TimedOut).await;
            return Err(Error::ConnectTimeout { addr: dst });
        }
    };
    let upstream = SharedTcp::new(upstream);

    let suite = tls.get_ref().1.negotiated_cipher_suite();
    let mut prefix = Vec::new();
    let tunnel = match offload(shared, ulp, suite.map(|s| s.suite())) {
        Some(cipher) => {
            let (io, conn) = tls.into_inner();
            // App bytes the client sent right behind the preamble may already be
            // decrypted in rustls; they go to the app before the relay starts.
            let mut stream = hand_over(tunnel_socket, io, conn, Some(&mut prefix))?;
            stream
                .write_all(&Status::Connected.encode())
                .await
                .map_err(Error::Send)?;
            summary.tls = "ktls";
            summary.cipher = Some(cipher.as_str());
            Tunnel::Kernel(stream)
        }
        None => {
            tls.get_mut().0.unbound();
            tls.write_all(&Status::Connected.encode())
                .await
                .map_err(Error::Send)?;
            tls.flush().await.map_err(Error::Send)?;
            Tunnel::User(tls)
        }
    };
    if !prefix.is_empty() {
        let mut writer = upstream.clone();
        writer.write_all(&prefix).await.map_err(Error::Send)?;
    }

    let app = End {
        reader: upstream.clone(),
        writer: upstream.clone(),
        socket: upstream,
        name: "app",
        tls: false,
    };
    let app_socket = app.socket.clone();
    let relayed = relay_tunnel(app, tunnel, tunnel_socket.clone(), shared, false, summary);
    let outcome = until_cut(&mut registration, relayed).await;
    let (mut moved, result) = match outcome {
        Ok(relayed) => relayed,
        Err(verdict) => {
            relay::set_reset_on_close(app_socket.raw_fd());
            relay::set_reset_on_close(tunnel_socket.raw_fd());
            return Err(cut_error(verdict, summary));
        }
    };
    moved.tunnel_to_app += prefix.len() as u64;
    summary.moved = moved;
    result.map_err(Error::from)
}

/// Evaluates `facts` against the policies in force and notes the policy and dry-run
/// matches in `summary`. Returns [`Error::Denied`] when the policies deny.
pub(crate) fn authorize(
    shared: &Shared,
    facts: &ConnectionFacts,
    summary: &mut Summary,
) -> Result<(), Error> {
    let verdict = facts.evaluate(&shared.policies.current());
    note_verdict(&verdict, summary);
    match verdict.decision {
        Decision::Allow => Ok(()),
        Decision::Deny => Err(denial(verdict)),
    }
}

/// Returns the error of a connection that `verdict` denies.
fn denial(verdict: Verdict) -> Error {
    Error::Denied {
        reason: verdict.reason,
        policy: verdict.policy,
    }
}

fn note_verdict(verdict: &Verdict, summary: &mut Summary) {
    summary.policy = verdict.policy.clone();
    let dry_run: Vec<String> = verdict
        .dry_run
        .iter()
        .map(|m| {
            let decision = match m.decision {
                Decision::Allow => "allow",
                Decision::Deny => "deny",
            };
            format!("{}={decision}", m.policy)
        })
        .collect();
    summary.dry_run = dry_run.join(",");
}

/// Runs `relayed` until it ends, or until a policy reload denies the connection. Then
/// the relay is dropped and the verdict returned, and the caller resets both sockets.
pub(crate) async fn until_cut<F: std::future::Future>(
    registration: &mut Registration,
    relayed: F,
) -> Result<F::Output, Verdict> {
    tokio::select! {
        output = relayed => Ok(output),
        verdict = registration.cut() => Err(verdict),
    }
}

/// Notes a reload's denying `verdict` in `summary` and returns the connection's error.
pub(crate) fn cut_error(verdict: Verdict, summary: &mut Summary) -> Error {
    note_verdict(&verdict, summary);
    denial(verdict)
}

/// Connects to the app at `dst` in `local`'s pod. With transparent delivery set up,
/// the connection comes from `client` (see [`crate::inbound::Delivery`]); otherwise
/// from the pod's own address.
pub(crate) async fn deliver(
    local: &LocalWorkload,
    shared: &Shared,
    client: IpAddr,
    dst: SocketAddr,
) -> Result<TcpStream, Error> {
    match (&shared.delivery, client) {
        (Some(delivery), IpAddr::V4(client)) => delivery.connect(local, client, dst).await,
        _ => connect_from(local, dst).await,
    }
}

/// Maps a failed delivery to the status the client side turns into a reset.
fn connect_status(error: &Error) -> Status {
    match error {
        Error::Connect { source, .. } => match source.raw_os_error() {
            Some(libc::ECONNREFUSED) => Status::Refused,
            _ => Status::Unreachable,
        },
        _ => Status::Unreachable,
    }
}

/// Sends a failure status and closes the TLS stream cleanly. Errors are ignored, because
/// the connection ends either way and its close event carries the cause.
async fn send_final_status<S: tokio::io::AsyncWrite + Unpin>(tls: &mut S, status: Status) {
    let _ = tls.write_all(&status.encode()).await;
    let _ = tls.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(reason: Reason, policy: Option<&str>) -> Verdict {
        Verdict {
            decision: Decision::Deny,
            policy: policy.map(str::to_owned),
            reason,
            dry_run: Vec::new(),
        }
    }

    #[test]
    fn denial_names_matching_deny_policy() {
        let error = denial(verdict(Reason::DenyPolicyMatched, Some("shop/deny-plain")));

        assert_eq!(error.to_string(), "denied by policy shop/deny-plain");
    }

    #[test]
    fn denial_without_allow_match_gives_reason() {
        let error = denial(verdict(Reason::NoAllowPolicyMatched, None));

        assert_eq!(error.to_string(), "no ALLOW policy matched");
    }

    #[test]
    fn close_result_separates_denials() {
        let rejected = |status| Err(Error::Relay(relay::Error::Rejected { status }));
        let cases = [
            ("allowed", Ok(()), "ok"),
            (
                "denied here",
                Err(denial(verdict(Reason::NoAllowPolicyMatched, None))),
                "denied",
            ),
            (
                "cut by a reload",
                Err(cut_error(
                    verdict(Reason::DenyPolicyMatched, Some("shop/deny")),
                    &mut Summary::default(),
                )),
                "denied",
            ),
            (
                "denied by the destination",
                rejected(Status::Denied),
                "denied",
            ),
            (
                "refused by the destination",
                rejected(Status::Refused),
                "error",
            ),
            (
                "timed out",
                Err(Error::ConnectTimeout {
                    addr: SocketAddr::from(([10, 0, 0, 1], 8080)),
                }),
                "error",
            ),
            ("no original destination", Err(Error::NoOrigDst), "error"),
        ];

        for (case, result, expected) in cases {
            assert_eq!(close_result(&result), expected, "{case}");
        }
    }
}
