//! The kernel redirect: loading podid's eBPF programs, attaching them to the
//! pods' cgroup, keeping them pinned across agent restarts, and reading back
//! who opened each redirected connection.
//!
//! The programs (see the `podid-ebpf` crate) rewrite TCP connections to the IMDS
//! address to the agent's address, and record the caller's cgroup by the
//! connection's 4-tuple. [`Redirect::take_peer_record`] is how the server side
//! learns which cgroup is on the other end of an accepted connection.

pub mod cgroup;
pub mod guard;
mod logs;
mod peer_map;
pub mod pins;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use podid_ebpf::{
    AF_INET6, ConnectRecord, Counter, EXEMPT_CAPACITY, GUARD_BOOT, GUARD_RUNNING, MAP_CONFIG,
    MAP_COUNTERS, MAP_EXEMPT_CGROUPS, MAP_PEER_RECORDS, MAP_PEER_RECORDS as PEER,
    MAP_POD_LISTENERS, PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS, PROG_IMDS_GUARD, PROG_SOCK_OPS,
    PeerKey, PodListener, RECORD_COLLISION, RedirectConfig,
};
use tracing::{debug, info, warn};

pub use guard::GuardInterfaces;
pub use logs::forward_kernel_logs;
pub use pins::{DEFAULT_PIN_ROOT, PinLayout};

/// bpf_link attachments to a cgroup always have multi-attach semantics and the
/// kernel rejects any flag on them, so the "mode" passed must be the empty one.
/// (On kernels without bpf_link aya would fall back to a legacy exclusive
/// attach; [`Redirect::install`] refuses that by requiring an `FdLink`.)
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The compiled kernel object, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PODID_EBPF_OBJECT"));

/// What went wrong while installing or using the redirect.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("preparing the pin directory {path}")]
    Pins {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {program}: {action}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {program}: the kernel gave no bpf_link (kernel older than 5.7?)")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("replacing pin {path}")]
    Repin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {action}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: MapError,
    },
    #[error("taking a record from the peer map")]
    PeerMap {
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent address must be IPv4, got {0}")]
    NotIpv4(SocketAddr),
    #[error("the IMDS guard on interface {interface}: {action}")]
    Guard {
        interface: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the exempt-cgroup map is full ({EXEMPT_CAPACITY} entries, all of cgroups that still exist); remove --exempt-cgroup entries or run `podid-agent redirect uninstall` and reinstall"
    )]
    ExemptFull,
}

type Result<T, E = RedirectError> = std::result::Result<T, E>;

/// How to install the redirect.
#[derive(Debug, Clone)]
pub struct RedirectOptions {
    /// The cgroup (v2 directory) whose processes are redirected: kubelet's
    /// kubepods cgroup on a node, a test's own cgroup in tests.
    pub cgroup_root: PathBuf,
    /// bpffs directory for pins.
    pub pin_root: PathBuf,
    /// The IMDS address to intercept (169.254.169.254:80).
    pub imds: SocketAddrV4,
    /// Where redirected connections go: the agent's listener.
    pub agent: SocketAddrV4,
    /// Exempt this process's own cgroup, so the agent reaches the real IMDS.
    pub exempt_self: bool,
    /// Further cgroups to exempt.
    pub exempt: Vec<PathBuf>,
    /// Capacity of each record map, when the maps are first created.
    pub record_capacity: Option<u32>,
    /// A record not taken within this time is stale (the kernel lets
    /// another cgroup's connection replace it; the agent refuses it).
    pub record_max_age: Duration,
    /// Where the tc guard goes.
    pub guard: GuardInterfaces,
    /// CLOCK_MONOTONIC nanoseconds when the agent started, before it bound
    /// its listener; 0 when no agent serves (`redirect install`).
    pub agent_started_ns: u64,
    /// Also attach `podid_egress` (cgroup_skb/egress) to the cgroup: IMDS
    /// packets of hooked sockets dropped inside the pod's own namespace,
    /// whatever interface the node would route them through, for a cost on
    /// every packet every pod sends.
    pub egress_guard: bool,
    /// Zero-policy mode: the loopback range and port of the pods' own
    /// listeners (`None`: every pod goes to the node listener).
    pub pod_listeners: Option<PodListenerRange>,
}

