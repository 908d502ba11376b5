use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use super::*;

const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/default";
const OTHER: &str = "spiffe://cluster.local/ns/other/sa/api";

/// Wraps `spec`, a YAML flow mapping, into a policy document.
fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\nspec: {spec}\n---\n"
    )
}

fn dry_run_policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  \
         annotations:\n    istio.io/dry-run: \"true\"\nspec: {spec}\n---\n"
    )
}

fn parse(yaml: &str, root_namespace: &str) -> Policies {
    Policies::from_yaml(yaml, Path::new("test.yaml"), root_namespace).expect("valid policies")
}

/// A request described by plain values; `identity` is a SPIFFE ID or `None` for plaintext.
#[derive(Clone, Copy)]
struct Connection {
    identity: Option<&'static str>,
    ip: &'static str,
    namespace: &'static str,
    labels: &'static [(&'static str, &'static str)],
    port: u16,
}

const FROM_CLIENT: Connection = Connection {
    identity: Some(CLIENT),
    ip: "10.0.0.5",
    namespace: "server",
    labels: &[("app", "web")],
    port: 8080,
};

impl Connection {
    fn evaluate(&self, policies: &Policies) -> Verdict {
        let identity: Option<SpiffeId> =
            self.identity.map(|id| id.parse().expect("valid SPIFFE ID"));
        let labels: BTreeMap<String, String> = self
            .labels
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        let request = Request {
            source: Source {
                identity: identity.as_ref(),
                ip: self.ip.parse().expect("valid IP address"),
            },
            destination: Destination {
                namespace: self.namespace,
                labels: &labels,
                port: self.port,
            },
        };
        policies.evaluate(&request)
    }
}

struct Case {
    name: &'static str,
    policies: String,
    connection: Connection,
    decision: Decision,
    policy: Option<&'static str>,
    reason: Reason,
}

fn allowed_by(
    name: &'static str,
    policies: String,
    connection: Connection,
    policy: &'static str,
) -> Case {
    Case {
        name,
        policies,
        connection,
        decision: Decision::Allow,
        policy: Some(policy),
        reason: Reason::AllowPolicyMatched,
    }
}

fn denied_by(
    name: &'static str,
    policies: String,
    connection: Connection,
    policy: &'static str,
) -> Case {
    Case {
        name,
        policies,
        connection,
        decision: Decision::Deny,
        policy: Some(policy),
        reason: Reason::DenyPolicyMatched,
    }
}

fn no_allow_matched(name: &'static str, policies: String, connection: Connection) -> Case {
    Case {
        name,
        policies,
        connection,
        decision: Decision::Deny,
        policy: None,
        reason: Reason::NoAllowPolicyMatched,
    }
}

fn no_policy(name: &'static str, policies: String, connection: Connection) -> Case {
    Case {
        name,
        policies,
        connection,
        decision: Decision::Allow,
        policy: None,
        reason: Reason::NoPolicy,
    }
}

fn run_cases(cases: Vec<Case>, root_namespace: &str) {
    for case in cases {
        let policies = parse(&case.policies, root_namespace);
        let verdict = case.connection.evaluate(&policies);
        assert_eq!(verdict.decision, case.decision, "{}: decision", case.name);
        assert_eq!(
            verdict.policy.as_deref(),
            case.policy,
            "{}: policy",
            case.name
        );
        assert_eq!(verdict.reason, case.reason, "{}: reason", case.name);
        assert_eq!(verdict.dry_run, [], "{}: dry run", case.name);
    }
}

#[test]
fn evaluate_principals_and_namespaces() {
    let allow_client = policy(
        "server",
        "allow-client",
        r#"{rules: [{from: [{source: {principals: ["cluster.local/ns/client/sa/default"]}}]}]}"#,
    );
    let allow_spiffe_form = policy(
        "server",
        "allow-client",
        r#"{rules: [{from: [{source: {principals: ["spiffe://cluster.local/ns/client/sa/default"]}}]}]}"#,
    );
    let allow_prefix = policy(
        "server",
        "prefix",
        r#"{rules: [{from: [{source: {principals: ["cluster.local/ns/client/*"]}}]}]}"#,
    );
    let allow_suffix = policy(
        "server",
        "suffix",
        r#"{rules: [{from: [{source: {principals: ["*/sa/default"]}}]}]}"#,
    );
    let allow_any_peer = policy(
        "server",
        "any-peer",
        r#"{rules: [{from: [{source: {principals: ["*"]}}]}]}"#,
    );
    let allow_namespace = policy(
        "server",
        "ns",
        r#"{rules: [{from: [{source: {namespaces: ["client"]}}]}]}"#,
    );
    let deny_not_client = policy(
        "server",
        "deny-not-client",
        r#"{action: DENY, rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/client/sa/default"]}}]}]}"#,
    );
    let deny_plaintext = policy(
        "server",
        "deny-plaintext",
        r#"{action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}"#,
    );
    let allow_not_other = policy(
        "server",
        "not-other",
        r#"{rules: [{from: [{source: {notNamespaces: ["other"]}}]}]}"#,
    );
    let plaintext = Connection {
        identity: None,
        ..FROM_CLIENT
    };
    let from_other = Connection {
        identity: Some(OTHER),
        ..FROM_CLIENT
    };

    run_cases(
        vec![
            no_policy("no policies", String::new(), FROM_CLIENT),
            allowed_by(
                "exact principal",
                allow_client.clone(),
                FROM_CLIENT,
                "server/allow-client",
            ),
            allowed_by(
                "spiffe principal",
                allow_spiffe_form,
                FROM_CLIENT,
                "server/allow-client",
            ),
            no_allow_matched("other principal", allow_client.clone(), from_other),
            no_allow_matched(
                "plaintext never matches principals",
                allow_client,
                plaintext,
            ),
            allowed_by(
                "prefix principal",
                allow_prefix.clone(),
                FROM_CLIENT,
                "server/prefix",
            ),
            no_allow_matched("prefix principal mismatch", allow_prefix, from_other),
            allowed_by(
                "suffix principal",
                allow_suffix.clone(),
                FROM_CLIENT,
                "server/suffix",
            ),
            no_allow_matched("suffix principal mismatch", allow_suffix, from_other),
            allowed_by(
                "any peer",
                allow_any_peer.clone(),
                FROM_CLIENT,
                "server/any-peer",
            ),
            no_allow_matched("any peer rejects plaintext", allow_any_peer, plaintext),
            allowed_by(
                "namespace",
                allow_namespace.clone(),
                FROM_CLIENT,
                "server/ns",
            ),
            no_allow_matched("namespace mismatch", allow_namespace.clone(), from_other),
            no_allow_matched(
                "plaintext never matches namespaces",
                allow_namespace,
                plaintext,
            ),
            no_policy(
                "notPrincipals spares listed",
                deny_not_client.clone(),
                FROM_CLIENT,
            ),
            denied_by(
                "notPrincipals denies others",
                deny_not_client.clone(),
                from_other,
                "server/deny-not-client",
            ),
            denied_by(
                "notPrincipals matches plaintext",
                deny_not_client,
                plaintext,
                "server/deny-not-client",
            ),
            no_policy(
                "deny plaintext spares peers",
                deny_plaintext.clone(),
                FROM_CLIENT,
            ),
            denied_by(
                "deny plaintext",
                deny_plaintext,
                plaintext,
                "server/deny-plaintext",
            ),
            allowed_by(
                "notNamespaces allows others",
                allow_not_other.clone(),
                FROM_CLIENT,
                "server/not-other",
            ),
            no_allow_matched(
                "notNamespaces excludes listed",
                allow_not_other.clone(),
                from_other,
            ),
            allowed_by(
                "notNamespaces matches plaintext",
                allow_not_other,
                plaintext,
                "server/not-other",
            ),
        ],
        DEFAULT_ROOT_NAMESPACE,
    );
}

