//! The node daemon's side of the CA service: a gRPC client over TLS, and the node state
//! directory that keeps the node SVID and the last trust bundle across restarts.
//!
//! Private keys are generated here and only CSRs leave the process. The one exception is
//! the node key, which is written to the state directory (mode 0600) so that a restarted
//! daemon authenticates with its node SVID instead of a new join token.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::files;
use super::proto::certificate_service_client::CertificateServiceClient;
use super::proto::{AttestNodeRequest, CreateCertificateRequest, TrustBundleRequest};
use super::tokens;
use crate::identity::{self, NodeId, TrustDomain};

/// Time allowed to open the TCP connection and finish the TLS handshake with the CA.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// File of the node's private key (PKCS #8 PEM, mode 0600) in the state directory.
pub const NODE_KEY_FILE: &str = "node-key.pem";
/// File of the node SVID (PEM) in the state directory.
pub const NODE_CERT_FILE: &str = "node-cert.pem";
/// File of the last trust bundle fetched from the CA (PEM) in the state directory.
pub const BUNDLE_FILE: &str = "trust-bundle.pem";

/// Errors of calls to the CA service and of the node state directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the TLS configuration for the CA at {addr} failed")]
    Tls {
        addr: SocketAddr,
        /// Boxed, like the other large sources, so that `Error` stays small.
        #[source]
        source: Box<crate::tls::Error>,
    },
    #[error("the CA at {addr} rejected {call}: {message} ({code:?})")]
    Rejected {
        addr: SocketAddr,
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("calling {call} on the CA at {addr} failed: {message}. Check that `interceptor ca serve` runs at that address, that --ca-addr is right and that this node has a route to it")]
    Unavailable {
        addr: SocketAddr,
        call: &'static str,
        message: String,
    },
    #[error("the TLS handshake with the CA at {addr} failed in {call}: {message}. Check that --ca-trust-bundle (or trust-bundle.pem in the state directory) contains the CA's root and that the CA serves the trust domain of the workload directory")]
    Handshake {
        addr: SocketAddr,
        call: &'static str,
        message: String,
    },
    #[error("invalid response of the CA at {addr}: {reason}")]
    InvalidResponse { addr: SocketAddr, reason: String },
    #[error(transparent)]
    Identity(#[from] identity::Error),
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    PrivateFile(Box<tokens::Error>),
    #[error("invalid PEM in {path}: {reason}")]
    InvalidPem { path: PathBuf, reason: String },
}

impl Error {
    /// Returns whether the CA could not be reached, as opposed to a rejection or a failed
    /// TLS handshake, which retrying does not fix.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

/// A certificate chain that the CA signed, with the private key the daemon generated.
#[derive(Debug)]
pub struct Issued {
    /// The leaf first, without the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub not_after: SystemTime,
    /// Serial number of the leaf in lowercase hex.
    pub serial: String,
    /// The CA's clock when it signed.
    pub ca_time: SystemTime,
}

/// A client of the CA service with fixed TLS credentials: none before attestation, the
/// node SVID after it. Build a new client when the node SVID or the bundle changes.
#[derive(Clone, Debug)]
pub struct CaClient {
    addr: SocketAddr,
    client: CertificateServiceClient<Channel>,
}

impl CaClient {
    /// Builds a client of the CA at `addr` that trusts `bundle` and presents `node`, if
    /// given. It connects on the first call and reconnects after failures.
    pub fn new(
        addr: SocketAddr,
        trust_domain: &TrustDomain,
        bundle: &[CertificateDer<'static>],
        node: Option<&Issued>,
    ) -> Result<Self, Error> {
        let credentials = node.map(|node| {
            (
                node.chain.clone(),
                PrivateKeyDer::Pkcs8(node.key.clone_key()),
            )
        });
        let config =
            crate::tls::ca_client_config(bundle, trust_domain, credentials).map_err(|source| {
                Error::Tls {
                    addr,
                    source: Box::new(source),
                }
            })?;
        let connector = TlsConnector::from(config);
        // TLS runs in the connector below, so the URI only names the authority.
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|error| Error::InvalidResponse {
                addr,
                reason: error.to_string(),
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                let name = ServerName::IpAddress(addr.ip().into());
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        }));
        Ok(Self {
            addr,
            client: CertificateServiceClient::new(channel),
        })
    }

