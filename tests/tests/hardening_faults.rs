//! Faults: the agent killed under load, upstream IMDS and Entra ID down,
//! slow or throttling, the API server's watch dropped or the API server
//! away, the audit disk full or read-only, a cgroup deleted while its
//! connection is in flight. None may produce a wrong-identity token, and all
//! must recover without restarting the agent (but for the kill itself).
//!
//! Privileged: `cargo test -p podid-tests --test hardening_faults -- --test-threads=1`.

mod hardening_support;

use std::{
    fs,
    time::{Duration, Instant},
};

use hardening_support::{
    RESOURCE, Tally, assert_no_direct_imds, metric, outcomes, query, start, start_with,
    status_body, token_probe, wait_for,
};
use k8s_openapi::api::core::v1::Pod;
use podid_agent::audit::Outcome;
use podid_tests::{
    emulator::{EmulatorConfig, Endpoint, Fault, ManagedIdentity},
    harness::{AgentHarness, HarnessOptions},
    kube::{KubeNodeHarness, KubeNodeSpec, PodCgroupLayout, identity_and_binding, running_pod},
    privileged::{MountGuard, cgroup_id_of, preconditions_met},
    probe::{ProbeSpec, finish},
};
use serde_json::Value;

fn load(seconds: u64) -> ProbeSpec {
    ProbeSpec {
        repeat: Duration::from_secs(seconds),
        interval: Duration::from_millis(2),
        connect_timeout: Some(Duration::from_millis(500)),
        ..token_probe(None)
    }
}

#[test]
fn agent_killed_under_load_refuses_then_resumes_on_the_same_pins() {
    if !preconditions_met("agent_killed_under_load_refuses_then_resumes_on_the_same_pins") {
        return;
    }
    let (mut harness, ids) = start(&[]);
    let tally = Tally::default();
    let alpha_load = load(9).spawn_in(&harness.cgroup("apps/alpha"));
    let beta_load = load(9).spawn_in(&harness.cgroup("apps/beta"));
    std::thread::sleep(Duration::from_secs(2));
    let pins_before = pinned(&harness);
    let first_pid = harness.agent_pid();
    harness.kill_agent();
    assert_eq!(
        pinned(&harness),
        pins_before,
        "SIGKILL leaves every pin in place"
    );

    // While the agent is down: a refused connection, never the real IMDS
    // (which, in this box, is reachable on 169.254.169.254:80).
    let down = token_probe(None).run_in(&harness.cgroup("apps/gamma"));
    assert_eq!(down["errno"], libc::ECONNREFUSED, "{down}");
    std::thread::sleep(Duration::from_millis(1500));

    harness.start_agent();
    assert_ne!(harness.agent_pid(), first_pid);
    let installed: Vec<Value> = harness
        .agent_stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "kernel redirect installed")
        .collect();
    assert_eq!(installed.len(), 2, "two starts");
    let attachments = installed[1]["attachments"].as_str().unwrap_or_default();
    // connect4, connect6 and sock_ops; on a pod network also the IMDS guard.
    let links = attachments.matches("(\"").count();
    assert!(
        links >= 3 && attachments.matches("Reused").count() == links,
        "the restarted agent reuses every pinned link: {attachments}"
    );
    assert_eq!(pinned(&harness), pins_before, "no new pins");

    let alpha = finish(alpha_load);
    let beta = finish(beta_load);
    tally.check("alpha under load", &alpha, &ids.alpha.client_id);
    tally.check("beta under load", &beta, &ids.beta.client_id);
    for (name, report) in [("alpha", &alpha), ("beta", &beta)] {
        let by = outcomes(report);
        eprintln!("RESULT kill under load, {name}: {by:?}");
        assert!(by.get("200").copied().unwrap_or(0) > 0, "{name}: {report}");
        assert!(
            by.get(&format!("errno:{}", libc::ECONNREFUSED))
                .copied()
                .unwrap_or(0)
                > 0,
            "{name} was refused while the agent was down: {by:?}"
        );
        let unexpected: Vec<_> = by
            .keys()
            .filter(|k| !matches!(k.as_str(), "200" | "errno:111" | "errno:104" | "error"))
            .collect();
        if !unexpected.is_empty() {
            let refusals: Vec<String> = harness
                .audit_records(1)
                .into_iter()
                .filter(|r| r.status != 200)
                .map(|r| format!("{:?} {} {}", r.outcome, r.status, r.reason))
                .collect();
            panic!("{name}: {by:?} ({report}); refusals in the audit: {refusals:#?}");
        }
    }
    // Served again, at once.
    let again = token_probe(None).run_in(&harness.cgroup("apps/alpha"));
    tally.check("alpha after restart", &again, &ids.alpha.client_id);
    assert_eq!(status_body(&again).0, 200);
    assert_no_direct_imds(&harness);
    tally.report("agent_killed");
}

