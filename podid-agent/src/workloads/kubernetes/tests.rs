//! The Kubernetes source against an in-memory API server
//! (`podid_tests::kube::FakeApiServer`, behind a real `kube::Client` through
//! a tower-test mock pair): real watchers, reflectors, Secret reads, Events
//! and node patches, with the API server's behaviour (watch drops, `410
//! Gone`, outages) injected.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Secret},
    events::v1::Event as K8sEvent,
};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureAssignedIdentitySpec,
    AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, AzurePodIdentityException, AzurePodIdentityExceptionSpec,
    BEHAVIOR_ANNOTATION, Document, NODENAME_LABEL, SecretReference, parse_documents,
    validation::IdentityRules,
};
use podid_tests::{
    emulator::{Emulator, EmulatorConfig, ManagedIdentity, RegisteredClient, token_claims},
    kube::{FakeApiServer, PodCgroupLayout, pod_cgroup_path, schema},
};
use serde_json::json;

use super::*;
use crate::{
    audit::{AuditRecord, Outcome},
    config::Mode,
    identity::{NamespaceRule, NoIdentity, RequestedIdentity, bound_identities, choose},
    tokens::{
        Credential, ImdsSelector, NoopObserver, SecretError, SecretRef, TokenConfig, TokenService,
    },
    workloads::{Assignment, Unattributed, Workload, WorkloadSource},
};

const NODE: &str = "node-1";
const SELECTOR: &str = "sqlpodid";
const BOUND: Duration = Duration::from_secs(10);

/// The RBAC the chart grants the agent (manifests/tests/check_manifests.py
/// AGENT_PERMISSIONS): every call the source makes must be in it.
const AGENT_RBAC: &[(&str, &str, &str)] = &[
    ("list", "", "pods"),
    ("watch", "", "pods"),
    ("list", "aadpodidentity.k8s.io", "azureidentities"),
    ("watch", "aadpodidentity.k8s.io", "azureidentities"),
    ("list", "aadpodidentity.k8s.io", "azureidentitybindings"),
    ("watch", "aadpodidentity.k8s.io", "azureidentitybindings"),
    (
        "list",
        "aadpodidentity.k8s.io",
        "azurepodidentityexceptions",
    ),
    (
        "watch",
        "aadpodidentity.k8s.io",
        "azurepodidentityexceptions",
    ),
    ("list", "aadpodidentity.k8s.io", "azureassignedidentities"),
    ("watch", "aadpodidentity.k8s.io", "azureassignedidentities"),
    ("get", "", "secrets"),
    ("get", "", "nodes"),
    ("patch", "", "nodes"),
    ("create", "events.k8s.io", "events"),
    ("patch", "events.k8s.io", "events"),
];

fn assert_within_rbac(api: &FakeApiServer) {
    for (verb, group, resource) in api.permissions_used() {
        assert!(
            AGENT_RBAC.contains(&(verb.as_str(), group.as_str(), resource.as_str())),
            "the source used {verb} on {resource}.{group}, which the agent's RBAC does not grant"
        );
    }
}

/// Records `forget_identity` calls.
#[derive(Default)]
struct Forgotten(Mutex<Vec<String>>);

impl TokenInvalidation for Forgotten {
    fn forget_identity(&self, identity: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(identity.to_string());
    }
}

impl Forgotten {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Setup {
    mode: Mode,
    rule: NamespaceRule,
    pod_wait: Duration,
    events: Option<Duration>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            mode: Mode::Standard,
            rule: NamespaceRule::Cluster,
            pod_wait: Duration::from_secs(2),
            events: None,
        }
    }
}

fn start_with(
    api: &FakeApiServer,
    setup: Setup,
    tokens: Arc<dyn TokenInvalidation>,
) -> KubernetesSource {
    let client = api.client();
    KubernetesSource::start(
        client.clone(),
        KubernetesConfig {
            node: NODE.into(),
            mode: setup.mode,
            rule: setup.rule,
            pod_wait: setup.pod_wait,
            denial_events: setup.events,
        },
        Arc::new(KubeSecrets::new(client)),
        tokens,
    )
}

async fn start(api: &FakeApiServer, setup: Setup) -> (KubernetesSource, Arc<Forgotten>) {
    let forgotten = Arc::new(Forgotten::default());
    let source = start_with(api, setup, forgotten.clone());
    synced(&source).await;
    (source, forgotten)
}

async fn synced(source: &KubernetesSource) {
    tokio::time::timeout(BOUND, source.wait_synced())
        .await
        .unwrap_or_else(|_| panic!("not synced; pending: {:?}", source.pending_watches()));
}

/// Polls `condition` until it holds (bounded).
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn container_id(seed: char) -> String {
    std::iter::repeat_n(seed, 64).collect()
}

fn uid(n: u8) -> String {
    format!("0000000{n:x}-1111-4222-8333-444444444444")
}

