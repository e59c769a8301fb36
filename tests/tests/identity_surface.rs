//! The identity surface, through the real kernel redirect: a workload gets
//! exactly the identity bound to it, whatever it asks for and whatever the
//! AzureIdentity objects say. Never the node's own identity (the emulated
//! IMDS answers a request that names no identity with the VM's
//! system-assigned identity, and serves the "managed identity v2"
//! credential endpoints, so any leak shows up), never a Secret of another
//! namespace, never a request to an authority nobody allowed.
//!
//! Every harness here also fails on drop if the emulator issued any token
//! of the node's identity or answered its credential endpoints at all.

use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use podid_agent::audit::{AuditRecord, Outcome};
use podid_tests::{
    emulator::{
        EmulatorConfig, Endpoint, ManagedIdentity, RegisteredClient, is_node_token, token_claims,
    },
    harness::{AgentHarness, HarnessSpec, python_client, run_client_json},
    privileged::preconditions_met,
    probe::ProbeSpec,
};
use serde_json::Value;

const SCOPE: &str = "https://vault.azure.net/.default";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const SECRET: &str = "team-b-principal-secret-8f2d";
/// Where the "foreign" Entra ID authority listens (inside the harness's
/// network namespace).
const FOREIGN_AUTHORITY: &str = "127.0.0.2:8443";

struct Ids {
    by_resource: ManagedIdentity,
    kubelet: ManagedIdentity,
    principal: String,
}

fn workloads_yaml(ids: &Ids) -> String {
    format!(
        r#"
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: by-resource}}
spec: {{type: 0, resourceID: "{by_resource}"}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: by-resource}}
spec: {{azureIdentity: by-resource, selector: by-resource}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: by-resource, namespace: default, labels: {{aadpodidbinding: by-resource}}}}
spec: {{cgroup: apps/by-resource}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: kubelet}}
spec: {{type: 0, clientID: "{kubelet}"}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: kubelet}}
spec: {{azureIdentity: kubelet, selector: kubelet}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: kubelet, namespace: default, labels: {{aadpodidbinding: kubelet}}}}
spec: {{cgroup: apps/kubelet}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: foreign-authority}}
spec:
  type: 1
  tenantID: "{TENANT}"
  clientID: "{principal}"
  clientPassword: {{name: sp, namespace: default}}
  adEndpoint: "https://{FOREIGN_AUTHORITY}"
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: foreign-authority}}
spec: {{azureIdentity: foreign-authority, selector: foreign-authority}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: foreign-authority, namespace: default, labels: {{aadpodidbinding: foreign-authority}}}}
spec: {{cgroup: apps/foreign-authority}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: borrowed, namespace: team-a}}
spec:
  type: 1
  tenantID: "{TENANT}"
  clientID: "{principal}"
  clientPassword: {{name: sp, namespace: team-b}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: borrowed, namespace: team-a}}
spec: {{azureIdentity: borrowed, selector: borrowed}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: borrower, namespace: team-a, labels: {{aadpodidbinding: borrowed}}}}
spec: {{cgroup: apps/borrower}}
"#,
        by_resource = ids.by_resource.resource_id,
        kubelet = ids.kubelet.client_id,
        principal = ids.principal,
    )
}

/// The box: the emulated VM carries a system-assigned identity and the
/// kubelet's user-assigned one, which the agent is told is the node's own.
fn start_box(extra_args: &[&str]) -> (AgentHarness, Ids) {
    let ids = Ids {
        by_resource: ManagedIdentity::user_assigned("by-resource"),
        kubelet: ManagedIdentity::user_assigned("aks-agentpool-kubelet"),
        principal: podid_tests::emulator::random_guid(),
    };
    let mut agent_args: Vec<String> = vec![
        "--aad-authority".into(),
        "http://169.254.169.254".into(),
        "--node-identity".into(),
        ids.kubelet.client_id.to_uppercase(),
        "--same-namespace-secrets".into(),
    ];
    agent_args.extend(extra_args.iter().map(|s| s.to_string()));
    let harness = AgentHarness::start(HarnessSpec {
        workloads_yaml: workloads_yaml(&ids),
        cgroups: [
            "apps/by-resource",
            "apps/kubelet",
            "apps/foreign-authority",
            "apps/borrower",
        ]
        .map(String::from)
        .to_vec(),
        emulator: EmulatorConfig::default()
            .with_user_assigned(ids.by_resource.clone())
            .with_user_assigned(ids.kubelet.clone())
            .with_client(RegisteredClient::with_secret(
                TENANT,
                &ids.principal,
                SECRET,
            )),
        secrets: vec![
            // The team-b Secret exists and is valid: only the rules keep
            // team-a's identity from reading it.
            ("team-b/sp/clientsecret".into(), SECRET.as_bytes().to_vec()),
            ("default/sp/clientsecret".into(), SECRET.as_bytes().to_vec()),
        ],
        agent_args,
    });
    assert!(
        harness.emulator.system_assigned().is_some(),
        "the emulated VM has its own identity, so a leak would show"
    );
    (harness, ids)
}

