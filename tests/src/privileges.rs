//! The guard at the top of every privileged test: can this process build islands?

use std::ffi::CString;
use std::fs;
use std::path::Path;
use std::thread;

use crate::topology::cgroup2_mount;

/// `statfs` magic number of a bpf filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the daemon and the topology script expect the bpf filesystem.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Reports whether privileged test `test` can run here: as root, able to create
/// network namespaces, with a writable cgroup2 mount and a bpf filesystem that is
/// mounted or can be. Otherwise prints why to stderr and returns false.
///
/// # Panics
///
/// When the test cannot run and the environment has `CI=true`, so that a privileged
/// test never passes silently in CI.
pub fn require_privileges(test: &str) -> bool {
    let Err(reason) = check_privileges() else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} cannot run in CI: {reason}");
    }
    eprintln!("{test} did not run: {reason}");
    false
}

fn check_privileges() -> Result<(), String> {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("it needs root (run the privileged tests with sudo)".to_owned());
    }

    // unshare(CLONE_NEWNET) moves only the calling thread, so a short-lived thread
    // proves the capability without changing this process's namespace.
    let unshare_result = thread::spawn(|| {
        // SAFETY: unshare(2) only changes the namespaces of the calling thread, which
        // exits right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
    .join()
    .map_err(|_| "the network namespace check panicked".to_owned())?;
    if let Err(err) = unshare_result {
        return Err(format!("cannot create a network namespace: {err}"));
    }

    let cgroup_root =
        cgroup2_mount().map_err(|err| format!("cannot find the cgroup2 mount: {err}"))?;
    if !is_writable(&cgroup_root) {
        return Err(format!(
            "cgroup2 mount {} is not writable",
            cgroup_root.display()
        ));
    }

    if !is_bpffs(Path::new(BPFFS_MOUNT)) && !bpffs_supported() {
        return Err(format!(
            "{BPFFS_MOUNT} is not a bpf filesystem and the kernel has no bpf filesystem to mount"
        ));
    }
    Ok(())
}

fn is_writable(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs(2) fills `stats`, which is plain data that all-zero bytes
    // initialize, and reads the NUL-terminated `path`; both outlive the call.
    unsafe {
        let mut stats: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &raw mut stats) == 0 && stats.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Reports whether the kernel lists the bpf filesystem type, so it can be mounted.
fn bpffs_supported() -> bool {
    fs::read_to_string("/proc/filesystems").is_ok_and(|list| {
        list.lines()
            .any(|line| line.split_whitespace().last() == Some("bpf"))
    })
}
