//! The kernel-enforced IMDS boundary, with workloads in their own network
//! namespaces joined to the node's by veth pairs as a CNI lays them out
//! (`podid_tests::pod_network`), and IMDS beyond the node in a wire
//! namespace. Every route a pod can take around the connect-time redirect is
//! tried, with the capabilities a pod can hold in its own namespaces:
//! - NET_ADMIN in its network namespace: a DNAT to 169.254.169.254;
//! - NET_RAW: a raw IP socket SYN, an AF_PACKET frame;
//! - an unprivileged user namespace: a network namespace of its own with
//!   another pod's IP, to collide with that pod's kernel record;
//! - a DNAT to the agent's port claiming a record left by an agent restart.
//!
//! In every case: no wrong-identity token, and nothing reaches the emulated
//! IMDS from a pod (the wire namespace counts every packet from pod
//! addresses). Controls show that the fixture itself would let the
//! packets through.
//!
//! Also here: 100 agent restarts each in a fresh cgroup (the exempt map),
//! and 50,000 idle connections to the metrics listener.

mod hardening_support;

use std::{
    fs,
    net::SocketAddrV4,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use hardening_support::{Tally, assert_no_direct_imds, metric, status_body, token_probe};
use podid_agent::audit::Outcome;
use podid_tests::{
    harness::{
        AgentHarness, HarnessOptions, METRICS_ADDR, http_get, python_client, run_client_json,
    },
    pod_network::NODE_IP,
    privileged::{in_netns, preconditions_met, run_ok},
    probe::ProbeSpec,
};
use serde_json::Value;

const SCOPE: &str = "https://vault.azure.net/.default";

fn start(pods: usize, agent_args: &[&str]) -> (AgentHarness, hardening_support::Ids) {
    hardening_support::start_with(
        agent_args,
        HarnessOptions {
            pods: Some(pods),
            ..HarnessOptions::default()
        },
    )
}

fn kernel_event(harness: &AgentHarness, event: &str) -> f64 {
    metric(
        &harness.metrics(),
        &format!(r#"podid_kernel_events_total{{event="{event}"}}"#),
    )
}

/// Sends crafted SYNs to IMDS: `raw SRC DST` (a raw IP socket) or
/// `packet IFACE SRC_MAC DST_MAC SRC DST` (an AF_PACKET frame). Prints
/// `{"sent": n, "errors": [errno…]}`.
const CRAFT: &str = r#"
import json, socket, struct, sys
def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF
def syn(src, dst, sport, dport):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 4321, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp
out = {"sent": 0, "errors": []}
mode = sys.argv[1]
if mode == "raw":
    src, dst = sys.argv[2], sys.argv[3]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    frames = [(syn(src, dst, 40100 + i, 80), (dst, 0)) for i in range(5)]
    send = lambda f: s.sendto(f[0], f[1])
else:
    iface, src_mac, dst_mac, src, dst = sys.argv[2:7]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    frames = [eth + syn(src, dst, 40200 + i, 80) for i in range(5)]
    send = lambda f: s.send(f)
for f in frames:
    try:
        send(f)
        out["sent"] += 1
    except OSError as e:
        out["errors"].append(e.errno)
print(json.dumps(out))
"#;

fn craft(args: &[&str], cgroup: &Path, netns: Option<&Path>) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(CRAFT).args(args);
    if let Some(netns) = netns {
        in_netns(&mut cmd, netns);
    }
    run_client_json(cmd, cgroup, Duration::from_secs(20))
}

/// Waits a moment for packets in flight, then reads the wire's counters.
fn wire_after_a_moment(harness: &AgentHarness) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(500));
    harness.network.as_ref().expect("pod network").wire_counts()
}

