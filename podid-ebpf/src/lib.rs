//! Types shared between podid's kernel programs and the userspace loader.
//!
//! Everything here is `#[repr(C)]` plain data without implicit padding, because
//! the same bytes are read by the kernel programs (built for `bpfel-unknown-none`)
//! and by the agent through the BPF map syscalls. The `user` feature adds the
//! `aya::Pod` implementations the loader needs.
//!
//! Byte order conventions, chosen to match what each hook hands us so that the
//! hot path does no conversions:
//! - IPv4 addresses are kept exactly as the kernel stores them: network byte
//!   order, read as a native `u32` (`u32::from_ne_bytes(addr.octets())`).
//! - Ports in [`RedirectConfig`] and [`ConnectRecord`] are network byte order in
//!   the low 16 bits of a `u32`, as `bpf_sock_addr.user_port` holds them.
//! - Ports in [`PeerKey`] are host byte order, which is what userspace gets from
//!   `getpeername`/`getsockname` after `SocketAddr::port()`.
#![no_std]

/// Name of the `cgroup/connect4` program in the object.
pub const PROG_CONNECT4: &str = "podid_connect4";
/// Name of the `cgroup/connect6` program in the object.
pub const PROG_CONNECT6: &str = "podid_connect6";
/// Name of the `sock_ops` program in the object.
pub const PROG_SOCK_OPS: &str = "podid_sock_ops";
/// Name of the `cgroup_skb/egress` program in the object: drops IMDS-bound
/// packets from sockets of the hooked cgroups that are not exempt (raw IP
/// sockets, a DNAT inside a pod's network namespace).
pub const PROG_EGRESS: &str = "podid_egress";
/// Name of the tc egress classifier in the object, attached to the interface
/// that routes IMDS: drops IMDS-bound packets that no exempt socket sent
/// (forwarded from pods, AF_PACKET frames).
pub const PROG_IMDS_GUARD: &str = "podid_imds_guard";

/// Single-entry array holding the [`RedirectConfig`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Hash of exempt cgroup ids (value unused, set to 1).
pub const MAP_EXEMPT_CGROUPS: &str = "EXEMPT_CGROUPS";
/// LRU hash: socket cookie → 1, for sockets in a hooked cgroup that dialled
/// the agent's address themselves (written by connect4/connect6, consumed by
/// sock_ops), so that they get no record.
pub const MAP_DIRECT_SOCKETS: &str = "DIRECT_SOCKETS";
/// LRU hash: [`PeerKey`] → [`ConnectRecord`], written by sock_ops for every
/// connection the redirect sent to the agent.
pub const MAP_PEER_RECORDS: &str = "PEER_RECORDS";
/// Per-CPU array of `u64` counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Hash: network namespace cookie → [`PodListener`], the agent's listener
/// inside that pod's network namespace (zero-policy mode). A namespace
/// without one is redirected to the node listener.
pub const MAP_POD_LISTENERS: &str = "POD_LISTENERS";
/// aya-log's ring buffer.
pub const MAP_AYA_LOGS: &str = "AYA_LOGS";

/// Every map in the object, in a fixed order (used for pinning).
pub const ALL_MAPS: [&str; 7] = [
    MAP_CONFIG,
    MAP_EXEMPT_CGROUPS,
    MAP_DIRECT_SOCKETS,
    MAP_PEER_RECORDS,
    MAP_COUNTERS,
    MAP_POD_LISTENERS,
    MAP_AYA_LOGS,
];

/// Default capacity of the peer record map. A record lives from `connect()`
/// until the agent accepts the connection, so this bounds the number of token
/// requests in flight on a node, not the number of pods.
pub const DEFAULT_RECORD_CAPACITY: u32 = 65_536;
/// Capacity of the direct-dial marks. A mark lives only within one `connect()`
/// call, so this bounds direct dials in progress at once; losing one to
/// eviction records that connection under its caller's own cgroup.
pub const DIRECT_CAPACITY: u32 = 8_192;
/// Capacity of the exempt cgroup set.
pub const EXEMPT_CAPACITY: u32 = 64;
/// Capacity of the pod listener map: pod network namespaces with a listener
/// of their own at once.
pub const POD_LISTENER_CAPACITY: u32 = 4096;

/// Version of the map layouts and program contract. Pins live in a directory
/// named after it, so an agent with an incompatible layout never reuses maps
/// pinned by another version.
pub const ABI_VERSION: u32 = 3;

/// [`ConnectRecord::flags`]: two connections with the same 4-tuple (from
/// different network namespaces, or a stale record and a new connection of
/// another cgroup) were recorded before the agent took either. The record
/// names nobody; the agent refuses the connection.
pub const RECORD_COLLISION: u32 = 1;

/// [`RedirectConfig::guard_mode`]: the enforcement programs pass everything.
pub const GUARD_OFF: u32 = 0;
/// [`RedirectConfig::guard_mode`]: the agent runs. IMDS-bound packets are
/// dropped when no socket sent them (forwarded) or when the sending
/// socket's cgroup is below the attach cgroup and not exempt.
pub const GUARD_RUNNING: u32 = 1;
/// [`RedirectConfig::guard_mode`]: the node is booting and no agent has
/// attached yet. IMDS-bound packets pass only from sockets below
/// [`RedirectConfig::allow_cgroup_id`] (the host's services), or exempt.
pub const GUARD_BOOT: u32 = 2;

/// `AF_INET`, as stored in [`ConnectRecord::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`ConnectRecord::family`].
pub const AF_INET6: u16 = 10;

