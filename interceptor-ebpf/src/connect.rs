//! `cgroup/connect4` and `cgroup/connect6`: redirect enrolled workloads' outbound TCP
//! connects to the daemon.
//!
//! Attached to the node's cgroup subtree, so they run for every process of every pod of
//! the node, and act only for sockets whose cgroup is in [`ENROLLED`]. The daemon's own
//! sockets live in a cgroup outside the subtree, so they are never redirected, even
//! when the daemon creates them inside a pod's network namespace.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use interceptor_common::{EnrolledCgroup, OrigDst};

use crate::maps::{CONNECT_DST, ENROLLED, OUTBOUND_EXCLUDE};

/// Return value that lets the connect go on (rewritten or not).
const ALLOW: i32 = 1;
/// Return value that fails the connect with `EPERM`.
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;

/// `cgroup/connect4`: redirects an enrolled workload's IPv4 TCP connect to the daemon's
/// outbound listener and records the original destination under the socket cookie.
///
/// Loopback and unspecified destinations stay untouched, since they never leave the
/// pod, and so do destinations the workload's outbound exclusions name. Returns 1 to let the (possibly rewritten) connect proceed, and 0 to fail it with
/// `EPERM` when the destination cannot be recorded or the socket is in a namespace
/// other than its workload's: the connection must not leave the pod unprotected.
///
/// # Minimum kernel version
///
/// 5.7, for `bpf_get_current_cgroup_id` and `bpf_get_netns_cookie` in this program type.
#[cgroup_sock_addr(connect4)]
pub fn interceptor_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(REJECT)
}

/// `cgroup/connect6`: handles IPv4-mapped destinations (`::ffff:a.b.c.d`, what
/// dual-stack sockets use for IPv4) exactly like `connect4`, so no dual-stack socket
/// escapes the redirect.
///
/// Loopback (`::1`) and unspecified destinations stay untouched. Any other IPv6
/// destination is rejected with `EPERM` for enrolled workloads: the mesh carries IPv4
/// only, and a native IPv6 connect would otherwise leave the pod in plaintext. Return
/// values are those of `connect4`.
///
/// # Minimum kernel version
///
/// 5.7, as `connect4`.
#[cgroup_sock_addr(connect6)]
pub fn interceptor_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(REJECT)
}

/// Returns the cgroup id and enrolled entry for this socket, `Ok(None)` when its cgroup
/// is not enrolled, or `Err` when the socket must be rejected.
fn enrolled_socket(ctx: &SockAddrContext) -> Result<Option<(u64, EnrolledCgroup)>, ()> {
    // SAFETY: the kernel hands every program of this type a valid `bpf_sock_addr`.
    let sock_addr = unsafe { &*ctx.sock_addr };
    if sock_addr.type_ != SOCK_STREAM {
        return Ok(None);
    }
    // SAFETY: the helper takes no arguments and is valid in this program type.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out before any other map operation.
    let Some(enrolled) = (unsafe { ENROLLED.get(&cgroup_id) }).copied() else {
        return Ok(None);
    };
    // SAFETY: `ctx.sock_addr` is the program's context pointer.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    if netns_cookie != enrolled.netns_cookie {
        return Err(());
    }
    Ok(Some((cgroup_id, enrolled)))
}

/// Returns whether the workload in cgroup `cgroup_id` excludes the destination from
/// the mesh.
fn is_excluded(cgroup_id: u64, addr_be: u32, port_be: u16) -> bool {
    // SAFETY: the value is only read while no other map operation runs.
    match unsafe { OUTBOUND_EXCLUDE.get(&cgroup_id) } {
        Some(exclude) => exclude.matches(addr_be, u16::from_be(port_be)),
        None => false,
    }
}

/// Returns true for destinations inside the host: 127.0.0.0/8 and 0.0.0.0.
fn is_local_v4(addr_be: u32) -> bool {
    let addr = u32::from_be(addr_be);
    addr == 0 || addr >> 24 == 127
}

/// Records the original destination of the connecting socket under its cookie.
fn record_orig_dst(ctx: &SockAddrContext, addr_be: u32, port_be: u16) -> Result<(), ()> {
    // SAFETY: `ctx.sock_addr` is the program's context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let dst = OrigDst {
        addr_be,
        port_be,
        _pad: 0,
    };
    CONNECT_DST.insert(&cookie, &dst, 0).map_err(|_| ())
}

/// `user_port` holds the big-endian port in its low 16 bits.
fn user_port_be(sock_addr: &bpf_sock_addr) -> u16 {
    sock_addr.user_port as u16
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, ()> {
    let Some((cgroup_id, enrolled)) = enrolled_socket(ctx)? else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands every program of this type a valid `bpf_sock_addr`,
    // and connect programs may rewrite `user_ip4` and `user_port`.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    let addr_be = sock_addr.user_ip4;
    if is_local_v4(addr_be) || is_excluded(cgroup_id, addr_be, user_port_be(sock_addr)) {
        return Ok(ALLOW);
    }
    record_orig_dst(ctx, addr_be, user_port_be(sock_addr))?;
    sock_addr.user_ip4 = enrolled.redirect_addr_be;
    sock_addr.user_port = u32::from(enrolled.redirect_port_be);
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, ()> {
    let Some((cgroup_id, enrolled)) = enrolled_socket(ctx)? else {
        return Ok(ALLOW);
    };
    // SAFETY: as in `try_connect4`; connect6 programs may rewrite `user_ip6`.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    // The verifier allows only 4-byte loads and stores of `user_ip6`, one word at a
    // time, so the address is handled as four network-order words.
    let words = [
        sock_addr.user_ip6[0],
        sock_addr.user_ip6[1],
        sock_addr.user_ip6[2],
        sock_addr.user_ip6[3],
    ];
    let prefix_is_zero = words[0] == 0 && words[1] == 0;
    if prefix_is_zero && u32::from_be(words[2]) == 0x0000_ffff {
        let addr_be = words[3];
        if is_local_v4(addr_be) || is_excluded(cgroup_id, addr_be, user_port_be(sock_addr)) {
            return Ok(ALLOW);
        }
        record_orig_dst(ctx, addr_be, user_port_be(sock_addr))?;
        sock_addr.user_ip6[3] = enrolled.redirect_addr_be;
        sock_addr.user_port = u32::from(enrolled.redirect_port_be);
        return Ok(ALLOW);
    }
    let is_unspecified_or_loopback =
        prefix_is_zero && words[2] == 0 && (words[3] == 0 || u32::from_be(words[3]) == 1);
    if is_unspecified_or_loopback {
        return Ok(ALLOW);
    }
    Ok(REJECT)
}
