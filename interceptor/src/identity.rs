//! Workload identities: SPIFFE IDs, the node's certificate authority and the X.509 SVIDs
//! it issues.
//!
//! A workload's SPIFFE ID has the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. The CA is a self-signed
//! P-256 root whose certificate and key live in one directory as `ca-cert.pem` and
//! `ca-key.pem`. [`CertificateAuthority::init`] creates them once and
//! [`CertificateAuthority::load`] reads them at start. SVID key pairs are generated in
//! memory by [`CertificateAuthority::issue`] and never written to disk.
//!
//! With the CA service (`interceptor ca serve`), node daemons generate their key pairs
//! themselves and send only a CSR ([`generate_csr`]), which the CA signs with
//! [`CertificateAuthority::sign_csr`]. A node daemon's own identity is a [`NodeId`],
//! `spiffe://<trust-domain>/node/<name>`, which it uses only to authenticate to the CA.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// File name of the CA certificate (PEM) inside the CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the CA private key (PKCS #8 PEM) inside the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the operator's root certificate (PEM) inside the CA directory, present
/// when the CA is an intermediate under that root.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Maximum length of a SPIFFE ID in bytes. The SPIFFE ID standard (section 2.3) requires
/// support up to this length and advises against generating longer IDs.
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name in bytes, which the SPIFFE ID standard (section
/// 2.3) derives from the RFC 3986 limit for a URI host.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Validity of a root created by [`CertificateAuthority::init`]: 10 years of 365 days.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How far `not_before` is backdated, so that a peer whose clock runs slightly behind
/// still accepts a freshly issued certificate.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
const CA_COMMON_NAME: &str = "interceptor root CA";
const SPIFFE_SCHEME_PREFIX: &str = "spiffe://";

/// Errors of parsing SPIFFE IDs, managing the CA and issuing SVIDs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid trust domain {value:?}: {reason}")]
    InvalidTrustDomain { value: String, reason: &'static str },
    #[error("invalid SPIFFE ID {value:?}: {reason}")]
    InvalidSpiffeId { value: String, reason: String },
    #[error("creating CA directory {path} failed")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CA file {path} already exists and is never overwritten: use the existing CA, or remove its files or choose another --dir to create a new one")]
    CaExists { path: PathBuf },
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CA key {path} must not be accessible to group or others but has mode {mode:04o} (run `chmod 600 {path}`)")]
    InsecureKeyMode { path: PathBuf, mode: u32 },
    #[error("invalid CA certificate {path}: {reason}")]
    InvalidCaCertificate { path: PathBuf, reason: String },
    #[error("invalid CA key {path}")]
    InvalidCaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("CA key {key_path} does not belong to CA certificate {cert_path}")]
    KeyMismatch {
        key_path: PathBuf,
        cert_path: PathBuf,
    },
    #[error("CA certificate {path} expired at {}", rfc3339(*.not_after))]
    CaExpired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    #[error("reading random bytes for a certificate serial number failed")]
    Random,
    #[error("generating a P-256 key pair failed")]
    GenerateKey {
        #[source]
        source: rcgen::Error,
    },
    #[error("signing the CA certificate for trust domain {trust_domain} failed")]
    SignCa {
        trust_domain: TrustDomain,
        #[source]
        source: rcgen::Error,
    },
    #[error("SPIFFE ID {spiffe_id} is not in the CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        spiffe_id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("invalid validity for {spiffe_id}: not_before {} is not before not_after {}", rfc3339(*.not_before), rfc3339(*.not_after))]
    InvalidValidity {
        spiffe_id: SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },
    #[error("signing the SVID for {spiffe_id} failed")]
    SignSvid {
        spiffe_id: SpiffeId,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid certificate: {reason}")]
    InvalidCertificate { reason: String },
    #[error("missing SPIFFE ID because the certificate has no URI SAN")]
    MissingSpiffeId,
    #[error("more than one URI SAN in the certificate ({count}), but an SVID carries exactly one")]
    MultipleUriSans { count: usize },
    #[error("invalid node SPIFFE ID {value:?}: {reason}")]
    InvalidNodeId { value: String, reason: String },
    #[error("building a CSR for {uri} failed")]
    BuildCsr {
        uri: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("signing the certificate for {uri} failed")]
    SignCsr {
        uri: String,
        #[source]
        source: rcgen::Error,
    },
}

/// A SPIFFE trust domain name, such as `cluster.local`.
///
/// It contains 1 to 255 bytes of lowercase ASCII letters, digits, `.`, `-` and `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        validate_trust_domain(value).map_err(|reason| Error::InvalidTrustDomain {
            value: value.to_owned(),
            reason,
        })?;
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Returns why `value` is not a trust domain name, if it is not one.
fn validate_trust_domain(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("must be at most 255 bytes long");
    }
    let valid_byte = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b);
    if !value.bytes().all(valid_byte) {
        return Err("may contain only lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

/// The SPIFFE ID of a workload: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Other SPIFFE ID paths are rejected because every identity in this mesh is a workload.
/// Namespace and service account are path segments of ASCII letters, digits, `.`, `-` and
/// `_`, other than `.` and `..`. The whole ID is at most 2048 bytes long.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds the SPIFFE ID of the workload running as `service_account` in `namespace`.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, Error> {
        let id = Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let invalid = |reason: String| Error::InvalidSpiffeId {
            value: id.to_string(),
            reason,
        };
        validate_path_segment("namespace", namespace).map_err(invalid)?;
        validate_path_segment("service account", service_account).map_err(invalid)?;
        let len = id.to_string().len();
        if len > MAX_SPIFFE_ID_LEN {
            return Err(invalid(format!("is {len} bytes long, the maximum is 2048")));
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidSpiffeId {
            value: value.to_owned(),
            reason,
        };
        if value.len() > MAX_SPIFFE_ID_LEN {
            let len = value.len();
            return Err(invalid(format!("is {len} bytes long, the maximum is 2048")));
        }
        let rest = value
            .strip_prefix(SPIFFE_SCHEME_PREFIX)
            .ok_or_else(|| invalid("must start with spiffe://".to_owned()))?;
        if rest.contains(['?', '#']) {
            return Err(invalid("must not have a query or fragment".to_owned()));
        }
        let shape = "path must be /ns/<namespace>/sa/<service-account>";
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(shape.to_owned()))?;
        validate_trust_domain(authority)
            .map_err(|reason| invalid(format!("trust domain {reason}")))?;

        let segments: Vec<&str> = path.split('/').collect();
        let ["ns", namespace, "sa", service_account] = segments.as_slice() else {
            return Err(invalid(shape.to_owned()));
        };
        validate_path_segment("namespace", namespace).map_err(invalid)?;
        validate_path_segment("service account", service_account).map_err(invalid)?;

        Ok(Self {
            trust_domain: TrustDomain(authority.to_owned()),
            namespace: (*namespace).to_owned(),
            service_account: (*service_account).to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME_PREFIX}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The SPIFFE ID of a node daemon: `spiffe://<trust-domain>/node/<name>`.
///
/// The CA issues it in exchange for the node's join token, and the daemon presents it
/// only to the CA, never on a tunnel. The name follows the rules of a workload path
/// segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    trust_domain: TrustDomain,
    name: String,
}

impl NodeId {
    /// Builds the SPIFFE ID of node `name`.
    pub fn new(trust_domain: TrustDomain, name: &str) -> Result<Self, Error> {
        validate_path_segment("node name", name).map_err(|reason| Error::InvalidNodeId {
            value: format!("{SPIFFE_SCHEME_PREFIX}{trust_domain}/node/{name}"),
            reason,
        })?;
        Ok(Self {
            trust_domain,
            name: name.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FromStr for NodeId {
    type Err = Error;

    fn from_str(value: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidNodeId {
            value: value.to_owned(),
            reason,
        };
        if value.len() > MAX_SPIFFE_ID_LEN {
            return Err(invalid("is longer than 2048 bytes".to_owned()));
        }
        let rest = value
            .strip_prefix(SPIFFE_SCHEME_PREFIX)
            .ok_or_else(|| invalid("must start with spiffe://".to_owned()))?;
        let shape = "path must be /node/<name>";
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(shape.to_owned()))?;
        let trust_domain: TrustDomain = authority
            .parse()
            .map_err(|error: Error| invalid(error.to_string()))?;
        let name = path
            .strip_prefix("node/")
            .ok_or_else(|| invalid(shape.to_owned()))?;
        if name.contains(['/', '?', '#']) {
            return Err(invalid(shape.to_owned()));
        }
        Self::new(trust_domain, name)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME_PREFIX}{}/node/{}",
            self.trust_domain, self.name
        )
    }
}

/// Returns the SPIFFE ID that the CA service presents as a TLS server:
/// `spiffe://<trust-domain>/ca`.
pub fn ca_service_id(trust_domain: &TrustDomain) -> String {
    format!("{SPIFFE_SCHEME_PREFIX}{trust_domain}/ca")
}

/// The purpose of a leaf certificate, which sets its extended key usages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafUsage {
    /// A workload SVID: serverAuth and clientAuth, because every workload is both ends
    /// of tunnels.
    Workload,
    /// A node SVID: clientAuth only, because a node authenticates only to the CA.
    Node,
    /// The CA service's certificate: serverAuth only.
    CaService,
}

impl LeafUsage {
    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            LeafUsage::Workload => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafUsage::Node => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafUsage::CaService => vec![ExtendedKeyUsagePurpose::ServerAuth],
        }
    }
}

