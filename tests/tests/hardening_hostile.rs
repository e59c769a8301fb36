//! Hostile workloads, through the real kernel path, each in a private
//! network namespace with its own cgroups and bpffs (see
//! `hardening_support`). Every workload here is also "hostNetwork": it
//! shares the agent's network namespace and source address, so only the
//! kernel's cgroup record tells them apart. With
//! `PODID_HARDENING_LISTEN_MODE=pod-netns` (the second run of `cargo xtask
//! test`) the same cases run with the agent in zero-policy mode and the
//! workloads in a pod's own network namespace, where "the agent's address"
//! is the listener the agent opened in that namespace.
//!
//! The invariant every test checks: a workload only ever receives tokens of
//! the identity bound to the cgroup that made the connection, and nothing
//! reaches the real IMDS without the agent. Results are collected in
//! `docs/security.md`.
//!
//! Privileged: `cargo test -p podid-tests --test hardening_hostile -- --test-threads=1`.

mod hardening_support;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use hardening_support::{
    LenientImds, RESOURCE, Tally, assert_no_direct_imds, is_agent_peer, metric, query,
    redirected_peer, start, start_with, status_body, token_probe, wait_for, zero_policy,
};
use podid_agent::{audit::Outcome, redirect::Redirect};
use podid_tests::{
    IMDS,
    harness::{AgentHarness, HarnessOptions},
    privileged::{cgroup_id_of, preconditions_met},
    probe::{ProbeSpec, finish},
};

/// The agent's node listener, as a workload reaches it.
fn node_listener(harness: &AgentHarness) -> SocketAddrV4 {
    harness.agent_addr().parse().expect("agent address")
}

fn raw_probe(request: String) -> ProbeSpec {
    ProbeSpec {
        raw: Some(request),
        ..ProbeSpec::connect(IMDS)
    }
}

#[test]
fn direct_dial_to_the_agent_port_gets_no_identity() {
    if !preconditions_met("direct_dial_to_the_agent_port_gets_no_identity") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    // Every listener of the agent a workload can reach: the node's, and in
    // zero-policy mode the one in the pod's own namespace.
    let mut targets = vec![("node listener", node_listener(&harness))];
    if zero_policy() {
        targets.push(("the pod's own listener", redirected_peer(&alpha)));
    }
    let mut cases: Vec<(String, ProbeSpec)> = Vec::new();
    for (target, addr) in targets {
        let direct = |spec: ProbeSpec| ProbeSpec {
            connect: Some(addr),
            ..spec
        };
        cases.extend([
            (
                format!("{target}: IPv4, a valid token request"),
                direct(token_probe(None)),
            ),
            (
                format!("{target}: IPv4, naming another workload's identity"),
                direct(token_probe(Some(&ids.beta.client_id))),
            ),
            (
                format!("{target}: AF_INET6 socket, v4-mapped agent address"),
                ProbeSpec {
                    inet6: true,
                    ..direct(token_probe(None))
                },
            ),
            (
                format!("{target}: NMI's host path with podns/podname headers"),
                direct(ProbeSpec {
                    http_path: Some(format!("/host/token/?{}", query(RESOURCE, None))),
                    headers: vec![
                        "Metadata: true".into(),
                        "podns: default".into(),
                        "podname: beta".into(),
                    ],
                    ..ProbeSpec::connect(addr)
                }),
            ),
        ]);
    }
    // The redirected request that found the pod's own listener above.
    let redirected = usize::from(zero_policy());
    let before = harness
        .emulator
        .calls_to(podid_tests::emulator::Endpoint::Imds);
    for (name, spec) in &cases {
        let report = spec.run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        let (status, body) = status_body(&report);
        assert!(
            status == 403 || status == 400,
            "{name}: a direct connection must be refused: {report}"
        );
        assert!(body.get("access_token").is_none(), "{name}: {report}");
    }
    let records = harness.audit_records(cases.len() + redirected);
    let unattributed = records
        .iter()
        .filter(|r| r.outcome == Outcome::Unattributed && r.reason.contains("not redirected"))
        .count();
    assert!(unattributed >= 3 * cases.len() / 4, "{records:#?}");
    assert_eq!(
        records
            .iter()
            .filter(|r| r.outcome == Outcome::Issued)
            .count(),
        redirected,
        "{records:#?}"
    );
    assert_eq!(
        harness
            .emulator
            .calls_to(podid_tests::emulator::Endpoint::Imds),
        before,
        "no upstream call for a direct connection"
    );
    let floor = (3 * cases.len() / 4) as f64;
    let metrics = harness.metrics();
    assert!(
        metric(
            &metrics,
            r#"podid_unattributed_requests_total{reason="no_record"}"#
        ) >= floor,
        "{metrics}"
    );
    assert_no_direct_imds(&harness);
    tally.report("direct_dial");
}