#[test]
fn pods_get_their_tokens_at_the_node_ip_and_nothing_reaches_imds_directly() {
    if !preconditions_met("pods_get_their_tokens_at_the_node_ip_and_nothing_reaches_imds_directly")
    {
        return;
    }
    let (harness, ids) = start(2, &[]);
    let tally = Tally::default();
    for (pod, cgroup, expected) in [
        (0, "apps/alpha", &ids.alpha.client_id),
        (1, "apps/beta", &ids.beta.client_id),
    ] {
        let mut client = python_client(None, SCOPE);
        in_netns(&mut client, &harness.pod(pod).netns.path());
        let result = run_client_json(client, &harness.cgroup(cgroup), Duration::from_secs(60));
        let token = result["token"]
            .as_str()
            .unwrap_or_else(|| panic!("pod {pod}: {result}"));
        let report = serde_json::json!({"access_token": token});
        tally.check(&format!("pod {pod}"), &report, expected);
    }
    let record = harness.audit_record_where("alpha's request", |r| r.pod == "alpha");
    assert_eq!(record.outcome, Outcome::Issued);
    assert_eq!(
        wire_after_a_moment(&harness).0,
        0,
        "a pod packet reached IMDS"
    );
    assert!(
        wire_after_a_moment(&harness).1 > 0,
        "the agent's own calls go over the wire"
    );
    assert_no_direct_imds(&harness);
    tally.report("pod_network_tokens");
}

#[test]
fn a_dnat_to_imds_inside_a_pod_is_dropped() {
    if !preconditions_met("a_dnat_to_imds_inside_a_pod_is_dropped") {
        return;
    }
    // By default the guard on the node's interface drops the DNATed SYN as
    // the node forwards it; with --egress-guard it never leaves the pod.
    for (args, event) in [
        (&[][..], "guard_dropped"),
        (&["--egress-guard"][..], "egress_dropped"),
    ] {
        let (harness, ids) = start(1, args);
        let tally = Tally::default();
        let pod = harness.pod(0);
        // NET_ADMIN in its own network namespace: a DNAT for a dummy address.
        pod.netns.exec(
            "nft",
            &["add table ip podnat; add chain ip podnat out { type nat hook output priority -100; }; add rule ip podnat out ip daddr 10.99.0.1 tcp dport 80 dnat to 169.254.169.254:80"],
        );
        let before = kernel_event(&harness, event);
        let spec = ProbeSpec {
            connect: Some(SocketAddrV4::new([10, 99, 0, 1].into(), 80)),
            connect_timeout: Some(Duration::from_secs(2)),
            ..token_probe(None)
        };
        let report = spec.run_in_pod(&harness.cgroup("apps/alpha"), &pod.netns.path());
        tally.check("dnat", &report, &ids.alpha.client_id);
        assert_eq!(
            status_body(&report).0,
            0,
            "the connection never completed: {report}"
        );
        assert!(
            kernel_event(&harness, event) > before,
            "{event}: the DNATed SYN was dropped"
        );
        assert_eq!(
            wire_after_a_moment(&harness).0,
            0,
            "a pod packet reached IMDS"
        );
        assert_no_direct_imds(&harness);
        tally.report(&format!("dnat_in_pod_{event}"));
    }
}