/// A running pod on this node with containers (name, 64-hex id).
fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    selector: Option<&str>,
    containers: &[(&str, &str)],
) -> Pod {
    let labels: BTreeMap<String, String> = selector
        .map(|s| [("aadpodidbinding".to_string(), s.to_string())].into())
        .unwrap_or_default();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {
            "nodeName": NODE,
            "containers": containers.iter().map(|(n, _)| json!({"name": n})).collect::<Vec<_>>(),
        },
        "status": {
            "phase": "Running",
            "containerStatuses": containers.iter().map(|(n, id)| json!({
                "name": n, "containerID": format!("containerd://{id}"),
                "image": "app", "imageID": "", "ready": true, "restartCount": 0,
            })).collect::<Vec<_>>(),
        },
    }))
    .expect("pod")
}

fn cgroup(uid: &str, container: &str) -> PathBuf {
    PathBuf::from(pod_cgroup_path(
        PodCgroupLayout::SystemdBurstableContainerd,
        uid,
        container,
    ))
}

fn identity(namespace: &str, name: &str, client_id: &str) -> AzureIdentity {
    let mut identity = AzureIdentity::new(
        name,
        AzureIdentitySpec {
            client_id: client_id.into(),
            resource_id: format!(
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
            ..AzureIdentitySpec::default()
        },
    );
    identity.metadata.namespace = Some(namespace.into());
    identity
}

fn binding(namespace: &str, name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
    let mut binding = AzureIdentityBinding::new(
        name,
        AzureIdentityBindingSpec {
            azure_identity: identity.into(),
            selector: selector.into(),
            weight: None,
        },
    );
    binding.metadata.namespace = Some(namespace.into());
    binding
}

/// The controller's assignment of `identity` to `pod` on this node.
fn assigned(
    pod: &Pod,
    identity: &AzureIdentity,
    state: AssignedIdentityState,
) -> AzureAssignedIdentity {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let pod_ns = pod.metadata.namespace.clone().unwrap_or_default();
    let identity_name = identity.metadata.name.clone().unwrap_or_default();
    let mut object = AzureAssignedIdentity::new(
        &AzureAssignedIdentity::name_for(&pod_name, &pod_ns, &identity_name),
        AzureAssignedIdentitySpec {
            azure_identity_ref: Some(identity.clone()),
            azure_binding_ref: None,
            pod: pod_name,
            pod_namespace: pod_ns,
            nodename: NODE.into(),
            replicas: None,
        },
    );
    object.metadata.namespace = Some("default".into());
    object.metadata.labels = Some([(NODENAME_LABEL.to_string(), NODE.to_string())].into());
    object.status = Some(AzureAssignedIdentityStatus {
        available_replicas: 1,
        status: state.as_str().into(),
    });
    object
}

fn decide(
    source: &KubernetesSource,
    workload: &Workload,
    requested: &RequestedIdentity,
) -> Result<crate::identity::BoundIdentity, NoIdentity> {
    bound_identities(
        source.catalog().as_ref(),
        source.namespace_rule(),
        &IdentityRules::default(),
        &workload.namespace,
        &workload.labels,
    )
    .and_then(|bound| choose(&bound, requested))
}

fn repo_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The seed's objects: manifests/examples/azureidentity.yaml and
/// azureidentitybinding.yaml, unchanged.
const SEED_FILES: [&str; 2] = [
    "manifests/examples/azureidentity.yaml",
    "manifests/examples/azureidentitybinding.yaml",
];

fn crd_schema(kind: &str) -> serde_json::Value {
    let crd = podid_api::crds()
        .into_iter()
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no generated CRD for {kind}"));
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1")
        .expect("v1");
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("openAPIV3Schema"),
    )
    .expect("schema as JSON")
}

#[test]
fn seed_yaml_validates_against_the_generated_crd_schemas() {
    let mut kinds = Vec::new();
    for file in SEED_FILES {
        let text = repo_file(file);
        let object: serde_json::Value = serde_yaml::from_str(&text).expect("seed YAML parses");
        let kind = object["kind"].as_str().expect("kind").to_string();
        assert_eq!(object["apiVersion"], "aadpodidentity.k8s.io/v1", "{file}");
        let errors = schema::validate(&crd_schema(&kind), &object);
        assert!(
            errors.is_empty(),
            "{file} against the {kind} CRD: {errors:?}"
        );
        kinds.push(kind);
    }
    assert_eq!(kinds, ["AzureIdentity", "AzureIdentityBinding"]);

    // The seed's values are what the source will read.
    let identity: serde_json::Value =
        serde_yaml::from_str(&repo_file(SEED_FILES[0])).expect("yaml");
    assert_eq!(identity["spec"]["type"], 0);
    let binding: serde_json::Value = serde_yaml::from_str(&repo_file(SEED_FILES[1])).expect("yaml");
    assert_eq!(binding["spec"]["selector"], SELECTOR);

    // The same validation rejects what the API server would reject or prune,
    // so the check above can fail.
    let mut mistyped = identity.clone();
    mistyped["spec"]["type"] = json!("0");
    assert!(!schema::validate(&crd_schema("AzureIdentity"), &mistyped).is_empty());
    let mut misspelt = binding.clone();
    misspelt["spec"]["selectr"] = json!(SELECTOR);
    let errors = schema::validate(&crd_schema("AzureIdentityBinding"), &misspelt);
    assert_eq!(errors, ["spec.selectr: unknown field (would be pruned)"]);
}

