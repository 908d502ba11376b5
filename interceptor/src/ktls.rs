//! Kernel TLS (kTLS): moving a tunnel's record encryption into the kernel after rustls
//! has completed the handshake.
//!
//! # How a tunnel is handed over
//!
//! The handshake runs in rustls over a [`RecordBoundedIo`], which never reads past the
//! end of a TLS record, so rustls never holds bytes that belong to the kernel. Once the
//! handshake (and, on the server, the preamble) is done, any plaintext rustls already
//! decrypted is taken out, the TCP socket gets the `tls` upper-layer protocol, the
//! traffic secrets and record sequence numbers leave rustls with
//! `dangerous_extract_secrets`, and both directions are armed (`TLS_TX`, `TLS_RX`).
//! From then on the socket carries plaintext for the daemon, and [`KtlsStream`] reads
//! it with `recvmsg` so that alerts and post-handshake messages are told apart from
//! data.
//!
//! # Why not `rustls::kernel`
//!
//! rustls 0.23 also offers a kernel connection on its unbuffered connection types,
//! which can compute new secrets after a TLS 1.3 KeyUpdate. A KeyUpdate only helps if
//! the kernel can install the new key, which Linux supports from 6.14 on; the kernels
//! this project tests kTLS on (Debian's 6.1 and 6.12) cannot. So the policy here is to
//! never need a KeyUpdate on an offloaded tunnel (see [`RekeyPolicy`]), and the simpler
//! buffered connection with secret extraction is used, which keeps one handshake path
//! for userspace and kernel tunnels.
//! TODO: move to `rustls::kernel` and in-kernel rekeying once a 6.14+ kernel can be
//! tested here.
//!
//! # Rekey policy
//!
//! AES-GCM keys must be retired after about 2^24 full records (rustls rekeys at 2^23,
//! about 137 GB), which one tunnel at 10 Gbit/s reaches in minutes, and a raw tunnel
//! cannot move to a new TLS session. A kernel without TLS 1.3 rekeying cannot do that,
//! so only ChaCha20-Poly1305, whose limit (2^64 records) is never reached, is offloaded;
//! a tunnel that negotiated AES-GCM stays in userspace rustls, which rekeys by itself.
//! A peer KeyUpdate arriving on an offloaded tunnel cannot be followed: the tunnel is
//! closed with that reason and the app's socket is reset.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::{CipherSuite, ConnectionTrafficSecrets, ExtractedSecrets};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use std::sync::Arc;

use crate::relay::{BufferPool, PooledBuffer, SharedTcp};

/// TLS record content types (RFC 8446, section 5.1).
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
/// Alert description of `close_notify`, and the level byte sent with it (warning).
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_LEVEL_WARNING: u8 = 1;
/// Length of a TLS record header: type, version, length.
const RECORD_HEADER_LEN: usize = 5;

/// Errors of arming kernel TLS on a socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("setting the tls upper-layer protocol failed")]
    Ulp(#[source] io::Error),
    #[error("extracting the traffic secrets from rustls failed")]
    Extract(#[source] rustls::Error),
    #[error("rustls read past the end of a TLS record, so the kernel cannot take the stream over")]
    NotAtRecordBoundary,
    #[error("installing the {direction} key failed")]
    Install {
        direction: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A cipher kernel TLS may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    /// Every cipher the probe tries.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// Returns the name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes128Gcm => "AES-128-GCM",
            Self::Aes256Gcm => "AES-256-GCM",
            Self::Chacha20Poly1305 => "CHACHA20-POLY1305",
        }
    }

    fn of_suite(suite: CipherSuite) -> Option<Self> {
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Self::Aes128Gcm),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Self::Aes256Gcm),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Self::Chacha20Poly1305),
            _ => None,
        }
    }
}

/// Policy on which tunnels may be offloaded, given what the kernel can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekeyPolicy {
    /// The kernel cannot install a new key after a KeyUpdate: offload only suites whose
    /// record limit is never reached in practice (ChaCha20-Poly1305).
    OffloadUnlimitedOnly,
}

impl RekeyPolicy {
    fn allows(self, cipher: Cipher) -> bool {
        match self {
            Self::OffloadUnlimitedOnly => cipher == Cipher::Chacha20Poly1305,
        }
    }
}

