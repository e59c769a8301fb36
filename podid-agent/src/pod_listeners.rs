//! Zero-policy mode (`--listen-mode pod-netns`): a listener of the agent
//! inside each pod's own network namespace, on a loopback address of its
//! own, so that a pod's IMDS connection never leaves the pod's namespace and
//! no network policy applies to it.
//!
//! - **Which namespaces.** The container runtime's network namespace files
//!   (`--pod-netns-dir`, `/var/run/netns` where containerd and CRI-O put
//!   them), scanned every second. A listener opens when a file appears and
//!   closes when it goes; at most `--max-pod-listeners` at once.
//! - **The address.** Each namespace gets one address of 127.64.0.0/10 and
//!   the listener port: unique per pod, so a kernel record's 4-tuple (which
//!   names that address) can only come from a connection the redirect sent
//!   to that pod's listener. The kernel program finds the address by the
//!   caller's network namespace cookie in a map the agent fills; a namespace
//!   without an entry (not scanned yet, over the limit, hostNetwork pods) is
//!   sent to the node listener as in node mode.
//! - **Opening one** takes a thread that enters the namespace (`setns`,
//!   CAP_SYS_ADMIN), makes the socket (`IP_FREEBIND`: the pod's loopback may
//!   not be up yet) and returns; the socket stays in that namespace.

use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    net::{Ipv4Addr, SocketAddrV4},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{metrics::Metrics, redirect::Redirect};

/// The loopback range pod listeners are bound in.
pub const POD_LISTENER_NET: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 0);
/// Its prefix length.
pub const POD_LISTENER_PREFIX: u8 = 10;

/// How zero-policy mode runs.
#[derive(Debug, Clone)]
pub struct PodListenerConfig {
    /// Where the runtime's network namespace files are.
    pub netns_dir: PathBuf,
    /// The port every pod listener uses.
    pub port: u16,
    /// Pod listeners at most.
    pub max: usize,
    /// How often the directory is scanned.
    pub scan_every: Duration,
}

/// A network namespace file: name and the namespace's inode (a name may be
/// reused for another namespace).
type NetnsKey = (String, u64);

struct Open {
    cookie: u64,
    index: u32,
    serving: JoinHandle<()>,
}

/// The address of pod listener `index` (0-based).
pub fn address(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POD_LISTENER_NET) + 1 + index)
}

/// Whether `ip` is in the pod listener range.
pub fn is_pod_listener_address(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - POD_LISTENER_PREFIX);
    u32::from(ip) & mask == u32::from(POD_LISTENER_NET)
}

