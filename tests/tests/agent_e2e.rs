//! The agent end to end, in standalone mode, through the real kernel redirect,
//! on a pod network laid out as a CNI does (`podid_tests::pod_network`): real
//! SDK clients run in workload cgroups inside pod network namespaces, dial
//! 169.254.169.254, and the kernel sends them over their veth to the agent on
//! the node IP; the agent gets tokens from the emulator beyond the node. One
//! case (the Rust SDK) and the raw probes run in the node's own namespace,
//! as hostNetwork workloads do.

use std::{
    io::Write,
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use podid_agent::audit::{CacheUse, Outcome};
use podid_tests::{
    emulator::{EmulatorConfig, Endpoint, Fault, ManagedIdentity, token_claims},
    harness::{
        AgentHarness, HarnessOptions, HarnessSpec, node_client, python_client, run_client_json,
    },
    privileged::{ProcessCgroupGuard, in_netns, preconditions_met, workspace_binary},
    probe::ProbeSpec,
};
use serde_json::Value;

const SCOPE: &str = "https://vault.azure.net/.default";
const RESOURCE: &str = "https://vault.azure.net";

struct Ids {
    sql: ManagedIdentity,
    other: ManagedIdentity,
}

fn workloads_yaml(ids: &Ids) -> String {
    format!(
        r#"
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata:
  name: sqlpodidentity
spec:
  type: 0
  resourceID: {sql_res}
  clientID: {sql}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata:
  name: sqlpodidentity-binding
spec:
  azureIdentity: sqlpodidentity
  selector: sqlpodid
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata:
  name: other
spec:
  type: 0
  resourceID: {other_res}
  clientID: {other}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata:
  name: other-binding
spec:
  azureIdentity: other
  selector: otherpodid
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: reporting
  namespace: default
  labels: {{aadpodidbinding: sqlpodid}}
spec:
  cgroup: apps/reporting
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: billing
  namespace: default
  labels: {{aadpodidbinding: otherpodid}}
spec:
  cgroup: apps/billing
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: batch
  namespace: default
  labels: {{aadpodidbinding: nothing-binds-this}}
spec:
  cgroup: apps/batch
"#,
        sql = ids.sql.client_id,
        sql_res = ids.sql.resource_id,
        other = ids.other.client_id,
        other_res = ids.other.resource_id,
    )
}

fn harness(extra_args: &[&str]) -> (AgentHarness, Ids) {
    let ids = Ids {
        sql: ManagedIdentity::user_assigned("sqlpodidentity"),
        other: ManagedIdentity::user_assigned("other"),
    };
    let harness = AgentHarness::start_with(
        HarnessSpec {
            workloads_yaml: workloads_yaml(&ids),
            cgroups: [
                "apps/reporting",
                "apps/billing",
                "apps/batch",
                "apps/stranger",
            ]
            .map(String::from)
            .to_vec(),
            emulator: EmulatorConfig::default()
                .with_user_assigned(ids.sql.clone())
                .with_user_assigned(ids.other.clone()),
            secrets: Vec::new(),
            agent_args: extra_args.iter().map(|s| s.to_string()).collect(),
        },
        HarnessOptions {
            pods: Some(2),
            ..HarnessOptions::default()
        },
    );
    (harness, ids)
}

/// An SDK client run as a pod runs it: in its workload's cgroup, inside the
/// pod's network namespace (reporting in pod 0; billing and batch in pod 1).
fn sdk(harness: &AgentHarness, workload: &str, mut client: Command, timeout: Duration) -> Value {
    let pod = if workload == "apps/reporting" { 0 } else { 1 };
    in_netns(&mut client, &harness.pod(pod).netns.path());
    run_client_json(client, &harness.cgroup(workload), timeout)
}

fn token_of(result: &Value) -> &str {
    result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {result}"))
}

fn appid(token: &str) -> String {
    token_claims(token).expect("emulator token")["appid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn probe_json(spec: &ProbeSpec, harness: &AgentHarness, cgroup: &str) -> (u16, Value, Value) {
    let report = spec.run_in(&harness.cgroup(cgroup));
    let status = report["status"].as_u64().unwrap_or(0) as u16;
    let body: Value = report["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, body, report)
}

#[test]
fn python_sdk_gets_the_token_the_emulator_issued_for_its_identity() {
    if !preconditions_met("python_sdk_gets_the_token_the_emulator_issued_for_its_identity") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let timeout = Duration::from_secs(60);

    // Explicit client id.
    let explicit = sdk(
        &harness,
        "apps/reporting",
        python_client(Some(&ids.sql.client_id), SCOPE),
        timeout,
    );
    let token = token_of(&explicit).to_string();
    assert_eq!(appid(&token), ids.sql.client_id);
    let issued = harness.emulator.issued_tokens();
    assert!(
        issued.iter().any(|t| t.access_token == token
            && t.client_id == ids.sql.client_id
            && t.resource == RESOURCE),
        "the SDK got exactly a token the emulator issued for that client id"
    );

    // Default credential (no client id): the workload's bound identity, never the node's.
    let default = sdk(
        &harness,
        "apps/billing",
        python_client(None, SCOPE),
        timeout,
    );
    let token = token_of(&default);
    assert_eq!(appid(token), ids.other.client_id);
    assert_ne!(
        appid(token),
        harness
            .emulator
            .system_assigned()
            .expect("the VM has one")
            .client_id
    );

    let records = harness.audit_records(2);
    let issued: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Issued)
        .collect();
    assert_eq!(issued.len(), 2, "{records:#?}");
    assert_eq!(issued[0].pod, "reporting");
    assert_eq!(issued[0].identity, "default/sqlpodidentity");
    assert_eq!(issued[0].binding, "default/sqlpodidentity-binding");
    assert_eq!(issued[0].client_id, ids.sql.client_id);
    assert_eq!(issued[0].resource, RESOURCE);
    assert_eq!(issued[0].node, "e2e-node");
    assert_eq!(issued[0].token_sha256.len(), 12);
    assert!(issued[0].cgroup_id > 0);
    assert_eq!(issued[1].pod, "billing");
}

#[test]
fn node_sdk_gets_its_token_through_the_redirect() {
    if !preconditions_met("node_sdk_gets_its_token_through_the_redirect") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let result = sdk(
        &harness,
        "apps/reporting",
        node_client(Some(&ids.sql.client_id), SCOPE),
        Duration::from_secs(60),
    );
    assert_eq!(appid(token_of(&result)), ids.sql.client_id, "{result}");
}

#[test]
fn rust_sdk_gets_its_token_through_the_redirect() {
    if !preconditions_met("rust_sdk_gets_its_token_through_the_redirect") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let mut cmd = Command::new(workspace_binary("podid-rust-client"));
    cmd.arg(&ids.sql.client_id).arg(SCOPE);
    // The one SDK case in the node's (the agent's) own namespace, as a
    // hostNetwork pod runs.
    let result = run_client_json(
        cmd,
        &harness.cgroup("apps/reporting"),
        Duration::from_secs(60),
    );
    assert_eq!(appid(token_of(&result)), ids.sql.client_id, "{result}");
}

#[test]
fn definite_answers_for_unbound_wrong_and_unknown_callers() {
    if !preconditions_met("definite_answers_for_unbound_wrong_and_unknown_callers") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let query = format!("api-version=2018-02-01&resource={RESOURCE}");

    // A workload whose selector no binding has: 400 Identity not found, at once.
    let started = Instant::now();
    let (status, body, _) = probe_json(&ProbeSpec::token_request(&query), &harness, "apps/batch");
    let took = started.elapsed();
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(body["error_description"], "Identity not found");
    assert!(
        took < Duration::from_secs(1),
        "answered in {took:?}, not after a wait"
    );

    // The official SDK sees it as "identity unavailable" on its first request.
    let sdk = sdk(
        &harness,
        "apps/batch",
        python_client(None, SCOPE),
        Duration::from_secs(60),
    );
    assert!(sdk["error"].as_str().is_some(), "{sdk}");
    assert!(
        sdk["seconds"].as_f64().unwrap_or(99.0) < 5.0,
        "no retries on a definite 400: {sdk}"
    );

    // A bound workload asking for another identity's client id.
    let wrong = format!("{query}&client_id={}", ids.other.client_id);
    let (status, body, _) = probe_json(
        &ProbeSpec::token_request(&wrong),
        &harness,
        "apps/reporting",
    );
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("Identity not found"))
    );

    // A cgroup that is no workload at all.
    let (status, body, _) =
        probe_json(&ProbeSpec::token_request(&query), &harness, "apps/stranger");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "access_denied");

    let records = harness.audit_records(4);
    let reason_of = |pod: &str, outcome: Outcome| {
        records
            .iter()
            .find(|r| r.pod == pod && r.outcome == outcome)
            .unwrap_or_else(|| panic!("no {outcome:?} record for {pod:?}: {records:#?}"))
            .reason
            .clone()
    };
    assert!(
        reason_of("batch", Outcome::IdentityNotFound)
            .contains("no AzureIdentityBinding has selector")
    );
    assert!(reason_of("reporting", Outcome::IdentityNotFound).contains(&ids.other.client_id));
    let stranger = records
        .iter()
        .find(|r| r.outcome == Outcome::Unattributed)
        .expect("an unattributed record");
    assert!(stranger.reason.contains("apps/stranger"), "{stranger:?}");
    assert!(stranger.cgroup_id > 0);
    // No upstream call was made for any of these.
    assert_eq!(harness.emulator.calls_to(Endpoint::Imds), 0);
}

