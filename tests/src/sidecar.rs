//! A sidecar mesh on an [`Island`]: the workload directory, a CA and one
//! `interceptor sidecar` per enrolled pod. It is the classic baseline that benchmarks
//! compare with the daemons of [`Mesh`](crate::mesh::Mesh).
//!
//! Each sidecar runs inside its pod's network namespace but outside the pod's cgroup,
//! because no eBPF program is involved in this mode. It installs its iptables rules in
//! the pod's namespace at start and removes them when it exits. Its log goes to
//! `<work dir>/<pod>.sidecar.log`.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::mesh::{interceptor_bin, prepare_work_dir, tail, terminate};
use crate::{spawn_in, Island, Pod};

/// How long a sidecar may take from start to its "sidecar started" line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of a log that a start failure quotes.
const LOG_TAIL_LINES: usize = 40;

/// A sidecar process and the pod it serves.
#[derive(Debug)]
struct Sidecar {
    pod: Pod,
    /// `None` once stopped.
    child: Option<Child>,
}

/// The sidecars of an island's enrolled pods. Dropping it stops them with SIGTERM, so
/// each removes its iptables rules.
#[derive(Debug)]
pub struct SidecarMesh {
    work_dir: PathBuf,
    sidecars: Vec<Sidecar>,
}

impl SidecarMesh {
    /// Writes the directory enrolling `enrolled`, creates a CA in `work_dir` and starts
    /// one sidecar per enrolled pod with `sidecar_args` added to `interceptor sidecar`.
    /// Returns once every sidecar has logged that it started.
    pub fn start(
        island: &Island,
        work_dir: &Path,
        enrolled: &[&Pod],
        sidecar_args: &[&str],
    ) -> io::Result<SidecarMesh> {
        prepare_work_dir(
            island,
            work_dir,
            enrolled,
            &crate::DirectoryExtras::default(),
        )?;
        let mut mesh = SidecarMesh {
            work_dir: work_dir.to_owned(),
            sidecars: Vec::with_capacity(enrolled.len()),
        };
        // On an early return, dropping `mesh` stops the sidecars started so far.
        for pod in enrolled {
            let child = mesh.spawn_sidecar(pod, sidecar_args)?;
            mesh.sidecars.push(Sidecar {
                pod: (*pod).clone(),
                child: Some(child),
            });
        }
        Ok(mesh)
    }

    /// Starts the sidecar of `pod`, appending to its log, and waits for its "sidecar
    /// started" line.
    fn spawn_sidecar(&self, pod: &Pod, sidecar_args: &[&str]) -> io::Result<Child> {
        let log_path = self.log_path(pod);
        let log = File::options().create(true).append(true).open(&log_path)?;
        let already = std::fs::read_to_string(&log_path)?
            .matches("sidecar started")
            .count();
        let mut command = Command::new(interceptor_bin());
        command
            .arg("sidecar")
            .arg("--config")
            .arg(self.work_dir.join("mesh.toml"))
            .args(["--node", &pod.node, "--workload", &pod.name])
            .arg("--ca-dir")
            .arg(self.work_dir.join("ca"))
            .args(sidecar_args)
            .env(
                "INTERCEPTOR_LOG",
                std::env::var("INTERCEPTOR_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn_in(&pod.netns_path, None, &mut command)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log_path)?;
            if text.matches("sidecar started").count() > already {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "sidecar of {} exited with {status} before it started; log:\n{}",
                    pod.name,
                    tail(&text, LOG_TAIL_LINES)
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other(format!(
                    "sidecar of {} did not start within {START_TIMEOUT:?}; log:\n{}",
                    pod.name,
                    tail(&text, LOG_TAIL_LINES)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Path of the log of `pod`'s sidecar.
    pub fn log_path(&self, pod: &Pod) -> PathBuf {
        self.work_dir.join(format!("{}.sidecar.log", pod.name))
    }

    /// Returns the log of `pod`'s sidecar so far.
    pub fn log(&self, pod: &Pod) -> String {
        std::fs::read_to_string(self.log_path(pod)).unwrap_or_default()
    }

    /// Returns the process ids of the running sidecars, for memory and CPU measurements.
    pub fn pids(&self) -> Vec<u32> {
        self.sidecars
            .iter()
            .filter_map(|sidecar| sidecar.child.as_ref())
            .map(Child::id)
            .collect()
    }

    /// Stops `pod`'s sidecar with SIGTERM and waits for it to exit; it removes its
    /// iptables rules first. Does nothing when `pod` has no running sidecar.
    pub fn stop(&mut self, pod: &Pod) -> io::Result<()> {
        let running = self
            .sidecars
            .iter_mut()
            .filter(|sidecar| sidecar.pod.name == pod.name)
            .filter_map(|sidecar| sidecar.child.take());
        for mut child in running {
            terminate(&mut child)?;
        }
        Ok(())
    }
}

impl Drop for SidecarMesh {
    fn drop(&mut self) {
        for sidecar in &mut self.sidecars {
            if let Some(mut child) = sidecar.child.take() {
                if let Err(err) = terminate(&mut child) {
                    eprintln!("stopping the sidecar of {} failed: {err}", sidecar.pod.name);
                }
            }
        }
    }
}

/// Returns the nat table of `pod`'s network namespace as `iptables -t nat -S` lists it.
/// The command is `iptables`, or the one `INTERCEPTOR_IPTABLES` names, as for the
/// sidecars.
pub fn nat_rules(pod: &Pod) -> io::Result<String> {
    let program = std::env::var_os("INTERCEPTOR_IPTABLES").unwrap_or_else(|| "iptables".into());
    let mut command = Command::new(&program);
    command
        .args(["-w", "-t", "nat", "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = spawn_in(&pod.netns_path, None, &mut command)?.wait_with_output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{} -t nat -S in {} failed with {}: {}",
            program.to_string_lossy(),
            pod.name,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
