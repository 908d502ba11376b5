//! `interceptor ca serve`: the certificate authority as a service, which node daemons
//! call over TLS (port 15012 by default) to attest their node, have CSRs signed and
//! fetch the trust bundle.
//!
//! The API is gRPC (tonic and prost), defined in `proto/ca.proto`. Its
//! `CreateCertificate` call has the shape of Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: a PEM CSR and a requested
//! validity in, a PEM chain out. gRPC gives deadlines, status codes and HTTP/2
//! connection reuse without a framing of our own, and operators of Istio know the call.
//!
//! Every call runs over TLS 1.3. The service presents a certificate for
//! `spiffe://<trust-domain>/ca` signed by the current root. A node proves which node it
//! is once, with a one-time join token ([`tokens`]), in exchange for a node SVID
//! `spiffe://<trust-domain>/node/<name>`. Every later call presents that SVID as the
//! TLS client certificate, and the service signs only CSRs for that node's own ID or for
//! workloads that the workload directory places on that node ([`csr::authorize`]).
//!
//! The service rereads the CA directory ([`store`]) and the workload directory every
//! `--reload-interval`, so root rotation steps, new join tokens and directory edits take
//! effect without a restart.

pub mod client;
pub mod csr;
mod files;
mod service;
pub mod store;
pub mod tokens;

/// Code that tonic-prost-build generates from `proto/ca.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("interceptor.ca.v1");
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Args;
use rustls::pki_types::PrivateKeyDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::config::parse_duration;
use crate::identity::{self, LeafUsage};
use crate::workloads::Directory;
use proto::certificate_service_server::CertificateServiceServer;
use service::{Service, Snapshot};

/// Validity of the CA service's own TLS certificate. The service issues a new one at
/// half this lifetime and after every change of the signing root.
const SERVICE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Time a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the gRPC server.
const ACCEPT_QUEUE: usize = 64;
/// File in the CA directory with the path of the workload directory that `ca serve`
/// last ran with, so `ca token` can check node names without `--config`.
pub const DIRECTORY_PATH_FILE: &str = "workload-directory.path";

