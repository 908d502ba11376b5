//! Access control on the authenticated identity: the L4 subset of Istio's
//! `AuthorizationPolicy` (`security.istio.io/v1` and `v1beta1`).
//!
//! [`Policies::load`] reads and validates policy files, [`Policies::evaluate`] decides on
//! one connection, and [`PolicyStore`] with [`PolicyWatcher`] swap in new policies while
//! the daemon runs. `docs/policy.md` lists the supported fields and what is rejected.
//!
//! The decision follows Istio's order. A matching enforced DENY policy denies. Otherwise,
//! when enforced ALLOW policies apply to the destination workload, one of them must match.
//! A workload that no ALLOW policy applies to accepts every connection that no DENY policy
//! matched. Dry-run policies never change the decision.

mod connections;
mod load;
mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::identity::SpiffeId;

pub use connections::{cut_denied_on_reload, ConnectionFacts, OpenConnections, Registration};
pub use store::{PolicyStore, PolicyWatcher, Reload};

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
    #[error("listing policy directory {path} failed")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A document of `path` is not a valid policy. `document` counts from 1, and `field`
    /// is the path of the bad field, such as `spec.rules[0].from[1].source.ipBlocks[2]`.
    /// `message` quotes the bad value.
    #[error("invalid policy in {path} (document {document}): {field}: {message}")]
    Invalid {
        path: PathBuf,
        document: usize,
        field: String,
        message: String,
    },
    /// Errors of several files or documents, in load order, each shown on its own line.
    /// Never nested and never fewer than two.
    #[error("{} policy errors:{}", errors.len(), ErrorLines(errors))]
    Several { errors: Vec<Error> },
}

impl Error {
    /// Turns collected errors into a result: `Ok` for none, the error itself for one,
    /// [`Error::Several`] for more.
    fn from_list(mut errors: Vec<Error>) -> Result<(), Error> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(Error::Several { errors }),
        }
    }

    /// Returns the single errors this error contains: those of [`Error::Several`], or
    /// itself.
    pub fn errors(&self) -> &[Error] {
        match self {
            Self::Several { errors } => errors,
            single => std::slice::from_ref(single),
        }
    }

    fn into_list(self) -> Vec<Error> {
        match self {
            Self::Several { errors } => errors,
            single => vec![single],
        }
    }
}

/// Formats errors with their sources, one per line.
struct ErrorLines<'a>(&'a [Error]);

impl fmt::Display for ErrorLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in self.0 {
            write!(f, "\n  {error}")?;
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                write!(f, ": {cause}")?;
                source = cause.source();
            }
        }
        Ok(())
    }
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

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        })
    }
}

/// Cause of a [`Verdict`], for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No enforced DENY policy matched and no enforced ALLOW policy applies to the
    /// destination workload, so the connection is allowed.
    NoPolicy,
    /// The enforced ALLOW policy in [`Verdict::policy`] matched.
    AllowPolicyMatched,
    /// The enforced DENY policy in [`Verdict::policy`] matched.
    DenyPolicyMatched,
    /// Enforced ALLOW policies apply to the destination workload, but none matched.
    NoAllowPolicyMatched,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoPolicy => "no DENY policy matched and no ALLOW policy applies",
            Self::AllowPolicyMatched => "allowed by policy",
            Self::DenyPolicyMatched => "denied by policy",
            Self::NoAllowPolicyMatched => "no ALLOW policy matched",
        })
    }
}

/// Decision of a dry-run policy, which it would have enforced were it not a dry run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunMatch {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// `Deny` for a matching DENY policy and for an ALLOW policy that applies but does not
    /// match, `Allow` for a matching ALLOW policy. The policy is judged on its own, so other
    /// ALLOW policies could still allow what a non-matching one would deny.
    pub decision: Decision,
}

