//! `interceptor`: the node daemon of an eBPF-accelerated transparent mTLS mesh, and its
//! administrative commands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::runtime::Runtime;
use tracing_subscriber::EnvFilter;

use interceptor::config::RunConfig;
use interceptor::sidecar::{self, SidecarConfig};
use interceptor::{daemon, ebpf, identity, netns};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Transparent mutual-TLS interceptor for a service mesh, without iptables or sidecars \
             (a classic sidecar mode is kept as a benchmark baseline)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node daemon: attach the eBPF programs, enroll this node's workloads and
    /// carry their TCP connections over mutual TLS.
    Run(RunConfig),
    /// Run the classic sidecar baseline for one pod, inside the pod's network
    /// namespace: iptables REDIRECT rules send the pod's TCP connections to it, and it
    /// carries them over the same mutual TLS tunnel as `run`.
    Sidecar(SidecarConfig),
    /// Manage the certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Remove a node's pinned eBPF programs and maps, ending interception (and its
    /// fail-closed guard) for that node's pods.
    Uninstall {
        /// Name of the node whose pins to remove.
        #[arg(long, env = "INTERCEPTOR_NODE")]
        node: String,
        /// Mount point of the bpffs holding the pins.
        #[arg(long, env = "INTERCEPTOR_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a new root CA (P-256 key, mode 0600) in a directory.
    Init {
        /// Directory to write `ca-cert.pem` and `ca-key.pem` to; created if missing.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
        /// Trust domain whose workload identities the CA signs, e.g. `cluster.local`.
        #[arg(long)]
        trust_domain: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("INTERCEPTOR_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(config) => {
            check_flags(config.validate())?;
            let runtime = runtime(config.netns.as_deref(), config.worker_threads)?;
            runtime.block_on(daemon::run(config))?;
            Ok(())
        }
        Command::Sidecar(config) => {
            check_flags(config.validate())?;
            let runtime = runtime(config.run.netns.as_deref(), config.run.worker_threads)?;
            runtime.block_on(sidecar::run(config))?;
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            let trust_domain = trust_domain
                .parse::<identity::TrustDomain>()
                .context("invalid --trust-domain")?;
            identity::CertificateAuthority::init(&dir, &trust_domain)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), %trust_domain, "created CA");
            Ok(())
        }
        Command::Uninstall { node, bpffs } => {
            if ebpf::uninstall(&bpffs, &node)? {
                tracing::info!(%node, "removed the node's pinned programs and maps");
            } else {
                tracing::info!(%node, "nothing to remove: no pins for this node");
            }
            Ok(())
        }
    }
}

fn check_flags(validated: Result<(), Vec<String>>) -> anyhow::Result<()> {
    if let Err(problems) = validated {
        anyhow::bail!("invalid flags:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// Enters `netns` when one is given, then builds the async runtime that `run` and
/// `sidecar` share.
fn runtime(netns: Option<&Path>, worker_threads: usize) -> anyhow::Result<Runtime> {
    // Threads inherit the namespace of the thread that creates them, so the runtime's
    // workers start in the namespace entered here.
    if let Some(netns) = netns {
        netns::enter(netns)
            .with_context(|| format!("entering network namespace {}", netns.display()))?;
    }
    raise_open_file_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Raises the soft limit on open files to the hard limit: a proxy holds about two
/// descriptors per proxied connection (the app's and the tunnel's socket), and the
/// usual soft limit of 1024 would cap it near 500 connections.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is valid for writes of a `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "reading the open-file limit failed");
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        tracing::info!(
            limit = limit.rlim_cur,
            "open-file limit already at its hard limit"
        );
        return;
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid `rlimit` for reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "raising the open-file limit failed");
        return;
    }
    tracing::info!(
        from = before,
        to = limit.rlim_max,
        "raised the open-file limit to its hard limit"
    );
}
