//! The kTLS guest stage: runs the tests that must see kernel TLS inside a QEMU guest
//! that boots Debian's stock kernel (`tls` is a module there), through
//! `scripts/ktls-vm-run.sh`.
//!
//! The test binaries are built on the host, for the dev profile like the host stage,
//! and run in one guest boot, which reads them through its read-only view of the host's
//! filesystem. The guest emulates its CPU (TCG) and runs code about 10 times slower
//! than the host, so the stage sets `INTERCEPTOR_TIME_SCALE` for the tests' timeouts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use super::{cargo_path, run, Stages};
use crate::json;

/// Name of the stage in the timings that xtask prints.
pub const STAGE: &str = "kTLS guest";

/// The tests that run in the guest: a package and the `cargo test` options that select
/// its test targets.
const GUEST_TESTS: &[(&str, &[&str])] = &[
    ("interceptor", &["--lib", "--bins"]),
    ("interceptor-tests", &["--test", "e2e"]),
    // sk_lookup, transparent delivery and the rejection ring buffer on the stock
    // kernel, the oldest one tested.
    ("interceptor-tests", &["--test", "inbound"]),
    ("interceptor-tests", &["--test", "rejections"]),
];

/// `INTERCEPTOR_TIME_SCALE` in the guest, unless the caller sets it: TCG runs code 10
/// to 13 times slower than the host.
const GUEST_TIME_SCALE: &str = "10";

/// Seconds before the runner kills the guest, unless the caller sets `KTLS_VM_TIMEOUT`.
/// CI has 90 minutes for a cold build and every test, so this stage must stay far
/// below that. It took about 4 minutes on a 2-CPU development machine.
const GUEST_TIMEOUT_SECONDS: &str = "900";

/// Exit status of `scripts/ktls-vm-run.sh` when the guest timed out.
const EXIT_GUEST_TIMED_OUT: i32 = 124;

/// Exit status of `scripts/ktls-vm-run.sh` when the VM could not start or did not
/// report the command's status.
const EXIT_VM_FAILED: i32 = 125;

/// Runs in the guest, as `bash -c GUEST_SCRIPT ktls-guest DIR EXE... -- TEST_ARGS...`:
/// loads `tls`, then runs each test executable EXE in its package directory DIR, as
/// `cargo test` does, with TEST_ARGS. Runs every executable even after a failure and
/// exits with 1 when any failed.
const GUEST_SCRIPT: &str = r#"
set -u
modprobe tls || { echo "ktls-guest: modprobe tls failed" >&2; exit 1; }
if [ ! -r /proc/net/tls_stat ]; then
  echo "ktls-guest: /proc/net/tls_stat is missing after modprobe tls" >&2
  exit 1
fi
echo "ktls-guest: kernel $(uname -r) with the tls module loaded"
tests=()
while [ "$1" != -- ]; do
  tests+=("$1" "$2")
  shift 2
