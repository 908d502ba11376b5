//! The tunnel's wire protocol inside TLS: the client's preamble naming the original
//! destination, and the server's status reply.
//!
//! Both are sent as application data right after the TLS handshake; raw bytes of the
//! proxied connection follow in both directions. The client may send the app's first
//! bytes directly behind the preamble. The server sends its status before any byte of
//! the destination, so the client knows whether to deliver or to reset.
//!
//! Preamble, version 1 (all integers big-endian):
//!
//! ```text
//! +---------+--------+------------+------------------+---------+
//! | version | family | length u16 | address          | port    |
//! | 1       | 4 / 6  | 6 / 18     | 4 / 16 bytes     | u16     |
//! +---------+--------+------------+------------------+---------+
//! ```
//!
//! `length` counts the bytes after it and must match the family exactly.
//!
//! Status: two bytes, the version (1) and a [`Status`] code.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The only protocol version this build speaks.
pub const VERSION: u8 = 1;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
const HEADER_LEN: usize = 4;
const BODY_LEN_V4: usize = 4 + 2;
const BODY_LEN_V6: usize = 16 + 2;
/// Longest encoded preamble (IPv6).
pub const MAX_PREAMBLE_LEN: usize = HEADER_LEN + BODY_LEN_V6;

/// Errors of decoding a peer's preamble or status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported tunnel protocol version {version}")]
    UnknownVersion { version: u8 },
    #[error("unknown address family {family} in preamble")]
    UnknownFamily { family: u8 },
    #[error("preamble length {length} does not match address family {family}")]
    BadLength { family: u8, length: u16 },
    #[error("unknown tunnel status code {code}")]
    UnknownStatus { code: u8 },
    #[error("reading from the tunnel failed")]
    Io(#[source] std::io::Error),
}

/// Encodes the preamble for `dst` into `out` and returns the encoded length.
pub fn encode_preamble(dst: SocketAddr, out: &mut [u8; MAX_PREAMBLE_LEN]) -> usize {
    out[0] = VERSION;
    let body_len = match dst.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_V4;
            out[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&ip.octets());
            BODY_LEN_V4
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_V6;
            out[HEADER_LEN..HEADER_LEN + 16].copy_from_slice(&ip.octets());
            BODY_LEN_V6
        }
    };
    out[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
    let port_at = HEADER_LEN + body_len - 2;
    out[port_at..port_at + 2].copy_from_slice(&dst.port().to_be_bytes());
    HEADER_LEN + body_len
}

/// Reads and checks one preamble from `reader`, consuming exactly its bytes, so any
/// app bytes behind it stay in the stream.
pub async fn read_preamble<R: AsyncRead + Unpin>(reader: &mut R) -> Result<SocketAddr, Error> {
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header).await.map_err(Error::Io)?;
    let [version, family, len_hi, len_lo] = header;
    if version != VERSION {
        return Err(Error::UnknownVersion { version });
    }
    let length = u16::from_be_bytes([len_hi, len_lo]);
    let expected = match family {
        FAMILY_V4 => BODY_LEN_V4,
        FAMILY_V6 => BODY_LEN_V6,
        _ => return Err(Error::UnknownFamily { family }),
    };
    if usize::from(length) != expected {
        return Err(Error::BadLength { family, length });
    }

    let mut body = [0u8; BODY_LEN_V6];
    let body = &mut body[..expected];
    reader.read_exact(body).await.map_err(Error::Io)?;
    let (addr, port) = body.split_at(expected - 2);
    let ip = match addr.len() {
        4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        _ => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(addr);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    };
    Ok(SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])))
}

/// The server's answer to a preamble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// The destination accepted the connection; raw bytes follow.
    Connected = 0,
    /// The destination actively refused the connection (nothing listens on the port).
    Refused = 1,
    /// The destination could not be reached.
    Unreachable = 2,
    /// Access control denied the connection.
    Denied = 3,
    /// The preamble named a destination this tunnel endpoint does not deliver to.
    InvalidDestination = 4,
    /// Connecting to the destination timed out.
    TimedOut = 5,
}

