//! The maps shared by the programs of this object. All are pinned by name under the
//! node's bpffs directory, so they outlive the daemon and a restarted daemon reuses them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use interceptor_common::{ConnKey, EnrolledCgroup, OrigDst, MAX_ENROLLED, MAX_PENDING_CONNECTS};

/// Enrolled workloads: cgroup v2 id to the workload's namespace and outbound listener.
/// Written only by the daemon.
#[map(name = "ENROLLED")]
pub static ENROLLED: HashMap<u64, EnrolledCgroup> = HashMap::pinned(MAX_ENROLLED, 0);

/// Original destinations by socket cookie, from connect until the connection is
/// established.
#[map(name = "CONNECT_DST")]
pub static CONNECT_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTS, 0);

/// Original destinations by the workload's end of an established redirected connection,
/// until the daemon accepts it and deletes the entry.
#[map(name = "ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTS, 0);