#[test]
fn tokens_are_cached_and_concurrent_misses_make_one_upstream_call() {
    if !preconditions_met("tokens_are_cached_and_concurrent_misses_make_one_upstream_call") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let query = format!("api-version=2018-02-01&resource={RESOURCE}");
    let (status, first, _) = probe_json(
        &ProbeSpec::token_request(&query),
        &harness,
        "apps/reporting",
    );
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        harness
            .emulator
            .calls(Endpoint::Imds, &ids.sql.client_id, RESOURCE),
        1
    );
    let (status, second, _) = probe_json(
        &ProbeSpec::token_request(&query),
        &harness,
        "apps/reporting",
    );
    assert_eq!(status, 200);
    assert_eq!(second["access_token"], first["access_token"]);
    assert_eq!(
        harness
            .emulator
            .calls(Endpoint::Imds, &ids.sql.client_id, RESOURCE),
        1
    );
    let records = harness.audit_records(2);
    assert_eq!(records[0].cache, CacheUse::Miss);
    assert_eq!(records[1].cache, CacheUse::Hit);

    // 200 connections at once for a cold key: one upstream call.
    let cold = "https://storage.azure.com/";
    let spec = ProbeSpec {
        concurrency: 200,
        ..ProbeSpec::token_request(&format!("api-version=2018-02-01&resource={cold}"))
    };
    let report = spec.run_in(&harness.cgroup("apps/reporting"));
    let results = report["results"].as_array().expect("200 results");
    assert_eq!(results.len(), 200);
    let tokens: std::collections::HashSet<_> = results
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 200, "{r}");
            let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            body["access_token"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(
        harness
            .emulator
            .calls(Endpoint::Imds, &ids.sql.client_id, cold),
        1
    );
}

