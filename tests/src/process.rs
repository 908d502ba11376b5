//! Starting programs inside an island's network namespaces and cgroups.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

/// Spawns `cmd` inside the network namespace bound at `netns` and, when `cgroup` is
/// given, as a member of that cgroup (an absolute cgroup2 directory).
///
/// Unlike `ip netns exec`, this enters only the network namespace and keeps the mount
/// namespace, so the child still sees the cgroup2 and bpffs mounts. The child moves
/// itself into the cgroup before `exec`, so nothing it runs escapes the cgroup.
/// Needs `CAP_SYS_ADMIN`.
///
/// The hook stays on `cmd` and refers to descriptors closed on return, so spawn a given
/// `Command` through this function once and never again directly.
pub fn spawn_in(netns: &Path, cgroup: Option<&Path>, cmd: &mut Command) -> io::Result<Child> {
    // Everything the child uses is opened here, before fork: between fork and exec only
    // async-signal-safe calls are allowed, so the hook must not allocate or open paths.
    let netns_file = File::open(netns)
        .map_err(|err| with_path(err, "failed to open network namespace", netns))?;
    let cgroup_procs = match cgroup {
        Some(dir) => {
            let procs = dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|err| with_path(err, "failed to open", &procs))?;
            Some(file)
        }
        None => None,
    };
    let netns_fd = netns_file.as_raw_fd();
    let cgroup_procs_fd = cgroup_procs.as_ref().map(AsRawFd::as_raw_fd);

    // SAFETY: the hook runs in the forked child before exec and makes only the
    // async-signal-safe system calls setns(2) and write(2) on descriptors that the
    // parent keeps open (in `netns_file` and `cgroup_procs`) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = cgroup_procs_fd {
                // "0" in cgroup.procs moves the writing process.
                let pid = b"0";
                if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let child = cmd.spawn().map_err(|err| {
        io::Error::new(
            err.kind(),
            format!(
                "failed to spawn {} in {}: {err}",
                cmd.get_program().to_string_lossy(),
                netns.display()
            ),
        )
    });
    // The hook's descriptors are needed until fork has happened inside spawn.
    drop(netns_file);
    drop(cgroup_procs);
    child
}

fn with_path(err: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{action} {}: {err}", path.display()))
}
