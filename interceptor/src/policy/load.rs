//! Reading policy files and checking them against the supported subset of Istio's
//! `AuthorizationPolicy`.
//!
//! Documents are first read into structs that mirror Istio's schema with unknown fields
//! rejected, then each field is validated and turned into [`Policy`]. L7 fields are
//! declared here so that their errors name them as unsupported instead of unknown.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{Action, Condition, Error, Policy, Rule, StringMatch, Values};
use crate::identity::SpiffeId;

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
const KIND: &str = "AuthorizationPolicy";
const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
const SPIFFE_SCHEME_PREFIX: &str = "spiffe://";

/// Loads the policies of a file or of the `*.yaml` and `*.yml` files of a directory.
///
/// Every file is read, and the errors of all of them are returned together, so that one
/// round of fixes can address every broken file.
pub(super) fn load_path(path: &Path) -> Result<Vec<Policy>, Error> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for file in policy_files(path)? {
        let text = match fs::read_to_string(&file) {
            Ok(text) => text,
            Err(source) => {
                errors.push(Error::Read { path: file, source });
                continue;
            }
        };
        if let Err(error) = parse_file(&text, &file, &mut policies) {
            errors.extend(error.into_list());
        }
    }
    Error::from_list(errors)?;
    Ok(policies)
}

/// Lists the policy files at `path`: the file itself, or for a directory its `*.yaml` and
/// `*.yml` files in name order, without dot files and subdirectories.
pub(super) fn policy_files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let metadata = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }

    let read_dir_error = |source| Error::ReadDir {
        path: path.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_dir_error)? {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !is_yaml {
            continue;
        }
        // `fs::metadata` follows symlinks, as Kubernetes mounts ConfigMap keys as links.
        let file = entry.path();
        match fs::metadata(&file) {
            Ok(metadata) if metadata.is_dir() => continue,
            Ok(_) => files.push(file),
            Err(source) => return Err(Error::Read { path: file, source }),
        }
    }
    files.sort();
    Ok(files)
}

/// Parses every document of `text` and appends its policy to `policies`. Empty documents
/// are skipped. Returns the errors of every invalid document, except that a document
/// that does not deserialize ends the file.
pub(super) fn parse_file(text: &str, path: &Path, policies: &mut Vec<Policy>) -> Result<(), Error> {
    let mut errors = Vec::new();
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        let invalid = |field: String, message: String| Error::Invalid {
            path: path.to_owned(),
            document: document_number,
            field,
            message,
        };

        let raw: Option<RawPolicy> = match serde_path_to_error::deserialize(document) {
            Ok(raw) => raw,
            Err(e) => {
                let field = match e.path().to_string() {
                    root if root == "." => "document root".to_owned(),
                    path => path,
                };
                let message = e.into_inner().to_string();
                // The YAML parser puts its own path, the same or a parent, before the
                // message.
                let message = match message.split_once(": ") {
                    Some((head, rest)) if field.starts_with(head) => rest.to_owned(),
                    _ => message,
                };
                errors.push(invalid(field, drop_unsupported_from_expected(&message)));
                // After a syntax error the parser keeps returning that error instead of
                // the next document, so the rest of the file cannot be checked.
                break;
            }
        };
        let Some(raw) = raw else { continue };
        let policy = match compile(raw, path, document_number) {
            Ok(policy) => policy,
            Err((field, message)) => {
                errors.push(invalid(field, message));
                continue;
            }
        };

        if let Some(first) = policies.iter().find(|p| p.id == policy.id) {
            let message = format!(
                "duplicate policy {:?}, first defined in {} (document {})",
                first.id,
                first.path.display(),
                first.document
            );
            errors.push(invalid("metadata.name".to_owned(), message));
            continue;
        }
        policies.push(policy);
    }
    Error::from_list(errors)
}

