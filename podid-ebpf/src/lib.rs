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
/// aya-log's ring buffer.
pub const MAP_AYA_LOGS: &str = "AYA_LOGS";

/// Every map in the object, in a fixed order (used for pinning).
pub const ALL_MAPS: [&str; 6] = [
    MAP_CONFIG,
    MAP_EXEMPT_CGROUPS,
    MAP_DIRECT_SOCKETS,
    MAP_PEER_RECORDS,
    MAP_COUNTERS,
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

/// Version of the map layouts and program contract. Pins live in a directory
/// named after it, so an agent with an incompatible layout never reuses maps
/// pinned by another version.
pub const ABI_VERSION: u32 = 2;

/// `AF_INET`, as stored in [`ConnectRecord::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`ConnectRecord::family`].
pub const AF_INET6: u16 = 10;

/// Where to redirect, written by the loader into [`MAP_CONFIG`] index 0.
///
/// A zero `agent_port` means "not configured": the programs then leave every
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
}

/// What the kernel knows about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectRecord {
    /// `bpf_get_current_cgroup_id()` of the task that called `connect()`
    /// (read in sock_ops' `TCP_CONNECT_CB`, which runs inside that call): the
    /// inode number of its cgroup v2 directory.
    pub cgroup_id: u64,
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
}

impl Counter {
    /// Number of counters, the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 5;
    /// All counters, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::Exempt,
        Counter::Recorded,
        Counter::RecordMissing,
        Counter::RecordFailed,
    ];

    /// Stable snake_case name, used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Exempt => "exempt",
            Counter::Recorded => "recorded",
            Counter::RecordMissing => "record_missing",
            Counter::RecordFailed => "record_failed",
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
}

// No implicit padding anywhere: the kernel and userspace must agree on every byte.
const _: () = assert!(core::mem::size_of::<RedirectConfig>() == 16);
const _: () = assert!(core::mem::size_of::<ConnectRecord>() == 24);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 12);
