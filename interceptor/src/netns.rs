//! Sockets inside other network namespaces.
//!
//! `setns` switches only the calling thread, and a socket belongs to the namespace of
//! the thread that created it, for its whole life. So each workload namespace gets one
//! dedicated OS thread that enters it once and then only creates sockets on request;
//! async tasks connect, accept and move bytes on those sockets from any worker thread.

use std::fs::File;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

/// Errors of entering a namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening network namespace {path} failed")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path} failed")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the cookie of network namespace {path} failed")]
    Cookie {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread of network namespace {path} has stopped")]
    Stopped { path: PathBuf },
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: `file` is an open namespace file for the whole call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Enter {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Returns the cookie of the network namespace that `socket` belongs to, as
/// `bpf_get_netns_cookie` sees it (Linux 5.14 and later).
pub fn netns_cookie(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

enum Request {
    TcpSocket(oneshot::Sender<io::Result<Socket>>),
    Ipv6Addrs(oneshot::Sender<io::Result<Vec<Ipv6Addr>>>),
}

/// A thread that lives in one network namespace and creates sockets there.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
    cookie: u64,
    requests: mpsc::Sender<Request>,
}

/// Path of the namespace the process runs in, for [`Netns::spawn`].
pub const CURRENT: &str = "/proc/self/ns/net";

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::TcpSocket(_) => "Request::TcpSocket",
            Self::Ipv6Addrs(_) => "Request::Ipv6Addrs",
        })
    }
}

impl Netns {
    /// Starts the namespace's thread and reads the namespace cookie. Every socket the
    /// thread creates carries `mark` (`SO_MARK`) when one is given. The thread stops
    /// when the last handle is dropped.
    pub fn spawn(path: &Path, mark: Option<u32>) -> Result<Self, Error> {
        let (requests, receiver) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u64, Error>>();
        let thread_path = path.to_owned();
        let name = format!(
            "netns {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let entered = enter(&thread_path).and_then(|()| {
                    tcp_socket(mark)
                        .and_then(|s| netns_cookie(&s))
                        .map_err(|source| Error::Cookie {
                            path: thread_path.clone(),
                            source,
                        })
                });
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                for request in receiver {
                    match request {
                        Request::TcpSocket(reply) => {
                            let _ = reply.send(tcp_socket(mark));
                        }
                        Request::Ipv6Addrs(reply) => {
                            let _ = reply.send(ipv6_addrs());
                        }
                    }
                }
            })
            .map_err(|source| Error::Enter {
                path: path.to_owned(),
                source,
            })?;
        let cookie = ready_rx.recv().map_err(|_| Error::Stopped {
            path: path.to_owned(),
        })??;
        Ok(Self {
            path: path.to_owned(),
            cookie,
            requests,
        })
    }

    /// Returns the namespace's cookie.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Creates a non-blocking IPv4 TCP socket in the namespace.
    pub async fn tcp_socket(&self) -> io::Result<Socket> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send(Request::TcpSocket(reply))
            .map_err(|_| self.stopped())?;
        response.await.map_err(|_| self.stopped())?
    }

    /// Returns the IPv6 addresses of the namespace's interfaces.
    pub async fn ipv6_addrs(&self) -> io::Result<Vec<Ipv6Addr>> {
        let (reply, response) = oneshot::channel();
        self.requests
            .send(Request::Ipv6Addrs(reply))
            .map_err(|_| self.stopped())?;
        response.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> io::Error {
        io::Error::other(format!(
            "the thread of network namespace {} has stopped",
            self.path.display()
        ))
    }

    /// Binds a non-blocking TCP listener to `addr` in the namespace.
    pub async fn listen(
        &self,
        addr: SocketAddr,
        backlog: i32,
    ) -> io::Result<std::net::TcpListener> {
        let socket = self.tcp_socket().await?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(socket.into())
    }
}

/// Reads the IPv6 addresses of the calling thread's network namespace from
/// `/proc/thread-self/net/if_inet6`. A missing file means the kernel has no IPv6.
fn ipv6_addrs() -> io::Result<Vec<Ipv6Addr>> {
    match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
        Ok(text) => Ok(parse_if_inet6(&text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error),
    }
}

/// Parses `if_inet6` lines such as
/// `fe800000000000000000000000000001 02 40 20 80 eth0`, whose first field is the
/// address in 32 hex digits; lines that do not parse are skipped.
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|hex| {
            u128::from_str_radix(hex, 16)
                .ok()
                .filter(|_| hex.len() == 32)
        })
        .map(Ipv6Addr::from)
        .collect()
}

fn tcp_socket(mark: Option<u32>) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_inet6_lines_parse_to_addresses() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo\n\
                    fe80000000000000d4a1b2fffec3d4e5 02 40 20 80     eth0\n\
                    not-an-address 03 40 20 80 eth1\n";

        let addrs = parse_if_inet6(text);

        assert_eq!(
            addrs,
            [
                Ipv6Addr::LOCALHOST,
                "fe80::d4a1:b2ff:fec3:d4e5"
                    .parse::<Ipv6Addr>()
                    .expect("address"),
            ]
        );
    }
}