/// Where pod listeners live (zero-policy mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodListenerRange {
    /// The network (a loopback range).
    pub net: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The port every pod listener uses.
    pub port: u16,
}

/// The default [`RedirectOptions::record_max_age`]: a connection's SYN may
/// be retransmitted at 1, 3 and 7 s before it is accepted.
pub const DEFAULT_RECORD_MAX_AGE: Duration = Duration::from_secs(10);

/// What the kernel recorded about the client of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRecord {
    /// cgroup id of the task that called `connect()` (0 for a collision).
    pub cgroup_id: u64,
    /// CLOCK_MONOTONIC nanoseconds when the record was written.
    pub created_ns: u64,
    /// Two connections of different cgroups (network namespaces) used the
    /// same 4-tuple before the agent took either: nobody may be attributed.
    pub collision: bool,
    /// Its process id.
    pub tgid: u32,
    /// The destination it asked for, before the rewrite.
    pub original_destination: SocketAddrV4,
    /// Whether it used an AF_INET6 socket (v4-mapped destination).
    pub ipv6_socket: bool,
}

impl From<ConnectRecord> for PeerRecord {
    fn from(r: ConnectRecord) -> Self {
        Self {
            cgroup_id: r.cgroup_id,
            created_ns: r.created_ns,
            collision: r.flags & RECORD_COLLISION != 0,
            tgid: r.tgid,
            original_destination: SocketAddrV4::new(
                Ipv4Addr::from(r.orig_addr.to_ne_bytes()),
                u16::from_be(r.orig_port as u16),
            ),
            ipv6_socket: r.family == u32::from(AF_INET6),
        }
    }
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub redirected: u64,
    pub exempt: u64,
    pub recorded: u64,
    pub record_missing: u64,
    pub record_failed: u64,
    pub record_collision: u64,
    pub egress_dropped: u64,
    pub guard_dropped: u64,
}

impl KernelCounters {
    /// (name, value) pairs in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        Counter::ALL
            .into_iter()
            .map(move |c| (c.name(), self.get(c)))
    }

    /// One counter's value.
    pub fn get(&self, counter: Counter) -> u64 {
        match counter {
            Counter::Redirected => self.redirected,
            Counter::Exempt => self.exempt,
            Counter::Recorded => self.recorded,
            Counter::RecordMissing => self.record_missing,
            Counter::RecordFailed => self.record_failed,
            Counter::RecordCollision => self.record_collision,
            Counter::EgressDropped => self.egress_dropped,
            Counter::GuardDropped => self.guard_dropped,
        }
    }
}

/// How each program ended up attached by [`Redirect::install`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// A pinned link with the same program was already in place.
    Reused,
    /// Nothing was attached; a new link was created.
    Attached,
    /// A pinned link with a different program was replaced (make before break).
    Replaced,
}

/// The installed redirect: open handles to the pinned maps.
pub struct Redirect {
    layout: PinLayout,
    cgroup_id: u64,
    guarded: Vec<String>,
    peers: peer_map::PeerMap,
    exempt: Mutex<HashMap<MapData, u64, u32>>,
    pod_listeners: Mutex<HashMap<MapData, u64, PodListener>>,
    counters: PerCpuArray<MapData, u64>,
    attachments: Vec<(&'static str, Attachment)>,
    // Kept so aya-log can be started later, and the programs stay loaded
    // for as long as we hold them (the pins keep them alive regardless).
    ebpf: Mutex<Option<Ebpf>>,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("pins", &self.layout.dir())
            .field("cgroup_id", &self.cgroup_id)
            .field("attachments", &self.attachments)
            .finish()
    }
}

fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        // Kernels >= 5.11 charge BPF memory to the cgroup instead, so this is
        // only a problem on old kernels.
        debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK"
        );
    }
}

fn ipv4_parts(addr: SocketAddrV4) -> (u32, u32) {
    (
        u32::from_ne_bytes(addr.ip().octets()),
        u32::from(addr.port().to_be()),
    )
}

fn normalize_v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