#[test]
fn upstream_faults_are_retried_within_bounds_and_never_cross_identities() {
    if !preconditions_met("upstream_faults_are_retried_within_bounds_and_never_cross_identities") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let timeout = Duration::from_secs(90);
    let scope_for = |n: u32| format!("https://r{n}.example.com/.default");

    // 429 with Retry-After, then success.
    harness.emulator.inject(
        Fault::throttle(1)
            .times(1)
            .for_client(&ids.sql.client_id)
            .on(Endpoint::Imds),
    );
    let result = sdk(
        &harness,
        "apps/reporting",
        python_client(Some(&ids.sql.client_id), &scope_for(1)),
        timeout,
    );
    assert_eq!(appid(token_of(&result)), ids.sql.client_id);

    // 500 twice, then success.
    harness.emulator.inject(
        Fault::status(500)
            .times(2)
            .for_client(&ids.sql.client_id)
            .on(Endpoint::Imds),
    );
    let result = sdk(
        &harness,
        "apps/reporting",
        python_client(Some(&ids.sql.client_id), &scope_for(2)),
        timeout,
    );
    assert_eq!(appid(token_of(&result)), ids.sql.client_id);

    // A 2-second stall.
    harness.emulator.inject(
        Fault::delay(Duration::from_secs(2))
            .times(1)
            .for_client(&ids.sql.client_id)
            .on(Endpoint::Imds),
    );
    let result = sdk(
        &harness,
        "apps/reporting",
        python_client(Some(&ids.sql.client_id), &scope_for(3)),
        timeout,
    );
    assert_eq!(appid(token_of(&result)), ids.sql.client_id);

    // An outage of one identity while the other's token is cached: the
    // failing identity gets a retryable error, never the other's token.
    let query = |resource: &str| format!("api-version=2018-02-01&resource={resource}");
    let (status, other_body, _) = probe_json(
        &ProbeSpec::token_request(&query("https://r4.example.com")),
        &harness,
        "apps/billing",
    );
    assert_eq!(status, 200);
    harness.emulator.inject(
        Fault::status(503)
            .times(1000)
            .for_client(&ids.sql.client_id)
            .on(Endpoint::Imds),
    );
    let (status, body, report) = probe_json(
        &ProbeSpec::token_request(&query("https://r4.example.com")),
        &harness,
        "apps/reporting",
    );
    assert!(
        [429, 500, 502, 503, 504].contains(&status),
        "a status SDKs retry: {report}"
    );
    assert!(body.get("access_token").is_none());
    assert!(
        !report["body"]
            .as_str()
            .unwrap_or_default()
            .contains(other_body["access_token"].as_str().unwrap())
    );
    let head = report["head"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(head.contains("retry-after"), "{head}");
    harness.emulator.clear_faults();
}

#[test]
fn protocol_edge_cases_get_imds_statuses_and_json_bodies() {
    if !preconditions_met("protocol_edge_cases_get_imds_statuses_and_json_bodies") {
        return;
    }
    let (harness, _) = harness(&[]);
    let token_path =
        format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={RESOURCE}");
    let raw = |request: String| ProbeSpec {
        raw: Some(request),
        ..ProbeSpec::connect(podid_tests::IMDS)
    };
    let cases: Vec<(&str, ProbeSpec, u16, &str)> = vec![
        (
            "no Metadata header (SDK probe)",
            ProbeSpec {
                headers: vec![],
                ..ProbeSpec::token_request(&format!("api-version=2018-02-01&resource={RESOURCE}"))
            },
            400,
            "Required metadata header not specified",
        ),
        (
            "Node's probe: no Metadata, no query",
            raw("GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: x\r\n\r\n".into()),
            400,
            "Required metadata header not specified",
        ),
        (
            "X-Forwarded-For",
            ProbeSpec {
                headers: vec!["Metadata: true".into(), "X-Forwarded-For: 10.0.0.9".into()],
                ..ProbeSpec::token_request(&format!("api-version=2018-02-01&resource={RESOURCE}"))
            },
            400,
            "X-Forwarded-For",
        ),
        (
            "POST",
            raw(format!(
                "POST {token_path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n"
            )),
            405,
            "use GET",
        ),
        (
            "no resource",
            ProbeSpec::token_request("api-version=2018-02-01"),
            400,
            "audience",
        ),
        (
            "duplicate parameters",
            ProbeSpec::token_request(&format!(
                "api-version=2018-02-01&resource={RESOURCE}&resource=https://other"
            )),
            400,
            "Duplicate",
        ),
        (
            "oversized header",
            raw(format!(
                "GET {token_path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Big: {}\r\n\r\n",
                "a".repeat(20_000)
            )),
            431,
            "too large",
        ),
        (
            "malformed request line",
            raw("GARBAGE\r\n\r\n".into()),
            400,
            "Malformed",
        ),
        (
            "a path resembling the token path",
            raw("GET /metadata/identity/OAuth2/Token?resource=x HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n\r\n".into()),
            400,
            "Invalid request",
        ),
    ];
    for (name, spec, expected_status, expected_text) in cases {
        let (status, body, report) = probe_json(&spec, &harness, "apps/reporting");
        assert_eq!(status, expected_status, "{name}: {report}");
        assert!(
            body["error"].is_string()
                && body["error_description"]
                    .as_str()
                    .is_some_and(|d| d.to_lowercase().contains(&expected_text.to_lowercase())),
            "{name}: {report}"
        );
        let head = report["head"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            head.contains("content-type: application/json"),
            "{name}: {head}"
        );
    }
    // Every request left an audit record.
    let records = harness.audit_records(9);
    assert!(records.len() >= 9, "{records:#?}");
    assert!(records.iter().all(|r| r.outcome != Outcome::Issued));
}

#[test]
fn instance_metadata_is_proxied_or_blocked() {
    if !preconditions_met("instance_metadata_is_proxied_or_blocked") {
        return;
    }
    let path = "/metadata/instance?api-version=2021-02-01";
    let spec = ProbeSpec {
        connect: Some(podid_tests::IMDS),
        http_path: Some(path.into()),
        headers: vec!["Metadata: true".into()],
        ..ProbeSpec::default()
    };
    {
        let (harness, _) = harness(&[]);
        let (status, body, report) = probe_json(&spec, &harness, "apps/reporting");
        assert_eq!(status, 200, "{report}");
        assert!(body["compute"]["vmId"].is_string(), "{report}");
        // A path not on the forwarding allowlist: 404 from the agent, in
        // IMDS's error shape, and nothing goes upstream.
        let missing = ProbeSpec {
            http_path: Some("/doesnotexist".into()),
            ..spec.clone()
        };
        let (status, body, _) = probe_json(&missing, &harness, "apps/reporting");
        assert_eq!(status, 404);
        assert_eq!(body["error"], "not_found", "{body}");
        // Unattributed callers are not forwarded.
        let (status, _, _) = probe_json(&spec, &harness, "apps/stranger");
        assert_eq!(status, 403);
        assert_eq!(harness.emulator.calls_to(Endpoint::Instance), 1);
        let records = harness.audit_records(3);
        assert_eq!(records[0].outcome, Outcome::Proxied);
        assert_eq!(records[1].outcome, Outcome::Blocked);
        assert_eq!(
            records[1].pod, "reporting",
            "blocked requests are attributed too"
        );
    }
    let (harness, _) = harness(&["--block-instance-metadata"]);
    let (status, body, _) = probe_json(&spec, &harness, "apps/reporting");
    assert_eq!(status, 403);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("blocked")
    );
    assert_eq!(harness.emulator.calls_to(Endpoint::Instance), 0);
}