/// Kernel TLS support of the running kernel, probed once at start.
#[derive(Clone, Debug)]
pub struct Support {
    /// Ciphers the kernel encrypted and decrypted correctly in the probe.
    pub ciphers: Vec<Cipher>,
    /// Reason kernel TLS cannot be used at all, when `ciphers` is empty.
    pub unavailable: Option<String>,
    pub policy: RekeyPolicy,
    /// Whether `splice` out of a kTLS receive socket returned the decrypted bytes.
    pub splice_rx: bool,
    /// Whether `splice` into a kTLS transmit socket sent the bytes.
    pub splice_tx: bool,
}

impl Support {
    /// Support on a kernel that was not probed or has no TLS upper-layer protocol.
    pub fn none(reason: impl Into<String>) -> Self {
        Self {
            ciphers: Vec::new(),
            unavailable: Some(reason.into()),
            policy: RekeyPolicy::OffloadUnlimitedOnly,
            splice_rx: false,
            splice_tx: false,
        }
    }

    /// Returns whether tunnels of `suite` are handed to the kernel.
    pub fn offloads(&self, suite: CipherSuite) -> Option<Cipher> {
        Cipher::of_suite(suite).filter(|c| self.ciphers.contains(c) && self.policy.allows(*c))
    }

    /// Returns whether tunnels that negotiated `cipher` are handed to the kernel.
    pub fn offloads_cipher(&self, cipher: Cipher) -> bool {
        self.ciphers.contains(&cipher) && self.policy.allows(cipher)
    }

    /// Returns whether any tunnel can be offloaded.
    pub fn any(&self) -> bool {
        self.ciphers.iter().any(|c| self.policy.allows(*c))
    }

    /// Returns a one-line summary for the start-up log.
    pub fn describe(&self) -> String {
        match &self.unavailable {
            Some(reason) => format!("unavailable ({reason}); tunnels use userspace rustls"),
            None => {
                let ciphers: Vec<&str> = self.ciphers.iter().map(|c| c.as_str()).collect();
                let offloaded: Vec<&str> = self
                    .ciphers
                    .iter()
                    .filter(|c| self.policy.allows(**c))
                    .map(|c| c.as_str())
                    .collect();
                let works = |ok: bool| {
                    if ok {
                        "works"
                    } else {
                        "broken, copying instead"
                    }
                };
                format!(
                    "TX and RX for {}; offloaded without kernel rekeying: {}; splice out of kTLS {}, into kTLS {}",
                    ciphers.join(", "),
                    if offloaded.is_empty() {
                        "none".to_owned()
                    } else {
                        offloaded.join(", ")
                    },
                    works(self.splice_rx),
                    works(self.splice_tx),
                )
            }
        }
    }
}

/// Probes kernel TLS on loopback in the calling thread's network namespace: for each
/// cipher, arms a connected pair of sockets with a test key and checks that a message
/// written on one side is read back unchanged on the other.
pub fn probe() -> Support {
    let mut ciphers = Vec::new();
    let mut reason = None;
    for cipher in Cipher::ALL {
        match probe_cipher(cipher) {
            Ok(()) => ciphers.push(cipher),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                return Support::none(
                    "the kernel has no tls upper-layer protocol: TCP_ULP \"tls\" returned ENOENT",
                );
            }
            Err(error) => {
                reason.get_or_insert_with(|| format!("{}: {error}", cipher.as_str()));
            }
        }
    }
    if ciphers.is_empty() {
        return Support::none(reason.unwrap_or_else(|| "no cipher worked".to_owned()));
    }
    let (splice_rx, splice_tx) = match ciphers.first() {
        Some(&cipher) => (
            probe_splice(cipher, Direction::Receive).is_ok(),
            probe_splice(cipher, Direction::Transmit).is_ok(),
        ),
        None => (false, false),
    };
    Support {
        ciphers,
        unavailable: None,
        policy: RekeyPolicy::OffloadUnlimitedOnly,
        splice_rx,
        splice_tx,
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Transmit,
}