/// The seed's identity and binding, parsed as the agent's types.
fn seed_objects() -> (AzureIdentity, AzureIdentityBinding) {
    let mut identity = None;
    let mut binding = None;
    for file in SEED_FILES {
        for document in parse_documents(&repo_file(file)).expect("seed documents") {
            match document {
                Document::Identity(i) => identity = Some(*i),
                Document::Binding(b) => binding = Some(*b),
                other => panic!("unexpected seed document {other:?}"),
            }
        }
    }
    (
        identity.expect("seed identity"),
        binding.expect("seed binding"),
    )
}

#[tokio::test]
async fn seed_binding_selects_its_identity_for_the_labelled_pod() {
    let api = FakeApiServer::new();
    let (seed_identity, seed_binding) = seed_objects();
    api.apply(&seed_identity);
    api.apply(&seed_binding);
    // Another identity and binding that must not be chosen.
    api.apply(&identity("demo", "other", "c-other"));
    api.apply(&binding("demo", "other-binding", "other", "otherpodid"));
    let app = container_id('a');
    let sidecar = container_id('b');
    let mut host = pod(
        "demo",
        "host-net",
        &uid(2),
        Some(SELECTOR),
        &[("agent", &container_id('c'))],
    );
    host.spec.as_mut().expect("spec").host_network = Some(true);
    api.apply(&pod(
        "demo",
        "sql-client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &app), ("sidecar", &sidecar)],
    ));
    api.apply(&host);
    api.apply(&pod(
        "demo",
        "unlabelled",
        &uid(3),
        None,
        &[("app", &container_id('d'))],
    ));
    let (source, _) = start(&api, Setup::default()).await;

    let workload = source
        .workload(1, &cgroup(&uid(1), &sidecar))
        .await
        .expect("attributed");
    assert_eq!(
        (
            workload.namespace.as_str(),
            workload.name.as_str(),
            workload.uid.as_str(),
            workload.container.as_str()
        ),
        ("demo", "sql-client", uid(1).as_str(), "sidecar")
    );
    let chosen = decide(&source, &workload, &RequestedIdentity::Any).expect("bound");
    assert_eq!(chosen.identity_key(), "demo/sqlpodidentity");
    assert_eq!(chosen.binding_key(), "demo/sqlpodidentity-binding");
    assert_eq!(chosen.identity.spec.client_id, seed_identity.spec.client_id);
    // Naming the other identity is refused: it is not bound to this pod.
    assert!(matches!(
        decide(
            &source,
            &workload,
            &RequestedIdentity::ClientId("c-other".into())
        ),
        Err(NoIdentity::NotBound { .. })
    ));

    // The pod's own cgroup (no container) and the sandbox count as the pod.
    let slice = cgroup(&uid(1), &app)
        .parent()
        .expect("pod slice")
        .to_path_buf();
    assert_eq!(source.workload(2, &slice).await.expect("pod").container, "");
    let sandbox = source
        .workload(3, &cgroup(&uid(1), &container_id('f')))
        .await
        .expect("sandbox");
    assert_eq!(
        (sandbox.name.as_str(), sandbox.container.as_str()),
        ("sql-client", "")
    );

    // A hostNetwork pod is attributed by its cgroup like any other.
    let host = source
        .workload(4, &cgroup(&uid(2), &container_id('c')))
        .await
        .expect("host network pod");
    assert_eq!(
        (host.name.as_str(), host.container.as_str()),
        ("host-net", "agent")
    );
    assert!(decide(&source, &host, &RequestedIdentity::Any).is_ok());

    // No label: a definite answer, no identity.
    let unlabelled = source
        .workload(5, &cgroup(&uid(3), &container_id('d')))
        .await
        .expect("pod");
    assert_eq!(
        decide(&source, &unlabelled, &RequestedIdentity::Any).unwrap_err(),
        NoIdentity::NoLabel
    );

    // Not a pod cgroup at all.
    assert!(matches!(
        source
            .workload(6, std::path::Path::new("system.slice/sshd.service"))
            .await,
        Err(Unattributed::UnknownCgroup { .. })
    ));
    // The watch asked only for this node's pods.
    assert!(
        api.calls()
            .iter()
            .any(|c| c.resource == "pods" && c.verb == "list")
    );
    assert_within_rbac(&api);
}