/// Fields that the raw structs declare only to reject them with a reason, so that an
/// unknown-field message must not offer them.
const UNSUPPORTED_FIELDS: [&str; 13] = [
    "targetRef",
    "targetRefs",
    "provider",
    "requestPrincipals",
    "notRequestPrincipals",
    "serviceAccounts",
    "notServiceAccounts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" so that the list holds
/// only supported fields. Other messages are returned as they are.
fn drop_unsupported_from_expected(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, rest)) = rest.split_once("`, expected ") else {
        return message.to_owned();
    };
    // The YAML parser appends the position, such as " at line 8 column 3", after the
    // last quoted name.
    let Some(list_end) = rest.rfind('`') else {
        return message.to_owned();
    };
    let (list, position) = rest.split_at(list_end + 1);
    let supported: Vec<&str> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|name| !UNSUPPORTED_FIELDS.contains(name))
        .collect();
    let expected = match supported.as_slice() {
        [] => "no fields".to_owned(),
        [only] => format!("`{only}`"),
        [first, second] => format!("`{first}` or `{second}`"),
        names => format!("one of `{}`", names.join("`, `")),
    };
    format!("unknown field `{unknown}`, expected {expected}{position}")
}

/// An invalid field: its path and a message that quotes the bad value.
type FieldError = (String, String);

/// Validates a policy read from `document` of `path`.
fn compile(raw: RawPolicy, path: &Path, document: usize) -> Result<Policy, FieldError> {
    if !API_VERSIONS.contains(&raw.api_version.as_str()) {
        let message = format!(
            "unsupported apiVersion {:?}, expected one of {API_VERSIONS:?}",
            raw.api_version
        );
        return Err(("apiVersion".to_owned(), message));
    }
    if raw.kind != KIND {
        let message = format!("unsupported kind {:?}, expected {KIND:?}", raw.kind);
        return Err(("kind".to_owned(), message));
    }

    let name = required_name(raw.metadata.name, "metadata.name")?;
    let namespace = required_name(raw.metadata.namespace, "metadata.namespace")?;
    let dry_run = match raw
        .metadata
        .annotations
        .0
        .get(DRY_RUN_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            let field = format!("metadata.annotations[{DRY_RUN_ANNOTATION:?}]");
            return Err((
                field,
                format!("invalid value {other:?}, expected \"true\" or \"false\""),
            ));
        }
    };

    let spec = raw.spec;
    let use_selector = "policies attach to workloads only through spec.selector, \
                        so replace the field with a selector on the workload's labels";
    reject_unsupported(
        &[
            ("targetRef", &spec.target_ref),
            ("targetRefs", &spec.target_refs),
        ],
        "spec",
        use_selector,
    )?;
    reject_unsupported(
        &[("provider", &spec.provider)],
        "spec",
        "the provider belongs to the CUSTOM action, which this interceptor does not \
         implement, so remove the field",
    )?;
    let action = match spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other @ ("AUDIT" | "CUSTOM")) => {
            let message = format!(
                "{other:?} is not supported: this interceptor enforces only ALLOW and DENY \
                 policies, so change the action or remove the policy"
            );
            return Err(("spec.action".to_owned(), message));
        }
        Some(other) => {
            let message = format!("invalid action {other:?}, expected ALLOW or DENY");
            return Err(("spec.action".to_owned(), message));
        }
    };
    let selector = match spec.selector {
        None => None,
        Some(selector) => Some(compile_selector(selector.match_labels.0)?),
    };
    let rules = spec
        .rules
        .into_iter()
        .enumerate()
        .map(|(index, rule)| compile_rule(rule, &format!("spec.rules[{index}]")))
        .collect::<Result<_, _>>()?;

    Ok(Policy {
        id: format!("{namespace}/{name}"),
        namespace,
        action,
        dry_run,
        selector,
        rules,
        path: path.to_owned(),
        document,
    })
}

fn required_name(value: Option<String>, field: &str) -> Result<String, FieldError> {
    match value {
        None => Err((
            field.to_owned(),
            "missing, but every policy needs one".to_owned(),
        )),
        Some(value) if value.is_empty() => Err((field.to_owned(), "must not be empty".to_owned())),
        Some(value) if value.contains('/') => Err((
            field.to_owned(),
            format!("invalid name {value:?}: must not contain '/'"),
        )),
        Some(value) => Ok(value),
    }
}