/// Checks one direction of `splice` on a kTLS socket pair: the probe message must come
/// out of the receiving side unchanged.
fn probe_splice(cipher: Cipher, direction: Direction) -> io::Result<()> {
    let (sender, receiver) = armed_pair(cipher)?;
    let message = b"interceptor kTLS splice probe";
    let mut pipe = [0; 2];
    // SAFETY: `pipe` is valid for writes of two descriptors.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (pipe_read, pipe_write) =
        unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    let mut buffer = [0u8; 64];
    let read = match direction {
        Direction::Transmit => {
            // SAFETY: `message` is valid for reads of its length.
            let written = unsafe {
                libc::write(
                    pipe_write.as_raw_fd(),
                    message.as_ptr().cast(),
                    message.len(),
                )
            };
            if written != message.len() as isize {
                return Err(io::Error::last_os_error());
            }
            splice_once(pipe_read.as_raw_fd(), sender.as_raw_fd(), message.len())?;
            (&receiver).read_bytes(&mut buffer)?
        }
        Direction::Receive => {
            (&sender).write_bytes(message)?;
            let n = splice_once(receiver.as_raw_fd(), pipe_write.as_raw_fd(), buffer.len())?;
            // SAFETY: `buffer` is valid for writes of `n` bytes, at most its length.
            let read = unsafe { libc::read(pipe_read.as_raw_fd(), buffer.as_mut_ptr().cast(), n) };
            if read < 0 {
                return Err(io::Error::last_os_error());
            }
            read as usize
        }
    };
    if &buffer[..read] != message {
        return Err(io::Error::other(
            "splice moved different bytes than were sent",
        ));
    }
    Ok(())
}

fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain system call on descriptors the caller keeps open.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Returns a connected loopback pair whose first socket transmits and second receives
/// with kernel TLS under a test key.
fn armed_pair(cipher: Cipher) -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let sender = TcpStream::connect(listener.local_addr()?)?;
    let (receiver, _) = listener.accept()?;
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    set_ulp(sender.as_raw_fd())?;
    set_ulp(receiver.as_raw_fd())?;
    let key = Key {
        cipher,
        key: &[1u8; 32][..cipher.key_len()],
        iv: &[7u8; 12],
    };
    install(sender.as_raw_fd(), libc::TLS_TX, 0, &key)?;
    install(receiver.as_raw_fd(), libc::TLS_RX, 0, &key)?;
    Ok((sender, receiver))
}

fn probe_cipher(cipher: Cipher) -> io::Result<()> {
    let (sender, receiver) = armed_pair(cipher)?;
    let message = b"interceptor kTLS probe";
    let written = (&sender).write_bytes(message)?;
    let mut buffer = [0u8; 64];
    let read = (&receiver).read_bytes(&mut buffer)?;
    if written != message.len() || &buffer[..read] != message {
        return Err(io::Error::other(
            "the kernel returned different bytes than were sent",
        ));
    }
    Ok(())
}

/// Blocking read and write on the probe's std sockets.
trait ProbeIo {
    fn write_bytes(self, bytes: &[u8]) -> io::Result<usize>;
    fn read_bytes(self, buffer: &mut [u8]) -> io::Result<usize>;
}

impl ProbeIo for &TcpStream {
    fn write_bytes(self, bytes: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut { self }, bytes)
    }

    fn read_bytes(self, buffer: &mut [u8]) -> io::Result<usize> {
        self.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        io::Read::read(&mut { self }, buffer)
    }
}

/// Sets the `tls` upper-layer protocol on a connected TCP socket. Until keys are
/// installed the socket still behaves as plain TCP, so a connection whose suite turns
/// out not to be offloadable can go on in userspace.
pub fn set_ulp(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: `name` is valid for reads of its length for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Extracts the secrets of a finished handshake and installs them for both directions.
/// The socket must already carry the `tls` upper-layer protocol ([`set_ulp`]).
pub fn arm(fd: RawFd, secrets: Result<ExtractedSecrets, rustls::Error>) -> Result<(), Error> {
    let secrets = secrets.map_err(Error::Extract)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let install_error = |direction| move |source| Error::Install { direction, source };
    install(fd, libc::TLS_TX, tx_seq, &Key::of(&tx)?).map_err(install_error("transmit"))?;
    install(fd, libc::TLS_RX, rx_seq, &Key::of(&rx)?).map_err(install_error("receive"))?;
    Ok(())
}

/// One direction's traffic key and 12-byte TLS 1.3 nonce base.
struct Key<'a> {
    cipher: Cipher,
    key: &'a [u8],
    iv: &'a [u8],
}

impl<'a> Key<'a> {
    fn of(secret: &'a ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (cipher, key, iv) = match secret {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(Error::Install {
                    direction: "any",
                    source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
                })
            }
        };
        Ok(Self {
            cipher,
            key: key.as_ref(),
            iv: iv.as_ref(),
        })
    }
}