#[test]
fn evaluate_addresses_and_ports() {
    let deny_outside = policy(
        "server",
        "deny-outside",
        r#"{action: DENY, rules: [{from: [{source: {notIpBlocks: ["10.0.0.0/8"]}}]}]}"#,
    );
    let allow_v6 = policy(
        "server",
        "v6",
        r#"{rules: [{from: [{source: {ipBlocks: ["fd00::/8", "2001:db8::1"]}}]}]}"#,
    );
    let allow_remote = policy(
        "server",
        "remote",
        r#"{rules: [{from: [{source: {remoteIpBlocks: ["10.0.0.5"]}}]}]}"#,
    );
    let deny_not_remote = policy(
        "server",
        "not-remote",
        r#"{action: DENY, rules: [{from: [{source: {notRemoteIpBlocks: ["10.0.0.0/24"]}}]}]}"#,
    );
    let allow_ports = policy(
        "server",
        "ports",
        r#"{rules: [{to: [{operation: {ports: ["8080", 9090]}}]}]}"#,
    );
    let deny_not_port = policy(
        "server",
        "not-port",
        r#"{action: DENY, rules: [{to: [{operation: {notPorts: ["8080"]}}]}]}"#,
    );
    let allow_mapped = policy(
        "server",
        "mapped",
        r#"{rules: [{from: [{source: {ipBlocks: ["::ffff:10.0.0.0/104", "192.168.7.9/16"]}}]}]}"#,
    );
    let at = |ip: &'static str, port: u16| Connection {
        ip,
        port,
        ..FROM_CLIENT
    };

    run_cases(
        vec![
            no_policy(
                "notIpBlocks spares inside",
                deny_outside.clone(),
                at("10.1.2.3", 8080),
            ),
            denied_by(
                "notIpBlocks denies outside",
                deny_outside.clone(),
                at("192.168.1.1", 8080),
                "server/deny-outside",
            ),
            no_policy(
                "IPv4-mapped source",
                deny_outside,
                at("::ffff:10.1.2.3", 8080),
            ),
            allowed_by(
                "IPv6 block",
                allow_v6.clone(),
                at("fd12::1", 8080),
                "server/v6",
            ),
            allowed_by(
                "IPv6 address",
                allow_v6.clone(),
                at("2001:db8::1", 8080),
                "server/v6",
            ),
            no_allow_matched("IPv6 outside", allow_v6.clone(), at("2001:db8::2", 8080)),
            no_allow_matched("IPv4 against IPv6 block", allow_v6, at("10.0.0.5", 8080)),
            allowed_by(
                "IPv4-mapped block",
                allow_mapped.clone(),
                at("10.9.9.9", 8080),
                "server/mapped",
            ),
            allowed_by(
                "host bits cleared",
                allow_mapped.clone(),
                at("192.168.200.1", 8080),
                "server/mapped",
            ),
            no_allow_matched("mapped block mismatch", allow_mapped, at("11.0.0.1", 8080)),
            allowed_by(
                "remote address",
                allow_remote.clone(),
                at("10.0.0.5", 8080),
                "server/remote",
            ),
            no_allow_matched(
                "remote address mismatch",
                allow_remote,
                at("10.0.0.6", 8080),
            ),
            no_policy(
                "notRemoteIpBlocks inside",
                deny_not_remote.clone(),
                at("10.0.0.9", 8080),
            ),
            denied_by(
                "notRemoteIpBlocks outside",
                deny_not_remote,
                at("10.0.1.9", 8080),
                "server/not-remote",
            ),
            allowed_by(
                "string port",
                allow_ports.clone(),
                at("10.0.0.5", 8080),
                "server/ports",
            ),
            allowed_by(
                "number port",
                allow_ports.clone(),
                at("10.0.0.5", 9090),
                "server/ports",
            ),
            no_allow_matched("unlisted port", allow_ports, at("10.0.0.5", 22)),
            no_policy(
                "notPorts spares listed",
                deny_not_port.clone(),
                at("10.0.0.5", 8080),
            ),
            denied_by(
                "notPorts denies others",
                deny_not_port,
                at("10.0.0.5", 22),
                "server/not-port",
            ),
        ],
        DEFAULT_ROOT_NAMESPACE,
    );
}