#[tokio::test]
async fn standard_mode_waits_on_a_created_assignment_until_it_is_assigned() {
    let api = FakeApiServer::new();
    let sql = identity("app", "sql", "c-sql");
    let client = pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    );
    api.apply(&sql);
    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    api.apply(&client);
    let (source, _) = start(&api, Setup::default()).await;
    let workload = source
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    let bound = decide(&source, &workload, &RequestedIdentity::Any).expect("bound");

    // No assignment at all: after the bound wait, the SDK is told to retry.
    assert_eq!(
        source
            .assignment(&workload, &bound, Duration::from_millis(200))
            .await,
        Assignment::Missing
    );
    // Created: still being assigned after the wait.
    api.apply(&assigned(&client, &sql, AssignedIdentityState::Created));
    eventually("the Created assignment in the cache", || {
        source
            .assignments
            .as_ref()
            .and_then(|a| a.state(&workload, &bound))
            == Some(AssignedIdentityState::Created)
    })
    .await;
    match source
        .assignment(&workload, &bound, Duration::from_millis(200))
        .await
    {
        Assignment::Pending { waited } => assert!(waited >= Duration::from_millis(200)),
        other => panic!("expected Pending, got {other:?}"),
    }
    // A request waiting while the controller completes the assignment gets
    // it as soon as the watch reports Assigned, within its wait.
    let waiting = {
        let workload = workload.clone();
        let bound = bound.clone();
        let source = &source;
        async move { source.assignment(&workload, &bound, BOUND).await }
    };
    let assign = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.apply(&assigned(&client, &sql, AssignedIdentityState::Assigned));
    };
    let (answer, ()) = tokio::join!(waiting, assign);
    assert_eq!(answer, Assignment::Ready);
    // Answered at once now that it is known.
    assert_eq!(
        tokio::time::timeout(
            BOUND,
            source.assignment(&workload, &bound, Duration::from_secs(3600))
        )
        .await,
        Ok(Assignment::Ready)
    );
    // An assignment of the identity under an older client id does not count.
    let mut changed = sql.clone();
    changed.spec.client_id = "c-new".into();
    api.apply(&changed);
    eventually("the changed identity", || {
        decide(&source, &workload, &RequestedIdentity::Any)
            .is_ok_and(|b| b.identity.spec.client_id == "c-new")
    })
    .await;
    let rebound = decide(&source, &workload, &RequestedIdentity::Any).expect("bound");
    assert_eq!(
        source
            .assignment(&workload, &rebound, Duration::from_millis(100))
            .await,
        Assignment::Missing
    );
    assert_within_rbac(&api);
}

#[tokio::test]
async fn managed_mode_goes_from_binding_to_identity_without_assignments() {
    let api = FakeApiServer::new();
    api.apply(&identity("app", "sql", "c-sql"));
    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    api.apply(&pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    ));
    let (source, _) = start(
        &api,
        Setup {
            mode: Mode::Managed,
            rule: NamespaceRule::Namespaced,
            ..Setup::default()
        },
    )
    .await;
    let workload = source
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    let bound = decide(&source, &workload, &RequestedIdentity::Any).expect("bound");
    assert_eq!(bound.identity_key(), "app/sql");
    // No AzureAssignedIdentity exists, and none is needed or watched.
    assert_eq!(
        tokio::time::timeout(
            BOUND,
            source.assignment(&workload, &bound, Duration::from_secs(3600))
        )
        .await,
        Ok(Assignment::Ready)
    );
    assert_eq!(api.count("list", "azureassignedidentities"), 0);
    assert_eq!(api.count("watch", "azureassignedidentities"), 0);
    assert_within_rbac(&api);
}

#[tokio::test]
async fn namespaced_mode_refuses_a_cross_namespace_binding() {
    let api = FakeApiServer::new();
    api.apply(&identity("team-a", "shared", "c-a"));
    api.apply(&binding("team-a", "shared-binding", "shared", "shared"));
    let mut annotated = identity("team-a", "private", "c-p");
    annotated.metadata.annotations =
        Some([(BEHAVIOR_ANNOTATION.to_string(), "namespaced".to_string())].into());
    api.apply(&annotated);
    api.apply(&binding("team-a", "private-binding", "private", "private"));
    api.apply(&pod(
        "team-b",
        "intruder",
        &uid(1),
        Some("shared"),
        &[("app", &container_id('a'))],
    ));
    api.apply(&pod(
        "team-b",
        "snoop",
        &uid(2),
        Some("private"),
        &[("app", &container_id('b'))],
    ));
    api.apply(&pod(
        "team-a",
        "owner",
        &uid(3),
        Some("shared"),
        &[("app", &container_id('c'))],
    ));

    let (forced, _) = start(
        &api,
        Setup {
            rule: NamespaceRule::Namespaced,
            ..Setup::default()
        },
    )
    .await;
    let intruder = forced
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    let refused = decide(&forced, &intruder, &RequestedIdentity::Any).unwrap_err();
    assert!(
        refused.to_string().contains("another namespace"),
        "{refused}"
    );
    let owner = forced
        .workload(3, &cgroup(&uid(3), &container_id('c')))
        .await
        .expect("pod");
    assert_eq!(
        decide(&forced, &owner, &RequestedIdentity::Any)
            .expect("own namespace")
            .identity_key(),
        "team-a/shared"
    );

    // Without --force-namespaced the cross-namespace binding selects the pod
    // (aad-pod-identity's standard mode), but the annotated identity does not.
    let (cluster, _) = start(&api, Setup::default()).await;
    let intruder = cluster
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    assert!(decide(&cluster, &intruder, &RequestedIdentity::Any).is_ok());
    let snoop = cluster
        .workload(2, &cgroup(&uid(2), &container_id('b')))
        .await
        .expect("pod");
    let refused = decide(&cluster, &snoop, &RequestedIdentity::Any).unwrap_err();
    assert!(refused.to_string().contains("is namespaced"), "{refused}");
}