impl Cipher {
    fn key_len(self) -> usize {
        match self {
            Self::Aes128Gcm => 16,
            Self::Aes256Gcm | Self::Chacha20Poly1305 => 32,
        }
    }
}

/// Installs one direction's key (`TLS_TX` or `TLS_RX`) for TLS 1.3.
fn install(fd: RawFd, direction: libc::c_int, seq: u64, key: &Key<'_>) -> io::Result<()> {
    if key.key.len() != key.cipher.key_len() || key.iv.len() != 12 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let version = libc::TLS_1_3_VERSION;
    let rec_seq = seq.to_be_bytes();
    // The kernel splits the 12-byte TLS 1.3 nonce of AES-GCM into a 4-byte salt and an
    // 8-byte IV; ChaCha20-Poly1305 takes all 12 bytes as IV.
    match key.cipher {
        Cipher::Aes128Gcm => {
            let mut info: libc::tls12_crypto_info_aes_gcm_128 = zeroed();
            info.info = libc::tls_crypto_info {
                version,
                cipher_type: libc::TLS_CIPHER_AES_GCM_128,
            };
            info.key.copy_from_slice(key.key);
            info.salt.copy_from_slice(&key.iv[..4]);
            info.iv.copy_from_slice(&key.iv[4..]);
            info.rec_seq = rec_seq;
            set_crypto_info(fd, direction, &info)
        }
        Cipher::Aes256Gcm => {
            let mut info: libc::tls12_crypto_info_aes_gcm_256 = zeroed();
            info.info = libc::tls_crypto_info {
                version,
                cipher_type: libc::TLS_CIPHER_AES_GCM_256,
            };
            info.key.copy_from_slice(key.key);
            info.salt.copy_from_slice(&key.iv[..4]);
            info.iv.copy_from_slice(&key.iv[4..]);
            info.rec_seq = rec_seq;
            set_crypto_info(fd, direction, &info)
        }
        Cipher::Chacha20Poly1305 => {
            let mut info: libc::tls12_crypto_info_chacha20_poly1305 = zeroed();
            info.info = libc::tls_crypto_info {
                version,
                cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
            };
            info.key.copy_from_slice(key.key);
            info.iv.copy_from_slice(key.iv);
            info.rec_seq = rec_seq;
            set_crypto_info(fd, direction, &info)
        }
    }
}

fn zeroed<T>() -> T {
    // SAFETY: only used for the kernel's crypto-info structs, which are plain integers
    // and byte arrays, valid when all zero.
    unsafe { std::mem::zeroed() }
}

