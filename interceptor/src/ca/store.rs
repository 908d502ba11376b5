//! The CA directory of `interceptor ca serve`: the signing root, the published trust
//! bundle and the steps of a root rotation.
//!
//! ```text
//! <dir>/ca-cert.pem, ca-key.pem     the CA that signs (key mode 0600)
//! <dir>/root-cert.pem               the operator's root, when the CA is an intermediate
//! <dir>/trust-bundle.pem            further roots to publish, during a rotation
//! <dir>/next/ca-cert.pem, ca-key.pem  the prepared root of a rotation
//! <dir>/rotation-activated          UNIX time of the last `activate`, until `finish`
//! <dir>/join-tokens/<node>          hashed join tokens (see `tokens`)
//! ```
//!
//! The published bundle is the signing root followed by the roots in
//! `trust-bundle.pem`, without duplicates. A rotation is `prepare` (create the next
//! root and publish it), `activate` (sign with it, keep publishing the old one) and
//! `finish` (stop publishing the old root). The service rereads these files every
//! second, so each step takes effect without a restart. `finish` rejects a call before
//! the certificates that the old root signed can have expired, unless forced.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::identity::{self, CertificateAuthority, CA_CERT_FILE, CA_KEY_FILE};

/// Roots published besides the signing root.
pub const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Directory of the prepared root during a rotation.
pub const NEXT_DIR: &str = "next";
/// File with the UNIX time in seconds at which `activate` ran, removed by `finish`.
pub const ACTIVATED_FILE: &str = "rotation-activated";

/// Errors of reading the CA directory and of the rotation steps.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the signing CA from {path} failed")]
    Ca {
        path: PathBuf,
        /// Boxed so that `Error` stays within clippy's `result_large_err` limit.
        #[source]
        source: Box<identity::Error>,
    },
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
    #[error("invalid certificate in {path}: {reason}")]
    InvalidBundle { path: PathBuf, reason: String },
    #[error("a rotation is already prepared in {path}: run `interceptor ca rotate activate`, or remove that directory to start over")]
    AlreadyPrepared { path: PathBuf },
    #[error("no prepared root in {path}: run `interceptor ca rotate prepare` first")]
    NotPrepared { path: PathBuf },
    #[error("too early to finish the rotation: the old root signed certificates until {} that may stay valid for up to {wait:?} (--max-lifetime plus --margin), so finish is safe from {}. Run it again then, or pass --force to stop trusting those certificates now", identity::rfc3339(*.activated), identity::rfc3339(*.safe_at))]
    TooEarly {
        activated: SystemTime,
        wait: Duration,
        safe_at: SystemTime,
    },
    #[error("invalid activation time in {path}: {text:?}")]
    InvalidActivation { path: PathBuf, text: String },
    #[error("the CA in {path} is an intermediate under an operator's root, which `ca rotate` does not rotate: rotate the operator's root with the operator's own tools")]
    IntermediateRotation { path: PathBuf },
}

/// The signing CA and the published trust bundle, as read from the CA directory.
#[derive(Debug)]
pub struct Loaded {
    pub ca: CertificateAuthority,
    /// Every root to trust, the signing root first.
    pub bundle: Vec<CertificateDer<'static>>,
}

/// Reads the signing CA and the trust bundle from `dir`.
pub fn load(dir: &Path) -> Result<Loaded, Error> {
    let ca = CertificateAuthority::load(dir).map_err(|source| Error::Ca {
        path: dir.to_owned(),
        source: Box::new(source),
    })?;
    let mut bundle = vec![ca.trust_anchor().clone()];
    for root in read_extra_roots(dir)? {
        if !bundle.contains(&root) {
            bundle.push(root);
        }
    }
    Ok(Loaded { ca, bundle })
}

/// Reads the roots of `trust-bundle.pem`; none when the file is missing.
fn read_extra_roots(dir: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let path = dir.join(BUNDLE_FILE);
    let pem = match fs::read(&path) {
        Ok(pem) => pem,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::Read { path, source }),
    };
    parse_roots(&pem).map_err(|reason| Error::InvalidBundle { path, reason })
}

/// Parses PEM roots and checks that each is an X.509 certificate. An operator's root
/// need not carry a SPIFFE ID, so none is required.
pub fn parse_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|error| error.to_string())?;
    for root in &roots {
        identity::validity_of(root).map_err(|error| error.to_string())?;
    }
    Ok(roots)
}

