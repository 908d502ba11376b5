//! Loading, attaching and pinning the eBPF programs of one node, and the daemon's view
//! of their maps.
//!
//! Everything that must keep the node fail-closed while the daemon is down lives in the
//! bpffs under `<bpffs>/interceptor/<node>/`: the maps (pinned by name), one link per
//! cgroup program, named `<program>@<cgroup id>`, and one `sk_lookup` link per enrolled
//! pod's network namespace, named `<program>@netns-<netns cookie>`. With the links in
//! place, an enrolled pod's connects keep going to its outbound listener, which is gone
//! with the daemon, so they fail instead of leaving in plaintext. Inbound connections
//! find no listener in the `LISTENERS` map (the kernel removes closed sockets from it)
//! and are reset. A restarted daemon reuses the pinned maps and
//! swaps its freshly loaded programs into the pinned links (`BPF_LINK_UPDATE`), so a
//! second copy is never stacked. `interceptor uninstall` removes the directory.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use interceptor_common::{
    ConnKey, DeliveryKey, EnrolledCgroup, Exclusions, InboundPod, ListenerKey, OrigDst,
    CONNECT4_PROG, CONNECT6_PROG, DELIVERY_MAP, ENROLLED_MAP, INBOUND_MAP,
    INBOUND_REJECTS_LOST_MAP, INBOUND_REJECTS_MAP, LISTENERS_MAP, ORIG_DST_MAP,
    OUTBOUND_EXCLUDE_MAP, SK_LOOKUP_PROG, SOCK_OPS_PROG,
};
use tracing::{info, warn};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at compile time; empty
/// when the daemon was built before the object existed.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/interceptor.bpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Errors of setting up the node's eBPF state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup2 mount found in /proc/self/mountinfo: interceptor needs cgroup v2 (cgroup v1-only hosts are not supported)")]
    NoCgroup2,
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} not found: create the node's cgroup and its pods' cgroups (named in the workload directory) before starting the daemon")]
    MissingCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs at {path} failed")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating pin directory {path} failed")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "this daemon was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild"
    )]
    NoObject,
    #[error("loading the eBPF object failed (missing BPF permission, CAP_BPF/CAP_SYS_ADMIN, or a kernel without BTF?)")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error(
        "loading program {name} failed: the kernel may lack this program type or a helper it uses"
    )]
    LoadProgram {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching program {name} to cgroup {cgroup} failed")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching program {name} to network namespace {netns} failed")]
    AttachNetns {
        name: &'static str,
        netns: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("opening network namespace {path} failed")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning link {path} failed")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("replacing the program of pinned link {path} failed")]
    UpdateLink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {name} operation failed")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("removing {path} failed")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Returns the mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    // Fields: id parent major:minor root mount-point options... - fstype source options
    text.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .ok_or(Error::NoCgroup2)
}

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(|source| Error::MountBpffs {
        path: path.to_owned(),
        source,
    })?;
    let target = c_path(path);
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(Error::MountBpffs {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let target = c_path(path);
    // SAFETY: `statfs` is plain data, and `target` is a valid NUL-terminated string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `stat` is valid for writes.
    let rc = unsafe { libc::statfs(target.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn c_path(path: &Path) -> CString {
    // Paths come from the config or fixed strings; an interior NUL cannot name a file,
    // so it maps to a path that fails to resolve.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Returns the pin directory of node `node` under the bpffs at `bpffs`.
pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    bpffs.join("interceptor").join(node)
}

/// Returns the cgroup v2 id of the cgroup directory at `path` (its inode number), as
/// `bpf_get_current_cgroup_id` returns it.
pub fn cgroup_id(path: &Path) -> Result<u64, Error> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::MissingCgroup {
            path: path.to_owned(),
            source,
        })
}

/// An enrolled pod's network namespace, for the `sk_lookup` program.
#[derive(Debug, Clone)]
pub struct PodNetns {
    /// A file that refers to the namespace.
    pub path: PathBuf,
    /// The namespace's cookie, which names its link pin.
    pub cookie: u64,
}

/// The maps through which the `sk_lookup` program reports the connections it rejects.
pub struct RejectionMaps {
    /// `InboundReject` records, oldest first.
    pub records: RingBuf<MapData>,
    /// Records lost because `records` was full, per CPU in slot 0.
    pub lost: PerCpuArray<MapData, u64>,
}

/// The node's loaded programs and the maps the daemon uses while it runs.
pub struct NodePrograms {
    _ebpf: Ebpf,
    enrolled: Mutex<HashMap<MapData, u64, EnrolledCgroup>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    outbound_exclude: Mutex<HashMap<MapData, u64, Exclusions>>,
    inbound: Mutex<HashMap<MapData, u32, InboundPod>>,
    listeners: Mutex<SockHash<MapData, ListenerKey>>,
    delivery: Mutex<HashMap<MapData, DeliveryKey, u32>>,
    /// Taken once by the task that reads them ([`NodePrograms::take_rejection_maps`]).
    rejections: Mutex<Option<RejectionMaps>>,
}

impl std::fmt::Debug for NodePrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePrograms").finish_non_exhaustive()
    }
}