#[tokio::test]
async fn exception_pods_are_recognised_in_their_namespace_only() {
    let api = FakeApiServer::new();
    let mut exception = AzurePodIdentityException::new(
        "mic",
        AzurePodIdentityExceptionSpec {
            pod_labels: [("app".to_string(), "mic".to_string())].into(),
        },
    );
    exception.metadata.namespace = Some("kube-system".into());
    api.apply(&exception);
    let mut mic = pod(
        "kube-system",
        "mic-0",
        &uid(1),
        None,
        &[("mic", &container_id('a'))],
    );
    mic.metadata.labels = Some([("app".to_string(), "MIC".to_string())].into());
    let mut lookalike = mic.clone();
    lookalike.metadata.namespace = Some("default".into());
    lookalike.metadata.name = Some("mic-lookalike".into());
    lookalike.metadata.uid = Some(uid(2));
    api.apply(&mic);
    api.apply(&lookalike);
    let (source, _) = start(&api, Setup::default()).await;
    let excepted = source
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    assert!(source.is_exception(&excepted));
    let other = source
        .workload(2, &cgroup(&uid(2), &container_id('a')))
        .await
        .expect("pod");
    assert!(
        !source.is_exception(&other),
        "exceptions apply in their own namespace only"
    );

    api.delete::<AzurePodIdentityException>(Some("kube-system"), "mic");
    eventually("the exception to go", || !source.is_exception(&excepted)).await;
}

#[tokio::test]
async fn a_relabelled_pod_gets_the_identity_of_its_new_selector() {
    let api = FakeApiServer::new();
    api.apply(&identity("app", "sql", "c-sql"));
    api.apply(&identity("app", "blob", "c-blob"));
    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    api.apply(&binding("app", "blob-binding", "blob", "blobpodid"));
    let mut client = pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    );
    api.apply(&client);
    let (source, _) = start(&api, Setup::default()).await;
    let path = cgroup(&uid(1), &container_id('a'));
    let before = source.workload(1, &path).await.expect("pod");
    assert_eq!(
        decide(&source, &before, &RequestedIdentity::Any)
            .expect("bound")
            .identity_key(),
        "app/sql"
    );

    client.metadata.labels =
        Some([("aadpodidbinding".to_string(), "blobpodid".to_string())].into());
    api.apply(&client);
    let mut after = before.clone();
    for _ in 0..500 {
        after = source.workload(1, &path).await.expect("pod");
        if after.labels != before.labels {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        decide(&source, &after, &RequestedIdentity::Any)
            .expect("bound")
            .identity_key(),
        "app/blob"
    );
    assert!(matches!(
        decide(
            &source,
            &after,
            &RequestedIdentity::ClientId("c-sql".into())
        ),
        Err(NoIdentity::NotBound { .. })
    ));
}

#[tokio::test]
async fn deleting_a_binding_or_identity_stops_tokens_and_drops_cached_ones() {
    let managed = ManagedIdentity::user_assigned("sql");
    let emulator = Emulator::start(EmulatorConfig::default().with_user_assigned(managed.clone()))
        .await
        .expect("emulator on loopback");
    let api = FakeApiServer::new();
    let sql = identity("app", "sql", &managed.client_id);
    api.apply(&sql);
    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    api.apply(&pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    ));
    let client = api.client();
    let tokens = Arc::new(
        TokenService::new(
            TokenConfig {
                imds_endpoint: emulator.url(),
                aad_authority: emulator.url(),
                ..TokenConfig::default()
            },
            Arc::new(KubeSecrets::new(client.clone())),
            Arc::new(NoopObserver),
        )
        .expect("token service"),
    );
    let source = start_with(
        &api,
        Setup {
            mode: Mode::Managed,
            ..Setup::default()
        },
        tokens.clone(),
    );
    synced(&source).await;
    let workload = source
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");

    // What the server does per request: decide, then get the token.
    let request = |source: &KubernetesSource| {
        decide(source, &workload, &RequestedIdentity::Any).map(|bound| {
            (
                bound.identity_key(),
                Credential::ManagedIdentity {
                    selector: ImdsSelector::ClientId(bound.identity.spec.client_id.clone()),
                },
            )
        })
    };
    let (key, credential) = request(&source).expect("bound");
    tokens
        .token(&key, &credential, "https://vault.azure.net")
        .await
        .expect("token");
    assert_eq!(tokens.cached_len(), 1);

    api.delete::<AzureIdentityBinding>(Some("app"), "sql-binding");
    eventually("the binding deletion to drop the cached token", || {
        tokens.cached_len() == 0
    })
    .await;
    assert!(matches!(
        request(&source),
        Err(NoIdentity::NoBinding { .. })
    ));

    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    eventually("the binding to come back", || request(&source).is_ok()).await;
    let (key, credential) = request(&source).expect("bound again");
    let (token, _) = tokens
        .token(&key, &credential, "https://vault.azure.net")
        .await
        .expect("token");
    assert_eq!(
        token_claims(&token.access_token).expect("claims")["appid"],
        managed.client_id.as_str()
    );
    assert_eq!(tokens.cached_len(), 1);

    api.delete::<AzureIdentity>(Some("app"), "sql");
    eventually("the identity deletion to drop the cached token", || {
        tokens.cached_len() == 0
    })
    .await;
    let refused = request(&source).unwrap_err();
    assert!(refused.to_string().contains("does not exist"), "{refused}");
}

