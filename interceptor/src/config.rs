//! Command-line configuration of the daemon.
//!
//! Every flag has an `INTERCEPTOR_*` environment fallback. The workload directory the
//! daemon serves is a separate file (`--config`, see [`crate::workloads`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;

/// Ports the tunnel never delivers to, so it cannot become a proxy to the daemon's own
/// listeners inside a pod: besides the configured outbound and tunnel ports, Istio's
/// inbound (15006) and admin (15020) numbers, which operators expect to be the mesh's.
pub const RESERVED_PORTS: [u16; 2] = [15006, 15020];

/// `SO_MARK` of the daemon's sockets that deliver inbound connections to the app. In
/// each enrolled pod, a policy route sends packets with this mark to `lo`, and
/// `net.ipv4.tcp_fwmark_accept=1` gives the app's accepted socket the same mark, so the
/// app's replies to the client's address come back to the daemon.
pub const DELIVERY_MARK: u32 = 0x539;

/// Routing table of the delivery route (`local 0.0.0.0/0 dev lo`) in each enrolled pod.
pub const DELIVERY_ROUTE_TABLE: u32 = 100;

/// Environment variable of `run --ca-dir`.
pub const LOCAL_CA_DIR_ENV: &str = "INTERCEPTOR_LOCAL_CA_DIR";
/// Environment variable of `run --ca-addr`.
pub const CA_ADDR_ENV: &str = "INTERCEPTOR_CA_ADDR";

/// Flags of `interceptor run`.
#[derive(Args, Debug, Clone)]
pub struct RunConfig {
    /// Workload directory file (TOML) shared by every daemon of the mesh.
    #[arg(long, env = "INTERCEPTOR_CONFIG")]
    pub config: PathBuf,

    /// Name of this daemon's node in the workload directory.
    #[arg(long, env = "INTERCEPTOR_NODE")]
    pub node: String,

    /// Single-host mode: directory holding `ca-cert.pem` and `ca-key.pem`, as written by
    /// `interceptor ca init`, from which the daemon signs its workloads' SVIDs itself.
    /// Give either this or `--ca-addr`. Its variable differs from the
    /// `INTERCEPTOR_CA_DIR` of the `ca` commands, so exporting that one for a CA on
    /// the same host does not switch the daemon to single-host mode.
    #[arg(long, env = LOCAL_CA_DIR_ENV)]
    pub ca_dir: Option<PathBuf>,

    /// Address of the CA service (`interceptor ca serve`, port 15012), from which the
    /// daemon obtains its node and workload SVIDs and the trust bundle. Give either this
    /// or `--ca-dir`.
    #[arg(long, env = CA_ADDR_ENV)]
    pub ca_addr: Option<SocketAddr>,

    /// PEM roots that the daemon trusts for the CA service before it has fetched a trust
    /// bundle, e.g. a copy of the CA's `ca-cert.pem`. Required with `--ca-addr` until the
    /// state directory contains a bundle.
    #[arg(long, env = "INTERCEPTOR_CA_TRUST_BUNDLE")]
    pub ca_trust_bundle: Option<PathBuf>,