fn appid(token: &str) -> String {
    token_claims(token).expect("emulator token")["appid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The Python SDK's default credential from `cgroup`: (token, error).
fn python_default(harness: &AgentHarness, cgroup: &str) -> Value {
    run_client_json(
        python_client(None, SCOPE),
        &harness.cgroup(cgroup),
        Duration::from_secs(60),
    )
}

fn last_record_of(harness: &AgentHarness, pod: &str) -> AuditRecord {
    harness.audit_record_where(&format!("a record for {pod}"), |r| r.pod == pod)
}

#[test]
fn a_user_assigned_identity_named_by_resource_id_is_asked_for_by_msi_res_id() {
    if !preconditions_met(
        "a_user_assigned_identity_named_by_resource_id_is_asked_for_by_msi_res_id",
    ) {
        return;
    }
    let (harness, ids) = start_box(&[]);
    let result = python_default(&harness, "apps/by-resource");
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {result}"));
    assert!(!is_node_token(token), "the node's identity: {result}");
    assert_eq!(appid(token), ids.by_resource.client_id);
    let record = last_record_of(&harness, "by-resource");
    assert_eq!(record.outcome, Outcome::Issued, "{record:?}");
    assert_eq!(record.identity, "default/by-resource");
    let imds: Vec<_> = harness
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Imds)
        .collect();
    assert_eq!(imds.len(), 1, "{imds:?}");
    assert_eq!(imds[0].client_id, ids.by_resource.client_id);
}

#[test]
fn the_node_identity_is_refused_to_an_identity_that_names_it() {
    if !preconditions_met("the_node_identity_is_refused_to_an_identity_that_names_it") {
        return;
    }
    let (harness, ids) = start_box(&[]);
    let result = run_client_json(
        python_client(Some(&ids.kubelet.client_id), SCOPE),
        &harness.cgroup("apps/kubelet"),
        Duration::from_secs(60),
    );
    assert!(result["token"].is_null(), "{result}");
    let record = last_record_of(&harness, "kubelet");
    assert_eq!(record.outcome, Outcome::IdentityRefused, "{record:?}");
    assert!(
        record.reason.contains("one of the node's own identities"),
        "{}",
        record.reason
    );
    assert_eq!(
        harness.emulator.calls(
            Endpoint::Imds,
            &ids.kubelet.client_id,
            "https://vault.azure.net"
        ),
        0
    );
    drop(harness);

    // The operator may allow it explicitly.
    let (harness, ids) = start_box(&["--allow-node-identities"]);
    let result = run_client_json(
        python_client(Some(&ids.kubelet.client_id), SCOPE),
        &harness.cgroup("apps/kubelet"),
        Duration::from_secs(60),
    );
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("allowed, so a token: {result}"));
    assert_eq!(appid(token), ids.kubelet.client_id);
}

/// Accepts connections on `addr` in the calling thread's network namespace
/// (the harness's), counting them.
fn counting_listener(addr: &str) -> Arc<AtomicU64> {
    let listener = TcpListener::bind(addr.parse::<SocketAddr>().expect("addr"))
        .expect("bind the foreign authority");
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    accepted
}