impl NodePrograms {
    /// Loads the programs, attaches the cgroup programs to the node cgroup `cgroup` and
    /// `sk_lookup` to each of `pods` (or takes over the links a previous daemon pinned
    /// there) and opens the pinned maps.
    pub fn install(
        bpffs: &Path,
        node: &str,
        cgroup: &Path,
        pods: &[PodNetns],
    ) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        ensure_bpffs(bpffs)?;
        let dir = pin_dir(bpffs, node);
        std::fs::create_dir_all(&dir).map_err(|source| Error::PinDir {
            path: dir.clone(),
            source,
        })?;
        let cgroup_file = File::open(cgroup).map_err(|source| Error::MissingCgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let cgroup_id = cgroup_id(cgroup)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(OBJECT)
            .map_err(Error::Load)?;

        for name in [CONNECT4_PROG, CONNECT6_PROG, SOCK_OPS_PROG] {
            let program = ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram { name })?;
            let link_path = dir.join(format!("{name}@{cgroup_id}"));
            remove_stale_links(&dir, name, &link_path)?;
            let load = |e| Error::LoadProgram { name, source: e };
            let attach = |e| Error::Attach {
                name,
                cgroup: cgroup.to_owned(),
                source: e,
            };
            // Both program types have the same load and attach calls but no common
            // trait for them in aya, so the steps are spelled out once in a macro.
            macro_rules! load_and_attach {
                ($program_type:ty) => {{
                    let program: &mut $program_type = program.try_into().map_err(load)?;
                    program.load().map_err(load)?;
                    let prog_fd = program.fd().map_err(load)?.as_fd();
                    if !take_over_link(&link_path, prog_fd)? {
                        // With bpf_link (Linux 5.7) the kernel always lets several
                        // programs share a cgroup hook and rejects any attach flag, so
                        // "single" here means no flags, not exclusive.
                        let id = program
                            .attach(&cgroup_file, CgroupAttachMode::Single)
                            .map_err(attach)?;
                        let link: FdLink = program
                            .take_link(id)
                            .map_err(attach)?
                            .try_into()
                            .map_err(|e| Error::Pin {
                                path: link_path.clone(),
                                source: io::Error::other(e),
                            })?;
                        pin_link(link, &link_path)?;
                    }
                }};
            }
            if name == SOCK_OPS_PROG {
                load_and_attach!(SockOps);
            } else {
                load_and_attach!(CgroupSockAddr);
            }
        }

        attach_sk_lookup(&mut ebpf, &dir, pods)?;

