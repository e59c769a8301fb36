//! [`KubernetesSource`]: the [`WorkloadSource`] of Kubernetes mode.
//!
//! Five watches feed reflector stores: this node's pods, AzureIdentity,
//! AzureIdentityBinding, AzurePodIdentityException and, in standard mode,
//! this node's AzureAssignedIdentity objects. Requests are answered from the
//! stores; the only waits are bounded: for a pod the watch has not delivered
//! yet (`--pod-wait`), and in standard mode for an assignment the controller
//! is completing (`--assignment-wait`).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{reflector, reflector::Store, watcher},
};
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    NODENAME_LABEL,
};
use tokio::{task::JoinHandle, time::Instant};
use tracing::{Instrument, debug, debug_span};

use super::{
    assignments::Assignments,
    catalog::{Catalog, Invalidator, TokenInvalidation},
    cgroup_path,
    events::{DenialEvents, IDENTITY_EVENT_INTERVAL, IdentityEvents},
    pods::{ContainerMatch, Pods, container_of, is_terminated},
    reflect::{self, SyncTracker},
};
use crate::{
    audit::AuditRecord,
    config::Mode,
    identity::{BoundIdentity, IdentityCatalog, NamespaceRule, RefusedIdentity},
    tokens::SecretSource,
    workloads::{Assignment, Unattributed, Workload, WorkloadSource},
};

/// Watch names, as in logs and readiness.
const PODS: &str = "pods";
const IDENTITIES: &str = "azureidentities";
const BINDINGS: &str = "azureidentitybindings";
const EXCEPTIONS: &str = "azurepodidentityexceptions";
const ASSIGNED: &str = "azureassignedidentities";

/// What the Kubernetes source needs to know.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This node's name: pods and assignments are watched for it only.
    pub node: String,
    /// standard (assignments required) or managed.
    pub mode: Mode,
    /// Namespace rule for bindings (`--force-namespaced`; managed mode).
    pub rule: NamespaceRule,
    /// How long a request from a pod the watch has not delivered yet waits.
    pub pod_wait: Duration,
    /// `--emit-denial-events`: at most one Event per pod and reason per
    /// this interval; `None` emits none.
    pub denial_events: Option<Duration>,
}

/// Workloads and identity objects from the Kubernetes API.
pub struct KubernetesSource {
    config: KubernetesConfig,
    pub(super) pods: Pods,
    catalog: Catalog,
    exceptions: Store<AzurePodIdentityException>,
    pub(super) assignments: Option<Assignments>,
    secrets: Arc<dyn SecretSource>,
    sync: Arc<SyncTracker>,
    events: Option<DenialEvents>,
    identity_events: IdentityEvents,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("config", &self.config)
            .field("pods", &self.pods)
            .field("pending", &self.sync.pending())
            .finish_non_exhaustive()
    }
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn workload_of(pod: &Pod, container: String) -> Workload {
    Workload {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        container,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    }
}