#[test]
fn a_foreign_authority_is_never_contacted_and_a_foreign_secret_never_read() {
    if !preconditions_met("a_foreign_authority_is_never_contacted_and_a_foreign_secret_never_read")
    {
        return;
    }
    let (harness, ids) = start_box(&[]);
    // 127.0.0.2 is on the namespace's loopback; the thread that binds runs
    // in the harness's namespace (the test's own thread).
    let contacted = counting_listener(FOREIGN_AUTHORITY);

    let result = python_default(&harness, "apps/foreign-authority");
    assert!(result["token"].is_null(), "{result}");
    let record = last_record_of(&harness, "foreign-authority");
    assert_eq!(record.outcome, Outcome::IdentityRefused, "{record:?}");
    assert!(
        record.reason.contains("not a known Entra ID authority"),
        "{}",
        record.reason
    );

    let result = python_default(&harness, "apps/borrower");
    assert!(result["token"].is_null(), "{result}");
    let record = last_record_of(&harness, "borrower");
    assert_eq!(record.outcome, Outcome::IdentityRefused, "{record:?}");
    assert!(
        record
            .reason
            .contains("team-b/sp, outside the identity's namespace team-a"),
        "{}",
        record.reason
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        contacted.load(Ordering::SeqCst),
        0,
        "the foreign authority was contacted"
    );
    let entra =
        harness.emulator.calls_to(Endpoint::EntraV1) + harness.emulator.calls_to(Endpoint::EntraV2);
    assert_eq!(
        entra, 0,
        "the principal's secret was used: {:?}",
        ids.principal
    );
}

/// A raw request from `cgroup` to IMDS: (status, body).
fn raw(harness: &AgentHarness, cgroup: &str, request: &str) -> (u16, Value) {
    let report = ProbeSpec {
        connect: Some(podid_tests::IMDS),
        raw: Some(request.to_string()),
        ..ProbeSpec::default()
    }
    .run_in(&harness.cgroup(cgroup));
    let status = report["status"].as_u64().unwrap_or(0) as u16;
    let body = report["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

#[test]
fn the_identity_namespace_is_closed_and_other_paths_follow_the_allowlist() {
    if !preconditions_met("the_identity_namespace_is_closed_and_other_paths_follow_the_allowlist") {
        return;
    }
    let (harness, _) = start_box(&[]);
    let get = |path: &str, metadata: bool| {
        let header = if metadata { "Metadata: true\r\n" } else { "" };
        raw(
            &harness,
            "apps/by-resource",
            &format!(
                "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{header}Connection: close\r\n\r\n"
            ),
        )
    };
    // MSAL.NET's v2 discovery probes without Metadata: 404 says "v1 only".
    for (path, metadata) in [
        (
            "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
            false,
        ),
        (
            "/metadata/identity/getplatformmetadata?cred-api-version=2.0",
            true,
        ),
        ("/metadata/identity/credential?cred-api-version=1.0", true),
        ("/metadata/identity", true),
        ("/METADATA/Identity/IssueCredential", true),
    ] {
        let (status, body) = get(path, metadata);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], "not_found", "{path}: {body}");
    }
    let body = r#"{"csr":"MIIB","attestation_token":"x"}"#;
    let (status, answer) = raw(
        &harness,
        "apps/by-resource",
        &format!(
            "POST /metadata/identity/issuecredential?cred-api-version=2.0 HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(status, 404, "{answer}");
    let blocked = harness
        .audit_records(6)
        .into_iter()
        .filter(|r| {
            r.outcome == Outcome::Blocked
                && r.path
                    .to_ascii_lowercase()
                    .starts_with("/metadata/identity")
        })
        .count();
    assert_eq!(
        blocked, 6,
        "each identity-namespace request is audited as blocked"
    );
    assert_eq!(
        harness
            .emulator
            .requests()
            .iter()
            .filter(|r| r.endpoint == Endpoint::ImdsCredential)
            .count(),
        0
    );

    // The default allowlist: instance metadata forwarded, with GET only.
    let (status, body) = get("/metadata/instance/compute?api-version=2021-02-01", true);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "podid-emulated-vm");
    let (status, _) = raw(
        &harness,
        "apps/by-resource",
        "POST /metadata/instance/compute?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 405);
    let (status, body) = get("/metadata/somethingelse?api-version=2021-02-01", true);
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        harness.emulator.calls_to(Endpoint::Instance),
        1,
        "only the allowed one went upstream"
    );
    drop(harness);

    // A narrower list: instance metadata is then not forwarded at all.
    let (harness, _) = start_box(&["--forward", "GET /metadata/versions"]);
    let (status, body) = raw(
        &harness,
        "apps/by-resource",
        "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(harness.emulator.calls_to(Endpoint::Instance), 0);
}