        let enrolled = take_hash_map(&mut ebpf, ENROLLED_MAP)?;
        let orig_dst = take_hash_map(&mut ebpf, ORIG_DST_MAP)?;
        let outbound_exclude = take_hash_map(&mut ebpf, OUTBOUND_EXCLUDE_MAP)?;
        let inbound = take_hash_map(&mut ebpf, INBOUND_MAP)?;
        let listeners = ebpf.take_map(LISTENERS_MAP).ok_or(Error::MissingMap {
            name: LISTENERS_MAP,
        })?;
        let listeners = SockHash::try_from(listeners).map_err(|source| Error::Map {
            name: LISTENERS_MAP,
            source,
        })?;
        let delivery = take_hash_map(&mut ebpf, DELIVERY_MAP)?;
        let rejections = take_rejection_maps(&mut ebpf)?;
        Ok(Self {
            _ebpf: ebpf,
            enrolled: Mutex::new(enrolled),
            orig_dst: Mutex::new(orig_dst),
            outbound_exclude: Mutex::new(outbound_exclude),
            inbound: Mutex::new(inbound),
            listeners: Mutex::new(listeners),
            delivery: Mutex::new(delivery),
            rejections: Mutex::new(Some(rejections)),
        })
    }

    /// Takes the maps of the `sk_lookup` program's rejection reports, for the one task
    /// that reads them; `None` once taken.
    pub fn take_rejection_maps(&self) -> Option<RejectionMaps> {
        lock(&self.rejections).take()
    }

    /// Makes the outbound exclusion map hold exactly `entries`, keyed by cgroup id.
    pub fn set_outbound_exclusions(&self, entries: &[(u64, Exclusions)]) -> Result<(), Error> {
        replace_entries(&self.outbound_exclude, OUTBOUND_EXCLUDE_MAP, entries)
    }

    /// Makes the inbound map hold exactly `entries`, keyed by pod address (network byte
    /// order).
    pub fn set_inbound(&self, entries: &[(u32, InboundPod)]) -> Result<(), Error> {
        replace_entries(&self.inbound, INBOUND_MAP, entries)
    }

    /// Puts the listening socket `listener` into the listeners map under `key`, where
    /// the `sk_lookup` program finds it. The kernel removes it when it is closed.
    pub fn add_listener(&self, key: ListenerKey, listener: &impl AsRawFd) -> Result<(), Error> {
        lock(&self.listeners)
            .insert(key, listener.as_raw_fd(), 0)
            .map_err(|source| Error::Map {
                name: LISTENERS_MAP,
                source,
            })
    }

    /// Makes the enrolled map hold exactly `entries`, keyed by cgroup id. Entries of
    /// workloads no longer on this node are removed; the others are written in place,
    /// so a workload that stays enrolled is never unenrolled in between.
    pub fn set_enrolled(&self, entries: &[(u64, EnrolledCgroup)]) -> Result<(), Error> {
        replace_entries(&self.enrolled, ENROLLED_MAP, entries)
    }

    /// Registers a delivery connection, so `sk_lookup` passes its SYN to the app.
    pub fn add_delivery(&self, key: &DeliveryKey) -> Result<(), Error> {
        lock(&self.delivery)
            .insert(key, 1, 0)
            .map_err(|source| Error::Map {
                name: DELIVERY_MAP,
                source,
            })
    }

    /// Removes a delivery connection's entry once its connect has ended.
    pub fn remove_delivery(&self, key: &DeliveryKey) {
        if let Err(error) = lock(&self.delivery).remove(key) {
            warn!(%error, "removing a delivery entry failed; the LRU map evicts it later");
        }
    }

    /// Removes and returns the original destination recorded for the redirected
    /// connection `key`, or `None` when there is none.
    pub fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut map = lock(&self.orig_dst);
        let dst = map.get(key, 0).ok()?;
        if let Err(error) = map.remove(key) {
            warn!(%error, "removing an original destination entry failed; the LRU map evicts it later");
        }
        Some(dst)
    }
}

/// Makes a pinned hash map hold exactly `entries`: the others are removed, and the
/// entries are written in place, so a key that stays is never missing in between.
fn replace_entries<K: aya::Pod + PartialEq, V: aya::Pod>(
    map: &Mutex<HashMap<MapData, K, V>>,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), Error> {
    let map_error = |source| Error::Map { name, source };
    let mut map = lock(map);
    for (key, value) in entries {
        map.insert(key, value, 0).map_err(map_error)?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !entries.iter().any(|(k, _)| k == key))
        .collect();
    for key in stale {
        map.remove(&key).map_err(map_error)?;
    }
    Ok(())
}