#[test]
fn forged_headers_and_disguised_paths_never_change_the_identity() {
    if !preconditions_met("forged_headers_and_disguised_paths_never_change_the_identity") {
        return;
    }
    // The agent's upstream IMDS is a front that canonicalises paths before
    // routing (as HTTP.sys does), so a disguised token path that the agent
    // forwarded would be answered with a token for whatever client_id the
    // request names.
    const FRONT: &str = "127.0.0.1:8079";
    let (harness, ids) = start(&["--imds-endpoint", &format!("http://{FRONT}")]);
    let front = LenientImds::start(
        &harness,
        FRONT.parse().expect("front address"),
        SocketAddr::V4(IMDS),
    );
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    let beta_query = query(RESOURCE, Some(&ids.beta.client_id));
    let own_query = query(RESOURCE, None);

    // Headers: none of them changes whose request this is.
    let header_cases: Vec<(&str, Vec<&str>, u16)> = vec![
        ("X-Forwarded-For", vec!["X-Forwarded-For: 10.0.0.9"], 400),
        (
            "x-forwarded-for, lower case",
            vec!["x-forwarded-for: 10.0.0.9"],
            400,
        ),
        ("Forwarded", vec!["Forwarded: for=10.0.0.9;host=beta"], 200),
        ("X-Real-IP", vec!["X-Real-IP: 10.0.0.9"], 200),
        (
            "X-Original-Forwarded-For",
            vec!["X-Original-Forwarded-For: 10.0.0.9"],
            200,
        ),
        (
            "podns/podname (NMI host path headers)",
            vec!["podns: default", "podname: beta"],
            200,
        ),
        (
            "Host naming the agent",
            vec!["X-Forwarded-Host: 127.0.0.1:2579"],
            200,
        ),
        ("two Metadata headers", vec!["Metadata: false"], 200),
        (
            "Authorization of another pod",
            vec!["Authorization: Bearer eyJhbGciOiJub25lIn0.e30."],
            200,
        ),
    ];
    for (name, extra, expected) in &header_cases {
        let mut spec = token_probe(None);
        spec.headers.extend(extra.iter().map(|h| h.to_string()));
        let report = spec.run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        let (status, _) = status_body(&report);
        assert_eq!(status, *expected, "{name}: {report}");
        // The same headers while naming beta's identity: never beta's token.
        let mut spec = ProbeSpec::token_request(&beta_query);
        spec.headers.extend(extra.iter().map(|h| h.to_string()));
        let report = spec.run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        assert_ne!(status_body(&report).0, 200, "{name} naming beta: {report}");
    }

    // Paths that a lenient server would read as the token endpoint (or the
    // instance endpoint). Each names beta's identity: a 200 would be a
    // wrong-identity token.
    let disguised = [
        "/metadata/identity/oauth2/%74oken",
        "/metadata/identity/oauth2/%2574oken",
        "/%6detadata/identity/oauth2/token",
        "/metadata/identity%2Foauth2%2Ftoken",
        "/metadata/identity/oauth2/token/../token",
        "/metadata/identity/oauth2/x/../token",
        "/metadata/./identity/oauth2/token",
        "/metadata//identity/oauth2/token",
        "/metadata/identity//oauth2/token",
        "/metadata\\identity\\oauth2\\token",
        "/metadata/identity/oauth2/token%2f",
        "/metadata/identity/oauth2/token%3F",
        "/x/../metadata/identity/oauth2/token",
        "/METADATA/IDENTITY/OAUTH2/TOKEN",
    ];
    for path in disguised {
        for (absolute, q) in [
            (false, &beta_query),
            (true, &beta_query),
            (false, &own_query),
        ] {
            let target = if absolute {
                format!("http://169.254.169.254{path}?{q}")
            } else {
                format!("{path}?{q}")
            };
            let report = raw_probe(format!(
                "GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
            ))
            .run_in(&alpha);
            tally.check(path, &report, &ids.alpha.client_id);
            let (status, body) = status_body(&report);
            if q == &beta_query {
                assert_ne!(status, 200, "{target}: {report}");
            }
            assert!(
                body.get("access_token").is_none() || status == 200,
                "{target}: {report}"
            );
        }
    }
    assert_eq!(
        harness.emulator.calls(
            podid_tests::emulator::Endpoint::Imds,
            &ids.beta.client_id,
            RESOURCE
        ),
        0,
        "nothing asked IMDS for beta's identity"
    );
    assert_no_direct_imds(&harness);
    eprintln!(
        "lenient front rewrote {} forwarded paths",
        front.rewritten.load(std::sync::atomic::Ordering::Relaxed)
    );
    tally.report("forged_headers_and_paths");
}