/// Returns why `value` is not a valid SPIFFE ID path segment. Messages call the segment
/// `segment_name`.
fn validate_path_segment(segment_name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{segment_name} must not be empty"));
    }
    if value == "." || value == ".." {
        return Err(format!("{segment_name} must not be '.' or '..'"));
    }
    let valid_byte = |b: u8| b.is_ascii_alphanumeric() || b".-_".contains(&b);
    if !value.bytes().all(valid_byte) {
        return Err(format!(
            "{segment_name} may contain only letters, digits, '.', '-' and '_'"
        ));
    }
    Ok(())
}

/// The root CA of a trust domain. It signs the SVIDs of the node's workloads.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    not_after: SystemTime,
    /// The CA's subject, key identifier method and private key.
    issuer: Issuer<'static, KeyPair>,
    /// The operator's root when this CA is an intermediate under it, `None` when the CA
    /// is a self-signed root.
    root: Option<CertificateDer<'static>>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new root CA for `trust_domain` and writes it to `dir`.
    ///
    /// Creates `dir` with mode 0700 if it is missing. `ca-key.pem` is created with mode
    /// 0600 and `ca-cert.pem` with mode 0644, both reduced by the umask. If either file
    /// exists already, fails and leaves the existing files as they were.
    pub fn init(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, Error> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::CreateDir {
                path: dir.to_owned(),
                source,
            })?;

        let key = generate_key_pair()?;
        let now = SystemTime::now();
        let params = ca_params(trust_domain, now)?;
        let cert = params.self_signed(&key).map_err(|source| Error::SignCa {
            trust_domain: trust_domain.clone(),
            source,
        })?;
        write_new_ca_files(dir, cert.pem().as_bytes(), key.serialize_pem().as_bytes())?;

        Ok(Self {
            trust_domain: trust_domain.clone(),
            cert: cert.der().clone(),
            not_after: whole_seconds(now + CA_VALIDITY),
            issuer: Issuer::new(params, key),
            root: None,
        })
    }

    /// Creates a new intermediate CA for `trust_domain` under the operator's root
    /// (`root_cert_path`, `root_key_path`, both PEM) and writes it to `dir`, with a copy
    /// of the root certificate as `root-cert.pem`. The root key is only read.
    ///
    /// The intermediate is valid for 10 years or until the root expires, whichever comes
    /// first, and may sign only end-entity certificates. The root must allow a path
    /// length of at least 1. Files are created as [`init`](Self::init) creates them.
    pub fn init_intermediate(
        dir: &Path,
        trust_domain: &TrustDomain,
        root_cert_path: &Path,
        root_key_path: &Path,
    ) -> Result<Self, Error> {
        let invalid_root = |reason: String| Error::InvalidCaCertificate {
            path: root_cert_path.to_owned(),
            reason,
        };
        let root_pem = fs::read(root_cert_path).map_err(|source| Error::Read {
            path: root_cert_path.to_owned(),
            source,
        })?;
        let root = CertificateDer::from_pem_slice(&root_pem)
            .map_err(|error| invalid_root(error.to_string()))?;
        let root_not_after = {
            let parsed = parse_certificate(&root).map_err(invalid_root)?;
            system_time(parsed.validity().not_after.timestamp())
        };
        let root_key_pem = read_private_file(root_key_path)?;
        let root_key = KeyPair::from_pem(&root_key_pem).map_err(|source| Error::InvalidCaKey {
            path: root_key_path.to_owned(),
            source,
        })?;
        let root_issuer = Issuer::from_ca_cert_der(&root, root_key)
            .map_err(|error| invalid_root(error.to_string()))?;

        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        let key = generate_key_pair()?;
        let now = SystemTime::now();
        let mut params = ca_params(trust_domain, now)?;
        let not_after = whole_seconds((now + CA_VALIDITY).min(root_not_after));
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &root_issuer)
            .map_err(|source| Error::SignCa {
                trust_domain: trust_domain.clone(),
                source,
            })?;
        write_new_ca_files(dir, cert.pem().as_bytes(), key.serialize_pem().as_bytes())?;
        let root_copy = dir.join(ROOT_CERT_FILE);
        let mut file = create_new_file(&root_copy, 0o644)?;
        write_and_sync(&mut file, &root_copy, &root_pem)?;

        Ok(Self {
            trust_domain: trust_domain.clone(),
            cert: cert.der().clone(),
            not_after,
            issuer: Issuer::new(params, key),
            root: Some(root),
        })
    }

    /// Reads the CA that [`init`](Self::init) wrote to `dir`.
    ///
    /// Rejects a key file that group or others may access, a key that does not match the
    /// certificate, a certificate without a `spiffe://<trust-domain>` URI SAN and an
    /// expired certificate.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let key_pem = read_private_file(&key_path)?;
        let cert_pem = fs::read(&cert_path).map_err(|source| Error::Read {
            path: cert_path.clone(),
            source,
        })?;

        let invalid_cert = |reason: String| Error::InvalidCaCertificate {
            path: cert_path.clone(),
            reason,
        };
        let cert = CertificateDer::from_pem_slice(&cert_pem)
            .map_err(|error| invalid_cert(error.to_string()))?;
        let parsed = parse_certificate(&cert).map_err(invalid_cert)?;
        let trust_domain = ca_trust_domain(&parsed).map_err(invalid_cert)?;
        let not_after = system_time(parsed.validity().not_after.timestamp());

        let key = KeyPair::from_pem(&key_pem).map_err(|source| Error::InvalidCaKey {
            path: key_path.clone(),
            source,
        })?;
        if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch {
                key_path,
                cert_path,
            });
        }
        if not_after <= SystemTime::now() {
            return Err(Error::CaExpired {
                path: cert_path,
                not_after: not_after.into(),
            });
        }
        let root = read_root(dir, &parsed)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|error| invalid_cert(error.to_string()))?;

        Ok(Self {
            trust_domain,
            cert,
            not_after,
            issuer,
            root,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Returns the trust bundle of the trust domain: the root certificate.
    pub fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        vec![self.trust_anchor().clone()]
    }

    /// Returns the root that peers trust: the operator's root for an intermediate, the
    /// CA's own certificate otherwise.
    pub fn trust_anchor(&self) -> &CertificateDer<'static> {
        self.root.as_ref().unwrap_or(&self.cert)
    }

    /// Returns the chain that a leaf signed by this CA is presented with: the leaf,
    /// followed by this CA's certificate when it is an intermediate.
    fn chain_of(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![leaf];
        if self.root.is_some() {
            chain.push(self.cert.clone());
        }
        chain
    }

    /// Issues an SVID for `id` that is valid from 60 seconds ago until `lifetime` from
    /// now, or until the root expires if that comes first.
    pub fn issue(&self, id: &SpiffeId, lifetime: Duration) -> Result<Svid, Error> {
        let now = SystemTime::now();
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now
            .checked_add(lifetime)
            .map_or(self.not_after, |end| end.min(self.not_after));
        self.issue_with_validity(id, not_before, not_after)
    }

    /// Issues an SVID for `id` with an explicit validity period, which tests use to build
    /// expired or not yet valid certificates.
    ///
    /// Generates a fresh P-256 key pair and signs an end-entity certificate whose only
    /// SAN is the URI `id`, with key usage digitalSignature, extended key usages serverAuth
    /// and clientAuth, and a random 16-byte serial number. Both times are truncated to
    /// whole seconds, the precision of X.509.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Svid, Error> {
        if id.trust_domain() != &self.trust_domain {
            return Err(Error::ForeignTrustDomain {
                spiffe_id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let not_before = whole_seconds(not_before);
        let not_after = whole_seconds(not_after);
        if not_before >= not_after {
            return Err(Error::InvalidValidity {
                spiffe_id: id.clone(),
                not_before: not_before.into(),
                not_after: not_after.into(),
            });
        }
        let sign_error = |source| Error::SignSvid {
            spiffe_id: id.clone(),
            source,
        };

        let key = generate_key_pair()?;
        let serial = random_serial()?;
        let params = leaf_params(
            &id.to_string(),
            LeafUsage::Workload,
            not_before,
            not_after,
            &serial,
        )
        .map_err(sign_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_error)?;

        Ok(Svid {
            spiffe_id: id.clone(),
            cert_chain: self.chain_of(cert.der().clone()),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            not_after,
            serial: hex(&serial),
        })
    }

    /// Signs the public key of a verified CSR into a leaf certificate for `uri`, valid
    /// from `not_before` to `not_after` (truncated to whole seconds and cut at the root's
    /// end). Returns the chain without the root, leaf first.
    ///
    /// Only the CSR's public key is used: the URI SAN, key usages and validity come from
    /// the arguments, so a CSR cannot ask for more than the caller checked.
    pub fn sign_csr(
        &self,
        csr: &rcgen::CertificateSigningRequestParams,
        uri: &str,
        usage: LeafUsage,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, Error> {
        let sign_error = |source| Error::SignCsr {
            uri: uri.to_owned(),
            source,
        };
        let not_before = whole_seconds(not_before);
        let not_after = whole_seconds(not_after.min(self.not_after));
        if not_before >= not_after {
            return Err(Error::InvalidCertificate {
                reason: format!("empty validity for {uri}: the CA root expires first"),
            });
        }
        let serial = random_serial()?;
        let params = leaf_params(uri, usage, not_before, not_after, &serial).map_err(sign_error)?;
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        };
        let cert = request.signed_by(&self.issuer).map_err(sign_error)?;
        Ok(self.chain_of(cert.der().clone()))
    }

    /// Issues a leaf with a fresh key pair for `uri`, valid from 60 seconds ago for
    /// `lifetime`: the CA service's own TLS certificate.
    pub fn issue_leaf(
        &self,
        uri: &str,
        usage: LeafUsage,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivatePkcs8KeyDer<'static>), Error> {
        let sign_error = |source| Error::SignCsr {
            uri: uri.to_owned(),
            source,
        };
        let now = SystemTime::now();
        let not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        let not_after = whole_seconds((now + lifetime).min(self.not_after));
        let key = generate_key_pair()?;
        let serial = random_serial()?;
        let params = leaf_params(uri, usage, not_before, not_after, &serial).map_err(sign_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_error)?;
        Ok((
            self.chain_of(cert.der().clone()),
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
    }

    /// Returns the CA's own certificate, the root of the chains it signs.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs a certificate with arbitrary parameters and returns it with its private key,
    /// so that tests can build certificates that [`issue`](Self::issue) rejects.
    #[cfg(test)]
    pub(crate) fn sign_for_test(
        &self,
        params: &CertificateParams,
    ) -> (CertificateDer<'static>, PrivatePkcs8KeyDer<'static>) {
        let key = generate_key_pair().expect("generate a test key pair");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign a test certificate");
        (cert.der().clone(), key.serialize_der().into())
    }
}

/// An X.509 SVID: a workload's certificate chain and private key.
pub struct Svid {
    pub spiffe_id: SpiffeId,
    /// The leaf certificate. The root is not included, because peers have it in their
    /// trust bundle.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// End of validity of the leaf, in whole seconds.
    pub not_after: SystemTime,
    /// Serial number of the leaf in lowercase hex.
    pub serial: String,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

/// Extracts the workload SPIFFE ID from an SVID, which must carry exactly one URI SAN.
///
/// Only parses the certificate: the caller verifies its signature and validity.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    uri_san_of(cert)?.parse()
}

fn parse_certificate<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    let (rest, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(parsed)
}

/// Reads the trust domain from the `spiffe://<trust-domain>` URI SAN of a CA certificate.
fn ca_trust_domain(cert: &X509Certificate<'_>) -> Result<TrustDomain, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|error| format!("subject alternative name: {error}"))?;
    let mut uris = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err("expected exactly one URI SAN spiffe://<trust-domain>".to_owned());
    };
    uri.strip_prefix(SPIFFE_SCHEME_PREFIX)
        .ok_or_else(|| format!("URI SAN {uri:?} is not a SPIFFE ID"))?
        .parse()
        .map_err(|error: Error| error.to_string())
}

/// Builds the parameters of an end-entity certificate whose only SAN is the URI `uri`,
/// with key usage digitalSignature, the extended key usages of `usage` and `serial`.
fn leaf_params(
    uri: &str,
    usage: LeafUsage,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: &[u8],
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    // An SVID's subject is empty, so rcgen marks the URI SAN critical (RFC 5280 4.2.1.6).
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usage.extended_key_usages();
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Generates a P-256 key pair and a CSR whose only SAN is the URI `uri`. Returns the
/// CSR in PEM and the private key, which the caller keeps in memory.
pub fn generate_csr(uri: &str) -> Result<(String, PrivatePkcs8KeyDer<'static>), Error> {
    let csr_error = |source| Error::BuildCsr {
        uri: uri.to_owned(),
        source,
    };
    let key = generate_key_pair()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(csr_error)?)];
    let csr = params.serialize_request(&key).map_err(csr_error)?;
    let pem = csr.pem().map_err(csr_error)?;
    Ok((pem, PrivatePkcs8KeyDer::from(key.serialize_der())))
}

/// Reads `root-cert.pem` of a CA directory, if there is one, and checks that it signed
/// the CA certificate `ca`.
fn read_root(
    dir: &Path,
    ca: &X509Certificate<'_>,
) -> Result<Option<CertificateDer<'static>>, Error> {
    let path = dir.join(ROOT_CERT_FILE);
    let pem = match fs::read(&path) {
        Ok(pem) => pem,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Read { path, source }),
    };
    let invalid = |reason: String| Error::InvalidCaCertificate {
        path: path.clone(),
        reason,
    };
    let root = CertificateDer::from_pem_slice(&pem).map_err(|error| invalid(error.to_string()))?;
    let parsed = parse_certificate(&root).map_err(invalid)?;
    ca.verify_signature(Some(parsed.public_key()))
        .map_err(|_| invalid(format!("did not sign {CA_CERT_FILE}")))?;
    Ok(Some(root))
}

