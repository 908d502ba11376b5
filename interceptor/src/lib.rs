//! The interceptor node daemon as a library: one module per concern. The `interceptor`
//! binary wires them to its command line; the end-to-end tests use some directly.

pub mod admin;
pub mod ca;
pub mod config;
pub mod daemon;
pub mod ebpf;
pub mod identity;
pub mod identity_manager;
pub mod inbound;
pub mod ktls;
pub mod netns;
pub mod policy;
pub mod protocol;
pub mod rejections;
pub mod relay;
pub mod sidecar;
pub mod splice;
pub mod tls;
pub mod tunnel;
pub mod workloads;