done
shift
failed=0
for ((i = 0; i < ${#tests[@]}; i += 2)); do
  dir=${tests[i]}
  executable=${tests[i + 1]}
  started=$SECONDS
  echo "ktls-guest: running ${executable##*/}"
  (cd "$dir" && CARGO_MANIFEST_DIR=$dir "$executable" "$@")
  status=$?
  echo "ktls-guest: ${executable##*/} exited with status $status after $((SECONDS - started))s"
  if [ "$status" != 0 ]; then failed=1; fi
done
exit $failed
"#;

/// A test executable that cargo built, with the directory `cargo test` runs it in.
#[derive(Debug)]
struct TestExecutable {
    /// Directory of the package's Cargo.toml.
    package_dir: PathBuf,
    path: PathBuf,
}

/// Rejects `--skip-guest` (`skip`) when `CI=true`, so that the kTLS tests never go
/// missing from CI unnoticed. `cargo xtask test` checks this before its first stage.
pub fn check_skip_allowed(skip: bool) -> anyhow::Result<()> {
    if skip && in_ci() {
        bail!("--skip-guest is rejected when CI=true: CI must run the kTLS guest tests");
    }
    Ok(())
}

/// Runs the stage for `cargo xtask test`: the guest tests with `test_args`, or nothing
/// when `skip` is set (`--skip-guest`).
pub fn run_stage(
    stages: &mut Stages,
    root: &Path,
    test_args: &[String],
    skip: bool,
) -> anyhow::Result<()> {
    check_skip_allowed(skip)?;
    if skip {
        eprintln!("xtask: stage {STAGE} skipped (--skip-guest)");
        return Ok(());
    }
    stages.run(STAGE, || run_guest_tests(root, test_args))
}

/// Prepares the guest with `scripts/setup.sh --ktls-guest`, then runs the guest tests
/// with `test_args` in one boot.
pub fn run_guest_tests(root: &Path, test_args: &[String]) -> anyhow::Result<()> {
    prepare(root)?;
    let executables = test_executables(root)?;

    let mut command = Command::new(root.join("scripts/ktls-vm-run.sh"));
    command
        .current_dir(root)
        .env("INTERCEPTOR_GUEST", "1")
        .env("INTERCEPTOR_EXPECT_KTLS", "1")
        .args(["bash", "-c", GUEST_SCRIPT, "ktls-guest"]);
    if std::env::var_os("INTERCEPTOR_TIME_SCALE").is_none() {
        command.env("INTERCEPTOR_TIME_SCALE", GUEST_TIME_SCALE);
    }
    if std::env::var_os("KTLS_VM_TIMEOUT").is_none() {
        command.env("KTLS_VM_TIMEOUT", GUEST_TIMEOUT_SECONDS);
    }
    for executable in &executables {
        command.arg(&executable.package_dir).arg(&executable.path);
    }
    command.arg("--").args(test_args);

    let status = command
        .status()
        .with_context(|| format!("starting {}", root.join("scripts/ktls-vm-run.sh").display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(EXIT_GUEST_TIMED_OUT) => {
            bail!("the kTLS guest timed out (KTLS_VM_TIMEOUT sets the limit in seconds)")
        }
        Some(EXIT_VM_FAILED) => bail!(cannot_start(
            "the QEMU guest failed to run (the ktls-vm lines above say why)"
        )),
        _ => bail!("tests failed in the kTLS guest ({status})"),
    }
}

/// Installs QEMU and fills the guest's cache, which `scripts/setup.sh --ktls-guest`
/// does when anything is missing.
pub fn prepare(root: &Path) -> anyhow::Result<()> {
    run(Command::new("bash")
        .arg(root.join("scripts/setup.sh"))
        .arg("--ktls-guest"))
    .map_err(|err| anyhow::anyhow!(cannot_start(&format!("{err:#}"))))
}

/// Runs `cargo xtask demo` inside the guest with the binaries built on this host.
pub fn run_demo(root: &Path) -> anyhow::Result<()> {
    prepare(root)?;
    let xtask = root.join("target/debug/xtask");
    let mut command = Command::new(root.join("scripts/ktls-vm-run.sh"));
    command
        .current_dir(root)
        .env("INTERCEPTOR_GUEST", "1")
        .arg(&xtask)
        .args(["demo", "--no-build"]);
    if std::env::var_os("INTERCEPTOR_TIME_SCALE").is_none() {
        command.env("INTERCEPTOR_TIME_SCALE", GUEST_TIME_SCALE);
    }
    let status = command
        .status()
        .with_context(|| format!("starting {}", root.join("scripts/ktls-vm-run.sh").display()))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(EXIT_VM_FAILED) => bail!(cannot_start(
            "the QEMU guest failed to run (the ktls-vm lines above say why)"
        )),
        _ => bail!("the demo failed in the kTLS guest ({status})"),
    }
}

/// Builds the message for a guest that cannot start, with the way around it outside CI.
fn cannot_start(reason: &str) -> String {
    let mut message = format!("the kTLS guest cannot start: {reason}");
    if !in_ci() {
        message.push_str(". Outside CI, `cargo xtask test --skip-guest` skips this stage");
    }
    message
}

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Builds the guest tests (a no-op when the host stage has built them) and returns
/// their executables, from the `compiler-artifact` messages that cargo prints with
/// `--message-format=json`.
fn test_executables(root: &Path) -> anyhow::Result<Vec<TestExecutable>> {
    let mut executables = Vec::new();
    for (package, selection) in GUEST_TESTS {
        let mut command = Command::new("cargo");
        command
            .current_dir(root)
            .env("PATH", cargo_path())
            .args([
                "test",
                "--no-run",
                "--message-format=json",
                "--package",
                package,
            ])
            .args(*selection)
            .stderr(Stdio::inherit());
        let output = command
            .output()
            .with_context(|| format!("starting {command:?}"))?;
        if !output.status.success() {
            bail!("{command:?} failed with {}", output.status);
        }
        let stdout = String::from_utf8(output.stdout)
            .with_context(|| format!("{command:?} printed invalid UTF-8"))?;
        let before = executables.len();
        for line in stdout.lines() {
            let message =
                json::parse(line).with_context(|| format!("reading cargo's message {line:?}"))?;
            executables.extend(test_executable(&message));
        }
        if executables.len() == before {
            bail!("{command:?} reported no test executable");
        }
    }
    Ok(executables)
}

/// Returns the test executable of a `compiler-artifact` message built with the test
/// profile, `None` for any other message (such as a binary built for integration tests).
fn test_executable(message: &json::Value) -> Option<TestExecutable> {
    if message.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    if !message.get("profile")?.get("test")?.as_bool()? {
        return None;
    }
    let path = PathBuf::from(message.get("executable")?.as_str()?);
    let package_dir = Path::new(message.get("manifest_path")?.as_str()?)
        .parent()?
        .to_owned();
    Some(TestExecutable { package_dir, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(kind: &str, test_profile: bool, executable: &str) -> json::Value {
        let line = format!(
            r#"{{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{{"kind":["{kind}"],"name":"x"}},"profile":{{"test":{test_profile}}},"executable":{executable}}}"#
        );
        json::parse(&line).expect("valid message")
    }

    #[test]
    fn test_profile_artifact_selected() {
        let executable =
            test_executable(&artifact("test", true, r#""/w/target/debug/deps/e2e-1""#))
                .expect("a test executable");

        assert_eq!(executable.path, Path::new("/w/target/debug/deps/e2e-1"));
        assert_eq!(executable.package_dir, Path::new("/w/tests"));
    }

    #[test]
    fn binary_for_integration_tests_skipped() {
        let message = artifact("bin", false, r#""/w/target/debug/mesh-peer""#);

        assert!(test_executable(&message).is_none());
    }

    #[test]
    fn library_without_executable_skipped() {
        let message = artifact("lib", false, "null");

        assert!(test_executable(&message).is_none());
    }

    #[test]
    fn other_messages_skipped() {
        let message =
            json::parse(r#"{"reason":"build-finished","success":true}"#).expect("valid message");

        assert!(test_executable(&message).is_none());
    }
}