    /// File with this node's one-time join token from `interceptor ca token` (mode
    /// 0600). Read only when the state directory contains no valid node SVID.
    #[arg(long, env = "INTERCEPTOR_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// Directory for the node key (mode 0600), the node SVID and the last trust bundle,
    /// so a restarted daemon needs no new join token. Created with mode 0700.
    #[arg(
        long,
        env = "INTERCEPTOR_STATE_DIR",
        default_value = "/var/lib/interceptor"
    )]
    pub state_dir: PathBuf,

    /// Interval at which the daemon fetches the trust bundle from the CA service, e.g.
    /// `30s`. A root rotation waits at least this long between its steps.
    #[arg(long, env = "INTERCEPTOR_BUNDLE_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub bundle_refresh: Duration,

    /// Largest difference between this node's clock and the CA's that the daemon
    /// accepts, e.g. `30s`. A larger one stops the daemon at start and is logged as an
    /// error later.
    #[arg(long, env = "INTERCEPTOR_MAX_CLOCK_SKEW", default_value = "30s", value_parser = parse_duration)]
    pub max_clock_skew: Duration,

    /// Test only: shifts the daemon's view of the clock by this signed offset, e.g.
    /// `-90s` or `45s`, to exercise the clock skew check without moving the system
    /// clock. Used for the skew check and for the expiry of its own SVIDs.
    #[arg(long, env = "INTERCEPTOR_TEST_CLOCK_OFFSET", value_parser = parse_signed_duration, allow_hyphen_values = true)]
    pub test_clock_offset: Option<SignedDuration>,

    /// Network namespace to run the daemon in (a file such as `/run/netns/node1`);
    /// by default the one it was started in. The standalone topology runs each node's
    /// daemon in the node's namespace.
    #[arg(long, env = "INTERCEPTOR_NETNS")]
    pub netns: Option<PathBuf>,

    /// Mount point of the bpffs holding the pinned programs and maps; mounted if missing.
    #[arg(long, env = "INTERCEPTOR_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Port of the outbound listener on 127.0.0.1 in each pod.
    #[arg(long, env = "INTERCEPTOR_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,

    /// Port of the mTLS tunnel listener on each pod's IP.
    #[arg(long, env = "INTERCEPTOR_TUNNEL_PORT", default_value_t = 15008)]
    pub tunnel_port: u16,

    /// Port of the inbound plaintext listener on each pod's IP, where the `sk_lookup`
    /// program steers plaintext connections of permissive workloads.
    #[arg(long, env = "INTERCEPTOR_PLAINTEXT_PORT", default_value_t = 15006)]
    pub plaintext_port: u16,

    /// Authorization policies: a YAML file, or a directory of `*.yaml` and `*.yml`
    /// files. Reloaded when they change; unset allows every connection.
    #[arg(long, env = "INTERCEPTOR_POLICIES")]
    pub policies: Option<PathBuf>,

    /// Reset open inbound connections that a reloaded policy set denies. By default
    /// open connections keep running and only new ones see the new policies.
    #[arg(long, env = "INTERCEPTOR_POLICY_RELOAD_CUTS_DENIED")]
    pub policy_reload_cuts_denied: bool,

    /// Time allowed for a tunnel's TCP connect, TLS handshake and preamble, e.g. `10s`.
    #[arg(long, env = "INTERCEPTOR_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time allowed to connect to a destination (the app in the pod, or a host outside
    /// the mesh), e.g. `5s`.
    #[arg(long, env = "INTERCEPTOR_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Lifetime of workload certificates (SVIDs), e.g. `1h`; each is renewed at about
    /// half its lifetime, with a random 10% jitter. The CA service may cap it. The node
    /// SVID has its own `--node-svid-lifetime`.
    #[arg(long, env = "INTERCEPTOR_SVID_LIFETIME", default_value = "1h", value_parser = parse_duration)]
    pub svid_lifetime: Duration,

    /// Lifetime of the node SVID from the CA service, e.g. `24h`, at attestation and at
    /// every renewal; renewed like workload SVIDs. A daemon whose node SVID expired (for example during a longer CA outage)
    /// needs a new join token.
    #[arg(long, env = "INTERCEPTOR_NODE_SVID_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub node_svid_lifetime: Duration,

    /// Number of async worker threads.
    #[arg(long, env = "INTERCEPTOR_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Address of the admin endpoint (`/metrics`, `/healthz`) in the daemon's network
    /// namespace; must be a loopback address.
    #[arg(
        long,
        env = "INTERCEPTOR_ADMIN_ADDR",
        default_value = "127.0.0.1:15020"
    )]
    pub admin_addr: std::net::SocketAddr,

    /// Kernel TLS: `auto` hands tunnels to the kernel where it can carry them, `off`
    /// keeps every tunnel in userspace rustls.
    #[arg(long, env = "INTERCEPTOR_KERNEL_TLS", value_enum, default_value_t = KernelTls::Auto)]
    pub kernel_tls: KernelTls,

    /// Records sent under one traffic key before rustls rekeys with a TLS KeyUpdate,
    /// lowering each suite's own limit (AES-GCM: 2^23 records in rustls). For tests of
    /// the rekey policy; unset in production.
    #[arg(long, env = "INTERCEPTOR_TLS_RECORD_LIMIT")]
    pub tls_record_limit: Option<u64>,
}

/// Values of `--kernel-tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelTls {
    Auto,
    Off,
}

