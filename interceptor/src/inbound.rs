//! Inbound capture in ambient mode: what the `sk_lookup` program needs to know about
//! each pod, the plaintext listener it steers non-mesh clients to, and the transparent
//! delivery that keeps the client's address as the source of the app's connection.
//!
//! # Delivery with the client's address
//!
//! The daemon connects to the app from inside the pod, over `lo`, with a socket that
//! has `IP_TRANSPARENT` set, is bound to the client's IP (port chosen by the kernel)
//! and carries [`DELIVERY_MARK`] as its `SO_MARK`. Its 4-tuple sits in the `DELIVERY`
//! map from `bind` until `connect` ends, so `sk_lookup` passes its SYN to the app
//! instead of steering it back to the daemon. Three settings in the pod's namespace
//! make the app's replies come back to that socket instead of leaving through `eth0`
//! towards the real client:
//!
//! - `net.ipv4.tcp_fwmark_accept=1`: the app's accepted socket takes the mark of the
//!   SYN that created it, so every packet the app sends on it carries the mark;
//! - `net.ipv4.fwmark_reflect=1`: replies the kernel sends without a socket, such as
//!   the reset for a port where nothing listens, carry the mark of the packet they
//!   reply to, so the daemon gets "connection refused" at once;
//! - `ip rule fwmark DELIVERY_MARK lookup DELIVERY_ROUTE_TABLE` with
//!   `local 0.0.0.0/0 dev lo` in that table: marked packets to any address are
//!   delivered locally, where the transparent socket takes them.
//!
//! The daemon writes the two sysctls from a thread inside the pod's namespace and sets
//! the route with `ip` from iproute2, started from that thread. `ip` is much shorter
//! than the netlink messages spelled out, and no iptables is involved.
//!
//! # Plaintext
//!
//! The `sk_lookup` program steers plaintext of permissive workloads to the plaintext
//! listener. The accepted socket's local address is the original destination. The
//! daemon checks the policies with no identity (plaintext has none, so only address
//! and port rules can match), connects to the app at once (server-first protocols
//! work, since no client byte is awaited) and relays.
//!
//! The connections that `sk_lookup` resets without involving the daemon (plaintext to
//! strict workloads, IPv6, a missing listener) are logged and counted by
//! [`crate::rejections`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use interceptor_common::{
    Cidr, DeliveryKey, InboundPod, INBOUND_PERMISSIVE, INBOUND_STRICT, MAX_PORTS,
};
use socket2::SockAddr;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::{DELIVERY_MARK, DELIVERY_ROUTE_TABLE};
use crate::ebpf::NodePrograms;
use crate::policy::ConnectionFacts;
use crate::relay::{self, relay, End, SharedTcp};
use crate::tunnel::{self, Error, LocalWorkload, Shared, Summary};
use crate::workloads::{self, InboundMode, Node, Workload};

