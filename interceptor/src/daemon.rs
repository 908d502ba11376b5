//! `interceptor run`: brings up one node's share of the mesh and serves it until a
//! signal stops it.
//!
//! Order matters for failing closed. The directory, the node, the policies and the CA
//! are checked first: with `--ca-addr` the daemon authenticates to the CA service and
//! fetches the trust bundle (see [`crate::identity_manager`]), with `--ca-dir` it loads
//! the CA key. Then each local workload gets its namespace thread, SVID and listeners.
//! Only then are the programs attached and the workloads enrolled, so an enrolled pod
//! never finds its listener missing while the daemon runs. On exit the pinned programs
//! stay, and enrolled pods' connects and inbound connections fail until a daemon is
//! back.

#![allow(clippy::result_large_err)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use interceptor_common::{EnrolledCgroup, ListenerKey, LISTENER_PLAINTEXT, LISTENER_TUNNEL};
use tokio::net::TcpListener;
use tracing::{info, warn, Instrument};

use crate::admin;
use crate::config::{KernelTls, RunConfig, DELIVERY_MARK};
use crate::ebpf::{self, NodePrograms, PodNetns};
use crate::identity::CertificateAuthority;
use crate::identity_manager::Manager;
use crate::inbound;
use crate::ktls;
use crate::netns::Netns;
use crate::policy::{self, Policies, PolicyStore, PolicyWatcher, DEFAULT_ROOT_NAMESPACE};
use crate::rejections;
use crate::relay::BufferPool;
use crate::tls::TunnelOptions;
use crate::tunnel::{self, LocalWorkload, OrigDstSource, Shared, TlsConfigs};
use crate::workloads::{Directory, Registry, Workload};

/// How often the daemon checks the `--policies` files for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Listen backlog of the in-pod listeners.
pub(crate) const BACKLOG: i32 = 1024;
/// Relay buffers kept for reuse when traffic drops.
pub(crate) const POOLED_BUFFERS: usize = 256;