#[test]
fn evaluate_scope() {
    let deny_all = r#"{action: DENY, rules: [{}]}"#;
    let web = |namespace: &'static str| Connection {
        namespace,
        ..FROM_CLIENT
    };
    let db = |namespace: &'static str| Connection {
        namespace,
        labels: &[("app", "db"), ("tier", "data")],
        ..FROM_CLIENT
    };
    let root_selector = policy(
        "istio-system",
        "web",
        &format!(
            "{{selector: {{matchLabels: {{app: web}}}}, {}",
            &deny_all[1..]
        ),
    );
    let local_selector = policy(
        "server",
        "db",
        r#"{selector: {matchLabels: {app: db, tier: data}}, rules: []}"#,
    );

    run_cases(
        vec![
            no_policy(
                "other namespace",
                policy("elsewhere", "deny", deny_all),
                web("server"),
            ),
            denied_by(
                "own namespace",
                policy("server", "deny", deny_all),
                web("server"),
                "server/deny",
            ),
            denied_by(
                "root namespace",
                policy("istio-system", "deny", deny_all),
                web("server"),
                "istio-system/deny",
            ),
            denied_by(
                "root selector in any namespace",
                root_selector.clone(),
                web("elsewhere"),
                "istio-system/web",
            ),
            no_policy("root selector mismatch", root_selector, db("server")),
            no_allow_matched("selector match", local_selector.clone(), db("server")),
            no_policy("selector mismatch", local_selector.clone(), web("server")),
            no_policy(
                "selector in other namespace",
                local_selector,
                db("elsewhere"),
            ),
        ],
        DEFAULT_ROOT_NAMESPACE,
    );

    // A custom root namespace takes the place of istio-system, which becomes an ordinary one.
    run_cases(
        vec![
            denied_by(
                "custom root",
                policy("mesh-root", "deny", deny_all),
                web("server"),
                "mesh-root/deny",
            ),
            no_policy(
                "istio-system not root",
                policy("istio-system", "deny", deny_all),
                web("server"),
            ),
        ],
        "mesh-root",
    );
}

#[test]
fn evaluate_rule_structure() {
    let plaintext = Connection {
        identity: None,
        ..FROM_CLIENT
    };
    let from_other = Connection {
        identity: Some(OTHER),
        ..FROM_CLIENT
    };
    let allow_nothing = policy("server", "allow-nothing", "{}");
    let allow_nothing_empty_rules = policy("server", "allow-nothing", "{rules: []}");
    let deny_nothing = policy("server", "deny-nothing", "{action: DENY}");
    let allow_all = policy("server", "allow-all", "{rules: [{}]}");
    let deny_all = policy("server", "deny-all", "{action: DENY, rules: [{}]}");
    // Entries of `from` are alternatives, fields within one entry must all match.
    let from_entries = policy(
        "server",
        "entries",
        r#"{rules: [{from: [{source: {principals: ["cluster.local/ns/client/sa/default"], ipBlocks: ["192.168.0.0/16"]}},
                            {source: {namespaces: ["other"]}}]}]}"#,
    );
    // `from` and `to` of one rule must both match; rules are alternatives.
    let from_and_to = policy(
        "server",
        "from-and-to",
        r#"{rules: [{from: [{source: {namespaces: ["client"]}}], to: [{operation: {ports: ["9090"]}}]},
                    {from: [{source: {namespaces: ["other"]}}]}]}"#,
    );
    let when = policy(
        "server",
        "when",
        r#"{rules: [{when: [{key: source.namespace, values: ["client"]},
                            {key: destination.port, notValues: ["22"]},
                            {key: source.ip, values: ["10.0.0.0/8"]},
                            {key: remote.ip, notValues: ["10.0.0.99"]},
                            {key: source.principal, values: ["*/sa/default"]}]}]}"#,
    );
    let port = |port: u16| Connection {
        port,
        ..FROM_CLIENT
    };
    let ip = |ip: &'static str| Connection { ip, ..FROM_CLIENT };

    run_cases(
        vec![
            no_allow_matched("ALLOW without rules", allow_nothing.clone(), FROM_CLIENT),
            no_allow_matched("ALLOW without rules, plaintext", allow_nothing, plaintext),
            no_allow_matched(
                "ALLOW with empty rules",
                allow_nothing_empty_rules,
                FROM_CLIENT,
            ),
            no_policy("DENY without rules", deny_nothing, FROM_CLIENT),
            allowed_by(
                "empty rule allows",
                allow_all.clone(),
                FROM_CLIENT,
                "server/allow-all",
            ),
            allowed_by(
                "empty rule allows plaintext",
                allow_all,
                plaintext,
                "server/allow-all",
            ),
            denied_by("empty rule denies", deny_all, plaintext, "server/deny-all"),
            no_allow_matched("all fields of an entry", from_entries.clone(), FROM_CLIENT),
            allowed_by(
                "second entry",
                from_entries.clone(),
                from_other,
                "server/entries",
            ),
            allowed_by(
                "first entry",
                from_entries,
                Connection {
                    ip: "192.168.3.4",
                    ..FROM_CLIENT
                },
                "server/entries",
            ),
            no_allow_matched("from without to", from_and_to.clone(), FROM_CLIENT),
            allowed_by(
                "from and to",
                from_and_to.clone(),
                port(9090),
                "server/from-and-to",
            ),
            allowed_by("second rule", from_and_to, from_other, "server/from-and-to"),
            allowed_by("when all match", when.clone(), FROM_CLIENT, "server/when"),
            no_allow_matched("when notValues", when.clone(), port(22)),
            no_allow_matched("when remote.ip", when.clone(), ip("10.0.0.99")),
            no_allow_matched("when source.ip", when.clone(), ip("192.168.0.1")),
            no_allow_matched("when namespace", when, from_other),
        ],
        DEFAULT_ROOT_NAMESPACE,
    );
}