#[test]
fn disguised_instance_paths_cannot_bypass_the_metadata_block() {
    if !preconditions_met("disguised_instance_paths_cannot_bypass_the_metadata_block") {
        return;
    }
    const FRONT: &str = "127.0.0.1:8079";
    let (harness, _ids) = start(&[
        "--imds-endpoint",
        &format!("http://{FRONT}"),
        "--block-instance-metadata",
    ]);
    let _front = LenientImds::start(
        &harness,
        FRONT.parse().expect("front address"),
        SocketAddr::V4(IMDS),
    );
    let alpha = harness.cgroup("apps/alpha");
    for path in [
        "/metadata/instance",
        "/metadata/%69nstance",
        "/metadata//instance",
        "/metadata/./instance/compute",
        "/x/../metadata/instance",
        "/metadata\\instance",
    ] {
        let report = raw_probe(format!(
            "GET {path}?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n"
        ))
        .run_in(&alpha);
        let (status, _) = status_body(&report);
        assert!(
            status == 403 || status == 400,
            "{path} must be blocked, not forwarded: {report}"
        );
    }
    assert_eq!(
        harness
            .emulator
            .calls_to(podid_tests::emulator::Endpoint::Instance),
        0,
        "instance metadata never reached IMDS"
    );
}

#[test]
fn source_binding_and_port_reuse_keep_the_connectors_identity() {
    if !preconditions_met("source_binding_and_port_reuse_keep_the_connectors_identity") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    let beta = harness.cgroup("apps/beta");
    let agent_ip = *redirected_peer(&alpha).ip();
    let mut cases = vec![
        ("fixed loopback port", "127.0.0.1:41001".to_string(), false),
        ("another loopback address", "127.0.0.2:0".to_string(), false),
        (
            "the agent's own address and a fixed port",
            format!("{agent_ip}:41002"),
            true,
        ),
    ];
    if !zero_policy() {
        // Only the node (a hostNetwork workload) has the IMDS address as
        // one of its own.
        cases.push((
            "the IMDS address as source",
            "169.254.169.254:0".to_string(),
            false,
        ));
    }
    for (name, bind, inet6) in cases {
        let spec = ProbeSpec {
            bind: Some(bind.parse().expect("bind address")),
            inet6,
            ..token_probe(None)
        };
        let report = spec.run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        assert_eq!(status_body(&report).0, 200, "{name}: {report}");
    }

    // alpha holds a connection from 127.0.0.1:41010 with SO_REUSEPORT; beta
    // tries to open the same 4-tuple with SO_REUSEPORT too: the kernel
    // refuses, so beta can never be the peer of alpha's record.
    let dir = harness.dir().join("reuse");
    fs::create_dir_all(&dir).expect("mkdir");
    let (ready, go) = (dir.join("ready"), dir.join("go"));
    let source: SocketAddrV4 = "127.0.0.1:41010".parse().expect("addr");
    let holder = ProbeSpec {
        bind: Some(source),
        reuse: true,
        ready_file: Some(ready.clone()),
        wait_file: Some(go.clone()),
        ..token_probe(None)
    }
    .spawn_in(&alpha);
    wait_for("alpha's connection", Duration::from_secs(10), || {
        ready.exists().then_some(())
    });
    let intruder = ProbeSpec {
        bind: Some(source),
        reuse: true,
        ..token_probe(Some(&ids.alpha.client_id))
    }
    .run_in(&beta);
    tally.check("same 4-tuple from beta", &intruder, &ids.beta.client_id);
    assert!(
        intruder["error"]
            .as_str()
            .is_some_and(|e| e.contains("connect") || e.contains("bind")),
        "the kernel refuses a second socket with the same 4-tuple: {intruder}"
    );
    fs::write(&go, "").expect("go");
    let held = finish(holder);
    tally.check("alpha after the intrusion", &held, &ids.alpha.client_id);
    assert_eq!(status_body(&held).0, 200, "{held}");

    // A spoofed source address (IP_FREEBIND, not an address of this
    // namespace): the handshake cannot complete, so nothing is attributed.
    let spoof = ProbeSpec {
        bind: Some("10.99.0.5:0".parse().expect("addr")),
        freebind: true,
        connect_timeout: Some(Duration::from_millis(1500)),
        ..token_probe(Some(&ids.alpha.client_id))
    }
    .run_in(&beta);
    tally.check("spoofed source address", &spoof, &ids.beta.client_id);
    assert!(spoof["error"].is_string(), "{spoof}");
    assert_no_direct_imds(&harness);
    tally.report("source_binding");
}

