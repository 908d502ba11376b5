//! One-time join tokens, with which a node daemon attests its node to the CA.
//!
//! `interceptor ca token --node NAME` draws 32 random bytes, prints them once in hex (or
//! writes them to `--out FILE` with mode 0600) and stores only their SHA-256 with an
//! expiry in `<ca-dir>/join-tokens/NAME` (mode 0600). Redeeming a token removes that
//! file, so each token works once; a new token for the same node replaces an unused one.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

use super::files;
use crate::identity::{NodeId, TrustDomain};

/// Directory of the token files inside the CA directory.
pub const TOKEN_DIR: &str = "join-tokens";
/// Random bytes in a token.
const TOKEN_LEN: usize = 32;

/// Errors of creating and redeeming join tokens.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid node name {node:?}")]
    InvalidNode {
        node: String,
        /// Boxed so that `Error` stays within clippy's `result_large_err` limit.
        #[source]
        source: Box<crate::identity::Error>,
    },
    #[error("reading random bytes for a join token failed")]
    Random,
    #[error("writing join token file {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no unused join token for node {node}: create one with `interceptor ca token --dir {} --node {node}`", dir.display())]
    Missing { node: String, dir: PathBuf },
    #[error("reading join token file {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} must not be accessible to group or others but has mode {mode:04o}: run `chmod 600 {path}`, or create the file under `umask 077`")]
    InsecureMode { path: PathBuf, mode: u32 },
    #[error("invalid join token file {path}: {reason}")]
    InvalidFile { path: PathBuf, reason: &'static str },
    #[error("the join token for node {node} does not match")]
    Mismatch { node: String },
    #[error("the join token for node {node} expired; create a new one with `interceptor ca token --dir {} --node {node}`", dir.display())]
    Expired { node: String, dir: PathBuf },
}

/// Creates a join token for `node`, valid for `ttl`, and returns it in hex.
pub fn create(
    ca_dir: &Path,
    trust_domain: &TrustDomain,
    node: &str,
    ttl: Duration,
) -> Result<String, Error> {
    // The node name becomes a file name, so it must pass the SPIFFE path segment rules.
    NodeId::new(trust_domain.clone(), node).map_err(|source| Error::InvalidNode {
        node: node.to_owned(),
        source: Box::new(source),
    })?;
    let mut token = [0u8; TOKEN_LEN];
    SystemRandom::new()
        .fill(&mut token)
        .map_err(|_| Error::Random)?;
    let token = hex(&token);
    let expires = SystemTime::now() + ttl;
    let expires_unix = expires
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let contents = format!("sha256 {}\nexpires {expires_unix}\n", sha256_hex(&token));

    let dir = ca_dir.join(TOKEN_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| Error::Write {
            path: dir.clone(),
            source,
        })?;
    write_private(&dir.join(node), contents.as_bytes())?;
    Ok(token)
}

/// Writes `token` and a newline to `path` with mode 0600, replacing the file if it
/// exists, for the daemon's `--join-token-file`.
pub fn write_token_file(path: &Path, token: &str) -> Result<(), Error> {
    write_private(path, format!("{token}\n").as_bytes())
}

/// Writes `contents` to `path` with mode 0600, see [`files::write_atomically`].
fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    files::write_atomically(path, contents, 0o600)
        .map_err(|(path, source)| Error::Write { path, source })
}

/// Redeems `token` for `node` at time `now`: checks it against the stored hash and
/// expiry, then removes the token file. Of two concurrent redemptions, only the one
/// that removes the file succeeds.
pub fn redeem(ca_dir: &Path, node: &str, token: &str, now: SystemTime) -> Result<(), Error> {
    let path = ca_dir.join(TOKEN_DIR).join(node);
    let contents = match read_private(&path) {
        Err(Error::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                node: node.to_owned(),
                dir: ca_dir.to_owned(),
            })
        }
        other => other?,
    };
    let invalid = |reason| Error::InvalidFile {
        path: path.clone(),
        reason,
    };
    let mut hash = None;
    let mut expires = None;
    for line in contents.lines() {
        match line.split_once(' ') {
            Some(("sha256", value)) => hash = Some(value.to_owned()),
            Some(("expires", value)) => {
                expires = Some(value.parse::<u64>().map_err(|_| invalid("bad expiry"))?)
            }
            _ => return Err(invalid("unknown line")),
        }
    }
    let hash = hash.ok_or_else(|| invalid("missing sha256 line"))?;
    let expires = expires.ok_or_else(|| invalid("missing expires line"))?;

    let offered = sha256_hex(token);
    if !equal_in_constant_time(offered.as_bytes(), hash.as_bytes()) {
        return Err(Error::Mismatch {
            node: node.to_owned(),
        });
    }
    if now > UNIX_EPOCH + Duration::from_secs(expires) {
        let _ = fs::remove_file(&path);
        return Err(Error::Expired {
            node: node.to_owned(),
            dir: ca_dir.to_owned(),
        });
    }
    fs::remove_file(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::Missing {
            node: node.to_owned(),
            dir: ca_dir.to_owned(),
        },
        _ => Error::Read {
            path: path.clone(),
            source,
        },
    })
}

