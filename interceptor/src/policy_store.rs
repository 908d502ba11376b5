//! The policies in force and the inbound connections they govern: a shared, swappable
//! [`Policies`] set loaded from `--policies`, a watcher that reloads it when the files
//! change, and the registry of open inbound connections that a reload may cut.
//!
//! A reload swaps the whole set at once; connections evaluated before it keep their
//! verdict. With `--policy-reload-cuts-denied` the watcher evaluates every open inbound
//! connection against the new set and resets those it denies.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::identity::SpiffeId;
use crate::policy::{self, Decision, Destination, Policies, Request, Source, Verdict};
use crate::tunnel::ErrorChain;

/// How often the watcher checks the policy files for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The policy set in force, replaceable while connections read it.
#[derive(Debug)]
pub struct PolicyStore {
    current: RwLock<Arc<Policies>>,
}

impl PolicyStore {
    /// Returns a store with `policies` in force.
    pub fn new(policies: Policies) -> Self {
        Self {
            current: RwLock::new(Arc::new(policies)),
        }
    }

    /// Returns the set in force now.
    pub fn current(&self) -> Arc<Policies> {
        // A poisoned lock still holds a complete set: replacement is one store.
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn replace(&self, policies: Policies) {
        match self.current.write() {
            Ok(mut guard) => *guard = Arc::new(policies),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policies),
        }
    }
}

/// What a policy decides on for one open inbound connection.
#[derive(Debug, Clone)]
pub struct ConnectionFacts {
    /// The peer's SPIFFE ID; `None` for plaintext.
    pub identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub port: u16,
}

impl ConnectionFacts {
    /// Evaluates the connection against `policies`.
    pub fn evaluate(&self, policies: &Policies) -> Verdict {
        policies.evaluate(&Request {
            source: Source {
                identity: self.identity.as_ref(),
                ip: self.source_ip,
            },
            destination: Destination {
                namespace: &self.namespace,
                labels: &self.labels,
                port: self.port,
            },
        })
    }
}

struct OpenConnection {
    facts: ConnectionFacts,
    cut: oneshot::Sender<Verdict>,
}

/// The open inbound connections, by connection id.
#[derive(Default)]
pub struct OpenConnections {
    entries: Mutex<HashMap<u64, OpenConnection>>,
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConnections")
            .field("len", &self.lock().len())
            .finish()
    }
}

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, OpenConnection>> {
        // Each entry is inserted or removed in one step, so a poisoned map is whole.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers connection `id`. The returned guard removes it when dropped; its
    /// receiver gets the verdict of a reload that denies the connection.
    pub fn register(self: &Arc<Self>, id: u64, facts: ConnectionFacts) -> Registration {
        let (cut, receiver) = oneshot::channel();
        self.lock().insert(id, OpenConnection { facts, cut });
        Registration {
            connections: Arc::clone(self),
            id,
            cut: Some(receiver),
        }
    }

    /// Returns the number of open inbound connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Returns whether no inbound connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Signals every open connection that `policies` denies to reset, and returns how
    /// many there were.
    pub fn cut_denied(&self, policies: &Policies) -> usize {
        let mut entries = self.lock();
        let denied: Vec<(u64, Verdict)> = entries
            .iter()
            .filter_map(|(id, open)| {
                let verdict = open.facts.evaluate(policies);
                (verdict.decision == Decision::Deny).then_some((*id, verdict))
            })
            .collect();
        let count = denied.len();
        for (id, verdict) in denied {
            if let Some(open) = entries.remove(&id) {
                // A connection that has ended since no longer reads the signal.
                let _ = open.cut.send(verdict);
            }
        }
        count
    }
}

/// An open connection's entry in [`OpenConnections`], removed on drop.
pub struct Registration {
    connections: Arc<OpenConnections>,
    id: u64,
    cut: Option<oneshot::Receiver<Verdict>>,
}

impl Registration {
    /// Waits until a reload denies the connection and returns that verdict; never
    /// returns otherwise.
    pub async fn cut(&mut self) -> Verdict {
        match self.cut.as_mut() {
            Some(receiver) => match receiver.await {
                Ok(verdict) => verdict,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// Name, modification time and length of each policy file, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Vec<(PathBuf, Option<SystemTime>, u64)>);

/// Loads the policies at `path` for the daemon's start, with the fingerprint of the
/// files to hand to [`watch`]. The fingerprint is taken first, so a change during the
/// load is seen as a change.
pub fn load(path: &Path, root_namespace: &str) -> Result<(Policies, Fingerprint), policy::Error> {
    let seen = fingerprint(path);
    let policies = Policies::load(path, root_namespace)?;
    Ok((policies, seen))
}

/// Polls the policy files at `path` every [`POLL_INTERVAL`] and swaps in a new set when
/// their fingerprint differs from `seen`. An invalid set is logged with its file, field
/// and value, and the previous one stays in force. With `cut_denied`, open connections
/// that a new set denies are reset. Runs forever.
pub async fn watch(
    store: Arc<PolicyStore>,
    path: PathBuf,
    root_namespace: String,
    mut seen: Fingerprint,
    connections: Arc<OpenConnections>,
    cut_denied: bool,
) {
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match Policies::load(&path, &root_namespace) {
            Ok(policies) => {
                store.replace(policies);
                let cut = if cut_denied {
                    connections.cut_denied(&store.current())
                } else {
                    0
                };
                info!(path = %path.display(), open = connections.len(), cut, "reloaded policies");
            }
            Err(error) => {
                warn!(path = %path.display(), error = %ErrorChain(&error), "reloading policies failed; the previous policies stay in force");
            }
        }
    }
}

/// Returns the fingerprint of the policy files at `path`. A change in any file (or a
/// file added or removed) triggers a reload. An unreadable path gives an empty list, so
/// its return is a change too.
fn fingerprint(path: &Path) -> Fingerprint {
    let stat = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .map(|meta| (path.to_owned(), meta.modified().ok(), meta.len()))
    };
    if !path.is_dir() {
        return Fingerprint(stat(path).into_iter().collect());
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .filter_map(|path| stat(&path))
        .collect();
    files.sort();
    Fingerprint(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ConnectionFacts {
        ConnectionFacts {
            identity: None,
            source_ip: IpAddr::from([10, 0, 0, 1]),
            namespace: "default".to_owned(),
            labels: BTreeMap::new(),
            port: 8080,
        }
    }

    #[test]
    fn registration_is_removed_on_drop() {
        let connections = Arc::new(OpenConnections::default());
        let registration = connections.register(1, facts());
        assert_eq!(connections.len(), 1);
        drop(registration);
        assert!(connections.is_empty());
    }

    #[test]
    fn allowing_policies_cut_nothing() {
        let connections = Arc::new(OpenConnections::default());
        let _registration = connections.register(1, facts());
        let cut = connections.cut_denied(&Policies::empty(policy::DEFAULT_ROOT_NAMESPACE));
        assert_eq!(cut, 0);
        assert_eq!(connections.len(), 1);
    }

    #[test]
    fn fingerprint_changes_with_the_file() {
        let dir = std::env::temp_dir().join(format!("policy-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the directory");
        let before = fingerprint(&dir);
        std::fs::write(dir.join("a.yaml"), "x").expect("writing a file");
        std::fs::write(dir.join("ignored.txt"), "x").expect("writing a file");
        let after = fingerprint(&dir);
        assert_ne!(before, after);
        assert_eq!(after.0.len(), 1);
        std::fs::remove_dir_all(&dir).expect("removing the directory");
    }
}