#[test]
fn evaluate_deny_before_allow() {
    let policies = parse(
        &[
            policy("server", "allow-all", "{rules: [{}]}"),
            policy(
                "istio-system",
                "deny-ssh",
                r#"{action: DENY, rules: [{to: [{operation: {ports: ["22"]}}]}]}"#,
            ),
        ]
        .concat(),
        DEFAULT_ROOT_NAMESPACE,
    );

    let verdict = Connection {
        port: 22,
        ..FROM_CLIENT
    }
    .evaluate(&policies);
    assert_eq!(verdict.decision, Decision::Deny);
    assert_eq!(verdict.policy.as_deref(), Some("istio-system/deny-ssh"));

    let verdict = FROM_CLIENT.evaluate(&policies);
    assert_eq!(verdict.decision, Decision::Allow);
    assert_eq!(verdict.policy.as_deref(), Some("server/allow-all"));
}

#[test]
fn evaluate_dry_run_reported_not_enforced() {
    let policies = parse(
        &[
            dry_run_policy("server", "deny-all", "{action: DENY, rules: [{}]}"),
            dry_run_policy(
                "server",
                "allow-other",
                r#"{rules: [{from: [{source: {namespaces: ["other"]}}]}]}"#,
            ),
            dry_run_policy(
                "server",
                "allow-client",
                r#"{rules: [{from: [{source: {namespaces: ["client"]}}]}]}"#,
            ),
            dry_run_policy(
                "server",
                "deny-ssh",
                r#"{action: DENY, rules: [{to: [{operation: {ports: ["22"]}}]}]}"#,
            ),
            dry_run_policy("elsewhere", "deny-all", "{action: DENY, rules: [{}]}"),
        ]
        .concat(),
        DEFAULT_ROOT_NAMESPACE,
    );

    let verdict = FROM_CLIENT.evaluate(&policies);

    assert_eq!(verdict.decision, Decision::Allow);
    assert_eq!(verdict.policy, None);
    assert_eq!(verdict.reason, Reason::NoPolicy);
    let reported: Vec<(&str, Decision)> = verdict
        .dry_run
        .iter()
        .map(|dry_run| (dry_run.policy.as_str(), dry_run.decision))
        .collect();
    assert_eq!(
        reported,
        [
            ("server/deny-all", Decision::Deny),
            ("server/allow-other", Decision::Deny),
            ("server/allow-client", Decision::Allow),
        ]
    );
}

#[test]
fn empty_policies_allow() {
    let verdict = FROM_CLIENT.evaluate(&Policies::empty(DEFAULT_ROOT_NAMESPACE));
    assert_eq!(verdict.decision, Decision::Allow);
    assert_eq!(verdict.reason, Reason::NoPolicy);
}

/// Parses `yaml` and returns the field and message of the expected `Invalid` error.
fn load_error(yaml: &str) -> (usize, String, String) {
    let error = Policies::from_yaml(
        yaml,
        Path::new("/etc/policies/bad.yaml"),
        DEFAULT_ROOT_NAMESPACE,
    )
    .expect_err("invalid policy must be rejected");
    let text = error.to_string();
    assert!(
        text.contains("/etc/policies/bad.yaml"),
        "error names the file: {text}"
    );
    match error {
        Error::Invalid {
            document,
            field,
            message,
            ..
        } => {
            assert!(text.contains(&field), "error shows the field: {text}");
            (document, field, message)
        }
        other => panic!("expected an invalid policy error, got {other:?}"),
    }
}

/// Rule with one source field set to `values`, a YAML flow list.
fn source_rule(field: &str, values: &str) -> String {
    policy(
        "server",
        "p",
        &format!("{{rules: [{{from: [{{source: {{{field}: {values}}}}}]}}]}}"),
    )
}

fn operation_rule(field: &str, values: &str) -> String {
    policy(
        "server",
        "p",
        &format!("{{rules: [{{to: [{{operation: {{{field}: {values}}}}}]}}]}}"),
    )
}

