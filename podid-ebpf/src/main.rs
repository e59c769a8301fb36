//! podid's kernel programs.
//!
//! - `podid_connect4` (`cgroup/connect4`) and `podid_connect6` (`cgroup/connect6`)
//!   rewrite a TCP connection to the IMDS address and port so that it reaches the
//!   node agent instead, unless the caller's cgroup is exempt. `connect6`
//!   handles the v4-mapped form (`::ffff:169.254.169.254`) that dual-stack
//!   sockets use. A socket that dials the agent's own address itself is marked,
//!   by socket cookie, as not redirected.
//! - `podid_sock_ops` (`sockops`), at TCP connect time, once the kernel has
//!   picked the source port, records who connected (the caller's cgroup id and
//!   tgid) in a map keyed by the connection's 4-tuple, which is what the agent
//!   can see when it accepts the connection. Connections marked as dialled
//!   directly get no record.
//!
//! Both run inside the caller's own `connect()` system call (connect4 from
//! `tcp_v4_pre_connect`, the sock_ops `TCP_CONNECT_CB` from `tcp_connect`), so
//! "the current task" is the same caller in both. Recording at sock_ops time
//! rather than at connect4 time saves the hot path two map writes and a
//! lookup: the facts are the same, and only the rare direct dial needs a mark.
//!
//! - `podid_egress` (`cgroup_skb/egress`, on the same cgroup) and
//!   `podid_imds_guard` (tc egress, on the interface that routes IMDS) are
//!   the boundary below the socket layer: IMDS-bound packets that the
//!   redirect did not see (a DNAT inside a pod's network namespace, a raw IP
//!   socket, an AF_PACKET frame forwarded by the node) are dropped unless an
//!   exempt socket sent them.
//!
//! The redirect programs never refuse a connection: a failed record only
//! means the agent finds nothing and refuses it, so every failure mode is
//! fail-closed. A record is written with `BPF_NOEXIST`: a fresh record of
//! another cgroup under the same 4-tuple (another network namespace using
//! the same addresses) turns into a collision record the agent refuses, so a
//! connection can never inherit someone else's cgroup.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, TcContext},
};
use aya_log_ebpf::warn;
use core::ptr::read_volatile;
use podid_ebpf::{
    AF_INET, AF_INET6, ConnectRecord, Counter, DEFAULT_RECORD_CAPACITY, DIRECT_CAPACITY,
    EXEMPT_CAPACITY, GUARD_BOOT, GUARD_OFF, GUARD_RUNNING, POD_LISTENER_CAPACITY, PeerKey,
    PodListener, RECORD_COLLISION, RedirectConfig,
};

/// `cgroup/connect*` programs must return 1 to let the `connect()` proceed.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
/// `::ffff:0:0/96` prefix word as the kernel stores it (network byte order).
const V4_MAPPED_PREFIX: u32 = 0x0000_ffffu32.to_be();

#[map]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map]
static EXEMPT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(EXEMPT_CAPACITY, 0);

#[map]
static DIRECT_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(DIRECT_CAPACITY, 0);

