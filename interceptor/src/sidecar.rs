//! `interceptor sidecar`: the classic sidecar data path, kept as the baseline that
//! benchmarks compare ambient mode with.
//!
//! One sidecar process serves one pod from inside the pod's network namespace.
//! iptables `REDIRECT` rules in that namespace ([`iptables`]) send the pod's outbound TCP
//! connects to the outbound listener on 127.0.0.1. They send every inbound TCP
//! connection except the tunnel's to a listener that resets it, so nothing reaches the
//! app without mutual TLS. The tunnel itself is the daemon's: the same workload directory,
//! CA, SVIDs, rustls configurations, tunnel protocol, relay buffers and runtime flags,
//! so that a comparison of the two modes measures the data path alone. The original
//! destination comes from `SO_ORIGINAL_DST` instead of the eBPF map.
//!
//! Every socket the sidecar creates carries a firewall mark (`--mark`) that the OUTPUT
//! rules skip, so its own connects (to tunnels, to its pod's app, to hosts outside the
//! mesh) are not redirected back to itself.
//!
//! NOTE: the rules exist only while the sidecar runs, because it removes them at exit.
//! While no sidecar runs, the pod's traffic flows unintercepted and in plaintext, unlike
//! ambient mode, which fails closed. The mode is a benchmark baseline, not a deployment.
//! It also installs no ip6tables rules, so IPv6 traffic is never intercepted; the
//! islands of the tests and the demo have IPv4 addresses only.

// The errors occur only at start, never per connection, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod iptables;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, info_span, warn, Instrument};

use crate::config::RunConfig;
use crate::daemon;
use crate::netns::{self, Netns};
use crate::relay::{self, BufferPool};
use crate::tunnel::{self, LocalWorkload, OrigDstSource, Shared};
use crate::workloads::{Directory, Registry, Workload};

/// Default of `--mark`: 1337, the mark Istio's sidecar gives its own sockets.
pub const DEFAULT_MARK: u32 = 0x539;

/// Flags of `interceptor sidecar`.
#[derive(Args, Debug, Clone)]
#[command(mut_arg("bpffs", |arg| arg.hide(true)))]
pub struct SidecarConfig {
    // The daemon's flags, flattened so that ports, timeouts, SVID lifetime, worker
    // threads and any flag added later mean the same in both modes, and a benchmark
    // cannot weaken the baseline by forgetting one. `--node` names the node the
    // workload is placed on and is checked against the directory. `--bpffs` is unused
    // and hidden.
    #[command(flatten)]
    pub run: RunConfig,

    /// Name of the workload in the directory whose pod this sidecar serves.
    #[arg(long, env = "INTERCEPTOR_WORKLOAD")]
    pub workload: String,

    /// Firewall mark (`SO_MARK`) of the sidecar's own sockets, which the OUTPUT redirect
    /// skips. Decimal or `0x` hexadecimal, not 0.
    #[arg(long, env = "INTERCEPTOR_MARK", default_value = "0x539", value_parser = parse_mark)]
    pub mark: u32,

    /// The iptables command that installs the redirect rules, e.g. `iptables-legacy`.
    #[arg(long, env = "INTERCEPTOR_IPTABLES", default_value = "iptables")]
    pub iptables: PathBuf,
}

