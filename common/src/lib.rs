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

/// Name of the map of inbound settings per enrolled pod address ([`InboundPod`]
/// values), read by the `sk_lookup` program.
pub const INBOUND_MAP: &str = "INBOUND";
/// Name of the `SOCKHASH` of the daemon's inbound listeners ([`ListenerKey`] keys).
pub const LISTENERS_MAP: &str = "LISTENERS";
/// Name of the map of the daemon's delivery connections in flight ([`DeliveryKey`]
/// keys), which the `sk_lookup` program passes to the app.
pub const DELIVERY_MAP: &str = "DELIVERY";
/// Name of the map of outbound exclusions per enrolled cgroup id ([`Exclusions`]
/// values).
pub const OUTBOUND_EXCLUDE_MAP: &str = "OUTBOUND_EXCLUDE";
/// Name of the ring buffer of inbound connections the `sk_lookup` program rejected
/// ([`InboundReject`] records).
pub const INBOUND_REJECTS_MAP: &str = "INBOUND_REJECTS";
/// Name of the per-CPU array (one `u64` slot) that counts the [`InboundReject`]
/// records lost because the ring buffer was full.
pub const INBOUND_REJECTS_LOST_MAP: &str = "INBOUND_REJECTS_LOST";

/// Names of the programs in the eBPF object.
pub const CONNECT4_PROG: &str = "interceptor_connect4";
pub const CONNECT6_PROG: &str = "interceptor_connect6";
pub const SOCK_OPS_PROG: &str = "interceptor_sock_ops";
pub const SK_LOOKUP_PROG: &str = "interceptor_sk_lookup";

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

/// Maximum number of ports in each port list of [`Exclusions`] and [`InboundPod`].
pub const MAX_PORTS: usize = 8;
/// Maximum number of CIDRs in [`Exclusions`].
pub const MAX_CIDRS: usize = 4;

/// An IPv4 network: an address matches when `addr & mask_be == addr_be`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    /// Network address with the host bits cleared, network byte order.
    pub addr_be: u32,
    /// Network mask, network byte order (`/0` is 0, `/32` is `u32::MAX`).
    pub mask_be: u32,
}
const _: () = assert!(size_of::<Cidr>() == 8);

impl Cidr {
    /// Returns whether the network byte order address `addr_be` lies in the network.
    #[inline(always)]
    pub fn contains(&self, addr_be: u32) -> bool {
        addr_be & self.mask_be == self.addr_be
    }
}

/// Traffic that bypasses the mesh entirely: ports and peer networks that the eBPF
/// programs leave untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Destination ports (the pod's own ports for inbound, the remote ports for
    /// outbound), host byte order. 0 marks an unused slot; no TCP connection has
    /// port 0.
    pub ports: [u16; MAX_PORTS],
    /// Number of valid entries at the start of `cidrs`.
    pub cidr_count: u32,
    pub _pad: u32,
    /// Peer networks: the client's address for inbound, the destination for outbound.
    pub cidrs: [Cidr; MAX_CIDRS],
}
const _: () = assert!(size_of::<Exclusions>() == 56);

