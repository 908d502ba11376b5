//! The open inbound connections that authorization policies govern.
//!
//! A reload swaps the whole policy set at once (see [`PolicyStore`]), and connections
//! evaluated before it keep their verdict. With `--policy-reload-cuts-denied`, the daemon
//! evaluates every open inbound connection against the new set and resets those it
//! denies.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::info;

use super::{Decision, Destination, Policies, PolicyStore, Request, Source, Verdict};
use crate::identity::SpiffeId;

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

/// Cuts, after each reload of `store`, the open connections the new policies deny, and
/// logs how many there were. Runs until the store is dropped.
pub async fn cut_denied_on_reload(store: Arc<PolicyStore>, connections: Arc<OpenConnections>) {
    let mut generation = store.subscribe();
    while generation.changed().await.is_ok() {
        let cut = connections.cut_denied(&store.current());
        info!(
            open = connections.len(),
            cut, "checked open inbound connections against the reloaded policies"
        );
    }
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
        let cut = connections.cut_denied(&Policies::empty(crate::policy::DEFAULT_ROOT_NAMESPACE));
        assert_eq!(cut, 0);
        assert_eq!(connections.len(), 1);
    }
}
