//! The tc guard: `podid_imds_guard` on egress of the interface(s) that route
//! the IMDS address, the enforcement point no pod can go around. A packet a
//! pod forwards through the node (whatever made it: a DNAT in its own
//! network namespace, a raw socket, an AF_PACKET frame) leaves through that
//! interface without a local socket, and is dropped there.
//!
//! Attachment: a TCX link placed before every other program (kernel 6.6+),
//! pinned like the cgroup links so it outlives the agent; on older kernels a
//! clsact filter at priority [`GUARD_PRIORITY`] with handle [`GUARD_HANDLE`],
//! replaced in place on upgrade and removed by name on uninstall. A netlink
//! filter needs no pin to stay.

use std::{
    ffi::CString,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType,
        links::{FdLink, LinkOrder},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use podid_ebpf::PROG_IMDS_GUARD;
use tracing::{info, warn};

use super::{Attachment, PinLayout, RedirectError, pinned_link_runs, repin_program};

/// Netlink (pre-6.6 kernels): the filter priority. Lower runs first; 1 is
/// the first a filter can take.
pub const GUARD_PRIORITY: u16 = 1;
/// Netlink: the filter handle, podid's own at that priority.
pub const GUARD_HANDLE: TcHandle = TcHandle::new(0, 0x7d1d);

/// Which interfaces get the guard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GuardInterfaces {
    /// The interface the main routing table sends the IMDS address through.
    #[default]
    Auto,
    /// These interfaces.
    Named(Vec<String>),
    /// None (the cgroup egress program still runs).
    Off,
}

/// `ARPHRD_ETHER`.
const ARPHRD_ETHER: u16 = 1;

/// The interface `/proc/thread-self/net/route` (this thread's network namespace's main table)
/// sends `dst` through: the longest matching prefix, then the lowest metric.
pub fn route_interface(dst: Ipv4Addr) -> io::Result<Option<String>> {
    let text = fs::read_to_string("/proc/thread-self/net/route")?;
    Ok(route_interface_in(&text, dst))
}

fn route_interface_in(table: &str, dst: Ipv4Addr) -> Option<String> {
    let dst = u32::from_ne_bytes(dst.octets());
    let mut best: Option<(u32, u32, &str)> = None;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let parse = |i: usize| u32::from_str_radix(fields[i], 16).ok();
        let (Some(destination), Some(metric), Some(mask)) = (parse(1), parse(6), parse(7)) else {
            continue;
        };
        // Columns hold the addresses as the kernel stores them (network
        // order), printed as a native integer: compare in that form.
        if dst & mask != destination {
            continue;
        }
        let prefix = u32::from_be(mask).count_ones();
        let better = match best {
            None => true,
            Some((p, m, _)) => prefix > p || (prefix == p && metric < m),
        };
        if better {
            best = Some((prefix, metric, fields[0]));
        }
    }
    best.map(|(_, _, iface)| iface.to_string())
}

/// Length of the link-layer header programs on `iface` see before the IP
/// header: 14 on Ethernet devices, 0 on those without one (tun, wireguard).
/// Asked of the kernel through a socket of this network namespace
/// (`/sys/class/net` may show another).
pub fn link_layer_len(iface: &str) -> io::Result<u32> {
    let name = CString::new(iface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if name.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {iface:?} is too long"),
        ));
    }
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; the name fits (checked above).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) };
    let error = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(io::Error::new(
            error.kind(),
            format!("interface {iface}: {error}"),
        ));
    }
    // SAFETY: the kernel filled the hardware address member.
    let family = unsafe { request.ifr_ifru.ifru_hwaddr.sa_family };
    Ok(if family == ARPHRD_ETHER { 14 } else { 0 })
}

/// The interfaces to guard, resolved.
pub fn resolve(interfaces: &GuardInterfaces, imds: Ipv4Addr) -> io::Result<Vec<String>> {
    match interfaces {
        GuardInterfaces::Off => Ok(Vec::new()),
        GuardInterfaces::Named(names) => Ok(names.clone()),
        GuardInterfaces::Auto => Ok(route_interface(imds)?.into_iter().collect()),
    }
}

