//! The sidecar's iptables rules in its pod's network namespace.
//!
//! The rules live in two chains of the nat table that belong to the sidecar alone,
//! [`OUTBOUND_CHAIN`] and [`INBOUND_CHAIN`], reached by one jump each from `OUTPUT` and
//! `PREROUTING`. Removing them therefore touches no rule that someone else installed.
//!
//! They are changed by running the `iptables` command, as Istio's sidecar injector does,
//! rather than by speaking nf_tables or the legacy xtables socket protocol directly.
//! Debian 12's `iptables` (1.8.9) is the nf_tables backend; `iptables-legacy` works too.
//! Every call passes `-w`, so a call waits for the legacy backend's global xtables lock
//! instead of failing while another sidecar changes its own namespace.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use tracing::warn;

/// Chain in the nat table that `OUTPUT` jumps to: redirects the pod's outbound TCP.
pub const OUTBOUND_CHAIN: &str = "INTERCEPTOR_OUT";

/// Chain in the nat table that `PREROUTING` jumps to: redirects inbound TCP.
pub const INBOUND_CHAIN: &str = "INTERCEPTOR_IN";

/// Errors of running iptables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("iptables command {program} not found: install the iptables package (scripts/setup.sh does) or name the command with --iptables")]
    NotFound { program: PathBuf },
    #[error("running {program} failed")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// Ports and firewall mark of the redirect rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// Firewall mark of the sidecar's own sockets, whose connects are never redirected.
    pub mark: u32,
    /// Port of the outbound listener on 127.0.0.1, which receives the pod's connects.
    pub outbound_port: u16,
    /// Port of the tunnel listener on the pod IP, the only inbound port left alone.
    pub tunnel_port: u16,
    /// Port of the listener that resets every other inbound connection.
    pub inbound_port: u16,
}

impl Redirect {
    /// Returns the commands that install the rules, each as the arguments after
    /// `iptables -w -t nat`.
    ///
    /// The chains are filled before the jumps are added, so no packet ever passes
    /// through a chain that is only partly built.
    fn install_commands(&self) -> Vec<Vec<String>> {
        let Self {
            mark,
            outbound_port,
            tunnel_port,
            inbound_port,
        } = self;
        let commands = [
            format!("-N {OUTBOUND_CHAIN}"),
            // The sidecar's own connects: tunnels, delivery to its app, passthrough.
            format!("-A {OUTBOUND_CHAIN} -m mark --mark {mark:#x} -j RETURN"),
            format!("-A {OUTBOUND_CHAIN} -d 127.0.0.0/8 -j RETURN"),
            format!("-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {outbound_port}"),
            format!("-N {INBOUND_CHAIN}"),
            format!("-A {INBOUND_CHAIN} -p tcp --dport {tunnel_port} -j RETURN"),
            format!("-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {inbound_port}"),
            format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}"),
            format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
        ];
        commands
            .iter()
            .map(|command| command.split_whitespace().map(str::to_owned).collect())
            .collect()
    }
}

/// Returns the commands that remove every jump to the sidecar's chains and the chains
/// themselves, found in `listing` (the output of `iptables -t nat -S`), each as the
/// arguments after `iptables -w -t nat`.
///
/// Lines are split at whitespace. That reproduces a rule exactly unless it has a quoted
/// argument such as a comment, and the rules of this module have none.
fn removal_commands(listing: &str) -> Vec<Vec<String>> {
    let own = [OUTBOUND_CHAIN, INBOUND_CHAIN];
    let mut jumps = Vec::new();
    let mut chains = Vec::new();
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["-N", chain] if own.contains(chain) => chains.push((*chain).to_owned()),
            ["-A", chain, rule @ ..] if !own.contains(chain) => {
                let jumps_to_own = rule
                    .windows(2)
                    .any(|pair| pair[0] == "-j" && own.contains(&pair[1]));
                if jumps_to_own {
                    let mut delete = vec!["-D".to_owned(), (*chain).to_owned()];
                    delete.extend(rule.iter().map(|word| (*word).to_owned()));
                    jumps.push(delete);
                }
            }
            _ => {}
        }
    }
    // A chain can be deleted only once nothing jumps to it and it is empty.
    let mut commands = jumps;
    for chain in chains {
        commands.push(vec!["-F".to_owned(), chain.clone()]);
        commands.push(vec!["-X".to_owned(), chain]);
    }
    commands
}

/// The iptables command to run.
#[derive(Debug, Clone)]
pub struct Iptables {
    program: PathBuf,
}

impl Iptables {
    pub fn new(program: &Path) -> Self {
        Self {
            program: program.to_owned(),
        }
    }

    /// Returns the first line of `iptables --version`, e.g. `iptables v1.8.9
    /// (nf_tables)`, which names the backend.
    pub fn version(&self) -> Result<String, Error> {
        let output = self.run(["--version"])?;
        Ok(output.lines().next().unwrap_or_default().trim().to_owned())
    }

