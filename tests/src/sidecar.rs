//! A sidecar mesh on an [`Island`]: the workload directory, a CA and one
//! `interceptor sidecar` per enrolled pod. It is the classic baseline that benchmarks
//! compare with the daemons of [`Mesh`](crate::mesh::Mesh).
//!
//! Each sidecar runs inside its pod's network namespace but outside the pod's cgroup,
//! because no eBPF program is involved in this mode. It installs its iptables rules in
//! the pod's namespace at start and removes them when it exits. Its log goes to
//! `<work dir>/<pod>.sidecar.log`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::mesh::{interceptor_bin, log_to, open_log, prepare_work_dir, terminate, wait_for_line};
use crate::{spawn_in, Island, Pod};

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
        let (log, already) = open_log(&log_path, "sidecar started")?;
        let mut command = Command::new(interceptor_bin());
        command
            .arg("sidecar")
            .arg("--config")
            .arg(self.work_dir.join("mesh.toml"))
            .args(["--node", &pod.node, "--workload", &pod.name])
            .arg("--ca-dir")
            .arg(self.work_dir.join("ca"))
            .args(sidecar_args);
        log_to(&mut command, log)?;
        let child = spawn_in(&pod.netns_path, None, &mut command)?;
        let process_name = format!("sidecar of {}", pod.name);
        wait_for_line(child, &log_path, "sidecar started", already, &process_name)
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