fn compile_selector(
    labels: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, FieldError> {
    if labels.keys().any(String::is_empty) {
        let message = "label key must not be empty".to_owned();
        return Err(("spec.selector.matchLabels".to_owned(), message));
    }
    Ok(labels)
}

fn compile_rule(rule: RawRule, field: &str) -> Result<Rule, FieldError> {
    let mut from = Vec::new();
    for (index, entry) in rule.from.into_iter().enumerate() {
        let field = format!("{field}.from[{index}].source");
        let source = entry
            .source
            .ok_or_else(|| (field.clone(), "missing".to_owned()))?;
        from.push(compile_source(source, &field)?);
    }

    let mut to = Vec::new();
    for (index, entry) in rule.to.into_iter().enumerate() {
        let field = format!("{field}.to[{index}].operation");
        let operation = entry
            .operation
            .ok_or_else(|| (field.clone(), "missing".to_owned()))?;
        to.push(compile_operation(operation, &field)?);
    }

    let mut when = Vec::new();
    for (index, condition) in rule.when.into_iter().enumerate() {
        when.extend(compile_condition(
            condition,
            &format!("{field}.when[{index}]"),
        )?);
    }
    Ok(Rule { from, to, when })
}

fn compile_source(source: RawSource, field: &str) -> Result<Vec<Condition>, FieldError> {
    reject_unsupported(
        &[
            ("requestPrincipals", &source.request_principals),
            ("notRequestPrincipals", &source.not_request_principals),
        ],
        field,
        "request principals come from a JWT inside HTTP requests, which an L4 \
         interceptor never sees, so remove the field or move the rule to a waypoint \
         or another L7 proxy",
    )?;
    reject_unsupported(
        &[
            ("serviceAccounts", &source.service_accounts),
            ("notServiceAccounts", &source.not_service_accounts),
        ],
        field,
        "match the service account through principals instead, as \
         \"<trust domain>/ns/<namespace>/sa/<service account>\"",
    )?;

    let fields = [
        ("principals", source.principals, false),
        ("notPrincipals", source.not_principals, true),
        ("namespaces", source.namespaces, false),
        ("notNamespaces", source.not_namespaces, true),
        ("ipBlocks", source.ip_blocks, false),
        ("notIpBlocks", source.not_ip_blocks, true),
        ("remoteIpBlocks", source.remote_ip_blocks, false),
        ("notRemoteIpBlocks", source.not_remote_ip_blocks, true),
    ];
    let mut conditions = Vec::new();
    for (name, values, negated) in fields {
        let Some(values) = values else { continue };
        let field = format!("{field}.{name}");
        let values = match name {
            "principals" | "notPrincipals" => {
                Values::Principals(parse_each(&values, &field, parse_principal)?)
            }
            "namespaces" | "notNamespaces" => {
                Values::Namespaces(parse_each(&values, &field, parse_namespace)?)
            }
            _ => Values::IpBlocks(parse_each(&values, &field, parse_ip_block)?),
        };
        conditions.push(non_empty(values, negated, &field)?);
    }
    if conditions.is_empty() {
        return Err((field.to_owned(), "must set at least one field".to_owned()));
    }
    Ok(conditions)
}

fn compile_operation(operation: RawOperation, field: &str) -> Result<Vec<Condition>, FieldError> {
    reject_unsupported(
        &[
            ("hosts", &operation.hosts),
            ("notHosts", &operation.not_hosts),
            ("methods", &operation.methods),
            ("notMethods", &operation.not_methods),
            ("paths", &operation.paths),
            ("notPaths", &operation.not_paths),
        ],
        field,
        "HTTP attributes are invisible to an L4 interceptor, so remove the field or \
         move the rule to a waypoint or another L7 proxy",
    )?;

    let mut conditions = Vec::new();
    for (name, values, negated) in [
        ("ports", operation.ports, false),
        ("notPorts", operation.not_ports, true),
    ] {
        let Some(values) = values else { continue };
        let field = format!("{field}.{name}");
        let ports = parse_each(&values, &field, parse_port)?;
        conditions.push(non_empty(Values::Ports(ports), negated, &field)?);
    }
    if conditions.is_empty() {
        return Err((field.to_owned(), "must set ports or notPorts".to_owned()));
    }
    Ok(conditions)
}

/// Compiles one `when` entry into one condition for `values` and one for `notValues`.
fn compile_condition(condition: RawCondition, field: &str) -> Result<Vec<Condition>, FieldError> {
    let key_field = format!("{field}.key");
    let Some(key) = condition.key else {
        return Err((key_field, "missing".to_owned()));
    };
    let parse = |values: &[PortOrString], field: &str| -> Result<Values, FieldError> {
        Ok(match key.as_str() {
            "source.principal" => Values::Principals(parse_each(values, field, parse_principal)?),
            "source.namespace" => Values::Namespaces(parse_each(values, field, parse_namespace)?),
            "source.ip" | "remote.ip" => {
                Values::IpBlocks(parse_each(values, field, parse_ip_block)?)
            }
            "destination.port" => Values::Ports(parse_each(values, field, parse_port)?),
            other => {
                let message = format!(
                    "unsupported key {other:?}: an L4 interceptor supports only source.ip, \
                     remote.ip, source.principal, source.namespace and destination.port"
                );
                return Err((key_field.clone(), message));
            }
        })
    };

    let mut conditions = Vec::new();
    for (name, values, negated) in [
        ("values", condition.values, false),
        ("notValues", condition.not_values, true),
    ] {
        let Some(values) = values else { continue };
        let field = format!("{field}.{name}");
        conditions.push(non_empty(parse(&values, &field)?, negated, &field)?);
    }
    if conditions.is_empty() {
        // Validate the key first so that an L7 key without values is named as such.
        parse(&[], field)?;
        return Err((field.to_owned(), "must set values or notValues".to_owned()));
    }
    Ok(conditions)
}

/// Rejects the first of `fields` that is set, naming it under `parent` and quoting its
/// value. `advice` explains why the field is unsupported and what to do instead.
fn reject_unsupported(
    fields: &[(&str, &Option<yaml_serde::Value>)],
    parent: &str,
    advice: &str,
) -> Result<(), FieldError> {
    let Some((name, Some(value))) = fields.iter().find(|(_, value)| value.is_some()) else {
        return Ok(());
    };
    let message = format!("{} is not supported: {advice}", flow_yaml(value));
    Err((format!("{parent}.{name}"), message))
}

/// Values longer than this are cut in error messages, so that a pasted document does
/// not flood the log.
const MAX_QUOTED_VALUE_CHARS: usize = 80;

/// Formats `value` on one line in YAML flow style, such as `["GET", "POST"]`, cut to
/// [`MAX_QUOTED_VALUE_CHARS`].
fn flow_yaml(value: &yaml_serde::Value) -> String {
    fn write(value: &yaml_serde::Value, out: &mut String) {
        use yaml_serde::Value;
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(&b.to_string()),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => out.push_str(&format!("{s:?}")),
            Value::Sequence(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push_str(", ");
                    }
                    write(item, out);
                }
                out.push(']');
            }
            Value::Mapping(entries) => {
                out.push('{');
                for (index, (key, item)) in entries.iter().enumerate() {
                    if index > 0 {
                        out.push_str(", ");
                    }
                    write(key, out);
                    out.push_str(": ");
                    write(item, out);
                }
                out.push('}');
            }
            Value::Tagged(tagged) => {
                out.push_str(&format!("{} ", tagged.tag));
                write(&tagged.value, out);
            }
        }
    }

    let mut out = String::new();
    write(value, &mut out);
    if out.chars().count() > MAX_QUOTED_VALUE_CHARS {
        out = out.chars().take(MAX_QUOTED_VALUE_CHARS).collect();
        out.push_str("...");
    }
    out
}

