//! The agent end to end in Kubernetes mode: the real `podid-agent` binary,
//! its kube-rs client talking HTTP to an in-memory API server, the real
//! kernel redirect, and the official Python `azure-identity` client running
//! in a cgroup laid out like a kubelet pod's. Attribution goes from the
//! kernel's record (cgroup id) through the cgroup path to the Pod object the
//! agent's watch delivered; nothing about the source address is used.
//!
//! Privileged: run one at a time as root,
//! `cargo test -p podid-tests --test kubernetes_e2e -- --test-threads=1`.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Node, Secret},
    events::v1::Event as K8sEvent,
};
use podid_agent::audit::{AuditRecord, Outcome};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, AzurePodIdentityException, AzurePodIdentityExceptionSpec, NODENAME_LABEL,
    SecretReference,
};
use podid_tests::{
    emulator::{EmulatorConfig, ManagedIdentity, token_claims},
    harness::{python_client, run_client_json},
    kube::{
        FakeApiServer, KubeNodeHarness, KubeNodeSpec, NODE_NAME, PodCgroupLayout,
        identity_and_binding, running_pod,
    },
    privileged::{cgroup_id_of, preconditions_met},
};

const SCOPE: &str = "https://vault.azure.net/.default";
const TAINT: &str = "podid.dev/agent-not-ready";
const SQL_UID: &str = "5f3e2d1c-0b9a-4876-a543-210fedcba987";
const STRANGER_UID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn container_id(seed: char) -> String {
    std::iter::repeat_n(seed, 64).collect()
}

/// The seed's identity and binding (`selector: sqlpodid`) for `sql`.
fn seed_objects(sql: &ManagedIdentity) -> (AzureIdentity, AzureIdentityBinding) {
    identity_and_binding(
        "demo",
        "sqlpodidentity",
        "sqlpodidentity-binding",
        "sqlpodid",
        sql,
    )
}

/// The controller's assignment of `identity` to the pod `demo/sql-client`.
fn assignment(identity: &AzureIdentity, state: AssignedIdentityState) -> AzureAssignedIdentity {
    let mut object = AzureAssignedIdentity::new(
        &AzureAssignedIdentity::name_for("sql-client", "demo", "sqlpodidentity"),
        AzureAssignedIdentitySpec {
            azure_identity_ref: Some(identity.clone()),
            azure_binding_ref: None,
            pod: "sql-client".into(),
            pod_namespace: "demo".into(),
            nodename: NODE_NAME.into(),
            replicas: None,
        },
    );
    object.metadata.namespace = Some("default".into());
    object.metadata.labels = Some([(NODENAME_LABEL.to_string(), NODE_NAME.to_string())].into());
    object.status = Some(AzureAssignedIdentityStatus {
        available_replicas: 1,
        status: state.as_str().into(),
    });
    object
}

/// The verbs × resources the chart grants the agent
/// (manifests/tests/check_manifests.py AGENT_PERMISSIONS).
fn granted() -> BTreeSet<(String, String, String)> {
    let group = "aadpodidentity.k8s.io";
    [
        ("list", "", "pods"),
        ("watch", "", "pods"),
        ("list", group, "azureidentities"),
        ("watch", group, "azureidentities"),
        ("list", group, "azureidentitybindings"),
        ("watch", group, "azureidentitybindings"),
        ("list", group, "azurepodidentityexceptions"),
        ("watch", group, "azurepodidentityexceptions"),
        ("list", group, "azureassignedidentities"),
        ("watch", group, "azureassignedidentities"),
        ("get", "", "secrets"),
        ("get", "", "nodes"),
        ("patch", "", "nodes"),
        ("create", "events.k8s.io", "events"),
        ("patch", "events.k8s.io", "events"),
    ]
    .into_iter()
    .map(|(v, g, r)| (v.to_string(), g.to_string(), r.to_string()))
    .collect()
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record_for<'a>(
    records: &'a [AuditRecord],
    pod: &str,
    outcome: Outcome,
) -> Option<&'a AuditRecord> {
    records
        .iter()
        .find(|r| r.pod == pod && r.outcome == outcome)
}