impl SidecarConfig {
    /// Checks values that depend on each other, the daemon's flags included, and returns
    /// every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = self.run.validate().err().unwrap_or_default();
        if self.mark == 0 {
            problems.push("--mark 0: must not be 0, the mark of every unmarked packet".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Parses a firewall mark written in decimal or as `0x` hexadecimal.
pub fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| {
        format!("invalid mark {text:?}: expected a 32-bit number, decimal or 0x hexadecimal")
    })
}

/// Errors that stop the sidecar, all at start or at exit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("workload {workload:?} not found in the workload directory {path}")]
    UnknownWorkload { workload: String, path: PathBuf },
    #[error("workload {workload} is placed on node {placed} in the workload directory, not on --node {node}")]
    WrongNode {
        workload: String,
        placed: String,
        node: String,
    },
    /// A step that the daemon takes too, failing the same way.
    #[error(transparent)]
    Daemon(#[from] daemon::Error),
    #[error("installing or removing the redirect rules failed")]
    Iptables(#[from] iptables::Error),
}

/// Runs the sidecar of `config.workload` until SIGINT or SIGTERM, in the network
/// namespace of the calling process.
pub async fn run(config: SidecarConfig) -> Result<(), Error> {
    let (directory, workload) = load_workload(&config)?;
    let ca = daemon::load_ca(&config.run, &directory)?;
    let (ktls, options) = daemon::tunnel_options(&config.run);

    let netns = Netns::spawn(Path::new(netns::CURRENT), Some(config.mark)).map_err(|source| {
        daemon::Error::Netns {
            workload: workload.name.clone(),
            source,
        }
    })?;
    let tls = daemon::issue_tls(&workload, &ca, config.run.svid_lifetime, &options)?;
    let local = Arc::new(LocalWorkload {
        workload,
        netns,
        tls: RwLock::new(Arc::new(tls)),
    });
    let outbound_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.run.outbound_port));
    let tunnel_addr = SocketAddr::from((local.workload.ip, config.run.tunnel_port));
    let inbound_addr = SocketAddr::from((local.workload.ip, config.run.plaintext_port));
    let outbound = daemon::listen(&local, outbound_addr).await?;
    let tunnel = daemon::listen(&local, tunnel_addr).await?;
    let inbound = daemon::listen(&local, inbound_addr).await?;

    let shared = Arc::new(Shared::new(
        config.run.clone(),
        Arc::new(Registry::new(directory)),
        OrigDstSource::SoOriginalDst,
        BufferPool::new(daemon::POOLED_BUFFERS),
        ktls.clone(),
    ));
    tokio::spawn(tunnel::serve_outbound(
        outbound,
        Arc::clone(&local),
        Arc::clone(&shared),
    ));
    tokio::spawn(tunnel::serve_tunnel(
        tunnel,
        Arc::clone(&local),
        Arc::clone(&shared),
    ));
    tokio::spawn(reject_plaintext(
        inbound,
        Arc::clone(&local),
        Arc::clone(&shared),
    ));
    let span = tracing::info_span!("renew", workload = %local.workload.name);
    tokio::spawn(
        daemon::renew_svids(
            Arc::clone(&local),
            Arc::new(ca),
            config.run.svid_lifetime,
            options,
        )
        .instrument(span),
    );

    // The listeners are up, so the rules redirect to sockets that accept. iptables runs
    // as a child process and blocks this worker briefly; no connection is served yet.
    let iptables = iptables::Iptables::new(&config.iptables);
    let iptables_version = iptables.version()?;
    let redirect = iptables::Redirect {
        mark: config.mark,
        outbound_port: config.run.outbound_port,
        tunnel_port: config.run.tunnel_port,
        inbound_port: config.run.plaintext_port,
    };
    let (rules, stale) = iptables.install(&redirect)?;
    if stale > 0 {
        warn!(
            commands = stale,
            "removed iptables rules that an earlier sidecar left behind"
        );
    }
    info!(
        workload = %local.workload.name,
        spiffe_id = %local.workload.spiffe_id,
        outbound = %outbound_addr,
        tunnel = %tunnel_addr,
        inbound_plaintext = %inbound_addr,
        mark = format_args!("{:#x}", config.mark),
        iptables = %iptables_version,
        worker_threads = config.run.worker_threads,
        kernel_tls = %ktls.describe(),
        "sidecar started; inbound plaintext connections are reset (strict mTLS)"
    );

    let stopped = daemon::wait_for_stop().await.map_err(Error::from);
    rules.remove()?;
    info!(
        workload = %local.workload.name,
        "sidecar stopping; removed its iptables rules, so the pod's traffic is no longer intercepted"
    );
    stopped
}

