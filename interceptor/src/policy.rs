//! Access control on the authenticated identity: the L4 subset of Istio's
//! `AuthorizationPolicy` (`security.istio.io/v1`).
//!
//! TODO: this is the interface only; the parser and the evaluator replace `evaluate`,
//! which allows everything until then.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::identity::SpiffeId;

/// Namespace whose policies apply to every workload of the mesh, as in Istio.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Errors of loading policies. Each names the file, the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading policy file {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy in {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The workload a connection is for, and the port it asked for.
#[derive(Clone, Copy, Debug)]
pub struct Destination<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub port: u16,
}

/// The peer of a connection. `identity` is `None` for plaintext.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    pub identity: Option<&'a SpiffeId>,
    pub ip: IpAddr,
}

/// One connection to decide on.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub source: Source<'a>,
    pub destination: Destination<'a>,
}

/// Outcome of a policy evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

/// What a dry-run policy would have decided, had it been enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunMatch {
    /// `namespace/name` of the policy.
    pub policy: String,
    pub decision: Decision,
}

/// Decision on one request with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// `namespace/name` of the policy that decided, or `None` when no enforced policy
    /// applies to the destination.
    pub policy: Option<String>,
    /// Dry-run policies that matched, for the log.
    pub dry_run: Vec<DryRunMatch>,
}

/// A validated, immutable set of policies.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    root_namespace: String,
}

impl Policies {
    /// Returns an empty set: every connection is allowed.
    pub fn empty(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
        }
    }

    /// Loads every policy in `path`: a YAML file with one or more documents, or a
    /// directory of `*.yaml` and `*.yml` files.
    pub fn load(_path: &Path, root_namespace: &str) -> Result<Self, Error> {
        Ok(Self::empty(root_namespace))
    }

    /// Decides on `request`.
    pub fn evaluate(&self, _request: &Request<'_>) -> Verdict {
        Verdict {
            decision: Decision::Allow,
            policy: None,
            dry_run: Vec::new(),
        }
    }
}
