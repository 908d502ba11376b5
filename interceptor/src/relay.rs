//! Moving bytes between the app's socket and the tunnel, with TCP semantics intact.
//!
//! Each direction is a pump that waits for its source to become readable without
//! holding a buffer, then takes one buffer from a shared [`BufferPool`], moves data
//! until the source would block, and gives the buffer back. An idle connection
//! therefore holds no relay buffer, and a busy one allocates nothing per read.
//!
//! Endings cross the tunnel one direction at a time: a clean end of a source (the app's
//! FIN, or the peer's TLS `close_notify`) shuts down the other side's write half only,
//! so half-closed connections keep working. A reset, a truncated TLS stream (a FIN
//! without `close_notify`) or any I/O error ends both directions and resets both
//! sockets, so the app sees a reset, never a clean end that did not happen.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Size of one relay buffer: four full TLS records, so one read feeds whole records to
/// the encrypting side.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// A pool of fixed-size buffers shared by all connections.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Box<[u8]>>>,
    /// Free buffers kept for reuse; buffers returned beyond this are freed.
    max_free: usize,
}

impl BufferPool {
    pub fn new(max_free: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(Vec::new()),
            max_free,
        })
    }

    /// Takes a buffer, allocating one when none is free.
    pub fn take(self: &Arc<Self>) -> PooledBuffer {
        let buffer = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        PooledBuffer {
            buffer: Some(buffer),
            pool: Arc::clone(self),
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; returned when dropped.
pub struct PooledBuffer {
    buffer: Option<Box<[u8]>>,
    pool: Arc<BufferPool>,
}

impl std::fmt::Debug for PooledBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuffer")
            .field("len", &self.len())
            .finish()
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buffer.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buffer.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            let mut free = self
                .pool
                .free
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if free.len() < self.pool.max_free {
                free.push(buffer);
            }
        }
    }
}

/// A TCP stream shared by a reader and a writer without a lock, and by the relay, which
/// waits for readiness on it and resets it.
///
/// Reads and writes go through `try_read`/`try_write` on the shared socket, which tokio
/// allows from several owners at once.
#[derive(Clone, Debug)]
pub struct SharedTcp(pub Arc<TcpStream>);

impl SharedTcp {
    pub fn new(stream: TcpStream) -> Self {
        Self(Arc::new(stream))
    }

