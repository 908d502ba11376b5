//! The gRPC handlers of the CA service and the state they share with the reload task.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::csr::{self, Requested};
use super::proto::certificate_service_server::CertificateService;
use super::proto::{
    AttestNodeRequest, CertificateResponse, CreateCertificateRequest, TrustBundleRequest,
    TrustBundleResponse,
};
use super::store::{self, Loaded};
use super::tokens;
use crate::identity::{self, LeafUsage, NodeId};
use crate::workloads::Directory;

/// The state the handlers read: the CA directory's contents and the workload
/// directory, replaced as a whole by the reload task.
#[derive(Debug)]
pub struct Snapshot {
    pub loaded: Loaded,
    pub directory: Directory,
}

/// The CA service. Cloned per connection by tonic; every clone shares one snapshot.
#[derive(Clone, Debug)]
pub struct Service {
    pub(super) dir: PathBuf,
    pub(super) snapshot: Arc<RwLock<Arc<Snapshot>>>,
    /// Validity of a certificate whose request gives none.
    pub(super) default_lifetime: Duration,
    /// Upper bound of every requested validity.
    pub(super) max_lifetime: Duration,
}

impl Service {
    fn snapshot(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Returns the validity to sign for a request of `seconds` (0 for the default).
    fn lifetime(&self, seconds: i64) -> Duration {
        match u64::try_from(seconds) {
            Ok(0) | Err(_) => self.default_lifetime,
            Ok(seconds) => Duration::from_secs(seconds).min(self.max_lifetime),
        }
    }

    /// Signs `checked` for its requested identity and returns the PEM chain.
    fn sign(
        &self,
        snapshot: &Snapshot,
        checked: &csr::CheckedCsr,
        lifetime: Duration,
    ) -> Result<CertificateResponse, Status> {
        let (uri, usage) = match &checked.requested {
            Requested::Workload(id) => (id.to_string(), LeafUsage::Workload),
            Requested::Node(id) => (id.to_string(), LeafUsage::Node),
        };
        let now = SystemTime::now();
        // Backdated like locally issued SVIDs, so a peer whose clock runs a little
        // behind accepts the certificate at once.
        let not_before = now.checked_sub(identity::CLOCK_SKEW).unwrap_or(now);
        let chain = snapshot
            .loaded
            .ca
            .sign_csr(&checked.params, &uri, usage, not_before, now + lifetime)
            .map_err(|error| {
                warn!(spiffe_id = %uri, error = %error, "signing failed");
                Status::internal(format!("signing the certificate for {uri} failed"))
            })?;
        let serial = chain
            .first()
            .and_then(|leaf| identity::serial_of(leaf).ok())
            .unwrap_or_default();
        info!(spiffe_id = %uri, serial = %serial, valid_for = ?lifetime, "issued certificate");
        Ok(CertificateResponse {
            cert_chain: chain
                .iter()
                .map(|cert| store::to_pem(std::slice::from_ref(cert)))
                .collect(),
            ca_time_unix: unix_seconds(now),
        })
    }
}

#[tonic::async_trait]
impl CertificateService for Service {
    async fn attest_node(
        &self,
        request: Request<AttestNodeRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let request = request.into_inner();
        let snapshot = self.snapshot();
        let trust_domain = snapshot.loaded.ca.trust_domain().clone();
        let node = &request.node;
        let reject = |reason: String| {
            warn!(node = %node, reason = %reason, "node attestation rejected");
            Status::permission_denied(reason)
        };
        if snapshot.directory.node(node).is_none() {
            return Err(reject(format!(
                "node {node:?} is not in the workload directory"
            )));
        }
        let node_id =
            NodeId::new(trust_domain.clone(), node).map_err(|error| reject(error.to_string()))?;
        let checked = csr::check(&request.csr, &trust_domain)
            .map_err(|rejection| reject(rejection.to_string()))?;
        if checked.requested != Requested::Node(node_id.clone()) {
            return Err(reject(format!(
                "an attestation CSR must ask for {node_id}, not {}",
                checked.requested
            )));
        }
        // The token is redeemed last, so a request with a bad CSR does not use it up.
        tokens::redeem(&self.dir, node, &request.join_token, SystemTime::now())
            .map_err(|error| reject(error.to_string()))?;
        info!(node = %node, "node attested with its join token");
        let lifetime = self.lifetime(request.validity_duration);
        self.sign(&snapshot, &checked, lifetime).map(Response::new)
    }

    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let caller = caller_node(&request)?;
        let request = request.into_inner();
        let snapshot = self.snapshot();
        let trust_domain = snapshot.loaded.ca.trust_domain();
        let reject = |reason: String| {
            warn!(node = %caller.name(), reason = %reason, "certificate request rejected");
            Status::permission_denied(reason)
        };
        if caller.trust_domain() != trust_domain || snapshot.directory.node(caller.name()).is_none()
        {
            return Err(reject(format!(
                "{caller} is not a node of the workload directory"
            )));
        }
        let checked = csr::check(&request.csr, trust_domain)
            .map_err(|rejection| reject(rejection.to_string()))?;
        csr::authorize(&checked.requested, &caller, &snapshot.directory)
            .map_err(|rejection| reject(rejection.to_string()))?;
        let lifetime = self.lifetime(request.validity_duration);
        self.sign(&snapshot, &checked, lifetime).map(Response::new)
    }

    async fn get_trust_bundle(
        &self,
        _request: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        let snapshot = self.snapshot();
        Ok(Response::new(TrustBundleResponse {
            roots: snapshot
                .loaded
                .bundle
                .iter()
                .map(|root| store::to_pem(std::slice::from_ref(root)))
                .collect(),
            ca_time_unix: unix_seconds(SystemTime::now()),
        }))
    }
}

/// Returns the node ID of the client certificate that the TLS handshake verified.
fn caller_node<T>(request: &Request<T>) -> Result<NodeId, Status> {
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .ok_or_else(|| Status::unauthenticated("a node SVID is required as client certificate"))?;
    let leaf: &CertificateDer<'static> = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a node SVID is required as client certificate"))?;
    let uri = identity::uri_san_of(leaf)
        .map_err(|error| Status::unauthenticated(format!("invalid client certificate: {error}")))?;
    uri.parse().map_err(|error: identity::Error| {
        warn!(spiffe_id = %uri, "a certificate request came with a certificate that is not a node SVID");
        Status::permission_denied(format!("the client certificate is not a node SVID: {error}"))
    })
}

pub(super) fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
    })
}