#[test]
fn python_sdk_gets_its_pods_token_attributed_from_the_kernel_record() {
    if !preconditions_met("python_sdk_gets_its_pods_token_attributed_from_the_kernel_record") {
        return;
    }
    let sql = ManagedIdentity::user_assigned("sqlpodidentity");
    let mut harness = KubeNodeHarness::new(KubeNodeSpec {
        emulator: EmulatorConfig::default().with_user_assigned(sql.clone()),
        agent_args: ["--startup-taint", TAINT, "--emit-denial-events"]
            .map(String::from)
            .to_vec(),
        node_taints: vec![
            (TAINT.into(), "NoSchedule".into()),
            ("dedicated".into(), "NoSchedule".into()),
        ],
        ..KubeNodeSpec::default()
    });
    let (identity, binding) = seed_objects(&sql);
    let sql_container = container_id('5');
    let stranger_container = container_id('a');
    let api: &FakeApiServer = &harness.api;
    api.apply(&identity);
    api.apply(&binding);
    api.apply(&running_pod(
        "demo",
        "sql-client",
        SQL_UID,
        "sqlpodid",
        "app",
        &sql_container,
    ));
    api.apply(&running_pod(
        "demo",
        "stranger",
        STRANGER_UID,
        "nothing-binds-this",
        "worker",
        &stranger_container,
    ));
    api.apply(&assignment(&identity, AssignedIdentityState::Assigned));

    harness.start_agent();
    // Ready means synced; then the startup taint goes, and only it.
    let taints = wait_for(
        "the startup taint to be removed",
        Duration::from_secs(10),
        || {
            let taints: Vec<String> = harness
                .api
                .get::<Node>(None, NODE_NAME)?
                .spec?
                .taints
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.key)
                .collect();
            (!taints.iter().any(|t| t == TAINT)).then_some(taints)
        },
    );
    assert_eq!(taints, ["dedicated"]);

    // The client runs in the pod's container cgroup, as kubelet (systemd
    // driver, Burstable) and containerd lay it out.
    let cgroup = harness.pod_cgroup(
        PodCgroupLayout::SystemdBurstableContainerd,
        SQL_UID,
        &sql_container,
    );
    let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {result}"));
    assert_eq!(
        token_claims(token).expect("emulator token")["appid"],
        sql.client_id.as_str()
    );

    let records = harness.audit_records(1);
    let issued = record_for(&records, "sql-client", Outcome::Issued)
        .unwrap_or_else(|| panic!("no issued record: {records:?}"));
    assert_eq!(issued.namespace, "demo");
    assert_eq!(issued.pod_uid, SQL_UID);
    assert_eq!(issued.container, "app");
    assert_eq!(issued.cgroup_id, cgroup_id_of(&cgroup));
    assert_eq!(issued.identity, "demo/sqlpodidentity");
    assert_eq!(issued.binding, "demo/sqlpodidentity-binding");
    assert_eq!(issued.client_id, sql.client_id);

    // A pod no binding selects (systemd driver, Guaranteed, CRI-O): a
    // definite answer at once, audited with its pod, and an Event on it.
    let cgroup = harness.pod_cgroup(
        PodCgroupLayout::SystemdGuaranteedCrio,
        STRANGER_UID,
        &stranger_container,
    );
    let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
    assert!(
        result["token"].is_null(),
        "the stranger got a token: {result}"
    );
    let records = harness.audit_records(2);
    let refused = record_for(&records, "stranger", Outcome::IdentityNotFound)
        .unwrap_or_else(|| panic!("no refusal record: {records:?}"));
    assert_eq!(
        (
            refused.namespace.as_str(),
            refused.pod_uid.as_str(),
            refused.container.as_str()
        ),
        ("demo", STRANGER_UID, "worker")
    );
    assert_eq!(refused.status, 400);
    let event = wait_for("the denial Event", Duration::from_secs(10), || {
        harness
            .api
            .list::<K8sEvent>()
            .into_iter()
            .find(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("stranger"))
    });
    assert_eq!(event.reason.as_deref(), Some("IdentityNotFound"));
    assert_eq!(
        event.regarding.as_ref().and_then(|r| r.uid.as_deref()),
        Some(STRANGER_UID)
    );

    // Everything the agent asked the API server is within its RBAC, and it
    // used the node-scoped watches.
    let used = harness.api.permissions_used();
    let granted = granted();
    assert!(
        used.is_subset(&granted),
        "beyond RBAC: {:?}",
        used.difference(&granted).collect::<Vec<_>>()
    );
    for needed in [
        ("watch", "", "pods"),
        ("patch", "", "nodes"),
        ("create", "events.k8s.io", "events"),
    ] {
        let needed = (
            needed.0.to_string(),
            needed.1.to_string(),
            needed.2.to_string(),
        );
        assert!(used.contains(&needed), "{needed:?} not used: {used:?}");
    }
}

