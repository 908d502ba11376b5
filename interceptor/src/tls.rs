//! The rustls configurations of the tunnel between node daemons, and of the calls from
//! node daemons to the CA service.
//!
//! Both ends run TLS 1.3 only, with the ring provider, and authenticate each other with
//! SVIDs. A peer is accepted only if its leaf chains to the trust bundle and carries a
//! workload SPIFFE ID of the local trust domain. Which SPIFFE ID to expect at a
//! destination is the caller's check, after the handshake, with [`peer_spiffe_id`].
//! Session resumption and 0-RTT are off, so every connection runs a full handshake and
//! verifies the peer's current certificate. A configuration is immutable: a renewed SVID
//! or a refreshed trust bundle takes effect by building new configurations, which new
//! handshakes use while open connections keep theirs.

use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, CipherSuiteCommon, ClientConfig, CommonState, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite, Tls13CipherSuite,
};

use crate::identity::{self, SpiffeId, Svid, TrustDomain};

/// ALPN protocol of the tunnel. The server rejects a ClientHello that does not offer it.
pub const ALPN_PROTOCOL: &[u8] = b"interceptor-tunnel/1";

/// Errors of building the tunnel's TLS configurations and of checking a peer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("trust bundle is empty")]
    EmptyTrustBundle,
    #[error("invalid certificate {index} in the trust bundle")]
    InvalidTrustAnchor {
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("building the client certificate verifier failed")]
    ClientVerifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("building the TLS configuration for {spiffe_id} failed")]
    Config {
        spiffe_id: SpiffeId,
        /// Boxed so that `Error` stays within clippy's `result_large_err` limit of 128 bytes.
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("building the CA service's TLS configuration failed")]
    CaConfig {
        #[source]
        source: Box<rustls::Error>,
    },
    #[error("the CA service presented {actual}, expected {expected}")]
    NotCaService { expected: String, actual: String },
    #[error("peer presented no certificate")]
    MissingPeerCertificate,
    #[error("invalid peer certificate")]
    PeerCertificate {
        #[source]
        source: identity::Error,
    },
    #[error("peer SPIFFE ID {spiffe_id} is not in the trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: SpiffeId,
        trust_domain: TrustDomain,
    },
}

/// Returns the crypto provider of the tunnel: ring with the TLS 1.3 cipher suites
/// AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305, and the key exchange groups X25519
/// and secp256r1.
///
/// NOTE: rustls 0.23.48 deprecates the ring provider because ring offers no post-quantum
/// key exchange. The tunnel keeps ring and therefore has no hybrid group such as
/// X25519MLKEM768, which rustls 0.23.48 implements only in its aws-lc-rs provider.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            #[allow(deprecated)]
            let ring = ring::default_provider();
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                kx_groups: vec![ring::kx_group::X25519, ring::kx_group::SECP256R1],
                ..ring
            })
        })
        .clone()
}

/// Choices of the tunnel's TLS that depend on the kernel, or on a test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelOptions {
    /// Prefer ChaCha20-Poly1305, the suite kernel TLS carries without rekeying, and
    /// allow the traffic secrets to be extracted for the kernel.
    pub kernel_tls: bool,
    /// Records per traffic key after which rustls sends a KeyUpdate, lowering each
    /// suite's own confidentiality limit; for tests of the rekey policy.
    pub record_limit: Option<u64>,
}

/// Returns the provider for `options`: [`crypto_provider`], reordered and with lower
/// record limits where `options` ask for it.
fn provider_for(options: &TunnelOptions) -> Arc<CryptoProvider> {
    if *options == TunnelOptions::default() {
        return crypto_provider();
    }
    let base = crypto_provider();
    let mut suites: Vec<SupportedCipherSuite> = base
        .cipher_suites
        .iter()
        .map(|suite| match (suite, options.record_limit) {
            (SupportedCipherSuite::Tls13(tls13), Some(limit)) => {
                SupportedCipherSuite::Tls13(limited_suite(tls13, limit))
            }
            _ => *suite,
        })
        .collect();
    if options.kernel_tls {
        // rustls servers follow the client's order, so this choice decides the suite.
        suites.sort_by_key(|suite| {
            suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        });
    }
    Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..(*base).clone()
    })
}