#[tokio::test]
async fn a_service_principal_identity_reads_its_secret() {
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let app_id = "5b7c3a1e-0d2f-4e6a-9c8b-1a2b3c4d5e6f";
    let emulator = Emulator::start(
        EmulatorConfig::default()
            .with_client(RegisteredClient::with_secret(tenant, app_id, "s3cret")),
    )
    .await
    .expect("emulator on loopback");
    let api = FakeApiServer::new();
    let mut sp = identity("app", "sp", app_id);
    sp.spec.identity_type = 1;
    sp.spec.tenant_id = tenant.into();
    sp.spec.resource_id.clear();
    sp.spec.client_password = Some(SecretReference {
        name: "sp-secret".into(),
        namespace: "app".into(),
    });
    api.apply(&sp);
    api.apply(&binding("app", "sp-binding", "sp", SELECTOR));
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "sp-secret", "namespace": "app"},
        // "s3cret\n" as `kubectl create secret --from-file` would store it.
        "data": {"clientSecret": "czNjcmV0Cg=="},
    }))
    .expect("secret");
    api.apply(&secret);
    let (source, _) = start(&api, Setup::default()).await;
    let tokens = TokenService::new(
        TokenConfig {
            imds_endpoint: emulator.url(),
            aad_authority: emulator.url(),
            ..TokenConfig::default()
        },
        source.secrets(),
        Arc::new(NoopObserver),
    )
    .expect("token service");
    let credential = Credential::ClientSecret {
        tenant_id: tenant.into(),
        client_id: app_id.into(),
        authority: None,
        secret: SecretRef {
            namespace: "app".into(),
            name: "sp-secret".into(),
        },
    };
    let (token, _) = tokens
        .token("app/sp", &credential, "https://vault.azure.net")
        .await
        .expect("service principal token");
    assert_eq!(
        token_claims(&token.access_token).expect("claims")["appid"],
        app_id
    );
    assert!(api.calls().iter().any(|c| c.verb == "get"
        && c.resource == "secrets"
        && c.name.as_deref() == Some("sp-secret")));

    // Certificates: keys `certificate` and `password`.
    let cert: Secret = serde_json::from_value(json!({
        "metadata": {"name": "sp-cert", "namespace": "app"},
        "data": {"certificate": "MIIBAg==", "password": "cHc="},
    }))
    .expect("secret");
    api.apply(&cert);
    let (bundle, password) = source
        .secrets()
        .certificate(&SecretRef {
            namespace: "app".into(),
            name: "sp-cert".into(),
        })
        .await
        .expect("certificate");
    assert_eq!(
        (bundle.as_slice(), password.as_str()),
        (&[0x30, 0x82, 0x01, 0x02][..], "pw")
    );

    // Missing Secrets and keys, and names that are not Kubernetes names.
    let missing = |name: &str| SecretRef {
        namespace: "app".into(),
        name: name.into(),
    };
    assert!(matches!(
        source.secrets().client_secret(&missing("absent")).await,
        Err(SecretError::NotFound { .. })
    ));
    assert!(matches!(
        source.secrets().certificate(&missing("sp-secret")).await,
        Err(SecretError::MissingKey { .. })
    ));
    assert!(matches!(
        source
            .secrets()
            .client_secret(&missing("../../nodes/x"))
            .await,
        Err(SecretError::InvalidName { .. })
    ));
    assert_within_rbac(&api);
}