    /// Exchanges the join token of `node` for a node SVID valid for `lifetime`.
    pub async fn attest(
        &self,
        node: &NodeId,
        join_token: &str,
        lifetime: Duration,
    ) -> Result<Issued, Error> {
        let uri = node.to_string();
        let (csr, key) = identity::generate_csr(&uri)?;
        let request = AttestNodeRequest {
            node: node.name().to_owned(),
            join_token: join_token.trim().to_owned(),
            csr,
            validity_duration: seconds(lifetime),
        };
        let response = self
            .client
            .clone()
            .attest_node(request)
            .await
            .map_err(|status| self.call_error("AttestNode", status))?
            .into_inner();
        self.issued(&uri, key, &response.cert_chain, response.ca_time_unix)
    }

    /// Generates a key pair for `uri`, has the CA sign its CSR for `lifetime` and returns
    /// the chain with the key.
    pub async fn sign(&self, uri: &str, lifetime: Duration) -> Result<Issued, Error> {
        let (csr, key) = identity::generate_csr(uri)?;
        let request = CreateCertificateRequest {
            csr,
            validity_duration: seconds(lifetime),
        };
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| self.call_error("CreateCertificate", status))?
            .into_inner();
        self.issued(uri, key, &response.cert_chain, response.ca_time_unix)
    }

    /// Fetches the trust bundle, the signing root first, and the CA's clock.
    pub async fn trust_bundle(&self) -> Result<(Vec<CertificateDer<'static>>, SystemTime), Error> {
        let response = self
            .client
            .clone()
            .get_trust_bundle(TrustBundleRequest {})
            .await
            .map_err(|status| self.call_error("GetTrustBundle", status))?
            .into_inner();
        let mut roots = Vec::new();
        for pem in &response.roots {
            roots.extend(super::store::parse_roots(pem.as_bytes()).map_err(|reason| {
                Error::InvalidResponse {
                    addr: self.addr,
                    reason: format!("trust bundle: {reason}"),
                }
            })?);
        }
        if roots.is_empty() {
            return Err(Error::InvalidResponse {
                addr: self.addr,
                reason: "empty trust bundle".to_owned(),
            });
        }
        Ok((roots, from_unix(response.ca_time_unix)))
    }

    fn call_error(&self, call: &'static str, status: tonic::Status) -> Error {
        call_error(self.addr, call, status)
    }

    /// Parses a returned chain and checks that its leaf carries `uri`.
    fn issued(
        &self,
        uri: &str,
        key: PrivatePkcs8KeyDer<'static>,
        pems: &[String],
        ca_time_unix: i64,
    ) -> Result<Issued, Error> {
        let invalid = |reason: String| Error::InvalidResponse {
            addr: self.addr,
            reason,
        };
        let mut chain = Vec::new();
        for pem in pems {
            let cert = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|error| invalid(format!("certificate chain: {error}")))?;
            chain.push(cert);
        }
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("empty certificate chain".to_owned()))?;
        let actual = identity::uri_san_of(leaf)?;
        if actual != uri {
            return Err(invalid(format!(
                "asked for {uri}, the leaf carries {actual}"
            )));
        }
        let (_, not_after) = identity::validity_of(leaf)?;
        let serial = identity::serial_of(leaf)?;
        Ok(Issued {
            chain,
            key,
            not_after,
            serial,
            ca_time: from_unix(ca_time_unix),
        })
    }
}

/// Classifies a failed call: a TLS handshake that rustls rejected, a CA that could not
/// be reached, or a rejection by the CA.
fn call_error(addr: SocketAddr, call: &'static str, status: tonic::Status) -> Error {
    if is_tls_error(&status) {
        return Error::Handshake {
            addr,
            call,
            message: status_message(&status),
        };
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            Error::Unavailable {
                addr,
                call,
                message: status_message(&status),
            }
        }
        code => Error::Rejected {
            addr,
            call,
            code,
            message: status.message().to_owned(),
        },
    }
}

/// Returns whether the source chain of `status` contains a rustls error, such as a CA
/// certificate that the bundle does not trust or that carries another trust domain.
fn is_tls_error(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<rustls::Error>() {
            return true;
        }
        if let Some(io_error) = error.downcast_ref::<io::Error>() {
            if io_error
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        source = error.source();
    }
    false
}

