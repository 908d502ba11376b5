//! `sk_lookup`: steers inbound TCP connections of an enrolled pod to the daemon's
//! listeners in the pod, whatever the destination port.
//!
//! Attached to each enrolled pod's network namespace, so it runs for every inbound TCP
//! SYN there that no established socket claims. Settings come from [`INBOUND`], keyed by
//! the pod address the SYN is for; the daemon's listeners from [`LISTENERS`]. The
//! accepted socket keeps the original destination as its local address.
//!
//! Every reset it decides is reported to the daemon as an [`InboundReject`] record in
//! [`INBOUND_REJECTS`], so the daemon can log and count what the kernel did.

use aya_ebpf::{
    bindings::bpf_sk_lookup, helpers::bpf_ktime_get_ns, macros::sk_lookup,
    programs::SkLookupContext,
};
use interceptor_common::{
    contains_port, DeliveryKey, InboundPod, InboundReject, ListenerKey, INBOUND_STRICT,
    LISTENER_PLAINTEXT, LISTENER_TUNNEL, REJECT_IPV6, REJECT_NO_LISTENER, REJECT_STRICT_PLAINTEXT,
};

use crate::maps::{DELIVERY, INBOUND, INBOUND_REJECTS, INBOUND_REJECTS_LOST, LISTENERS};

/// Return value that lets the lookup go on (with the assigned socket, if any).
const SK_PASS: u32 = 1;
/// Return value that fails the lookup: the kernel replies to the SYN with a reset.
const SK_DROP: u32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

/// `sk_lookup` on an enrolled pod's network namespace. For an inbound IPv4 TCP
/// connection to an enrolled pod address, in this order:
///
/// 1. from the pod's own address (the app calling itself) or one of the daemon's
///    delivery connections in [`DELIVERY`]: passed untouched. Redirected outbound
///    connects go to a loopback address, which is never in [`INBOUND`];
/// 2. to the tunnel port: assigned to the tunnel listener;
/// 3. excluded by port or client network: passed untouched, to the app;
/// 4. from the node's probe address to a probe port: passed untouched, to the app;
/// 5. in strict mode: dropped (the client gets a reset);
/// 6. otherwise: assigned to the plaintext listener.
///
/// A missing listener (the daemon is down) drops the connection in steps 2 and 6, so
/// the pod fails closed. Inbound IPv6 TCP is dropped unless it comes over loopback or
/// from the pod's own address, because the mesh carries IPv4 only. The program runs
/// only in enrolled pods, so no enrolled app receives plaintext over IPv6.
///
/// Returns 1 (`SK_PASS`) to go on with the lookup, with or without an assigned socket,
/// and 0 (`SK_DROP`) to reset. Each drop is reported in [`INBOUND_REJECTS`].
///
/// # Minimum kernel version
///
/// 5.9, for `sk_lookup` programs and `SOCKHASH` lookups in them (the ring buffer needs
/// 5.8).
#[sk_lookup]
pub fn interceptor_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx).unwrap_or(SK_DROP)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, ()> {
    // SAFETY: the kernel hands every program of this type a valid `bpf_sk_lookup`.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return Ok(SK_PASS);
    }
    if lookup.family == AF_INET6 {
        return Ok(ipv6_verdict(lookup));
    }
    if lookup.family != AF_INET {
        return Ok(SK_PASS);
    }

    let pod_addr_be = lookup.local_ip4;
    // SAFETY: the value is copied out before any other map operation.
    let Some(pod) = (unsafe { INBOUND.get(&pod_addr_be) }).copied() else {
        return Ok(SK_PASS);
    };
    // `local_port` is in host byte order, `remote_port` a big-endian u16, and both
    // addresses in network byte order. Linux drops packets from outside that carry one
    // of the namespace's own addresses as their source ("martian source", unless
    // `accept_local` is set), so a client at the pod's own address is inside the pod.
    let port = lookup.local_port as u16;
    let client_be = lookup.remote_ip4;
    if client_be == pod_addr_be || is_delivery(lookup, pod_addr_be, port) {
        return Ok(SK_PASS);
    }
    let rejection = InboundReject {
        pod_addr_be: [pod_addr_be, 0, 0, 0],
        client_addr_be: [client_be, 0, 0, 0],
        family: AF_INET,
        client_port: u16::from_be(lookup.remote_port),
        pod_port: port,
        ..InboundReject::default()
    };

    if port == pod.tunnel_port {
        return Ok(assign(ctx, pod_addr_be, LISTENER_TUNNEL, rejection));
    }
    if pod.exclude.matches(client_be, port) || is_probe(&pod, client_be, port) {
        return Ok(SK_PASS);
    }
    if pod.mode == INBOUND_STRICT {
        report(rejection, REJECT_STRICT_PLAINTEXT);
        return Ok(SK_DROP);
    }
    Ok(assign(ctx, pod_addr_be, LISTENER_PLAINTEXT, rejection))
}

