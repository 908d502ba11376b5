//! The daemon's identity manager with the CA service (`--ca-addr`): node attestation,
//! workload and node SVID renewal, and trust bundle refresh.
//!
//! At start the daemon authenticates with the node SVID saved in its state directory,
//! or attests with its join token when there is none. While the CA cannot be reached at
//! start, each call (attestation, first trust bundle fetch, first workload SVIDs) is
//! retried with a backoff that doubles from 1 s up to 30 s, until SIGINT or SIGTERM.
//! Errors that retrying cannot fix stop the daemon at once: a rejected join token or CSR,
//! a failed TLS handshake (an untrusted CA or another trust domain), missing or invalid
//! files, and clock skew.
//!
//! Each SVID is renewed at about half its lifetime (with a 10% random jitter, so the
//! nodes' requests spread out). When a
//! request to the CA fails, the renewal is retried with a backoff that doubles from
//! `min(1s, lifetime/8)` up to `min(30s, lifetime/4)`, and the current certificate stays
//! in use until it expires. Less than a quarter of the lifetime left is logged as a
//! warning on each retry and shows in `interceptor_svid_near_expiry`. After expiry new
//! outbound tunnels fail at once with an error that names the CA, and the retries go on,
//! so the workload recovers by itself once the CA is back.
//!
//! The trust bundle is fetched every `--bundle-refresh`. A changed bundle rebuilds every
//! workload's TLS configurations, so new handshakes trust the new roots while open
//! connections keep their session. When the signing root changed (the first root of the
//! bundle), every SVID is renewed at once, so a root rotation re-issues all workloads
//! within one refresh interval.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{error, info, warn, Instrument};

use crate::admin::Metrics;
use crate::ca::client::{self, CaClient, Issued, NodeState};
use crate::config::{RunConfig, SignedDuration};
use crate::identity::{rfc3339, NodeId, Svid, TrustDomain};
use crate::tls::TunnelOptions;
use crate::tunnel::{LocalWorkload, TlsConfigs};
use crate::workloads::Workload;

/// Margin under which a saved node SVID counts as expired at start.
const NODE_SVID_MARGIN: Duration = Duration::from_secs(1);
/// First delay before a start call to an unreachable CA is retried.
const START_RETRY_MIN: Duration = Duration::from_secs(1);
/// Maximum delay between retries of a start call to an unreachable CA.
const START_RETRY_MAX: Duration = Duration::from_secs(30);

/// Errors that stop the daemon at start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ca(#[from] client::Error),
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    #[error("no valid node SVID in {state_dir} and no --join-token-file: on the CA host, create a token with `interceptor ca token --dir <CA directory> --node {node} --out {node}.token` and pass that file with --join-token-file")]
    MissingJoinToken { state_dir: String, node: String },
    #[error("no trust bundle in {state_dir} and no --ca-trust-bundle: pass the CA's root certificate (ca-cert.pem) with --ca-trust-bundle")]
    MissingTrustBundle { state_dir: String },
    #[error(transparent)]
    ClockSkew(#[from] ClockSkew),
    #[error("stopped by SIGINT or SIGTERM while waiting for the CA at {addr}")]
    Stopped { addr: SocketAddr },
    #[error("workload {workload}: building its TLS configuration failed")]
    Tls {
        workload: String,
        /// Boxed so that `Error` stays within clippy's `result_large_err` limit.
        #[source]
        source: Box<crate::tls::Error>,
    },
}

/// The local clock differs from the CA's by more than the allowed skew.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this node's clock is {seconds} s {direction} the CA's, more than the allowed {max_seconds} s: fix the node's clock (for example with NTP)")]
pub struct ClockSkew {
    pub seconds: u64,
    pub direction: &'static str,
    pub max_seconds: u64,
}

/// Returns the local clock minus the CA's in whole seconds, and an error when its size
/// exceeds `max`. The CA reports whole seconds, so differences below one second count
/// as none.
pub fn check_clock_skew(
    local: SystemTime,
    ca: SystemTime,
    max: Duration,
) -> (i64, Result<(), ClockSkew>) {
    let (seconds, direction) = match local.duration_since(ca) {
        Ok(ahead) => (ahead.as_secs(), "ahead of"),
        Err(behind) => (behind.duration().as_secs(), "behind"),
    };
    let signed = if direction == "behind" {
        -i64::try_from(seconds).unwrap_or(i64::MAX)
    } else {
        i64::try_from(seconds).unwrap_or(i64::MAX)
    };
    if Duration::from_secs(seconds) > max {
        let skew = ClockSkew {
            seconds,
            direction,
            max_seconds: max.as_secs(),
        };
        return (signed, Err(skew));
    }
    (signed, Ok(()))
}