#[test]
fn standard_mode_answers_retry_until_the_controller_assigns_the_identity() {
    if !preconditions_met("standard_mode_answers_retry_until_the_controller_assigns_the_identity") {
        return;
    }
    let sql = ManagedIdentity::user_assigned("sqlpodidentity");
    let mut harness = KubeNodeHarness::new(KubeNodeSpec {
        emulator: EmulatorConfig::default().with_user_assigned(sql.clone()),
        agent_args: ["--assignment-wait", "1s"].map(String::from).to_vec(),
        ..KubeNodeSpec::default()
    });
    let (identity, binding) = seed_objects(&sql);
    let sql_container = container_id('7');
    harness.api.apply(&identity);
    harness.api.apply(&binding);
    harness.api.apply(&running_pod(
        "demo",
        "sql-client",
        SQL_UID,
        "sqlpodid",
        "app",
        &sql_container,
    ));
    harness
        .api
        .apply(&assignment(&identity, AssignedIdentityState::Created));
    harness.start_agent();

    // The controller finishes the assignment while the SDK is retrying.
    let api = harness.api.clone();
    let assigned = assignment(&identity, AssignedIdentityState::Assigned);
    let controller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2500));
        api.apply(&assigned);
    });
    let cgroup = harness.pod_cgroup(PodCgroupLayout::CgroupfsBestEffort, SQL_UID, &sql_container);
    let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
    controller.join().expect("controller thread");
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token after the assignment: {result}"));
    assert_eq!(
        token_claims(token).expect("emulator token")["appid"],
        sql.client_id.as_str()
    );

    let records = harness.audit_records(2);
    let pending = record_for(&records, "sql-client", Outcome::AssignmentPending)
        .unwrap_or_else(|| panic!("no pending answer first: {records:?}"));
    assert_eq!(pending.status, 503);
    let issued = record_for(&records, "sql-client", Outcome::Issued)
        .unwrap_or_else(|| panic!("no token after the assignment: {records:?}"));
    assert_eq!(
        (issued.pod_uid.as_str(), issued.container.as_str()),
        (SQL_UID, "app")
    );
}

#[test]
fn refused_identities_are_audited_reported_on_the_object_and_never_read() {
    if !preconditions_met("refused_identities_are_audited_reported_on_the_object_and_never_read") {
        return;
    }
    let mut harness = KubeNodeHarness::new(KubeNodeSpec {
        agent_args: ["--mode", "managed"].map(String::from).to_vec(),
        ..KubeNodeSpec::default()
    });
    // A user-assigned identity that names no identity: the CRD allows it,
    // IMDS would answer it with the node's own identity.
    let mut names_nothing = AzureIdentity::new("names-nothing", AzureIdentitySpec::default());
    names_nothing.metadata.namespace = Some("demo".into());
    // A service principal in demo whose Secret is team-b's, which exists.
    let mut borrowed = AzureIdentity::new(
        "borrowed",
        AzureIdentitySpec {
            identity_type: 1,
            client_id: "2f6d1c1e-8a55-4c4e-9d8b-0c1f2e3d4a5b".into(),
            tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            client_password: Some(SecretReference {
                name: "sp".into(),
                namespace: "team-b".into(),
            }),
            ..AzureIdentitySpec::default()
        },
    );
    borrowed.metadata.namespace = Some("demo".into());
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sp", "namespace": "team-b"},
        "stringData": {"clientSecret": "team-b-only"},
    }))
    .expect("a Secret");
    harness.api.apply(&secret);
    let mut containers = Vec::new();
    for (n, (identity, uid)) in [
        (&names_nothing, "11111111-2222-4333-8444-555555555551"),
        (&borrowed, "11111111-2222-4333-8444-555555555552"),
    ]
    .into_iter()
    .enumerate()
    {
        let name = identity.metadata.name.clone().unwrap_or_default();
        let mut binding = AzureIdentityBinding::new(
            &name,
            AzureIdentityBindingSpec {
                azure_identity: name.clone(),
                selector: name.clone(),
                weight: None,
            },
        );
        binding.metadata.namespace = Some("demo".into());
        harness.api.apply(identity);
        harness.api.apply(&binding);
        let container = container_id(char::from(b'b' + n as u8));
        harness.api.apply(&running_pod(
            "demo",
            &format!("{name}-pod"),
            uid,
            &name,
            "app",
            &container,
        ));
        containers.push((name, uid, container));
    }
    harness.start_agent();
    harness.api.clear_calls();

    for (name, uid, container) in &containers {
        let cgroup =
            harness.pod_cgroup(PodCgroupLayout::SystemdBurstableContainerd, uid, container);
        let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
        assert!(result["token"].is_null(), "{name}: {result}");
        let records = harness.audit_records(1);
        let refused = record_for(&records, &format!("{name}-pod"), Outcome::IdentityRefused)
            .unwrap_or_else(|| panic!("{name}: no refusal record: {records:?}"));
        assert_eq!(refused.status, 400);
        let event = wait_for("the IdentityRefused Event", Duration::from_secs(10), || {
            harness.api.list::<K8sEvent>().into_iter().find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("AzureIdentity")
            })
        });
        assert_eq!(event.reason.as_deref(), Some("IdentityRefused"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        let note = event.note.unwrap_or_default();
        assert!(note.starts_with("podid gives no pod a token"), "{note}");
    }
    let reasons: Vec<String> = harness
        .audit_records(2)
        .into_iter()
        .filter(|r| r.outcome == Outcome::IdentityRefused)
        .map(|r| r.reason)
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("must name itself by clientID or resourceID")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("team-b/sp, outside the identity's namespace demo")),
        "{reasons:?}"
    );
    let secret_reads: Vec<_> = harness
        .api
        .calls()
        .into_iter()
        .filter(|c| c.resource == "secrets")
        .collect();
    assert!(
        secret_reads.is_empty(),
        "a Secret was read: {secret_reads:?}"
    );
    assert_eq!(
        harness
            .emulator
            .calls_to(podid_tests::emulator::Endpoint::Imds),
        0,
        "nothing was asked of IMDS"
    );
}