/// Where to redirect and what to enforce, written by the loader into
/// [`MAP_CONFIG`] index 0.
///
/// A zero `agent_port` means "not configured": the redirect then leaves every
/// connection alone (the loader writes the configuration before attaching).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// IMDS address, network byte order.
    pub imds_addr: u32,
    /// IMDS port, network byte order in the low 16 bits.
    pub imds_port: u32,
    /// Agent address, network byte order.
    pub agent_addr: u32,
    /// Agent port, network byte order in the low 16 bits.
    pub agent_port: u32,
    /// A record older than this (nanoseconds) that the agent has not taken
    /// is stale: a new connection of another cgroup with the same 4-tuple
    /// replaces it instead of making a collision.
    pub record_stale_ns: u64,
    /// cgroup id of the cgroup the programs are attached to.
    pub attach_cgroup_id: u64,
    /// Its depth in the cgroup2 hierarchy (the root is 0).
    pub attach_cgroup_level: u32,
    /// [`GUARD_OFF`], [`GUARD_RUNNING`] or [`GUARD_BOOT`].
    pub guard_mode: u32,
    /// [`GUARD_BOOT`]: the cgroup whose sockets still reach IMDS.
    pub allow_cgroup_id: u64,
    /// Its depth in the cgroup2 hierarchy.
    pub allow_cgroup_level: u32,
    /// Length of the link-layer header on the guarded interfaces (14 for
    /// Ethernet, 0 for interfaces without one), where the IPv4 header starts
    /// in what the tc guard sees.
    pub guard_l2_len: u32,
    /// CLOCK_MONOTONIC nanoseconds when the running agent started, before
    /// it bound its listener (0 without an agent). A record older than
    /// that belongs to a connection that was refused: a new connection
    /// with the same 4-tuple replaces it.
    pub agent_started_ns: u64,
    /// Zero-policy mode: the loopback range pod listeners are bound in,
    /// network byte order (0 when the mode is off).
    pub pod_listener_net: u32,
    /// Its mask, network byte order.
    pub pod_listener_mask: u32,
    /// The port pod listeners use, network byte order in the low 16 bits.
    pub pod_listener_port: u32,
    /// Unused; keeps the size a multiple of 8.
    pub reserved: u32,
}

/// A pod's own listener ([`MAP_POD_LISTENERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodListener {
    /// Its address (loopback, unique per pod), network byte order.
    pub addr: u32,
    /// Its port, network byte order in the low 16 bits.
    pub port: u32,
}

/// What the kernel knows about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRecord {
    /// `bpf_get_current_cgroup_id()` of the task that called `connect()`
    /// (read in sock_ops' `TCP_CONNECT_CB`, which runs inside that call): the
    /// inode number of its cgroup v2 directory. 0 in a collision record.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the record was written.
    pub created_ns: u64,
    /// Thread group id (process id) of the caller.
    pub tgid: u32,
    /// Original destination address, network byte order: the configured IMDS
    /// address, the only destination the redirect rewrites.
    pub orig_addr: u32,
    /// Original destination port, network byte order in the low 16 bits.
    pub orig_port: u32,
    /// Address family of the caller's socket: [`AF_INET`], or [`AF_INET6`]
    /// for a v4-mapped destination.
    pub family: u32,
    /// [`RECORD_COLLISION`], or 0.
    pub flags: u32,
    /// Unused; keeps the size a multiple of 8.
    pub reserved: u32,
}

/// Key of [`MAP_PEER_RECORDS`]: the connection as the agent sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Client (peer) address, network byte order.
    pub client_addr: u32,
    /// Agent (local) address, network byte order.
    pub agent_addr: u32,
    /// Client port, host byte order.
    pub client_port: u16,
    /// Agent port, host byte order.
    pub agent_port: u16,
}

/// Indexes into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/connect6 rewrote an IMDS connection to the agent.
    Redirected = 0,
    /// connect4/connect6 left an IMDS connection alone because the caller's
    /// cgroup is exempt.
    Exempt = 1,
    /// sock_ops stored a peer record for a redirected connection.
    Recorded = 2,
    /// sock_ops saw a connection to the agent that the redirect did not make
    /// (the caller dialled the agent's address itself): no record.
    RecordMissing = 3,
    /// A map update failed (the connection is still redirected, and then
    /// refused by the agent for lack of a record).
    RecordFailed = 4,
    /// sock_ops found a fresh record of another cgroup under the same
    /// 4-tuple and wrote a collision record instead.
    RecordCollision = 5,
    /// `podid_egress` dropped an IMDS-bound packet of a hooked socket.
    EgressDropped = 6,
    /// `podid_imds_guard` dropped an IMDS-bound packet on the interface
    /// towards IMDS.
    GuardDropped = 7,
}

impl Counter {
    /// Number of counters, the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 8;
    /// All counters, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::Exempt,
        Counter::Recorded,
        Counter::RecordMissing,
        Counter::RecordFailed,
        Counter::RecordCollision,
        Counter::EgressDropped,
        Counter::GuardDropped,
    ];

    /// Stable snake_case name, used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Exempt => "exempt",
            Counter::Recorded => "recorded",
            Counter::RecordMissing => "record_missing",
            Counter::RecordFailed => "record_failed",
            Counter::RecordCollision => "record_collision",
            Counter::EgressDropped => "egress_dropped",
            Counter::GuardDropped => "guard_dropped",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are #[repr(C)] structs of integers with no padding
    // (checked by the size assertions below), so every bit pattern is valid.
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::ConnectRecord {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PodListener {}
}

// No implicit padding anywhere: the kernel and userspace must agree on every byte.
const _: () = assert!(core::mem::size_of::<RedirectConfig>() == 80);
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 40);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 12);
const _: () = assert!(core::mem::size_of::<PodListener>() == 8);