impl Redirect {
    /// Loads the programs (or reuses the pinned ones), attaches them to
    /// `options.cgroup_root` with multi-attach, writes the configuration and
    /// the exempt cgroups. Safe to call again after a restart: pinned maps and
    /// links are reused and nothing is attached twice.
    pub fn install(options: &RedirectOptions) -> Result<Self> {
        raise_memlock_limit();
        let layout = PinLayout::new(&options.pin_root);
        layout.prepare().map_err(|source| RedirectError::Pins {
            path: layout.root().to_path_buf(),
            source,
        })?;
        cgroup::ensure_cgroup2(&options.cgroup_root).map_err(|source| RedirectError::Cgroup {
            path: options.cgroup_root.clone(),
            source,
        })?;
        let cgroup_id =
            cgroup::cgroup_id(&options.cgroup_root).map_err(|source| RedirectError::Cgroup {
                path: options.cgroup_root.clone(),
                source,
            })?;

        let mut ebpf = load_pinned(&layout, options.record_capacity)?;

        // Configuration and exemptions go in before anything is attached.
        let (guarded, guard_l2_len) = guard_interfaces(&options.guard, options.imds)?;
        let attach_cgroup_level =
            cgroup::cgroup_level(&options.cgroup_root).map_err(|source| RedirectError::Cgroup {
                path: options.cgroup_root.clone(),
                source,
            })?;
        let (imds_addr, imds_port) = ipv4_parts(options.imds);
        let (agent_addr, agent_port) = ipv4_parts(options.agent);
        let config = RedirectConfig {
            imds_addr,
            imds_port,
            agent_addr,
            agent_port,
            record_stale_ns: u64::try_from(options.record_max_age.as_nanos()).unwrap_or(u64::MAX),
            attach_cgroup_id: cgroup_id,
            attach_cgroup_level,
            guard_mode: GUARD_RUNNING,
            allow_cgroup_id: 0,
            allow_cgroup_level: 0,
            guard_l2_len,
            agent_started_ns: options.agent_started_ns,
            ..RedirectConfig::default()
        };
        let config = match options.pod_listeners {
            Some(range) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(range.prefix))
                    .unwrap_or(0);
                RedirectConfig {
                    pod_listener_net: u32::from_ne_bytes(
                        Ipv4Addr::from(u32::from(range.net) & mask).octets(),
                    ),
                    pod_listener_mask: u32::from_ne_bytes(Ipv4Addr::from(mask).octets()),
                    pod_listener_port: u32::from(range.port.to_be()),
                    ..config
                }
            }
            None => config,
        };
        let mut config_map: Array<MapData, RedirectConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        config_map
            .set(0, config, 0)
            .map_err(|source| RedirectError::Map {
                map: MAP_CONFIG,
                action: "writing the configuration",
                source,
            })?;
        let exempt: HashMap<MapData, u64, u32> = take_map(&mut ebpf, MAP_EXEMPT_CGROUPS)?;
        let peers = match ebpf.take_map(PEER) {
            Some(aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) => {
                peer_map::PeerMap::new(data)
            }
            Some(_) => {
                return Err(RedirectError::Map {
                    map: PEER,
                    action: "opening",
                    source: MapError::InvalidMapType { map_type: 0 },
                });
            }
            None => return Err(RedirectError::MissingMap(PEER)),
        };
        let counters: PerCpuArray<MapData, u64> = take_map(&mut ebpf, MAP_COUNTERS)?;
        let pod_listeners: HashMap<MapData, u64, PodListener> =
            take_map(&mut ebpf, MAP_POD_LISTENERS)?;

        let mut redirect = Redirect {
            layout,
            cgroup_id,
            guarded,
            peers,
            exempt: Mutex::new(exempt),
            pod_listeners: Mutex::new(pod_listeners),
            counters,
            attachments: Vec::new(),
            ebpf: Mutex::new(None),
        };
        redirect.prune_exempt();
        redirect.clear_pod_listeners();
        if options.exempt_self {
            let own = cgroup::own_cgroup_dir().map_err(|source| RedirectError::Cgroup {
                path: PathBuf::from("/proc/self/cgroup"),
                source,
            })?;
            redirect.exempt_cgroup(&own)?;
        }
        for dir in &options.exempt {
            redirect.exempt_cgroup(dir)?;
        }

        let cgroup_file =
            fs::File::open(&options.cgroup_root).map_err(|source| RedirectError::Cgroup {
                path: options.cgroup_root.clone(),
                source,
            })?;
        // The boundary below the socket layer first, then the redirect.
        for iface in redirect.guarded.clone() {
            let attachment = guard::attach(&mut ebpf, &redirect.layout, &iface)?;
            redirect.attachments.push((PROG_IMDS_GUARD, attachment));
        }
        let egress = options.egress_guard.then_some(PROG_EGRESS);
        for program in egress
            .into_iter()
            .chain([PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS])
        {
            let attachment = redirect.attach_pinned(&mut ebpf, program, &cgroup_file)?;
            redirect.attachments.push((program, attachment));
        }
        if !options.egress_guard {
            // Switched off since an earlier start: detach it.
            let _ = fs::remove_file(redirect.layout.link(PROG_EGRESS, cgroup_id));
        }
        guard::remove_stale(&redirect.layout, &guard::indexes(&redirect.guarded));
        redirect.remove_stale_pins();
        info!(
            cgroup = %options.cgroup_root.display(),
            cgroup_id,
            imds = %options.imds,
            agent = %options.agent,
            pins = %redirect.layout.dir().display(),
            guarded = ?redirect.guarded,
            attachments = ?redirect.attachments,
            "kernel redirect installed"
        );
        *redirect.ebpf.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(ebpf);
        Ok(redirect)
    }

    /// Ensures `program` is attached to the cgroup through a pinned link that
    /// runs the program in this object: reuse an identical pinned link,
    /// otherwise attach a new one and only then drop the old one.
    fn attach_pinned(
        &self,
        ebpf: &mut Ebpf,
        program: &'static str,
        cgroup: &fs::File,
    ) -> Result<Attachment> {
        let link_pin = self.layout.link(program, self.cgroup_id);
        let prog_pin = self.layout.program(program);
        let prog = ebpf
            .program_mut(program)
            .ok_or(RedirectError::MissingProgram(program))?;
        let prog_err = |action| {
            move |source| RedirectError::Program {
                program,
                action,
                source,
            }
        };
        let fd_link: FdLink;
        let new_tag;
        match prog {
            aya::programs::Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                p.load().map_err(prog_err("loading"))?;
                new_tag = p.info().map_err(prog_err("reading info"))?.tag();
                if pinned_link_runs(&link_pin, &prog_pin, new_tag) {
                    return Ok(Attachment::Reused);
                }
                let id = p
                    .attach(cgroup, LINK_ATTACH_MODE)
                    .map_err(prog_err("attaching"))?;
                let link = p.take_link(id).map_err(prog_err("taking the link"))?;
                fd_link = FdLink::try_from(link)
                    .map_err(|source| RedirectError::Link { program, source })?;
                repin_program(&prog_pin, |path| p.pin(path))?;
            }
            aya::programs::Program::CgroupSkb(p) => {
                let p: &mut CgroupSkb = p;
                p.load().map_err(prog_err("loading"))?;
                new_tag = p.info().map_err(prog_err("reading info"))?.tag();
                if pinned_link_runs(&link_pin, &prog_pin, new_tag) {
                    return Ok(Attachment::Reused);
                }
                let id = p
                    .attach(cgroup, CgroupSkbAttachType::Egress, LINK_ATTACH_MODE)
                    .map_err(prog_err("attaching"))?;
                let link = p.take_link(id).map_err(prog_err("taking the link"))?;
                fd_link = FdLink::try_from(link)
                    .map_err(|source| RedirectError::Link { program, source })?;
                repin_program(&prog_pin, |path| p.pin(path))?;
            }
            aya::programs::Program::SockOps(p) => {
                let p: &mut SockOps = p;
                p.load().map_err(prog_err("loading"))?;
                new_tag = p.info().map_err(prog_err("reading info"))?.tag();
                if pinned_link_runs(&link_pin, &prog_pin, new_tag) {
                    return Ok(Attachment::Reused);
                }
                let id = p
                    .attach(cgroup, LINK_ATTACH_MODE)
                    .map_err(prog_err("attaching"))?;
                let link = p.take_link(id).map_err(prog_err("taking the link"))?;
                fd_link = FdLink::try_from(link)
                    .map_err(|source| RedirectError::Link { program, source })?;
                repin_program(&prog_pin, |path| p.pin(path))?;
            }
            _ => return Err(RedirectError::MissingProgram(program)),
        }
        let had_old = link_pin.exists();
        let staged = self.layout.staged_link(program, self.cgroup_id);
        let _ = fs::remove_file(&staged);
        let pinned = fd_link.pin(&staged).map_err(|source| RedirectError::Pin {
            path: staged.clone(),
            source,
        })?;
        // The new link is attached and pinned; now the old one can go. bpffs
        // rename replaces the old pin atomically, which detaches the old link
        // once nobody holds it.
        fs::rename(&staged, &link_pin).map_err(|source| RedirectError::Repin {
            path: link_pin.clone(),
            source,
        })?;
        drop(pinned);
        Ok(if had_old {
            Attachment::Replaced
        } else {
            Attachment::Attached
        })
    }

    /// Removes links to other cgroups and pins of other ABI versions, once our
    /// own links are in place.
    fn remove_stale_pins(&self) {
        for program in [PROG_EGRESS, PROG_CONNECT4, PROG_CONNECT6, PROG_SOCK_OPS] {
            match self.layout.stale_links(program, self.cgroup_id) {
                Ok(stale) => {
                    for path in stale {
                        info!(pin = %path.display(), "detaching a link to a previous cgroup root");
                        if let Err(error) = fs::remove_file(&path) {
                            warn!(pin = %path.display(), %error, "cannot remove stale link pin");
                        }
                    }
                }
                Err(error) => warn!(%error, "cannot list link pins"),
            }
        }
        match self.layout.other_versions() {
            Ok(dirs) => {
                for dir in dirs {
                    info!(pins = %dir.display(), "removing pins of another podid version");
                    if let Err(error) = pins::remove_version(&dir) {
                        warn!(pins = %dir.display(), %error, "cannot remove old pins");
                    }
                }
            }
            Err(error) => warn!(%error, "cannot list pin versions"),
        }
    }

    /// Detaches and unpins podid's own pins under `pin_root` (which must be
    /// on a BPF filesystem; anything else there stays, see
    /// [`pins::remove_all`]), and removes its netlink guard filters from
    /// this network namespace's interfaces.
    pub fn uninstall(pin_root: &Path) -> std::io::Result<Vec<PathBuf>> {
        let removed = pins::remove_all(pin_root)?;
        for iface in guard::detach_netlink_filters() {
            info!(interface = %iface, "removed the IMDS guard filter");
        }
        Ok(removed)
    }

    /// Zero-policy mode: sends the IMDS connections of the network namespace
    /// `netns_cookie` to `addr`, the agent's listener inside it.
    pub fn add_pod_listener(&self, netns_cookie: u64, addr: SocketAddrV4) -> Result<()> {
        let (addr, port) = ipv4_parts(addr);
        self.pod_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(netns_cookie, PodListener { addr, port }, 0)
            .map_err(|source| RedirectError::Map {
                map: MAP_POD_LISTENERS,
                action: "adding a pod listener",
                source,
            })
    }

    /// Sends the namespace's IMDS connections back to the node listener.
    pub fn remove_pod_listener(&self, netns_cookie: u64) -> Result<()> {
        match self
            .pod_listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&netns_cookie)
        {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                map: MAP_POD_LISTENERS,
                action: "removing a pod listener",
                source,
            }),
        }
    }

    /// Forgets every pod listener (an agent starting: the previous one's
    /// sockets are gone with it).
    fn clear_pod_listeners(&self) {
        let mut map = self.pod_listeners.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
    }

    /// The interfaces the tc guard is attached to.
    pub fn guarded_interfaces(&self) -> &[String] {
        &self.guarded
    }

    /// Removes exempt entries of cgroups that no longer exist. Every agent
    /// start exempts its own (new) cgroup; without this a crash loop fills
    /// the map, and the next start fails.
    fn prune_exempt(&self) {
        let mut exempt = self.exempt.lock().unwrap_or_else(|e| e.into_inner());
        let ids: Vec<u64> = exempt.keys().filter_map(Result::ok).collect();
        let Ok(mount) = cgroup::cgroup2_mount() else {
            return;
        };
        let Ok(paths) = crate::attribution::CgroupPaths::new(&mount.mount_point) else {
            return;
        };
        let mut pruned = 0;
        for id in ids {
            if paths.path_of(id).is_none() && exempt.remove(&id).is_ok() {
                pruned += 1;
            }
        }
        if pruned > 0 {
            info!(
                pruned,
                "removed exempt entries of cgroups that no longer exist"
            );
        }
    }

    /// How each program was attached by [`Redirect::install`].
    pub fn attachments(&self) -> &[(&'static str, Attachment)] {
        &self.attachments
    }

    /// The cgroup id the programs are attached to.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Lets processes in `dir` reach the real IMDS.
    pub fn exempt_cgroup(&self, dir: &Path) -> Result<u64> {
        let id = cgroup::cgroup_id(dir).map_err(|source| RedirectError::Cgroup {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut exempt = self.exempt.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(source) = exempt.insert(id, 1, 0) {
            let full = matches!(&source, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG));
            return Err(if full {
                RedirectError::ExemptFull
            } else {
                RedirectError::Map {
                    map: MAP_EXEMPT_CGROUPS,
                    action: "adding an exempt cgroup",
                    source,
                }
            });
        }
        drop(exempt);
        debug!(cgroup = %dir.display(), cgroup_id = id, "exempt from the redirect");
        Ok(id)
    }

    /// Looks up, and removes, the kernel's record for a connection accepted on
    /// `local` from `peer`. `None` means the connection was not redirected by
    /// the kernel (or its record was evicted): it must be refused.
    pub fn take_peer_record(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<PeerRecord>> {
        let (Some(peer), Some(local)) = (normalize_v4(peer), normalize_v4(local)) else {
            return Ok(None);
        };
        let key = PeerKey {
            client_addr: u32::from_ne_bytes(peer.ip().octets()),
            agent_addr: u32::from_ne_bytes(local.ip().octets()),
            client_port: peer.port(),
            agent_port: local.port(),
        };
        let record = self
            .peers
            .take(&key)
            .map_err(|source| RedirectError::PeerMap { source })?;
        let Some(record) = record else {
            return Ok(None);
        };
        Ok(Some(record.into()))
    }

    /// Current kernel counters.
    pub fn counters(&self) -> Result<KernelCounters> {
        sum_counters(&self.counters)
    }

    /// Kernel counters of a redirect pinned under `pin_root` by another process.
    pub fn pinned_counters(pin_root: &Path) -> Result<KernelCounters> {
        let path = PinLayout::new(pin_root).map(MAP_COUNTERS);
        let data = MapData::from_pin(&path).map_err(|source| RedirectError::Map {
            map: MAP_COUNTERS,
            action: "opening the pinned map (is the redirect installed?)",
            source,
        })?;
        let counters =
            PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|source| {
                RedirectError::Map {
                    map: MAP_COUNTERS,
                    action: "opening",
                    source,
                }
            })?;
        sum_counters(&counters)
    }

    /// Empties the pinned pod listener map of an earlier agent, if there is
    /// one, and returns how many entries it held. An agent starting calls
    /// this before it takes its start time: until then the kernel sends pods
    /// to listeners that died with the earlier agent, and the records of
    /// those refused connections must count as older than the new agent
    /// (replaceable), never as fresh records of another cgroup.
    pub fn clear_pinned_pod_listeners(pin_root: &Path) -> Result<usize> {
        let path = PinLayout::new(pin_root).map(MAP_POD_LISTENERS);
        if !path.exists() {
            return Ok(0);
        }
        let data = MapData::from_pin(&path).map_err(|source| RedirectError::Map {
            map: MAP_POD_LISTENERS,
            action: "opening the pinned map",
            source,
        })?;
        let mut map: HashMap<MapData, u64, PodListener> =
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| {
                RedirectError::Map {
                    map: MAP_POD_LISTENERS,
                    action: "opening",
                    source,
                }
            })?;
        let keys: Vec<u64> = map.keys().filter_map(std::result::Result::ok).collect();
        for key in &keys {
            map.remove(key).map_err(|source| RedirectError::Map {
                map: MAP_POD_LISTENERS,
                action: "removing an earlier agent's pod listener",
                source,
            })?;
        }
        Ok(keys.len())
    }

    /// Takes the loaded object, for [`forward_kernel_logs`].
    pub fn take_ebpf(&self) -> Option<Ebpf> {
        self.ebpf.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

fn sum_counters(counters: &PerCpuArray<MapData, u64>) -> Result<KernelCounters> {
    let mut totals = [0u64; Counter::COUNT as usize];
    for (i, total) in totals.iter_mut().enumerate() {
        let values = counters
            .get(&(i as u32), 0)
            .map_err(|source| RedirectError::Map {
                map: MAP_COUNTERS,
                action: "reading counters",
                source,
            })?;
        *total = values.iter().copied().sum();
    }
    Ok(KernelCounters {
        redirected: totals[Counter::Redirected as usize],
        exempt: totals[Counter::Exempt as usize],
        recorded: totals[Counter::Recorded as usize],
        record_missing: totals[Counter::RecordMissing as usize],
        record_failed: totals[Counter::RecordFailed as usize],
        record_collision: totals[Counter::RecordCollision as usize],
        egress_dropped: totals[Counter::EgressDropped as usize],
        guard_dropped: totals[Counter::GuardDropped as usize],
    })
}

/// Loads the object, its maps pinned under `layout` (reused when pinned
/// already, so a boot guard, an earlier agent and this one share them).
fn load_pinned(layout: &PinLayout, record_capacity: Option<u32>) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let map_paths: Vec<(&'static str, PathBuf)> = podid_ebpf::ALL_MAPS
        .iter()
        .map(|name| (*name, layout.map(name)))
        .collect();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    if let Some(capacity) = record_capacity {
        loader.map_max_entries(MAP_PEER_RECORDS, capacity);
    }
    loader.load(OBJECT).map_err(RedirectError::Load)
}

/// The interfaces to guard and their link-layer header length (one length
/// for all: the program reads one offset).
fn guard_interfaces(
    interfaces: &GuardInterfaces,
    imds: SocketAddrV4,
) -> Result<(Vec<String>, u32)> {
    let guarded =
        guard::resolve(interfaces, *imds.ip()).map_err(|source| RedirectError::Guard {
            interface: "(route to IMDS)".into(),
            action: "reading the routing table",
            source,
        })?;
    let l2_len = match guarded.first() {
        Some(iface) => guard::link_layer_len(iface).map_err(|source| RedirectError::Guard {
            interface: iface.clone(),
            action: "reading its link type",
            source,
        })?,
        None => 0,
    };
    if let Some(other) = guarded
        .iter()
        .skip(1)
        .find(|i| guard::link_layer_len(i).ok() != Some(l2_len))
    {
        return Err(RedirectError::Guard {
            interface: other.clone(),
            action: "guarding interfaces of different link types at once",
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        });
    }
    Ok((guarded, l2_len))
}

/// How to install the boot guard.
#[derive(Debug, Clone)]
pub struct BootGuardOptions {
    /// bpffs directory for pins (the agent's).
    pub pin_root: PathBuf,
    /// The IMDS address.
    pub imds: SocketAddrV4,
    /// The cgroup whose sockets keep reaching IMDS (the host's services,
    /// `system.slice`); everything else is dropped until an agent attaches.
    pub allow_cgroup: PathBuf,
    /// Where the guard goes.
    pub guard: GuardInterfaces,
}

/// Installs the tc guard alone, in boot mode, before any agent runs (at
/// node boot, from a systemd unit ordered before the container runtime and
/// kubelet): IMDS-bound packets pass only from sockets below
/// `allow_cgroup` or of the root cgroup. The agent's
/// [`Redirect::install`] later reuses the pinned maps and program and
/// switches the mode. Returns the interfaces guarded.
pub fn install_boot_guard(options: &BootGuardOptions) -> Result<Vec<String>> {
    raise_memlock_limit();
    let layout = PinLayout::new(&options.pin_root);
    layout.prepare().map_err(|source| RedirectError::Pins {
        path: layout.root().to_path_buf(),
        source,
    })?;
    let cgroup_err = |source| RedirectError::Cgroup {
        path: options.allow_cgroup.clone(),
        source,
    };
    cgroup::ensure_cgroup2(&options.allow_cgroup).map_err(cgroup_err)?;
    let allow_cgroup_id = cgroup::cgroup_id(&options.allow_cgroup).map_err(cgroup_err)?;
    let allow_cgroup_level = cgroup::cgroup_level(&options.allow_cgroup).map_err(cgroup_err)?;
    let mut ebpf = load_pinned(&layout, None)?;
    let (guarded, guard_l2_len) = guard_interfaces(&options.guard, options.imds)?;
    if guarded.is_empty() {
        return Err(RedirectError::Guard {
            interface: "(route to IMDS)".into(),
            action: "finding an interface: nothing routes the IMDS address yet",
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let (imds_addr, imds_port) = ipv4_parts(options.imds);
    let mut config_map: Array<MapData, RedirectConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
    let running = config_map
        .get(&0, 0)
        .is_ok_and(|c| c.guard_mode == GUARD_RUNNING);
    if running {
        // An agent is attached already (the unit ran late): leave it be.
        info!("an agent runs the guard already; boot mode not needed");
        return Ok(guarded);
    }
    config_map
        .set(
            0,
            RedirectConfig {
                imds_addr,
                imds_port,
                guard_mode: GUARD_BOOT,
                allow_cgroup_id,
                allow_cgroup_level,
                guard_l2_len,
                ..RedirectConfig::default()
            },
            0,
        )
        .map_err(|source| RedirectError::Map {
            map: MAP_CONFIG,
            action: "writing the boot configuration",
            source,
        })?;
    for iface in &guarded {
        guard::attach(&mut ebpf, &layout, iface)?;
    }
    info!(interfaces = ?guarded, allow = %options.allow_cgroup.display(), "IMDS boot guard installed");
    Ok(guarded)
}

/// Whether `link_pin` is a live link running the program pinned at
/// `prog_pin`, and that program has `tag`.
fn pinned_link_runs(link_pin: &Path, prog_pin: &Path, tag: u64) -> bool {
    let Ok(link) = PinnedLink::from_pin(link_pin) else {
        return false;
    };
    let link = FdLink::from(link);
    let Ok(link_info) = link.info() else {
        return false;
    };
    let Ok(prog_info) = aya::programs::ProgramInfo::from_pin(prog_pin) else {
        return false;
    };
    link_info.program_id() == prog_info.id() && prog_info.tag() == tag
}

fn repin_program(
    path: &Path,
    pin: impl FnOnce(&Path) -> std::result::Result<(), aya::pin::PinError>,
) -> Result<()> {
    let _ = fs::remove_file(path);
    pin(path).map_err(|source| RedirectError::Pin {
        path: path.to_path_buf(),
        source,
    })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))?;
    T::try_from(map).map_err(|source| RedirectError::Map {
        map: name,
        action: "opening",
        source,
    })
}

/// The IPv4 socket address of an `IpAddr` + port, for configuration.
pub fn ipv4_socket(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr.ip() {
        IpAddr::V4(ip) => Ok(SocketAddrV4::new(ip, addr.port())),
        IpAddr::V6(_) => normalize_v4(addr).ok_or(RedirectError::NotIpv4(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_record_decodes_network_order() {
        let record = ConnectRecord {
            cgroup_id: 42,
            created_ns: 5,
            flags: 0,
            reserved: 0,
            tgid: 7,
            orig_addr: u32::from_ne_bytes([169, 254, 169, 254]),
            orig_port: u32::from(80u16.to_be()),
            family: u32::from(AF_INET6),
        };
        let peer = PeerRecord::from(record);
        assert_eq!(
            peer.original_destination,
            "169.254.169.254:80".parse::<SocketAddrV4>().unwrap()
        );
        assert!(peer.ipv6_socket);
        assert_eq!(peer.cgroup_id, 42);
    }

    #[test]
    fn v4_mapped_peers_normalise_to_v4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:4000".parse().unwrap();
        assert_eq!(normalize_v4(mapped), Some("10.0.0.1:4000".parse().unwrap()));
        let native: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        assert_eq!(normalize_v4(native), None);
    }
}