fn set_crypto_info<T>(fd: RawFd, direction: libc::c_int, info: &T) -> io::Result<()> {
    // SAFETY: `info` is a `#[repr(C)]` crypto-info struct valid for reads of its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            direction,
            (info as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket read one TLS record at a time during a handshake.
///
/// Reads never cross the end of the record being read, so when the handshake is over
/// every byte still in the socket belongs to a later record, which the kernel can
/// decrypt once receive offload is armed. Writes pass straight through.
#[derive(Debug)]
pub struct RecordBoundedIo {
    socket: SharedTcp,
    /// Whether reads stop at record boundaries; off for tunnels that stay in userspace
    /// after the handshake, which then read ahead.
    bounded: bool,
    /// Buffers for reading ahead once unbounded: rustls asks for at most 4 KiB per read,
    /// so without it a 16 KiB record would cost four system calls.
    pool: Arc<BufferPool>,
    /// Bytes read ahead and not yet handed to rustls: `buffer[start..end]`. The buffer
    /// goes back to the pool as soon as it is empty, so an idle tunnel holds none.
    ahead: Option<(PooledBuffer, usize, usize)>,
    /// Header bytes of the current record read so far.
    header: [u8; RECORD_HEADER_LEN],
    header_len: usize,
    /// Body bytes of the current record still to be read.
    body_left: usize,
}

impl RecordBoundedIo {
    pub fn new(socket: SharedTcp, bounded: bool, pool: Arc<BufferPool>) -> Self {
        Self {
            socket,
            bounded,
            pool,
            ahead: None,
            header: [0; RECORD_HEADER_LEN],
            header_len: 0,
            body_left: 0,
        }
    }

    /// Lets later reads cross record boundaries.
    pub fn unbound(&mut self) {
        self.bounded = false;
    }

    /// Returns whether the reader stopped exactly at a record boundary.
    pub fn at_record_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    /// Serves a read from bytes read ahead, reading a whole pooled buffer's worth from
    /// the socket when none are left.
    fn poll_read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ahead.is_none() {
            let mut buffer = self.pool.take();
            // On Pending or an error the buffer goes straight back to the pool.
            let n = ready!(poll_try_read(&self.socket, cx, &mut buffer))?;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            self.ahead = Some((buffer, 0, n));
        }
        if let Some((buffer, start, end)) = &mut self.ahead {
            let n = (*end - *start).min(buf.remaining());
            buf.put_slice(&buffer[*start..*start + n]);
            *start += n;
            if start == end {
                self.ahead = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for RecordBoundedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.bounded {
            return this.poll_read_ahead(cx, buf);
        }
        let limit = if this.body_left > 0 {
            this.body_left
        } else {
            RECORD_HEADER_LEN - this.header_len
        };
        let want = limit.min(buf.remaining());
        let mut chunk = [0u8; RECORD_HEADER_LEN];
        let n = if this.body_left > 0 {
            let dst = &mut buf.initialize_unfilled()[..want];
            ready!(poll_try_read(&this.socket, cx, dst))?
        } else {
            let n = ready!(poll_try_read(&this.socket, cx, &mut chunk[..want]))?;
            buf.initialize_unfilled()[..n].copy_from_slice(&chunk[..n]);
            n
        };
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.body_left > 0 {
            this.body_left -= n;
        } else {
            this.header[this.header_len..this.header_len + n].copy_from_slice(&chunk[..n]);
            this.header_len += n;
            if this.header_len == RECORD_HEADER_LEN {
                this.body_left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
                this.header_len = 0;
            }
        }
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

fn poll_try_read(
    socket: &SharedTcp,
    cx: &mut Context<'_>,
    dst: &mut [u8],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.0.poll_read_ready(cx))?;
        match socket.0.try_read(dst) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

impl AsyncWrite for RecordBoundedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// A kTLS socket as a byte stream: data records are read as plaintext, a
/// `close_notify` alert ends the stream cleanly, and anything else ends it with an
/// error. Writing sends plaintext for the kernel to encrypt; shutting down sends
/// `close_notify` and then a FIN.
#[derive(Clone, Debug)]
pub struct KtlsStream {
    socket: SharedTcp,
    /// Set once the peer's `close_notify` arrived; later reads return end of stream.
    closed_by_peer: bool,
    /// Set once this side sent `close_notify`.
    close_sent: bool,
}

impl KtlsStream {
    pub fn new(socket: SharedTcp) -> Self {
        Self {
            socket,
            closed_by_peer: false,
            close_sent: false,
        }
    }
}

/// Result of one `recvmsg` on a kTLS socket.
enum Received {
    Data(usize),
    /// The TCP stream ended without a TLS `close_notify`.
    Eof,
    Control {
        content_type: u8,
        len: usize,
    },
}

/// Reads one record's worth of plaintext with `recvmsg`, noting its content type.
fn recv_record(fd: RawFd, buffer: &mut [u8]) -> io::Result<Received> {
    // The control buffer holds one `cmsghdr` with the one-byte record type.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: `msghdr` is plain data; the fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>();
    // SAFETY: `msg` describes buffers valid for writes of the lengths given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled,
    // bounded by `msg_controllen`.
    let mut content_type = CONTENT_APPLICATION_DATA;
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                content_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if content_type != CONTENT_APPLICATION_DATA {
        return Ok(Received::Control {
            content_type,
            len: n,
        });
    }
    if n == 0 {
        return Ok(Received::Eof);
    }
    Ok(Received::Data(n))
}

/// Sends one record of `content_type` holding `payload` with `sendmsg`.
fn send_record(fd: RawFd, content_type: u8, payload: &[u8]) -> io::Result<usize> {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: `msghdr` is plain data; the fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations; the header written fits
    // in `control` (32 bytes for a 1-byte payload).
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = content_type;
    }
    // SAFETY: `msg` describes buffers valid for reads of the lengths given.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One record read with `recvmsg` where `splice` refused to move it.
pub enum Record {
    /// The peer's `close_notify`: the stream ended cleanly.
    CloseNotify,
    /// Plaintext of a data record.
    Data(Vec<u8>),
    /// Nothing to read yet.
    Again,
}

/// Reads the record at the head of a kTLS socket's receive queue. Errors for anything
/// but data or `close_notify`, and for a TCP end without `close_notify`.
pub fn read_record(socket: &SharedTcp) -> io::Result<Record> {
    // A TLS record carries at most 16 KiB of plaintext.
    let mut buffer = vec![0u8; 16 * 1024 + 256];
    let fd = socket.raw_fd();
    match socket
        .0
        .try_io(Interest::READABLE, || recv_record(fd, &mut buffer))
    {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Record::Again),
        Err(e) => Err(e),
        Ok(Received::Data(n)) => {
            buffer.truncate(n);
            Ok(Record::Data(buffer))
        }
        Ok(Received::Eof) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the TCP stream without a TLS close_notify",
        )),
        Ok(Received::Control { content_type, len }) => {
            control_record(content_type, &buffer[..len]).map(|()| Record::CloseNotify)
        }
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed_by_peer {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.socket.0.poll_read_ready(cx))?;
            let fd = self.socket.raw_fd();
            let dst = buf.initialize_unfilled();
            let received = self
                .socket
                .0
                .try_io(Interest::READABLE, || recv_record(fd, dst));
            match received {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(Received::Data(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Received::Eof) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the TCP stream without a TLS close_notify",
                    )));
                }
                Ok(Received::Control { content_type, len }) => {
                    let record = &buf.initialize_unfilled()[..len];
                    let result = control_record(content_type, record);
                    if result.is_ok() {
                        self.closed_by_peer = true;
                    }
                    return Poll::Ready(result);
                }
            }
        }
    }
}