fn pinned(harness: &AgentHarness) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![harness.pin_root()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// One token request for `resource` from `cgroup`, with its wall time.
fn ask(harness: &AgentHarness, cgroup: &str, resource: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let report = ProbeSpec::token_request(&query(resource, None)).run_in(&harness.cgroup(cgroup));
    let took = started.elapsed();
    let (status, _) = status_body(&report);
    (status, report, took)
}

#[test]
fn upstream_outages_slowness_and_throttling_never_cross_identities() {
    if !preconditions_met("upstream_outages_slowness_and_throttling_never_cross_identities") {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    let pid = harness.agent_pid();
    let retryable = [429, 500, 502, 503, 504];

    // alpha's token is cached before IMDS goes down.
    let (status, report, _) = ask(&harness, "apps/alpha", RESOURCE);
    tally.check("alpha warm-up", &report, &ids.alpha.client_id);
    assert_eq!(status, 200);

    let mut n = 0;
    let mut resource = || {
        n += 1;
        format!("https://r{n}.example.com")
    };
    let cases: Vec<(&str, Fault, &str, bool)> = vec![
        (
            "IMDS 500",
            Fault::status(500).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS 503",
            Fault::status(503).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS 429 with Retry-After",
            Fault::throttle(1).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS 410",
            Fault::status(410).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS 404 (updating)",
            Fault::status(404).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS drops connections",
            Fault::drop_connection().on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "IMDS stalls for 60 s",
            Fault::delay(Duration::from_secs(60)).on(Endpoint::Imds),
            "apps/beta",
            false,
        ),
        (
            "Entra ID 503",
            Fault::status(503).on(Endpoint::EntraV1),
            "apps/sp",
            false,
        ),
        (
            "Entra ID 429",
            Fault::throttle(1).on(Endpoint::EntraV1),
            "apps/sp",
            false,
        ),
        (
            "Entra ID drops connections",
            Fault::drop_connection().on(Endpoint::EntraV1),
            "apps/sp",
            false,
        ),
        // Faults that last only a few attempts: the agent's retries absorb them.
        (
            "IMDS 429 once",
            Fault::throttle(1).times(1).on(Endpoint::Imds),
            "apps/beta",
            true,
        ),
        (
            "IMDS 410 twice",
            Fault::status(410).times(2).on(Endpoint::Imds),
            "apps/beta",
            true,
        ),
        (
            "IMDS 500 once",
            Fault::status(500).times(1).on(Endpoint::Imds),
            "apps/beta",
            true,
        ),
        (
            "Entra ID 500 once",
            Fault::status(500).times(1).on(Endpoint::EntraV1),
            "apps/sp",
            true,
        ),
    ];
    for (name, fault, cgroup, absorbed) in cases {
        let expected = match cgroup {
            "apps/beta" => ids.beta.client_id.clone(),
            _ => ids.sp_client_id.clone(),
        };
        harness.emulator.inject(fault);
        let fresh = resource();
        let (status, report, took) = ask(&harness, cgroup, &fresh);
        tally.check(name, &report, &expected);
        eprintln!("RESULT {name}: {status} after {took:?}");
        if absorbed {
            assert_eq!(status, 200, "{name}: {report}");
        } else {
            assert!(
                retryable.contains(&status),
                "{name}: a status SDKs retry: {report}"
            );
            assert!(
                took < Duration::from_secs(40),
                "{name}: answered within the SDKs' 60 s, took {took:?}"
            );
            let head = report["head"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            assert!(head.contains("application/json"), "{name}: {head}");
            // The cached token of another identity keeps being served.
            let (status, cached, _) = ask(&harness, "apps/alpha", RESOURCE);
            tally.check("alpha from the cache", &cached, &ids.alpha.client_id);
            assert_eq!(status, 200, "{name}: the cached token is served: {cached}");
        }
        harness.emulator.clear_faults();
        // Recovery without a restart.
        let (status, report, _) = ask(&harness, cgroup, &fresh);
        tally.check("after the fault", &report, &expected);
        assert_eq!(status, 200, "{name}: recovered: {report}");
    }
    assert_eq!(harness.agent_pid(), pid, "never restarted");
    let records = harness.audit_records(1);
    assert!(records.iter().any(|r| r.outcome == Outcome::UpstreamError));
    assert_no_direct_imds(&harness);
    tally.report("upstream_faults");
}

#[test]
fn audit_disk_full_keeps_serving_counts_lost_records_and_recovers() {
    if !preconditions_met("audit_disk_full_keeps_serving_counts_lost_records_and_recovers") {
        return;
    }
    let disk = MountGuard::tmpfs("audit-full", 32 * 1024);
    let (harness, ids) = start_with(
        &[],
        HarnessOptions {
            audit_dir: Some(disk.path().to_path_buf()),
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    let pid = harness.agent_pid();
    let alpha = harness.cgroup("apps/alpha");
    let lost = || metric(&harness.metrics(), "podid_audit_records_lost_total");
    let written = || metric(&harness.metrics(), "podid_audit_records_written_total");

    let report = load(3).run_in(&alpha);
    tally.check("alpha while the disk fills", &report, &ids.alpha.client_id);
    let by = outcomes(&report);
    eprintln!("RESULT disk full: {by:?}, lost {}", lost());
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        ["200"],
        "every request served: {by:?}"
    );
    wait_for(
        "lost audit records to be counted",
        Duration::from_secs(10),
        || (lost() > 0.0).then_some(()),
    );
    let stderr = harness.agent_stderr();
    assert!(
        stderr.contains("audit records are being lost"),
        "stderr says so: {stderr}"
    );
    assert_eq!(
        stderr.matches("audit records are being lost").count(),
        1,
        "once per failure streak, not per record: {stderr}"
    );

    // What did reach the disk is whole lines only (a partly written record
    // is cut off again), so the file stays readable by `podid-agent audit`.
    let on_disk = harness.audit_records(0);
    assert!(!on_disk.is_empty() && on_disk.iter().all(|r| r.pod == "alpha"));
    assert!(
        fs::read_to_string(harness.audit_path()).is_ok_and(|t| t.ends_with('\n')),
        "the file ends with a whole line"
    );

    // Space comes back: the writer resumes by itself.
    let before = written();
    fs::OpenOptions::new()
        .write(true)
        .open(harness.audit_path())
        .and_then(|f| f.set_len(0))
        .expect("truncate the audit file");
    let report = load(1).run_in(&alpha);
    tally.check("alpha after space came back", &report, &ids.alpha.client_id);
    wait_for("the writer to resume", Duration::from_secs(10), || {
        (written() > before && harness.agent_stderr().contains("writable again")).then_some(())
    });
    assert_eq!(harness.agent_pid(), pid);
    tally.report("audit_disk_full");
}

#[test]
fn read_only_audit_directory_keeps_serving_and_recovers_when_writable() {
    if !preconditions_met("read_only_audit_directory_keeps_serving_and_recovers_when_writable") {
        return;
    }
    let disk = MountGuard::tmpfs("audit-ro", 1024 * 1024);
    let read_only = MountGuard::bind(disk.path(), disk.path(), true);
    let (harness, ids) = start_with(
        &[],
        HarnessOptions {
            audit_dir: Some(disk.path().to_path_buf()),
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    let alpha = harness.cgroup("apps/alpha");
    for _ in 0..5 {
        let report = token_probe(None).run_in(&alpha);
        tally.check("alpha, read-only audit dir", &report, &ids.alpha.client_id);
        assert_eq!(status_body(&report).0, 200, "{report}");
    }
    wait_for("lost records", Duration::from_secs(10), || {
        (metric(&harness.metrics(), "podid_audit_records_lost_total") >= 5.0).then_some(())
    });
    assert!(
        harness
            .agent_stderr()
            .contains("audit records are being lost")
    );
    assert!(!harness.audit_path().exists());

    read_only.set_read_only(false);
    let report = token_probe(None).run_in(&alpha);
    tally.check("alpha, writable again", &report, &ids.alpha.client_id);
    let records = harness.audit_records(1);
    assert!(
        !records.is_empty(),
        "the file is written once the directory is writable"
    );
    assert!(harness.agent_stderr().contains("writable again"));
    drop(harness);
    drop(read_only);
    tally.report("audit_read_only");
}

#[test]
fn a_cgroup_deleted_while_its_connection_is_in_flight_gets_no_other_identity() {
    if !preconditions_met(
        "a_cgroup_deleted_while_its_connection_is_in_flight_gets_no_other_identity",
    ) {
        return;
    }
    let (harness, ids) = start(&[]);
    let tally = Tally::default();
    // A child of alpha's cgroup (alpha's workload), connecting, then moving
    // to beta (so the cgroup can be removed), then sending its request.
    let ephemeral = harness.cgroup("apps/alpha/ephemeral");
    let dir = harness.dir().join("inflight");
    fs::create_dir_all(&dir).expect("mkdir");
    for round in 0..2 {
        fs::create_dir(&ephemeral).expect("create the ephemeral cgroup");
        let deleted_id = cgroup_id_of(&ephemeral);
        let (ready, go) = (
            dir.join(format!("ready{round}")),
            dir.join(format!("go{round}")),
        );
        let naming = if round == 0 {
            None
        } else {
            Some(ids.beta.client_id.as_str())
        };
        let probe = ProbeSpec {
            move_to: Some(harness.cgroup("apps/beta")),
            ready_file: Some(ready.clone()),
            wait_file: Some(go.clone()),
            ..token_probe(naming)
        }
        .spawn_in(&ephemeral);
        wait_for("the probe to connect", Duration::from_secs(10), || {
            ready.exists().then_some(())
        });
        fs::remove_dir(&ephemeral).expect("remove the (now empty) cgroup");
        fs::write(&go, "").expect("go");
        let report = finish(probe);
        tally.check("deleted cgroup", &report, &ids.alpha.client_id);
        let (status, body) = status_body(&report);
        eprintln!("RESULT cgroup deleted in flight (round {round}): {status} {body}");
        assert!(
            status == 403 || (status == 200 && naming.is_none()),
            "refused, or the deleted cgroup's own workload: {report}"
        );
        let records = harness.audit_records(round + 1);
        let record = records
            .iter()
            .rev()
            .find(|r| r.cgroup_id == deleted_id)
            .unwrap_or_else(|| panic!("a record for the deleted cgroup: {records:#?}"));
        assert_ne!(record.pod, "beta", "{record:?}");
    }
    assert_no_direct_imds(&harness);
    tally.report("cgroup_deleted");
}

#[test]
fn api_server_watch_drops_and_outages_never_cross_identities() {
    if !preconditions_met("api_server_watch_drops_and_outages_never_cross_identities") {
        return;
    }
    let alpha_id = ManagedIdentity::user_assigned("alpha-identity");
    let beta_id = ManagedIdentity::user_assigned("beta-identity");
    let mut harness = KubeNodeHarness::new(KubeNodeSpec {
        emulator: EmulatorConfig::default()
            .with_user_assigned(alpha_id.clone())
            .with_user_assigned(beta_id.clone()),
        agent_args: ["--mode", "managed", "--pod-wait", "1s"]
            .map(String::from)
            .to_vec(),
        ..KubeNodeSpec::default()
    });
    let tally = Tally::default();
    for (name, identity) in [("alpha", &alpha_id), ("beta", &beta_id)] {
        let (identity, binding) = identity_and_binding(
            "demo",
            &format!("{name}-identity"),
            &format!("{name}-binding"),
            name,
            identity,
        );
        harness.api.apply(&identity);
        harness.api.apply(&binding);
    }
    let uids = [
        "11111111-1111-4111-8111-111111111111",
        "22222222-2222-4222-8222-222222222222",
        "33333333-3333-4333-8333-333333333333",
    ];
    let containers: Vec<String> = ['1', '2', '3']
        .iter()
        .map(|c| std::iter::repeat_n(*c, 64).collect())
        .collect();
    harness.api.apply(&running_pod(
        "demo",
        "alpha-pod",
        uids[0],
        "alpha",
        "app",
        &containers[0],
    ));
    harness.start_agent();
    let pid = harness.agent_pid();
    let layout = PodCgroupLayout::SystemdBurstableContainerd;
    let alpha_cg = harness.pod_cgroup(layout, uids[0], &containers[0]);
    let beta_cg = harness.pod_cgroup(layout, uids[1], &containers[1]);
    let gamma_cg = harness.pod_cgroup(layout, uids[2], &containers[2]);
    let ask = |cgroup: &std::path::Path, expected: &str, what: &str| -> u16 {
        let report = token_probe(None).run_in(cgroup);
        tally.check(what, &report, expected);
        status_body(&report).0
    };
    assert_eq!(ask(&alpha_cg, &alpha_id.client_id, "alpha"), 200);

    // The watch is dropped; a pod created afterwards is still seen (the
    // agent resumes its watch).
    harness.api.drop_watches();
    harness.api.apply(&running_pod(
        "demo",
        "beta-pod",
        uids[1],
        "beta",
        "app",
        &containers[1],
    ));
    wait_for("beta's pod to be served", Duration::from_secs(20), || {
        (ask(&beta_cg, &beta_id.client_id, "beta after a watch drop") == 200).then_some(())
    });

    // The API server goes away. Known pods keep their identities; a pod
    // created meanwhile cannot be known, so it is refused, not guessed.
    harness.api.set_available(false);
    harness.api.apply(&running_pod(
        "demo",
        "gamma-pod",
        uids[2],
        "beta",
        "app",
        &containers[2],
    ));
    assert!(harness.api.delete::<Pod>(Some("demo"), "alpha-pod"));
    for _ in 0..3 {
        assert_eq!(
            ask(&beta_cg, &beta_id.client_id, "beta during the outage"),
            200
        );
        let status = ask(&gamma_cg, &beta_id.client_id, "gamma during the outage");
        assert_eq!(status, 403, "an unknown pod is refused");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Back, with its history compacted (the agent must list again).
    harness.api.compact();
    harness.api.set_available(true);
    wait_for("gamma's pod to be served", Duration::from_secs(30), || {
        (ask(&gamma_cg, &beta_id.client_id, "gamma after the outage") == 200).then_some(())
    });
    wait_for(
        "alpha's deletion to be seen",
        Duration::from_secs(30),
        || (ask(&alpha_cg, &alpha_id.client_id, "alpha after deletion") == 403).then_some(()),
    );
    assert_eq!(ask(&beta_cg, &beta_id.client_id, "beta at the end"), 200);
    assert_eq!(harness.agent_pid(), pid, "never restarted");
    tally.report("api_server_faults");
}
