//! Tasks of the interceptor workspace: `cargo xtask <task>`.
//!
//! - `build-ebpf`: builds the eBPF object with Debian's rustc (the only compiler here
//!   that ships `core` for `bpfel-unknown-none`).
//! - `demo`: the main job on the embedded default topology (see `demo.rs`).
//! - `test`: unit tests and the privileged end-to-end tests, on the host and then in
//!   the kTLS guest (`--skip-guest` skips the guest outside CI), then a quick bench over
//!   the debug binaries to check the bench harness.
//! - `ktls-guest`: only the tests in the kTLS guest, a QEMU guest with Debian's stock
//!   kernel (see `ktls_guest.rs`).
//! - `bench`: what the mesh costs against plain TCP, with release builds (see `bench.rs`).
//!
//! Every task first runs `scripts/setup.sh`, which installs what is missing and returns
//! at once when nothing is.

mod bench;
mod demo;
mod json;
mod ktls_guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo and test tasks of the interceptor workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object into target/bpf.
    BuildEbpf,
    /// Run two nodes with two pods each, carry real traffic across them through the
    /// mesh, and check the wire.
    Demo(demo::Options),
    /// Measure throughput, latency, connection rate, CPU and memory of each mode against
    /// plain TCP, with release builds (as root).
    Bench(bench::Options),
    /// Run the unit tests and the privileged end-to-end tests (as root), on the host
    /// and then in the kTLS guest.
    Test {
        /// Skip the tests in the kTLS guest, for machines that cannot run QEMU. Rejected
        /// when CI=true. Give it before any test arguments.
        #[arg(long)]
        skip_guest: bool,
        /// Arguments passed to `cargo test` after `--`, e.g. a test name filter; the
        /// test binaries in the kTLS guest get them too.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run only the tests that need kernel TLS, in one boot of a QEMU guest with
    /// Debian's stock kernel (as root): the `interceptor` unit tests and the end-to-end
    /// tests.
    KtlsGuest {
        /// Arguments passed to each test binary, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::BuildEbpf => {
            setup(&root)?;
            build_ebpf(&root)
        }
        Task::Demo(options) if options.no_build => demo::run(&root, &options),
        Task::Demo(options) => {
            let mut stages = Stages::new();
            stages.run("setup", || setup(&root))?;
            stages.run("build eBPF", || build_ebpf(&root))?;
            stages.run("build", || {
                cargo(
                    &root,
                    &[
                        "build",
                        "--workspace",
                        "--exclude",
                        "interceptor-ebpf",
                        "--bins",
                    ],
                )
            })?;
            let result = if options.ktls_guest {
                stages.run("demo in the kTLS guest", || ktls_guest::run_demo(&root))
            } else {
                stages.run("demo", || demo::run(&root, &options))
            };
            stages.print();
            result
        }
        Task::Bench(options) => {
            let mut stages = Stages::new();
            stages.run("setup", || setup(&root))?;
            stages.run("build eBPF", || build_ebpf(&root))?;
            if options.needs_release_build() {
                stages.run("build release", || {
                    cargo(
                        &root,
                        &[
                            "build",
                            "--release",
                            "--workspace",
                            "--exclude",
                            "interceptor-ebpf",
                            "--bins",
                        ],
                    )
                })?;
            }
            let result = stages.run("bench", || bench::run(&root, &options));
            stages.print();
            result
        }
        Task::Test { skip_guest, args } => {
            ktls_guest::check_skip_allowed(skip_guest)?;
            let mut stages = Stages::new();
            stages.run("setup", || setup(&root))?;
            stages.run("build eBPF", || build_ebpf(&root))?;
            stages.run("build", || {
                cargo(
                    &root,
                    &[
                        "build",
                        "--workspace",
                        "--exclude",
                        "interceptor-ebpf",
                        "--bins",
                    ],
                )?;
                cargo(
                    &root,
                    &[
                        "test",
                        "--workspace",
                        "--exclude",
                        "interceptor-ebpf",
                        "--no-run",
                    ],
                )
            })?;
            let mut test_args: Vec<&str> =
                vec!["test", "--workspace", "--exclude", "interceptor-ebpf", "--"];
            test_args.extend(args.iter().map(String::as_str));
            let result = stages
                .run("tests", || cargo(&root, &test_args))
                .and_then(|()| ktls_guest::run_stage(&mut stages, &root, &args, skip_guest))
                // The quick bench keeps the harness from rotting; it fails on harness
                // errors and broken mesh paths, never on noise or missed targets.
                .and_then(|()| {
                    stages.run("bench --quick", || {
                        bench::run(&root, &bench::Options::harness_check())
                    })
                });
            stages.print();
            result
        }
        Task::KtlsGuest { args } => {
            let mut stages = Stages::new();
            stages.run("setup", || setup(&root))?;
            stages.run("build eBPF", || build_ebpf(&root))?;
            // The end-to-end tests run the daemon and mesh-peer binaries.
            stages.run("build", || {
                cargo(
                    &root,
                    &[
                        "build",
                        "--workspace",
                        "--exclude",
                        "interceptor-ebpf",
                        "--bins",
                    ],
                )
            })?;
            let result = stages.run(ktls_guest::STAGE, || {
                ktls_guest::run_guest_tests(&root, &args)
            });
            stages.print();
            result
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Wall-clock time of each stage, printed at the end so CI logs show where time goes.
struct Stages {
    done: Vec<(&'static str, f64)>,
}

impl Stages {
    fn new() -> Self {
        Self { done: Vec::new() }
    }

    fn run<T>(
        &mut self,
        name: &'static str,
        stage: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        eprintln!("xtask: stage {name}");
        let started = Instant::now();
        let result = stage();
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("xtask: stage {name} took {seconds:.1}s");
        self.done.push((name, seconds));
        result.with_context(|| format!("stage {name} failed"))
    }

    fn print(&self) {
        eprintln!("xtask: stage timings:");
        for (name, seconds) in &self.done {
            eprintln!("xtask:   {name:<12} {seconds:>7.1}s");
        }
    }
}

fn setup(root: &Path) -> anyhow::Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

/// Builds the eBPF crate with Debian's rustc: it ships a precompiled `core` for
/// `bpfel-unknown-none`, so neither nightly nor `-Z build-std` is needed.
/// `RUSTC_BOOTSTRAP` is limited to the two crates that use unstable features.
fn build_ebpf(root: &Path) -> anyhow::Result<()> {
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,interceptor_ebpf")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        )
        .env("CARGO_TARGET_DIR", root.join("target/bpf"))
        .env("PATH", cargo_path())
        .args([
            "build",
            "--package",
            "interceptor-ebpf",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ]);
    run(&mut command)
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("cargo")
        .current_dir(root)
        .env("PATH", cargo_path())
        .args(args))
}

/// PATH with `~/.cargo/bin` first, where `bpf-linker` is installed.
fn cargo_path() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{home}/.cargo/bin:{path}")
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