/// Errors of preparing a pod for transparent delivery.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("entering network namespace {path} failed")]
    Netns {
        path: PathBuf,
        #[source]
        source: crate::netns::Error,
    },
    #[error("setting {sysctl} in network namespace {path} failed")]
    Sysctl {
        path: PathBuf,
        sysctl: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("running `ip {args}` in network namespace {path} failed (is iproute2 installed?)")]
    Spawn {
        path: PathBuf,
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` in network namespace {path} failed: {stderr}")]
    Ip {
        path: PathBuf,
        args: String,
        stderr: String,
    },
    #[error("the setup thread for network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

/// Returns the `sk_lookup` settings of `workload` on `node`.
pub fn pod_entry(workload: &Workload, node: &Node, tunnel_port: u16) -> InboundPod {
    let mut entry = InboundPod {
        mode: match workload.inbound_mode {
            InboundMode::Strict => INBOUND_STRICT,
            InboundMode::Permissive => INBOUND_PERMISSIVE,
        },
        tunnel_port,
        probe_addr_be: node.probe_addr.map_or(0, |addr| u32::from(addr).to_be()),
        exclude: exclusions(&workload.inbound_exclude),
        ..InboundPod::default()
    };
    copy_ports(&mut entry.probe_ports, &workload.probe_ports);
    entry
}

/// Converts validated exclusions to the eBPF map value. The directory caps the lists
/// at the map's array sizes, so nothing is dropped.
pub fn exclusions(list: &workloads::Exclusions) -> interceptor_common::Exclusions {
    let mut value = interceptor_common::Exclusions::default();
    copy_ports(&mut value.ports, &list.ports);
    for (slot, net) in value.cidrs.iter_mut().zip(&list.cidrs) {
        *slot = Cidr {
            addr_be: u32::from(net.addr).to_be(),
            mask_be: net.mask().to_be(),
        };
        value.cidr_count += 1;
    }
    value
}

fn copy_ports(slots: &mut [u16; MAX_PORTS], ports: &[u16]) {
    for (slot, port) in slots.iter_mut().zip(ports) {
        *slot = *port;
    }
}

/// Prepares the pod at `netns` for transparent delivery: `tcp_fwmark_accept`,
/// `fwmark_reflect` and the policy route for [`DELIVERY_MARK`]. Idempotent, so a restarted daemon repeats it.
pub fn setup_delivery_routing(netns: &Path) -> Result<(), SetupError> {
    let path = netns.to_owned();
    // setns moves only the calling thread, and children forked from it inherit its
    // namespace, so a short-lived thread enters the pod and runs `ip` there.
    std::thread::spawn(move || {
        crate::netns::enter(&path).map_err(|source| SetupError::Netns {
            path: path.clone(),
            source,
        })?;
        for sysctl in ["net.ipv4.tcp_fwmark_accept", "net.ipv4.fwmark_reflect"] {
            let file = Path::new("/proc/sys").join(sysctl.replace('.', "/"));
            std::fs::write(&file, "1").map_err(|source| SetupError::Sysctl {
                path: path.clone(),
                sysctl,
                source,
            })?;
        }
        let mark = format!("{DELIVERY_MARK:#x}");
        let table = DELIVERY_ROUTE_TABLE.to_string();
        // Remove the rules a previous daemon added, so restarts do not stack them.
        while ip(&path, &["rule", "del", "fwmark", &mark, "lookup", &table]).is_ok() {}
        ip(&path, &["rule", "add", "fwmark", &mark, "lookup", &table])?;
        ip(
            &path,
            &[
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &table,
            ],
        )
    })
    .join()
    .map_err(|_| SetupError::Panicked {
        path: netns.to_owned(),
    })?
}

fn ip(path: &Path, args: &[&str]) -> Result<(), SetupError> {
    let joined = args.join(" ");
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| SetupError::Spawn {
            path: path.to_owned(),
            args: joined.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(SetupError::Ip {
            path: path.to_owned(),
            args: joined,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Transparent delivery: connections to the app that carry the client's address.
#[derive(Debug)]
pub struct Delivery {
    /// `SO_MARK` of the delivery sockets ([`DELIVERY_MARK`] in the daemon).
    pub mark: u32,
    /// The node's programs, whose `DELIVERY` map lets the connections through.
    pub programs: Arc<NodePrograms>,
}

impl Delivery {
    /// Connects to `dst` in `local`'s pod from `client`'s address: an `IP_TRANSPARENT`
    /// socket bound to `client` (the kernel picks the port) with `SO_MARK` set.
    ///
    /// The client's port is not kept: for plaintext, the client's own connection to
    /// `dst` already uses that 4-tuple inside the pod.
    pub async fn connect(
        &self,
        local: &LocalWorkload,
        client: Ipv4Addr,
        dst: SocketAddr,
    ) -> Result<TcpStream, Error> {
        let IpAddr::V4(pod_addr) = dst.ip() else {
            return Err(Error::InvalidDestination {
                dst,
                pod_ip: local.workload.ip,
            });
        };
        let socket = local.netns.tcp_socket().await.map_err(Error::Socket)?;
        socket.set_ip_transparent_v4(true).map_err(Error::Socket)?;
        socket.set_mark(self.mark).map_err(Error::Socket)?;
        socket
            .bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(client), 0)))
            .map_err(Error::Socket)?;
        let bound = socket
            .local_addr()
            .map_err(Error::Socket)?
            .as_socket()
            .ok_or_else(|| Error::Socket(std::io::Error::other("bound to a non-IP address")))?;

        let key = DeliveryKey {
            client_addr_be: u32::from(client).to_be(),
            pod_addr_be: u32::from(pod_addr).to_be(),
            client_port: bound.port(),
            pod_port: dst.port(),
        };
        self.programs
            .add_delivery(&key)
            .map_err(|error| Error::Delivery(Box::new(error)))?;
        // Removes the entry when the connect ends, also when the caller's timeout drops
        // this future.
        let _entry = DeliveryEntry {
            programs: &self.programs,
            key,
        };

        TcpSocket::from_std_stream(socket.into())
            .connect(dst)
            .await
            .map_err(|source| Error::Connect { addr: dst, source })
    }
}

/// A delivery connection's entry in the `DELIVERY` map, removed on drop.
struct DeliveryEntry<'a> {
    programs: &'a NodePrograms,
    key: DeliveryKey,
}

impl Drop for DeliveryEntry<'_> {
    fn drop(&mut self) {
        self.programs.remove_delivery(&self.key);
    }
}

/// Accepts the plaintext connections that `sk_lookup` steers to `local`'s plaintext
/// listener, forever.
pub async fn serve_plaintext(
    listener: TcpListener,
    local: Arc<LocalWorkload>,
    shared: Arc<Shared>,
) {
    tunnel::accept_loop(listener, local, shared, "inbound", plaintext).await
}

async fn plaintext(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    local: Arc<LocalWorkload>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let mut summary = Summary {
        direction: "inbound",
        mode: "plaintext",
        tls: "none",
        relay: "copy",
        dst_identity: Some(local.workload.spiffe_id.clone()),
        ..Summary::default()
    };
    let client = SharedTcp::new(stream);
    let result = plaintext_inner(&client, peer, id, &local, &shared, &mut summary).await;
    if result.is_err() {
        relay::set_reset_on_close(client.raw_fd());
    }
    tunnel::log_close(&shared, started, &summary, &result);
}

async fn plaintext_inner(
    client: &SharedTcp,
    peer: SocketAddr,
    id: u64,
    local: &LocalWorkload,
    shared: &Shared,
    summary: &mut Summary,
) -> Result<(), Error> {
    // sk_lookup keeps the original destination as the accepted socket's local address.
    let dst = client.0.local_addr().map_err(Error::Socket)?;
    summary.dst = Some(dst);
    let pod_ip = local.workload.ip;
    if dst.ip() != IpAddr::V4(pod_ip) || shared.config.is_reserved_port(dst.port()) {
        return Err(Error::InvalidDestination { dst, pod_ip });
    }

    let facts = ConnectionFacts {
        identity: None,
        source_ip: peer.ip(),
        namespace: local.workload.spiffe_id.namespace().to_owned(),
        labels: local.workload.labels.clone(),
        port: dst.port(),
    };
    tunnel::authorize(shared, &facts, summary)?;
    let mut registration = shared.open.register(id, facts);

    let timeout = shared.config.connect_timeout;
    let upstream = tokio::time::timeout(timeout, tunnel::deliver(local, shared, peer.ip(), dst))
        .await
        .map_err(|_| Error::ConnectTimeout { addr: dst })??;
    let upstream = SharedTcp::new(upstream);
    let app = End {
        reader: upstream.clone(),
        writer: upstream.clone(),
        socket: upstream.clone(),
        name: "app",
        tls: false,
    };
    let relayed = relay(tunnel::app_end(client), app, &shared.pool, false, None);
    match tunnel::until_cut(&mut registration, relayed).await {
        Ok((moved, result)) => {
            summary.moved = moved;
            result.map_err(Error::from)
        }
        Err(verdict) => {
            relay::set_reset_on_close(upstream.raw_fd());
            Err(tunnel::cut_error(verdict, summary))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::identity::{SpiffeId, TrustDomain};
    use crate::workloads::Ipv4Net;

    fn workload() -> Workload {
        let trust_domain: TrustDomain = "cluster.local".parse().expect("trust domain");
        Workload {
            name: "web".to_owned(),
            spiffe_id: SpiffeId::new(trust_domain, "default", "web").expect("SPIFFE ID"),
            node: "n1".to_owned(),
            ip: Ipv4Addr::new(10, 1, 1, 11),
            netns: PathBuf::from("/run/netns/web"),
            cgroup: PathBuf::from("interceptor/n1/web"),
            labels: BTreeMap::new(),
            inbound_mode: InboundMode::Strict,
            probe_ports: vec![8081],
            inbound_exclude: workloads::Exclusions {
                ports: vec![9000, 9001],
                cidrs: vec!["192.168.0.0/16".parse::<Ipv4Net>().expect("CIDR")],
            },
            outbound_exclude: workloads::Exclusions::default(),
        }
    }

    #[test]
    fn pod_entry_carries_mode_probe_and_exclusions() {
        let node = Node {
            name: "n1".to_owned(),
            cgroup: PathBuf::from("interceptor/n1"),
            probe_addr: Some(Ipv4Addr::new(10, 1, 1, 1)),
        };

        let entry = pod_entry(&workload(), &node, 15008);

        assert_eq!(entry.mode, INBOUND_STRICT);
        assert_eq!(entry.tunnel_port, 15008);
        assert_eq!(
            entry.probe_addr_be,
            u32::from(Ipv4Addr::new(10, 1, 1, 1)).to_be()
        );
        assert_eq!(entry.probe_ports[..2], [8081, 0]);
        assert_eq!(entry.exclude.ports[..3], [9000, 9001, 0]);
        assert_eq!(entry.exclude.cidr_count, 1);
    }

    #[test]
    fn converted_exclusions_match_as_the_ebpf_program_does() {
        let value = exclusions(&workload().inbound_exclude);
        let be = |addr: Ipv4Addr| u32::from(addr).to_be();

        assert!(value.matches(be(Ipv4Addr::new(192, 168, 7, 9)), 8080));
        assert!(value.matches(be(Ipv4Addr::new(10, 1, 2, 11)), 9001));
        assert!(!value.matches(be(Ipv4Addr::new(10, 1, 2, 11)), 8080));
        assert!(!value.matches(be(Ipv4Addr::new(192, 169, 0, 1)), 8080));
    }

    #[test]
    fn empty_exclusions_match_nothing() {
        let value = exclusions(&workloads::Exclusions::default());

        assert!(!value.matches(0, 8080));
        assert!(!value.matches(u32::MAX, 1));
    }
}