#[tokio::test]
async fn a_dropped_watch_resumes_and_a_relist_catches_up() {
    let api = FakeApiServer::new();
    api.apply(&identity("app", "sql", "c-sql"));
    api.apply(&binding("app", "sql-binding", "sql", SELECTOR));
    let doomed = pod(
        "app",
        "doomed",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    );
    api.apply(&doomed);
    let (source, forgotten) = start(&api, Setup::default()).await;
    let doomed_path = cgroup(&uid(1), &container_id('a'));
    source.workload(1, &doomed_path).await.expect("pod");

    // A dropped watch resumes from where it was: no relist needed.
    let lists = api.count("list", "pods");
    api.drop_watches();
    api.apply(&pod(
        "app",
        "second",
        &uid(2),
        Some(SELECTOR),
        &[("app", &container_id('b'))],
    ));
    let second = source
        .workload(2, &cgroup(&uid(2), &container_id('b')))
        .await
        .expect("delivered after the drop");
    assert_eq!(second.name, "second");
    assert_eq!(
        api.count("list", "pods"),
        lists,
        "resumed without listing again"
    );

    // An outage during which objects change, and the history is compacted:
    // the watches restart with backoff, get 410 Gone, and list again.
    api.set_available(false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.delete::<AzureIdentityBinding>(Some("app"), "sql-binding");
    api.delete::<Pod>(Some("app"), "doomed");
    api.apply(&pod(
        "app",
        "third",
        &uid(3),
        Some(SELECTOR),
        &[("app", &container_id('c'))],
    ));
    api.compact();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_available(true);
    eventually("the relist to drop the deleted binding's tokens", || {
        forgotten.all().contains(&"app/sql".to_string())
    })
    .await;
    eventually("the pods relist", || api.count("list", "pods") > lists).await;
    let third = source
        .workload(3, &cgroup(&uid(3), &container_id('c')))
        .await
        .expect("relisted pod");
    assert_eq!(third.name, "third");
    assert!(matches!(
        decide(&source, &third, &RequestedIdentity::Any),
        Err(NoIdentity::NoBinding { .. })
    ));
    // The pod deleted during the outage: its leftover connections get nothing.
    assert_eq!(
        source.workload(1, &doomed_path).await,
        Err(Unattributed::PodGone {
            namespace: "app".into(),
            name: "doomed".into()
        })
    );
    assert!(source.is_ready());
    assert!(
        api.calls().iter().any(|c| c.status == 503),
        "the outage was seen"
    );
    assert_within_rbac(&api);
}

#[tokio::test]
async fn a_starting_pod_waits_briefly_and_a_gone_pod_gets_a_definite_answer() {
    let api = FakeApiServer::new();
    let (source, _) = start(
        &api,
        Setup {
            pod_wait: Duration::from_secs(30),
            ..Setup::default()
        },
    )
    .await;
    // The request arrives before the watch delivers the pod: it waits.
    let path = cgroup(&uid(1), &container_id('a'));
    let delivered = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.apply(&pod(
            "app",
            "new",
            &uid(1),
            Some(SELECTOR),
            &[("app", &container_id('a'))],
        ));
    };
    let (found, ()) = tokio::join!(
        tokio::time::timeout(BOUND, source.workload(1, &path)),
        delivered
    );
    assert_eq!(found.expect("bounded").expect("pod").name, "new");

    // A container kubelet has not reported yet: wait for its name.
    let mut starting = pod(
        "app",
        "starting",
        &uid(2),
        None,
        &[("app", &container_id('b'))],
    );
    if let Some(status) = starting
        .status
        .as_mut()
        .and_then(|s| s.container_statuses.as_mut())
    {
        status[0].container_id = None;
    }
    api.apply(&starting);
    eventually("the starting pod", || source.pods.by_uid(&uid(2)).is_some()).await;
    let reported = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.apply(&pod(
            "app",
            "starting",
            &uid(2),
            None,
            &[("app", &container_id('b'))],
        ));
    };
    let starting_path = cgroup(&uid(2), &container_id('b'));
    let (found, ()) = tokio::join!(
        tokio::time::timeout(BOUND, source.workload(2, &starting_path)),
        reported
    );
    assert_eq!(found.expect("bounded").expect("pod").container, "app");

    // Deleted and terminated pods are answered at once, not after the wait.
    api.delete::<Pod>(Some("app"), "new");
    eventually("the deletion", || source.pods.deleted(&uid(1)).is_some()).await;
    assert_eq!(
        tokio::time::timeout(BOUND, source.workload(1, &path))
            .await
            .expect("at once"),
        Err(Unattributed::PodGone {
            namespace: "app".into(),
            name: "new".into()
        })
    );
    let mut finished = pod("app", "job", &uid(3), None, &[("app", &container_id('c'))]);
    if let Some(status) = finished.status.as_mut() {
        status.phase = Some("Succeeded".into());
    }
    api.apply(&finished);
    eventually("the finished pod", || source.pods.by_uid(&uid(3)).is_some()).await;
    assert!(matches!(
        tokio::time::timeout(
            BOUND,
            source.workload(3, &cgroup(&uid(3), &container_id('c')))
        )
        .await
        .expect("at once"),
        Err(Unattributed::PodGone { .. })
    ));
}