/// Returns the single URI SAN of a certificate.
pub fn uri_san_of(cert: &CertificateDer<'_>) -> Result<String, Error> {
    let parsed = parse_certificate(cert).map_err(|reason| Error::InvalidCertificate { reason })?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|error| Error::InvalidCertificate {
            reason: format!("subject alternative name: {error}"),
        })?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(Error::MissingSpiffeId),
        [uri] => Ok((*uri).to_owned()),
        _ => Err(Error::MultipleUriSans { count: uris.len() }),
    }
}

/// Returns the validity period of a certificate as (not_before, not_after).
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), Error> {
    let parsed = parse_certificate(cert).map_err(|reason| Error::InvalidCertificate { reason })?;
    Ok((
        system_time(parsed.validity().not_before.timestamp()),
        system_time(parsed.validity().not_after.timestamp()),
    ))
}

/// Returns the serial number of a certificate in lowercase hex.
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<String, Error> {
    let parsed = parse_certificate(cert).map_err(|reason| Error::InvalidCertificate { reason })?;
    Ok(hex(parsed.raw_serial()))
}

/// Reads the trust domain of a root certificate from its `spiffe://<trust-domain>` URI
/// SAN.
pub fn trust_domain_of_root(cert: &CertificateDer<'_>) -> Result<TrustDomain, Error> {
    let parsed = parse_certificate(cert).map_err(|reason| Error::InvalidCertificate { reason })?;
    ca_trust_domain(&parsed).map_err(|reason| Error::InvalidCertificate { reason })
}

