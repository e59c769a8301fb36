//! Resource bounds: connections, header size, request time (slowloris),
//! upstream concurrency, the token cache, the kernel record maps, a burst of
//! concurrent connections beyond the default descriptor limit, and a short
//! soak with the agent's memory watched. Never asserts on speed; waits are
//! bounded. (The 10,000-connection run and the 10-minute soak are
//! `podid-bench connections` and `podid-bench soak`.)
//!
//! Privileged: `cargo test -p podid-tests --test hardening_bounds -- --test-threads=1`.

mod hardening_support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use hardening_support::{
    RESOURCE, Tally, metric, outcomes, query, start, start_with, status_body, token_probe, wait_for,
};
use podid_tests::{
    IMDS,
    emulator::{Endpoint, Fault},
    harness::{AgentHarness, HarnessOptions},
    privileged::{ProcessCgroupGuard, preconditions_met},
    probe::{ProbeSpec, finish},
};
use serde_json::Value;

fn active(harness: &AgentHarness) -> f64 {
    metric(&harness.metrics(), "podid_active_connections")
}

/// A connection to the agent through the redirect, from `alpha`'s cgroup:
/// a direct dial has no kernel record and is refused at accept, before any
/// of the limits under test would apply.
fn dial_agent(harness: &AgentHarness) -> TcpStream {
    let _in_alpha = ProcessCgroupGuard::enter(&harness.cgroup("apps/alpha"));
    let stream = TcpStream::connect_timeout(&SocketAddr::V4(IMDS), Duration::from_secs(2))
        .expect("redirected connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream
}

/// Reads a whole response; (status, head+body text).
fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[test]
fn the_connection_cap_answers_503_json_and_frees_up() {
    if !preconditions_met("the_connection_cap_answers_503_json_and_frees_up") {
        return;
    }
    let (harness, ids) = start(&["--max-connections", "8", "--header-timeout", "20s"]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    let holders = ProbeSpec {
        concurrency: 8,
        hold: Duration::from_secs(4),
        ..ProbeSpec::connect(IMDS)
    }
    .spawn_in(&alpha);
    wait_for("8 connections held", Duration::from_secs(10), || {
        (active(&harness) >= 8.0).then_some(())
    });
    let refused = token_probe(None).run_in(&alpha);
    tally.check("over the cap", &refused, &ids.alpha.client_id);
    let (status, body) = status_body(&refused);
    assert_eq!(status, 503, "{refused}");
    assert_eq!(body["error"], "temporarily_unavailable", "{refused}");
    let head = refused["head"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(
        head.contains("retry-after: 1") && head.contains("application/json"),
        "{head}"
    );
    let _ = finish(holders);
    wait_for(
        "the held connections to close",
        Duration::from_secs(30),
        || (active(&harness) == 0.0).then_some(()),
    );
    let served = token_probe(None).run_in(&alpha);
    tally.check("after the cap", &served, &ids.alpha.client_id);
    assert_eq!(status_body(&served).0, 200, "{served}");
    assert!(
        metric(
            &harness.metrics(),
            r#"podid_rejected_connections_total{reason="connection_limit"}"#
        ) >= 1.0
    );
    tally.report("connection_cap");
}

#[test]
fn header_size_and_count_are_capped_with_431() {
    if !preconditions_met("header_size_and_count_are_capped_with_431") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    let path = format!("/metadata/identity/oauth2/token?{}", query(RESOURCE, None));
    let request = |extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n{extra}\r\n"
        )
    };
    let raw = |text: String| ProbeSpec {
        raw: Some(text),
        ..ProbeSpec::connect(IMDS)
    };
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "a 15,000-byte header (under 16 KiB)",
            request(&format!("X-Pad: {}\r\n", "a".repeat(15_000))),
            200,
        ),
        (
            "a 17,000-byte header",
            request(&format!("X-Pad: {}\r\n", "a".repeat(17_000))),
            431,
        ),
        (
            "65 headers",
            request(
                &(0..65)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>(),
            ),
            431,
        ),
        (
            "100 kB of headers",
            request(&format!("X-Pad: {}\r\n", "a".repeat(100_000))),
            431,
        ),
    ];
    for (name, text, expected) in cases {
        let report = raw(text).run_in(&alpha);
        tally.check(name, &report, &ids.alpha.client_id);
        let (status, body) = status_body(&report);
        assert_eq!(status, expected, "{name}: {}", report["head"]);
        if expected != 200 {
            assert_eq!(body["error"], "invalid_request", "{name}");
        }
    }
    // A client that streams header bytes forever is cut off at the cap.
    let mut stream = dial_agent(&harness);
    let mut sent = 0usize;
    let chunk = format!("GET / HTTP/1.1\r\nX-Endless: {}", "b".repeat(4096));
    let cut_off = (0..1000).any(|_| {
        let ok = stream.write_all(chunk.as_bytes()).is_ok();
        sent += chunk.len();
        !ok
    });
    let (status, _) = read_response(&mut stream);
    assert!(
        cut_off || status == 431,
        "an endless head is answered 431 and closed (sent {sent} bytes, status {status})"
    );
    tally.report("header_caps");
}