/// Encodes certificates as concatenated PEM.
pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|cert| pem::encode(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec())))
        .collect()
}

/// Rotation step 1: creates the next root in `<dir>/next` and adds it to the published
/// bundle. Daemons trust it from their next bundle refresh on.
pub fn prepare_rotation(dir: &Path) -> Result<PathBuf, Error> {
    if dir.join(identity::ROOT_CERT_FILE).exists() {
        return Err(Error::IntermediateRotation {
            path: dir.to_owned(),
        });
    }
    let current = load(dir)?;
    let next = dir.join(NEXT_DIR);
    if next.join(CA_CERT_FILE).exists() || next.join(CA_KEY_FILE).exists() {
        return Err(Error::AlreadyPrepared { path: next });
    }
    let created =
        CertificateAuthority::init(&next, current.ca.trust_domain()).map_err(|source| {
            Error::Ca {
                path: next.clone(),
                source: Box::new(source),
            }
        })?;
    let mut extra = read_extra_roots(dir)?;
    extra.push(created.certificate().clone());
    write_bundle(dir, &extra)?;
    Ok(next)
}

/// Rotation step 2: makes the prepared root the signing root and keeps the old root in
/// the published bundle, so SVIDs it signed stay valid until they expire. Records `now`
/// as the activation time, which `finish` checks.
pub fn activate_rotation(dir: &Path, now: SystemTime) -> Result<(), Error> {
    let current = load(dir)?;
    let next = dir.join(NEXT_DIR);
    if !next.join(CA_CERT_FILE).exists() {
        return Err(Error::NotPrepared { path: next });
    }
    // Loading checks the key's mode and that it matches the certificate.
    let prepared = CertificateAuthority::load(&next).map_err(|source| Error::Ca {
        path: next.clone(),
        source: Box::new(source),
    })?;
    let mut extra = read_extra_roots(dir)?;
    for root in [current.ca.trust_anchor(), prepared.trust_anchor()] {
        if !extra.contains(root) {
            extra.push(root.clone());
        }
    }
    write_bundle(dir, &extra)?;
    // The key is renamed first: the service rejects a key that does not match the
    // certificate, so between the two renames it keeps signing with the old root.
    rename(&next.join(CA_KEY_FILE), &dir.join(CA_KEY_FILE))?;
    rename(&next.join(CA_CERT_FILE), &dir.join(CA_CERT_FILE))?;
    let _ = fs::remove_dir(&next);
    let seconds = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let path = dir.join(ACTIVATED_FILE);
    fs::write(&path, format!("{seconds}\n")).map_err(|source| Error::Write { path, source })
}

/// Reads the time at which `activate` ran; `None` when no rotation is activated.
fn read_activation(dir: &Path) -> Result<Option<SystemTime>, Error> {
    let path = dir.join(ACTIVATED_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Read { path, source }),
    };
    match text.trim().parse::<u64>() {
        Ok(seconds) => Ok(Some(UNIX_EPOCH + Duration::from_secs(seconds))),
        Err(_) => Err(Error::InvalidActivation { path, text }),
    }
}

/// Rotation step 3: stops publishing every root but the signing one. Peers reject
/// certificates of the old root from their next bundle refresh on.
///
/// Unless `force` is set, rejects the call while less than `wait` has passed since
/// `activate`, because certificates that the old root signed just before may still be
/// valid. `wait` is the longest certificate lifetime plus a margin for the daemons'
/// bundle refresh. Without an activation record (a CA activated by an older version,
/// or no rotation at all) there is nothing to check.
pub fn finish_rotation(
    dir: &Path,
    now: SystemTime,
    wait: Duration,
    force: bool,
) -> Result<(), Error> {
    load(dir)?;
    if let Some(activated) = read_activation(dir)? {
        let safe_at = activated + wait;
        if now < safe_at && !force {
            return Err(Error::TooEarly {
                activated,
                wait,
                safe_at,
            });
        }
    }
    for file in [BUNDLE_FILE, ACTIVATED_FILE] {
        let path = dir.join(file);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Write { path, source }),
        }
    }
    Ok(())
}