/// Returns `suite` with its confidentiality limit lowered to `limit` records.
///
/// rustls takes suites as `&'static`, so each (suite, limit) pair is built once and
/// kept for the life of the process.
fn limited_suite(suite: &'static Tls13CipherSuite, limit: u64) -> &'static Tls13CipherSuite {
    static LIMITED: Mutex<Vec<(rustls::CipherSuite, u64, &'static Tls13CipherSuite)>> =
        Mutex::new(Vec::new());
    let mut limited = LIMITED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let id = suite.common.suite;
    if let Some((_, _, found)) = limited.iter().find(|(s, l, _)| *s == id && *l == limit) {
        return found;
    }
    let common = CipherSuiteCommon {
        confidentiality_limit: limit.min(suite.common.confidentiality_limit),
        ..suite.common
    };
    let built: &'static Tls13CipherSuite =
        Box::leak(Box::new(Tls13CipherSuite { common, ..*suite }));
    limited.push((id, limit, built));
    built
}

/// Builds the configuration of the tunnel's server end, which presents `svid`.
///
/// The client must present a certificate that chains to `trust_bundle`, has the
/// clientAuth extended key usage and carries a SPIFFE ID of the SVID's trust domain.
/// It must offer [`ALPN_PROTOCOL`]. No session tickets are sent and no early data is
/// accepted.
pub fn server_config(
    svid: &Svid,
    trust_bundle: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, Error> {
    server_config_with(svid, trust_bundle, &TunnelOptions::default())
}

/// Builds the server configuration as [`server_config`] does, with `options`.
pub fn server_config_with(
    svid: &Svid,
    trust_bundle: &[CertificateDer<'static>],
    options: &TunnelOptions,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider_for(options);
    let config_error = |source| Error::Config {
        spiffe_id: svid.spiffe_id.clone(),
        source: Box::new(source),
    };

    let webpki =
        WebPkiClientVerifier::builder_with_provider(root_store(trust_bundle)?, provider.clone())
            .build()
            .map_err(|source| Error::ClientVerifier { source })?;
    let verifier = Arc::new(SpiffeClientVerifier {
        webpki,
        trust_domain: svid.spiffe_id.trust_domain().clone(),
    });
    let key = CertifiedKey::from_der(
        svid.cert_chain.clone(),
        PrivateKeyDer::Pkcs8(svid.key.clone_key()),
        &provider,
    )
    .map_err(config_error)?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(TunnelCertResolver { key: Arc::new(key) }));
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.max_early_data_size = 0;
    config.enable_secret_extraction = options.kernel_tls;
    Ok(Arc::new(config))
}

/// Builds the configuration of the tunnel's client end, which presents `svid`.
///
/// The server must present a certificate that chains to `trust_bundle`, has the
/// serverAuth extended key usage and carries a SPIFFE ID of the SVID's trust domain.
/// The server name passed to the connector, usually `ServerName::IpAddress` of the
/// original destination, is not checked because SVIDs carry no DNS or IP SANs.
pub fn client_config(
    svid: &Svid,
    trust_bundle: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, Error> {
    client_config_with(svid, trust_bundle, &TunnelOptions::default())
}

/// Builds the client configuration as [`client_config`] does, with `options`.
pub fn client_config_with(
    svid: &Svid,
    trust_bundle: &[CertificateDer<'static>],
    options: &TunnelOptions,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider_for(options);
    let config_error = |source| Error::Config {
        spiffe_id: svid.spiffe_id.clone(),
        source: Box::new(source),
    };
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(trust_bundle)?,
        algorithms: provider.signature_verification_algorithms,
        expected: ExpectedServer::TrustDomain(svid.spiffe_id.trust_domain().clone()),
    });

    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            svid.cert_chain.clone(),
            PrivateKeyDer::Pkcs8(svid.key.clone_key()),
        )
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    config.enable_secret_extraction = options.kernel_tls;
    Ok(Arc::new(config))
}

/// ALPN protocol of the CA service: gRPC runs over HTTP/2.
const CA_ALPN_PROTOCOL: &[u8] = b"h2";

/// Builds the configuration of the CA service's TLS server, which presents `chain` and
/// `key`.
///
/// A client may present a certificate that chains to `trust_bundle` with the
/// clientAuth usage, or none: node attestation runs before the node has a certificate,
/// and the service itself requires a node SVID for every other signing request.
pub fn ca_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_bundle: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, Error> {
    let provider = crypto_provider();
    let config_error = |source| Error::CaConfig {
        source: Box::new(source),
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(trust_bundle)?, provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|source| Error::ClientVerifier { source })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![CA_ALPN_PROTOCOL.to_vec()];
    Ok(Arc::new(config))
}

/// Builds the configuration with which a node daemon calls the CA service.
///
/// The server must present a certificate that chains to `trust_bundle` and carries
/// exactly the URI SAN `spiffe://<trust-domain>/ca`. The client presents `client` (the
/// node SVID's chain and key) when given, and nothing before node attestation.
pub fn ca_client_config(
    trust_bundle: &[CertificateDer<'static>],
    trust_domain: &TrustDomain,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = crypto_provider();
    let config_error = |source| Error::CaConfig {
        source: Box::new(source),
    };
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(trust_bundle)?,
        algorithms: provider.signature_verification_algorithms,
        expected: ExpectedServer::CaService(identity::ca_service_id(trust_domain)),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(config_error)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![CA_ALPN_PROTOCOL.to_vec()];
    Ok(Arc::new(config))
}

/// Returns the SPIFFE ID of the peer's leaf certificate on a connection whose handshake
/// has completed.
///
/// It does not verify the certificate, which the verifiers of this module checked during
/// the handshake.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, Error> {
    let leaf = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(Error::MissingPeerCertificate)?;
    identity::spiffe_id_of(leaf).map_err(|source| Error::PeerCertificate { source })
}

fn root_store(trust_bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    if trust_bundle.is_empty() {
        return Err(Error::EmptyTrustBundle);
    }
    let mut roots = RootCertStore::empty();
    for (index, cert) in trust_bundle.iter().enumerate() {
        roots
            .add(cert.clone())
            .map_err(|source| Error::InvalidTrustAnchor { index, source })?;
    }
    Ok(Arc::new(roots))
}

/// Checks that a verified leaf carries a workload SPIFFE ID of `trust_domain`. The error
/// is a rustls error, so the handshake fails with a certificate_unknown alert.
fn check_peer_trust_domain(
    leaf: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
) -> Result<(), rustls::Error> {
    let rejected = |error: Error| {
        tracing::debug!(%error, "rejecting peer certificate");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    };
    let spiffe_id = identity::spiffe_id_of(leaf)
        .map_err(|source| rejected(Error::PeerCertificate { source }))?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(rejected(Error::ForeignTrustDomain {
            spiffe_id,
            trust_domain: trust_domain.clone(),
        }));
    }
    Ok(())
}

/// Client certificate verifier of the server end: webpki's chain, validity and
/// clientAuth checks, followed by the trust domain check.
#[derive(Debug)]
struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Server certificate verifier of a client end: chain, validity and serverAuth checks
/// against the trust bundle, followed by a check of the server's URI SAN. It skips the
/// server name check because SVIDs carry only a URI SAN.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: ExpectedServer,
}

