//! Checks of the certificate signing requests that the CA service signs: form,
//! signature, key strength, SPIFFE ID and trust domain here, and the node assignment in
//! [`authorize`].

use rcgen::{CertificateSigningRequestParams, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::identity::{NodeId, SpiffeId, TrustDomain};
use crate::workloads::Directory;

/// Smallest RSA modulus accepted, in bits (NIST SP 800-57 part 1 rev. 5 allows 2048-bit
/// RSA through 2030).
const MIN_RSA_BITS: usize = 2048;

/// The reason the CA rejects a CSR. Each message is returned to the caller and logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("malformed CSR: {reason}")]
    Malformed { reason: String },
    #[error("weak key: {reason}")]
    WeakKey { reason: String },
    #[error("the CSR must carry exactly one URI SAN and no other SAN, but has {count} SANs ({uris} URIs)")]
    SanCount { count: usize, uris: usize },
    #[error("invalid SPIFFE ID {uri:?}: {reason}")]
    InvalidSpiffeId { uri: String, reason: String },
    #[error("SPIFFE ID {uri} is not in the CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        uri: String,
        trust_domain: TrustDomain,
    },
    #[error("{requested} is not assigned to node {node} in the workload directory")]
    NotAssigned { requested: String, node: String },
}

/// The identity that a CSR requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    Workload(SpiffeId),
    Node(NodeId),
}

impl std::fmt::Display for Requested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requested::Workload(id) => id.fmt(f),
            Requested::Node(id) => id.fmt(f),
        }
    }
}

/// A CSR whose form, signature, key and SPIFFE ID passed the checks of [`check`].
#[derive(Debug)]
pub struct CheckedCsr {
    pub requested: Requested,
    pub params: CertificateSigningRequestParams,
}

/// Parses a PEM CSR and checks everything that does not depend on the caller. These are
/// the PKCS #10 signature and the key (P-256, P-384, Ed25519 or RSA of 2048 bits or
/// more). The CSR must carry exactly one URI SAN, a workload or node SPIFFE ID of
/// `trust_domain`.
pub fn check(pem: &str, trust_domain: &TrustDomain) -> Result<CheckedCsr, Rejection> {
    let malformed = |reason: String| Rejection::Malformed { reason };
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| malformed(format!("not a PEM certificate request: {error}")))?;
    check_key(&der)?;
    let params = CertificateSigningRequestParams::from_der(&der).map_err(|error| {
        malformed(match error {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "the signature does not verify".to_owned()
            }
            other => other.to_string(),
        })
    })?;

    let sans = &params.params.subject_alt_names;
    let uris: Vec<&str> = sans
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(Rejection::SanCount {
            count: sans.len(),
            uris: uris.len(),
        });
    };
    if sans.len() != 1 {
        return Err(Rejection::SanCount {
            count: sans.len(),
            uris: 1,
        });
    }

    let requested = parse_requested(uri)?;
    let requested_domain = match &requested {
        Requested::Workload(id) => id.trust_domain(),
        Requested::Node(id) => id.trust_domain(),
    };
    if requested_domain != trust_domain {
        return Err(Rejection::ForeignTrustDomain {
            uri: (*uri).to_owned(),
            trust_domain: trust_domain.clone(),
        });
    }
    Ok(CheckedCsr { requested, params })
}

/// Parses a URI SAN as a node ID when its path starts with `/node/`, else as a
/// workload ID.
fn parse_requested(uri: &str) -> Result<Requested, Rejection> {
    let invalid = |error: crate::identity::Error| Rejection::InvalidSpiffeId {
        uri: uri.to_owned(),
        reason: error.to_string(),
    };
    let is_node = uri
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path.starts_with("node/"));
    if is_node {
        uri.parse().map(Requested::Node).map_err(invalid)
    } else {
        uri.parse().map(Requested::Workload).map_err(invalid)
    }
}