    /// Waits until the socket is readable or has an error or end pending.
    pub async fn readable(&self) -> io::Result<()> {
        self.0.readable().await
    }

    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// Makes the next close of `fd` send a TCP reset instead of a FIN (`SO_LINGER` 0).
pub fn set_reset_on_close(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is valid for reads of its size; a stale fd only makes the call
    // fail, which leaves a FIN instead of a reset.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Failure that ended one direction of a relay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading from the {side} failed")]
    Read {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("writing to the {side} failed")]
    Write {
        side: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the tunnel was truncated: its TCP stream ended without a TLS close_notify")]
    Truncated,
    #[error("the tunnel status could not be read")]
    Status(#[source] crate::protocol::Error),
    #[error("the destination answered {status}")]
    Rejected { status: crate::protocol::Status },
}

/// Bytes moved by a relay, whichever way it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the app to the tunnel (or upstream).
    pub app_to_tunnel: u64,
    /// From the tunnel (or upstream) to the app.
    pub tunnel_to_app: u64,
}

/// One end of a relay: a readable half, a writable half and the TCP socket underneath.
pub struct End<R, W> {
    pub reader: R,
    pub writer: W,
    /// The socket whose readiness gates `reader`, and which is reset on failure.
    pub socket: SharedTcp,
    /// Name of the end in errors: "app", "tunnel" or "upstream".
    pub name: &'static str,
    /// Whether a clean end of `reader` is reported as `Ok(0)` only after a TLS
    /// `close_notify`; an `UnexpectedEof` from such a reader is truncation.
    pub tls: bool,
}

/// Directions of a relay that move bytes with `splice` instead of copying them. Only
/// for a tunnel end that kernel TLS carries (its `tls` flag then means kTLS) or plain
/// TCP.
pub struct Splice<'a> {
    pub pipes: &'a crate::splice::PipePool,
    /// From the tunnel to the app: the decrypt direction.
    pub to_app: bool,
    /// From the app to the tunnel: the encrypt direction.
    pub to_tunnel: bool,
}

/// Relays between `app` and `tunnel` until both directions have ended cleanly or one
/// has failed. On failure both sockets are reset before they are closed.
///
/// With `await_status`, the tunnel's first two bytes are the server's
/// [`crate::protocol::Status`]: nothing reaches the app before a `Connected` status, and
/// any other status fails the relay. The app's bytes flow to the tunnel meanwhile.
pub async fn relay<AR, AW, TR, TW>(
    app: End<AR, AW>,
    tunnel: End<TR, TW>,
    pool: &Arc<BufferPool>,
    await_status: bool,
    splice: Option<Splice<'_>>,
) -> (Transferred, Result<(), Error>)
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    TR: AsyncRead + Unpin,
    TW: AsyncWrite + Unpin,
{
    let End {
        reader: mut app_reader,
        writer: mut app_writer,
        socket: app_socket,
        name: app_name,
        tls: app_tls,
    } = app;
    let End {
        reader: mut tunnel_reader,
        writer: mut tunnel_writer,
        socket: tunnel_socket,
        name: tunnel_name,
        tls: tunnel_tls,
    } = tunnel;
    let mut moved = Transferred::default();

    let splice_to_tunnel = splice.as_ref().filter(|s| s.to_tunnel).map(|s| s.pipes);
    let splice_to_app = splice.as_ref().filter(|s| s.to_app).map(|s| s.pipes);
    let upstream = async {
        match splice_to_tunnel {
            Some(pipes) => {
                let from = crate::splice::Source {
                    socket: &app_socket,
                    name: app_name,
                    ktls: app_tls,
                };
                crate::splice::pump(
                    from,
                    &tunnel_socket,
                    tunnel_name,
                    tunnel_tls,
                    pipes,
                    &mut moved.app_to_tunnel,
                )
                .await
            }
            None => {
                let from = Side {
                    name: app_name,
                    tls: app_tls,
                };
                pump(
                    &mut app_reader,
                    &app_socket,
                    from,
                    &mut tunnel_writer,
                    tunnel_name,
                    pool,
                    &mut moved.app_to_tunnel,
                )
                .await
            }
        }
    };
    let downstream = async {
        if await_status {
            let status = crate::protocol::read_status(&mut tunnel_reader)
                .await
                .map_err(Error::Status)?;
            if status != crate::protocol::Status::Connected {
                return Err(Error::Rejected { status });
            }
        }
        match splice_to_app {
            Some(pipes) => {
                let from = crate::splice::Source {
                    socket: &tunnel_socket,
                    name: tunnel_name,
                    ktls: tunnel_tls,
                };
                crate::splice::pump(
                    from,
                    &app_socket,
                    app_name,
                    app_tls,
                    pipes,
                    &mut moved.tunnel_to_app,
                )
                .await
            }
            None => {
                let from = Side {
                    name: tunnel_name,
                    tls: tunnel_tls,
                };
                pump(
                    &mut tunnel_reader,
                    &tunnel_socket,
                    from,
                    &mut app_writer,
                    app_name,
                    pool,
                    &mut moved.tunnel_to_app,
                )
                .await
            }
        }
    };
    let result = join_preferring_status(upstream, downstream, await_status, tunnel_name).await;
    if result.is_err() {
        set_reset_on_close(app_socket.raw_fd());
        set_reset_on_close(tunnel_socket.raw_fd());
    }
    (moved, result)
}

/// How long a relay whose write to the tunnel failed waits for the server's status,
/// which explains the failure when the server refused the connection.
const STATUS_GRACE: Duration = Duration::from_secs(1);

/// Runs both directions until both end or one fails, like `try_join!`, except in one
/// case. When the server refuses a connection (policy denial, refused port), it sends
/// its status and closes the tunnel, so writing the app's early bytes can fail before
/// the status is read. The status then names the real cause, so it is awaited for up to
/// [`STATUS_GRACE`] and reported in place of the write error.
async fn join_preferring_status(
    upstream: impl Future<Output = Result<(), Error>>,
    downstream: impl Future<Output = Result<(), Error>>,
    await_status: bool,
    tunnel_name: &'static str,
) -> Result<(), Error> {
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    tokio::select! {
        result = &mut upstream => match result {
            Ok(()) => downstream.await,
            Err(Error::Write { side, source }) if await_status && side == tunnel_name => {
                let write_error = Error::Write { side, source };
                match tokio::time::timeout(STATUS_GRACE, &mut downstream).await {
                    Ok(Err(rejected @ Error::Rejected { .. })) => Err(rejected),
                    _ => Err(write_error),
                }
            }
            Err(error) => Err(error),
        },
        result = &mut downstream => match result {
            Ok(()) => upstream.await,
            Err(error) => Err(error),
        },
    }
}

struct Side {
    name: &'static str,
    tls: bool,
}

/// Moves bytes from `reader` to `writer` until `reader` ends, then shuts `writer` down.
async fn pump<R, W>(
    reader: &mut R,
    socket: &SharedTcp,
    from: Side,
    writer: &mut W,
    to: &'static str,
    pool: &Arc<BufferPool>,
    moved: &mut u64,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let read_error = |source: io::Error| {
        if from.tls && source.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Read {
                side: from.name,
                source,
            }
        }
    };
    let write_error = |source| Error::Write { side: to, source };
    loop {
        // A TLS reader may already hold decrypted bytes that arrived with the
        // handshake or the status, so read first and wait for readiness only once the
        // reader has nothing.
        let mut buffer = pool.take();
        loop {
            let n = match read_now(reader, &mut buffer).await {
                None => break,
                Some(result) => result.map_err(read_error)?,
            };
            if n == 0 {
                writer.shutdown().await.map_err(write_error)?;
                return Ok(());
            }
            writer.write_all(&buffer[..n]).await.map_err(write_error)?;
            *moved += n as u64;
        }
        writer.flush().await.map_err(write_error)?;
        drop(buffer);
        // A reader also returns Pending when the task has used up its tokio budget
        // (and it asks to be polled again), while `readable()` does not check the
        // budget. Without giving the budget back here, a busy connection could spin in
        // this loop forever without yielding.
        tokio::task::consume_budget().await;
        socket.readable().await.map_err(|source| Error::Read {
            side: from.name,
            source,
        })?;
    }
}

