//! The pod's own network, end to end: SDK clients in pod network namespaces
//! joined to the node's by veth pairs, the agent on the node IP, IMDS beyond
//! the node, and egress network policy enforced on the host side of each
//! pod's veth as Calico's dataplane enforces it (`podid_tests::policy`).
//!
//! - The story podid's users know from aad-pod-identity: default-deny egress
//!   blocks the token; the shipped allow rule restores it; no rule for
//!   169.254.169.254 is ever needed.
//! - Zero-policy mode (`--listen-mode pod-netns`): every pod's veth under
//!   default-deny with no allow rule at all, and the SDKs still get their
//!   tokens, because the connection never leaves the pod.

mod hardening_support;

use std::{process::Command, time::Duration};

use hardening_support::{Tally, metric, status_body, token_probe};
use podid_agent::audit::Outcome;
use podid_tests::{
    harness::{AgentHarness, HarnessOptions, node_client, python_client, run_client_json},
    pod_network::NODE_IP,
    policy::{EgressPolicy, shipped_rules},
    privileged::{in_netns, preconditions_met},
    probe::ProbeSpec,
};
use serde_json::Value;

const SCOPE: &str = "https://vault.azure.net/.default";

fn repo(path: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// An SDK client command running in pod `index`'s network namespace.
fn in_pod(harness: &AgentHarness, index: usize, mut client: Command) -> Command {
    in_netns(&mut client, &harness.pod(index).netns.path());
    client
}

fn sdk(harness: &AgentHarness, pod: usize, cgroup: &str, client: Command) -> Value {
    run_client_json(
        in_pod(harness, pod, client),
        &harness.cgroup(cgroup),
        Duration::from_secs(90),
    )
}

fn token(result: &Value) -> &str {
    result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {result}"))
}

fn check_token(tally: &Tally, what: &str, result: &Value, expected: &str) {
    let report = serde_json::json!({ "access_token": token(result) });
    tally.check(what, &report, expected);
}

#[test]
fn default_deny_blocks_the_token_and_the_shipped_allow_rule_restores_it() {
    if !preconditions_met("default_deny_blocks_the_token_and_the_shipped_allow_rule_restores_it") {
        return;
    }
    let (harness, ids) = hardening_support::start_with(
        &[],
        HarnessOptions {
            pods: Some(1),
            ..HarnessOptions::default()
        },
    );
    let tally = Tally::default();
    let host_if = harness.pod(0).host_if.clone();

    // A namespace with default-deny egress: the agent on <node IP>:2579 is
    // unreachable, and the SDK reports IMDS as unreachable.
    EgressPolicy::apply(&host_if, &[]);
    let blocked = sdk(&harness, 0, "apps/alpha", python_client(None, SCOPE));
    assert!(blocked["token"].is_null(), "{blocked}");
    assert!(
        EgressPolicy::dropped(&host_if) > 0,
        "the policy dropped the SYNs"
    );

    // Each shipped policy, translated as written, restores the token. None
    // of them needs (or has) an allow rule for 169.254.169.254.
    for file in [
        "manifests/policies/kubernetes-networkpolicy.yaml",
        "manifests/policies/calico-networkpolicy.yaml",
        "manifests/policies/calico-globalnetworkpolicy.yaml",
    ] {
        let rules = shipped_rules(&repo(file));
        assert!(
            !rules
                .iter()
                .any(|r| r.contains("169.254.169.254") && r.ends_with("accept")),
            "{file}: {rules:?}"
        );
        EgressPolicy::apply(&host_if, &rules);
        let result = sdk(&harness, 0, "apps/alpha", python_client(None, SCOPE));
        check_token(&tally, file, &result, &ids.alpha.client_id);
    }
    let (from_pods, _) = harness.network.as_ref().expect("pod network").wire_counts();
    assert_eq!(from_pods, 0, "no pod packet reached IMDS");
    tally.report("shipped_policies");
}

fn zero_policy(pods: usize, args: &[&str]) -> (AgentHarness, hardening_support::Ids) {
    hardening_support::start_with(
        args,
        HarnessOptions {
            pods: Some(pods),
            pod_netns_mode: true,
            ..HarnessOptions::default()
        },
    )
}

/// Waits until the agent has `n` pod listeners open.
fn wait_for_listeners(harness: &AgentHarness, n: usize) {
    hardening_support::wait_for("the pod listeners", Duration::from_secs(30), || {
        (metric(&harness.metrics(), "podid_pod_listeners") >= n as f64).then_some(())
    });
}

#[test]
fn zero_policy_mode_needs_no_rule_at_all() {
    if !preconditions_met("zero_policy_mode_needs_no_rule_at_all") {
        return;
    }
    let (mut harness, ids) = zero_policy(3, &[]);
    let tally = Tally::default();
    // Every pod's veth: default-deny egress, and nothing allowed.
    for index in 0..3 {
        EgressPolicy::apply(&harness.pod(index).host_if.clone(), &[]);
    }
    wait_for_listeners(&harness, 3);

    let python = sdk(&harness, 0, "apps/alpha", python_client(None, SCOPE));
    check_token(&tally, "python, pod 0", &python, &ids.alpha.client_id);
    let node = sdk(&harness, 1, "apps/beta", node_client(None, SCOPE));
    check_token(&tally, "node, pod 1", &node, &ids.beta.client_id);
    // An unbound pod: the definite 400, from its own listener.
    let unbound =
        token_probe(None).run_in_pod(&harness.cgroup("apps/gamma"), &harness.pod(2).netns.path());
    tally.check("unbound", &unbound, "none");
    assert_eq!(status_body(&unbound).0, 400, "{unbound}");
    // A hostNetwork workload has no pod namespace: the node listener.
    let host = token_probe(None).run_in(&harness.cgroup("apps/beta"));
    tally.check("hostNetwork", &host, &ids.beta.client_id);
    assert_eq!(status_body(&host).0, 200, "{host}");
    assert_eq!(host["peer"], format!("{NODE_IP}:2579"), "{host}");
    // The pods' connections never met the policy.
    for index in 0..3 {
        assert_eq!(
            EgressPolicy::dropped(&harness.pod(index).host_if),
            0,
            "pod {index}"
        );
    }
    let records = harness.audit_records(4);
    assert!(
        records
            .iter()
            .any(|r| r.pod == "alpha" && r.outcome == Outcome::Issued),
        "{records:?}"
    );

    // A pod that asks before its listener exists is sent to the node
    // listener, which its policy blocks; the SDK's retries get through once
    // the listener is open (the agent scans every second).
    let late = harness.add_pod();
    EgressPolicy::apply(&harness.pod(late).host_if.clone(), &[]);
    let result = sdk(&harness, late, "apps/alpha", python_client(None, SCOPE));
    check_token(
        &tally,
        "a pod that asked early",
        &result,
        &ids.alpha.client_id,
    );
    tally.report("zero_policy");
}

#[test]
fn zero_policy_mode_keeps_the_hostile_cases_out() {
    if !preconditions_met("zero_policy_mode_keeps_the_hostile_cases_out") {
        return;
    }
    let (harness, ids) = zero_policy(2, &[]);
    let tally = Tally::default();
    wait_for_listeners(&harness, 2);
    let alpha = harness.cgroup("apps/alpha");
    let beta = harness.cgroup("apps/beta");
    let pod0 = harness.pod(0).netns.path();
    let pod1 = harness.pod(1).netns.path();

    // Its own listener, dialled directly: no kernel record, 403.
    let own = token_probe(None).run_in_pod(&alpha, &pod0);
    let listener: std::net::SocketAddrV4 = own["peer"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("redirected to a pod listener: {own}"));
    assert!(listener.ip().octets()[..2] == [127, 64], "{own}");
    tally.check("redirected", &own, &ids.alpha.client_id);
    let direct = ProbeSpec {
        connect: Some(listener),
        ..token_probe(None)
    }
    .run_in_pod(&alpha, &pod0);
    tally.check("direct", &direct, "none");
    assert_eq!(status_body(&direct).0, 403, "{direct}");
    // Another pod's listener address means nothing in a pod's own namespace.
    let other = ProbeSpec {
        connect: Some(listener),
        ..token_probe(None)
    }
    .run_in_pod(&beta, &pod1);
    tally.check("other pod's address", &other, "none");
    assert_eq!(other["errno"], libc::ECONNREFUSED, "{other}");
    // Another pod's identity by client id: 400, never that token.
    let named = token_probe(Some(&ids.alpha.client_id)).run_in_pod(&beta, &pod1);
    tally.check("names alpha", &named, &ids.beta.client_id);
    assert_eq!(status_body(&named).0, 400, "{named}");
    // A process that moves to another cgroup after connecting keeps the
    // connector's identity.
    let moved = ProbeSpec {
        move_to: Some(beta.clone()),
        ..token_probe(None)
    }
    .run_in_pod(&alpha, &pod0);
    tally.check("moved", &moved, &ids.alpha.client_id);
    assert_eq!(status_body(&moved).0, 200, "{moved}");
    let wire = harness.network.as_ref().expect("pod network").wire_counts();
    assert_eq!(wire.0, 0, "no pod packet reached IMDS");
    hardening_support::assert_no_direct_imds(&harness);
    tally.report("zero_policy_hostile");
}

/// Listener lifecycle at node scale: 250 pod namespaces.
#[test]
fn zero_policy_mode_at_250_pods() {
    if !preconditions_met("zero_policy_mode_at_250_pods") {
        return;
    }
    const PODS: usize = 250;
    let ids = hardening_support::Ids::new();
    let mut harness = AgentHarness::start_with(
        hardening_support::spec(&ids, &[]),
        HarnessOptions {
            pods: Some(0),
            pod_netns_mode: true,
            ..HarnessOptions::default()
        },
    );
    let before = harness.agent_rss_kib().unwrap_or(0);
    let started = std::time::Instant::now();
    for _ in 0..PODS {
        harness.add_pod();
    }
    let created = started.elapsed();
    let opening = std::time::Instant::now();
    wait_for_listeners(&harness, PODS);
    let opened = opening.elapsed();
    let after = harness.agent_rss_kib().unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", harness.agent_pid().expect("agent")))
        .map_or(0, |d| d.count());
    // The last pod gets its token through its own listener.
    let last = PODS - 1;
    let report = token_probe(None).run_in_pod(
        &harness.cgroup("apps/alpha"),
        &harness.pod(last).netns.path(),
    );
    assert_eq!(status_body(&report).0, 200, "{report}");
    eprintln!(
        "FIGURES pod listeners: {PODS} pod namespaces created in {created:?}; all listeners open {opened:?} later; agent RSS {before} KiB → {after} KiB; {fds} fds"
    );
    assert!(fds < PODS + 300, "{fds} descriptors");
}