fn supports_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn ifindex(iface: &str) -> Result<u32, RedirectError> {
    let name = CString::new(iface).map_err(|e| RedirectError::Guard {
        interface: iface.to_string(),
        action: "naming the interface",
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(RedirectError::Guard {
            interface: iface.to_string(),
            action: "finding the interface",
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// Attaches the guard to `iface`, or keeps the pinned attachment running
/// this program. Returns how.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    iface: &str,
) -> Result<Attachment, RedirectError> {
    let index = ifindex(iface)?;
    let prog_pin = layout.program(PROG_IMDS_GUARD);
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROG_IMDS_GUARD)
        .ok_or(RedirectError::MissingProgram(PROG_IMDS_GUARD))?
        .try_into()
        .map_err(|source| RedirectError::Program {
            program: PROG_IMDS_GUARD,
            action: "opening",
            source,
        })?;
    let prog_err = |action| {
        move |source| RedirectError::Program {
            program: PROG_IMDS_GUARD,
            action,
            source,
        }
    };
    program.load().map_err(prog_err("loading"))?;
    let tag = program.info().map_err(prog_err("reading info"))?.tag();
    if supports_tcx() {
        let link_pin = guard_link(layout, index);
        if pinned_link_runs(&link_pin, &prog_pin, tag) {
            return Ok(Attachment::Reused);
        }
        let id = program
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(prog_err("attaching (tcx)"))?;
        let link = program.take_link(id).map_err(prog_err("taking the link"))?;
        let link = FdLink::try_from(link).map_err(|source| RedirectError::Link {
            program: PROG_IMDS_GUARD,
            source,
        })?;
        repin_program(&prog_pin, |path| program.pin(path))?;
        let had_old = link_pin.exists();
        // The new link runs first; pinning over the old one's path then
        // detaches the old (make before break).
        let staged = layout
            .dir()
            .join(format!("staged_{PROG_IMDS_GUARD}_if{index}"));
        let _ = fs::remove_file(&staged);
        let pinned = link.pin(&staged).map_err(|source| RedirectError::Pin {
            path: staged.clone(),
            source,
        })?;
        fs::rename(&staged, &link_pin).map_err(|source| RedirectError::Repin {
            path: link_pin.clone(),
            source,
        })?;
        drop(pinned);
        return Ok(if had_old {
            Attachment::Replaced
        } else {
            Attachment::Attached
        });
    }
    // Netlink: one filter of ours per interface, replaced in place.
    if let Err(error) = tc::qdisc_add_clsact(iface) {
        let exists = matches!(&error, tc::TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(RedirectError::Guard {
                interface: iface.to_string(),
                action: "adding the clsact qdisc",
                source: io::Error::other(error.to_string()),
            });
        }
    }
    repin_program(&prog_pin, |path| program.pin(path))?;
    let existing = SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        GUARD_PRIORITY,
        GUARD_HANDLE,
        None,
    )
    .map_err(|source| RedirectError::Guard {
        interface: iface.to_string(),
        action: "naming the existing filter",
        source,
    })?;
    let id = match program.attach_to_link(existing) {
        Ok(id) => Some((id, Attachment::Replaced)),
        Err(_) => None,
    };
    let (id, how) = match id {
        Some(found) => found,
        None => (
            program
                .attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: GUARD_PRIORITY,
                        handle: GUARD_HANDLE,
                        ..NlOptions::default()
                    }),
                )
                .map_err(prog_err("attaching (netlink)"))?,
            Attachment::Attached,
        ),
    };
    // The filter stays when the program object is dropped: forget the link.
    let link = program.take_link(id).map_err(prog_err("taking the link"))?;
    std::mem::forget(link);
    Ok(how)
}

fn guard_link(layout: &PinLayout, ifindex: u32) -> PathBuf {
    layout
        .dir()
        .join(format!("link_{PROG_IMDS_GUARD}_if{ifindex}"))
}

/// Removes pinned guard links of interfaces not in `keep` (interface index).
pub(super) fn remove_stale(layout: &PinLayout, keep: &[u32]) {
    let prefix = format!("link_{PROG_IMDS_GUARD}_if");
    let Ok(entries) = fs::read_dir(layout.dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        if !keep.contains(&index) {
            info!(pin = %entry.path().display(), "detaching the guard from an interface no longer guarded");
            if let Err(error) = fs::remove_file(entry.path()) {
                warn!(pin = %entry.path().display(), %error, "cannot remove a stale guard link");
            }
        }
    }
}

/// The index of each interface, for [`remove_stale`].
pub(super) fn indexes(interfaces: &[String]) -> Vec<u32> {
    interfaces.iter().filter_map(|i| ifindex(i).ok()).collect()
}

/// Removes podid's netlink guard filters from every interface of this
/// network namespace (TCX links go with their pins). Returns the
/// interfaces it was removed from.
pub fn detach_netlink_filters() -> Vec<String> {
    // /proc/thread-self/net/dev lists this network namespace's interfaces.
    let Ok(dev) = fs::read_to_string("/proc/thread-self/net/dev") else {
        return Vec::new();
    };
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .filter(|name| {
            tc::qdisc_detach_program(name, TcAttachType::Egress, PROG_IMDS_GUARD).is_ok()
        })
        .collect()
}

/// Whether `path` is one of the guard's pins (for uninstall ordering).
pub fn is_guard_pin(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(PROG_IMDS_GUARD))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_then_the_lowest_metric_wins() {
        let table = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100F00A\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000F00A\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0
wire0\tFEA9FEA9\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";
        let imds = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(route_interface_in(table, imds).as_deref(), Some("wire0"));
        assert_eq!(
            route_interface_in(table, Ipv4Addr::new(10, 240, 0, 9)).as_deref(),
            Some("eth0")
        );
        let default_only = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
eth1\t00000000\t0100F00A\t0003\t0\t0\t200\t00000000\n\
eth0\t00000000\t0100F00A\t0003\t0\t0\t100\t00000000\n";
        assert_eq!(
            route_interface_in(default_only, imds).as_deref(),
            Some("eth0")
        );
        assert_eq!(route_interface_in("Iface\n", imds), None);
    }
}