/// Errors that stop the CA service or a `ca` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Directory(#[from] crate::workloads::Error),
    #[error(
        "the CA in {path} is for trust domain {ca}, but the workload directory says {directory}"
    )]
    TrustDomainMismatch {
        path: PathBuf,
        ca: String,
        directory: String,
    },
    #[error("issuing the CA service's TLS certificate failed")]
    ServiceCertificate(#[source] identity::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("listening on {addr} failed")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("waiting for a stop signal failed")]
    Signal(#[source] std::io::Error),
    #[error("node {node:?} is not in the workload directory {path} (known nodes: {known}): add it there, or check the name")]
    UnknownNode {
        node: String,
        path: PathBuf,
        known: String,
    },
    #[error("no workload directory to check node {node:?} against: give --config FILE, or run `interceptor ca serve --dir {}` once, which records the path of its --config", dir.display())]
    NoDirectory { node: String, dir: PathBuf },
    #[error(transparent)]
    Token(#[from] tokens::Error),
    #[error("recording the workload directory path in {path} failed")]
    RecordDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Flags of `interceptor ca serve`.
#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    /// CA directory, as written by `interceptor ca init`.
    #[arg(long, env = "INTERCEPTOR_CA_DIR")]
    pub dir: PathBuf,

    /// Workload directory file (TOML), the same file the node daemons read. It decides
    /// which node may receive which workload identity.
    #[arg(long, env = "INTERCEPTOR_CONFIG")]
    pub config: PathBuf,

    /// Address to listen on for node daemons.
    #[arg(long, env = "INTERCEPTOR_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Network namespace to run the service in (a file such as `/run/netns/ca`); by
    /// default the one it was started in.
    #[arg(long, env = "INTERCEPTOR_NETNS")]
    pub netns: Option<PathBuf>,

    /// Validity of a certificate whose request gives none, e.g. `1h`.
    #[arg(long, env = "INTERCEPTOR_CA_DEFAULT_LIFETIME", default_value = "1h", value_parser = parse_duration)]
    pub default_lifetime: Duration,

    /// Maximum validity of any certificate, whatever a request gives, e.g. `24h`.
    #[arg(long, env = "INTERCEPTOR_CA_MAX_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub max_lifetime: Duration,

    /// Interval at which the service rereads the CA directory and the workload
    /// directory, e.g. `1s`.
    #[arg(long, env = "INTERCEPTOR_CA_RELOAD_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// Number of async worker threads.
    #[arg(long, env = "INTERCEPTOR_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
}

impl ServeConfig {
    /// Checks values that depend on each other; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (flag, value) in [
            ("--default-lifetime", self.default_lifetime),
            ("--max-lifetime", self.max_lifetime),
            ("--reload-interval", self.reload_interval),
        ] {
            if value < Duration::from_secs(1) {
                problems.push(format!("{flag} {value:?}: must be at least 1s"));
            }
        }
        if self.default_lifetime > self.max_lifetime {
            problems.push(format!(
                "--default-lifetime {:?}: must not exceed --max-lifetime {:?}",
                self.default_lifetime, self.max_lifetime
            ));
        }
        if self.worker_threads == 0 {
            problems.push("--worker-threads 0: must be at least 1".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Runs the CA service until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<(), Error> {
    let snapshot = read_snapshot(&config)?;
    record_directory_path(&config.dir, &config.config)?;
    let trust_domain = snapshot.loaded.ca.trust_domain().clone();
    let roots = snapshot.loaded.bundle.len();
    let tls = Arc::new(RwLock::new(service_tls(&snapshot)?));
    let snapshot = Arc::new(RwLock::new(Arc::new(snapshot)));

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    info!(
        listen = %config.listen,
        dir = %config.dir.display(),
        trust_domain = %trust_domain,
        roots,
        "CA service started"
    );

    tokio::spawn(
        reload(config.clone(), Arc::clone(&snapshot), Arc::clone(&tls))
            .instrument(tracing::info_span!("reload")),
    );
    let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE);
    tokio::spawn(
        accept(listener, Arc::clone(&tls), sender).instrument(tracing::info_span!("accept")),
    );

    let service = Service {
        dir: config.dir.clone(),
        snapshot,
        default_lifetime: config.default_lifetime,
        max_lifetime: config.max_lifetime,
    };
    let incoming = tokio_stream::wrappers::ReceiverStream::new(receiver);
    tonic::transport::Server::builder()
        .add_service(CertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async {
            if let Err(error) = crate::daemon::wait_for_stop().await {
                warn!(error = %error, "waiting for a stop signal failed; stopping");
            }
        })
        .await
        .map_err(Error::Serve)?;
    info!("CA service stopping");
    Ok(())
}

/// Reads the CA directory and the workload directory and checks that they agree on
/// the trust domain.
fn read_snapshot(config: &ServeConfig) -> Result<Snapshot, Error> {
    let loaded = store::load(&config.dir)?;
    let directory = Directory::load(&config.config)?;
    if loaded.ca.trust_domain() != &directory.trust_domain {
        return Err(Error::TrustDomainMismatch {
            path: config.dir.clone(),
            ca: loaded.ca.trust_domain().to_string(),
            directory: directory.trust_domain.to_string(),
        });
    }
    Ok(Snapshot { loaded, directory })
}

/// Writes the absolute path of the workload directory file to the CA directory.
fn record_directory_path(dir: &Path, directory: &Path) -> Result<(), Error> {
    let path = dir.join(DIRECTORY_PATH_FILE);
    let record_error = |source| Error::RecordDirectory {
        path: path.clone(),
        source,
    };
    let absolute = std::path::absolute(directory).map_err(record_error)?;
    let text = format!("{}\n", absolute.display());
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    std::fs::write(&path, text).map_err(record_error)
}

/// Creates a join token for `node` after checking that the workload directory places
/// the node: the file `directory`, or else the one that `ca serve` recorded in `dir`.
pub fn create_join_token(
    dir: &Path,
    directory: Option<&Path>,
    node: &str,
    ttl: Duration,
) -> Result<String, Error> {
    let loaded = store::load(dir)?;
    let directory_path = match directory {
        Some(path) => path.to_owned(),
        None => match std::fs::read_to_string(dir.join(DIRECTORY_PATH_FILE)) {
            Ok(text) if !text.trim().is_empty() => PathBuf::from(text.trim()),
            _ => {
                return Err(Error::NoDirectory {
                    node: node.to_owned(),
                    dir: dir.to_owned(),
                })
            }
        },
    };
    let workloads = Directory::load(&directory_path)?;
    if workloads.node(node).is_none() {
        let known: Vec<&str> = workloads.nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(Error::UnknownNode {
            node: node.to_owned(),
            path: directory_path,
            known: known.join(", "),
        });
    }
    if loaded.ca.trust_domain() != &workloads.trust_domain {
        return Err(Error::TrustDomainMismatch {
            path: dir.to_owned(),
            ca: loaded.ca.trust_domain().to_string(),
            directory: workloads.trust_domain.to_string(),
        });
    }
    Ok(tokens::create(dir, loaded.ca.trust_domain(), node, ttl)?)
}

/// Issues the service's own certificate from the signing root and builds the server
/// configuration that trusts the whole bundle for client certificates.
fn service_tls(snapshot: &Snapshot) -> Result<Arc<rustls::ServerConfig>, Error> {
    let ca = &snapshot.loaded.ca;
    let uri = identity::ca_service_id(ca.trust_domain());
    let (chain, key) = ca
        .issue_leaf(&uri, LeafUsage::CaService, SERVICE_CERT_LIFETIME)
        .map_err(Error::ServiceCertificate)?;
    Ok(crate::tls::ca_server_config(
        chain,
        PrivateKeyDer::Pkcs8(key),
        &snapshot.loaded.bundle,
    )?)
}

/// Returns the bytes of every file a snapshot depends on, to notice changes cheaply.
fn fingerprint(config: &ServeConfig) -> Vec<u8> {
    let files = [
        config.dir.join(identity::CA_CERT_FILE),
        config.dir.join(identity::CA_KEY_FILE),
        config.dir.join(store::BUNDLE_FILE),
        config.config.clone(),
    ];
    let mut bytes = Vec::new();
    for file in files {
        bytes.extend(std::fs::read(&file).unwrap_or_default());
        bytes.push(0);
    }
    bytes
}

/// Rereads the CA directory and the workload directory every `--reload-interval` and
/// replaces the snapshot and the service certificate when they changed. A failed reload
/// keeps the previous state and is logged once per distinct error.
async fn reload(
    config: ServeConfig,
    snapshot: Arc<RwLock<Arc<Snapshot>>>,
    tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
) {
    let mut last = fingerprint(&config);
    let mut issued = Instant::now();
    let mut last_error = String::new();
    let mut ticker = tokio::time::interval(config.reload_interval);
    loop {
        ticker.tick().await;
        let current = fingerprint(&config);
        if current == last && issued.elapsed() < SERVICE_CERT_LIFETIME / 2 {
            continue;
        }
        let result = read_snapshot(&config).and_then(|next| Ok((service_tls(&next)?, next)));
        match result {
            Ok((server_config, next)) => {
                info!(
                    roots = next.loaded.bundle.len(),
                    signer_serial = %identity::serial_of(next.loaded.ca.certificate()).unwrap_or_default(),
                    workloads = next.directory.workloads.len(),
                    "reloaded the CA and workload directories"
                );
                replace(&tls, server_config);
                replace(&snapshot, Arc::new(next));
                last = current;
                issued = Instant::now();
                last_error.clear();
            }
            Err(error) => {
                let message = format!("{error:#}");
                if message != last_error {
                    warn!(error = %message, "reloading failed; the previous CA state stays in use");
                    last_error = message;
                }
            }
        }
    }
}

fn replace<T>(slot: &RwLock<Arc<T>>, value: Arc<T>) {
    match slot.write() {
        Ok(mut guard) => *guard = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// Accepts TCP connections, runs their TLS handshakes with the current server
/// configuration and hands finished ones to the gRPC server.
async fn accept(
    listener: TcpListener,
    tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    sender: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(error = %error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = match tls.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        let sender = sender.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(stream))
                    .await;
            match handshake {
                Ok(Ok(stream)) => {
                    let _ = sender.send(Ok(stream)).await;
                }
                Ok(Err(error)) => {
                    debug!(%peer, error = %error, "TLS handshake with a CA client failed")
                }
                Err(_) => debug!(%peer, "TLS handshake with a CA client timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TestDir;
    use crate::identity::{CertificateAuthority, TrustDomain};

    const DIRECTORY: &str = r#"
trust_domain = "td.test"

[[nodes]]
name = "n1"
cgroup = "interceptor/n1"

[[nodes]]
name = "n2"
cgroup = "interceptor/n2"
"#;

    /// Creates a CA and a workload directory file in `dir` and returns their paths.
    fn ca_and_directory(dir: &TestDir) -> (PathBuf, PathBuf) {
        let ca_dir = dir.path().join("ca");
        let td: TrustDomain = "td.test".parse().expect("parse the trust domain");
        CertificateAuthority::init(&ca_dir, &td).expect("create the CA");
        let directory = dir.path().join("mesh.toml");
        std::fs::write(&directory, DIRECTORY).expect("write the workload directory");
        (ca_dir, directory)
    }

    #[test]
    fn token_for_unknown_node_rejected() {
        let dir = TestDir::new("ca-token-unknown");
        let (ca_dir, directory) = ca_and_directory(&dir);

        let result =
            create_join_token(&ca_dir, Some(&directory), "nosuch", Duration::from_secs(60));

        let error = result.expect_err("a token for a node outside the directory");
        assert!(matches!(error, Error::UnknownNode { .. }), "{error:?}");
        assert!(error.to_string().contains("known nodes: n1, n2"), "{error}");
        assert!(
            !ca_dir.join(tokens::TOKEN_DIR).join("nosuch").exists(),
            "a token file was written"
        );
    }

    #[test]
    fn token_uses_recorded_directory() {
        let dir = TestDir::new("ca-token-recorded");
        let (ca_dir, directory) = ca_and_directory(&dir);

        let missing = create_join_token(&ca_dir, None, "n1", Duration::from_secs(60));
        assert!(
            matches!(missing, Err(Error::NoDirectory { .. })),
            "{missing:?}"
        );

        record_directory_path(&ca_dir, &directory).expect("record the path");
        create_join_token(&ca_dir, None, "n1", Duration::from_secs(60))
            .expect("a token for a known node");
        let unknown = create_join_token(&ca_dir, None, "n3", Duration::from_secs(60));
        assert!(
            matches!(unknown, Err(Error::UnknownNode { .. })),
            "{unknown:?}"
        );
    }
}