#[test]
fn raw_ip_and_af_packet_frames_to_imds_are_dropped() {
    if !preconditions_met("raw_ip_and_af_packet_frames_to_imds_are_dropped") {
        return;
    }
    let (harness, _ids) = start(1, &[]);
    let pod = harness.pod(0);
    let alpha = harness.cgroup("apps/alpha");
    let pod_ip = pod.ip.to_string();

    // A raw IP socket (NET_RAW) in the pod: the node forwards its SYNs, the
    // guard drops them.
    let before = kernel_event(&harness, "guard_dropped");
    let raw = craft(
        &["raw", &pod_ip, "169.254.169.254"],
        &alpha,
        Some(&pod.netns.path()),
    );
    assert!(
        raw["sent"].as_u64().unwrap_or(0) + raw["errors"].as_array().map_or(0, |e| e.len() as u64)
            == 5,
        "{raw}"
    );
    // The node forwards them in softirq context, after the sender returns.
    hardening_support::wait_for(
        "the guard to drop the raw SYNs",
        Duration::from_secs(5),
        || (kernel_event(&harness, "guard_dropped") >= before + 5.0).then_some(()),
    );
    assert_eq!(wire_after_a_moment(&harness).0, 0, "a raw SYN reached IMDS");

    // An AF_PACKET frame on the pod's interface, addressed to the node's
    // side of the veth: the node forwards it, the guard drops it.
    let before = kernel_event(&harness, "guard_dropped");
    let frame_args = [
        "packet".to_string(),
        "eth0".into(),
        pod.mac_inside(),
        pod.mac_host_side(),
        pod_ip.clone(),
        "169.254.169.254".into(),
    ];
    let frame_args: Vec<&str> = frame_args.iter().map(String::as_str).collect();
    let frames = craft(&frame_args, &alpha, Some(&pod.netns.path()));
    assert_eq!(frames["sent"], 5, "{frames}");
    hardening_support::wait_for(
        "the tc guard to drop the forwarded frames",
        Duration::from_secs(5),
        || (kernel_event(&harness, "guard_dropped") >= before + 5.0).then_some(()),
    );
    assert_eq!(
        wire_after_a_moment(&harness).0,
        0,
        "an AF_PACKET frame reached IMDS"
    );
    assert_no_direct_imds(&harness);
    drop(harness);

    // Control: without the guard the same frames cross the node, so the
    // wire's count above is not zero by accident.
    let (harness, _ids) = start(1, &["--imds-guard-interface", "none"]);
    let pod = harness.pod(0);
    let frame_args = [
        "packet".to_string(),
        "eth0".into(),
        pod.mac_inside(),
        pod.mac_host_side(),
        pod.ip.to_string(),
        "169.254.169.254".into(),
    ];
    let frame_args: Vec<&str> = frame_args.iter().map(String::as_str).collect();
    let frames = craft(
        &frame_args,
        &harness.cgroup("apps/alpha"),
        Some(&pod.netns.path()),
    );
    assert_eq!(frames["sent"], 5, "{frames}");
    assert!(
        wire_after_a_moment(&harness).0 >= 5,
        "control: without the guard the frames reach the wire"
    );
}

/// A probe that binds `source` first.
fn bound_token_probe(source: SocketAddrV4) -> ProbeSpec {
    ProbeSpec {
        bind: Some(source),
        reuse: true,
        ..token_probe(None)
    }
}

/// An unprivileged process (uid 65534) in `cgroup` that makes a network
/// namespace of its own (through a user namespace), puts `victim` and the
/// node IP on its loopback, and dials IMDS from `victim`: the redirect sends
/// it to the node IP, which is its own loopback, so the connection fails at
/// once, but the kernel has recorded `victim`'s 4-tuple for `cgroup`.
fn plant_record(harness: &AgentHarness, pod: usize, cgroup: &str, victim: SocketAddrV4) {
    let probe = podid_tests::privileged::workspace_binary("podid-probe");
    let script = format!(
        "ip link set lo up && ip addr add {ip}/32 dev lo && ip addr add {NODE_IP}/32 dev lo && exec {probe} --bind {victim} --reuse --connect 169.254.169.254:80",
        ip = victim.ip(),
        probe = probe.display(),
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "sh",
        "-c",
        &script,
    ]);
    in_netns(&mut cmd, &harness.pod(pod).netns.path());
    let report = run_client_json(cmd, &harness.cgroup(cgroup), Duration::from_secs(20));
    assert_eq!(
        report["errno"],
        libc::ECONNREFUSED,
        "the planted connection reached its own loopback: {report}"
    );
}