/// Loads `sk_lookup` and links it to each pod's network namespace, taking over links
/// pinned for the same namespace. Links pinned for namespaces no longer in `pods` are
/// unpinned, which detaches them.
fn attach_sk_lookup(ebpf: &mut Ebpf, dir: &Path, pods: &[PodNetns]) -> Result<(), Error> {
    let name = SK_LOOKUP_PROG;
    let load = |e| Error::LoadProgram { name, source: e };
    let program: &mut SkLookup = ebpf
        .program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(load)?;
    program.load().map_err(load)?;
    let current: Vec<PathBuf> = pods
        .iter()
        .map(|pod| dir.join(format!("{name}@netns-{}", pod.cookie)))
        .collect();
    remove_stale_pins(dir, &format!("{name}@"), &current)?;
    for (pod, link_path) in pods.iter().zip(&current) {
        let prog_fd = program.fd().map_err(load)?.as_fd();
        if take_over_link(link_path, prog_fd)? {
            continue;
        }
        let netns = File::open(&pod.path).map_err(|source| Error::OpenNetns {
            path: pod.path.clone(),
            source,
        })?;
        let attach = |source| Error::AttachNetns {
            name,
            netns: pod.path.clone(),
            source,
        };
        let id = program.attach(&netns).map_err(attach)?;
        let link: FdLink = program.take_link(id).map_err(attach)?.into();
        pin_link(link, link_path)?;
    }
    Ok(())
}

/// Unpins every pin of `dir` whose name starts with `prefix` and that is not in `keep`.
fn remove_stale_pins(dir: &Path, prefix: &str, keep: &[PathBuf]) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Read {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let stale =
            entry.file_name().to_string_lossy().starts_with(prefix) && !keep.contains(&path);
        if stale {
            std::fs::remove_file(&path).map_err(|source| Error::Remove {
                path: path.clone(),
                source,
            })?;
            info!(path = %path.display(), "removed link pinned for a namespace that is no longer enrolled");
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no Rust state that a panic could leave half-written.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn take_hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    HashMap::try_from(map).map_err(|source| Error::Map { name, source })
}

fn take_rejection_maps(ebpf: &mut Ebpf) -> Result<RejectionMaps, Error> {
    let records = ebpf
        .take_map(INBOUND_REJECTS_MAP)
        .ok_or(Error::MissingMap {
            name: INBOUND_REJECTS_MAP,
        })?;
    let records = RingBuf::try_from(records).map_err(|source| Error::Map {
        name: INBOUND_REJECTS_MAP,
        source,
    })?;
    let lost = ebpf
        .take_map(INBOUND_REJECTS_LOST_MAP)
        .ok_or(Error::MissingMap {
            name: INBOUND_REJECTS_LOST_MAP,
        })?;
    let lost = PerCpuArray::try_from(lost).map_err(|source| Error::Map {
        name: INBOUND_REJECTS_LOST_MAP,
        source,
    })?;
    Ok(RejectionMaps { records, lost })
}

/// Unpins links of `program` pinned for another cgroup id: that cgroup was removed and
/// recreated, so the old link is attached to nothing.
fn remove_stale_links(dir: &Path, program: &str, current: &Path) -> Result<(), Error> {
    let prefix = format!("{program}@");
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Read {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry.file_name().to_string_lossy().starts_with(&prefix) && path != current;
        if stale {
            std::fs::remove_file(&path).map_err(|source| Error::Remove {
                path: path.clone(),
                source,
            })?;
            info!(path = %path.display(), "removed link pinned for a cgroup that no longer exists");
        }
    }
    Ok(())
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), Error> {
    link.pin(path).map_err(|e| Error::Pin {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    info!(path = %path.display(), "attached and pinned program");
    Ok(())
}

/// Swaps `prog_fd` into the link pinned at `path`, if there is one. Returns whether a
/// pinned link was taken over.
fn take_over_link(path: &Path, prog_fd: BorrowedFd<'_>) -> Result<bool, Error> {
    if !path.exists() {
        return Ok(false);
    }
    let update_error = |source| Error::UpdateLink {
        path: path.to_owned(),
        source,
    };
    let link = obj_get(path).map_err(update_error)?;
    link_update(link.as_fd(), prog_fd).map_err(update_error)?;
    info!(path = %path.display(), "took over pinned link");
    Ok(true)
}

/// `BPF_OBJ_GET`: opens the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = c_path(path);
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for this command and outlives the call;
    // `c_path` outlives it too.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: atomically replaces the program of link `link` (Linux 5.7).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for this command and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes every pin of node `node`: the links (detaching the programs) and the maps.
/// Returns whether there was anything to remove.
pub fn uninstall(bpffs: &Path, node: &str) -> Result<bool, Error> {
    let dir = pin_dir(bpffs, node);
    if !dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&dir).map_err(|source| Error::Remove {
        path: dir.clone(),
        source,
    })?;
    // The shared parent goes too once the last node is gone; another node's pins keep it.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(true)
}