/// Builds the parameters of a self-signed root for `trust_domain` that is valid for
/// [`CA_VALIDITY`] from `now` and may sign only end-entity certificates.
fn ca_params(trust_domain: &TrustDomain, now: SystemTime) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    // The SPIFFE ID standard (section 3.1) recommends that a signing authority carry a
    // SPIFFE ID of its trust domain without a path. `load` reads the trust domain from it.
    let uri = format!("{SPIFFE_SCHEME_PREFIX}{trust_domain}")
        .try_into()
        .map_err(|source| Error::SignCa {
            trust_domain: trust_domain.clone(),
            source,
        })?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(now)).into();
    params.not_after = whole_seconds(now + CA_VALIDITY).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    Ok(params)
}

fn generate_key_pair() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::GenerateKey { source })
}

/// Returns 16 random bytes for a certificate serial number. The top bit is cleared so
/// the number is positive, and the next bit is set so its DER encoding keeps all 16 bytes.
fn random_serial() -> Result<[u8; 16], Error> {
    let mut serial = [0u8; 16];
    // The tunnel uses the ring provider, which rustls 0.23.48 deprecates for lacking
    // post-quantum key exchange. That does not affect its random number generator.
    #[allow(deprecated)]
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| Error::Random)?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// Creates the key and certificate files with O_EXCL, so that an existing CA is never
/// overwritten, and removes both again if writing fails.
fn write_new_ca_files(dir: &Path, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), Error> {
    let key_path = dir.join(CA_KEY_FILE);
    let cert_path = dir.join(CA_CERT_FILE);
    let mut key_file = create_new_file(&key_path, 0o600)?;
    let mut cert_file = match create_new_file(&cert_path, 0o644) {
        Ok(file) => file,
        Err(error) => {
            let _ = fs::remove_file(&key_path);
            return Err(error);
        }
    };

    let result = write_and_sync(&mut key_file, &key_path, key_pem)
        .and_then(|()| write_and_sync(&mut cert_file, &cert_path, cert_pem));
    if result.is_err() {
        let _ = fs::remove_file(&key_path);
        let _ = fs::remove_file(&cert_path);
    }
    result
}