#[test]
fn a_network_namespace_of_its_own_cannot_take_another_pods_record() {
    if !preconditions_met("a_network_namespace_of_its_own_cannot_take_another_pods_record") {
        return;
    }
    let (harness, ids) = start(2, &["--record-max-age", "1s"]);
    let tally = Tally::default();
    let victim_pod = harness.pod(0);
    let alpha = harness.cgroup("apps/alpha");
    let source = |port| SocketAddrV4::new(victim_pod.ip, port);

    // The attacker runs as beta, which has an identity of its own: a record
    // that named beta's cgroup for alpha's connection would show up as a
    // wrong-identity token, not only as a refusal.
    // 1. The attacker's record comes first: the victim's connection collides.
    let before = kernel_event(&harness, "record_collision");
    plant_record(&harness, 1, "apps/beta", source(40_001));
    let report = bound_token_probe(source(40_001)).run_in_pod(&alpha, &victim_pod.netns.path());
    tally.check("planted first", &report, &ids.alpha.client_id);
    assert_eq!(status_body(&report).0, 403, "{report}");
    assert!(kernel_event(&harness, "record_collision") > before);
    let refused = harness.audit_record_where("the collision refusal", |r| {
        r.reason.contains("same addresses") && r.status == 403
    });
    assert_eq!(refused.outcome, Outcome::Unattributed, "{refused:?}");

    // 2. The victim connects first and holds; the attacker plants the same
    // 4-tuple while the victim's record waits for the agent.
    let scratch = harness.dir().join("collision");
    fs::create_dir_all(&scratch).expect("scratch");
    let (ready, go) = (scratch.join("ready"), scratch.join("go"));
    let holding = ProbeSpec {
        ready_file: Some(ready.clone()),
        wait_file: Some(go.clone()),
        ..bound_token_probe(source(40_002))
    };
    // Pause the agent so the victim's record is still in the map when the
    // attacker writes.
    harness.pause_agent();
    let mut cmd = holding.command();
    in_netns(&mut cmd, &victim_pod.netns.path());
    podid_tests::privileged::in_cgroup(&mut cmd, &alpha).stdout(std::process::Stdio::piped());
    let victim = podid_tests::privileged::ChildGuard::new(cmd.spawn().expect("spawn victim"));
    hardening_support::wait_for("the victim to connect", Duration::from_secs(10), || {
        ready.exists().then_some(())
    });
    plant_record(&harness, 1, "apps/beta", source(40_002));
    harness.resume_agent();
    fs::write(&go, b"go").expect("go");
    let report = podid_tests::probe::finish(victim);
    tally.check("victim first", &report, &ids.alpha.client_id);
    assert_eq!(status_body(&report).0, 403, "{report}");

    // 3. A planted record older than --record-max-age is stale: the victim's
    // connection replaces it and gets the victim's own identity.
    plant_record(&harness, 1, "apps/beta", source(40_003));
    std::thread::sleep(Duration::from_millis(1500));
    let report = bound_token_probe(source(40_003)).run_in_pod(&alpha, &victim_pod.netns.path());
    tally.check("stale plant", &report, &ids.alpha.client_id);
    assert_eq!(status_body(&report).0, 200, "{report}");
    assert_eq!(wire_after_a_moment(&harness).0, 0);
    tally.report("netns_collision");
}

#[test]
fn a_stale_record_cannot_be_claimed_through_a_dnat_to_the_agent_port() {
    if !preconditions_met("a_stale_record_cannot_be_claimed_through_a_dnat_to_the_agent_port") {
        return;
    }
    let (mut harness, ids) = start(0, &[]);
    let tally = Tally::default();
    let source = SocketAddrV4::new(NODE_IP, 41_000);
    // A hostNetwork workload (alpha) asks while the agent is down: the
    // connection is refused, its record stays behind.
    harness.kill_agent();
    let down = bound_token_probe(source).run_in(&harness.cgroup("apps/alpha"));
    assert_eq!(down["errno"], libc::ECONNREFUSED, "{down}");
    harness.start_agent();
    // A Service (kube-proxy's DNAT) that sends port 80 of a ClusterIP to the
    // agent; another hostNetwork workload dials it from the same source.
    run_ok(Command::new("nft").arg(format!(
        "add table ip kp; add chain ip kp out {{ type nat hook output priority -100; }}; add rule ip kp out ip daddr 10.96.0.10 tcp dport 80 dnat to {NODE_IP}:2579"
    )));
    let claim = ProbeSpec {
        connect: Some(SocketAddrV4::new([10, 96, 0, 10].into(), 80)),
        ..bound_token_probe(source)
    };
    let report = claim.run_in(&harness.cgroup("apps/gamma"));
    tally.check("claim", &report, "no identity at all");
    assert_eq!(status_body(&report).0, 403, "{report}");
    let refused = harness.audit_record_where("the DNAT refusal", |r| r.reason.contains("DNAT"));
    assert_eq!(refused.outcome, Outcome::Unattributed);
    assert_eq!(
        metric(
            &harness.metrics(),
            r#"podid_unattributed_requests_total{reason="dnat"}"#
        ),
        1.0
    );
    // Alpha itself still gets its token.
    let ok = token_probe(None).run_in(&harness.cgroup("apps/alpha"));
    tally.check("alpha", &ok, &ids.alpha.client_id);
    assert_eq!(status_body(&ok).0, 200, "{ok}");
    tally.report("stale_record_dnat");
}

