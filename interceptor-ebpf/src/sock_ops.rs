//! `sock_ops`: re-keys the original destination of each redirected connection once it
//! is established.
//!
//! At connect time the source port is not yet chosen, so `connect4`/`connect6` key the
//! original destination by socket cookie. The daemon cannot see the workload socket's
//! cookie; it sees the peer address of the connection it accepted. This program moves
//! the entry to a key built from that address and the namespace cookie.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use interceptor_common::ConnKey;

use crate::maps::{CONNECT_DST, ORIG_DST};

const AF_INET6: u32 = 10;

/// `sock_ops` on the node's cgroup subtree. On `ACTIVE_ESTABLISHED` of a socket that
/// `connect4`/`connect6` redirected, moves its original destination from the
/// socket-cookie key to a [`ConnKey`].
///
/// The callback runs before the final ACK of the handshake is sent, so the entry exists
/// before the daemon can accept the connection. Always returns 1: this program only
/// observes, and a failed insert surfaces in the daemon as a connection without an
/// original destination, which it resets.
///
/// # Minimum kernel version
///
/// 5.15, for `bpf_get_netns_cookie` in `sock_ops` programs.
#[sock_ops]
pub fn interceptor_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_orig_dst(&ctx);
    }
    1
}

fn rekey_orig_dst(ctx: &SockOpsContext) {
    // SAFETY: `ctx.ops` is the program's context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dst) = (unsafe { CONNECT_DST.get(&cookie) }).copied() else {
        return;
    };
    // SAFETY: the kernel hands every program of this type a valid `bpf_sock_ops`.
    let ops = unsafe { &*ctx.ops };
    // A dual-stack socket connected to an IPv4-mapped address keeps its IPv4 source
    // address in the last word of `local_ip6`. Verifier: both fields are loaded at
    // fixed offsets before choosing; a branch-selected field offset would make the
    // compiler add a variable to the context pointer, which the verifier rejects
    // ("dereference of modified ctx ptr").
    // SAFETY: plain loads of context fields the program type may read.
    let (ip4, ip6_last) = unsafe {
        (
            core::ptr::read_volatile(&ops.local_ip4),
            core::ptr::read_volatile(&ops.local_ip6[3]),
        )
    };
    let src_addr_be = if ops.family == AF_INET6 {
        ip6_last
    } else {
        ip4
    };
    let key = ConnKey {
        // SAFETY: `ctx.ops` is the program's context pointer.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops as *mut c_void) },
        src_addr_be,
        // `local_port` is in host byte order.
        src_port: ops.local_port as u16,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &dst, 0);
    let _ = CONNECT_DST.remove(&cookie);
}