/// Polls `reader` once: `None` when it would block, else the read's result.
fn read_now<'a, R: AsyncRead + Unpin>(
    reader: &'a mut R,
    buffer: &'a mut [u8],
) -> impl Future<Output = Option<io::Result<usize>>> + 'a {
    std::future::poll_fn(move |cx| {
        let mut buf = ReadBuf::new(buffer);
        match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Ready(None),
            Poll::Ready(result) => Poll::Ready(Some(result.map(|()| buf.filled().len()))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener as StdListener, TcpStream as StdStream};

    /// Starts a blocking echo server on loopback and returns its address.
    fn echo_server() -> std::net::SocketAddr {
        let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind echo server");
        let addr = listener.local_addr().expect("echo server address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.expect("accept on echo server");
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = stream.read(&mut buf).expect("echo read");
                        if n == 0 {
                            let _ = stream.shutdown(std::net::Shutdown::Write);
                            return;
                        }
                        stream.write_all(&buf[..n]).expect("echo write");
                    }
                });
            }
        });
        addr
    }

    fn end(stream: TcpStream, name: &'static str) -> End<SharedTcp, SharedTcp> {
        let socket = SharedTcp::new(stream);
        End {
            reader: socket.clone(),
            writer: socket.clone(),
            socket,
            name,
            tls: false,
        }
    }

    /// A server that refuses: it sends the `Denied` status and closes without reading,
    /// so the relay's writes of the app's bytes fail with a reset. The relay must still
    /// report the status, which names the cause.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_reports_status_over_write_error() {
        let refusing = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind server");
        let server_addr = refusing.local_addr().expect("server address");
        std::thread::spawn(move || {
            let (mut stream, _) = refusing.accept().expect("accept on server");
            // Unread bytes at close make the kernel send a reset.
            std::thread::sleep(std::time::Duration::from_millis(50));
            stream
                .write_all(&crate::protocol::Status::Denied.encode())
                .expect("write status");
        });

        let (app, mut client) = connected_pair().await;
        let tunnel = TcpStream::connect(server_addr)
            .await
            .expect("connect server");
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 65536];
            // Fails once the relay resets the app's socket.
            while client.write_all(&chunk).await.is_ok() {}
        });
        let pool = BufferPool::new(8);
        let (_, result) = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            relay(end(app, "app"), end(tunnel, "tunnel"), &pool, true, None),
        )
        .await
        .expect("relay ended");
        writer.await.expect("writer task");
        assert!(
            matches!(
                result,
                Err(Error::Rejected {
                    status: crate::protocol::Status::Denied
                })
            ),
            "{result:?}"
        );
    }

    /// The write error comes first and the status 100 ms later: the status wins. A
    /// failure of another kind, or without a status to wait for, is reported as is.
    #[tokio::test]
    async fn status_wins_over_earlier_tunnel_write_error() {
        let write_error = || async {
            Err(Error::Write {
                side: "tunnel",
                source: io::Error::from(io::ErrorKind::BrokenPipe),
            })
        };
        let denied_later = || async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Err(Error::Rejected {
                status: crate::protocol::Status::Denied,
            })
        };

        let result = join_preferring_status(write_error(), denied_later(), true, "tunnel").await;
        assert!(matches!(result, Err(Error::Rejected { .. })), "{result:?}");

        let result = join_preferring_status(write_error(), denied_later(), false, "tunnel").await;
        assert!(matches!(result, Err(Error::Write { .. })), "{result:?}");

        let result = join_preferring_status(write_error(), denied_later(), true, "upstream").await;
        assert!(matches!(result, Err(Error::Write { .. })), "{result:?}");
    }

    /// Returns both ends of a loopback TCP connection.
    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind pair listener");
        let addr = listener.local_addr().expect("pair address");
        let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        (
            accepted.expect("accept pair").0,
            connected.expect("connect pair"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_carries_large_echo() {
        large_echo(false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_splices_large_echo() {
        large_echo(true).await;
    }

    /// Echoes 64 MiB through a relay between plain TCP sockets, copying or splicing.
    async fn large_echo(splice: bool) {
        let upstream_addr = echo_server();
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind relay");
        let relay_addr = listener.local_addr().expect("relay address");
        let pool = BufferPool::new(8);
        let pipes = crate::splice::PipePool::new(8);
        let relay_task = tokio::spawn(async move {
            let (app, _) = listener.accept().await.expect("accept app");
            let upstream = TcpStream::connect(upstream_addr)
                .await
                .expect("connect upstream");
            let splice = splice.then_some(Splice {
                pipes: &pipes,
                to_app: true,
                to_tunnel: true,
            });
            relay(
                end(app, "app"),
                end(upstream, "upstream"),
                &pool,
                false,
                splice,
            )
            .await
        });

        let total = 64 << 20;
        let client = tokio::task::spawn_blocking(move || {
            let mut stream = StdStream::connect(relay_addr).expect("connect relay");
            let mut reader = stream.try_clone().expect("clone client stream");
            let sender = std::thread::spawn(move || {
                let chunk = vec![7u8; 65536];
                let mut sent = 0;
                while sent < total {
                    stream.write_all(&chunk).expect("client write");
                    sent += chunk.len();
                }
                stream
                    .shutdown(std::net::Shutdown::Write)
                    .expect("client half-close");
            });
            let mut received = 0usize;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = reader.read(&mut buf).expect("client read");
                if n == 0 {
                    break;
                }
                received += n;
            }
            sender.join().expect("sender thread");
            received
        });
        let received = tokio::time::timeout(std::time::Duration::from_secs(60), client)
            .await
            .expect("echo through the relay stalled")
            .expect("client task");
        assert_eq!(received, total);
        let (moved, result) = relay_task.await.expect("relay task");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(moved.app_to_tunnel, total as u64);
        assert_eq!(moved.tunnel_to_app, total as u64);
    }
}
