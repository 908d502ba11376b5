//! Readings of the machine and its processes from `/proc`, and the open-file limit.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

/// Busy and total CPU time of the whole machine, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq + steal, in clock ticks. Guest time is
    /// already inside user and nice.
    pub busy: u64,
    /// busy + idle + iowait, in clock ticks.
    pub total: u64,
}

impl CpuTicks {
    pub fn read() -> io::Result<CpuTicks> {
        let stat = fs::read_to_string("/proc/stat")?;
        parse_proc_stat(&stat).ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))
    }
}

/// Parses the aggregate `cpu` line of `/proc/stat` (proc(5)).
fn parse_proc_stat(stat: &str) -> Option<CpuTicks> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let field = |index: usize| fields.get(index).copied().unwrap_or(0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    let total = busy + field(3) + field(4);
    Some(CpuTicks { busy, total })
}

/// Clock ticks per second of the times in `/proc/stat` and `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) takes a constant name and only returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Returns the user plus system time of process `pid` and all its threads, in clock
/// ticks.
pub fn process_cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_pid_stat_cpu(&stat)
        .ok_or_else(|| io::Error::other(format!("unexpected /proc/{pid}/stat: {stat:?}")))
}

/// Parses utime and stime, fields 14 and 15 of `/proc/<pid>/stat` (proc(5)). The
/// command name in field 2 may contain spaces and parentheses, so fields are counted
/// from its closing parenthesis.
fn parse_pid_stat_cpu(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command name come state (field 3), ... utime (14) and stime (15).
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Returns the resident set size (`VmRSS`) of process `pid` in KiB.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss_kib(&status)
        .ok_or_else(|| io::Error::other(format!("no VmRSS line in /proc/{pid}/status")))
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns the number of open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> io::Result<u64> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The open-file limit (`RLIMIT_NOFILE`) of this process, which every program the
/// bench starts inherits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NofileLimit {
    /// Soft limit before [`raise_nofile_limit`].
    pub soft_before: u64,
    /// Soft limit after it.
    pub soft: u64,
    /// Hard limit, which only a process with `CAP_SYS_RESOURCE` may raise; the bench
    /// leaves it as it is.
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard limit.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the plain-data struct that `limit` points to.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let soft_before = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit(2) reads the plain-data struct that `limit` points to.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NofileLimit {
        soft_before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Returns the reason the kernel cannot carry kTLS, or `None` when it can: the `tls` ULP is
/// registered, or its module is installed for the running kernel and loads on first
/// use.
pub fn kernel_tls_missing() -> Option<String> {
    let ulps = fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    if ulps.split_whitespace().any(|ulp| ulp == "tls") {
        return None;
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let modules_dep = Path::new("/lib/modules")
        .join(release.trim())
        .join("modules.dep");
    let module_installed = fs::read_to_string(modules_dep)
        .is_ok_and(|deps| deps.lines().any(|line| line.contains("/tls.ko")));
    if module_installed {
        return None;
    }
    Some(format!(
        "kernel has no TLS ULP (tcp_available_ulp lists {:?} and no tls module is installed)",
        ulps.trim()
    ))
}

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_mib: u64,
    pub kernel: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or_else(
                || "unknown".to_owned(),
                |(_, model)| model.trim().to_owned(),
            );
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0);
        Machine {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib: memory_kib / 1024,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
                |_| "unknown".to_owned(),
                |release| release.trim().to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_and_total() {
        let stat = "cpu  100 5 50 1000 20 3 7 2 40 0\ncpu0 50 2 25 500 10 1 3 1 20 0\n";

        let ticks = parse_proc_stat(stat).expect("parse /proc/stat");

        assert_eq!(ticks.busy, 100 + 5 + 50 + 3 + 7 + 2);
        assert_eq!(ticks.total, ticks.busy + 1000 + 20);
    }

    #[test]
    fn pid_stat_comm_with_spaces() {
        let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    17 4 0 0 20 0 3 0 12345 1000000 300 18446744073709551615";

        assert_eq!(parse_pid_stat_cpu(stat), Some(21));
    }

    #[test]
    fn vm_rss_parsed() {
        let status = "Name:\tinterceptor\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";

        assert_eq!(parse_vm_rss_kib(status), Some(12345));
    }

    #[test]
    fn vm_rss_missing() {
        assert_eq!(parse_vm_rss_kib("Name:\tzombie\n"), None);
    }
}