#[test]
fn slow_clients_are_cut_off_by_the_header_and_request_time_limits() {
    if !preconditions_met("slow_clients_are_cut_off_by_the_header_and_request_time_limits") {
        return;
    }
    let (harness, _ids) = start(&["--header-timeout", "1s"]);

    // A slow body on a forwarded path, from an attributed workload: bounded
    // by the per-request limit (45 s). Started first, checked last.
    let slow_body = {
        let _in_alpha = ProcessCgroupGuard::enter(&harness.cgroup("apps/alpha"));
        let mut stream = TcpStream::connect(SocketAddr::V4(IMDS)).expect("redirected connect");
        stream
            .write_all(
                b"POST /metadata/scheduledevents?api-version=2020-07-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 100000\r\n\r\n",
            )
            .expect("head");
        stream
    };
    let slow_started = Instant::now();
    let trickler = std::thread::spawn(move || {
        let mut stream = slow_body;
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut buf = [0u8; 512];
        loop {
            if stream.write_all(b"x").is_err() {
                return;
            }
            match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            std::thread::sleep(Duration::from_millis(900));
            if slow_started.elapsed() > Duration::from_secs(90) {
                return;
            }
        }
    });

    // A head that stops half-way: 408 JSON after the header timeout.
    let started = Instant::now();
    let mut stream = dial_agent(&harness);
    stream
        .write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n")
        .expect("partial head");
    let (status, text) = read_response(&mut stream);
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("application/json"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "bounded");

    // Trickling one byte every 200 ms does not extend it.
    let started = Instant::now();
    let mut stream = dial_agent(&harness);
    let head = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n";
    for byte in head.iter() {
        if stream.write_all(&[*byte]).is_err() || started.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _) = read_response(&mut stream);
    assert!(
        status == 408 || status == 0,
        "the trickle is cut off (status {status})"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "bounded");

    // 200 idle connections that never send anything all go away. The kernel
    // completes the handshakes before the agent accepts them, so "none
    // active" alone can hold before the agent has even seen them: wait for
    // all 200 to be cut off as slow, and none to be left.
    let idle: Vec<TcpStream> = (0..200).map(|_| dial_agent(&harness)).collect();
    wait_for(
        "the idle connections to be cut off and dropped",
        Duration::from_secs(15),
        || {
            let cut_off = metric(
                &harness.metrics(),
                r#"podid_rejected_connections_total{reason="slow_request"}"#,
            );
            (cut_off >= 200.0 && active(&harness) <= 1.0).then_some(())
        },
    );
    drop(idle);

    trickler.join().expect("trickler");
    let took = slow_started.elapsed();
    eprintln!("RESULT slow body cut off after {took:?}");
    assert!(
        took < Duration::from_secs(80),
        "the per-request limit ends a slow body ({took:?})"
    );
    assert_eq!(
        harness.emulator.calls_to(Endpoint::Instance),
        0,
        "the half-sent request never reached IMDS"
    );
    assert!(
        metric(
            &harness.metrics(),
            r#"podid_rejected_connections_total{reason="request_timeout"}"#
        ) >= 1.0
    );
    // The request cut off by the limit is still audited, and says why.
    let cut = harness.audit_record_where("the request cut off by the time limit", |r| {
        r.path == "/metadata/scheduledevents"
            && r.reason.contains("outlasted the per-request time limit")
    });
    assert_eq!(cut.pod, "alpha", "{cut:?}");
}