/// Rejects public keys weaker than P-256: RSA below [`MIN_RSA_BITS`], other curves and
/// other algorithms.
fn check_key(der: &CertificateSigningRequestDer<'_>) -> Result<(), Rejection> {
    let (_, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|error| Rejection::Malformed {
            reason: error.to_string(),
        })?;
    let spki = &csr.certification_request_info.subject_pki;
    let weak = |reason: String| Rejection::WeakKey { reason };
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|parameters| parameters.as_oid().ok());
        return match curve {
            Some(curve) if curve == OID_EC_P256 || curve == OID_NIST_EC_P384 => Ok(()),
            Some(curve) => Err(weak(format!(
                "elliptic curve {curve} is not accepted: use P-256 or P-384"
            ))),
            None => Err(weak("elliptic curve key without a named curve".to_owned())),
        };
    }
    if *algorithm == OID_SIG_ED25519 {
        return Ok(());
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => 0,
        };
        if bits < MIN_RSA_BITS {
            return Err(weak(format!(
                "RSA key of {bits} bits, the minimum is {MIN_RSA_BITS}"
            )));
        }
        return Ok(());
    }
    Err(weak(format!(
        "key algorithm {algorithm} is not accepted: use ECDSA P-256 or P-384, Ed25519 or RSA"
    )))
}