impl Exclusions {
    /// Returns whether a connection to or from the peer `peer_be` (network byte order)
    /// on the host-order port `port` is excluded.
    #[inline(always)]
    pub fn matches(&self, peer_be: u32, port: u16) -> bool {
        if contains_port(&self.ports, port) {
            return true;
        }
        let mut i = 0;
        while i < MAX_CIDRS {
            if i as u32 >= self.cidr_count {
                break;
            }
            if self.cidrs[i].contains(peer_be) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Returns whether the non-zero host-order `port` is in `ports`.
#[inline(always)]
pub fn contains_port(ports: &[u16; MAX_PORTS], port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORTS {
        if port != 0 && ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// [`InboundPod::mode`]: plaintext from non-mesh clients is steered to the daemon's
/// plaintext listener, which applies the policy and delivers it to the app.
pub const INBOUND_PERMISSIVE: u32 = 0;
/// [`InboundPod::mode`]: only mesh tunnels are accepted; plaintext is reset by the
/// `sk_lookup` program (probes and exclusions aside).
pub const INBOUND_STRICT: u32 = 1;

/// Value of the inbound map, keyed by an enrolled pod's IPv4 address (`u32`, network
/// byte order), which is unique in the mesh. Written by the daemon only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    /// [`INBOUND_PERMISSIVE`] or [`INBOUND_STRICT`].
    pub mode: u32,
    /// The daemon's tunnel port, host byte order.
    pub tunnel_port: u16,
    pub _pad: u16,
    /// The node's probe source address, network byte order; 0 when the node has none.
    pub probe_addr_be: u32,
    pub _pad2: u32,
    /// Ports that plaintext from `probe_addr_be` may reach directly, host byte order;
    /// 0 marks an unused slot.
    pub probe_ports: [u16; MAX_PORTS],
    /// Inbound exclusions: `ports` are the pod's ports, `cidrs` the clients' networks.
    pub exclude: Exclusions,
}
const _: () = assert!(size_of::<InboundPod>() == 88);

/// Size of the [`INBOUND_REJECTS_MAP`] ring buffer in bytes: 256 KiB, a power-of-two
/// multiple of the page size as the kernel requires. Each record takes 64 bytes with
/// the kernel's 8-byte header. The kernel keeps the producer less than the whole
/// size ahead of the reader, so the buffer has room for 4095 unread rejections.
pub const INBOUND_REJECTS_BYTES: u32 = 256 * 1024;

/// [`InboundReject::reason`]: plaintext to a workload in strict mode.
pub const REJECT_STRICT_PLAINTEXT: u32 = 1;
/// [`InboundReject::reason`]: IPv6 from outside the pod, which the mesh does not carry.
pub const REJECT_IPV6: u32 = 2;
/// [`InboundReject::reason`]: the daemon's listener for the connection is missing from
/// the listeners map, because the daemon is down or has not started yet.
pub const REJECT_NO_LISTENER: u32 = 3;

/// Record of the inbound rejections ring buffer: one TCP SYN to an enrolled pod that
/// the `sk_lookup` program dropped, so the kernel replied with a reset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundReject {
    /// When the program ran: `bpf_ktime_get_ns`, nanoseconds of `CLOCK_MONOTONIC`.
    pub time_ns: u64,
    /// The pod's address the SYN was for, network byte order, as the four 32-bit words
    /// of `bpf_sk_lookup`. An IPv4 address fills word 0 and leaves the others 0.
    pub pod_addr_be: [u32; 4],
    /// The client's address, laid out as `pod_addr_be`.
    pub client_addr_be: [u32; 4],
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u32,
    /// [`REJECT_STRICT_PLAINTEXT`], [`REJECT_IPV6`] or [`REJECT_NO_LISTENER`].
    pub reason: u32,
    /// The client's port, host byte order.
    pub client_port: u16,
    /// The pod's port the SYN was for, host byte order.
    pub pod_port: u16,
    pub _pad: u32,
}
const _: () = assert!(size_of::<InboundReject>() == 56);

/// [`ListenerKey::kind`] of the tunnel listener.
pub const LISTENER_TUNNEL: u32 = 0;
/// [`ListenerKey::kind`] of the plaintext inbound listener.
pub const LISTENER_PLAINTEXT: u32 = 1;

/// Key of the listeners `SOCKHASH`: one of the daemon's listeners in a pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// The pod's IPv4 address, network byte order.
    pub pod_addr_be: u32,
    /// [`LISTENER_TUNNEL`] or [`LISTENER_PLAINTEXT`].
    pub kind: u32,
}
const _: () = assert!(size_of::<ListenerKey>() == 8);

/// Key of the delivery map: the 4-tuple of a connection that the daemon opens from a
/// client's address to the app inside a pod, registered between its `bind` and the end
/// of its `connect`.
///
/// The daemon's SYN reaches the pod address over `lo` from an address that is not the
/// pod's, so nothing in the `sk_lookup` context distinguishes it from a client's SYN.
/// Only the exact 4-tuple does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// The client's IPv4 address the daemon's socket is bound to, network byte order.
    pub client_addr_be: u32,
    /// The pod address the daemon connects to, network byte order.
    pub pod_addr_be: u32,
    /// Port of the daemon's socket, host byte order.
    pub client_port: u16,
    /// The app's port, host byte order.
    pub pod_port: u16,
}
const _: () = assert!(size_of::<DeliveryKey>() == 12);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of them are `#[repr(C)]`, contain only integers and have no implicit
    // padding (every gap is an explicit `_pad` field), so any bit pattern is valid.
    unsafe impl aya::Pod for EnrolledCgroup {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Cidr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Exclusions {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InboundPod {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DeliveryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for InboundReject {}
}