#[test]
fn load_errors_name_field_and_value() {
    let source = "spec.rules[0].from[0].source";
    let operation = "spec.rules[0].to[0].operation";
    // Each case: policy text, expected field path, and text the message must contain.
    let cases: Vec<(String, String, &str)> = vec![
        (
            source_rule("principal", r#"["a"]"#),
            format!("{source}.principal"),
            "unknown field `principal`",
        ),
        (
            policy("server", "p", "{rule: []}"),
            "spec.rule".into(),
            "unknown field `rule`",
        ),
        (
            source_rule(
                "principals",
                r#"["cluster.local/ns/a/sa/b", "cluster.local/ns/a"]"#,
            ),
            format!("{source}.principals[1]"),
            r#""cluster.local/ns/a""#,
        ),
        (
            source_rule("principals", r#"["cluster.local/*/sa/x"]"#),
            format!("{source}.principals[0]"),
            r#""cluster.local/*/sa/x""#,
        ),
        (
            source_rule("principals", r#"["*cluster*"]"#),
            format!("{source}.principals[0]"),
            r#""*cluster*""#,
        ),
        (
            source_rule("principals", r#"[""]"#),
            format!("{source}.principals[0]"),
            "must not be empty",
        ),
        (
            source_rule("notPrincipals", "[7]"),
            format!("{source}.notPrincipals[0]"),
            "invalid principal 7",
        ),
        (
            source_rule("namespaces", r#"["a b"]"#),
            format!("{source}.namespaces[0]"),
            r#""a b""#,
        ),
        (
            source_rule("ipBlocks", r#"["10.0.0.0/8", "1.2.3.4", "10.0.0.0/33"]"#),
            format!("{source}.ipBlocks[2]"),
            r#""10.0.0.0/33""#,
        ),
        (
            source_rule("notIpBlocks", r#"["fd00::/129"]"#),
            format!("{source}.notIpBlocks[0]"),
            r#""fd00::/129""#,
        ),
        (
            source_rule("remoteIpBlocks", r#"["10.0.0"]"#),
            format!("{source}.remoteIpBlocks[0]"),
            r#""10.0.0""#,
        ),
        (
            source_rule("notRemoteIpBlocks", r#"["fd00:::1"]"#),
            format!("{source}.notRemoteIpBlocks[0]"),
            r#""fd00:::1""#,
        ),
        (
            source_rule("ipBlocks", "[]"),
            format!("{source}.ipBlocks"),
            "empty list",
        ),
        (
            source_rule("requestPrincipals", r#"["*"]"#),
            format!("{source}.requestPrincipals"),
            "not supported",
        ),
        (
            source_rule("serviceAccounts", r#"["ns/sa"]"#),
            format!("{source}.serviceAccounts"),
            "not supported",
        ),
        (
            policy("server", "p", "{rules: [{from: [{}]}]}"),
            source.into(),
            "missing",
        ),
        (
            operation_rule("ports", r#"["8080", "0"]"#),
            format!("{operation}.ports[1]"),
            r#"invalid port "0""#,
        ),
        (
            operation_rule("ports", "[70000]"),
            format!("{operation}.ports[0]"),
            "invalid port 70000",
        ),
        (
            operation_rule("notPorts", r#"["http"]"#),
            format!("{operation}.notPorts[0]"),
            r#""http""#,
        ),
        (
            operation_rule("ports", "[true]"),
            format!("{operation}.ports[0]"),
            "invalid type: boolean `true`",
        ),
        (
            operation_rule("methods", r#"["GET"]"#),
            format!("{operation}.methods"),
            "HTTP",
        ),
        (
            operation_rule("paths", r#"["/admin"]"#),
            format!("{operation}.paths"),
            "HTTP",
        ),
        (
            operation_rule("hosts", r#"["example.com"]"#),
            format!("{operation}.hosts"),
            "HTTP",
        ),
        (
            policy("server", "p", "{rules: [{to: [{operation: {}}]}]}"),
            operation.into(),
            "ports or notPorts",
        ),
        (
            policy(
                "server",
                "p",
                r#"{rules: [{when: [{key: "request.headers[x-user]", values: ["a"]}]}]}"#,
            ),
            "spec.rules[0].when[0].key".into(),
            r#""request.headers[x-user]""#,
        ),
        (
            policy(
                "server",
                "p",
                r#"{rules: [{when: [{key: destination.port, values: ["99999"]}]}]}"#,
            ),
            "spec.rules[0].when[0].values[0]".into(),
            r#""99999""#,
        ),
        (
            policy("server", "p", "{rules: [{when: [{key: source.ip}]}]}"),
            "spec.rules[0].when[0]".into(),
            "values or notValues",
        ),
        (
            policy("server", "p", "{action: AUDIT}"),
            "spec.action".into(),
            r#""AUDIT" is not supported"#,
        ),
        (
            policy("server", "p", "{action: CUSTOM}"),
            "spec.action".into(),
            r#""CUSTOM" is not supported"#,
        ),
        (
            policy("server", "p", "{action: REJECT}"),
            "spec.action".into(),
            r#""REJECT""#,
        ),
        (
            policy("server", "p", "{targetRef: {kind: Service, name: web}}"),
            "spec.targetRef".into(),
            "not supported",
        ),
        (
            policy("server", "p", "{targetRefs: [{kind: Service, name: web}]}"),
            "spec.targetRefs".into(),
            "not supported",
        ),
        (
            policy("server", "p", "{selector: {matchLabels: {app: [web]}}}"),
            "spec.selector.matchLabels.app".into(),
            "invalid type",
        ),
        (
            policy("server", "p", "{selector: {matchLabels: {app: a, app: b}}}"),
            "spec.selector.matchLabels".into(),
            "duplicate",
        ),
        (
            policy("server", "p", "{}").replace("security.istio.io/v1", "security.istio.io/v2"),
            "apiVersion".into(),
            r#""security.istio.io/v2""#,
        ),
        (
            policy("server", "p", "{}").replace("AuthorizationPolicy", "PeerAuthentication"),
            "kind".into(),
            r#""PeerAuthentication""#,
        ),
        (
            policy("server", "p", "{}").replace("  namespace: server\n", ""),
            "metadata.namespace".into(),
            "missing",
        ),
        (
            policy("server", "", "{}").replace("name: \n", "name: \"\"\n"),
            "metadata.name".into(),
            "must not be empty",
        ),
        (
            policy("server", "p", "{}").replace(
                "metadata:\n",
                "metadata:\n  annotations: {istio.io/dry-run: \"yes\"}\n",
            ),
            "metadata.annotations[\"istio.io/dry-run\"]".into(),
            r#""yes""#,
        ),
        (
            policy("server", "p", "{}").replace("kind:", "kinds: x\nkind:"),
            "kinds".into(),
            "unknown field `kinds`",
        ),
    ];

    for (yaml, expected_field, expected_message) in cases {
        let (document, field, message) = load_error(&yaml);
        assert_eq!(
            field, expected_field,
            "field of error {message:?} for:\n{yaml}"
        );
        assert!(
            message.contains(expected_message),
            "message {message:?} lacks {expected_message:?} for:\n{yaml}"
        );
        assert_eq!(document, 1, "document of error {message:?}");
    }
}

#[test]
fn load_error_names_document() {
    let yaml = [
        policy("server", "a", "{}"),
        policy("server", "b", "{action: AUDIT}"),
    ]
    .concat();
    let (document, field, _) = load_error(&yaml);
    assert_eq!(document, 2);
    assert_eq!(field, "spec.action");
}

#[test]
fn load_rejects_duplicate_policy() {
    let yaml = [
        policy("server", "a", "{}"),
        policy("other", "a", "{}"),
        policy("server", "a", "{}"),
    ]
    .concat();
    let (document, field, message) = load_error(&yaml);
    assert_eq!(document, 3);
    assert_eq!(field, "metadata.name");
    assert!(
        message.contains(r#""server/a""#),
        "message names the policy: {message}"
    );
    assert!(
        message.contains("document 1"),
        "message names the first definition: {message}"
    );
}

#[test]
fn load_rejects_invalid_yaml() {
    let (_, field, message) = load_error("apiVersion: [unclosed\n");
    assert_eq!(field, "apiVersion");
    assert!(
        message.contains("line"),
        "message gives the position: {message}"
    );
}

#[test]
fn load_rejects_non_mapping_document() {
    let (_, field, message) = load_error("just a string\n");
    assert_eq!(field, "document root");
    assert!(message.contains("invalid type"), "{message}");
}

#[test]
fn load_accepts_kubectl_output() {
    let yaml = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web
  namespace: server
  labels: {team: a}
  uid: 0b5c2a52-7d3c-4c1e-9d5e-6f0b2f7f5a10
  resourceVersion: \"1234\"
  generation: 2
  creationTimestamp: \"2026-01-01T00:00:00Z\"
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/client/sa/default]
status: {}
";
    let policies = parse(yaml, DEFAULT_ROOT_NAMESPACE);
    assert_eq!(policies.len(), 1);
}

#[test]
fn docs_example_loads() {
    let page = include_str!("../../../docs/policy.md");
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/policy.md has a YAML example");
    let policies = parse(yaml, DEFAULT_ROOT_NAMESPACE);
    assert_eq!(policies.len(), 3);

    let frontend = Connection {
        identity: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
        ip: "192.168.1.1",
        namespace: "shop",
        labels: &[("app", "api")],
        port: 8080,
    };
    let verdict = frontend.evaluate(&policies);
    assert_eq!(verdict.decision, Decision::Allow);
    assert_eq!(verdict.policy.as_deref(), Some("shop/api-from-frontend"));
    let dry_run = [DryRunMatch {
        policy: "shop/deny-outside-office".to_owned(),
        decision: Decision::Deny,
    }];
    assert_eq!(verdict.dry_run, dry_run);

    let plaintext = Connection {
        identity: None,
        ..frontend
    };
    let verdict = plaintext.evaluate(&policies);
    assert_eq!(verdict.decision, Decision::Deny);
    assert_eq!(
        verdict.policy.as_deref(),
        Some("istio-system/deny-plaintext")
    );
}

#[test]
fn load_directory_in_name_order() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let write =
        |name: &str, text: &str| fs::write(dir.path().join(name), text).expect("write policy file");
    write(
        "20-deny.yml",
        &policy(
            "server",
            "deny-ssh",
            r#"{action: DENY, rules: [{to: [{operation: {ports: ["22"]}}]}]}"#,
        ),
    );
    write(
        "10-allow.yaml",
        &[
            policy("server", "allow-all", "{rules: [{}]}"),
            "---\n".to_owned(),
        ]
        .concat(),
    );
    write(".hidden.yaml", "not: a policy");
    write("notes.txt", "not a policy");
    fs::create_dir(dir.path().join("sub.yaml")).expect("create subdirectory");

    let policies = Policies::load(dir.path(), DEFAULT_ROOT_NAMESPACE).expect("load directory");

    let ids: Vec<&str> = policies
        .policies
        .iter()
        .map(|policy| policy.id.as_str())
        .collect();
    assert_eq!(ids, ["server/allow-all", "server/deny-ssh"]);
    assert_eq!(policies.policies[1].path, dir.path().join("20-deny.yml"));

    write("30-bad.yaml", &operation_rule("ports", r#"["65536"]"#));
    let error =
        Policies::load(dir.path(), DEFAULT_ROOT_NAMESPACE).expect_err("bad file must be rejected");
    let text = error.to_string();
    assert!(text.contains("30-bad.yaml"), "error names the file: {text}");
    assert!(
        text.contains("spec.rules[0].to[0].operation.ports[0]"),
        "error names the field: {text}"
    );
    assert!(text.contains("\"65536\""), "error names the value: {text}");
}

#[test]
fn load_missing_path_fails() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let missing = dir.path().join("missing.yaml");
    let error =
        Policies::load(&missing, DEFAULT_ROOT_NAMESPACE).expect_err("missing file must fail");
    assert!(
        matches!(error, Error::Read { ref path, .. } if *path == missing),
        "{error:?}"
    );
}

fn write_policy(path: &Path, text: &str) {
    fs::write(path, text).expect("write policy file");
}

#[test]
fn watcher_reloads_and_keeps_previous_on_error() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let path = dir.path().join("policies.yaml");
    let deny_ssh = policy(
        "server",
        "deny-ssh",
        r#"{action: DENY, rules: [{to: [{operation: {ports: ["22"]}}]}]}"#,
    );
    write_policy(&path, &deny_ssh);

    let mut watcher = PolicyWatcher::load(&path, DEFAULT_ROOT_NAMESPACE).expect("load policies");
    let store = watcher.store();
    let mut generation = store.subscribe();
    assert!(matches!(watcher.poll(), Reload::Unchanged));
    assert_eq!(store.current().len(), 1);

    let both = [
        deny_ssh.clone(),
        policy("server", "deny-web", "{action: DENY, rules: [{}]}"),
    ]
    .concat();
    write_policy(&path, &both);
    assert!(matches!(watcher.poll(), Reload::Reloaded { count: 2 }));
    assert!(generation.has_changed().expect("store alive"));
    generation.mark_unchanged();
    assert_eq!(
        FROM_CLIENT.evaluate(&store.current()).decision,
        Decision::Deny
    );

    write_policy(
        &path,
        &[
            both.as_str(),
            &source_rule("ipBlocks", r#"["300.0.0.0/8"]"#),
        ]
        .concat(),
    );
    match watcher.poll() {
        Reload::Failed(error) => {
            let text = error.to_string();
            assert!(
                text.contains("policies.yaml"),
                "error names the file: {text}"
            );
            assert!(
                text.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
                "error names the field: {text}"
            );
            assert!(
                text.contains("300.0.0.0/8"),
                "error names the value: {text}"
            );
        }
        other => panic!("expected a failed reload, got {other:?}"),
    }
    assert!(!generation.has_changed().expect("store alive"));
    assert_eq!(store.current().len(), 2, "previous policies kept");
    assert_eq!(
        FROM_CLIENT.evaluate(&store.current()).decision,
        Decision::Deny
    );
    assert!(
        matches!(watcher.poll(), Reload::Unchanged),
        "a broken version is reported once"
    );

    fs::remove_file(&path).expect("remove policy file");
    assert!(matches!(watcher.poll(), Reload::Failed(Error::Read { .. })));
    assert_eq!(store.current().len(), 2, "previous policies kept");

    write_policy(&path, &deny_ssh);
    assert!(matches!(watcher.poll(), Reload::Reloaded { count: 1 }));
    assert_eq!(
        FROM_CLIENT.evaluate(&store.current()).decision,
        Decision::Allow
    );
}

#[test]
fn watcher_sees_new_file_in_directory() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    write_policy(
        &dir.path().join("a.yaml"),
        &policy("server", "a", "{action: DENY}"),
    );
    let mut watcher =
        PolicyWatcher::load(dir.path(), DEFAULT_ROOT_NAMESPACE).expect("load policies");
    assert_eq!(watcher.store().current().len(), 1);

    write_policy(
        &dir.path().join("b.yaml"),
        &policy("server", "b", "{action: DENY}"),
    );
    assert!(matches!(watcher.poll(), Reload::Reloaded { count: 2 }));

    fs::remove_file(dir.path().join("a.yaml")).expect("remove policy file");
    assert!(matches!(watcher.poll(), Reload::Reloaded { count: 1 }));
}

#[tokio::test]
async fn watcher_task_notifies_subscribers() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let path = dir.path().join("policies.yaml");
    write_policy(&path, &policy("server", "a", "{action: DENY}"));
    let watcher = PolicyWatcher::load(&path, DEFAULT_ROOT_NAMESPACE).expect("load policies");
    let store = watcher.store();
    let mut generation = store.subscribe();
    let task = tokio::spawn(watcher.run(Duration::from_millis(10)));

    write_policy(
        &path,
        &[
            policy("server", "a", "{action: DENY}"),
            policy("server", "b", "{}"),
        ]
        .concat(),
    );
    // The timeout only bounds a hang; the reload normally lands within a few polls.
    tokio::time::timeout(Duration::from_secs(60), generation.changed())
        .await
        .expect("reload within 60 s")
        .expect("store alive");

    assert_eq!(*generation.borrow(), 1);
    assert_eq!(store.current().len(), 2);
    task.abort();
}

#[test]
fn load_error_quotes_unsupported_value() {
    let operation = "spec.rules[0].to[0].operation";
    let source = "spec.rules[0].from[0].source";
    // Each case: policy text, expected field path, and expected start of the message.
    let cases = [
        (
            operation_rule("methods", r#"["GET"]"#),
            format!("{operation}.methods"),
            r#"["GET"] is not supported: HTTP attributes are invisible to an L4 interceptor"#,
        ),
        (
            operation_rule("notPaths", r#"["/admin", "/debug"]"#),
            format!("{operation}.notPaths"),
            r#"["/admin", "/debug"] is not supported: HTTP attributes"#,
        ),
        (
            source_rule("requestPrincipals", r#"["*"]"#),
            format!("{source}.requestPrincipals"),
            r#"["*"] is not supported: request principals come from a JWT"#,
        ),
        (
            source_rule("serviceAccounts", r#"["ns/sa"]"#),
            format!("{source}.serviceAccounts"),
            r#"["ns/sa"] is not supported: match the service account through principals"#,
        ),
        (
            policy("server", "p", "{targetRef: {kind: Service, name: web}}"),
            "spec.targetRef".to_owned(),
            r#"{"kind": "Service", "name": "web"} is not supported: policies attach"#,
        ),
        (
            policy("server", "p", "{action: CUSTOM}"),
            "spec.action".to_owned(),
            r#""CUSTOM" is not supported: this interceptor enforces only ALLOW and DENY"#,
        ),
        (
            policy("server", "p", "{provider: {name: ext-authz}}"),
            "spec.provider".to_owned(),
            r#"{"name": "ext-authz"} is not supported: the provider belongs to the CUSTOM"#,
        ),
    ];

    for (yaml, expected_field, expected_start) in cases {
        let (_, field, message) = load_error(&yaml);
        assert_eq!(field, expected_field, "field of error {message:?}");
        assert!(
            message.starts_with(expected_start),
            "message {message:?} does not start with {expected_start:?}"
        );
    }
}

#[test]
fn load_error_cuts_long_value() {
    let paths: Vec<String> = (0..50).map(|i| format!("\"/path/{i}\"")).collect();
    let yaml = operation_rule("paths", &format!("[{}]", paths.join(", ")));
    let (_, _, message) = load_error(&yaml);
    let (value, _) = message
        .split_once(" is not supported")
        .expect("message quotes the value");
    assert!(value.ends_with("..."), "long value is cut: {value}");
    assert!(value.len() < 100, "long value is cut: {value}");
}

#[test]
fn unknown_field_lists_only_supported_fields() {
    // Each case: policy text, names the message must list, names it must not.
    let cases = [
        (
            policy("server", "p", "{rule: []}"),
            vec!["`selector`", "`action`", "`rules`"],
            vec!["targetRef", "targetRefs", "provider"],
        ),
        (
            operation_rule("port", "[8080]"),
            vec!["`ports`", "`notPorts`"],
            vec!["hosts", "methods", "paths"],
        ),
        (
            source_rule("principal", r#"["a"]"#),
            vec!["`principals`", "`ipBlocks`", "`notRemoteIpBlocks`"],
            vec!["requestPrincipals", "serviceAccounts"],
        ),
    ];

    for (yaml, listed, absent) in cases {
        let (_, _, message) = load_error(&yaml);
        assert!(message.contains("unknown field"), "{message}");
        assert!(
            message.contains(" at line "),
            "keeps the position: {message}"
        );
        for name in listed {
            assert!(message.contains(name), "{message:?} lacks {name}");
        }
        for name in absent {
            assert!(!message.contains(name), "{message:?} offers {name}");
        }
    }
}

#[test]
fn type_errors_name_no_rust_types() {
    let metadata_list = policy("server", "p", "{}").replace(
        "metadata:\n  name: p\n  namespace: server\n",
        "metadata: [p]\n",
    );
    let cases = [
        (metadata_list, "metadata"),
        (policy("server", "p", "[a]"), "spec"),
        (policy("server", "p", "{selector: [a]}"), "spec.selector"),
        (policy("server", "p", "{rules: [a]}"), "spec.rules[0]"),
        (
            policy("server", "p", "{rules: [{from: [a]}]}"),
            "spec.rules[0].from[0]",
        ),
        ("just a string\n".to_owned(), "document root"),
    ];

    for (yaml, expected_field) in cases {
        let (_, field, message) = load_error(&yaml);
        assert_eq!(field, expected_field, "field of error {message:?}");
        assert!(message.contains("expected a mapping"), "{message}");
        assert!(!message.contains("Raw"), "names a Rust type: {message}");
        assert!(!message.contains("struct"), "names a Rust type: {message}");
    }
}

/// Writes three broken files and one valid file into `dir`, and returns the expected
/// (file name, document, field, value) of each error in load order.
fn write_broken_directory(dir: &Path) -> Vec<(&'static str, usize, String, &'static str)> {
    let operation = "spec.rules[0].to[0].operation";
    write_policy(&dir.join("10-good.yaml"), &policy("server", "good", "{}"));
    write_policy(
        &dir.join("20-ports.yaml"),
        &[
            operation_rule("ports", r#"["65536"]"#),
            policy("server", "fine", "{}"),
            policy("server", "audit", "{action: AUDIT}"),
        ]
        .concat(),
    );
    write_policy(
        &dir.join("30-methods.yaml"),
        &operation_rule("methods", r#"["GET"]"#),
    );
    write_policy(&dir.join("40-syntax.yaml"), "apiVersion: [unclosed\n");
    vec![
        (
            "20-ports.yaml",
            1,
            format!("{operation}.ports[0]"),
            "\"65536\"",
        ),
        ("20-ports.yaml", 3, "spec.action".to_owned(), "\"AUDIT\""),
        (
            "30-methods.yaml",
            1,
            format!("{operation}.methods"),
            r#"["GET"]"#,
        ),
        ("40-syntax.yaml", 1, "apiVersion".to_owned(), "line 1"),
    ]
}

/// Checks that `error` contains exactly the `expected` errors, in order.
fn assert_errors(
    error: &Error,
    dir: &Path,
    expected: &[(&'static str, usize, String, &'static str)],
) {
    let errors = error.errors();
    assert_eq!(errors.len(), expected.len(), "errors: {error}");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("{} policy errors:", expected.len())),
        "{text}"
    );
    for (error, (file, document, field, value)) in errors.iter().zip(expected) {
        let Error::Invalid {
            path,
            document: actual_document,
            field: actual_field,
            message,
        } = error
        else {
            panic!("expected an invalid policy error, got {error:?}");
        };
        assert_eq!(*path, dir.join(file), "file of {error}");
        assert_eq!(actual_document, document, "document of {error}");
        assert_eq!(actual_field, field, "field of {error}");
        assert!(message.contains(value), "{error} lacks the value {value}");
        assert!(
            text.contains(&format!("\n  {error}")),
            "{text} lacks the line {error}"
        );
    }
}

#[test]
fn load_reports_every_broken_file() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    let expected = write_broken_directory(dir.path());

    let error = Policies::load(dir.path(), DEFAULT_ROOT_NAMESPACE)
        .expect_err("broken files must be rejected");

    assert_errors(&error, dir.path(), &expected);
}

#[test]
fn load_reports_unreadable_file_with_others() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    write_policy(
        &dir.path().join("10-bad.yaml"),
        &policy("server", "p", "{action: AUDIT}"),
    );
    // Root reads files whatever their mode, so invalid UTF-8 makes the read fail.
    fs::write(dir.path().join("20-binary.yaml"), b"kind: \xff\n").expect("write binary file");

    let error = Policies::load(dir.path(), DEFAULT_ROOT_NAMESPACE)
        .expect_err("broken files must be rejected");

    let errors = error.errors();
    assert_eq!(errors.len(), 2, "errors: {error}");
    assert!(
        matches!(&errors[0], Error::Invalid { field, .. } if field == "spec.action"),
        "{:?}",
        errors[0]
    );
    assert!(
        matches!(&errors[1], Error::Read { path, .. } if path.ends_with("20-binary.yaml")),
        "{:?}",
        errors[1]
    );
}

#[test]
fn watcher_reports_every_broken_file() {
    let dir = tempfile::tempdir().expect("create temporary directory");
    write_policy(
        &dir.path().join("10-good.yaml"),
        &policy("server", "good", "{}"),
    );
    let mut watcher =
        PolicyWatcher::load(dir.path(), DEFAULT_ROOT_NAMESPACE).expect("load policies");
    let store = watcher.store();

    let expected = write_broken_directory(dir.path());

    match watcher.poll() {
        Reload::Failed(error) => assert_errors(&error, dir.path(), &expected),
        other => panic!("expected a failed reload, got {other:?}"),
    }
    assert_eq!(store.current().len(), 1, "previous policies kept");
}