/// Rejects an empty list, because Istio treats it as "not set", the opposite of what a
/// reader expects from `ports: []`.
fn non_empty(values: Values, negated: bool, field: &str) -> Result<Condition, FieldError> {
    let empty = match &values {
        Values::Principals(v) | Values::Namespaces(v) => v.is_empty(),
        Values::IpBlocks(v) => v.is_empty(),
        Values::Ports(v) => v.is_empty(),
    };
    if empty {
        return Err((field.to_owned(), "must not be an empty list".to_owned()));
    }
    Ok(Condition { values, negated })
}

/// Parses each value of a list field, naming the bad element as `field[index]`.
fn parse_each<T>(
    values: &[PortOrString],
    field: &str,
    parse: impl Fn(&PortOrString) -> Result<T, String>,
) -> Result<Vec<T>, FieldError> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            parse(value).map_err(|message| (format!("{field}[{index}]"), message))
        })
        .collect()
}

/// Parses a principal in Istio's form `<trust-domain>/ns/<namespace>/sa/<service-account>`,
/// optionally with `spiffe://`, and with `*` at the start or the end.
fn parse_principal(value: &PortOrString) -> Result<StringMatch, String> {
    let text = value.as_text("principal")?;
    let pattern = parse_pattern(text, "principal")?;
    let invalid = |reason: String| format!("invalid principal {text:?}: {reason}");
    let valid_byte = |b: u8| b.is_ascii_alphanumeric() || b"./-_".contains(&b);
    match &pattern {
        StringMatch::Exact(exact) => {
            format!("{SPIFFE_SCHEME_PREFIX}{exact}")
                .parse::<SpiffeId>()
                .map_err(|e| invalid(e.to_string()))?;
        }
        StringMatch::Prefix(part) | StringMatch::Suffix(part) if !part.bytes().all(valid_byte) => {
            return Err(invalid(
                "may contain only letters, digits, '.', '-', '_', '/' and one leading or trailing '*'"
                    .to_owned(),
            ));
        }
        _ => {}
    }
    Ok(pattern)
}