#[map]
static PEER_RECORDS: LruHashMap<PeerKey, ConnectRecord> =
    LruHashMap::with_max_entries(DEFAULT_RECORD_CAPACITY, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
static POD_LISTENERS: HashMap<u64, PodListener> =
    HashMap::with_max_entries(POD_LISTENER_CAPACITY, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static RedirectConfig> {
    let config = CONFIG.get(0)?;
    if config.agent_port == 0 {
        None
    } else {
        Some(config)
    }
}

/// Whether a connection to `addr:port` (network order) goes to one of the
/// agent's listeners: the node's, or a pod's (zero-policy mode).
#[inline(always)]
fn is_agent_listener(config: &RedirectConfig, addr: u32, port: u32) -> bool {
    (addr == config.agent_addr && port == config.agent_port)
        || (config.pod_listener_mask != 0
            && addr & config.pod_listener_mask == config.pod_listener_net
            && port == config.pod_listener_port)
}

/// Common part of connect4/connect6 once the destination is known as an IPv4
/// address: decide, and tell the caller what to write back.
#[inline(always)]
fn redirect_target(ctx: &SockAddrContext, dst_addr: u32, dst_port: u32) -> Option<(u32, u32)> {
    let config = config()?;
    if dst_addr != config.imds_addr || dst_port != config.imds_port {
        if is_agent_listener(config, dst_addr, dst_port) {
            mark_direct(ctx);
        }
        return None;
    }
    // SAFETY: helper with no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if exempt(cgroup_id) {
        count(Counter::Exempt);
        return None;
    }
    count(Counter::Redirected);
    if config.pod_listener_mask != 0 {
        // Zero-policy mode: the pod's own listener, if it has one yet;
        // otherwise the node's.
        // SAFETY: ctx is the program's own bpf_sock_addr context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        // SAFETY: plain-data map value, copied out at once.
        if let Some(listener) = unsafe { POD_LISTENERS.get(&netns) } {
            return Some((listener.addr, listener.port));
        }
    }
    Some((config.agent_addr, config.agent_port))
}

/// Remembers that this socket dialled the agent itself, so sock_ops gives it no
/// record. If even the LRU cannot take the mark, the connection is recorded
/// under the caller's own cgroup, which is what a redirect would have done.
#[inline(always)]
fn mark_direct(ctx: &SockAddrContext) {
    // SAFETY: ctx is the program's own bpf_sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if DIRECT_SOCKETS
        .insert(&cookie, &1, u64::from(BPF_ANY))
        .is_err()
    {
        count(Counter::RecordFailed);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn podid_connect4(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier allows reading these bpf_sock_addr fields in connect4.
    let (sock_type, dst_addr, dst_port) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    if let Some((agent_addr, agent_port)) = redirect_target(&ctx, dst_addr, dst_port) {
        // SAFETY: connect4 may rewrite user_ip4 and user_port.
        unsafe {
            (*sa).user_ip4 = agent_addr;
            (*sa).user_port = agent_port;
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn podid_connect6(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the verifier allows reading these bpf_sock_addr fields in connect6.
    let (sock_type, ip6, dst_port) = unsafe { ((*sa).type_, (*sa).user_ip6, (*sa).user_port) };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    // Only the v4-mapped form can name IMDS; native IPv6 is left alone.
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_PREFIX {
        return ALLOW;
    }
    if let Some((agent_addr, agent_port)) = redirect_target(&ctx, ip6[3], dst_port) {
        // SAFETY: connect6 may rewrite user_ip6 (as four 32-bit stores) and user_port.
        unsafe {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = V4_MAPPED_PREFIX;
            (*sa).user_ip6[3] = agent_addr;
            (*sa).user_port = agent_port;
        }
    }
    ALLOW
}

/// Returns (family, local address, remote address), the addresses as IPv4,
/// for AF_INET sockets and AF_INET6 sockets talking v4-mapped.
///
/// Every context field is read with a volatile load in the branch that needs
/// it: otherwise LLVM merges the branches into one load through a computed
/// context pointer, which the verifier rejects ("dereference of modified ctx ptr").
#[inline(always)]
fn ipv4_endpoints(ctx: &SockOpsContext) -> Option<(u32, u32, u32)> {
    let ops = ctx.ops;
    // SAFETY: ops is the program's context; these fields are readable in sock_ops.
    unsafe {
        let family = read_volatile(&(*ops).family);
        if family == u32::from(AF_INET) {
            return Some((
                family,
                read_volatile(&(*ops).local_ip4),
                read_volatile(&(*ops).remote_ip4),
            ));
        }
        if family != u32::from(AF_INET6) {
            return None;
        }
        let local = [
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
        ];
        let remote = [
            read_volatile(&(*ops).remote_ip6[0]),
            read_volatile(&(*ops).remote_ip6[1]),
            read_volatile(&(*ops).remote_ip6[2]),
            read_volatile(&(*ops).remote_ip6[3]),
        ];
        let mapped = |a: [u32; 4]| a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_PREFIX;
        if mapped(local) && mapped(remote) {
            Some((family, local[3], remote[3]))
        } else {
            None
        }
    }
}

#[sock_ops]
pub fn podid_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        record_peer(&ctx);
    }
    0
}

#[inline(always)]
fn record_peer(ctx: &SockOpsContext) {
    let Some(config) = config() else { return };
    let Some((family, local_addr, remote_addr)) = ipv4_endpoints(ctx) else {
        return;
    };
    // remote_port holds the network-order port in the high half; local_port is host order.
    // SAFETY: context fields readable in sock_ops.
    let (remote_port, local_port) = unsafe {
        (
            read_volatile(&(*ctx.ops).remote_port),
            read_volatile(&(*ctx.ops).local_port),
        )
    };
    // remote_port as the config holds ports: network order, low 16 bits.
    let remote_port_be = remote_port >> 16;
    if !is_agent_listener(config, remote_addr, remote_port_be) {
        return;
    }
    let remote_port = u32::from_be(remote_port) as u16;
    let key = PeerKey {
        client_addr: local_addr,
        agent_addr: remote_addr,
        client_port: local_port as u16,
        agent_port: remote_port,
    };
    // SAFETY: ctx is the program's own bpf_sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain-data map value, only tested for presence.
    if unsafe { DIRECT_SOCKETS.get(&cookie) }.is_some() {
        let _ = DIRECT_SOCKETS.remove(&cookie);
        // Drop any stale record left by an earlier connection with the same
        // 4-tuple, so this one can never inherit someone else's cgroup. Only
        // for the node listener: a pod listener's address is the pod's own,
        // so only that pod can reach it with that 4-tuple, while every pod
        // dials from 127.0.0.1 and could otherwise delete another pod's
        // pending record by dialling that pod's address in its own namespace.
        if remote_addr == config.agent_addr {
            let _ = PEER_RECORDS.remove(&key);
        }
        count(Counter::RecordMissing);
        return;
    }
    // TCP_CONNECT_CB runs inside the caller's connect(), like connect4 did.
    // SAFETY: helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let record = ConnectRecord {
        // SAFETY: helper with no arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        created_ns: now,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        orig_addr: config.imds_addr,
        orig_port: config.imds_port,
        family,
        flags: 0,
        reserved: 0,
    };
    if PEER_RECORDS
        .insert(&key, &record, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count(Counter::Recorded);
        return;
    }
    // A record the agent has not taken holds this 4-tuple. It is dead, and
    // simply replaced, when it is the same cgroup's, older than the
    // running agent (its connection found no listener) or stale. A fresh
    // record of another cgroup means two network namespaces are using the
    // same addresses, and then neither connection may be attributed.
    // SAFETY: plain-data map value, copied out at once.
    let replace = match unsafe { PEER_RECORDS.get(&key) } {
        Some(old) => {
            (old.flags & RECORD_COLLISION == 0 && old.cgroup_id == record.cgroup_id)
                || old.created_ns < config.agent_started_ns
                || now.wrapping_sub(old.created_ns) > config.record_stale_ns
        }
        None => true,
    };
    let (value, counter) = if replace {
        (record, Counter::Recorded)
    } else {
        (
            ConnectRecord {
                cgroup_id: 0,
                tgid: 0,
                flags: RECORD_COLLISION,
                ..record
            },
            Counter::RecordCollision,
        )
    };
    if PEER_RECORDS
        .insert(&key, &value, u64::from(BPF_ANY))
        .is_ok()
    {
        count(counter);
    } else {
        count(Counter::RecordFailed);
        warn!(
            ctx,
            "podid: cannot record connect for cgroup {}", record.cgroup_id
        );
    }
}

/// `ETH_P_IP` as `__sk_buff.protocol` holds it (network byte order).
const ETH_P_IP_BE: u32 = (0x0800u16.to_be()) as u32;
/// Offset of the destination address in an IPv4 header.
const IPV4_DADDR: usize = 16;
/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;
/// tc verdicts: continue with the next program or filter, or drop.
const TC_NEXT: i32 = -1;
const TC_SHOT: i32 = 2;

#[inline(always)]
fn exempt(cgroup_id: u64) -> bool {
    // SAFETY: reading a map value; the key type is plain data.
    unsafe { EXEMPT_CGROUPS.get(&cgroup_id) }.is_some()
}

/// The cgroup v2 hierarchy's root at level 0, whose sockets belong to the
/// kernel and to processes outside every slice.
#[inline(always)]
fn in_subtree(skb: *mut aya_ebpf::bindings::__sk_buff, cgroup_id: u64, level: u32) -> bool {
    // SAFETY: skb is the program's own context.
    unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) == cgroup_id }
}

/// Drops IMDS-bound IPv4 packets sent by sockets of the hooked cgroups
/// (a raw IP socket, a connection DNATed to IMDS inside a pod's own network
/// namespace), unless the socket's cgroup is exempt. cgroup_skb sees the
/// packet from its IP header, after the output NAT.
#[cgroup_skb(egress)]
pub fn podid_egress(ctx: SkBuffContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return SKB_PASS;
    };
    if config.guard_mode == GUARD_OFF || ctx.skb.protocol() != ETH_P_IP_BE {
        return SKB_PASS;
    }
    let Ok(daddr) = ctx.load::<u32>(IPV4_DADDR) else {
        return SKB_PASS;
    };
    if daddr != config.imds_addr {
        return SKB_PASS;
    }
    // SAFETY: skb is the program's own context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if exempt(cgroup_id) {
        return SKB_PASS;
    }
    count(Counter::EgressDropped);
    SKB_DROP
}

