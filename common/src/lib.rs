//! Types shared by the eBPF programs in `interceptor-ebpf` and the daemon in
//! `interceptor`: the keys and values of every BPF map, and the names the maps and
//! programs are pinned under.
//!
//! Every type is `#[repr(C)]` with explicit padding, so both sides agree on the layout
//! byte for byte; each one asserts its size at compile time. Fields whose name ends in
//! `_be` hold network byte order (big-endian), every other integer is host order.

#![no_std]

use core::mem::size_of;

/// Name of the map of enrolled workload cgroups ([`EnrolledCgroup`] values).
pub const ENROLLED_MAP: &str = "ENROLLED";
/// Name of the map from socket cookie to original destination ([`OrigDst`] values),
/// written at connect time.
pub const CONNECT_DST_MAP: &str = "CONNECT_DST";
/// Name of the map from [`ConnKey`] to original destination, written once the
/// redirected connection is established and read by the daemon when it accepts it.
pub const ORIG_DST_MAP: &str = "ORIG_DST";

/// Names of the programs in the eBPF object.
pub const CONNECT4_PROG: &str = "interceptor_connect4";
pub const CONNECT6_PROG: &str = "interceptor_connect6";
pub const SOCK_OPS_PROG: &str = "interceptor_sock_ops";

/// Maximum number of enrolled workloads per node.
pub const MAX_ENROLLED: u32 = 4096;
/// Maximum number of connections in flight between `connect()` and the daemon's
/// `accept()`. Both maps are LRU maps, so a connect that never completes (the daemon is
/// down) is eventually evicted rather than leaking an entry.
pub const MAX_PENDING_CONNECTS: u32 = 65536;

/// Value of the enrolled map, keyed by the cgroup v2 id (`u64`, the inode number of the
/// cgroup directory) of an enrolled workload.
///
/// A TCP connect from a socket whose cgroup is in the map, made in the network
/// namespace named by `netns_cookie`, is sent to `redirect_addr_be:redirect_port_be`.
/// Written by the daemon only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledCgroup {
    /// Cookie of the workload's network namespace (`SO_NETNS_COOKIE`). A TCP connect
    /// from a socket of the cgroup in any other namespace is rejected with `EPERM`: the
    /// daemon has no listener there, and the connection must not leave unprotected.
    pub netns_cookie: u64,
    /// IPv4 address of the daemon's outbound listener in the workload's namespace,
    /// network byte order; a loopback address.
    pub redirect_addr_be: u32,
    /// Port of the daemon's outbound listener, network byte order.
    pub redirect_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<EnrolledCgroup>() == 16);

/// An original destination: where the workload asked to connect before the redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address, network byte order. IPv4-mapped IPv6 destinations are stored as
    /// their IPv4 address.
    pub addr_be: u32,
    /// TCP port, network byte order.
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<OrigDst>() == 8);

/// Key of the original-destination map: the workload's end of a redirected connection,
/// as the daemon sees it as the peer address of the socket it accepted.
///
/// Every redirected connection in a namespace ends at the same listener address, so the
/// source address and port alone identify it within the namespace, and the namespace
/// cookie keeps pods apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the network namespace of the connection.
    pub netns_cookie: u64,
    /// Source IPv4 address of the workload's socket, network byte order.
    pub src_addr_be: u32,
    /// Source port of the workload's socket, host byte order.
    pub src_port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ConnKey>() == 16);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all three are `#[repr(C)]`, contain only integers and have no implicit
    // padding (every gap is an explicit `_pad` field), so any bit pattern is valid.
    unsafe impl aya::Pod for EnrolledCgroup {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
}