    /// Removes what an earlier sidecar left behind, then installs the rules of
    /// `redirect`. Returns the installed rules and the number of stale commands run.
    ///
    /// When a step fails, whatever was installed is removed again before the error is
    /// returned.
    pub fn install(&self, redirect: &Redirect) -> Result<(Rules, usize), Error> {
        let stale = self.remove_all()?;
        let rules = Rules {
            iptables: self.clone(),
            removed: false,
        };
        for args in redirect.install_commands() {
            // On error, dropping `rules` removes the part already installed.
            self.nat(&args)?;
        }
        Ok((rules, stale))
    }

    /// Removes every jump to the sidecar's chains and the chains themselves, and returns
    /// the number of commands run.
    fn remove_all(&self) -> Result<usize, Error> {
        let listing = self.nat(&["-S"])?;
        let commands = removal_commands(&listing);
        for args in &commands {
            self.nat(args)?;
        }
        Ok(commands.len())
    }

    /// Runs `iptables -w -t nat ARGS` and returns its stdout.
    fn nat<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, Error> {
        let mut all = vec![OsStr::new("-w"), OsStr::new("-t"), OsStr::new("nat")];
        all.extend(args.iter().map(AsRef::as_ref));
        self.run(all)
    }

    fn run<I, S>(&self, args: I) -> Result<String, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(&self.program);
        command.args(args);
        let output = command.output().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::NotFound {
                    program: self.program.clone(),
                }
            } else {
                Error::Spawn {
                    program: self.program.clone(),
                    source,
                }
            }
        })?;
        if !output.status.success() {
            let words: Vec<_> = std::iter::once(command.get_program())
                .chain(command.get_args())
                .map(OsStr::to_string_lossy)
                .collect();
            return Err(Error::Failed {
                command: words.join(" "),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The installed rules. [`Rules::remove`] removes them and returns any failure.
/// Dropping them without that call removes them too but can only log a failure.
#[derive(Debug)]
pub struct Rules {
    iptables: Iptables,
    removed: bool,
}

impl Rules {
    /// Removes the rules and the chains.
    pub fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.iptables.remove_all().map(drop)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = self.iptables.remove_all() {
            warn!(%error, "removing the sidecar's iptables rules failed; the next sidecar start removes them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect() -> Redirect {
        Redirect {
            mark: 0x539,
            outbound_port: 15001,
            tunnel_port: 15008,
            inbound_port: 15006,
        }
    }

    fn joined(commands: &[Vec<String>]) -> Vec<String> {
        commands.iter().map(|args| args.join(" ")).collect()
    }

    #[test]
    fn install_builds_chains_then_jumps() {
        let commands = joined(&redirect().install_commands());

        assert_eq!(
            commands,
            [
                "-N INTERCEPTOR_OUT",
                "-A INTERCEPTOR_OUT -m mark --mark 0x539 -j RETURN",
                "-A INTERCEPTOR_OUT -d 127.0.0.0/8 -j RETURN",
                "-A INTERCEPTOR_OUT -p tcp -j REDIRECT --to-ports 15001",
                "-N INTERCEPTOR_IN",
                "-A INTERCEPTOR_IN -p tcp --dport 15008 -j RETURN",
                "-A INTERCEPTOR_IN -p tcp -j REDIRECT --to-ports 15006",
                "-A OUTPUT -p tcp -j INTERCEPTOR_OUT",
                "-A PREROUTING -p tcp -j INTERCEPTOR_IN",
            ]
        );
    }

    #[test]
    fn removal_finds_jumps_and_chains() {
        // As `iptables -t nat -S` lists a namespace with the rules installed twice over
        // and one foreign rule.
        let listing = "\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N INTERCEPTOR_IN
-N INTERCEPTOR_OUT
-N OTHER
-A PREROUTING -p tcp -j INTERCEPTOR_IN
-A OUTPUT -p tcp -j INTERCEPTOR_OUT
-A OUTPUT -p tcp -j INTERCEPTOR_OUT
-A OUTPUT -d 10.0.0.0/8 -j OTHER
-A INTERCEPTOR_IN -p tcp --dport 15008 -j RETURN
-A INTERCEPTOR_IN -p tcp -j REDIRECT --to-ports 15006
-A INTERCEPTOR_OUT -m mark --mark 0x539 -j RETURN
-A INTERCEPTOR_OUT -p tcp -j REDIRECT --to-ports 15001
";
        let commands = joined(&removal_commands(listing));

        assert_eq!(
            commands,
            [
                "-D PREROUTING -p tcp -j INTERCEPTOR_IN",
                "-D OUTPUT -p tcp -j INTERCEPTOR_OUT",
                "-D OUTPUT -p tcp -j INTERCEPTOR_OUT",
                "-F INTERCEPTOR_IN",
                "-X INTERCEPTOR_IN",
                "-F INTERCEPTOR_OUT",
                "-X INTERCEPTOR_OUT",
            ]
        );
    }

    #[test]
    fn removal_of_clean_table_is_empty() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N OTHER\n-A OUTPUT -j OTHER\n";

        assert!(removal_commands(listing).is_empty());
    }

    #[test]
    fn missing_program_named() {
        let iptables = Iptables::new(Path::new("/nonexistent/iptables"));

        let error = iptables.version().expect_err("program is missing");

        assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
        assert!(
            error.to_string().contains("/nonexistent/iptables"),
            "{error}"
        );
    }
}