/// On the interface that routes IMDS: drops IMDS-bound IPv4 packets that no
/// socket on this node sent (forwarded from a pod's network namespace,
/// whatever made them: a DNAT, a raw socket, an AF_PACKET frame), and those
/// of hooked, non-exempt sockets. Before an agent has attached (boot mode),
/// only the host's own services (below the allowed cgroup) pass.
#[classifier]
pub fn podid_imds_guard(ctx: TcContext) -> i32 {
    let Some(config) = CONFIG.get(0) else {
        return TC_NEXT;
    };
    if config.guard_mode == GUARD_OFF || ctx.skb.protocol() != ETH_P_IP_BE {
        return TC_NEXT;
    }
    let Ok(daddr) = ctx.load::<u32>(config.guard_l2_len as usize + IPV4_DADDR) else {
        return TC_NEXT;
    };
    if daddr != config.imds_addr {
        return TC_NEXT;
    }
    let skb = ctx.skb.skb;
    // SAFETY: skb is the program's own context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    let pass = if cgroup_id == 0 {
        // No local socket: forwarded.
        false
    } else if exempt(cgroup_id) {
        true
    } else if config.guard_mode == GUARD_RUNNING {
        !in_subtree(skb, config.attach_cgroup_id, config.attach_cgroup_level)
    } else if config.guard_mode == GUARD_BOOT {
        in_subtree(skb, config.allow_cgroup_id, config.allow_cgroup_level)
            // SAFETY: skb is the program's own context.
            || cgroup_id == unsafe { bpf_skb_ancestor_cgroup_id(skb, 0) }
    } else {
        true
    };
    if pass {
        TC_NEXT
    } else {
        count(Counter::GuardDropped);
        TC_SHOT
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