/// The URI SAN check of [`SpiffeServerVerifier`].
#[derive(Debug)]
enum ExpectedServer {
    /// A tunnel server: any SPIFFE ID of this trust domain. The tunnel code compares
    /// the peer's ID with the directory's after the handshake.
    TrustDomain(TrustDomain),
    /// The CA service: exactly this URI.
    CaService(String),
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match &self.expected {
            ExpectedServer::TrustDomain(trust_domain) => {
                check_peer_trust_domain(end_entity, trust_domain)?;
            }
            ExpectedServer::CaService(expected) => check_ca_service(end_entity, expected)?,
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks that the CA service's certificate carries exactly the URI SAN `expected`.
fn check_ca_service(leaf: &CertificateDer<'_>, expected: &str) -> Result<(), rustls::Error> {
    let rejected = |error: Error| {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    };
    let uri =
        identity::uri_san_of(leaf).map_err(|source| rejected(Error::PeerCertificate { source }))?;
    if uri != expected {
        return Err(rejected(Error::NotCaService {
            expected: expected.to_owned(),
            actual: uri,
        }));
    }
    Ok(())
}

/// Certificate resolver of the server end. It returns the SVID only to a ClientHello that
/// offers [`ALPN_PROTOCOL`], because rustls itself accepts a ClientHello without ALPN.
#[derive(Debug)]
struct TunnelCertResolver {
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for TunnelCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_tunnel = client_hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|protocol| protocol == ALPN_PROTOCOL));
        if !offers_tunnel {
            // rustls reports only "no server certificate chain resolved", so this event
            // records the reason.
            tracing::debug!("rejecting ClientHello that does not offer ALPN interceptor-tunnel/1");
            return None;
        }
        Some(self.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, SystemTime};

    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    use rustls::client::ClientConnection;
    use rustls::server::ServerConnection;
    use rustls::{CipherSuite, HandshakeKind, NamedGroup, ProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::testing::{test_ca, workload_id, TestCa};

    const SVID_LIFETIME: Duration = Duration::from_secs(3600);

    /// Returns ring's default provider, which unlike [`crypto_provider`] includes the TLS
    /// 1.2 cipher suites (with the `tls12` feature of the dev-dependency) and secp384r1.
    #[allow(deprecated)]
    fn ring_default() -> CryptoProvider {
        ring::default_provider()
    }

    /// The outcome of one handshake and a one-byte echo over it.
    struct Outcome {
        client: std::io::Result<client::TlsStream<tokio::io::DuplexStream>>,
        server: std::io::Result<server::TlsStream<tokio::io::DuplexStream>>,
    }

    impl Outcome {
        fn client_conn(&self) -> &ClientConnection {
            self.client
                .as_ref()
                .expect("client handshake succeeds")
                .get_ref()
                .1
        }

        fn server_conn(&self) -> &ServerConnection {
            self.server
                .as_ref()
                .expect("server handshake succeeds")
                .get_ref()
                .1
        }
    }

    /// Runs a handshake over an in-memory pipe and echoes one byte, so that a rejection
    /// that TLS 1.3 reports only after the client's Finished also fails the client.
    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let destination = ServerName::IpAddress(Ipv4Addr::new(10, 0, 0, 2).into());

        let client_side = async {
            let mut stream = TlsConnector::from(client)
                .connect(destination, client_io)
                .await?;
            stream.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            Ok(stream)
        };
        let server_side = async {
            let mut stream = TlsAcceptor::from(server).accept(server_io).await?;
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            stream.write_all(&byte).await?;
            stream.flush().await?;
            Ok(stream)
        };
        let (client, server) = tokio::join!(client_side, server_side);
        Outcome { client, server }
    }