/// Entries in the pinned exempt-cgroup map.
fn exempt_entries(pin_root: &Path) -> usize {
    let pin = pin_root
        .join(format!("v{}", podid_ebpf::ABI_VERSION))
        .join(format!("map_{}", podid_ebpf::MAP_EXEMPT_CGROUPS));
    let map: aya::maps::HashMap<_, u64, u32> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pin).expect("pinned exempt map")),
    )
    .expect("exempt map type");
    map.keys().count()
}

#[test]
fn a_hundred_agent_restarts_in_fresh_cgroups_keep_the_node_working() {
    if !preconditions_met("a_hundred_agent_restarts_in_fresh_cgroups_keep_the_node_working") {
        return;
    }
    let (mut harness, ids) = start(0, &[]);
    let tally = Tally::default();
    let started = Instant::now();
    for restart in 1..=100 {
        harness.restart_agent_in_fresh_cgroup(&format!("agent-{restart}"));
    }
    let took = started.elapsed();
    let entries = exempt_entries(&harness.pin_root());
    assert!(
        entries <= 2,
        "the exempt map holds only live cgroups after 100 restarts: {entries}"
    );
    let report = token_probe(None).run_in(&harness.cgroup("apps/alpha"));
    tally.check("after 100 restarts", &report, &ids.alpha.client_id);
    assert_eq!(status_body(&report).0, 200, "{report}");
    eprintln!("FIGURES restarts: 100 in {took:?}, exempt entries {entries}");
    tally.report("hundred_restarts");
}

/// Opens `count` connections to `addr` and holds them until its stdin
/// closes; prints `{"opened": n, "failed": m}` once done opening.
const HOLD: &str = r#"
import json, socket, sys
addr, count = sys.argv[1], int(sys.argv[2])
host, port = addr.rsplit(":", 1)
held, failed = [], 0
for _ in range(count):
    try:
        held.append(socket.create_connection((host, int(port)), timeout=5))
    except OSError:
        failed += 1