fn parse_namespace(value: &PortOrString) -> Result<StringMatch, String> {
    let text = value.as_text("namespace")?;
    let pattern = parse_pattern(text, "namespace")?;
    let valid_byte = |b: u8| b.is_ascii_alphanumeric() || b".-_".contains(&b);
    if let StringMatch::Exact(part) | StringMatch::Prefix(part) | StringMatch::Suffix(part) =
        &pattern
    {
        if !part.bytes().all(valid_byte) {
            return Err(format!(
                "invalid namespace {text:?}: may contain only letters, digits, '.', '-', '_' \
                 and one leading or trailing '*'"
            ));
        }
    }
    Ok(pattern)
}

/// Splits Istio's wildcard forms. `spiffe://` is dropped so that both principal forms
/// compare alike.
fn parse_pattern(text: &str, kind: &str) -> Result<StringMatch, String> {
    let body = text.strip_prefix(SPIFFE_SCHEME_PREFIX).unwrap_or(text);
    let invalid = |reason: &str| format!("invalid {kind} {text:?}: {reason}");
    if body.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if body == "*" {
        return Ok(StringMatch::Presence);
    }
    let pattern = if let Some(suffix) = body.strip_prefix('*') {
        StringMatch::Suffix(suffix.to_owned())
    } else if let Some(prefix) = body.strip_suffix('*') {
        StringMatch::Prefix(prefix.to_owned())
    } else {
        StringMatch::Exact(body.to_owned())
    };
    if let StringMatch::Exact(part) | StringMatch::Prefix(part) | StringMatch::Suffix(part) =
        &pattern
    {
        if part.contains('*') {
            return Err(invalid(
                "'*' is allowed only once, at the start or at the end",
            ));
        }
    }
    Ok(pattern)
}

/// Parses a single address or a CIDR block, IPv4 or IPv6. Host bits are cleared, as Envoy
/// does, so `10.1.2.3/8` is `10.0.0.0/8`.
fn parse_ip_block(value: &PortOrString) -> Result<IpNet, String> {
    let text = value.as_text("IP block")?;
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(addr.to_canonical()));
    }

    let invalid = |reason: &str| format!("invalid CIDR {text:?}: {reason}");
    let (addr, prefix_len) = text
        .split_once('/')
        .ok_or_else(|| invalid("expected an IP address or <address>/<prefix length>"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid(&format!("{addr:?} is not an IPv4 or IPv6 address")))?;
    let max_len = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = prefix_len
        .parse::<u8>()
        .ok()
        .filter(|len| *len <= max_len)
        .ok_or_else(|| {
            invalid(&format!(
                "prefix length must be a number from 0 to {max_len}"
            ))
        })?;
    let block = IpNet::new(addr, prefix_len).map_err(|e| invalid(&e.to_string()))?;

    Ok(canonical_block(block).trunc())
}

/// Turns an IPv4-mapped IPv6 block such as `::ffff:10.0.0.0/104` into IPv4, because
/// sources are compared in canonical form. Other blocks are returned as they are.
fn canonical_block(block: IpNet) -> IpNet {
    let IpNet::V6(v6) = block else { return block };
    let mapped = v6.addr().to_ipv4_mapped();
    let v4_len = v6.prefix_len().checked_sub(96);
    match (mapped, v4_len) {
        (Some(v4), Some(len)) => IpNet::new(IpAddr::V4(v4), len).unwrap_or(block),
        _ => block,
    }
}