/// Checks that node `caller` may receive `requested`: its own node ID, or the SPIFFE
/// ID of a workload that `directory` places on it.
pub fn authorize(
    requested: &Requested,
    caller: &NodeId,
    directory: &Directory,
) -> Result<(), Rejection> {
    let assigned = match requested {
        Requested::Node(id) => id == caller,
        Requested::Workload(id) => directory
            .on_node(caller.name())
            .any(|workload| &workload.spiffe_id == id),
    };
    if assigned {
        Ok(())
    } else {
        Err(Rejection::NotAssigned {
            requested: requested.to_string(),
            node: caller.name().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ED25519};

    use super::*;
    use crate::identity::generate_csr;

    fn td() -> TrustDomain {
        "td.test".parse().expect("parse the trust domain")
    }

    /// Builds a PEM CSR with `sans`, signed by a fresh P-256 key.
    fn csr_with_sans(sans: Vec<SanType>) -> String {
        let key = KeyPair::generate().expect("generate a key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params
            .serialize_request(&key)
            .expect("serialize the CSR")
            .pem()
            .expect("encode the CSR")
    }

    fn uri(value: &str) -> SanType {
        SanType::URI(value.try_into().expect("valid IA5 string"))
    }

    fn directory() -> Directory {
        let text = r#"
trust_domain = "td.test"

[[nodes]]
name = "n1"
cgroup = "interceptor/n1"

[[nodes]]
name = "n2"
cgroup = "interceptor/n2"

[[workloads]]
name = "web"
namespace = "default"
service_account = "web"
node = "n1"
ip = "10.1.1.11"
netns = "/run/netns/web"
cgroup = "interceptor/n1/web"

[[workloads]]
name = "db"
namespace = "default"
service_account = "db"
node = "n2"
ip = "10.1.2.11"
netns = "/run/netns/db"
cgroup = "interceptor/n2/db"
"#;
        Directory::parse(std::path::Path::new("mesh.toml"), text).expect("parse the directory")
    }

    #[test]
    fn workload_and_node_csrs_pass() {
        let (pem, _key) = generate_csr("spiffe://td.test/ns/default/sa/web").expect("build a CSR");
        let checked = check(&pem, &td()).expect("a valid workload CSR passes");
        assert_eq!(
            checked.requested.to_string(),
            "spiffe://td.test/ns/default/sa/web"
        );

        let (pem, _key) = generate_csr("spiffe://td.test/node/n1").expect("build a CSR");
        let checked = check(&pem, &td()).expect("a valid node CSR passes");
        assert!(matches!(checked.requested, Requested::Node(_)));
    }

    #[test]
    fn ed25519_key_passes() {
        let key = KeyPair::generate_for(&PKCS_ED25519).expect("generate an Ed25519 key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri("spiffe://td.test/ns/default/sa/web")];
        let pem = params
            .serialize_request(&key)
            .expect("serialize the CSR")
            .pem()
            .expect("encode the CSR");
        check(&pem, &td()).expect("an Ed25519 CSR passes");
    }

    #[test]
    fn each_rejection_reason() {
        let weak_rsa = include_str!("testdata/rsa1024.csr.pem");
        let (valid, _key) =
            generate_csr("spiffe://td.test/ns/default/sa/web").expect("build a CSR");
        let mut tampered_der = CertificateSigningRequestDer::from_pem_slice(valid.as_bytes())
            .expect("decode the CSR")
            .as_ref()
            .to_vec();
        let last = tampered_der.len() - 1;
        tampered_der[last] ^= 0x01;
        let tampered = pem_of(&tampered_der);

        type Check = fn(&Rejection) -> bool;
        let cases: Vec<(&str, String, Check)> = vec![
            ("not PEM", "hello".to_owned(), |r| {
                matches!(r, Rejection::Malformed { .. })
            }),
            (
                "bad signature",
                tampered,
                |r| matches!(r, Rejection::Malformed { reason } if reason.contains("signature")),
            ),
            (
                "RSA 1024",
                weak_rsa.to_owned(),
                |r| matches!(r, Rejection::WeakKey { reason } if reason.contains("1024")),
            ),
            ("no SAN", csr_with_sans(vec![]), |r| {
                matches!(r, Rejection::SanCount { count: 0, .. })
            }),
            (
                "two URIs",
                csr_with_sans(vec![
                    uri("spiffe://td.test/ns/a/sa/b"),
                    uri("spiffe://td.test/ns/a/sa/c"),
                ]),
                |r| matches!(r, Rejection::SanCount { uris: 2, .. }),
            ),
            (
                "URI and DNS name",
                csr_with_sans(vec![
                    uri("spiffe://td.test/ns/a/sa/b"),
                    SanType::DnsName("web.test".try_into().expect("valid DNS name")),
                ]),
                |r| matches!(r, Rejection::SanCount { count: 2, .. }),
            ),
            (
                "malformed SPIFFE ID",
                csr_with_sans(vec![uri("spiffe://td.test/ns/a/sa/b/extra")]),
                |r| matches!(r, Rejection::InvalidSpiffeId { .. }),
            ),
            (
                "not SPIFFE",
                csr_with_sans(vec![uri("https://td.test/ns/a/sa/b")]),
                |r| matches!(r, Rejection::InvalidSpiffeId { .. }),
            ),
            (
                "foreign trust domain",
                csr_with_sans(vec![uri("spiffe://other.test/ns/a/sa/b")]),
                |r| matches!(r, Rejection::ForeignTrustDomain { .. }),
            ),
        ];
        for (case, pem, expected) in cases {
            let result = check(&pem, &td());
            match result {
                Err(rejection) => assert!(expected(&rejection), "{case}: rejected as {rejection}"),
                Ok(checked) => panic!("{case}: accepted {:?}", checked.requested),
            }
        }
    }

    #[test]
    fn authorize_checks_node_assignment() {
        let directory = directory();
        let n1 = NodeId::new(td(), "n1").expect("node ID");
        let n2 = NodeId::new(td(), "n2").expect("node ID");
        let web = Requested::Workload("spiffe://td.test/ns/default/sa/web".parse().expect("ID"));

        assert_eq!(authorize(&web, &n1, &directory), Ok(()));
        let rejection = authorize(&web, &n2, &directory).expect_err("web is not on n2");
        assert_eq!(
            rejection.to_string(),
            "spiffe://td.test/ns/default/sa/web is not assigned to node n2 in the workload directory"
        );

        assert_eq!(
            authorize(&Requested::Node(n1.clone()), &n1, &directory),
            Ok(())
        );
        assert!(matches!(
            authorize(&Requested::Node(n1), &n2, &directory),
            Err(Rejection::NotAssigned { .. })
        ));
    }

    fn pem_of(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
    }
}
