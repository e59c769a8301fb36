//! The kernel redirect through the real kernel: each test gets its own network
//! namespace, its own cgroups and its own bpffs, and cleans up on drop.
//!
//! Run as root, one at a time (`cargo xtask test` does).

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use podid_agent::redirect::{Attachment, PeerRecord, Redirect, RedirectOptions};
use podid_ebpf::{ConnectRecord, PeerKey};
use podid_tests::{
    privileged::{
        BpffsGuard, CgroupGuard, NetNsGuard, cgroup_id_of, preconditions_met, run_ok,
        workspace_binary,
    },
    probe::{ProbeSpec, finish},
};
use serde_json::Value;

const IMDS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);
const AGENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2579);

/// One test's private world. Field order is drop order: the redirect's
/// handles close, then the bpffs (and its pins) goes, then the cgroups, and the
/// thread returns to its network namespace last.
struct Fixture {
    redirect: Option<Redirect>,
    listener: TcpListener,
    bpffs: BpffsGuard,
    _cgroups: CgroupGuard,
    pod_a: PathBuf,
    pod_b: PathBuf,
    exempt: PathBuf,
    _netns: NetNsGuard,
}

impl Fixture {
    fn new(record_capacity: Option<u32>) -> Self {
        let netns = NetNsGuard::new();
        let bpffs = BpffsGuard::new();
        let mut cgroups = CgroupGuard::new("redirect");
        let pod_a = cgroups.child("pod-a");
        let pod_b = cgroups.child("pod-b");
        let exempt = cgroups.child("exempt");
        let listener = TcpListener::bind(AGENT).expect("bind agent address");
        let redirect = Redirect::install(&RedirectOptions {
            cgroup_root: cgroups.path().to_path_buf(),
            pin_root: bpffs.pin_root(),
            imds: IMDS,
            agent: AGENT,
            exempt_self: true,
            exempt: vec![exempt.clone()],
            record_capacity,
            record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
            guard: podid_agent::redirect::GuardInterfaces::Auto,
            agent_started_ns: 0,
            egress_guard: true,
            pod_listeners: None,
        })
        .expect("install the redirect");
        Self {
            redirect: Some(redirect),
            listener,
            bpffs,
            _cgroups: cgroups,
            pod_a,
            pod_b,
            exempt,
            _netns: netns,
        }
    }

    fn redirect(&self) -> &Redirect {
        self.redirect.as_ref().expect("installed")
    }