#[tokio::test]
async fn an_unknown_pod_gets_a_definite_answer_after_the_bounded_wait() {
    let api = FakeApiServer::new();
    let (source, _) = start(
        &api,
        Setup {
            pod_wait: Duration::from_millis(300),
            ..Setup::default()
        },
    )
    .await;
    match tokio::time::timeout(
        BOUND,
        source.workload(9, &cgroup(&uid(9), &container_id('e'))),
    )
    .await
    {
        Ok(Err(Unattributed::UnknownPod {
            uid: missing,
            waited_ms,
            ..
        })) => {
            assert_eq!(missing, uid(9));
            assert!(waited_ms >= 300, "waited {waited_ms} ms");
        }
        other => panic!("expected UnknownPod, got {other:?}"),
    }
}

#[tokio::test]
async fn readiness_waits_for_the_initial_sync() {
    let api = FakeApiServer::new();
    api.set_available(false);
    let forgotten = Arc::new(Forgotten::default());
    let source = start_with(
        &api,
        Setup {
            pod_wait: Duration::from_millis(200),
            ..Setup::default()
        },
        forgotten,
    );
    eventually("the first refused lists", || api.count("list", "pods") >= 1).await;
    assert!(!source.is_ready());
    assert_eq!(
        source
            .workload(1, &cgroup(&uid(1), &container_id('a')))
            .await,
        Err(Unattributed::NotReady)
    );
    api.set_available(true);
    synced(&source).await;
    assert!(source.is_ready());
    assert!(source.pending_watches().is_empty());
}

#[tokio::test]
async fn denial_events_go_to_the_pod_rate_limited_per_reason() {
    let api = FakeApiServer::new();
    api.apply(&pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    ));
    api.apply(&pod(
        "app",
        "other",
        &uid(2),
        Some(SELECTOR),
        &[("app", &container_id('b'))],
    ));
    let (source, _) = start(
        &api,
        Setup {
            events: Some(Duration::from_secs(3600)),
            ..Setup::default()
        },
    )
    .await;
    let client = source
        .workload(1, &cgroup(&uid(1), &container_id('a')))
        .await
        .expect("pod");
    let other = source
        .workload(2, &cgroup(&uid(2), &container_id('b')))
        .await
        .expect("pod");
    let record = |outcome: Outcome| AuditRecord {
        outcome,
        status: 400,
        container: "app".into(),
        reason: "no AzureIdentityBinding has selector \"sqlpodid\"".into(),
        ..AuditRecord::default()
    };
    for _ in 0..5 {
        source.on_denied(&client, &record(Outcome::IdentityNotFound));
    }
    source.on_denied(&client, &record(Outcome::AssignmentPending));
    source.on_denied(&other, &record(Outcome::IdentityNotFound));
    eventually("three events", || api.list::<K8sEvent>().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = api.list::<K8sEvent>();
    assert_eq!(events.len(), 3, "rate-limited per pod and reason");
    let mut seen: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let regarding = e.regarding.as_ref().expect("regarding");
            assert_eq!(regarding.kind.as_deref(), Some("Pod"));
            assert_eq!(e.metadata.namespace.as_deref(), Some("app"));
            assert!(e.note.as_deref().unwrap_or_default().contains("sqlpodid"));
            (
                regarding.name.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "client".to_string(),
                "IdentityAssignmentPending".to_string()
            ),
            ("client".to_string(), "IdentityNotFound".to_string()),
            ("other".to_string(), "IdentityNotFound".to_string()),
        ]
    );
    assert_within_rbac(&api);

    // Without the flag, nothing is published.
    let quiet_api = FakeApiServer::new();
    quiet_api.apply(&pod(
        "app",
        "client",
        &uid(1),
        Some(SELECTOR),
        &[("app", &container_id('a'))],
    ));
    let (quiet, _) = start(&quiet_api, Setup::default()).await;
    quiet.on_denied(&client, &record(Outcome::IdentityNotFound));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(quiet_api.count("create", "events"), 0);
}

#[tokio::test]
async fn the_startup_taint_is_removed_and_other_taints_kept() {
    let api = FakeApiServer::new();
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "spec": {"taints": [
            {"key": "podid.dev/agent-not-ready", "effect": "NoSchedule"},
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
        ]},
    }))
    .expect("node");
    api.apply(&node);
    let client = api.client();
    assert!(
        remove_taint(client.clone(), NODE, "podid.dev/agent-not-ready")
            .await
            .expect("removed")
    );
    let taints: Vec<String> = api
        .get::<Node>(None, NODE)
        .and_then(|n| n.spec)
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect();
    assert_eq!(taints, ["dedicated"]);
    // Idempotent: nothing left to remove.
    assert!(
        !remove_taint(client.clone(), NODE, "podid.dev/agent-not-ready")
            .await
            .expect("no-op")
    );
    // The last taint goes too, leaving none.
    assert!(
        remove_taint(client.clone(), NODE, "dedicated")
            .await
            .expect("removed")
    );
    assert!(
        api.get::<Node>(None, NODE)
            .and_then(|n| n.spec)
            .and_then(|s| s.taints)
            .is_none()
    );
    // A missing node is an error, not a silent success.
    assert!(remove_taint(client, "no-such-node", "x").await.is_err());
    assert_within_rbac(&api);
}