#[test]
fn every_way_of_opening_the_connection_is_redirected_and_attributed() {
    if !preconditions_met("every_way_of_opening_the_connection_is_redirected_and_attributed") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    for (cgroup, expected) in [("apps/alpha", &ids.alpha), ("apps/beta", &ids.beta)] {
        let dir = harness.cgroup(cgroup);
        let cases: Vec<(&str, ProbeSpec)> = vec![
            ("AF_INET connect()", token_probe(None)),
            (
                "AF_INET6 socket, ::ffff:169.254.169.254",
                ProbeSpec {
                    inet6: true,
                    ..token_probe(None)
                },
            ),
            (
                "sendto(MSG_FASTOPEN)",
                ProbeSpec {
                    fastopen: true,
                    ..token_probe(None)
                },
            ),
            (
                "AF_INET6 sendto(MSG_FASTOPEN)",
                ProbeSpec {
                    fastopen: true,
                    inet6: true,
                    ..token_probe(None)
                },
            ),
            (
                "IPPROTO_MPTCP",
                ProbeSpec {
                    mptcp: true,
                    ..token_probe(None)
                },
            ),
            (
                "AF_INET6 IPPROTO_MPTCP",
                ProbeSpec {
                    mptcp: true,
                    inet6: true,
                    ..token_probe(None)
                },
            ),
        ];
        for (name, spec) in cases {
            let report = spec.run_in(&dir);
            tally.check(name, &report, &expected.client_id);
            let (status, _) = status_body(&report);
            let unsupported = report["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("socket:"));
            eprintln!(
                "RESULT {cgroup} {name}: {}",
                if unsupported {
                    format!("not supported by this kernel ({})", report["error"])
                } else {
                    format!("status {status}, peer {}", report["peer"])
                }
            );
            if !unsupported {
                assert_eq!(status, 200, "{cgroup} {name}: {report}");
                assert!(
                    report["peer"]
                        .as_str()
                        .is_some_and(|peer| is_agent_peer(&harness, peer)),
                    "{name} reached the agent: {report}"
                );
            }
        }
    }
    assert_no_direct_imds(&harness);
    tally.report("connect_paths");
}

#[test]
fn a_passed_or_forked_socket_keeps_the_connectors_identity() {
    if !preconditions_met("a_passed_or_forked_socket_keeps_the_connectors_identity") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let (alpha, beta) = (harness.cgroup("apps/alpha"), harness.cgroup("apps/beta"));

    // alpha connects and passes the socket (SCM_RIGHTS) to a process in beta,
    // which sends the request: the connection is alpha's.
    let handoff = ProbeSpec {
        handoff: Some(beta.clone()),
        ..token_probe(None)
    }
    .run_in(&alpha);
    let received = &handoff["handoff"];
    assert!(
        received["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with("apps/beta")),
        "the receiver runs in beta: {handoff}"
    );
    tally.check("SCM_RIGHTS to beta", &handoff, &ids.alpha.client_id);
    assert_eq!(status_body(received).0, 200, "{handoff}");
    let connector_pid = handoff["pid"].as_u64().expect("pid");
    assert_ne!(received["pid"].as_u64(), Some(connector_pid));

    // The same, asking for beta's identity by client id: refused.
    let handoff = ProbeSpec {
        handoff: Some(beta.clone()),
        ..token_probe(Some(&ids.beta.client_id))
    }
    .run_in(&alpha);
    tally.check("SCM_RIGHTS naming beta", &handoff, &ids.alpha.client_id);
    assert_eq!(status_body(&handoff["handoff"]).0, 400, "{handoff}");

    // fork() after connect; the child moves to beta and sends the request.
    let forked = ProbeSpec {
        fork_to: Some(beta.clone()),
        ..token_probe(None)
    }
    .run_in(&alpha);
    assert_eq!(forked["forked"], true, "{forked}");
    tally.check("fork after connect", &forked, &ids.alpha.client_id);
    assert_eq!(status_body(&forked).0, 200, "{forked}");

    // A process in beta connecting itself gets beta's identity.
    let own = token_probe(None).run_in(&beta);
    tally.check("beta itself", &own, &ids.beta.client_id);
    assert_eq!(status_body(&own).0, 200);

    // The audit names the connector (cgroup and pid), not the sender.
    let records = harness.audit_records(4);
    let first = &records[0];
    assert_eq!(first.pod, "alpha", "{first:?}");
    assert_eq!(first.cgroup_id, cgroup_id_of(&alpha));
    assert_eq!(u64::from(first.pid), connector_pid);
    assert_no_direct_imds(&harness);
    tally.report("socket_passing");
}

#[test]
fn moving_to_another_cgroup_after_connect_does_not_move_the_identity() {
    if !preconditions_met("moving_to_another_cgroup_after_connect_does_not_move_the_identity") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let (alpha, beta) = (harness.cgroup("apps/alpha"), harness.cgroup("apps/beta"));
    let dir = harness.dir().join("move");
    fs::create_dir_all(&dir).expect("mkdir");
    let (ready, go) = (dir.join("ready"), dir.join("go"));
    let probe = ProbeSpec {
        move_to: Some(beta.clone()),
        ready_file: Some(ready.clone()),
        wait_file: Some(go.clone()),
        ..token_probe(None)
    }
    .spawn_in(&alpha);
    let pid = probe.id();
    wait_for(
        "the probe to connect and move",
        Duration::from_secs(10),
        || ready.exists().then_some(()),
    );
    let now_in = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("probe cgroup");
    assert!(now_in.trim().ends_with("apps/beta"), "moved: {now_in}");
    fs::write(&go, "").expect("go");
    let report = finish(probe);
    tally.check(
        "moved to beta before the request",
        &report,
        &ids.alpha.client_id,
    );
    assert_eq!(status_body(&report).0, 200, "{report}");
    // Asking for beta's identity after moving into beta: refused.
    let _ = fs::remove_file(&ready);
    let _ = fs::remove_file(&go);
    let probe = ProbeSpec {
        move_to: Some(beta.clone()),
        ready_file: Some(ready.clone()),
        ..token_probe(Some(&ids.beta.client_id))
    }
    .spawn_in(&alpha);
    let report = finish(probe);
    tally.check("moved, naming beta", &report, &ids.alpha.client_id);
    assert_eq!(status_body(&report).0, 400, "{report}");
    assert_no_direct_imds(&harness);
    tally.report("cgroup_move");
}

fn peer_map_pin(harness: &podid_tests::harness::AgentHarness) -> PathBuf {
    harness
        .pin_root()
        .join(format!("v{}", podid_ebpf::ABI_VERSION))
        .join(format!("map_{}", podid_ebpf::MAP_PEER_RECORDS))
}

/// (max_entries, current entries) of the pinned peer record map.
fn peer_map_usage(harness: &podid_tests::harness::AgentHarness) -> (u32, usize) {
    let data = aya::maps::MapData::from_pin(peer_map_pin(harness)).expect("pinned peer map");
    let max = data.info().expect("map info").max_entries();
    let map: aya::maps::HashMap<_, podid_ebpf::PeerKey, podid_ebpf::ConnectRecord> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("peer map");
    (max, map.keys().filter(Result::is_ok).count())
}

#[test]
fn flooding_the_record_maps_only_turns_evictions_into_refusals() {
    if !preconditions_met("flooding_the_record_maps_only_turns_evictions_into_refusals") {
        return;
    }
    const CAPACITY: u32 = 64;
    const FLOOD: usize = 200;
    let (harness, ids) = start_with(
        &[],
        HarnessOptions {
            record_capacity: Some(CAPACITY),
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    let (alpha, beta) = (harness.cgroup("apps/alpha"), harness.cgroup("apps/beta"));
    assert_eq!(
        peer_map_usage(&harness).0,
        CAPACITY,
        "the agent reused the small maps"
    );

    // Deterministic eviction: while the agent accepts nothing, the victim
    // connects first, then beta floods; the oldest records go.
    let recorded = || {
        Redirect::pinned_counters(&harness.pin_root())
            .expect("counters")
            .recorded
    };
    let before = recorded();
    harness.pause_agent();
    let dir = harness.dir().join("flood");
    fs::create_dir_all(&dir).expect("mkdir");
    let ready = dir.join("victim");
    let victim = ProbeSpec {
        ready_file: Some(ready.clone()),
        ..token_probe(None)
    }
    .spawn_in(&alpha);
    wait_for("the victim to connect", Duration::from_secs(10), || {
        ready.exists().then_some(())
    });
    let flood = ProbeSpec {
        concurrency: FLOOD,
        ..token_probe(None)
    }
    .spawn_in(&beta);
    wait_for("the flood to connect", Duration::from_secs(30), || {
        (recorded() >= before + 1 + FLOOD as u64).then_some(())
    });
    let (max, entries) = peer_map_usage(&harness);
    assert!(
        entries <= max as usize,
        "the peer map is bounded: {entries} > {max}"
    );
    harness.resume_agent();
    let victim = finish(victim);
    let flood = finish(flood);
    tally.check("victim during the flood", &victim, &ids.alpha.client_id);
    let (victim_status, _) = status_body(&victim);
    assert!(
        victim_status == 403 || victim_status == 200,
        "evicted means refused, never another identity: {victim}"
    );
    let results = flood["results"].as_array().expect("flood results");
    let mut refused = usize::from(victim_status == 403);
    let mut issued = 0;
    for result in results {
        tally.check("flood", result, &ids.beta.client_id);
        match status_body(result).0 {
            200 => issued += 1,
            403 => refused += 1,
            other => panic!("flood connection answered {other}: {result}"),
        }
    }
    eprintln!(
        "RESULT paused flood: victim {victim_status}, flood {issued} issued / {refused} refused (capacity {CAPACITY})"
    );
    assert!(
        refused > 0,
        "{FLOOD} records in a {CAPACITY}-entry map must evict"
    );
    assert!(issued > 0, "the newest records survive");

    // The victim recovers at once.
    let again = token_probe(None).run_in(&alpha);
    tally.check("victim after the flood", &again, &ids.alpha.client_id);
    assert_eq!(status_body(&again).0, 200, "{again}");

    // Live flood: both keep going at once; whatever is evicted is refused.
    let flood = ProbeSpec {
        concurrency: 300,
        ..token_probe(None)
    }
    .spawn_in(&beta);
    let victim = ProbeSpec {
        repeat: Duration::from_secs(3),
        ..token_probe(None)
    }
    .run_in(&alpha);
    let flood = finish(flood);
    tally.check("victim during a live flood", &victim, &ids.alpha.client_id);
    tally.check("live flood", &flood, &ids.beta.client_id);
    eprintln!(
        "RESULT live flood: victim {:?}",
        hardening_support::outcomes(&victim)
    );
    let (max, entries) = peer_map_usage(&harness);
    assert!(entries <= max as usize, "{entries} > {max}");
    assert_no_direct_imds(&harness);
    tally.report("record_flood");
}

#[test]
fn a_host_network_workload_cannot_take_the_agent_port() {
    if !preconditions_met("a_host_network_workload_cannot_take_the_agent_port") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    // The listener the workload's connections reach: the node's, or in
    // zero-policy mode the one in the pod's own namespace.
    let agent = redirected_peer(&alpha);
    let port = agent.port();
    for (name, bind, reuse) in [
        ("the agent's address", agent, false),
        ("the agent's address, SO_REUSEPORT", agent, true),
        (
            "the wildcard address",
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            false,
        ),
        (
            "the wildcard address, SO_REUSEPORT",
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            true,
        ),
    ] {
        let report = ProbeSpec {
            bind: Some(bind),
            reuse,
            ..token_probe(None)
        }
        .run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        assert_eq!(
            report["errno"],
            libc::EADDRINUSE,
            "binding {name} while the agent listens: {report}"
        );
    }
    // Two workloads with the same source address (the node's, or the pod's)
    // get their own identities: attribution never looks at the address.
    let mut sources = Vec::new();
    for (cgroup, identity) in [("apps/alpha", &ids.alpha), ("apps/beta", &ids.beta)] {
        let report = token_probe(None).run_in(&harness.cgroup(cgroup));
        tally.check(cgroup, &report, &identity.client_id);
        assert_eq!(status_body(&report).0, 200);
        let local: SocketAddr = report["local"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no local address: {report}"));
        sources.push(local.ip());
    }
    assert_eq!(sources[0], sources[1], "one source address for both");
    assert_no_direct_imds(&harness);
    tally.report("host_network");
}