#[test]
fn metrics_and_the_audit_query_show_the_requests() {
    if !preconditions_met("metrics_and_the_audit_query_show_the_requests") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let query = format!("api-version=2018-02-01&resource={RESOURCE}");
    for _ in 0..3 {
        let (status, _, _) = probe_json(
            &ProbeSpec::token_request(&query),
            &harness,
            "apps/reporting",
        );
        assert_eq!(status, 200);
    }
    let (status, _, _) = probe_json(&ProbeSpec::token_request(&query), &harness, "apps/batch");
    assert_eq!(status, 400);
    harness.audit_records(4);

    let metrics = harness.metrics();
    for expected in [
        r#"podid_requests_total{namespace="default",identity="default/sqlpodidentity",outcome="issued",status="200"} 3"#,
        r#"podid_requests_total{namespace="default",identity="",outcome="identity_not_found",status="400"} 1"#,
        r#"podid_token_cache_lookups_total{result="hit"} 2"#,
        r#"podid_token_cache_lookups_total{result="miss"} 1"#,
        r#"podid_upstream_requests_total{upstream="imds",status="200"} 1"#,
        r#"podid_kernel_events_total{event="redirected"} 4"#,
        "podid_audit_records_lost_total 0",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("reporting"),
        "no pod names in metric labels"
    );

    // "Which pods got tokens for identity X in the last hour?"
    let out = Command::new(workspace_binary("podid-agent"))
        .args([
            "audit",
            "--identity",
            "default/sqlpodidentity",
            "--outcome",
            "issued",
            "--since",
            "1h",
            "--summary",
        ])
        .arg("--file")
        .arg(harness.audit_path())
        .output()
        .expect("podid-agent audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(
        rows[0].contains("reporting") && rows[0].contains("issued") && rows[0].contains(" 3 "),
        "{text}"
    );
    let out = Command::new(workspace_binary("podid-agent"))
        .args(["audit", "--pod", "batch"])
        .arg("--file")
        .arg(harness.audit_path())
        .output()
        .expect("podid-agent audit");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "identity_not_found");
    let _ = ids;
}