fn parse_port(value: &PortOrString) -> Result<u16, String> {
    let number = match value {
        PortOrString::Number(number) => *number,
        PortOrString::Text(text) => text
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("invalid port {text:?}: expected a number from 1 to 65535"))?,
    };
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("invalid port {value}: must be from 1 to 65535"))
}

/// A list element. Istio's schema types every element as a string, but a bare number is
/// accepted so that `ports: [8080]` works. For other fields a number is an error.
#[derive(Clone, Debug)]
enum PortOrString {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortOrString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortOrString;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a port number")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<PortOrString, E> {
                Ok(PortOrString::Text(value.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<PortOrString, E> {
                Ok(PortOrString::Number(value))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<PortOrString, E> {
                i64::try_from(value)
                    .map(PortOrString::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(value), &self))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

impl PortOrString {
    fn as_text(&self, kind: &str) -> Result<&str, String> {
        match self {
            Self::Text(text) => Ok(text),
            Self::Number(number) => Err(format!("invalid {kind} {number}: expected a string")),
        }
    }
}

impl std::fmt::Display for PortOrString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(number) => write!(f, "{number}"),
            Self::Text(text) => write!(f, "{text:?}"),
        }
    }
}

/// A string map that rejects duplicate keys, which the YAML parser lets through with the
/// last value winning.
#[derive(Default)]
struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueMap;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of strings")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMap, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if entries.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    entries.insert(key, value);
                }
                Ok(UniqueMap(entries))
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

/// An `AuthorizationPolicy` object as written, before validation.
#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicy {
    api_version: String,
    kind: String,
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawSpec,
    /// Set by the Kubernetes API server in `kubectl get -o yaml` output, and ignored.
    #[serde(default, rename = "status")]
    _status: Option<yaml_serde::Value>,
}

/// `ObjectMeta`, with the fields that `kubectl get -o yaml` prints accepted and ignored.
#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    annotations: UniqueMap,
    #[serde(default, rename = "labels")]
    _labels: UniqueMap,
    #[serde(default, rename = "uid")]
    _uid: Option<yaml_serde::Value>,
    #[serde(default, rename = "resourceVersion")]
    _resource_version: Option<yaml_serde::Value>,
    #[serde(default, rename = "generation")]
    _generation: Option<yaml_serde::Value>,
    #[serde(default, rename = "creationTimestamp")]
    _creation_timestamp: Option<yaml_serde::Value>,
}

#[derive(Default, Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    selector: Option<RawSelector>,
    target_ref: Option<yaml_serde::Value>,
    target_refs: Option<yaml_serde::Value>,
    action: Option<String>,
    provider: Option<yaml_serde::Value>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: UniqueMap,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    #[serde(default)]
    when: Vec<RawCondition>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields)]
struct RawFrom {
    source: Option<RawSource>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    principals: Option<Vec<PortOrString>>,
    not_principals: Option<Vec<PortOrString>>,
    namespaces: Option<Vec<PortOrString>>,
    not_namespaces: Option<Vec<PortOrString>>,
    ip_blocks: Option<Vec<PortOrString>>,
    not_ip_blocks: Option<Vec<PortOrString>>,
    remote_ip_blocks: Option<Vec<PortOrString>>,
    not_remote_ip_blocks: Option<Vec<PortOrString>>,
    request_principals: Option<yaml_serde::Value>,
    not_request_principals: Option<yaml_serde::Value>,
    service_accounts: Option<yaml_serde::Value>,
    not_service_accounts: Option<yaml_serde::Value>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields)]
struct RawTo {
    operation: Option<RawOperation>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawOperation {
    ports: Option<Vec<PortOrString>>,
    not_ports: Option<Vec<PortOrString>>,
    hosts: Option<yaml_serde::Value>,
    not_hosts: Option<yaml_serde::Value>,
    methods: Option<yaml_serde::Value>,
    not_methods: Option<yaml_serde::Value>,
    paths: Option<yaml_serde::Value>,
    not_paths: Option<yaml_serde::Value>,
}

#[derive(Deserialize)]
#[serde(expecting = "a mapping", deny_unknown_fields, rename_all = "camelCase")]
struct RawCondition {
    key: Option<String>,
    values: Option<Vec<PortOrString>>,
    not_values: Option<Vec<PortOrString>>,
}