/// Loads the directory and finds the sidecar's workload, placed on `--node`.
fn load_workload(config: &SidecarConfig) -> Result<(Directory, Workload), Error> {
    let path = &config.run.config;
    let directory = Directory::load(path).map_err(daemon::Error::from)?;
    let node = &config.run.node;
    if directory.node(node).is_none() {
        return Err(daemon::Error::UnknownNode {
            node: node.clone(),
            path: path.clone(),
            known: daemon::known_nodes(&directory),
        }
        .into());
    }
    let workload = directory
        .workloads
        .iter()
        .find(|workload| workload.name == config.workload)
        .ok_or_else(|| Error::UnknownWorkload {
            workload: config.workload.clone(),
            path: path.clone(),
        })?
        .clone();
    if &workload.node != node {
        return Err(Error::WrongNode {
            workload: workload.name,
            placed: workload.node,
            node: node.clone(),
        });
    }
    Ok((directory, workload))
}

/// Accepts inbound connections that the rules redirected because they are not for the
/// tunnel, and resets each at once, forever.
async fn reject_plaintext(listener: TcpListener, local: Arc<LocalWorkload>, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(workload = %local.workload.name, %error, "accepting on the inbound plaintext listener failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = shared.next_id();
        let span = info_span!(
            "conn",
            id,
            dir = "inbound-plaintext",
            workload = %local.workload.name,
            src = %peer
        );
        span.in_scope(|| reset_plaintext(stream));
    }
}

/// Resets an inbound plaintext connection and logs the denial as its close event.
fn reset_plaintext(stream: TcpStream) {
    let started = Instant::now();
    let dst = tunnel::so_original_dst(&stream)
        .map(|dst| dst.to_string())
        .unwrap_or_default();
    relay::set_reset_on_close(stream.as_raw_fd());
    drop(stream);
    info!(
        dst,
        policy = "strict-mtls",
        reason = "plaintext connection to a workload that accepts only mutual TLS",
        duration_ms = started.elapsed().as_millis() as u64,
        "connection denied"
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sidecar: SidecarConfig,
    }

    const REQUIRED: [&str; 9] = [
        "sidecar",
        "--config",
        "mesh.toml",
        "--node",
        "n1",
        "--ca-dir",
        "ca",
        "--workload",
        "n1-p1",
    ];

    fn parse(extra: &[&str]) -> Result<SidecarConfig, clap::Error> {
        let args = REQUIRED.iter().chain(extra);
        Cli::try_parse_from(args).map(|cli| cli.sidecar)
    }

    #[test]
    fn defaults_parse() {
        let config = parse(&[]).expect("parse the required flags");

        assert_eq!(config.mark, DEFAULT_MARK);
        assert_eq!(config.iptables, Path::new("iptables"));
        assert_eq!(config.run.outbound_port, 15001);
        assert_eq!(config.run.tunnel_port, 15008);
        assert_eq!(config.run.worker_threads, 2);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn daemon_flags_apply() {
        let config = parse(&["--worker-threads", "4", "--tunnel-port", "16008"])
            .expect("parse the daemon's flags");

        assert_eq!(config.run.worker_threads, 4);
        assert_eq!(config.run.tunnel_port, 16008);
    }

    #[test]
    fn mark_parses_decimal_and_hex() {
        assert_eq!(parse_mark("1337"), Ok(0x539));
        assert_eq!(parse_mark("0x539"), Ok(0x539));
        assert_eq!(parse_mark("0XFFFFFFFF"), Ok(u32::MAX));
        for text in ["", "0x", "-1", "0x1_0", "4294967296", "mark"] {
            assert!(parse_mark(text).is_err(), "accepted {text:?}");
        }
    }

    #[test]
    fn validate_reports_every_problem() {
        let config = parse(&[
            "--mark",
            "0",
            "--tunnel-port",
            "15006",
            "--worker-threads",
            "0",
        ])
        .expect("parse flags that are invalid only together");

        let problems = config.validate().expect_err("three invalid values");

        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.starts_with("--mark 0")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("--tunnel-port 15006")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("--worker-threads 0")),
            "{problems:?}"
        );
    }

    #[test]
    fn inbound_port_is_reserved() {
        let config = parse(&[]).expect("parse the required flags");

        assert!(config.run.is_reserved_port(config.run.plaintext_port));
    }
}