/// A client that hangs up while the agent waits for upstream still leaves
/// its audit record: the token was fetched for that pod whether or not the
/// answer reached it, and the audit must say so.
#[test]
fn a_client_that_hangs_up_before_the_answer_is_still_audited() {
    if !preconditions_met("a_client_that_hangs_up_before_the_answer_is_still_audited") {
        return;
    }
    let (harness, ids) = harness(&[]);
    let resource = "https://hangup.example.com";
    harness.emulator.inject(
        Fault::delay(Duration::from_millis(1_500))
            .times(1)
            .for_client(&ids.sql.client_id)
            .on(Endpoint::Imds),
    );
    {
        let _in_workload = ProcessCgroupGuard::enter(&harness.cgroup("apps/reporting"));
        let mut stream =
            TcpStream::connect(podid_tests::IMDS).expect("connect through the redirect");
        write!(
            stream,
            "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource} HTTP/1.1\r\n\
             Host: 169.254.169.254\r\nMetadata: true\r\n\r\n"
        )
        .expect("send the request");
        // Hang up once the agent is waiting on the (stalled) upstream call.
        let deadline = Instant::now() + Duration::from_secs(10);
        while harness.emulator.max_concurrent() == 0 {
            assert!(Instant::now() < deadline, "the agent never called upstream");
            std::thread::sleep(Duration::from_millis(10));
        }
        stream.shutdown(std::net::Shutdown::Both).expect("hang up");
    }
    let record = harness.audit_record_where("the request whose client hung up", |r| {
        r.resource == resource
    });
    assert_eq!(record.pod, "reporting");
    assert_eq!(record.client_id, ids.sql.client_id);
    assert_eq!(record.outcome, Outcome::Issued, "{record:?}");
    assert!(
        record
            .reason
            .contains("the client closed the connection before the answer"),
        "{record:?}"
    );
    assert_eq!(
        harness
            .emulator
            .calls(Endpoint::Imds, &ids.sql.client_id, resource),
        1
    );
}
