//! Admitting an accepted connection: take its kernel record in the accept
//! loop, and refuse at once, without reading anything or holding a
//! `--max-connections` place, every connection whose record cannot be
//! trusted:
//! - there is none (the kernel did not redirect it: a pod that dialled the
//!   agent's port itself, another node);
//! - it is a collision record (two network namespaces used the same
//!   4-tuple before the agent took either);
//! - it is older than `--record-max-age`, or was written before this agent
//!   started (left behind by a connection that was never accepted);
//! - the connection reached the agent through a DNAT (a Service with
//!   targetPort 2579): its 4-tuple after NAT can match a record someone
//!   else left.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    time::Duration,
};

use tokio::net::TcpStream;

use super::PeerRecords;
use crate::redirect::PeerRecord;

/// When this agent started and how old a record may be.
#[derive(Debug, Clone, Copy)]
pub struct RecordRules {
    /// CLOCK_MONOTONIC nanoseconds when the agent started (before it bound
    /// its listener): older records belong to connections nobody accepted.
    pub started_ns: u64,
    /// The oldest record accepted.
    pub max_age: Duration,
}

impl RecordRules {
    /// Rules for an agent starting now.
    pub fn starting_now(max_age: Duration) -> Self {
        Self {
            started_ns: monotonic_ns(),
            max_age,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// For `podid_unattributed_requests_total{reason}`.
    pub kind: &'static str,
    /// For the audit record and the client.
    pub reason: String,
    /// The record's cgroup and process, when there was one.
    pub cgroup_id: u64,
    /// Its process id.
    pub pid: u32,
}

impl Refusal {
    fn new(kind: &'static str, reason: impl Into<String>, record: Option<&PeerRecord>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            cgroup_id: record.map_or(0, |r| r.cgroup_id),
            pid: record.map_or(0, |r| r.tgid),
        }
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns()`, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// The destination the connection had before any NAT, from conntrack
/// (`SO_ORIGINAL_DST`); `None` when conntrack does not track it (no NAT is
/// possible then).
fn original_destination(stream: &TcpStream) -> Option<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SO_ORIGINAL_DST (80) at SOL_IP, from <linux/netfilter_ipv4.h>.
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: a valid socket, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 || i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    Some(SocketAddrV4::new(
        std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

fn as_v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

/// Takes the connection's record and decides.
pub fn admit(
    records: &dyn PeerRecords,
    rules: &RecordRules,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Result<PeerRecord, Refusal> {
    let local = stream
        .local_addr()
        .map_err(|e| Refusal::new("no_record", format!("local address: {e}"), None))?;
    let record = match records.take(peer, local) {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(Refusal::new(
                "no_record",
                "the connection was not redirected by the kernel (no connect record)",
                None,
            ));
        }
        Err(error) => {
            return Err(Refusal::new(
                "no_record",
                format!(
                    "kernel record lookup failed: {error}: {}",
                    std::error::Error::source(&error)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
                None,
            ));
        }
    };
    if let (Some(original), Some(local)) = (original_destination(stream), as_v4(local))
        && original != local
    {
        return Err(Refusal::new(
            "dnat",
            format!(
                "the connection was addressed to {original} and reached the agent through a DNAT; only the kernel redirect may deliver connections"
            ),
            Some(&record),
        ));
    }
    if record.collision {
        return Err(Refusal::new(
            "record_collision",
            "two network namespaces connected with the same addresses before the agent took either record; neither can be attributed",
            Some(&record),
        ));
    }
    if record.created_ns < rules.started_ns {
        return Err(Refusal::new(
            "record_stale",
            "the kernel record was written before this agent started (a connection nobody accepted)",
            Some(&record),
        ));
    }
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(record.created_ns));
    if age > rules.max_age {
        return Err(Refusal::new(
            "record_stale",
            format!(
                "the kernel record is {} ms old, more than --record-max-age ({} ms)",
                age.as_millis(),
                rules.max_age.as_millis()
            ),
            Some(&record),
        ));
    }
    Ok(record)
}
