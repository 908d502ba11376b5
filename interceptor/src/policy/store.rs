//! Swapping policies while the daemon runs: [`PolicyStore`] contains the current set, and
//! [`PolicyWatcher`] reloads it when the policy files change.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{load, Error, Policies};

/// The current policies, replaced as a whole without blocking readers.
///
/// Each replacement bumps a generation number that [`PolicyStore::subscribe`] receivers
/// see, so the daemon can check its open connections against the new policies.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<Policies>,
    /// Generation of `current`, starting at 0 and incremented on every replacement.
    generation: watch::Sender<u64>,
}

impl PolicyStore {
    pub fn new(policies: Policies) -> Self {
        Self {
            current: ArcSwap::from_pointee(policies),
            generation: watch::Sender::new(0),
        }
    }

    /// Returns the policies in force. A connection keeps the set it got, even if a reload
    /// replaces it meanwhile.
    pub fn current(&self) -> Arc<Policies> {
        self.current.load_full()
    }

    /// Replaces the policies and notifies subscribers.
    pub fn replace(&self, policies: Policies) {
        self.current.store(Arc::new(policies));
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Returns a receiver of the generation number, which changes on every replacement.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// Outcome of one [`PolicyWatcher::poll`].
#[derive(Debug)]
pub enum Reload {
    /// No file changed since the last poll.
    Unchanged,
    /// Files changed, and the store now contains this many policies.
    Reloaded { count: usize },
    /// Files changed but do not load; the store keeps the previous policies.
    Failed(Error),
}

/// Polls the modification times of a policy file, or of a directory and its policy files,
/// and reloads the [`PolicyStore`] when they change.
///
/// Polling needs no inotify support and detects Kubernetes ConfigMap updates, which swap a
/// symlink. A change within the file system's timestamp granularity that also keeps the
/// size goes unnoticed until the next change.
#[derive(Debug)]
pub struct PolicyWatcher {
    path: PathBuf,
    root_namespace: String,
    store: Arc<PolicyStore>,
    /// Stamps seen at the last load attempt, successful or not.
    stamps: Vec<Stamp>,
}

/// Modification time and size of one file, or `None` when it could not be read.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    modified: Option<(SystemTime, u64)>,
}

impl PolicyWatcher {
    /// Loads the policies at `path` into a new store and starts tracking their files.
    ///
    /// The files are stamped before they are read, so a change during the load is seen by
    /// the next poll.
    pub fn load(path: &Path, root_namespace: &str) -> Result<Self, Error> {
        let stamps = stamp(path);
        let policies = Policies::load(path, root_namespace)?;
        Ok(Self {
            path: path.to_owned(),
            root_namespace: root_namespace.to_owned(),
            store: Arc::new(PolicyStore::new(policies)),
            stamps,
        })
    }

    pub fn store(&self) -> Arc<PolicyStore> {
        Arc::clone(&self.store)
    }

    /// Reloads the policies if any file changed since the last poll, and logs the outcome.
    pub fn poll(&mut self) -> Reload {
        let stamps = stamp(&self.path);
        if stamps == self.stamps {
            return Reload::Unchanged;
        }
        // Keeping the new stamps after a failed load logs each broken version once.
        self.stamps = stamps;

        match Policies::load(&self.path, &self.root_namespace) {
            Ok(policies) => {
                let count = policies.len();
                self.store.replace(policies);
                info!(path = %self.path.display(), policies = count, "reloaded authorization policies");
                Reload::Reloaded { count }
            }
            Err(error) => {
                // One event per broken file or document, so that each stays a
                // single-line `error` field.
                let errors = error.errors();
                for single in errors {
                    warn!(
                        path = %self.path.display(),
                        errors = errors.len(),
                        error = single as &dyn std::error::Error,
                        "reloading authorization policies failed, keeping the previous ones"
                    );
                }
                Reload::Failed(error)
            }
        }
    }

    /// Polls every `interval` until the future is dropped or its task aborted. Each poll
    /// runs on the blocking thread pool because it reads files.
    pub async fn run(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick completes at once, and the policies were just loaded.
        ticker.tick().await;

        let mut watcher = self;
        loop {
            ticker.tick().await;
            let poll = tokio::task::spawn_blocking(move || {
                watcher.poll();
                watcher
            });
            watcher = match poll.await {
                Ok(watcher) => watcher,
                Err(error) => {
                    error!(
                        error = &error as &dyn std::error::Error,
                        "policy watcher failed, reloading stopped"
                    );
                    return;
                }
            };
        }
    }
}

/// Stamps `path`, and when it is a directory also its policy files, the same files that
/// [`Policies::load`] reads.
fn stamp(path: &Path) -> Vec<Stamp> {
    let stamp_one = |path: &Path| Stamp {
        path: path.to_owned(),
        modified: fs::metadata(path)
            .and_then(|metadata| Ok((metadata.modified()?, metadata.len())))
            .ok(),
    };
    let mut stamps = vec![stamp_one(path)];
    if path.is_dir() {
        // A listing error is left to the load, which reports it.
        let files = load::policy_files(path).unwrap_or_default();
        stamps.extend(files.iter().map(|file| stamp_one(file)));
    }
    stamps
}