print(json.dumps({"opened": len(held), "failed": failed}), flush=True)
sys.stdin.read()
"#;

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn fifty_thousand_idle_metrics_connections_leave_healthz_answering() {
    if !preconditions_met("fifty_thousand_idle_metrics_connections_leave_healthz_answering") {
        return;
    }
    // Holders of 10,000 each, opening in parallel: a process may not hold
    // 50,000 (the hard descriptor limit here is 20,000 and cannot be raised).
    const HOLDERS: usize = 5;
    const EACH: usize = 10_000;
    let (harness, _ids) = start(0, &[]);
    // The harness's namespace: enough source ports for one destination.
    fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000").expect("port range");
    let started = Instant::now();
    let mut holders: Vec<podid_tests::privileged::ChildGuard> = (0..HOLDERS)
        .map(|_| {
            let mut cmd = Command::new("python3");
            cmd.arg("-c")
                .arg(HOLD)
                .arg(METRICS_ADDR)
                .arg(EACH.to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            podid_tests::privileged::ChildGuard::new(cmd.spawn().expect("spawn a holder"))
        })
        .collect();
    // /healthz while the flood is being opened.
    let mut during = Vec::new();
    let mut reports = Vec::new();
    let mut lines: Vec<_> = holders
        .iter_mut()
        .map(|h| std::io::BufReader::new(h.inner().stdout.take().expect("holder stdout")))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, mut reader) in lines.drain(..).enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut reader, &mut line);
            let _ = tx.send((i, line));
        });
    }
    drop(tx);
    while reports.len() < HOLDERS {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((_, line)) => reports.push(
                serde_json::from_str::<Value>(line.trim())
                    .unwrap_or_else(|e| panic!("holder printed {line:?}: {e}")),
            ),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let asked = Instant::now();
                during.push((
                    http_get(METRICS_ADDR, "/healthz").map(|(s, _)| s),
                    asked.elapsed(),
                ));
            }
            Err(e) => panic!("holders: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "opening took too long"
        );
    }
    let opened: u64 = reports
        .iter()
        .map(|r| r["opened"].as_u64().unwrap_or(0))
        .sum();
    let took = started.elapsed();
    let asked = Instant::now();
    let answer = http_get(METRICS_ADDR, "/healthz");
    let latency = asked.elapsed();
    let agent_fds = open_fds(harness.agent_pid().expect("agent running"));
    let slowest = during.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "FIGURES metrics flood: {opened} idle connections opened in {took:?}; /healthz answered {} times during, slowest {slowest:?}; after: {:?} in {latency:?}; agent fds {agent_fds}",
        during.len(),
        answer.as_ref().map(|(s, _)| *s)
    );
    assert!(opened >= 50_000, "{reports:?}");
    assert_eq!(answer.map(|(s, _)| s), Some(200), "/healthz answers");
    assert!(
        during.iter().all(|(s, _)| *s == Some(200)),
        "/healthz answered throughout: {during:?}"
    );
    assert!(
        agent_fds < 2 * podid_agent::health::MAX_CONNECTIONS + 256,
        "the agent holds a bounded number of them: {agent_fds}"
    );
    // The token endpoint is unaffected.
    let report = token_probe(None).run_in(&harness.cgroup("apps/alpha"));
    assert_eq!(status_body(&report).0, 200, "{report}");
    drop(holders);
}