/// The daemon's view of the clock: the system clock, shifted by the test-only
/// `--test-clock-offset`.
///
/// NOTE: rustls checks the validity of peer certificates against the system clock, so
/// the offset changes the skew check and the expiry handling of this module only.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    offset: SignedDuration,
}

impl Clock {
    pub fn new(offset: Option<SignedDuration>) -> Self {
        Self {
            offset: offset.unwrap_or_default(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.offset.apply(SystemTime::now())
    }
}

/// The SVIDs and trust bundle of one node, obtained from the CA service.
#[derive(Debug)]
pub struct Manager {
    trust_domain: TrustDomain,
    node: NodeId,
    addr: SocketAddr,
    state: NodeState,
    lifetime: Duration,
    node_lifetime: Duration,
    bundle_refresh: Duration,
    max_clock_skew: Duration,
    clock: Clock,
    options: TunnelOptions,
    /// Client with the current node SVID and bundle; replaced when either changes.
    client: RwLock<CaClient>,
    node_svid: Mutex<Arc<Issued>>,
    bundle: RwLock<Arc<Vec<CertificateDer<'static>>>>,
    /// Each workload's current SVID, by workload name. Held while a workload's TLS
    /// configurations are rebuilt, so a renewal and a bundle change never interleave.
    svids: Mutex<HashMap<String, Arc<Issued>>>,
    /// Incremented when the signing root changes; renewal tasks renew at once then.
    signer_changes: watch::Sender<u64>,
}

impl Manager {
    /// Authenticates this node to the CA service and fetches the trust bundle. Attests
    /// with the join token when the state directory contains no valid node SVID. Retries
    /// while the CA is unreachable, and returns [`Error::Stopped`] on SIGINT or SIGTERM.
    pub async fn start(
        config: &RunConfig,
        addr: SocketAddr,
        trust_domain: &TrustDomain,
        options: &TunnelOptions,
    ) -> Result<Self, Error> {
        until_stopped(addr, Self::connect(config, addr, trust_domain, options)).await
    }

    async fn connect(
        config: &RunConfig,
        addr: SocketAddr,
        trust_domain: &TrustDomain,
        options: &TunnelOptions,
    ) -> Result<Self, Error> {
        let state = NodeState::open(&config.state_dir)?;
        let node = NodeId::new(trust_domain.clone(), &config.node)?;
        let clock = Clock::new(config.test_clock_offset);
        let state_dir = config.state_dir.display().to_string();

        let bundle = match state.bundle()? {
            Some(bundle) => bundle,
            None => match &config.ca_trust_bundle {
                Some(path) => client::read_bundle_file(path)?,
                None => return Err(Error::MissingTrustBundle { state_dir }),
            },
        };
        let node_svid = match state.node_svid(&node, clock.now(), NODE_SVID_MARGIN)? {
            Some(saved) => {
                info!(node = %node, serial = %saved.serial, not_after = %rfc3339(saved.not_after), "using the saved node SVID");
                saved
            }
            None => {
                let Some(path) = &config.join_token_file else {
                    return Err(Error::MissingJoinToken {
                        state_dir,
                        node: config.node.clone(),
                    });
                };
                let token = crate::ca::tokens::read_private(path)
                    .map_err(|error| client::Error::PrivateFile(Box::new(error)))?;
                let anonymous = CaClient::new(addr, trust_domain, &bundle, None)?;
                // NOTE: when the CA redeemed the token but its response was lost, the
                // next attempt is rejected as a reused token and needs a new one.
                let issued = retry_unavailable(addr, "attesting this node", || {
                    anonymous.attest(&node, &token, config.node_svid_lifetime)
                })
                .await?;
                check_clock_skew(clock.now(), issued.ca_time, config.max_clock_skew).1?;
                state.save_node_svid(&issued)?;
                info!(node = %node, serial = %issued.serial, not_after = %rfc3339(issued.not_after), "attested this node with its join token");
                issued
            }
        };

        let client = CaClient::new(addr, trust_domain, &bundle, Some(&node_svid))?;
        let (fetched, ca_time) =
            retry_unavailable(addr, "fetching the trust bundle", || client.trust_bundle()).await?;
        check_clock_skew(clock.now(), ca_time, config.max_clock_skew).1?;
        state.save_bundle(&fetched)?;
        let client = CaClient::new(addr, trust_domain, &fetched, Some(&node_svid))?;
        info!(ca = %addr, roots = fetched.len(), "fetched the trust bundle");

        let (signer_changes, _) = watch::channel(0);
        Ok(Self {
            trust_domain: trust_domain.clone(),
            node,
            addr,
            state,
            lifetime: config.svid_lifetime,
            node_lifetime: config.node_svid_lifetime,
            bundle_refresh: config.bundle_refresh,
            max_clock_skew: config.max_clock_skew,
            clock,
            options: options.clone(),
            client: RwLock::new(client),
            node_svid: Mutex::new(Arc::new(node_svid)),
            bundle: RwLock::new(Arc::new(fetched)),
            svids: Mutex::new(HashMap::new()),
            signer_changes,
        })
    }

    fn client(&self) -> CaClient {
        match self.client.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn bundle(&self) -> Arc<Vec<CertificateDer<'static>>> {
        match self.bundle.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Rebuilds the CA client from the current node SVID and bundle.
    fn rebuild_client(&self) -> Result<(), client::Error> {
        let node_svid = Arc::clone(&lock(&self.node_svid));
        let client = CaClient::new(
            self.addr,
            &self.trust_domain,
            &self.bundle(),
            Some(&node_svid),
        )?;
        match self.client.write() {
            Ok(mut guard) => *guard = client,
            Err(poisoned) => *poisoned.into_inner() = client,
        }
        Ok(())
    }

    /// Requests the first SVID of `workload` and returns its TLS configurations.
    /// Retries while the CA is unreachable, like [`Manager::start`].
    pub async fn issue(&self, workload: &Workload) -> Result<TlsConfigs, Error> {
        let uri = workload.spiffe_id.to_string();
        let client = self.client();
        let issued = until_stopped(self.addr, async {
            let issued = retry_unavailable(self.addr, "requesting a workload SVID", || {
                client.sign(&uri, self.lifetime)
            })
            .await?;
            Ok(issued)
        })
        .await?;
        let issued = Arc::new(issued);
        let configs = self.tls_configs(workload, &issued, &self.bundle())?;
        lock(&self.svids).insert(workload.name.clone(), issued);
        Ok(configs)
    }

    /// Builds both TLS configurations of `workload` from `issued` and `bundle`.
    fn tls_configs(
        &self,
        workload: &Workload,
        issued: &Issued,
        bundle: &[CertificateDer<'static>],
    ) -> Result<TlsConfigs, Error> {
        let svid = Svid {
            spiffe_id: workload.spiffe_id.clone(),
            cert_chain: issued.chain.clone(),
            key: issued.key.clone_key(),
            not_after: issued.not_after,
            serial: issued.serial.clone(),
        };
        let tls_error = |source| Error::Tls {
            workload: workload.name.clone(),
            source: Box::new(source),
        };
        Ok(TlsConfigs {
            client: crate::tls::client_config_with(&svid, bundle, &self.options)
                .map_err(tls_error)?,
            server: crate::tls::server_config_with(&svid, bundle, &self.options)
                .map_err(tls_error)?,
            serial: issued.serial.clone(),
            not_after: issued.not_after,
        })
    }

    /// Installs `issued` as the SVID of `local`, for connections opened from now on.
    fn install(&self, local: &LocalWorkload, issued: Arc<Issued>) -> Result<(), Error> {
        let mut svids = lock(&self.svids);
        let configs = self.tls_configs(&local.workload, &issued, &self.bundle())?;
        replace_tls(local, configs);
        svids.insert(local.workload.name.clone(), issued);
        Ok(())
    }

    /// Starts the renewal task of every workload in `locals`, of the node SVID, and the
    /// trust bundle refresh.
    pub fn spawn(self: &Arc<Self>, locals: &[Arc<LocalWorkload>], metrics: &Arc<Metrics>) {
        for local in locals {
            if let Some(issued) = lock(&self.svids).get(&local.workload.name) {
                metrics.record_svid(&local.workload.name, issued.not_after, self.lifetime, false);
            }
            let span = tracing::info_span!("renew", workload = %local.workload.name);
            tokio::spawn(
                Arc::clone(self)
                    .renew_workload(Arc::clone(local), Arc::clone(metrics))
                    .instrument(span),
            );
        }
        let span = tracing::info_span!("renew", node = %self.node);
        tokio::spawn(
            Arc::clone(self)
                .renew_node(Arc::clone(metrics))
                .instrument(span),
        );
        let span = tracing::info_span!("trust_bundle");
        tokio::spawn(
            Arc::clone(self)
                .refresh_bundle(locals.to_vec(), Arc::clone(metrics))
                .instrument(span),
        );
    }

    /// Renews `local`'s SVID forever.
    async fn renew_workload(self: Arc<Self>, local: Arc<LocalWorkload>, metrics: Arc<Metrics>) {
        let name = local.workload.name.clone();
        let uri = local.workload.spiffe_id.to_string();
        let mut signer_changes = self.signer_changes.subscribe();
        loop {
            let Some(current) = lock(&self.svids).get(&name).cloned() else {
                return;
            };
            self.wait_for_renewal(&current, self.lifetime, &mut signer_changes)
                .await;
            let issued = self
                .renew_until_done(&name, &uri, &current, self.lifetime, &metrics)
                .await;
            let issued = Arc::new(issued);
            metrics.record_svid(&name, issued.not_after, self.lifetime, true);
            // Installed before the event, so a handshake after the event presents it.
            match self.install(&local, Arc::clone(&issued)) {
                Ok(()) => {
                    info!(serial = %issued.serial, not_after = %rfc3339(issued.not_after), "renewed SVID")
                }
                Err(error) => {
                    error!(error = %error, "installing the renewed SVID failed; the previous one stays in use")
                }
            }
        }
    }

    /// Renews the node SVID forever and saves each new one to the state directory.
    async fn renew_node(self: Arc<Self>, metrics: Arc<Metrics>) {
        let name = format!("node/{}", self.node.name());
        let uri = self.node.to_string();
        let mut signer_changes = self.signer_changes.subscribe();
        loop {
            let current = Arc::clone(&lock(&self.node_svid));
            self.wait_for_renewal(&current, self.node_lifetime, &mut signer_changes)
                .await;
            let issued = self
                .renew_until_done(&name, &uri, &current, self.node_lifetime, &metrics)
                .await;
            info!(serial = %issued.serial, not_after = %rfc3339(issued.not_after), "renewed the node SVID");
            if let Err(error) = self.state.save_node_svid(&issued) {
                error!(error = %error, "saving the node SVID failed; a restarted daemon needs a new join token");
            }
            *lock(&self.node_svid) = Arc::new(issued);
            if let Err(error) = self.rebuild_client() {
                error!(error = %error, "rebuilding the CA client failed; it keeps the previous node SVID");
            }
        }
    }

    /// Sleeps until about half of `current`'s remaining lifetime has passed, or until the
    /// signing root changes.
    async fn wait_for_renewal(
        &self,
        current: &Issued,
        lifetime: Duration,
        signer_changes: &mut watch::Receiver<u64>,
    ) {
        let remaining = current
            .not_after
            .duration_since(self.clock.now())
            .unwrap_or_default();
        let delay = jittered(remaining.min(lifetime) / 2);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = signer_changes.changed() => {
                if changed.is_ok() {
                    info!("the signing root changed; renewing now");
                }
            }
        }
    }

    /// Requests a new SVID for `uri` until the CA signs one, with capped exponential
    /// backoff. `current` stays in use meanwhile.
    async fn renew_until_done(
        &self,
        name: &str,
        uri: &str,
        current: &Issued,
        lifetime: Duration,
        metrics: &Metrics,
    ) -> Issued {
        let mut backoff = Duration::from_secs(1).min(lifetime / 8);
        let cap = Duration::from_secs(30).min(lifetime / 4);
        let mut expired_logged = false;
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let error = match self.client().sign(uri, lifetime).await {
                Ok(issued) => {
                    let (skew, checked) =
                        check_clock_skew(self.clock.now(), issued.ca_time, self.max_clock_skew);
                    metrics.record_clock_skew(skew);
                    if let Err(skew) = checked {
                        error!(error = %skew, "this node's clock differs from the CA's by more than --max-clock-skew");
                    }
                    if expired_logged {
                        info!(attempt, "renewed the expired SVID; new tunnels work again");
                    }
                    return issued;
                }
                Err(error) => error,
            };
            metrics.record_renewal_failure(name);
            let now = self.clock.now();
            match current.not_after.duration_since(now) {
                Err(_) if !expired_logged => {
                    error!(
                        error = %error,
                        serial = %current.serial,
                        not_after = %rfc3339(current.not_after),
                        attempt,
                        "SVID expired and renewing it failed: every handshake with it fails until a renewal succeeds"
                    );
                    expired_logged = true;
                }
                Err(_) => {
                    warn!(error = %error, attempt, retry_in = ?backoff, "renewing the expired SVID failed");
                }
                Ok(left) if left < lifetime / 4 => {
                    warn!(
                        error = %error,
                        expires_in = ?left,
                        attempt,
                        retry_in = ?backoff,
                        "SVID close to expiry and renewing it failed; the current one stays in use"
                    );
                }
                Ok(_) => {
                    warn!(error = %error, attempt, retry_in = ?backoff, "renewing SVID failed; the current one stays in use");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(cap);
        }
    }

    /// Fetches the trust bundle every `--bundle-refresh` and applies changes.
    async fn refresh_bundle(
        self: Arc<Self>,
        locals: Vec<Arc<LocalWorkload>>,
        metrics: Arc<Metrics>,
    ) {
        let mut last_error = String::new();
        loop {
            tokio::time::sleep(self.bundle_refresh).await;
            let (fetched, ca_time) = match self.client().trust_bundle().await {
                Ok(fetched) => fetched,
                Err(error) => {
                    let message = error.to_string();
                    if message != last_error {
                        warn!(error = %message, "fetching the trust bundle failed; the current one stays in use");
                        last_error = message;
                    }
                    continue;
                }
            };
            last_error.clear();
            let (skew, checked) = check_clock_skew(self.clock.now(), ca_time, self.max_clock_skew);
            metrics.record_clock_skew(skew);
            if let Err(skew) = checked {
                error!(error = %skew, "this node's clock differs from the CA's by more than --max-clock-skew");
            }
            let current = self.bundle();
            if *current == fetched {
                continue;
            }
            let signer_changed = current.first() != fetched.first();
            self.apply_bundle(fetched, &locals);
            if signer_changed {
                self.signer_changes.send_modify(|changes| *changes += 1);
            }
        }
    }

    /// Makes `bundle` the trust bundle of every new handshake: saves it, rebuilds the
    /// CA client and every workload's TLS configurations.
    fn apply_bundle(&self, bundle: Vec<CertificateDer<'static>>, locals: &[Arc<LocalWorkload>]) {
        let roots = bundle.len();
        if let Err(error) = self.state.save_bundle(&bundle) {
            warn!(error = %error, "saving the trust bundle failed");
        }
        let bundle = Arc::new(bundle);
        match self.bundle.write() {
            Ok(mut guard) => *guard = Arc::clone(&bundle),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&bundle),
        }
        if let Err(error) = self.rebuild_client() {
            error!(error = %error, "rebuilding the CA client with the new trust bundle failed");
        }
        let svids = lock(&self.svids);
        for local in locals {
            let Some(issued) = svids.get(&local.workload.name) else {
                continue;
            };
            match self.tls_configs(&local.workload, issued, &bundle) {
                Ok(configs) => replace_tls(local, configs),
                Err(error) => {
                    error!(workload = %local.workload.name, error = %error, "applying the new trust bundle failed")
                }
            }
        }
        info!(roots, "trust bundle changed; new handshakes use it");
    }
}

/// Runs `future` until it completes or SIGINT or SIGTERM arrives, whichever is first.
async fn until_stopped<T>(
    addr: SocketAddr,
    future: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let stop = async {
        if let Err(error) = crate::daemon::wait_for_stop().await {
            warn!(error = %error, "waiting for a stop signal failed; the daemon keeps waiting for the CA without it");
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = future => result,
        () = stop => Err(Error::Stopped { addr }),
    }
}

/// Calls `call` until it succeeds or fails with an error other than an unreachable CA,
/// waiting between attempts with [`start_backoff`]. Logs each failure with the CA's
/// address, the error and the delay to the next attempt.
async fn retry_unavailable<T, F, Fut>(
    addr: SocketAddr,
    action: &'static str,
    mut call: F,
) -> Result<T, client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, client::Error>>,
{
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match call().await {
            Ok(value) => {
                if attempt > 1 {
                    info!(ca = %addr, attempt, "reached the CA: {action} succeeded after retries");
                }
                return Ok(value);
            }
            Err(error) if error.is_unavailable() => {
                let retry_in = jittered(start_backoff(attempt));
                warn!(
                    ca = %addr,
                    error = %error,
                    attempt,
                    retry_in = ?retry_in,
                    "{action} failed; retrying until the CA is reachable or a stop signal arrives"
                );
                tokio::time::sleep(retry_in).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Returns the delay after failed attempt `attempt` (from 1): 1 s, doubled per attempt,
/// at most 30 s.
fn start_backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    START_RETRY_MIN
        .saturating_mul(1 << doublings)
        .min(START_RETRY_MAX)
}

fn replace_tls(local: &LocalWorkload, configs: TlsConfigs) {
    match local.tls.write() {
        Ok(mut guard) => *guard = Arc::new(configs),
        Err(poisoned) => *poisoned.into_inner() = Arc::new(configs),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Returns `delay` moved by a random amount of up to 10% either way.
fn jittered(delay: Duration) -> Duration {
    let mut byte = [0u8; 1];
    if SystemRandom::new().fill(&mut byte).is_err() {
        return delay;
    }
    // 0..=255 maps to a factor of 0.9..=1.1.
    let factor = 0.9 + 0.2 * f64::from(byte[0]) / 255.0;
    delay.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_within_limit_passes() {
        let ca = SystemTime::now();
        let max = Duration::from_secs(30);
        assert_eq!(check_clock_skew(ca, ca, max), (0, Ok(())));
        let (skew, result) = check_clock_skew(ca + Duration::from_secs(30), ca, max);
        assert_eq!(skew, 30);
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn clock_skew_beyond_limit_is_reported() {
        let ca = SystemTime::now();
        let max = Duration::from_secs(30);

        let (skew, result) = check_clock_skew(ca - Duration::from_secs(90), ca, max);
        assert_eq!(skew, -90);
        let error = result.expect_err("90 s behind exceeds 30 s");
        assert_eq!(error.direction, "behind");
        assert!(error.to_string().contains("90 s behind"), "{error}");

        let (skew, result) = check_clock_skew(ca + Duration::from_secs(31), ca, max);
        assert_eq!(skew, 31);
        assert_eq!(result.expect_err("31 s ahead").direction, "ahead of");
    }

    #[test]
    fn clock_applies_test_offset() {
        let offset = crate::config::parse_signed_duration("-90s").expect("parse");
        let clock = Clock::new(Some(offset));
        let (skew, result) =
            check_clock_skew(clock.now(), SystemTime::now(), Duration::from_secs(30));
        assert!((-91..=-89).contains(&skew), "skew {skew}");
        assert!(result.is_err());
    }

    #[test]
    fn start_backoff_doubles_up_to_cap() {
        let delays: Vec<u64> = (1..=8)
            .map(|attempt| start_backoff(attempt).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(start_backoff(u32::MAX), START_RETRY_MAX);
    }

    #[tokio::test]
    async fn retry_unavailable_stops_on_rejection() {
        let addr: SocketAddr = "127.0.0.1:15012".parse().expect("parse the address");
        let mut calls = 0;
        let result: Result<(), client::Error> = retry_unavailable(addr, "testing", || {
            calls += 1;
            std::future::ready(Err(client::Error::Rejected {
                addr,
                call: "AttestNode",
                code: tonic::Code::PermissionDenied,
                message: "the join token for node n1 does not match".to_owned(),
            }))
        })
        .await;

        assert!(
            matches!(result, Err(client::Error::Rejected { .. })),
            "{result:?}"
        );
        assert_eq!(calls, 1, "a rejection was retried");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_unavailable_retries_until_success() {
        let addr: SocketAddr = "127.0.0.1:15012".parse().expect("parse the address");
        let mut calls = 0;
        let result = retry_unavailable(addr, "testing", || {
            calls += 1;
            std::future::ready(if calls < 3 {
                Err(client::Error::Unavailable {
                    addr,
                    call: "GetTrustBundle",
                    message: "Connection refused (os error 111)".to_owned(),
                })
            } else {
                Ok(calls)
            })
        })
        .await;

        assert_eq!(result.expect("the third call succeeds"), 3);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let delay = Duration::from_secs(100);
        for _ in 0..100 {
            let jittered = jittered(delay);
            assert!(jittered >= Duration::from_secs(90), "{jittered:?}");
            assert!(jittered <= Duration::from_secs(110), "{jittered:?}");
        }
    }
}