fn create_new_file(path: &Path, mode: u32) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => Error::CaExists {
                path: path.to_owned(),
            },
            _ => Error::Write {
                path: path.to_owned(),
                source,
            },
        })
}

fn write_and_sync(file: &mut File, path: &Path, contents: &[u8]) -> Result<(), Error> {
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| Error::Write {
            path: path.to_owned(),
            source,
        })
}

/// Reads a key file after checking, on the open file, that only its owner can access it.
fn read_private_file(path: &Path) -> Result<String, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecureKeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut contents = String::new();
    file.read_to_string(&mut contents).map_err(read_error)?;
    Ok(contents)
}

/// Formats a certificate time as RFC 3339 in UTC, e.g. `2026-12-05T00:41:43Z`, for logs
/// and error messages.
pub fn rfc3339(time: impl Into<OffsetDateTime>) -> String {
    let time: OffsetDateTime = time.into();
    time.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| time.to_string())
}

fn whole_seconds(time: SystemTime) -> SystemTime {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since_epoch) => UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs()),
        Err(_) => time,
    }
}

/// Converts a UNIX timestamp from a certificate, clamping times before 1970 to the epoch.
fn system_time(timestamp: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(timestamp).unwrap_or(0))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Temporary directories and CAs shared by the unit tests of this crate.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{CertificateAuthority, SpiffeId, TrustDomain};

    /// A directory under the system temp directory that is removed on drop.
    pub(crate) struct TestDir {
        path: PathBuf,
    }

    impl TestDir {
        /// Creates an empty directory named after `label`, the process id and a counter,
        /// so that tests running in parallel never share one.
        pub(crate) fn new(label: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("interceptor-test-{label}-{}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            // A directory left by an earlier process with the same pid is stale.
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("create the test directory");
            Self { path }
        }

        pub(crate) fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// A CA created by [`CertificateAuthority::init`] in its own [`TestDir`].
    pub(crate) struct TestCa {
        pub(crate) ca: CertificateAuthority,
        pub(crate) dir: TestDir,
    }

    /// Creates a CA for `trust_domain` in a fresh directory.
    pub(crate) fn test_ca(label: &str, trust_domain: &str) -> TestCa {
        let dir = TestDir::new(label);
        let trust_domain: TrustDomain = trust_domain.parse().expect("parse the test trust domain");
        let ca = CertificateAuthority::init(&dir.path().join("ca"), &trust_domain)
            .expect("initialize the test CA");
        TestCa { ca, dir }
    }

    /// Returns the SPIFFE ID of service account `service_account` in namespace `default`.
    pub(crate) fn workload_id(trust_domain: &TrustDomain, service_account: &str) -> SpiffeId {
        SpiffeId::new(trust_domain.clone(), "default", service_account)
            .expect("build the test SPIFFE ID")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::testing::{test_ca, workload_id, TestDir};
    use super::*;

    #[test]
    fn certificate_time_formats_as_rfc3339() {
        let time = UNIX_EPOCH + Duration::from_secs(1_764_895_303);
        assert_eq!(rfc3339(time), "2025-12-05T00:41:43Z");
    }

    #[test]
    fn spiffe_id_round_trips() {
        let inputs = [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://a/ns/N_s-1.x/sa/S",
            "spiffe://example_td-1.org/ns/..a/sa/b..",
        ];
        for input in inputs {
            let id: SpiffeId = input.parse().expect("parse a valid SPIFFE ID");
            assert_eq!(id.to_string(), input);
        }

        let id: SpiffeId = inputs[0].parse().expect("parse a valid SPIFFE ID");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
    }

    #[test]
    fn spiffe_id_rejects_invalid_input() {
        let long_segment = "a".repeat(MAX_SPIFFE_ID_LEN);
        let too_long = format!("spiffe://td/ns/default/sa/{long_segment}");
        let long_domain = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
        let cases = [
            ("", "empty"),
            ("spiffe://", "scheme only"),
            ("http://td/ns/a/sa/b", "wrong scheme"),
            ("SPIFFE://td/ns/a/sa/b", "uppercase scheme"),
            ("spiffe:td/ns/a/sa/b", "no authority"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://TD/ns/a/sa/b", "uppercase trust domain"),
            ("spiffe://td:8080/ns/a/sa/b", "port"),
            ("spiffe://user@td/ns/a/sa/b", "userinfo"),
            (long_domain.as_str(), "trust domain over 255 bytes"),
            ("spiffe://td", "no path"),
            ("spiffe://td/", "root path"),
            ("spiffe://td/ns/a", "no service account"),
            ("spiffe://td/ns/a/sa", "service account missing"),
            ("spiffe://td/ns/a/sa/b/", "trailing slash"),
            ("spiffe://td/ns/a/sa/b/c", "extra segment"),
            ("spiffe://td/sa/b/ns/a", "swapped keys"),
            ("spiffe://td/NS/a/sa/b", "uppercase key"),
            ("spiffe://td/ns//sa/b", "empty namespace"),
            ("spiffe://td/ns/a/sa/", "empty service account"),
            ("spiffe://td//ns/a/sa/b", "double slash"),
            ("spiffe://td/ns/./sa/b", "dot namespace"),
            ("spiffe://td/ns/a/sa/..", "dot-dot service account"),
            ("spiffe://td/ns/a/sa/b?x=1", "query"),
            ("spiffe://td/ns/a/sa/b#frag", "fragment"),
            ("spiffe://td/ns/a%41/sa/b", "percent-encoding"),
            ("spiffe://td/ns/a b/sa/b", "space"),
            ("spiffe://td/ns/ä/sa/b", "non-ASCII"),
            (too_long.as_str(), "over 2048 bytes"),
        ];
        for (input, case) in cases {
            let result = input.parse::<SpiffeId>();
            assert!(
                matches!(result, Err(Error::InvalidSpiffeId { .. })),
                "{case}: {input:?} parsed as {result:?}"
            );
        }
    }

    #[test]
    fn spiffe_id_new_validates_segments() {
        let td: TrustDomain = "td".parse().expect("parse the trust domain");
        let long = "a".repeat(MAX_SPIFFE_ID_LEN);
        let cases = [
            ("", "sa", "empty namespace"),
            ("ns", "", "empty service account"),
            ("..", "sa", "dot-dot namespace"),
            ("ns", "a/b", "slash in service account"),
            ("ns", long.as_str(), "over 2048 bytes"),
        ];
        for (namespace, service_account, case) in cases {
            let result = SpiffeId::new(td.clone(), namespace, service_account);
            assert!(result.is_err(), "{case}: accepted as {result:?}");
        }

        let id = SpiffeId::new(td, "default", "web").expect("build a valid SPIFFE ID");
        assert_eq!(id.to_string(), "spiffe://td/ns/default/sa/web");
    }

    #[test]
    fn trust_domain_validation() {
        for valid in ["cluster.local", "a", "td-1_x.y", &"a".repeat(255)] {
            let td: TrustDomain = valid.parse().expect("parse a valid trust domain");
            assert_eq!(td.to_string(), valid);
        }
        for invalid in [
            "",
            "Cluster.local",
            "td:1",
            "td/x",
            "td x",
            &"a".repeat(256),
        ] {
            let result = invalid.parse::<TrustDomain>();
            assert!(result.is_err(), "{invalid:?} accepted as {result:?}");
        }
    }

    #[test]
    fn ca_init_writes_private_key() {
        let test = test_ca("init-mode", "td.test");
        let dir = test.dir.path().join("ca");

        let key_mode = fs::metadata(dir.join(CA_KEY_FILE))
            .expect("stat the CA key")
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&dir)
            .expect("stat the CA directory")
            .permissions()
            .mode();
        assert_eq!(
            dir_mode & 0o077,
            0,
            "CA directory is open to group or others"
        );

        let loaded = CertificateAuthority::load(&dir).expect("load the CA just written");
        assert_eq!(loaded.trust_domain(), test.ca.trust_domain());
        assert_eq!(loaded.trust_bundle(), test.ca.trust_bundle());
    }

    #[test]
    fn loaded_ca_issues_verifiable_svid() {
        let test = test_ca("load-issue", "td.test");
        let loaded = CertificateAuthority::load(&test.dir.path().join("ca"))
            .expect("load the CA just written");
        let id = workload_id(loaded.trust_domain(), "web");
        let svid = loaded
            .issue(&id, Duration::from_secs(3600))
            .expect("issue an SVID from the loaded CA");

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(test.ca.trust_bundle()[0].clone())
            .expect("add the root of the original CA");
        let leaf = rustls::server::ParsedCertificate::try_from(&svid.cert_chain[0])
            .expect("parse the SVID");
        #[allow(deprecated)]
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            algorithms,
        )
        .expect("the SVID chains to the root written by init");
    }

    #[test]
    fn intermediate_chains_to_operator_root() {
        let operator = test_ca("intermediate-root", "td.test");
        let operator_dir = operator.dir.path().join("ca");
        let dir = TestDir::new("intermediate");
        let ca_dir = dir.path().join("ca");
        let intermediate = CertificateAuthority::init_intermediate(
            &ca_dir,
            operator.ca.trust_domain(),
            &operator_dir.join(CA_CERT_FILE),
            &operator_dir.join(CA_KEY_FILE),
        )
        .expect("create an intermediate");
        assert_eq!(intermediate.trust_bundle(), operator.ca.trust_bundle());

        let loaded = CertificateAuthority::load(&ca_dir).expect("load the intermediate");
        assert_eq!(loaded.trust_bundle(), operator.ca.trust_bundle());
        let id = workload_id(loaded.trust_domain(), "web");
        let svid = loaded
            .issue(&id, Duration::from_secs(3600))
            .expect("issue an SVID from the intermediate");
        assert_eq!(svid.cert_chain.len(), 2, "leaf and intermediate");

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(operator.ca.trust_bundle()[0].clone())
            .expect("add the operator's root");
        let leaf = rustls::server::ParsedCertificate::try_from(&svid.cert_chain[0])
            .expect("parse the SVID");
        #[allow(deprecated)]
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &roots,
            &svid.cert_chain[1..],
            rustls::pki_types::UnixTime::now(),
            algorithms,
        )
        .expect("the SVID chains to the operator's root through the intermediate");

        // A root that did not sign the intermediate is rejected at load.
        let other = test_ca("intermediate-other", "td.test");
        fs::copy(
            other.dir.path().join("ca").join(CA_CERT_FILE),
            ca_dir.join(ROOT_CERT_FILE),
        )
        .expect("replace the root");
        let result = CertificateAuthority::load(&ca_dir);
        assert!(
            matches!(result, Err(Error::InvalidCaCertificate { .. })),
            "load returned {result:?}"
        );
    }

    #[test]
    fn ca_init_never_overwrites() {
        let test = test_ca("init-twice", "td.test");
        let dir = test.dir.path().join("ca");
        let key_before = fs::read(dir.join(CA_KEY_FILE)).expect("read the CA key");

        let result = CertificateAuthority::init(&dir, test.ca.trust_domain());
        let Err(Error::CaExists { path }) = result else {
            panic!("second init returned {result:?}, expected CaExists");
        };
        assert_eq!(path, dir.join(CA_KEY_FILE));
        let key_after = fs::read(dir.join(CA_KEY_FILE)).expect("read the CA key again");
        assert_eq!(key_before, key_after, "the existing key was modified");

        // A leftover certificate alone also blocks init, and the new key is removed again.
        fs::remove_file(dir.join(CA_KEY_FILE)).expect("remove the CA key");
        let result = CertificateAuthority::init(&dir, test.ca.trust_domain());
        let Err(Error::CaExists { path }) = result else {
            panic!("init over a certificate returned {result:?}, expected CaExists");
        };
        assert_eq!(path, dir.join(CA_CERT_FILE));
        assert!(
            !dir.join(CA_KEY_FILE).exists(),
            "a half-written CA was left behind"
        );
    }

    #[test]
    fn ca_load_rejects_open_key_file() {
        let test = test_ca("load-mode", "td.test");
        let dir = test.dir.path().join("ca");
        let key_path = dir.join(CA_KEY_FILE);
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644))
            .expect("chmod the CA key");

        let result = CertificateAuthority::load(&dir);
        let Err(error @ Error::InsecureKeyMode { .. }) = result else {
            panic!("load returned {result:?}, expected InsecureKeyMode");
        };
        let message = error.to_string();
        assert!(
            message.contains(&key_path.display().to_string()),
            "{message}"
        );
        assert!(message.contains("0644"), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
    }

    #[test]
    fn ca_load_rejects_mismatched_key() {
        let first = test_ca("load-mismatch-a", "td.test");
        let second = test_ca("load-mismatch-b", "td.test");
        let first_dir = first.dir.path().join("ca");
        let second_dir = second.dir.path().join("ca");
        fs::copy(second_dir.join(CA_KEY_FILE), first_dir.join(CA_KEY_FILE))
            .expect("copy the other CA's key");

        let result = CertificateAuthority::load(&first_dir);
        assert!(
            matches!(result, Err(Error::KeyMismatch { .. })),
            "load returned {result:?}"
        );
    }

    #[test]
    fn ca_load_reports_missing_directory() {
        let dir = TestDir::new("load-missing");
        let result = CertificateAuthority::load(&dir.path().join("absent"));
        assert!(
            matches!(result, Err(Error::Read { .. })),
            "load returned {result:?}"
        );
    }

    #[test]
    fn issued_svid_carries_spiffe_id() {
        let test = test_ca("issue", "td.test");
        let id = workload_id(test.ca.trust_domain(), "web");
        let before = SystemTime::now();

        let svid = test
            .ca
            .issue(&id, Duration::from_secs(3600))
            .expect("issue an SVID");

        assert_eq!(svid.spiffe_id, id);
        assert_eq!(svid.cert_chain.len(), 1);
        let parsed_id = spiffe_id_of(&svid.cert_chain[0]).expect("read the SPIFFE ID back");
        assert_eq!(parsed_id, id);
        assert_eq!(svid.serial.len(), 32);
        assert!(svid.not_after > before + Duration::from_secs(3590));
        assert!(svid.not_after <= before + Duration::from_secs(3601));
        assert!(!format!("{svid:?}").contains("key"), "Debug shows the key");

        let (_, cert) = x509_parser::parse_x509_certificate(svid.cert_chain[0].as_ref())
            .expect("parse the SVID");
        assert!(!cert.is_ca());
        assert_eq!(hex(cert.raw_serial()), svid.serial);
        let usage = cert
            .key_usage()
            .expect("key usage")
            .expect("key usage present");
        assert!(usage.value.digital_signature());
        assert!(!usage.value.key_cert_sign());
        let eku = cert
            .extended_key_usage()
            .expect("extended key usage")
            .expect("extended key usage present");
        assert!(eku.value.server_auth);
        assert!(eku.value.client_auth);
        let skew = before
            .duration_since(UNIX_EPOCH)
            .expect("time after 1970")
            .as_secs() as i64
            - cert.validity().not_before.timestamp();
        assert!(
            (59..=61).contains(&skew),
            "not_before is {skew} s in the past"
        );
    }

    #[test]
    fn issue_rejects_foreign_trust_domain() {
        let test = test_ca("issue-foreign", "td.test");
        let other: TrustDomain = "other.test".parse().expect("parse the trust domain");
        let id = workload_id(&other, "web");

        let result = test.ca.issue(&id, Duration::from_secs(3600));
        assert!(
            matches!(result, Err(Error::ForeignTrustDomain { .. })),
            "issue returned {result:?}"
        );
    }

    #[test]
    fn issue_rejects_empty_validity() {
        let test = test_ca("issue-validity", "td.test");
        let id = workload_id(test.ca.trust_domain(), "web");
        let now = SystemTime::now();

        let result = test.ca.issue_with_validity(&id, now, now);
        assert!(
            matches!(result, Err(Error::InvalidValidity { .. })),
            "issue_with_validity returned {result:?}"
        );
    }

    #[test]
    fn spiffe_id_of_rejects_bad_sans() {
        let test = test_ca("sans", "td.test");
        let uri = |value: &str| SanType::URI(value.try_into().expect("valid IA5 string"));
        let cases = [
            (vec![], "no SAN"),
            (
                vec![SanType::DnsName(
                    "web.test".try_into().expect("valid IA5 string"),
                )],
                "DNS only",
            ),
            (
                vec![
                    uri("spiffe://td.test/ns/a/sa/b"),
                    uri("spiffe://td.test/ns/a/sa/c"),
                ],
                "two URIs",
            ),
            (
                vec![uri("spiffe://td.test/other/path")],
                "non-workload path",
            ),
            (vec![uri("https://td.test/ns/a/sa/b")], "non-SPIFFE URI"),
        ];
        for (sans, case) in cases {
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans;
            let (cert, _) = test.ca.sign_for_test(&params);
            let result = spiffe_id_of(&cert);
            assert!(result.is_err(), "{case}: accepted as {result:?}");
        }

        let (cert, _) = test.ca.sign_for_test(&CertificateParams::default());
        assert!(matches!(spiffe_id_of(&cert), Err(Error::MissingSpiffeId)));
        assert!(matches!(
            spiffe_id_of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01])),
            Err(Error::InvalidCertificate { .. })
        ));
    }
}