/// The node-start window: after a reboot nothing is pinned, and pods start
/// before the agent. The boot unit's `guard boot` keeps them off IMDS (the
/// host's services keep it) until the agent attaches and takes over.
#[test]
fn the_boot_guard_keeps_pods_off_imds_until_the_agent_takes_over() {
    if !preconditions_met("the_boot_guard_keeps_pods_off_imds_until_the_agent_takes_over") {
        return;
    }
    let ids = hardening_support::Ids::new();
    let mut harness = AgentHarness::start_with(
        hardening_support::spec(&ids, &[]),
        HarnessOptions {
            pods: Some(1),
            defer_agent: true,
            // The host's own service gets the node's identity, as it should.
            node_identity_expected: true,
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    // The host's services live outside the pods' cgroup, as system.slice
    // lies outside kubepods.slice.
    let host = podid_tests::privileged::CgroupGuard::new("host-services");
    let agent = podid_tests::privileged::workspace_binary("podid-agent");
    let booted = run_ok(
        Command::new(&agent)
            .args(["guard", "boot", "--bpffs-dir"])
            .arg(harness.pin_root())
            .arg("--allow-cgroup")
            .arg(host.path())
            .env("PODID_LOG", "warn"),
    );
    let guarded: Value = serde_json::from_str(booted.trim()).expect("guard boot output");
    let wire_if = harness
        .network
        .as_ref()
        .expect("pod network")
        .wire
        .node_if
        .clone();
    assert_eq!(
        guarded["guarded"],
        serde_json::json!([wire_if]),
        "{guarded}"
    );

    // No agent, no redirect: a pod dials IMDS itself, and so does a
    // hostNetwork workload. Neither gets through.
    let alpha = harness.cgroup("apps/alpha");
    let direct = ProbeSpec {
        connect_timeout: Some(Duration::from_secs(2)),
        ..token_probe(None)
    };
    let from_pod = direct.run_in_pod(&alpha, &harness.pod(0).netns.path());
    tally.check("pod, boot", &from_pod, &ids.alpha.client_id);
    assert_eq!(status_body(&from_pod).0, 0, "{from_pod}");
    let from_host_network = direct.run_in(&alpha);
    tally.check(
        "hostNetwork, boot",
        &from_host_network,
        &ids.alpha.client_id,
    );
    assert_eq!(status_body(&from_host_network).0, 0, "{from_host_network}");
    assert_eq!(
        wire_after_a_moment(&harness).0,
        0,
        "a pod packet reached IMDS"
    );
    let status: Value = serde_json::from_str(
        run_ok(
            Command::new(&agent)
                .args(["redirect", "status", "--bpffs-dir"])
                .arg(harness.pin_root())
                .env("PODID_LOG", "warn"),
        )
        .trim(),
    )
    .expect("status output");
    assert!(
        status["guard_dropped"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    // The host's service keeps IMDS (the kubelet's credential provider,
    // the VM agent).
    let service = direct.run_in(host.path());
    assert_eq!(status_body(&service).0, 200, "{service}");

    // The agent starts, reuses the pins and switches the guard over.
    harness.start_agent();
    let mut client = python_client(None, SCOPE);
    in_netns(&mut client, &harness.pod(0).netns.path());
    let result = run_client_json(client, &alpha, Duration::from_secs(60));
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("alpha after the agent started: {result}"));
    tally.check(
        "pod, agent",
        &serde_json::json!({ "access_token": token }),
        &ids.alpha.client_id,
    );
    let service = direct.run_in(host.path());
    assert_eq!(
        status_body(&service).0,
        200,
        "the host keeps IMDS: {service}"
    );
    assert_eq!(
        wire_after_a_moment(&harness).0,
        0,
        "a pod packet reached IMDS"
    );
    drop(harness);
    drop(host);
    tally.report("boot_guard");
}

/// A connection without a kernel record is answered 403 at accept and
/// never takes one of the --max-connections places.
#[test]
fn connections_without_a_record_never_hold_a_place() {
    if !preconditions_met("connections_without_a_record_never_hold_a_place") {
        return;
    }
    let (harness, ids) = start(0, &["--max-connections", "1"]);
    let tally = Tally::default();
    let scratch = harness.dir().join("hold");
    fs::create_dir_all(&scratch).expect("scratch");
    let (ready, go) = (scratch.join("ready"), scratch.join("go"));
    // Alpha holds the only place, connected, its request not sent yet.
    let holder = ProbeSpec {
        ready_file: Some(ready.clone()),
        wait_file: Some(go.clone()),
        ..token_probe(None)
    }
    .spawn_in(&harness.cgroup("apps/alpha"));
    hardening_support::wait_for("alpha to connect", Duration::from_secs(10), || {
        ready.exists().then_some(())
    });
    // Direct dials to the agent (no record), many at once: each is answered
    // 403 at once, not 503 for want of a place.
    let direct = ProbeSpec {
        concurrency: 20,
        ..ProbeSpec::connect(SocketAddrV4::new(NODE_IP, 2579))
    };
    let report = ProbeSpec {
        http_path: token_probe(None).http_path,
        headers: vec!["Metadata: true".into()],
        ..direct
    }
    .run_in(&harness.cgroup("apps/stranger"));
    let statuses: Vec<u64> = report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["status"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(statuses.len(), 20, "{report}");
    assert!(statuses.iter().all(|s| *s == 403), "{statuses:?}");
    fs::write(&go, b"go").expect("go");
    let held = podid_tests::probe::finish(holder);
    tally.check("holder", &held, &ids.alpha.client_id);
    assert_eq!(status_body(&held).0, 200, "{held}");
    tally.report("no_record_no_place");
}