    /// Returns the rustls error inside an I/O error from tokio-rustls, if there is one.
    fn rustls_error<T>(result: &std::io::Result<T>) -> Option<&rustls::Error> {
        result
            .as_ref()
            .err()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    }

    fn issue(test: &TestCa, service_account: &str) -> Svid {
        let id = workload_id(test.ca.trust_domain(), service_account);
        test.ca
            .issue(&id, SVID_LIFETIME)
            .expect("issue a test SVID")
    }

    fn server_for(test: &TestCa) -> Arc<ServerConfig> {
        server_config(&issue(test, "server"), &test.ca.trust_bundle()).expect("build server config")
    }

    fn client_for(test: &TestCa) -> Arc<ClientConfig> {
        client_config(&issue(test, "client"), &test.ca.trust_bundle()).expect("build client config")
    }

    /// Builds a client that presents `svid`, accepts servers of `trust_domain` that chain
    /// to `bundle`, and uses the given provider and protocol versions.
    fn custom_client(
        svid: &Svid,
        bundle: &[CertificateDer<'static>],
        trust_domain: &TrustDomain,
        provider: CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: root_store(bundle).expect("build the root store"),
            algorithms: provider.signature_verification_algorithms,
            expected: ExpectedServer::TrustDomain(trust_domain.clone()),
        });
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("protocol versions match the provider")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                svid.cert_chain.clone(),
                PrivateKeyDer::Pkcs8(svid.key.clone_key()),
            )
            .expect("client certificate matches its key");
        config.alpn_protocols = vec![ALPN_PROTOCOL.to_vec()];
        Arc::new(config)
    }

    /// Builds an SVID-like certificate signed by `test`'s CA from `params`.
    fn svid_from_params(test: &TestCa, params: &CertificateParams) -> Svid {
        let (cert, key) = test.ca.sign_for_test(params);
        Svid {
            spiffe_id: workload_id(test.ca.trust_domain(), "crafted"),
            cert_chain: vec![cert],
            key,
            not_after: SystemTime::now() + SVID_LIFETIME,
            serial: String::new(),
        }
    }

    fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params
    }

    #[tokio::test]
    async fn mutual_handshake_exchanges_spiffe_ids() {
        let test = test_ca("tls-mutual", "td.test");
        let client_svid = issue(&test, "client");
        let server_svid = issue(&test, "server");
        let bundle = test.ca.trust_bundle();
        let client = client_config(&client_svid, &bundle).expect("build client config");
        let server = server_config(&server_svid, &bundle).expect("build server config");

        let outcome = handshake(client, server).await;

        let client_conn = outcome.client_conn();
        let server_conn = outcome.server_conn();
        assert_eq!(
            peer_spiffe_id(client_conn).expect("server's SPIFFE ID"),
            server_svid.spiffe_id
        );
        assert_eq!(
            peer_spiffe_id(server_conn).expect("client's SPIFFE ID"),
            client_svid.spiffe_id
        );
        assert_eq!(
            client_conn.protocol_version(),
            Some(ProtocolVersion::TLSv1_3)
        );
        assert_eq!(client_conn.alpn_protocol(), Some(ALPN_PROTOCOL));
        assert_eq!(server_conn.alpn_protocol(), Some(ALPN_PROTOCOL));
        assert_eq!(client_conn.handshake_kind(), Some(HandshakeKind::Full));
    }

    #[tokio::test]
    async fn handshake_never_resumes() {
        let test = test_ca("tls-resume", "td.test");
        let client = client_for(&test);
        let server = server_for(&test);

        for attempt in 0..2 {
            let outcome = handshake(client.clone(), server.clone()).await;
            assert_eq!(
                outcome.client_conn().handshake_kind(),
                Some(HandshakeKind::Full),
                "handshake {attempt} was not a full handshake"
            );
        }
    }

    #[tokio::test]
    async fn each_cipher_suite_negotiates() {
        let test = test_ca("tls-suites", "td.test");
        let server = server_for(&test);
        let svid = issue(&test, "client");
        let bundle = test.ca.trust_bundle();
        let suites = [
            (
                ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_128_GCM_SHA256,
            ),
            (
                ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
            ),
            (
                ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ),
        ];

        for (suite, expected) in suites {
            let provider = CryptoProvider {
                cipher_suites: vec![suite],
                ..(*crypto_provider()).clone()
            };
            let client = custom_client(
                &svid,
                &bundle,
                test.ca.trust_domain(),
                provider,
                &[&rustls::version::TLS13],
            );
            let outcome = handshake(client, server.clone()).await;
            let negotiated = outcome.server_conn().negotiated_cipher_suite();
            assert_eq!(negotiated.map(|suite| suite.suite()), Some(expected));
        }
    }

    #[tokio::test]
    async fn each_key_exchange_group_negotiates() {
        let test = test_ca("tls-groups", "td.test");
        let server = server_for(&test);
        let svid = issue(&test, "client");
        let bundle = test.ca.trust_bundle();
        let groups = [
            (ring::kx_group::X25519, NamedGroup::X25519),
            (ring::kx_group::SECP256R1, NamedGroup::secp256r1),
        ];

        for (group, expected) in groups {
            let provider = CryptoProvider {
                kx_groups: vec![group],
                ..(*crypto_provider()).clone()
            };
            let client = custom_client(
                &svid,
                &bundle,
                test.ca.trust_domain(),
                provider,
                &[&rustls::version::TLS13],
            );
            let outcome = handshake(client, server.clone()).await;
            let negotiated = outcome.server_conn().negotiated_key_exchange_group();
            assert_eq!(negotiated.map(|group| group.name()), Some(expected));
        }
    }

    #[tokio::test]
    async fn only_tls13_is_accepted() {
        let test = test_ca("tls-versions", "td.test");
        let server = server_for(&test);
        let svid = issue(&test, "client");
        let bundle = test.ca.trust_bundle();
        let cases: [(
            &str,
            &[&'static rustls::SupportedProtocolVersion],
            Option<ProtocolVersion>,
        ); 3] = [
            (
                "TLS 1.3 only",
                &[&rustls::version::TLS13],
                Some(ProtocolVersion::TLSv1_3),
            ),
            (
                "TLS 1.2 and 1.3",
                &[&rustls::version::TLS12, &rustls::version::TLS13],
                Some(ProtocolVersion::TLSv1_3),
            ),
            ("TLS 1.2 only", &[&rustls::version::TLS12], None),
        ];

        for (case, versions, expected) in cases {
            let provider = ring_default();
            let client = custom_client(&svid, &bundle, test.ca.trust_domain(), provider, versions);
            let outcome = handshake(client, server.clone()).await;
            let negotiated = outcome
                .server
                .as_ref()
                .ok()
                .and_then(|stream| stream.get_ref().1.protocol_version());
            assert_eq!(negotiated, expected, "{case}");
            assert_eq!(outcome.client.is_ok(), expected.is_some(), "{case}");
        }
    }

    #[tokio::test]
    async fn unsupported_parameters_are_rejected() {
        let test = test_ca("tls-unsupported", "td.test");
        let server = server_for(&test);
        let svid = issue(&test, "client");
        let bundle = test.ca.trust_bundle();
        let cases = [
            (
                "secp384r1 only",
                CryptoProvider {
                    kx_groups: vec![ring::kx_group::SECP384R1],
                    ..ring_default()
                },
            ),
            (
                "TLS 1.2 cipher suites only",
                CryptoProvider {
                    cipher_suites: vec![
                        ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    ],
                    ..ring_default()
                },
            ),
        ];

        for (case, provider) in cases {
            let versions = &[&rustls::version::TLS12, &rustls::version::TLS13];
            let client = custom_client(&svid, &bundle, test.ca.trust_domain(), provider, versions);
            let outcome = handshake(client, server.clone()).await;
            assert!(
                outcome.server.is_err(),
                "{case}: server accepted the client"
            );
            assert!(
                outcome.client.is_err(),
                "{case}: client completed the handshake"
            );
        }
    }

    #[tokio::test]
    async fn client_must_offer_tunnel_alpn() {
        let test = test_ca("tls-alpn", "td.test");
        let server = server_for(&test);
        let cases: [(&str, Vec<Vec<u8>>); 2] =
            [("no ALPN", vec![]), ("other ALPN", vec![b"h2".to_vec()])];

        for (case, protocols) in cases {
            let mut client = (*client_for(&test)).clone();
            client.alpn_protocols = protocols;
            let outcome = handshake(Arc::new(client), server.clone()).await;
            assert!(
                outcome.server.is_err(),
                "{case}: server accepted the client"
            );
            assert!(
                outcome.client.is_err(),
                "{case}: client completed the handshake"
            );
        }
    }

    /// A case name, the certificate that the peer presents, and a check of the verifier's
    /// error.
    type RejectionCase = (&'static str, Svid, fn(&CertificateError) -> bool);

    /// The certificates that a verifier must reject.
    struct UntrustedPeers {
        ours: TestCa,
        foreign: TestCa,
        cases: Vec<RejectionCase>,
    }

    /// Builds a peer certificate for each rejection case. `no_uri_sans` are the SANs of
    /// the certificate without a URI SAN.
    fn untrusted_peers(
        label: &str,
        service_account: &str,
        no_uri_sans: Vec<SanType>,
    ) -> UntrustedPeers {
        let ours = test_ca(&format!("{label}-ours"), "td.test");
        // Same trust domain name as `ours`, but a different root key.
        let impostor = test_ca(&format!("{label}-impostor"), "td.test");
        let foreign = test_ca(&format!("{label}-foreign"), "other.test");
        let now = SystemTime::now();
        let expired = ours
            .ca
            .issue_with_validity(
                &workload_id(ours.ca.trust_domain(), service_account),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .expect("issue an expired SVID");
        let not_yet_valid = ours
            .ca
            .issue_with_validity(
                &workload_id(ours.ca.trust_domain(), service_account),
                now + Duration::from_secs(3600),
                now + Duration::from_secs(7200),
            )
            .expect("issue a not yet valid SVID");
        let no_uri = svid_from_params(&ours, &leaf_params(no_uri_sans));

        let cases: Vec<RejectionCase> = vec![
            (
                "another CA with the same trust domain",
                issue(&impostor, service_account),
                // Both roots have the same subject, so webpki tries our root as the issuer
                // and finds that the signature does not verify.
                |error| {
                    matches!(
                        error,
                        CertificateError::BadSignature | CertificateError::UnknownIssuer
                    )
                },
            ),
            (
                "foreign trust domain",
                issue(&foreign, service_account),
                |error| matches!(tunnel_error(error), Some(Error::ForeignTrustDomain { .. })),
            ),
            ("expired certificate", expired, |error| {
                matches!(
                    error,
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            }),
            ("not yet valid certificate", not_yet_valid, |error| {
                matches!(
                    error,
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
                )
            }),
            ("no URI SAN", no_uri, |error| {
                matches!(
                    tunnel_error(error),
                    Some(Error::PeerCertificate {
                        source: identity::Error::MissingSpiffeId
                    })
                )
            }),
        ];
        UntrustedPeers {
            ours,
            foreign,
            cases,
        }
    }

    /// Returns the error of this module inside a verifier's `CertificateError::Other`.
    fn tunnel_error(error: &CertificateError) -> Option<&Error> {
        match error {
            CertificateError::Other(other) => other.0.downcast_ref::<Error>(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn server_rejects_untrusted_client() {
        let dns_only = vec![SanType::DnsName(
            "client.test".try_into().expect("valid DNS name"),
        )];
        let peers = untrusted_peers("tls-bad-client", "client", dns_only);
        // Trusting the foreign root lets the foreign client reach the trust domain check.
        let bundle = [
            peers.ours.ca.trust_bundle(),
            peers.foreign.ca.trust_bundle(),
        ]
        .concat();
        let server = server_config(&issue(&peers.ours, "server"), &bundle)
            .expect("build server config trusting both roots");
        let ours = peers.ours.ca.trust_domain();

        for (case, svid, expected) in &peers.cases {
            // This client accepts the server whatever its own SVID, so only the server's
            // check can fail.
            let client = custom_client(
                svid,
                &peers.ours.ca.trust_bundle(),
                ours,
                (*crypto_provider()).clone(),
                &[&rustls::version::TLS13],
            );
            let outcome = handshake(client, server.clone()).await;
            let error = rustls_error(&outcome.server);
            assert!(
                matches!(error, Some(rustls::Error::InvalidCertificate(error)) if expected(error)),
                "{case}: server returned {error:?}"
            );
            assert!(
                outcome.client.is_err(),
                "{case}: client completed the exchange"
            );
        }
    }

    #[tokio::test]
    async fn client_rejects_untrusted_server() {
        let peers = untrusted_peers("tls-bad-server", "server", vec![]);
        // Trusting the foreign root lets the foreign server reach the trust domain check.
        let bundle = [
            peers.ours.ca.trust_bundle(),
            peers.foreign.ca.trust_bundle(),
        ]
        .concat();
        let client = client_config(&issue(&peers.ours, "client"), &bundle)
            .expect("build client config trusting both roots");

        for (case, svid, expected) in &peers.cases {
            // In TLS 1.3 the client checks the server's certificate before it sends its
            // own, so the server's client check never runs.
            let server = server_config(svid, &bundle).expect("build server config");
            let outcome = handshake(client.clone(), server).await;
            let error = rustls_error(&outcome.client);
            assert!(
                matches!(error, Some(rustls::Error::InvalidCertificate(error)) if expected(error)),
                "{case}: client returned {error:?}"
            );
            assert!(
                outcome.server.is_err(),
                "{case}: server completed the exchange"
            );
        }
    }

    #[test]
    fn foreign_trust_domain_error_names_both() {
        let test = test_ca("tls-foreign-message", "other.test");
        let svid = issue(&test, "web");
        let ours: TrustDomain = "td.test".parse().expect("parse the trust domain");

        let error = check_peer_trust_domain(&svid.cert_chain[0], &ours)
            .expect_err("a foreign trust domain is rejected");
        let rustls::Error::InvalidCertificate(error) = error else {
            panic!("expected InvalidCertificate, got {error:?}");
        };
        let message = tunnel_error(&error)
            .expect("the verifier wraps an error of this module")
            .to_string();
        assert!(
            message.contains("spiffe://other.test/ns/default/sa/web"),
            "{message}"
        );
        assert!(message.contains("td.test"), "{message}");
    }

    #[test]
    fn configs_reject_empty_trust_bundle() {
        let test = test_ca("tls-empty-bundle", "td.test");
        let svid = issue(&test, "web");
        assert!(matches!(
            server_config(&svid, &[]),
            Err(Error::EmptyTrustBundle)
        ));
        assert!(matches!(
            client_config(&svid, &[]),
            Err(Error::EmptyTrustBundle)
        ));
    }
}