/// Reads a file after checking, on the open file, that only its owner can access it.
pub(crate) fn read_private(path: &Path) -> Result<String, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecureMode {
            path: path.to_owned(),
            mode,
        });
    }
    io::read_to_string(file).map_err(read_error)
}

/// Compares two byte strings in time that depends only on their lengths, so the
/// comparison leaks nothing about how many leading bytes of a guess are right.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn sha256_hex(token: &str) -> String {
    hex(digest::digest(&digest::SHA256, token.trim().as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::testing::TestDir;

    fn td() -> TrustDomain {
        "td.test".parse().expect("parse the trust domain")
    }

    #[test]
    fn token_works_once() {
        let dir = TestDir::new("token-once");
        let token = create(dir.path(), &td(), "n1", Duration::from_secs(60)).expect("create");
        assert_eq!(token.len(), 2 * TOKEN_LEN);

        redeem(dir.path(), "n1", &token, SystemTime::now()).expect("first use");
        let second = redeem(dir.path(), "n1", &token, SystemTime::now());
        assert!(
            matches!(second, Err(Error::Missing { .. })),
            "second use returned {second:?}"
        );
    }

    #[test]
    fn token_file_is_private_and_hashed() {
        let dir = TestDir::new("token-file");
        let token = create(dir.path(), &td(), "n1", Duration::from_secs(60)).expect("create");
        let path = dir.path().join(TOKEN_DIR).join("n1");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let contents = fs::read_to_string(&path).expect("read");
        assert!(!contents.contains(&token), "the token is stored in clear");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let result = redeem(dir.path(), "n1", &token, SystemTime::now());
        assert!(
            matches!(result, Err(Error::InsecureMode { mode: 0o644, .. })),
            "redeem returned {result:?}"
        );
    }

    #[test]
    fn wrong_or_expired_token_rejected() {
        let dir = TestDir::new("token-wrong");
        let token = create(dir.path(), &td(), "n1", Duration::from_secs(60)).expect("create");

        let wrong = redeem(dir.path(), "n1", "00", SystemTime::now());
        assert!(matches!(wrong, Err(Error::Mismatch { .. })), "{wrong:?}");
        let other_node = redeem(dir.path(), "n2", &token, SystemTime::now());
        assert!(
            matches!(other_node, Err(Error::Missing { .. })),
            "{other_node:?}"
        );

        let later = SystemTime::now() + Duration::from_secs(120);
        let expired = redeem(dir.path(), "n1", &token, later);
        assert!(matches!(expired, Err(Error::Expired { .. })), "{expired:?}");
    }

    #[test]
    fn insecure_mode_error_gives_fix() {
        let error = Error::InsecureMode {
            path: PathBuf::from("n1.token"),
            mode: 0o644,
        };
        let text = error.to_string();
        assert!(text.contains("mode 0644"), "{text}");
        assert!(text.contains("`chmod 600 n1.token`"), "{text}");
        assert!(text.contains("umask 077"), "{text}");
    }

    #[test]
    fn missing_token_hint_names_ca_dir() {
        let dir = TestDir::new("token-hint");
        let error = redeem(dir.path(), "n2", "00", SystemTime::now()).expect_err("no token");
        let expected = format!(
            "`interceptor ca token --dir {} --node n2`",
            dir.path().display()
        );
        assert!(error.to_string().contains(&expected), "{error}");
    }

    #[test]
    fn token_file_written_private() {
        let dir = TestDir::new("token-out");
        let path = dir.path().join("n1.token");
        fs::write(&path, "old").expect("write an old file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");

        write_token_file(&path, "abc").expect("write the token file");

        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_private(&path).expect("read back"), "abc\n");
    }

    #[test]
    fn new_token_replaces_unused_one() {
        let dir = TestDir::new("token-replace");
        let first = create(dir.path(), &td(), "n1", Duration::from_secs(60)).expect("create");
        let second = create(dir.path(), &td(), "n1", Duration::from_secs(60)).expect("create");
        assert!(matches!(
            redeem(dir.path(), "n1", &first, SystemTime::now()),
            Err(Error::Mismatch { .. })
        ));
        redeem(dir.path(), "n1", &second, SystemTime::now()).expect("the newer token works");
    }

    #[test]
    fn node_name_cannot_escape_directory() {
        let dir = TestDir::new("token-escape");
        for node in ["..", "a/b", ""] {
            let result = create(dir.path(), &td(), node, Duration::from_secs(60));
            assert!(
                matches!(result, Err(Error::InvalidNode { .. })),
                "{node:?}: {result:?}"
            );
        }
    }
}