/// Errors that stop the daemon. They occur only at start, never per connection, so
/// their size does not matter (hence `result_large_err` is allowed in this module).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Directory(#[from] crate::workloads::Error),
    #[error("node {node:?} not found in the workload directory {path}; its nodes are: {known}")]
    UnknownNode {
        node: String,
        path: PathBuf,
        known: String,
    },
    #[error("this mode signs SVIDs itself and needs --ca-dir")]
    MissingCaDir,
    #[error("obtaining this node's identities from the CA service failed")]
    IdentityManager(#[source] crate::identity_manager::Error),
    #[error("loading the CA failed")]
    Ca {
        path: PathBuf,
        #[source]
        source: crate::identity::Error,
    },
    #[error(
        "the CA in {path} is for trust domain {ca}, but the workload directory says {directory}"
    )]
    TrustDomainMismatch {
        path: PathBuf,
        ca: String,
        directory: String,
    },
    #[error(transparent)]
    Ebpf(#[from] ebpf::Error),
    #[error("the daemon runs in cgroup {cgroup}, inside node cgroup {node_cgroup}: start it outside the node's cgroup so its own sockets are never redirected")]
    DaemonInNodeCgroup {
        cgroup: String,
        node_cgroup: PathBuf,
    },
    #[error("workload {workload}: setting up its network namespace failed")]
    Netns {
        workload: String,
        #[source]
        source: crate::netns::Error,
    },
    #[error("workload {workload}: issuing its SVID failed")]
    Issue {
        workload: String,
        #[source]
        source: crate::identity::Error,
    },
    #[error("workload {workload}: building its TLS configuration failed")]
    Tls {
        workload: String,
        #[source]
        source: crate::tls::Error,
    },
    #[error("workload {workload}: preparing its namespace for inbound delivery failed")]
    Delivery {
        workload: String,
        #[source]
        source: inbound::SetupError,
    },
    #[error("loading policies from {path} failed")]
    Policies {
        path: PathBuf,
        #[source]
        source: crate::policy::Error,
    },
    #[error("workload {workload}: listening on {addr} failed")]
    Listen {
        workload: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listening for the admin endpoint on {addr} failed")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for a stop signal failed")]
    Signal(#[source] std::io::Error),
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: RunConfig) -> Result<(), Error> {
    let directory = Directory::load(&config.config)?;
    let node = directory
        .node(&config.node)
        .ok_or_else(|| Error::UnknownNode {
            node: config.node.clone(),
            path: config.config.clone(),
            known: known_nodes(&directory),
        })?
        .clone();
    let policy_watcher = config
        .policies
        .as_ref()
        .map(|path| {
            PolicyWatcher::load(path, DEFAULT_ROOT_NAMESPACE).map_err(|source| Error::Policies {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;

    let (ktls, options) = tunnel_options(&config);
    let identities = match config.ca_addr {
        Some(addr) => {
            let manager = Manager::start(&config, addr, &directory.trust_domain, &options)
                .await
                .map_err(Error::IdentityManager)?;
            Identities::Service(Arc::new(manager))
        }
        None => Identities::Local(Arc::new(load_ca(&config, &directory)?)),
    };

    let cgroup2 = ebpf::cgroup2_mount()?;
    check_own_cgroup(&node.cgroup)?;
    let node_cgroup = cgroup2.join(&node.cgroup);
    ebpf::cgroup_id(&node_cgroup)?;

    let mut locals = Vec::new();
    let mut enrolled = Vec::new();
    let mut outbound_exclusions = Vec::new();
    let mut inbound_pods = Vec::new();
    let mut pod_netns = Vec::new();
    let mut listeners = Vec::new();
    for workload in directory.on_node(&node.name) {
        let local = prepare_workload(workload, &identities, &config, &options).await?;
        let cgroup_id = ebpf::cgroup_id(&cgroup2.join(&workload.cgroup))?;
        enrolled.push((
            cgroup_id,
            EnrolledCgroup {
                netns_cookie: local.netns.cookie(),
                redirect_addr_be: u32::from(Ipv4Addr::LOCALHOST).to_be(),
                redirect_port_be: config.outbound_port.to_be(),
                _pad: 0,
            },
        ));
        let outbound = listen(
            &local,
            SocketAddr::from((Ipv4Addr::LOCALHOST, config.outbound_port)),
        )
        .await?;
        let tunnel = listen(&local, SocketAddr::from((workload.ip, config.tunnel_port))).await?;
        let plaintext = listen(
            &local,
            SocketAddr::from((workload.ip, config.plaintext_port)),
        )
        .await?;
        inbound::setup_delivery_routing(&workload.netns).map_err(|source| Error::Delivery {
            workload: workload.name.clone(),
            source,
        })?;
        outbound_exclusions.push((cgroup_id, inbound::exclusions(&workload.outbound_exclude)));
        inbound_pods.push((
            u32::from(workload.ip).to_be(),
            inbound::pod_entry(workload, &node, config.tunnel_port),
        ));
        pod_netns.push(PodNetns {
            path: workload.netns.clone(),
            cookie: local.netns.cookie(),
        });
        listeners.push((Arc::clone(&local), outbound, tunnel, plaintext));
        locals.push(local);
    }

    let programs = Arc::new(NodePrograms::install(
        &config.bpffs,
        &node.name,
        &node_cgroup,
        &pod_netns,
    )?);
    for (local, _, tunnel, plaintext) in &listeners {
        let pod_addr_be = u32::from(local.workload.ip).to_be();
        for (kind, listener) in [(LISTENER_TUNNEL, tunnel), (LISTENER_PLAINTEXT, plaintext)] {
            programs.add_listener(ListenerKey { pod_addr_be, kind }, listener)?;
        }
    }
    programs.set_outbound_exclusions(&outbound_exclusions)?;
    programs.set_inbound(&inbound_pods)?;
    programs.set_enrolled(&enrolled)?;
    let rejection_maps = programs.take_rejection_maps();
    info!(
        node = %node.name,
        cgroup = %node_cgroup.display(),
        pins = %ebpf::pin_dir(&config.bpffs, &node.name).display(),
        workloads = locals.len(),
        policies = %config.policies.as_deref().map_or("none".into(), Path::to_string_lossy),
        kernel_tls = %ktls.describe(),
        "daemon started"
    );

    let registry = Arc::new(Registry::new(directory));
    let mut shared = Shared::new(
        config.clone(),
        registry,
        OrigDstSource::Ebpf(Arc::clone(&programs)),
        BufferPool::new(POOLED_BUFFERS),
        ktls,
    );
    shared.delivery = Some(inbound::Delivery {
        mark: DELIVERY_MARK,
        programs,
    });
    shared.policies = match &policy_watcher {
        Some(watcher) => watcher.store(),
        None => Arc::new(PolicyStore::new(Policies::empty(DEFAULT_ROOT_NAMESPACE))),
    };
    let shared = Arc::new(shared);
    if let Some(maps) = rejection_maps {
        tokio::spawn(rejections::watch(
            maps,
            locals.clone(),
            Arc::clone(&shared.metrics),
        ));
    }
    if let Some(watcher) = policy_watcher {
        if config.policy_reload_cuts_denied {
            tokio::spawn(policy::cut_denied_on_reload(
                watcher.store(),
                Arc::clone(&shared.open),
            ));
        }
        tokio::spawn(watcher.run(POLICY_POLL_INTERVAL));
    }
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .map_err(|source| Error::Admin {
            addr: config.admin_addr,
            source,
        })?;
    tokio::spawn(admin::serve(
        admin,
        Arc::clone(&shared.metrics),
        shared.ktls.clone(),
    ));
    for (local, outbound, tunnel, plaintext) in listeners {
        info!(
            workload = %local.workload.name,
            spiffe_id = %local.workload.spiffe_id,
            ip = %local.workload.ip,
            inbound_mode = local.workload.inbound_mode.as_str(),
            "workload enrolled"
        );
        tokio::spawn(inbound::serve_plaintext(
            plaintext,
            Arc::clone(&local),
            Arc::clone(&shared),
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
        if let Identities::Local(ca) = &identities {
            let span = tracing::info_span!("renew", workload = %local.workload.name);
            tokio::spawn(
                renew_svids(local, Arc::clone(ca), config.svid_lifetime, options.clone())
                    .instrument(span),
            );
        }
    }
    if let Identities::Service(manager) = &identities {
        manager.spawn(&locals, &shared.metrics);
    }

    wait_for_stop().await?;
    info!(
        node = %node.name,
        "daemon stopping; the eBPF programs stay attached, so enrolled pods' connects fail until a daemon is back (`interceptor uninstall` removes them)"
    );
    Ok(())
}

/// The source of the daemon's SVIDs.
enum Identities {
    /// Single-host mode (`--ca-dir`): the daemon loads the CA key and signs itself.
    Local(Arc<CertificateAuthority>),
    /// The CA service (`--ca-addr`).
    Service(Arc<Manager>),
}

/// Returns the names of the directory's nodes, for an error about an unknown one.
pub(crate) fn known_nodes(directory: &Directory) -> String {
    let names: Vec<&str> = directory.nodes.iter().map(|n| n.name.as_str()).collect();
    names.join(", ")
}

/// Loads the CA from `--ca-dir` and checks that it signs for the directory's trust
/// domain.
pub(crate) fn load_ca(
    config: &RunConfig,
    directory: &Directory,
) -> Result<CertificateAuthority, Error> {
    let ca_dir = config.ca_dir.as_ref().ok_or(Error::MissingCaDir)?;
    let ca = CertificateAuthority::load(ca_dir).map_err(|source| Error::Ca {
        path: ca_dir.clone(),
        source,
    })?;
    if ca.trust_domain() != &directory.trust_domain {
        return Err(Error::TrustDomainMismatch {
            path: ca_dir.clone(),
            ca: ca.trust_domain().to_string(),
            directory: directory.trust_domain.to_string(),
        });
    }
    Ok(ca)
}

/// Decides, from `--kernel-tls` and a probe of the kernel, what kernel TLS carries, and
/// the tunnel TLS options that follow.
pub(crate) fn tunnel_options(config: &RunConfig) -> (ktls::Support, TunnelOptions) {
    let ktls = match config.kernel_tls {
        KernelTls::Auto => ktls::probe(),
        KernelTls::Off => ktls::Support::none("turned off with --kernel-tls off"),
    };
    let options = TunnelOptions {
        kernel_tls: ktls.any(),
        record_limit: config.tls_record_limit,
    };
    (ktls, options)
}

/// Refuses to run inside the node's cgroup subtree, where the connect hooks would see
/// the daemon's own sockets.
fn check_own_cgroup(node_cgroup: &Path) -> Result<(), Error> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // cgroup v2 line: "0::/path"
    let Some(path) = own.lines().find_map(|line| line.strip_prefix("0::")) else {
        return Ok(());
    };
    let relative = Path::new(path.trim_start_matches('/'));
    if relative.starts_with(node_cgroup) {
        return Err(Error::DaemonInNodeCgroup {
            cgroup: path.to_owned(),
            node_cgroup: node_cgroup.to_owned(),
        });
    }
    Ok(())
}

async fn prepare_workload(
    workload: &Workload,
    identities: &Identities,
    config: &RunConfig,
    options: &TunnelOptions,
) -> Result<Arc<LocalWorkload>, Error> {
    let netns = Netns::spawn(&workload.netns, None).map_err(|source| Error::Netns {
        workload: workload.name.clone(),
        source,
    })?;
    let tls = match identities {
        Identities::Local(ca) => issue_tls(workload, ca, config.svid_lifetime, options)?,
        Identities::Service(manager) => manager
            .issue(workload)
            .await
            .map_err(Error::IdentityManager)?,
    };
    Ok(Arc::new(LocalWorkload {
        workload: workload.clone(),
        netns,
        tls: RwLock::new(Arc::new(tls)),
    }))
}

/// Issues a fresh SVID for `workload` and builds both TLS configurations from it.
pub(crate) fn issue_tls(
    workload: &Workload,
    ca: &CertificateAuthority,
    lifetime: Duration,
    options: &TunnelOptions,
) -> Result<TlsConfigs, Error> {
    let svid = ca
        .issue(&workload.spiffe_id, lifetime)
        .map_err(|source| Error::Issue {
            workload: workload.name.clone(),
            source,
        })?;
    let bundle = ca.trust_bundle();
    let tls_error = |source| Error::Tls {
        workload: workload.name.clone(),
        source,
    };
    Ok(TlsConfigs {
        client: crate::tls::client_config_with(&svid, &bundle, options).map_err(tls_error)?,
        server: crate::tls::server_config_with(&svid, &bundle, options).map_err(tls_error)?,
        serial: svid.serial.clone(),
        not_after: svid.not_after,
    })
}

pub(crate) async fn listen(local: &LocalWorkload, addr: SocketAddr) -> Result<TcpListener, Error> {
    let listen_error = |source| Error::Listen {
        workload: local.workload.name.clone(),
        addr,
        source,
    };
    let listener = local
        .netns
        .listen(addr, BACKLOG)
        .await
        .map_err(listen_error)?;
    TcpListener::from_std(listener).map_err(listen_error)
}

/// Renews `local`'s SVID at half its lifetime, forever. Connections opened after a
/// renewal present the new certificate; open ones keep their session.
pub(crate) async fn renew_svids(
    local: Arc<LocalWorkload>,
    ca: Arc<CertificateAuthority>,
    lifetime: Duration,
    options: TunnelOptions,
) {
    let mut retry = Duration::from_secs(1);
    let mut next = lifetime / 2;
    loop {
        tokio::time::sleep(next).await;
        match issue_tls(&local.workload, &ca, lifetime, &options) {
            Ok(tls) => {
                info!(serial = %tls.serial, valid_for = ?lifetime, "renewed SVID");
                match local.tls.write() {
                    Ok(mut guard) => *guard = Arc::new(tls),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(tls),
                }
                retry = Duration::from_secs(1);
                next = lifetime / 2;
            }
            Err(error) => {
                warn!(error = %error, retry_in = ?retry, "renewing SVID failed; the current one stays in use");
                next = retry;
                retry = (retry * 2).min(lifetime / 4).max(Duration::from_secs(1));
            }
        }
    }
}

pub(crate) async fn wait_for_stop() -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.map_err(Error::Signal),
        _ = terminate.recv() => Ok(()),
    }
}