/// Passes IPv6 connections to `::1` or from the pod's own address and drops (and
/// reports) the rest.
fn ipv6_verdict(lookup: &bpf_sk_lookup) -> u32 {
    // Verifier: the context allows only 4-byte loads of the address words, so each
    // word is read on its own rather than the arrays compared as a whole.
    let local = [
        lookup.local_ip6[0],
        lookup.local_ip6[1],
        lookup.local_ip6[2],
        lookup.local_ip6[3],
    ];
    let remote = [
        lookup.remote_ip6[0],
        lookup.remote_ip6[1],
        lookup.remote_ip6[2],
        lookup.remote_ip6[3],
    ];
    let loopback = local[0] == 0 && local[1] == 0 && local[2] == 0 && u32::from_be(local[3]) == 1;
    if loopback || local == remote {
        SK_PASS
    } else {
        let rejection = InboundReject {
            pod_addr_be: local,
            client_addr_be: remote,
            family: AF_INET6,
            client_port: u16::from_be(lookup.remote_port),
            pod_port: lookup.local_port as u16,
            ..InboundReject::default()
        };
        report(rejection, REJECT_IPV6);
        SK_DROP
    }
}

fn is_delivery(lookup: &bpf_sk_lookup, pod_addr_be: u32, port: u16) -> bool {
    let key = DeliveryKey {
        client_addr_be: lookup.remote_ip4,
        pod_addr_be,
        client_port: u16::from_be(lookup.remote_port),
        pod_port: port,
    };
    // SAFETY: only the presence of the entry is read.
    unsafe { DELIVERY.get(&key) }.is_some()
}

fn is_probe(pod: &InboundPod, client_be: u32, port: u16) -> bool {
    pod.probe_addr_be != 0
        && client_be == pod.probe_addr_be
        && contains_port(&pod.probe_ports, port)
}

/// Assigns the daemon's listener `kind` for the pod; drops and reports `rejection`
/// when the listener is missing.
fn assign(ctx: &SkLookupContext, pod_addr_be: u32, kind: u32, rejection: InboundReject) -> u32 {
    let key = ListenerKey { pod_addr_be, kind };
    match LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => SK_PASS,
        Err(_) => {
            report(rejection, REJECT_NO_LISTENER);
            SK_DROP
        }
    }
}

/// Writes `rejection` with `reason` and the current time to [`INBOUND_REJECTS`]. When
/// the ring buffer is full the record is lost and counted in [`INBOUND_REJECTS_LOST`];
/// the lookup never waits for the daemon.
///
/// Verifier: the callers copy the context's fields into `rejection` where they read
/// them anyway. Reading them here made LLVM load through a context pointer plus an
/// offset, which the verifier rejects ("dereference of modified ctx ptr").
fn report(mut rejection: InboundReject, reason: u32) {
    let Some(mut entry) = INBOUND_REJECTS.reserve::<InboundReject>(0) else {
        count_lost();
        return;
    };
    rejection.reason = reason;
    // SAFETY: the helper takes no arguments and only reads the clock.
    rejection.time_ns = unsafe { bpf_ktime_get_ns() };
    entry.write(rejection);
    entry.submit(0);
}

fn count_lost() {
    if let Some(lost) = INBOUND_REJECTS_LOST.get_ptr_mut(0) {
        // SAFETY: the pointer is valid for the map's life. The kernel runs the program
        // in the TCP receive path with CPU migration and bottom halves disabled, so no
        // other writer touches this CPU's slot meanwhile.
        unsafe { *lost += 1 };
    }
}