/// Handles a non-data record: `Ok` for the peer's `close_notify` (end of stream), an
/// error for anything else.
fn control_record(content_type: u8, record: &[u8]) -> io::Result<()> {
    match (content_type, record) {
        (CONTENT_ALERT, [_, ALERT_CLOSE_NOTIFY]) => Ok(()),
        (CONTENT_ALERT, [level, description]) => Err(io::Error::other(format!(
            "the peer sent TLS alert {description} (level {level})"
        ))),
        (CONTENT_HANDSHAKE, _) => Err(io::Error::other(
            "the peer sent a post-handshake message (KeyUpdate or NewSessionTicket), which kernel TLS on this kernel cannot follow",
        )),
        _ => Err(io::Error::other(format!("the peer sent an unexpected TLS record of type {content_type}"))),
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            loop {
                ready!(self.socket.0.poll_write_ready(cx))?;
                let fd = self.socket.raw_fd();
                let alert = [ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY];
                match self.socket.0.try_io(Interest::WRITABLE, || {
                    send_record(fd, CONTENT_ALERT, &alert)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(_) => break,
                }
            }
            self.close_sent = true;
        }
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_this_kernel() {
        let support = probe();
        let expect_ktls = std::env::var("INTERCEPTOR_EXPECT_KTLS").as_deref() == Ok("1");
        if expect_ktls {
            assert!(
                support.unavailable.is_none(),
                "kTLS expected: {}",
                support.describe()
            );
            assert!(
                support.ciphers.contains(&Cipher::Chacha20Poly1305),
                "{}",
                support.describe()
            );
        } else {
            // Either answer is valid on an unknown kernel; the summary must say which.
            assert!(!support.describe().is_empty());
        }
    }

    #[test]
    fn policy_offloads_only_chacha_without_rekey() {
        let support = Support {
            ciphers: Cipher::ALL.to_vec(),
            unavailable: None,
            policy: RekeyPolicy::OffloadUnlimitedOnly,
            splice_rx: true,
            splice_tx: true,
        };
        assert_eq!(
            support.offloads(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256),
            Some(Cipher::Chacha20Poly1305)
        );
        assert_eq!(
            support.offloads(CipherSuite::TLS13_AES_128_GCM_SHA256),
            None
        );
        assert_eq!(
            support.offloads(CipherSuite::TLS13_AES_256_GCM_SHA384),
            None
        );
    }

    #[test]
    fn control_records_are_classified() {
        assert!(control_record(CONTENT_ALERT, &[1, 0]).is_ok());
        assert!(control_record(CONTENT_ALERT, &[2, 20]).is_err());
        assert!(control_record(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]).is_err());
        assert!(control_record(99, &[]).is_err());
    }
}