#[test]
fn only_exception_pods_get_the_node_identity_and_it_is_audited_as_such() {
    if !preconditions_met("only_exception_pods_get_the_node_identity_and_it_is_audited_as_such") {
        return;
    }
    let mut harness = KubeNodeHarness::new(KubeNodeSpec {
        agent_args: ["--mode", "managed"].map(String::from).to_vec(),
        node_identity_expected: true,
        ..KubeNodeSpec::default()
    });
    let node = harness
        .emulator
        .system_assigned()
        .expect("the emulated VM has its own identity");
    let mut exception = AzurePodIdentityException::new(
        "node-addons",
        AzurePodIdentityExceptionSpec {
            pod_labels: [("app".to_string(), "node-addon".to_string())].into(),
        },
    );
    exception.metadata.namespace = Some("kube-system".into());
    harness.api.apply(&exception);
    let addon_uid = "22222222-3333-4444-8555-666666666661";
    let lookalike_uid = "22222222-3333-4444-8555-666666666662";
    for (namespace, name, uid, container) in [
        ("kube-system", "addon", addon_uid, container_id('c')),
        ("demo", "lookalike", lookalike_uid, container_id('d')),
    ] {
        let mut pod = running_pod(namespace, name, uid, "unbound", "app", &container);
        pod.metadata
            .labels
            .get_or_insert_default()
            .insert("app".into(), "NODE-ADDON".into());
        harness.api.apply(&pod);
    }
    harness.start_agent();

    let cgroup = harness.pod_cgroup(
        PodCgroupLayout::SystemdBurstableContainerd,
        addon_uid,
        &container_id('c'),
    );
    let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
    let token = result["token"]
        .as_str()
        .unwrap_or_else(|| panic!("the exception pod gets the node identity: {result}"));
    assert!(podid_tests::emulator::is_node_token(token));
    assert_eq!(
        token_claims(token).expect("emulator token")["appid"],
        node.client_id.as_str()
    );
    let records = harness.audit_records(1);
    let issued = record_for(&records, "addon", Outcome::Issued)
        .unwrap_or_else(|| panic!("no issued record: {records:?}"));
    assert_eq!(issued.identity, "node");
    assert!(
        issued.reason.contains("AzurePodIdentityException"),
        "{}",
        issued.reason
    );

    // The same label in another namespace is no exception (exceptions are
    // per namespace), and the pod has no binding.
    let cgroup = harness.pod_cgroup(
        PodCgroupLayout::SystemdBurstableContainerd,
        lookalike_uid,
        &container_id('d'),
    );
    let result = run_client_json(python_client(None, SCOPE), &cgroup, Duration::from_secs(60));
    assert!(result["token"].is_null(), "{result}");
    let records = harness.audit_records(2);
    assert!(
        record_for(&records, "lookalike", Outcome::IdentityNotFound).is_some(),
        "{records:?}"
    );
    let node_tokens = harness
        .emulator
        .issued_tokens()
        .into_iter()
        .filter(|t| podid_tests::emulator::is_node_token(&t.access_token))
        .count();
    assert_eq!(node_tokens, 1, "exactly the exception pod's");
}