/// `SO_NETNS_COOKIE` of a socket: the cookie `bpf_get_netns_cookie()` gives
/// programs for sockets of the same network namespace (kernel 5.14+).
fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, out-pointer and length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a listening socket on `addr` inside the network namespace at
/// `netns`, from a short-lived thread (namespaces are per thread). Returns
/// it and the namespace's cookie.
pub fn listen_in(netns: PathBuf, addr: SocketAddrV4) -> io::Result<(std::net::TcpListener, u64)> {
    std::thread::spawn(move || -> io::Result<(std::net::TcpListener, u64)> {
        let target = fs::File::open(&netns)?;
        // SAFETY: a netns fd; this thread is ours and ends right after.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket calls on a new fd owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        let set = |level: libc::c_int, option: libc::c_int| {
            // SAFETY: valid fd and option value.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    level,
                    option,
                    std::ptr::from_ref(&one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        set(libc::SOL_SOCKET, libc::SO_REUSEADDR);
        // The pod's loopback may not be up yet: bind regardless.
        set(libc::IPPROTO_IP, libc::IP_FREEBIND);
        let sockaddr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid sockaddr_in and length.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::from_ref(&sockaddr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a bound socket.
        if unsafe { libc::listen(socket.as_raw_fd(), 1024) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let cookie = netns_cookie(&socket)?;
        Ok((std::net::TcpListener::from(socket), cookie))
    })
    .join()
    .map_err(|_| io::Error::other("the listener thread panicked"))?
}

/// The namespace files in `dir` now.
fn scan(dir: &std::path::Path) -> io::Result<BTreeSet<NetnsKey>> {
    let mut found = BTreeSet::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        found.insert((entry.file_name().to_string_lossy().into_owned(), meta.ino()));
    }
    Ok(found)
}

/// Keeps one listener per pod network namespace until `shutdown`; `serve`
/// is called with each new listener and runs until it is dropped.
pub async fn run<F>(
    config: PodListenerConfig,
    redirect: Arc<Redirect>,
    metrics: Arc<Metrics>,
    serve: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(TcpListener) -> JoinHandle<()>,
{
    let mut open: HashMap<NetnsKey, Open> = HashMap::new();
    let mut free: BTreeSet<u32> = BTreeSet::new();
    let mut next: u32 = 0;
    let mut full_warned = false;
    // Namespaces whose listener failed, reported once each.
    let mut failed_logged: BTreeSet<NetnsKey> = BTreeSet::new();
    let mut interval = tokio::time::interval(config.scan_every);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let found = match scan(&config.netns_dir) {
            Ok(found) => found,
            Err(error) => {
                warn!(dir = %config.netns_dir.display(), %error, "cannot list pod network namespaces");
                continue;
            }
        };
        let gone: Vec<NetnsKey> = open
            .keys()
            .filter(|k| !found.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(listener) = open.remove(&key) {
                if let Err(error) = redirect.remove_pod_listener(listener.cookie) {
                    warn!(netns = %key.0, %error, "cannot remove a pod listener from the kernel map");
                }
                listener.serving.abort();
                free.insert(listener.index);
                debug!(netns = %key.0, "pod network namespace gone; its listener closed");
            }
        }
        for key in found {
            if open.contains_key(&key) {
                continue;
            }
            if open.len() >= config.max {
                if !full_warned {
                    warn!(
                        max = config.max,
                        "--max-pod-listeners reached; further pods use the node listener"
                    );
                    full_warned = true;
                }
                break;
            }
            full_warned = false;
            let index = match free.pop_first() {
                Some(index) => index,
                None => {
                    next += 1;
                    next - 1
                }
            };
            let addr = SocketAddrV4::new(address(index), config.port);
            let path = config.netns_dir.join(&key.0);
            let opened = tokio::task::spawn_blocking(move || listen_in(path, addr)).await;
            let (listener, cookie) = match opened {
                Ok(Ok(pair)) => pair,
                Ok(Err(error)) => {
                    if failed_logged.insert(key.clone()) {
                        warn!(netns = %key.0, %error, "cannot open a listener in this network namespace; its pods use the node listener");
                    }
                    free.insert(index);
                    continue;
                }
                Err(error) => {
                    warn!(%error, "the listener task failed");
                    free.insert(index);
                    continue;
                }
            };
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    warn!(%error, "cannot register a pod listener with the runtime");
                    free.insert(index);
                    continue;
                }
            };
            let serving = serve(listener);
            if let Err(error) = redirect.add_pod_listener(cookie, addr) {
                warn!(netns = %key.0, %error, "cannot publish a pod listener to the kernel");
                serving.abort();
                free.insert(index);
                continue;
            }
            info!(netns = %key.0, %addr, "pod listener open");
            open.insert(
                key,
                Open {
                    cookie,
                    index,
                    serving,
                },
            );
        }
        metrics.pod_listeners().set(open.len() as i64);
    }
    // The map entries stay: while the agent restarts, pods are refused at
    // once by their closed listener (SDKs retry) rather than sent to the
    // node listener, which their policy may block. The next agent clears
    // them at start.
    for (_, listener) in open.drain() {
        listener.serving.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_loopback_addresses_of_the_range() {
        assert_eq!(address(0), Ipv4Addr::new(127, 64, 0, 1));
        assert_eq!(address(255), Ipv4Addr::new(127, 64, 1, 0));
        for index in [0, 1, 1000, 4_000_000] {
            assert!(is_pod_listener_address(address(index)), "{index}");
            assert!(address(index).is_loopback());
        }
        assert!(!is_pod_listener_address(Ipv4Addr::LOCALHOST));
        assert!(!is_pod_listener_address(Ipv4Addr::new(127, 128, 0, 1)));
    }
}