impl Status {
    /// Returns the two bytes sent on the wire.
    pub fn encode(self) -> [u8; 2] {
        [VERSION, self as u8]
    }

    fn from_code(code: u8) -> Result<Self, Error> {
        Ok(match code {
            0 => Self::Connected,
            1 => Self::Refused,
            2 => Self::Unreachable,
            3 => Self::Denied,
            4 => Self::InvalidDestination,
            5 => Self::TimedOut,
            _ => return Err(Error::UnknownStatus { code }),
        })
    }

    /// Returns a short lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Refused => "refused",
            Self::Unreachable => "unreachable",
            Self::Denied => "denied",
            Self::InvalidDestination => "invalid destination",
            Self::TimedOut => "timed out",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads the server's status from `reader`, consuming exactly two bytes.
pub async fn read_status<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Status, Error> {
    let mut bytes = [0u8; 2];
    reader.read_exact(&mut bytes).await.map_err(Error::Io)?;
    if bytes[0] != VERSION {
        return Err(Error::UnknownVersion { version: bytes[0] });
    }
    Status::from_code(bytes[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(dst: &str) -> Vec<u8> {
        let mut out = [0u8; MAX_PREAMBLE_LEN];
        let len = encode_preamble(dst.parse().expect("valid socket address"), &mut out);
        out[..len].to_vec()
    }

    async fn decode(bytes: &[u8]) -> Result<SocketAddr, Error> {
        let mut reader = bytes;
        read_preamble(&mut reader).await
    }

    #[tokio::test]
    async fn preamble_round_trips() {
        for dst in ["10.1.2.3:8080", "[fd00::1]:443", "0.0.0.0:1"] {
            let bytes = encode(dst);
            let decoded = decode(&bytes).await.expect("own encoding decodes");
            assert_eq!(decoded.to_string(), dst);
        }
    }

    #[tokio::test]
    async fn preamble_v4_layout() {
        assert_eq!(
            encode("10.1.2.3:8080"),
            [1, 4, 0, 6, 10, 1, 2, 3, 0x1f, 0x90]
        );
    }

    #[tokio::test]
    async fn preamble_leaves_following_bytes() {
        let mut bytes = encode("10.1.2.3:80");
        bytes.extend_from_slice(b"GET /");
        let mut reader = &bytes[..];
        read_preamble(&mut reader).await.expect("valid preamble");
        assert_eq!(reader, b"GET /");
    }

    #[tokio::test]
    async fn preamble_rejects_bad_input() {
        let cases: &[(&str, &[u8])] = &[
            ("unknown version", &[2, 4, 0, 6, 10, 1, 2, 3, 0, 80]),
            ("unknown family", &[1, 5, 0, 6, 10, 1, 2, 3, 0, 80]),
            ("length too long", &[1, 4, 0, 7, 10, 1, 2, 3, 0, 80, 0]),
            ("length too short", &[1, 4, 0, 5, 10, 1, 2, 3, 0]),
            ("v6 with v4 length", &[1, 6, 0, 6, 10, 1, 2, 3, 0, 80]),
            ("truncated body", &[1, 4, 0, 6, 10, 1]),
            ("empty", &[]),
        ];
        for (name, bytes) in cases {
            assert!(decode(bytes).await.is_err(), "{name}: accepted {bytes:?}");
        }
    }

    #[tokio::test]
    async fn status_round_trips() {
        for status in [
            Status::Connected,
            Status::Refused,
            Status::Unreachable,
            Status::Denied,
            Status::InvalidDestination,
            Status::TimedOut,
        ] {
            let bytes = status.encode();
            let mut reader = &bytes[..];
            assert_eq!(
                read_status(&mut reader).await.expect("valid status"),
                status
            );
        }
    }

    #[tokio::test]
    async fn status_rejects_unknown_code() {
        let mut reader = &[VERSION, 99][..];
        assert!(matches!(
            read_status(&mut reader).await,
            Err(Error::UnknownStatus { code: 99 })
        ));
    }
}