#[test]
fn upstream_concurrency_and_the_token_cache_are_bounded() {
    if !preconditions_met("upstream_concurrency_and_the_token_cache_are_bounded") {
        return;
    }
    let (harness, ids) = start(&["--upstream-concurrency", "2", "--token-cache-size", "4"]);
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    harness.emulator.reset();
    harness
        .emulator
        .inject(Fault::delay(Duration::from_millis(700)).on(Endpoint::Imds));
    let resources: Vec<String> = (0..8)
        .map(|i| format!("https://c{i}.example.com"))
        .collect();
    let probes: Vec<_> = resources
        .iter()
        .map(|r| ProbeSpec::token_request(&query(r, None)).spawn_in(&alpha))
        .collect();
    for probe in probes {
        let report = finish(probe);
        tally.check("concurrent misses", &report, &ids.alpha.client_id);
        assert_eq!(status_body(&report).0, 200, "{report}");
    }
    let peak = harness.emulator.max_concurrent();
    eprintln!("RESULT upstream concurrency: peak {peak} with --upstream-concurrency 2");
    assert!((1..=2).contains(&peak), "peak upstream concurrency {peak}");
    harness.emulator.clear_faults();

    // 8 distinct tokens through a 4-entry cache.
    let entries = metric(&harness.metrics(), "podid_token_cache_entries");
    assert!(entries <= 4.0, "cache entries {entries}");
    // The first resource was evicted: asking again goes upstream again.
    let before = harness
        .emulator
        .calls(Endpoint::Imds, &ids.alpha.client_id, &resources[0]);
    let report = ProbeSpec::token_request(&query(&resources[0], None)).run_in(&alpha);
    tally.check("after eviction", &report, &ids.alpha.client_id);
    assert_eq!(
        harness
            .emulator
            .calls(Endpoint::Imds, &ids.alpha.client_id, &resources[0]),
        before + 1
    );
    tally.report("upstream_and_cache");
}

#[test]
fn the_kernel_record_maps_have_a_fixed_capacity() {
    if !preconditions_met("the_kernel_record_maps_have_a_fixed_capacity") {
        return;
    }
    let (harness, _ids) = start(&[]);
    for (name, capacity) in [
        (
            podid_ebpf::MAP_PEER_RECORDS,
            podid_ebpf::DEFAULT_RECORD_CAPACITY,
        ),
        (podid_ebpf::MAP_DIRECT_SOCKETS, podid_ebpf::DIRECT_CAPACITY),
    ] {
        let pin = harness
            .pin_root()
            .join(format!("v{}", podid_ebpf::ABI_VERSION))
            .join(format!("map_{name}"));
        let data = aya::maps::MapData::from_pin(&pin).expect("pinned map");
        let info = data.info().expect("map info");
        assert_eq!(info.max_entries(), capacity, "{name}");
        assert_eq!(
            info.map_type().ok(),
            Some(aya::maps::MapType::LruHash),
            "{name} evicts instead of failing"
        );
    }
}