/// Decision on one request with its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// `namespace/name` of the enforced policy that decided, or `None` when none matched:
    /// either no ALLOW policy applies to the destination (allowed) or none of those that
    /// apply matched (denied). `reason` distinguishes these cases.
    pub policy: Option<String>,
    pub reason: Reason,
    /// Dry-run policies that apply to the destination and would have had an effect, for
    /// the log. See [`DryRunMatch::decision`].
    pub dry_run: Vec<DryRunMatch>,
}

/// A validated, immutable set of policies.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    root_namespace: String,
    policies: Vec<Policy>,
}

impl Policies {
    /// Returns an empty set: every connection is allowed.
    pub fn empty(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            policies: Vec::new(),
        }
    }

    /// Loads every policy in `path`: a YAML file with one or more documents, or a
    /// directory of `*.yaml` and `*.yml` files, read in name order. Files whose names
    /// start with `.` and subdirectories are skipped.
    ///
    /// Policies in `root_namespace` apply to workloads of every namespace.
    pub fn load(path: &Path, root_namespace: &str) -> Result<Self, Error> {
        Ok(Self {
            root_namespace: root_namespace.to_owned(),
            policies: load::load_path(path)?,
        })
    }

    /// Parses the policies in `text`, a YAML stream of one or more documents. `path` only
    /// names the source in errors.
    pub fn from_yaml(text: &str, path: &Path, root_namespace: &str) -> Result<Self, Error> {
        let mut policies = Vec::new();
        load::parse_file(text, path, &mut policies)?;
        Ok(Self {
            root_namespace: root_namespace.to_owned(),
            policies,
        })
    }

    /// Number of policies, dry-run ones included.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Decides on `request`.
    pub fn evaluate(&self, request: &Request<'_>) -> Verdict {
        let attributes = Attributes::of(request);
        let applicable = self
            .policies
            .iter()
            .filter(|policy| policy.applies_to(&request.destination, &self.root_namespace));

        let mut deny_match = None;
        let mut allow_match = None;
        let mut allow_applies = false;
        let mut dry_run = Vec::new();
        for policy in applicable {
            let matched = policy.matches(&attributes);
            if policy.dry_run {
                let would = match (policy.action, matched) {
                    (Action::Deny, true) | (Action::Allow, false) => Some(Decision::Deny),
                    (Action::Allow, true) => Some(Decision::Allow),
                    (Action::Deny, false) => None,
                };
                if let Some(decision) = would {
                    dry_run.push(DryRunMatch {
                        policy: policy.id.clone(),
                        decision,
                    });
                }
                continue;
            }
            match policy.action {
                Action::Deny if matched => deny_match = deny_match.or(Some(policy)),
                Action::Deny => {}
                Action::Allow => {
                    allow_applies = true;
                    if matched {
                        allow_match = allow_match.or(Some(policy));
                    }
                }
            }
        }

        let (decision, policy, reason) = if let Some(policy) = deny_match {
            (Decision::Deny, Some(policy), Reason::DenyPolicyMatched)
        } else if let Some(policy) = allow_match {
            (Decision::Allow, Some(policy), Reason::AllowPolicyMatched)
        } else if allow_applies {
            (Decision::Deny, None, Reason::NoAllowPolicyMatched)
        } else {
            (Decision::Allow, None, Reason::NoPolicy)
        };
        Verdict {
            decision,
            policy: policy.map(|policy| policy.id.clone()),
            reason,
            dry_run,
        }
    }
}

/// One validated `AuthorizationPolicy`.
#[derive(Clone, Debug)]
struct Policy {
    /// `namespace/name`.
    id: String,
    namespace: String,
    action: Action,
    dry_run: bool,
    /// `spec.selector.matchLabels`; `None` selects every workload in scope.
    selector: Option<BTreeMap<String, String>>,
    /// An empty list matches nothing, as an absent `rules` does in Istio.
    rules: Vec<Rule>,
    /// File the policy was loaded from, and its document number there counting from 1.
    path: PathBuf,
    document: usize,
}