fn write_bundle(dir: &Path, roots: &[CertificateDer<'static>]) -> Result<(), Error> {
    let path = dir.join(BUNDLE_FILE);
    let temporary = dir.join(format!(".{BUNDLE_FILE}.new"));
    fs::write(&temporary, to_pem(roots)).map_err(|source| Error::Write {
        path: temporary.clone(),
        source,
    })?;
    rename(&temporary, &path)
}

fn rename(from: &Path, to: &Path) -> Result<(), Error> {
    fs::rename(from, to).map_err(|source| Error::Write {
        path: to.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TestDir;
    use crate::identity::TrustDomain;

    #[test]
    fn rotation_steps_change_bundle_and_signer() {
        let dir = TestDir::new("store-rotation");
        let ca_dir = dir.path().join("ca");
        let td: TrustDomain = "td.test".parse().expect("trust domain");
        CertificateAuthority::init(&ca_dir, &td).expect("init");
        let old = load(&ca_dir).expect("load");
        assert_eq!(old.bundle.len(), 1);
        let old_root = old.ca.certificate().clone();

        prepare_rotation(&ca_dir).expect("prepare");
        let prepared = load(&ca_dir).expect("load after prepare");
        assert_eq!(
            prepared.ca.certificate(),
            &old_root,
            "prepare changed the signer"
        );
        assert_eq!(prepared.bundle.len(), 2);
        assert!(matches!(
            prepare_rotation(&ca_dir),
            Err(Error::AlreadyPrepared { .. })
        ));

        let activated = SystemTime::now();
        activate_rotation(&ca_dir, activated).expect("activate");
        let active = load(&ca_dir).expect("load after activate");
        assert_ne!(
            active.ca.certificate(),
            &old_root,
            "activate kept the signer"
        );
        assert_eq!(&active.bundle[0], active.ca.certificate());
        assert!(
            active.bundle.contains(&old_root),
            "the old root was dropped"
        );
        assert_eq!(active.bundle.len(), 2);
        assert!(matches!(
            activate_rotation(&ca_dir, activated),
            Err(Error::NotPrepared { .. })
        ));

        let wait = Duration::from_secs(3600);
        finish_rotation(&ca_dir, activated + wait, wait, false).expect("finish");
        assert!(!ca_dir.join(ACTIVATED_FILE).exists(), "the record stayed");
        let finished = load(&ca_dir).expect("load after finish");
        assert_eq!(finished.bundle, vec![finished.ca.certificate().clone()]);
    }

    #[test]
    fn finish_before_wait_rejected_unless_forced() {
        let dir = TestDir::new("store-finish-early");
        let ca_dir = dir.path().join("ca");
        let td: TrustDomain = "td.test".parse().expect("trust domain");
        CertificateAuthority::init(&ca_dir, &td).expect("init");
        prepare_rotation(&ca_dir).expect("prepare");
        let activated = UNIX_EPOCH + Duration::from_secs(1_764_900_000);
        activate_rotation(&ca_dir, activated).expect("activate");
        let wait = Duration::from_secs(3600);

        let early = finish_rotation(&ca_dir, activated + wait / 2, wait, false);
        let error = early.expect_err("finish half way through the wait");
        assert!(matches!(error, Error::TooEarly { .. }), "{error:?}");
        let text = error.to_string();
        assert!(
            text.contains("2025-12-05T03:00:00Z"),
            "no safe time: {text}"
        );
        assert!(text.contains("--force"), "{text}");
        assert_eq!(
            load(&ca_dir).expect("load").bundle.len(),
            2,
            "a rejected finish changed the bundle"
        );

        finish_rotation(&ca_dir, activated + wait / 2, wait, true).expect("forced finish");
        assert_eq!(load(&ca_dir).expect("load").bundle.len(), 1);
    }

    #[test]
    fn intermediate_is_not_rotated() {
        let dir = TestDir::new("store-intermediate");
        let td: TrustDomain = "td.test".parse().expect("trust domain");
        let operator_dir = dir.path().join("operator");
        CertificateAuthority::init(&operator_dir, &td).expect("init the operator's root");
        let ca_dir = dir.path().join("ca");
        CertificateAuthority::init_intermediate(
            &ca_dir,
            &td,
            &operator_dir.join(CA_CERT_FILE),
            &operator_dir.join(CA_KEY_FILE),
        )
        .expect("init the intermediate");

        let result = prepare_rotation(&ca_dir);
        assert!(
            matches!(result, Err(Error::IntermediateRotation { .. })),
            "prepare returned {result:?}"
        );
        assert!(
            !ca_dir.join(NEXT_DIR).exists(),
            "prepare created a next root"
        );
    }
}
