//! Moving bytes between two sockets with `splice(2)` through a pipe, so they never
//! pass through the daemon's memory. Used on tunnels that kernel TLS carries: out of a
//! kTLS socket the kernel hands over decrypted pages, and into one it encrypts them.
//!
//! Whether the kernel gets each direction right is probed once at start
//! ([`crate::ktls::probe`]): splice into a kTLS transmit socket has been reported to send
//! nothing on some kernels, so it is used only where the probe saw the bytes arrive.
//!
//! `splice` out of a socket that also receives `sk_msg` redirects misses the redirected
//! bytes on kernels before the 2025 fix; this daemon attaches no `sk_msg` program, so the
//! two are never combined.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::io::Interest;

use crate::ktls;
use crate::relay::{Error, SharedTcp};

/// Bytes moved by one `splice` call at most: the default pipe capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// A pool of pipes shared by all connections; a pipe is taken while data flows and
/// given back empty.
#[derive(Debug)]
pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    max_free: usize,
}

/// A pipe's read and write ends.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for writes of two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

impl PipePool {
    pub fn new(max_free: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::new(Vec::new()),
            max_free,
        })
    }

    fn take(&self) -> io::Result<Pipe> {
        let pooled = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match pooled {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Returns an empty pipe to the pool. A pipe that may still hold bytes is closed
    /// instead, so no connection's bytes can reach another.
    fn give_back(&self, pipe: Pipe) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if free.len() < self.max_free {
            free.push(pipe);
        }
    }
}

/// Calls `splice` once without blocking.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain system call on descriptors the caller keeps open; null offsets
    // mean the file positions of the pipe and socket, which have none.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The source of a splice pump.
pub struct Source<'a> {
    pub socket: &'a SharedTcp,
    pub name: &'static str,
    /// Whether the source is a kTLS socket, whose end must be a `close_notify`.
    pub ktls: bool,
}

/// End of one round of splicing.
enum Round {
    /// The source would block: wait until it is readable.
    Again,
    /// The source ended cleanly.
    End,
}

/// Moves bytes from `from` to `to` until `from` ends, then shuts `to`'s write side
/// down. When `to_ktls` is set, `to` is a kTLS socket and gets a TLS `close_notify`
/// first.
pub async fn pump(
    from: Source<'_>,
    to: &SharedTcp,
    to_name: &'static str,
    to_ktls: bool,
    pipes: &PipePool,
    moved: &mut u64,
) -> Result<(), Error> {
    let write_error = |source| Error::Write {
        side: to_name,
        source,
    };
    loop {
        let pipe = pipes.take().map_err(|source| Error::Read {
            side: from.name,
            source,
        })?;
        // On an error the pipe may still hold bytes, so it is closed, not pooled.
        let round = splice_round(&from, &pipe, to, to_name, moved).await?;
        pipes.give_back(pipe);
        match round {
            Round::End => {
                shutdown(to, to_ktls).await.map_err(write_error)?;
                return Ok(());
            }
            Round::Again => {
                // As in the copying pump: give the task budget back before waiting,
                // since `readable()` does not check it.
                tokio::task::consume_budget().await;
                from.socket.readable().await.map_err(|source| Error::Read {
                    side: from.name,
                    source,
                })?;
            }
        }
    }
}

/// Splices from `from` through `pipe` into `to` until `from` would block or ends.
async fn splice_round(
    from: &Source<'_>,
    pipe: &Pipe,
    to: &SharedTcp,
    to_name: &'static str,
    moved: &mut u64,
) -> Result<Round, Error> {
    let read_error = |source: io::Error| {
        if from.ktls && source.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated
        } else {
            Error::Read {
                side: from.name,
                source,
            }
        }
    };
    let write_error = |source| Error::Write {
        side: to_name,
        source,
    };
    let fd = from.socket.raw_fd();
    loop {
        let result = from.socket.0.try_io(Interest::READABLE, || {
            splice(fd, pipe.write.as_raw_fd(), CHUNK)
        });
        match result {
            // A kTLS stream ends with a close_notify record, which splice refuses
            // (below); a plain end of the TCP stream there is truncation.
            Ok(0) if from.ktls => return Err(Error::Truncated),
            Ok(0) => return Ok(Round::End),
            Ok(n) => {
                drain(pipe, n, to).await.map_err(write_error)?;
                *moved += n as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(Round::Again),
            // kTLS refuses to splice a record that is not data: read it as a record.
            Err(error) if from.ktls && error.raw_os_error() == Some(libc::EINVAL) => {
                match ktls::read_record(from.socket).map_err(read_error)? {
                    ktls::Record::CloseNotify => return Ok(Round::End),
                    ktls::Record::Again => return Ok(Round::Again),
                    ktls::Record::Data(bytes) => {
                        write_all(to, &bytes).await.map_err(write_error)?;
                        *moved += bytes.len() as u64;
                    }
                }
            }
            Err(error) => return Err(read_error(error)),
        }
    }
}

/// Moves `len` bytes from `pipe` into `to`, waiting while `to` is full.
async fn drain(pipe: &Pipe, mut len: usize, to: &SharedTcp) -> io::Result<()> {
    while len > 0 {
        match to.0.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), to.raw_fd(), len)
        }) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => len -= n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => to.0.writable().await?,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

async fn write_all(to: &SharedTcp, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match to.0.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => to.0.writable().await?,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

async fn shutdown(to: &SharedTcp, ktls: bool) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if ktls {
        ktls::KtlsStream::new(to.clone()).shutdown().await
    } else {
        let mut writer = to.clone();
        writer.shutdown().await
    }
}
