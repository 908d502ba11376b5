//! The maps shared by the programs of this object. All are pinned by name under the
//! node's bpffs directory, so they outlive the daemon and a restarted daemon reuses them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use interceptor_common::{
    ConnKey, DeliveryKey, EnrolledCgroup, Exclusions, InboundPod, ListenerKey, OrigDst,
    INBOUND_REJECTS_BYTES, MAX_ENROLLED, MAX_PENDING_CONNECTS,
};

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

/// Outbound exclusions by enrolled cgroup id: connects that `connect4`/`connect6` leave
/// alone. Written only by the daemon.
#[map(name = "OUTBOUND_EXCLUDE")]
pub static OUTBOUND_EXCLUDE: HashMap<u64, Exclusions> = HashMap::pinned(MAX_ENROLLED, 0);

/// Inbound settings by enrolled pod address (network byte order). Written only by the
/// daemon; an entry stays while the daemon is down, so the pod fails closed.
#[map(name = "INBOUND")]
pub static INBOUND: HashMap<u32, InboundPod> = HashMap::pinned(MAX_ENROLLED, 0);

/// The daemon's listening sockets in each pod. The kernel removes a socket from the
/// map when it is closed, so the entries vanish with the daemon.
#[map(name = "LISTENERS")]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(2 * MAX_ENROLLED, 0);

/// The daemon's delivery connections between `bind` and the end of `connect`, whose
/// SYN `sk_lookup` passes to the app. An LRU map, so an entry a crashed daemon left
/// behind is eventually evicted.
#[map(name = "DELIVERY")]
pub static DELIVERY: LruHashMap<DeliveryKey, u32> = LruHashMap::pinned(MAX_PENDING_CONNECTS, 0);

/// Inbound connections the `sk_lookup` program reset, as `InboundReject` records for the
/// daemon to log and count. Pinned like the others, so the records of rejections while
/// no daemon runs wait here for the next one.
#[map(name = "INBOUND_REJECTS")]
pub static INBOUND_REJECTS: RingBuf = RingBuf::pinned(INBOUND_REJECTS_BYTES, 0);

/// Number of `InboundReject` records lost because [`INBOUND_REJECTS`] was full, in
/// slot 0 of each CPU's copy; the daemon adds the copies up.
#[map(name = "INBOUND_REJECTS_LOST")]
pub static INBOUND_REJECTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
