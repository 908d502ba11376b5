//! `interceptor`: the node daemon of an eBPF-accelerated transparent mTLS mesh, and its
//! administrative commands.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::runtime::Runtime;
use tracing_subscriber::EnvFilter;

use interceptor::ca::{self, ServeConfig};
use interceptor::config::{parse_duration, RunConfig};
use interceptor::sidecar::{self, SidecarConfig};
use interceptor::{daemon, ebpf, identity, identity_manager, netns};

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
    /// Create a new CA (P-256 key, mode 0600) in a directory: a self-signed root, or an
    /// intermediate under an operator's root with `--root-cert` and `--root-key`.
    Init {
        /// Directory to write `ca-cert.pem` and `ca-key.pem` to; created if missing.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
        /// Trust domain whose workload identities the CA signs, e.g. `cluster.local`.
        #[arg(long)]
        trust_domain: String,
        /// The operator's root certificate (PEM) to create an intermediate under; it is
        /// copied to `root-cert.pem` and becomes the published trust bundle.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The operator's root key (PEM, mode 0600), only read to sign the intermediate.
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
    },
    /// Run the CA service: sign CSRs of node daemons over TLS (port 15012 by default).
    Serve(ServeConfig),
    /// Create a one-time join token for a node and print it (or write it to `--out`);
    /// only its hash is stored.
    Token {
        /// CA directory.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
        /// Workload directory file (TOML) that must contain the node. By default the one
        /// that `ca serve` last ran with, whose path it records in the CA directory.
        #[arg(long, env = "INTERCEPTOR_CONFIG")]
        config: Option<PathBuf>,
        /// Name of the node, as in the workload directory.
        #[arg(long)]
        node: String,
        /// File to write the token to, with mode 0600, instead of standard output; the
        /// daemon reads it with `--join-token-file`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long the token stays valid if unused, e.g. `1h`.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Print the trust bundle that the CA publishes (PEM), the signing root first.
    Bundle {
        /// CA directory.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
    },
    /// Rotate the root CA in three steps (see docs/ca-rotation.md).
    Rotate {
        #[command(subcommand)]
        step: RotateStep,
    },
}

#[derive(Subcommand, Debug)]
enum RotateStep {
    /// Create the next root and publish it next to the current one.
    Prepare {
        /// CA directory.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
    },
    /// Sign with the next root from now on; keep publishing the old one.
    Activate {
        /// CA directory.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
    },
    /// Stop publishing every root but the signing one. Rejected until `--max-lifetime`
    /// plus `--margin` has passed since `activate`, unless `--force` is given.
    Finish {
        /// CA directory.
        #[arg(long, env = "INTERCEPTOR_CA_DIR")]
        dir: PathBuf,
        /// Maximum certificate lifetime of the CA service (its `--max-lifetime`), e.g.
        /// `24h`: the longest that a certificate of the old root stays valid after
        /// `activate`.
        #[arg(long, env = "INTERCEPTOR_CA_MAX_LIFETIME", default_value = "24h", value_parser = parse_duration)]
        max_lifetime: Duration,
        /// Time added to `--max-lifetime`, at least the daemons' longest
        /// `--bundle-refresh`, e.g. `5m`.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        margin: Duration,
        /// Finish even when certificates of the old root may still be valid; new
        /// connections of workloads that present one fail until their next renewal.
        #[arg(long)]
        force: bool,
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
            match runtime.block_on(daemon::run(config)) {
                // A stop signal while the daemon waits for the CA is a normal stop.
                Err(daemon::Error::IdentityManager(identity_manager::Error::Stopped { addr })) => {
                    tracing::info!(ca = %addr, "daemon stopping before it reached the CA");
                    Ok(())
                }
                result => Ok(result?),
            }
        }
        Command::Sidecar(config) => {
            check_flags(config.validate())?;
            let runtime = runtime(config.run.netns.as_deref(), config.run.worker_threads)?;
            runtime.block_on(sidecar::run(config))?;
            Ok(())
        }
        Command::Ca { command } => execute_ca(command),
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

fn execute_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init {
            dir,
            trust_domain,
            root_cert,
            root_key,
        } => {
            let trust_domain = trust_domain
                .parse::<identity::TrustDomain>()
                .context("invalid --trust-domain")?;
            match (root_cert, root_key) {
                (Some(root_cert), Some(root_key)) => {
                    identity::CertificateAuthority::init_intermediate(
                        &dir,
                        &trust_domain,
                        &root_cert,
                        &root_key,
                    )
                    .with_context(|| format!("creating an intermediate CA in {}", dir.display()))?;
                    tracing::info!(dir = %dir.display(), %trust_domain, root = %root_cert.display(), "created an intermediate CA");
                }
                _ => {
                    identity::CertificateAuthority::init(&dir, &trust_domain)
                        .with_context(|| format!("creating a CA in {}", dir.display()))?;
                    tracing::info!(dir = %dir.display(), %trust_domain, "created CA");
                }
            }
        }
        CaCommand::Serve(config) => {
            check_flags(config.validate())?;
            let runtime = runtime(config.netns.as_deref(), config.worker_threads)?;
            runtime.block_on(ca::serve(config))?;
        }
        CaCommand::Token {
            dir,
            config,
            node,
            ttl,
            out,
        } => {
            let token = ca::create_join_token(&dir, config.as_deref(), &node, ttl)
                .with_context(|| format!("creating a join token for node {node}"))?;
            match out {
                Some(out) => {
                    ca::tokens::write_token_file(&out, &token)
                        .with_context(|| format!("writing the join token for node {node}"))?;
                    tracing::info!(%node, valid_for = ?ttl, file = %out.display(), "created a one-time join token");
                }
                None => {
                    tracing::info!(%node, valid_for = ?ttl, "created a one-time join token");
                    println!("{token}");
                }
            }
        }
        CaCommand::Bundle { dir } => {
            let loaded = ca::store::load(&dir)?;
            print!("{}", ca::store::to_pem(&loaded.bundle));
        }
        CaCommand::Rotate { step } => match step {
            RotateStep::Prepare { dir } => {
                let next = ca::store::prepare_rotation(&dir)?;
                tracing::info!(next = %next.display(), "prepared the next root and published it; wait at least one --bundle-refresh of the daemons, then run `interceptor ca rotate activate`");
            }
            RotateStep::Activate { dir } => {
                ca::store::activate_rotation(&dir, SystemTime::now())?;
                tracing::info!("the next root signs from now on and the old root stays published; wait at least the longest SVID lifetime plus one --bundle-refresh, then run `interceptor ca rotate finish`");
            }
            RotateStep::Finish {
                dir,
                max_lifetime,
                margin,
                force,
            } => {
                ca::store::finish_rotation(&dir, SystemTime::now(), max_lifetime + margin, force)?;
                tracing::info!("only the signing root is published now; daemons drop the old root at their next bundle refresh");
            }
        },
    }
    Ok(())
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