impl KubernetesSource {
    /// Starts the watches (on the current Tokio runtime). Secrets are read
    /// through `secrets`; cached tokens made stale by identity or binding
    /// changes are dropped through `tokens`.
    pub fn start(
        client: Client,
        config: KubernetesConfig,
        secrets: Arc<dyn SecretSource>,
        tokens: Arc<dyn TokenInvalidation>,
    ) -> Self {
        let standard = config.mode == Mode::Standard;
        let mut kinds = vec![PODS, IDENTITIES, BINDINGS, EXCEPTIONS];
        if standard {
            kinds.push(ASSIGNED);
        }
        let sync = Arc::new(SyncTracker::new(&kinds));
        let mut tasks = Vec::new();

        let (pod_store, pod_writer) = reflector::store::<Pod>();
        let pods = Pods::new(pod_store);
        let mut tracker = pods.tracker();
        tasks.push(tokio::spawn(reflect::run(
            PODS,
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", config.node)),
            pod_writer,
            sync.clone(),
            move |event| tracker.on_event(event),
        )));

        let invalidator = Arc::new(Mutex::new(Invalidator::new(tokens)));
        let (identity_store, identity_writer) = reflector::store::<AzureIdentity>();
        let (binding_store, binding_writer) = reflector::store::<AzureIdentityBinding>();
        {
            let invalidator = invalidator.clone();
            let store = identity_store.clone();
            tasks.push(tokio::spawn(reflect::run(
                IDENTITIES,
                Api::<AzureIdentity>::all(client.clone()),
                watcher::Config::default(),
                identity_writer,
                sync.clone(),
                move |event| {
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        invalidator
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .identities_changed(&store);
                    }
                },
            )));
        }
        {
            let store = binding_store.clone();
            tasks.push(tokio::spawn(reflect::run(
                BINDINGS,
                Api::<AzureIdentityBinding>::all(client.clone()),
                watcher::Config::default(),
                binding_writer,
                sync.clone(),
                move |event| {
                    if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                        invalidator
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .bindings_changed(&store);
                    }
                },
            )));
        }

        let (exceptions, exception_writer) = reflector::store::<AzurePodIdentityException>();
        tasks.push(tokio::spawn(reflect::run(
            EXCEPTIONS,
            Api::<AzurePodIdentityException>::all(client.clone()),
            watcher::Config::default(),
            exception_writer,
            sync.clone(),
            |_| {},
        )));

        let assignments = standard.then(|| {
            let (store, writer) = reflector::store::<AzureAssignedIdentity>();
            let assignments = Assignments::new(store, config.node.clone());
            let notify = assignments.clone();
            tasks.push(tokio::spawn(reflect::run(
                ASSIGNED,
                Api::<AzureAssignedIdentity>::all(client.clone()),
                watcher::Config::default().labels(&format!("{NODENAME_LABEL}={}", config.node)),
                writer,
                sync.clone(),
                move |event| notify.on_event(event),
            )));
            assignments
        });

        let events = config
            .denial_events
            .map(|interval| DenialEvents::new(client.clone(), config.node.clone(), interval));
        let identity_events =
            IdentityEvents::new(client.clone(), config.node.clone(), IDENTITY_EVENT_INTERVAL);
        Self {
            config,
            pods,
            catalog: Catalog::new(identity_store, binding_store),
            exceptions,
            assignments,
            secrets,
            sync,
            events,
            identity_events,
            tasks,
        }
    }

    /// Waits until every watch has completed its first list.
    pub async fn wait_synced(&self) {
        self.sync.wait().await;
    }

    /// The watches that have not completed their first list.
    pub fn pending_watches(&self) -> Vec<&'static str> {
        self.sync.pending()
    }

    /// Resolves a parsed cgroup to a workload, waiting (bounded) for the
    /// source to sync and for the pod to be delivered by the watch.
    async fn resolve(
        &self,
        parsed: &cgroup_path::PodCgroup,
        path: &Path,
    ) -> Result<Workload, Unattributed> {
        let started = Instant::now();
        let deadline = started + self.config.pod_wait;
        let uid = parsed.pod_uid.as_str();
        loop {
            let mut changes = self.pods.subscribe();
            changes.borrow_and_update();
            let expired = Instant::now() >= deadline;
            if !self.sync.is_synced() {
                if expired {
                    return Err(Unattributed::NotReady);
                }
                let _ = tokio::time::timeout_at(deadline, self.sync.wait()).await;
                continue;
            }
            if let Some(gone) = self.pods.deleted(uid) {
                return Err(Unattributed::PodGone {
                    namespace: gone.namespace,
                    name: gone.name,
                });
            }
            match self.pods.by_uid(uid) {
                Some(pod) if is_terminated(&pod) => {
                    return Err(Unattributed::PodGone {
                        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                        name: pod.metadata.name.clone().unwrap_or_default(),
                    });
                }
                Some(pod) => match container_of(&pod, parsed.container.as_ref()) {
                    ContainerMatch::Named(name) => return Ok(workload_of(&pod, name)),
                    ContainerMatch::Pod => return Ok(workload_of(&pod, String::new())),
                    // kubelet has not reported the new container yet: wait
                    // for its name, then settle for the pod.
                    ContainerMatch::Starting if expired => {
                        return Ok(workload_of(&pod, String::new()));
                    }
                    ContainerMatch::Starting => {}
                },
                None if expired => {
                    return Err(Unattributed::UnknownPod {
                        path: path.display().to_string(),
                        uid: uid.to_string(),
                        waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    });
                }
                None => debug!("pod not in the cache yet; waiting for the watch"),
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(deadline, changes.changed()).await {
                // The pod watch is gone (shutting down): wait out the bound.
                tokio::time::sleep_until(deadline).await;
            }
        }
    }
}

impl WorkloadSource for KubernetesSource {
    async fn workload(&self, cgroup_id: u64, cgroup_path: &Path) -> Result<Workload, Unattributed> {
        let parsed = cgroup_path::parse(cgroup_path).map_err(|error| {
            debug!(cgroup_id, %error, "not a pod's cgroup");
            Unattributed::UnknownCgroup {
                path: cgroup_path.display().to_string(),
            }
        })?;
        let span = debug_span!(
            "pod",
            cgroup_id,
            pod_uid = %parsed.pod_uid,
            container_id = parsed.container.as_ref().map(|c| c.id.as_str()).unwrap_or(""),
        );
        self.resolve(&parsed, cgroup_path).instrument(span).await
    }

    fn catalog(&self) -> Arc<dyn IdentityCatalog + Send + Sync> {
        Arc::new(self.catalog.clone())
    }

    fn namespace_rule(&self) -> NamespaceRule {
        self.config.rule
    }

    fn is_exception(&self, workload: &Workload) -> bool {
        self.exceptions
            .state()
            .iter()
            .filter(|e| e.metadata.namespace.as_deref() == Some(workload.namespace.as_str()))
            .any(|e| e.matches(&workload.labels))
    }

    async fn assignment(
        &self,
        workload: &Workload,
        bound: &BoundIdentity,
        wait: Duration,
    ) -> Assignment {
        match &self.assignments {
            Some(assignments) => assignments.wait(workload, bound, wait).await,
            // Managed mode: identities are assigned to the nodes by hand.
            None => Assignment::Ready,
        }
    }

    fn secrets(&self) -> Arc<dyn SecretSource> {
        self.secrets.clone()
    }

    fn is_ready(&self) -> bool {
        self.sync.is_synced()
    }

    fn on_denied(&self, workload: &Workload, record: &AuditRecord) {
        if let Some(events) = &self.events {
            events.denied(workload, record);
        }
    }

    fn on_identity_refused(&self, refused: &RefusedIdentity) {
        self.identity_events.refused(refused);
    }
}