/// Returns the status message with the transport errors that tonic keeps in the source
/// chain, each text once. Tonic copies the innermost cause (such as "Connection refused
/// (os error 111)") into the message and into several layers of the chain, so a text
/// that another part already contains is left out.
fn status_message(status: &tonic::Status) -> String {
    let mut chain = Vec::new();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        chain.push(error.to_string());
        source = error.source();
    }
    let mut parts: Vec<String> = Vec::new();
    let message = status.message();
    if !message.is_empty() && !chain.iter().any(|text| text.contains(message)) {
        parts.push(message.to_owned());
    }
    for text in chain {
        if !text.is_empty() && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

fn from_unix(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The node state directory: node key and SVID, and the last trust bundle.
#[derive(Clone, Debug)]
pub struct NodeState {
    dir: PathBuf,
}

impl NodeState {
    /// Opens `dir`, creating it with mode 0700 when it is missing.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Write {
                path: dir.to_owned(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Reads the saved node SVID of `node`. Returns `None` when there is none, when it is
    /// for another node, or when it expires before `now` plus `margin`.
    pub fn node_svid(
        &self,
        node: &NodeId,
        now: SystemTime,
        margin: Duration,
    ) -> Result<Option<Issued>, Error> {
        let cert_path = self.dir.join(NODE_CERT_FILE);
        let key_path = self.dir.join(NODE_KEY_FILE);
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }

        let key_pem =
            tokens::read_private(&key_path).map_err(|error| Error::PrivateFile(Box::new(error)))?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| {
            Error::InvalidPem {
                path: key_path.clone(),
                reason: error.to_string(),
            }
        })?;

        let cert_pem = fs::read(&cert_path).map_err(|source| Error::Read {
            path: cert_path.clone(),
            source,
        })?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|error| Error::InvalidPem {
                path: cert_path.clone(),
                reason: error.to_string(),
            })?;

        let Some(leaf) = chain.first() else {
            return Ok(None);
        };
        if identity::uri_san_of(leaf)? != node.to_string() {
            return Ok(None);
        }
        let (_, not_after) = identity::validity_of(leaf)?;
        if not_after <= now + margin {
            return Ok(None);
        }
        let serial = identity::serial_of(leaf)?;
        Ok(Some(Issued {
            chain,
            key,
            not_after,
            serial,
            ca_time: now,
        }))
    }

    /// Saves the node key (mode 0600) and SVID, each by writing a temporary file and
    /// renaming it.
    pub fn save_node_svid(&self, issued: &Issued) -> Result<(), Error> {
        let key_pem = pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            issued.key.secret_pkcs8_der().to_vec(),
        ));
        write_atomically(&self.dir.join(NODE_KEY_FILE), key_pem.as_bytes(), 0o600)?;
        let cert_pem = super::store::to_pem(&issued.chain);
        write_atomically(&self.dir.join(NODE_CERT_FILE), cert_pem.as_bytes(), 0o644)
    }

    /// Reads the saved trust bundle; `None` when there is none.
    pub fn bundle(&self) -> Result<Option<Vec<CertificateDer<'static>>>, Error> {
        let path = self.dir.join(BUNDLE_FILE);
        match fs::read(&path) {
            Ok(pem) => read_bundle_pem(&path, &pem).map(Some),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Read { path, source }),
        }
    }

    /// Saves the trust bundle.
    pub fn save_bundle(&self, bundle: &[CertificateDer<'static>]) -> Result<(), Error> {
        let pem = super::store::to_pem(bundle);
        write_atomically(&self.dir.join(BUNDLE_FILE), pem.as_bytes(), 0o644)
    }
}

/// Reads a PEM trust bundle file such as the one `--ca-trust-bundle` names.
pub fn read_bundle_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    read_bundle_pem(path, &pem)
}

fn read_bundle_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let roots = super::store::parse_roots(pem).map_err(|reason| Error::InvalidPem {
        path: path.to_owned(),
        reason,
    })?;
    if roots.is_empty() {
        return Err(Error::InvalidPem {
            path: path.to_owned(),
            reason: "no certificate".to_owned(),
        });
    }
    Ok(roots)
}