    /// Accepts one connection (bounded wait) and returns it with the kernel's record.
    fn accept(&self) -> (TcpStream, SocketAddr, Option<PeerRecord>) {
        let (stream, peer) = accept_within(&self.listener, Duration::from_secs(5))
            .expect("a connection reaches the agent address");
        let local = stream.local_addr().expect("local addr");
        let record = self
            .redirect()
            .take_peer_record(peer, local)
            .expect("peer lookup works");
        (stream, peer, record)
    }
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return Some((stream, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn held(addr: SocketAddrV4) -> ProbeSpec {
    ProbeSpec {
        hold: Duration::from_millis(200),
        ..ProbeSpec::connect(addr)
    }
}

fn report_error(report: &Value) -> Option<&str> {
    report.get("error").and_then(Value::as_str)
}

#[test]
fn ipv4_client_is_redirected_and_attributed_to_its_cgroup() {
    if !preconditions_met("ipv4_client_is_redirected_and_attributed_to_its_cgroup") {
        return;
    }
    let fx = Fixture::new(None);
    let probe = held(IMDS).spawn_in(&fx.pod_a);
    let probe_pid = probe.id();
    let (_stream, peer, record) = fx.accept();
    let report = finish(probe);
    assert_eq!(report_error(&report), None, "probe: {report}");
    assert_eq!(
        report["peer"],
        AGENT.to_string(),
        "the client reached the agent"
    );
    assert_eq!(report["local"], peer.to_string());

    let record = record.expect("the kernel recorded the redirected connection");
    assert_eq!(record.cgroup_id, cgroup_id_of(&fx.pod_a));
    assert_eq!(
        record.cgroup_id,
        podid_agent::redirect::cgroup::cgroup_id(&fx.pod_a).unwrap()
    );
    assert_ne!(record.cgroup_id, cgroup_id_of(&fx.pod_b));
    assert_eq!(record.original_destination, IMDS);
    assert_eq!(record.tgid, probe_pid);
    assert!(!record.ipv6_socket);

    // A record is used once.
    let again = fx
        .redirect()
        .take_peer_record(peer, SocketAddr::V4(AGENT))
        .unwrap();
    assert_eq!(again, None);
}

#[test]
fn ipv6_socket_with_v4_mapped_imds_is_redirected() {
    if !preconditions_met("ipv6_socket_with_v4_mapped_imds_is_redirected") {
        return;
    }
    let fx = Fixture::new(None);
    let spec = ProbeSpec {
        inet6: true,
        ..held(IMDS)
    };
    let probe = spec.spawn_in(&fx.pod_b);
    let (_stream, peer, record) = fx.accept();
    let report = finish(probe);
    assert_eq!(report_error(&report), None, "probe: {report}");
    assert_eq!(
        report["peer"],
        format!("[::ffff:{}]:{}", AGENT.ip(), AGENT.port())
    );
    assert!(
        peer.is_ipv4(),
        "an AF_INET listener sees the client as IPv4"
    );

    let record = record.expect("the kernel recorded the v4-mapped connection");
    assert_eq!(record.cgroup_id, cgroup_id_of(&fx.pod_b));
    assert_eq!(record.original_destination, IMDS);
    assert!(record.ipv6_socket);
}

#[test]
fn exempt_cgroup_and_other_destinations_are_untouched() {
    if !preconditions_met("exempt_cgroup_and_other_destinations_are_untouched") {
        return;
    }
    let fx = Fixture::new(None);
    let before = fx.redirect().counters().unwrap();

    // The exempt cgroup goes to the real destination, which is unroutable in
    // this private namespace.
    let report = held(IMDS).run_in(&fx.exempt);
    let error = report_error(&report).unwrap_or_default();
    assert!(
        error.contains("connect"),
        "exempt client must not be redirected: {report}"
    );
    assert_eq!(report["errno"], libc::ENETUNREACH, "{report}");

    // Another port on the IMDS address, and another address on port 80.
    for other in [
        SocketAddrV4::new(*IMDS.ip(), 8080),
        SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 253), 80),
    ] {
        let report = held(other).run_in(&fx.pod_a);
        assert_eq!(report["errno"], libc::ENETUNREACH, "{other}: {report}");
    }
    // And a reachable non-IMDS destination is reached unchanged.
    let other_listener = TcpListener::bind("127.0.0.1:8081").unwrap();
    let report = held("127.0.0.1:8081".parse().unwrap()).run_in(&fx.pod_a);
    assert_eq!(report["peer"], "127.0.0.1:8081", "{report}");
    drop(other_listener);
    assert!(accept_within(&fx.listener, Duration::from_millis(200)).is_none());

    let after = fx.redirect().counters().unwrap();
    assert_eq!(after.exempt - before.exempt, 1);
    assert_eq!(after.redirected, before.redirected);
}

#[test]
fn direct_connection_to_the_agent_has_no_record() {
    if !preconditions_met("direct_connection_to_the_agent_has_no_record") {
        return;
    }
    let fx = Fixture::new(None);
    let before = fx.redirect().counters().unwrap();
    let probe = held(AGENT).spawn_in(&fx.pod_a);
    let (_stream, _peer, record) = fx.accept();
    let report = finish(probe);
    assert_eq!(report_error(&report), None, "{report}");
    assert_eq!(record, None, "a direct connection must not be attributed");
    let after = fx.redirect().counters().unwrap();
    assert_eq!(after.record_missing - before.record_missing, 1);
    assert_eq!(after.recorded, before.recorded);
}

#[test]
fn direct_connection_cannot_inherit_a_stale_record_for_its_4_tuple() {
    if !preconditions_met("direct_connection_cannot_inherit_a_stale_record_for_its_4_tuple") {
        return;
    }
    let fx = Fixture::new(None);
    // Plant a record naming pod-a for the exact 4-tuple pod-b is about to use,
    // as if an earlier redirected connection had left it unconsumed.
    let source = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 40_123);
    let key = PeerKey {
        client_addr: u32::from_ne_bytes(source.ip().octets()),
        agent_addr: u32::from_ne_bytes(AGENT.ip().octets()),
        client_port: source.port(),
        agent_port: AGENT.port(),
    };
    let stale = ConnectRecord {
        cgroup_id: cgroup_id_of(&fx.pod_a),
        tgid: 1,
        orig_addr: u32::from_ne_bytes(IMDS.ip().octets()),
        orig_port: u32::from(IMDS.port().to_be()),
        family: u32::from(podid_ebpf::AF_INET),
        created_ns: 1,
        flags: 0,
        reserved: 0,
    };
    let pin = fx
        .bpffs
        .pin_root()
        .join(format!("v{}", podid_ebpf::ABI_VERSION))
        .join(format!("map_{}", podid_ebpf::MAP_PEER_RECORDS));
    let mut peers: aya::maps::HashMap<_, PeerKey, ConnectRecord> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(&pin).expect("pinned peer map")),
    )
    .expect("peer map type");
    peers.insert(key, stale, 0).expect("plant a stale record");

    let spec = ProbeSpec {
        bind: Some(source),
        ..held(AGENT)
    };
    let probe = spec.spawn_in(&fx.pod_b);
    let (_stream, peer, record) = fx.accept();
    let report = finish(probe);
    assert_eq!(report_error(&report), None, "{report}");
    assert_eq!(peer, SocketAddr::V4(source));
    assert_eq!(
        record, None,
        "a direct connection must not inherit the stale record of its 4-tuple"
    );
}