impl Policy {
    /// Tells whether the policy is in scope for `destination`: its namespace is the
    /// destination's or the root namespace, and its selector matches the workload labels.
    fn applies_to(&self, destination: &Destination<'_>, root_namespace: &str) -> bool {
        let in_scope = self.namespace == destination.namespace || self.namespace == root_namespace;
        let selected = self.selector.as_ref().is_none_or(|labels| {
            labels
                .iter()
                .all(|(key, value)| destination.labels.get(key) == Some(value))
        });
        in_scope && selected
    }

    fn matches(&self, attributes: &Attributes<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(attributes))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Allow,
    Deny,
}

/// One entry of `spec.rules`. An empty list means the part is absent and matches any
/// request; `rules: [{}]` therefore matches everything.
#[derive(Clone, Debug, Default)]
struct Rule {
    /// `from[].source`: any entry matches, and within one all conditions must match.
    from: Vec<Vec<Condition>>,
    /// `to[].operation`, with the same structure as `from`.
    to: Vec<Vec<Condition>>,
    /// `when`: all conditions must match.
    when: Vec<Condition>,
}

impl Rule {
    fn matches(&self, attributes: &Attributes<'_>) -> bool {
        let all = |conditions: &Vec<Condition>| conditions.iter().all(|c| c.matches(attributes));
        let any_entry =
            |entries: &Vec<Vec<Condition>>| entries.is_empty() || entries.iter().any(all);
        any_entry(&self.from) && any_entry(&self.to) && all(&self.when)
    }
}

/// One field such as `principals` or `notPorts`: matches when any value matches, or for
/// a negated field when none does.
#[derive(Clone, Debug)]
struct Condition {
    values: Values,
    negated: bool,
}

impl Condition {
    fn matches(&self, attributes: &Attributes<'_>) -> bool {
        self.values.match_any(attributes) != self.negated
    }
}

#[derive(Clone, Debug)]
enum Values {
    /// Principals as `<trust-domain>/ns/<namespace>/sa/<service-account>`.
    Principals(Vec<StringMatch>),
    Namespaces(Vec<StringMatch>),
    /// Source address blocks. A single address is a /32 or /128 block.
    IpBlocks(Vec<IpNet>),
    /// Destination ports.
    Ports(Vec<u16>),
}

impl Values {
    /// Tells whether any value matches. Plaintext requests have no principal and no
    /// namespace, so principal and namespace values never match them; their negated forms
    /// do, as Istio compares them to an empty value.
    fn match_any(&self, attributes: &Attributes<'_>) -> bool {
        match self {
            Self::Principals(patterns) => attributes
                .principal
                .as_deref()
                .is_some_and(|principal| patterns.iter().any(|p| p.matches(principal))),
            Self::Namespaces(patterns) => attributes
                .namespace
                .is_some_and(|namespace| patterns.iter().any(|p| p.matches(namespace))),
            Self::IpBlocks(blocks) => blocks.iter().any(|block| block.contains(&attributes.ip)),
            Self::Ports(ports) => ports.contains(&attributes.port),
        }
    }
}

/// Istio's string match: `*` alone for any non-empty value, a leading `*` for a suffix,
/// a trailing `*` for a prefix, otherwise exact.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }
}

/// Request attributes in the form policies compare them.
struct Attributes<'a> {
    /// Istio's principal form of the peer's SPIFFE ID, without `spiffe://`.
    principal: Option<String>,
    namespace: Option<&'a str>,
    /// Source address; an IPv4-mapped IPv6 address is turned into IPv4 so that IPv4
    /// blocks match it.
    ip: IpAddr,
    port: u16,
}

impl<'a> Attributes<'a> {
    fn of(request: &Request<'a>) -> Self {
        let identity = request.source.identity;
        Self {
            principal: identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            namespace: identity.map(SpiffeId::namespace),
            ip: request.source.ip.to_canonical(),
            port: request.destination.port,
        }
    }
}

#[cfg(test)]
mod tests;