/// Writes a file of the state directory, see [`files::write_atomically`].
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    files::write_atomically(path, contents, mode)
        .map_err(|(path, source)| Error::Write { path, source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::identity::testing::TestDir;

    #[test]
    fn node_key_is_saved_private_and_read_back() {
        let dir = TestDir::new("node-state");
        let state = NodeState::open(&dir.path().join("state")).expect("open");
        let dir_mode = fs::metadata(dir.path().join("state"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o077, 0, "state directory open to others");

        let td: TrustDomain = "td.test".parse().expect("trust domain");
        let ca = identity::CertificateAuthority::init(&dir.path().join("ca"), &td).expect("CA");
        let node = NodeId::new(td, "n1").expect("node ID");
        let (csr, key) = identity::generate_csr(&node.to_string()).expect("CSR");
        let checked = super::super::csr::check(&csr, ca.trust_domain()).expect("check");
        let now = SystemTime::now();
        let chain = ca
            .sign_csr(
                &checked.params,
                &node.to_string(),
                identity::LeafUsage::Node,
                now,
                now + Duration::from_secs(600),
            )
            .expect("sign");
        let issued = Issued {
            not_after: identity::validity_of(&chain[0]).expect("validity").1,
            serial: identity::serial_of(&chain[0]).expect("serial"),
            chain,
            key,
            ca_time: now,
        };
        state.save_node_svid(&issued).expect("save");

        let key_mode = fs::metadata(dir.path().join("state").join(NODE_KEY_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let loaded = state
            .node_svid(&node, now, Duration::from_secs(1))
            .expect("read")
            .expect("a saved SVID");
        assert_eq!(loaded.serial, issued.serial);
        assert_eq!(loaded.key.secret_pkcs8_der(), issued.key.secret_pkcs8_der());

        let late = now + Duration::from_secs(3600);
        assert!(
            state
                .node_svid(&node, late, Duration::from_secs(1))
                .expect("read")
                .is_none(),
            "an expired node SVID was used"
        );

        fs::set_permissions(
            dir.path().join("state").join(NODE_KEY_FILE),
            fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        let open = state.node_svid(&node, now, Duration::from_secs(1));
        assert!(
            matches!(
                &open,
                Err(Error::PrivateFile(error)) if matches!(error.as_ref(), tokens::Error::InsecureMode { .. })
            ),
            "{open:?}"
        );
    }

    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        source: Option<Box<Layer>>,
    }

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.text)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.source.as_deref().map(|layer| layer as _)
        }
    }

    #[test]
    fn status_message_shows_cause_once() {
        let refused = "Connection refused (os error 111)";
        let chain = Layer {
            text: "transport error",
            source: Some(Box::new(Layer {
                text: refused,
                source: Some(Box::new(Layer {
                    text: refused,
                    source: None,
                })),
            })),
        };
        let mut status = tonic::Status::unavailable(refused);
        status.set_source(std::sync::Arc::new(chain));

        assert_eq!(
            status_message(&status),
            "transport error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn tls_failure_is_not_retried() {
        let addr: SocketAddr = "10.254.0.100:15012".parse().expect("parse the address");
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let mut status = tonic::Status::unavailable("transport error");
        status.set_source(std::sync::Arc::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls_error,
        )));

        let error = call_error(addr, "GetTrustBundle", status);
        assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
        assert!(!error.is_unavailable());

        let refused = tonic::Status::unavailable("Connection refused (os error 111)");
        assert!(call_error(addr, "GetTrustBundle", refused).is_unavailable());
    }

    #[test]
    fn status_message_keeps_distinct_texts() {
        let status = tonic::Status::unavailable("the CA is overloaded");
        assert_eq!(status_message(&status), "the CA is overloaded");
    }

    #[test]
    fn unavailable_error_says_what_to_check() {
        let error = Error::Unavailable {
            addr: "10.254.0.100:15012".parse().expect("parse the address"),
            call: "AttestNode",
            message: "Connection refused (os error 111)".to_owned(),
        };
        let text = error.to_string();
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
        assert!(text.contains("`interceptor ca serve`"), "{text}");
        assert!(text.contains("--ca-addr"), "{text}");
        assert!(text.contains("route"), "{text}");
    }
}