/// `bpftool cgroup show <path>`: the programs attached to exactly this cgroup.
fn attached_programs(cgroup: &std::path::Path) -> Vec<(String, String)> {
    let out = run_ok(
        Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    );
    let parsed: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Array(vec![]));
    parsed
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            (
                p["attach_type"].as_str().unwrap_or_default().to_string(),
                p["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn ours(programs: &[(String, String)]) -> Vec<(String, String)> {
    let mut ours: Vec<_> = programs
        .iter()
        .filter(|(_, name)| name.starts_with("podid_"))
        .cloned()
        .collect();
    ours.sort();
    ours
}

fn agent_redirect(args: &[&str]) -> Value {
    let out = run_ok(
        Command::new(workspace_binary("podid-agent"))
            .arg("redirect")
            .args(args)
            .env("PODID_LOG", "warn"),
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"))
}

#[test]
fn pins_survive_the_loader_and_uninstall_removes_everything() {
    if !preconditions_met("pins_survive_the_loader_and_uninstall_removes_everything") {
        return;
    }
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let mut cgroups = CgroupGuard::new("pins");
    let pod = cgroups.child("pod");
    let pin_root = bpffs.pin_root();
    let install_args = [
        "install",
        "--cgroup-root",
        cgroups.path().to_str().unwrap(),
        "--bpffs-dir",
        pin_root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:2579",
        "--egress-guard",
    ];

    // A loader process installs, then exits without uninstalling.
    let first = agent_redirect(&install_args);
    for program in [
        "podid_egress",
        "podid_connect4",
        "podid_connect6",
        "podid_sock_ops",
    ] {
        assert_eq!(first["attachments"][program], "attached", "{first}");
    }
    let attached = ours(&attached_programs(cgroups.path()));
    assert_eq!(attached.len(), 4, "{attached:?}");

    // With no loader running, a new connection is still redirected and recorded.
    let listener = TcpListener::bind(AGENT).unwrap();
    let probe = held(IMDS).spawn_in(&pod);
    let accepted = accept_within(&listener, Duration::from_secs(5));
    let report = finish(probe);
    assert_eq!(report["peer"], AGENT.to_string(), "{report}");
    let (stream, peer) = accepted.expect("redirected while no loader runs");

    // A second loader reuses the pins and attaches nothing twice; the record
    // written while no loader ran is visible through the reused maps.
    let options = RedirectOptions {
        cgroup_root: cgroups.path().to_path_buf(),
        pin_root: pin_root.clone(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: true,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    };
    let second = Redirect::install(&options).unwrap();
    assert!(
        second
            .attachments()
            .iter()
            .all(|(_, how)| *how == Attachment::Reused),
        "{:?}",
        second.attachments()
    );
    assert_eq!(ours(&attached_programs(cgroups.path())), attached);
    let record = second
        .take_peer_record(peer, stream.local_addr().unwrap())
        .unwrap()
        .expect("record from the first loader's programs");
    assert_eq!(record.cgroup_id, cgroup_id_of(&pod));
    drop(second);
    let third = agent_redirect(&install_args);
    for program in ["podid_connect4", "podid_connect6", "podid_sock_ops"] {
        assert_eq!(third["attachments"][program], "reused", "{third}");
    }
    assert_eq!(ours(&attached_programs(cgroups.path())), attached);

    // Uninstall detaches and unpins everything.
    let removed = agent_redirect(&["uninstall", "--bpffs-dir", pin_root.to_str().unwrap()]);
    assert!(!removed["removed"].as_array().unwrap().is_empty());
    assert_eq!(ours(&attached_programs(cgroups.path())), vec![]);
    assert_eq!(bpffs.pinned_files(), Vec::<PathBuf>::new());
    assert!(!pin_root.exists());
    let report = held(IMDS).run_in(&pod);
    assert_eq!(
        report["errno"],
        libc::ENETUNREACH,
        "no redirect after uninstall: {report}"
    );
}

#[test]
fn uninstall_removes_only_podid_pins_and_refuses_other_filesystems() {
    if !preconditions_met("uninstall_removes_only_podid_pins_and_refuses_other_filesystems") {
        return;
    }
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let cgroups = CgroupGuard::new("uninstall");
    let pin_root = bpffs.pin_root();
    agent_redirect(&[
        "install",
        "--cgroup-root",
        cgroups.path().to_str().unwrap(),
        "--bpffs-dir",
        pin_root.to_str().unwrap(),
        "--listen",
        "127.0.0.1:2579",
    ]);
    assert_eq!(ours(&attached_programs(cgroups.path())).len(), 3);

    // Another tool's pins next to ours, in and around podid's directories,
    // including names that only look like ours.
    let version = pin_root.join(format!("v{}", podid_ebpf::ABI_VERSION));
    let counters = version.join(format!("map_{}", podid_ebpf::MAP_COUNTERS));
    let map = aya::maps::MapData::from_pin(&counters).expect("our pinned map");
    std::fs::create_dir(pin_root.join("vendor")).expect("mkdir on bpffs");
    let foreign = [
        bpffs.path().join("cilium_calls"),
        pin_root.join("tc_globals"),
        pin_root.join("vendor").join("map_x"),
        version.join("globals"),
    ];
    for path in &foreign {
        map.pin(path).expect("pin a foreign object");
    }
    drop(map);

    // Not a BPF filesystem: refused, nothing removed.
    let scratch = std::env::temp_dir().join(format!("podid-uninstall-{}", std::process::id()));
    let scratch_version = scratch.join(format!("v{}", podid_ebpf::ABI_VERSION));
    std::fs::create_dir_all(&scratch_version).expect("mkdir");
    std::fs::write(scratch_version.join("map_COUNTERS"), b"not a pin").expect("write");
    std::fs::write(scratch.join("notes.txt"), b"keep me").expect("write");
    let out = Command::new(workspace_binary("podid-agent"))
        .args(["redirect", "uninstall", "--bpffs-dir"])
        .arg(&scratch)
        .env("PODID_LOG", "warn")
        .output()
        .expect("run podid-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "uninstall on a plain directory: {stderr}"
    );
    assert!(stderr.contains("not on a BPF filesystem"), "{stderr}");
    assert!(scratch_version.join("map_COUNTERS").exists());
    assert!(scratch.join("notes.txt").exists());
    std::fs::remove_dir_all(&scratch).expect("clean up");
    assert_eq!(
        ours(&attached_programs(cgroups.path())).len(),
        3,
        "a refused uninstall detaches nothing"
    );

    // On bpffs: ours go, theirs stay (and so do the directories holding them).
    let removed = agent_redirect(&["uninstall", "--bpffs-dir", pin_root.to_str().unwrap()]);
    let removed: Vec<&str> = removed["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        removed.iter().any(|p| p.ends_with("map_COUNTERS")),
        "{removed:?}"
    );
    assert_eq!(ours(&attached_programs(cgroups.path())), vec![]);
    let mut left = bpffs.pinned_files();
    left.sort();
    let mut expected = foreign.to_vec();
    expected.sort();
    assert_eq!(left, expected, "only podid's own pins are removed");
}

#[test]
fn coexists_with_another_connect4_program_on_the_parent_cgroup() {
    if !preconditions_met("coexists_with_another_connect4_program_on_the_parent_cgroup") {
        return;
    }
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let other_bpffs = BpffsGuard::new();
    // parent (the stand-in for Calico's connect-time load balancer) → pods (ours) → pod
    let mut parent = CgroupGuard::new("calico");
    let pods = parent.child("pods");
    let pod = parent.child("pods/pod");
    let listener = TcpListener::bind(AGENT).unwrap();

    // The stand-in is a second, independent instance of a connect4 program at
    // the parent cgroup, configured to "load-balance" the agent's address to
    // itself: its counter shows what destination it sees.
    let standin = Redirect::install(&RedirectOptions {
        cgroup_root: parent.path().to_path_buf(),
        pin_root: other_bpffs.pin_root(),
        imds: AGENT,
        agent: AGENT,
        exempt_self: false,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    })
    .unwrap();
    // The stand-in stands for another vendor's connect-time translation, not
    // for a second podid: its packet enforcement (which would drop what it
    // takes for "IMDS", the agent's address) is switched off in its config.
    let config_pin = other_bpffs
        .pin_root()
        .join(format!("v{}", podid_ebpf::ABI_VERSION))
        .join(format!("map_{}", podid_ebpf::MAP_CONFIG));
    let mut config: aya::maps::Array<_, podid_ebpf::RedirectConfig> = aya::maps::Array::try_from(
        aya::maps::Map::Array(aya::maps::MapData::from_pin(&config_pin).expect("pinned config")),
    )
    .expect("config map type");
    let mut standin_config = config.get(&0, 0).expect("config");
    standin_config.guard_mode = podid_ebpf::GUARD_OFF;
    config
        .set(0, standin_config, 0)
        .expect("switch the stand-in's guard off");
    let parent_before = attached_programs(parent.path());
    assert_eq!(parent_before.len(), 4, "{parent_before:?}");

    let ours_installed = Redirect::install(&RedirectOptions {
        cgroup_root: pods.clone(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: true,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    })
    .unwrap();
    let standin_before = standin.counters().unwrap();

    let probe = held(IMDS).spawn_in(&pod);
    let (stream, peer) = accept_within(&listener, Duration::from_secs(5)).expect("redirected");
    finish(probe);
    let record = ours_installed
        .take_peer_record(peer, stream.local_addr().unwrap())
        .unwrap()
        .expect("ours recorded it");
    assert_eq!(record.original_destination, IMDS);

    // Ours ran first (lower in the tree); the parent's program still ran and
    // saw the rewritten destination (the agent), not 169.254.169.254.
    let standin_after = standin.counters().unwrap();
    assert_eq!(standin_after.redirected - standin_before.redirected, 1);

    // Installing, reinstalling and uninstalling ours never touches the parent's.
    drop(ours_installed);
    Redirect::install(&RedirectOptions {
        cgroup_root: pods.clone(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: true,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    })
    .unwrap();
    Redirect::uninstall(&bpffs.pin_root()).unwrap();
    assert_eq!(attached_programs(parent.path()), parent_before);
    assert_eq!(ours(&attached_programs(&pods)), vec![]);
}

#[test]
fn counters_move_and_a_full_record_map_never_misattributes() {
    if !preconditions_met("counters_move_and_a_full_record_map_never_misattributes") {
        return;
    }
    // Tiny record maps, so that a burst of connections overflows them.
    let fx = Fixture::new(Some(8));
    let before = fx.redirect().counters().unwrap();

    const CLIENTS: usize = 48;
    let mut probes = Vec::new();
    for i in 0..CLIENTS {
        let cgroup = if i % 2 == 0 { &fx.pod_a } else { &fx.pod_b };
        let spec = ProbeSpec {
            hold: Duration::from_millis(1500),
            ..ProbeSpec::connect(IMDS)
        };
        probes.push((cgroup.clone(), spec.spawn_in(cgroup)));
    }
    // Let every client connect (handshakes complete in the kernel backlog)
    // before the agent looks anything up, so later records evict earlier ones.
    std::thread::sleep(Duration::from_millis(800));
    let mut records: HashMap<String, Option<PeerRecord>> = HashMap::new();
    let mut streams = Vec::new();
    for _ in 0..CLIENTS {
        let (stream, peer) =
            accept_within(&fx.listener, Duration::from_secs(5)).expect("every client connects");
        let record = fx
            .redirect()
            .take_peer_record(peer, stream.local_addr().unwrap())
            .unwrap();
        records.insert(peer.to_string(), record);
        streams.push(stream);
    }
    let mut found = 0;
    let mut missing = 0;
    for (cgroup, probe) in probes {
        let report = finish(probe);
        assert_eq!(report_error(&report), None, "{report}");
        let local = report["local"].as_str().unwrap().to_string();
        match records.get(&local).expect("accepted this client") {
            Some(record) => {
                found += 1;
                assert_eq!(
                    record.cgroup_id,
                    cgroup_id_of(&cgroup),
                    "a record must only ever name the cgroup that connected"
                );
            }
            None => missing += 1,
        }
    }
    assert!(
        missing > 0,
        "the 8-entry maps must overflow with {CLIENTS} clients"
    );
    assert!(found > 0, "recent records survive");

    let after = fx.redirect().counters().unwrap();
    assert_eq!(after.redirected - before.redirected, CLIENTS as u64);
    assert_eq!(after.exempt, before.exempt);
    // sock_ops either moved the record or found it already evicted.
    assert_eq!(
        (after.recorded - before.recorded) + (after.record_missing - before.record_missing),
        CLIENTS as u64
    );
}

#[test]
fn a_full_exempt_map_is_a_clear_error_and_dead_cgroups_are_pruned() {
    if !preconditions_met("a_full_exempt_map_is_a_clear_error_and_dead_cgroups_are_pruned") {
        return;
    }
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let mut cgroups = CgroupGuard::new("exempt-full");
    let live: Vec<PathBuf> = (0..podid_ebpf::EXEMPT_CAPACITY)
        .map(|i| cgroups.child(&format!("live-{i}")))
        .collect();
    let root = cgroups.path().to_path_buf();
    let options = |exempt: Vec<PathBuf>| RedirectOptions {
        cgroup_root: root.clone(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: false,
        exempt,
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    };
    // 64 cgroups that exist fill the map; one more is a clear error.
    drop(Redirect::install(&options(live.clone())).expect("64 exempt cgroups fit"));
    let extra = cgroups.child("one-too-many");
    let error = Redirect::install(&options(vec![extra.clone()]))
        .expect_err("the 65th exempt cgroup does not fit")
        .to_string();
    assert!(error.contains("exempt-cgroup map is full"), "{error}");
    // Once those cgroups are gone, the next install prunes them and fits.
    for i in 0..podid_ebpf::EXEMPT_CAPACITY {
        cgroups.remove_child(&format!("live-{i}"));
    }
    drop(Redirect::install(&options(vec![extra])).expect("pruned, so it fits"));
}
