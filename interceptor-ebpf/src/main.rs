//! eBPF programs of interceptor, built into one object that the daemon loads.
//!
//! - [`connect`]: `cgroup/connect4` and `cgroup/connect6` send the outbound TCP connects
//!   of enrolled workloads to the daemon's outbound listener in the workload's own
//!   network namespace and record the original destination by socket cookie.
//! - [`sock_ops`]: once such a connection is established, re-keys the original
//!   destination by the connection's source address, which is what the daemon sees
//!   when it accepts the connection.
//! - [`sk_lookup`]: steers inbound TCP connections of each enrolled pod to the daemon's
//!   tunnel or plaintext listener in the pod, and drops them when the listener is gone.
//!
//! Build with `cargo xtask build-ebpf`; a plain `cargo build` skips this crate.

#![no_std]
#![no_main]

mod connect;
mod maps;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this, so it is never called.
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