#[test]
fn more_concurrent_connections_than_the_default_descriptor_limit_are_held() {
    if !preconditions_met("more_concurrent_connections_than_the_default_descriptor_limit_are_held")
    {
        return;
    }
    const CONNECTIONS: usize = 1500;
    let own = podid_agent::limits::raise_nofile_limit().expect("raise RLIMIT_NOFILE");
    assert!(
        own as usize > CONNECTIONS + 200,
        "the test needs {CONNECTIONS}+ descriptors (hard limit {own})"
    );
    // The agent starts with the soft limit a service manager gives by
    // default (1024): it must raise it itself.
    let (harness, ids) = start_with(
        &["--header-timeout", "60s"],
        HarnessOptions {
            nofile_soft_limit: Some(1024),
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    let path = format!("/metadata/identity/oauth2/token?{}", query(RESOURCE, None));
    let mut streams = Vec::with_capacity(CONNECTIONS);
    {
        let _in_alpha = ProcessCgroupGuard::enter(&harness.cgroup("apps/alpha"));
        for _ in 0..CONNECTIONS {
            let mut stream = TcpStream::connect(SocketAddr::V4(IMDS)).expect("connect");
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n").as_bytes())
                .expect("partial head");
            streams.push(stream);
        }
    }
    let peak = wait_for_peak(&harness, CONNECTIONS as f64, Duration::from_secs(30));
    let fds = harness
        .agent_pid()
        .and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map_or(0, Iterator::count);
    // Before the agent raised its limit, accept failed with EMFILE at about
    // 1,000 (and so did the metrics listener).
    let accept_failures = harness.agent_stdout().matches("accept failed").count();
    eprintln!(
        "RESULT {CONNECTIONS} connections: {peak} held at once by the agent ({fds} descriptors open, {accept_failures} accept failures logged)"
    );
    assert_eq!(
        peak, CONNECTIONS as f64,
        "the agent holds every connection at once"
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for stream in &mut streams {
        stream
            .write_all(b"Metadata: true\r\nConnection: close\r\n\r\n")
            .expect("rest of the head");
    }
    for mut stream in streams {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let (status, text) = read_response(&mut stream);
        *statuses.entry(status).or_default() += 1;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let report: Value = serde_json::json!({ "body": body });
        tally.check("held connection", &report, &ids.alpha.client_id);
    }
    eprintln!("RESULT {CONNECTIONS} connections answered: {statuses:?}");
    assert_eq!(
        statuses.get(&200).copied(),
        Some(CONNECTIONS),
        "{statuses:?}"
    );
    tally.report("concurrent_connections");
}

fn wait_for_peak(harness: &AgentHarness, target: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    let mut peak = 0.0f64;
    while Instant::now() < deadline {
        peak = peak.max(active(harness));
        if peak >= target {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    peak
}

#[test]
fn a_short_soak_keeps_the_agents_memory_flat() {
    if !preconditions_met("a_short_soak_keeps_the_agents_memory_flat") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let soak = |seconds| ProbeSpec {
        repeat: Duration::from_secs(seconds),
        interval: Duration::from_millis(5),
        ..token_probe(None)
    };
    // Warm-up: caches, buffers, allocator arenas.
    let warm = soak(3).run_in(&harness.cgroup("apps/alpha"));
    tally.check("warm-up", &warm, &ids.alpha.client_id);
    let baseline = harness.agent_rss_kib().expect("rss");
    let alpha = soak(20).spawn_in(&harness.cgroup("apps/alpha"));
    let beta = soak(20).spawn_in(&harness.cgroup("apps/beta"));
    let gamma = soak(20).spawn_in(&harness.cgroup("apps/gamma"));
    let mut samples = vec![baseline];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(2));
        samples.push(harness.agent_rss_kib().expect("rss"));
    }
    let reports = [finish(alpha), finish(beta), finish(gamma)];
    tally.check("alpha soak", &reports[0], &ids.alpha.client_id);
    tally.check("beta soak", &reports[1], &ids.beta.client_id);
    tally.check("gamma soak (no identity)", &reports[2], "none");
    let end = harness.agent_rss_kib().expect("rss");
    let total: u64 = reports
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "RESULT short soak: {total} requests, RSS KiB baseline {baseline} end {end} samples {samples:?}; outcomes {:?} {:?} {:?}",
        outcomes(&reports[0]),
        outcomes(&reports[1]),
        outcomes(&reports[2])
    );
    for (report, expected) in [
        (&reports[0], "200"),
        (&reports[1], "200"),
        (&reports[2], "400"),
    ] {
        let by = outcomes(report);
        assert_eq!(by.keys().collect::<Vec<_>>(), [expected], "{by:?}");
    }
    // Generous: allocator noise, never steady growth.
    assert!(
        end <= baseline * 2 + 16 * 1024,
        "RSS grew from {baseline} KiB to {end} KiB: {samples:?}"
    );
    tally.report("short_soak");
}