impl RunConfig {
    /// Checks values that depend on each other; returns every problem at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.outbound_port == 0 {
            problems.push("--outbound-port 0: must be a port number from 1 to 65535".to_owned());
        }
        if self.tunnel_port == 0 {
            problems.push("--tunnel-port 0: must be a port number from 1 to 65535".to_owned());
        }
        if self.plaintext_port == 0 {
            problems.push("--plaintext-port 0: must be a port number from 1 to 65535".to_owned());
        }
        let ports = [
            ("--outbound-port", self.outbound_port),
            ("--tunnel-port", self.tunnel_port),
            ("--plaintext-port", self.plaintext_port),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            for (other_flag, other_port) in &ports[i + 1..] {
                if port == other_port {
                    problems.push(format!(
                        "{flag} {port} and {other_flag} {other_port}: must differ"
                    ));
                }
            }
        }
        for (flag, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--connect-timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{flag} 0s: must be longer than zero"));
            }
        }
        match (&self.ca_dir, &self.ca_addr) {
            // Either value may come from its environment variable, which the user
            // may not think of as a flag, so the message names both sources.
            (Some(_), Some(_)) => problems.push(format!(
                "--ca-dir (or {LOCAL_CA_DIR_ENV}) and --ca-addr (or {CA_ADDR_ENV}): give only one of them"
            )),
            (None, None) => problems.push(
                "missing CA: give --ca-addr (the CA service) or --ca-dir (single-host mode)"
                    .to_owned(),
            ),
            _ => {}
        }
        if self.node_svid_lifetime < Duration::from_secs(2) {
            problems.push(format!(
                "--node-svid-lifetime {:?}: must be at least 2s",
                self.node_svid_lifetime
            ));
        }
        if self.bundle_refresh.is_zero() {
            problems.push("--bundle-refresh 0s: must be longer than zero".to_owned());
        }
        if self.svid_lifetime < Duration::from_secs(2) {
            problems.push(format!(
                "--svid-lifetime {:?}: must be at least 2s",
                self.svid_lifetime
            ));
        }
        if let Err(problem) = crate::admin::check_addr(self.admin_addr) {
            problems.push(problem);
        }
        if self.tls_record_limit == Some(0) {
            problems.push("--tls-record-limit 0: must be at least 1".to_owned());
        }
        if self.worker_threads == 0 {
            problems.push("--worker-threads 0: must be at least 1".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Returns whether the tunnel must refuse to deliver to `port`.
    pub fn is_reserved_port(&self, port: u16) -> bool {
        port == 0
            || port == self.outbound_port
            || port == self.tunnel_port
            || port == self.plaintext_port
            || RESERVED_PORTS.contains(&port)
    }
}

/// A duration with a sign, such as the test-only clock offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignedDuration {
    pub negative: bool,
    pub magnitude: Duration,
}

impl SignedDuration {
    /// Returns `time` moved by this duration.
    pub fn apply(self, time: SystemTime) -> SystemTime {
        if self.negative {
            time.checked_sub(self.magnitude).unwrap_or(time)
        } else {
            time.checked_add(self.magnitude).unwrap_or(time)
        }
    }
}

/// Parses a duration as [`parse_duration`] does, with an optional leading `-` or `+`.
pub fn parse_signed_duration(text: &str) -> Result<SignedDuration, String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    Ok(SignedDuration {
        negative,
        magnitude: parse_duration(rest)?,
    })
}

/// Parses a duration written as a number and a unit: `ms`, `s`, `m` or `h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let invalid = || {
        format!("invalid duration {text:?}: expected a whole number with a unit (ms, s, m or h), e.g. 10s")
    };
    let value: u64 = number.parse().map_err(|_| invalid())?;
    let millis = match unit {
        "ms" => Some(value),
        "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunConfig,
    }

    fn parse(extra: &[&str]) -> RunConfig {
        use clap::Parser as _;
        let required = [
            "run", "--config", "m.toml", "--node", "n1", "--ca-dir", "ca",
        ];
        Cli::try_parse_from(required.iter().chain(extra))
            .expect("parse the flags")
            .run
    }

    #[test]
    fn listener_ports_must_differ() {
        let problems = parse(&["--plaintext-port", "15008"])
            .validate()
            .expect_err("two listeners on one port");

        assert_eq!(
            problems,
            ["--tunnel-port 15008 and --plaintext-port 15008: must differ"]
        );
    }

    #[test]
    fn plaintext_port_is_reserved() {
        let config = parse(&["--plaintext-port", "16006"]);

        assert!(config.is_reserved_port(16006));
        assert!(config.validate().is_ok());
    }

    #[test]
    fn ca_dir_and_addr_conflict_names_variables() {
        let problems = parse(&["--ca-addr", "10.0.0.1:15012"])
            .validate()
            .expect_err("both CA sources");

        assert_eq!(
            problems,
            ["--ca-dir (or INTERCEPTOR_LOCAL_CA_DIR) and --ca-addr (or INTERCEPTOR_CA_ADDR): give only one of them"]
        );
    }

    #[test]
    fn run_ca_dir_variable_differs_from_ca_commands() {
        use clap::CommandFactory as _;
        let command = Cli::command();
        let ca_dir = command
            .get_arguments()
            .find(|arg| arg.get_id() == "ca_dir")
            .expect("the --ca-dir argument");

        assert_eq!(
            ca_dir.get_env().and_then(|env| env.to_str()),
            Some("INTERCEPTOR_LOCAL_CA_DIR")
        );
    }

    #[test]
    fn duration_units_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn signed_duration_parses_and_applies() {
        let behind = parse_signed_duration("-90s").expect("parse -90s");
        assert!(behind.negative);
        assert_eq!(behind.magnitude, Duration::from_secs(90));
        let ahead = parse_signed_duration("+2m").expect("parse +2m");
        assert!(!ahead.negative);
        let now = SystemTime::now();
        assert_eq!(behind.apply(now), now - Duration::from_secs(90));
        assert_eq!(ahead.apply(now), now + Duration::from_secs(120));
        assert!(parse_signed_duration("--1s").is_err());
    }

    #[test]
    fn duration_rejects_bad_input() {
        for text in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "10 s",
            "10d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(text).is_err(), "accepted {text:?}");
        }
    }
}
