//! A test cluster for the controller: the in-memory API server, the ARM
//! emulator, nodes on VMs and scale sets, identities, bindings and pods,
//! and controllers wired to them. Used by `tests/controller*.rs` and by
//! `podid-bench-controller`.

use std::{
    collections::BTreeSet,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, NodeSpec, Pod, PodSpec, PodStatus};
use kube::{Resource, ResourceExt};
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec,
    AzureIdentitySpec, POD_LABEL,
};
use podid_controller::{
    Controller, ControllerConfig, LeaderElector, LeaseConfig, Metrics,
    arm::{ArmClient, ArmOptions, HyperTransport, ImdsCredential},
};
use tokio::sync::watch;
use url::Url;

use super::{ArmEmulator, EmulatorConfig, ResourceKind, apiserver::ApiServer, uami_id};

/// Subscription of every emulated resource.
pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-00000000cafe";
/// Resource group of the nodes' VMs and scale sets.
pub const NODE_RESOURCE_GROUP: &str = "MC_podid_nodes";
/// Resource group of the identities.
pub const IDENTITY_RESOURCE_GROUP: &str = "podid-identities";
/// Namespace of pods, identities and bindings.
pub const NAMESPACE: &str = "default";

/// API server + ARM emulator.
pub struct TestCluster {
    /// The Kubernetes API.
    pub api: ApiServer,
    /// Azure Resource Manager.
    pub arm: ArmEmulator,
}

/// A controller running its loop in the background.
pub struct Running {
    /// The controller.
    pub controller: Arc<Controller>,
    /// Its leadership (tests flip it, or an elector drives it).
    pub leading: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the loop and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// Kills the loop at once (a crashed replica).
    pub fn kill(self) {
        self.task.abort();
    }
}

/// A user-assigned identity's resource ID in the identity resource group.
pub fn identity_id(name: &str) -> String {
    uami_id(SUBSCRIPTION, IDENTITY_RESOURCE_GROUP, name)
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn versions<K: Resource>(
    objects: impl IntoIterator<Item = K>,
) -> BTreeSet<(String, String, String)> {
    objects
        .into_iter()
        .map(|o| {
            (
                o.namespace().unwrap_or_default(),
                o.name_any(),
                o.resource_version().unwrap_or_default(),
            )
        })
        .collect()
}

impl TestCluster {
    /// Starts the emulator; the API server starts empty.
    pub async fn start(config: EmulatorConfig) -> Self {
        let arm = ArmEmulator::start(config)
            .await
            .unwrap_or_else(|e| panic!("starting the ARM emulator: {e}"));
        TestCluster {
            api: ApiServer::new(),
            arm,
        }
    }

    /// ARM client options pointing at the emulator, with short polls.
    pub fn arm_options(&self) -> ArmOptions {
        let mut options = ArmOptions::new(self.arm_url());
        options.lro_poll_interval = Duration::from_millis(10);
        options.retry.server_error_backoff = Duration::from_millis(10);
        options.request_timeout = Duration::from_secs(30);
        options
    }

    fn arm_url(&self) -> Url {
        Url::parse(&self.arm.url()).unwrap_or_else(|e| panic!("emulator URL: {e}"))
    }

    /// A controller with its own API client and ARM client (authenticating
    /// through the emulator's IMDS endpoint).
    pub fn controller(&self, config: ControllerConfig, arm_options: ArmOptions) -> Arc<Controller> {
        let metrics = Arc::new(Metrics::new());
        let transport = HyperTransport::new(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("transport: {e}"));
        let credential = Arc::new(ImdsCredential::new(self.arm_url(), None, transport));
        let arm = ArmClient::new(arm_options, credential, metrics.clone())
            .unwrap_or_else(|e| panic!("ARM client: {e}"));
        Arc::new(Controller::new(self.api.client(), arm, config, metrics))
    }

    /// Runs `controller`'s loop (watches always; cycles while leading).
    pub fn run(&self, controller: Arc<Controller>, leading: bool) -> Running {
        let (leading_tx, leading_rx) = watch::channel(leading);
        let (stop, mut stop_rx) = watch::channel(false);
        let runner = controller.clone();
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            if let Err(error) = runner.run(leading_rx, stopped).await {
                tracing::warn!(%error, "controller loop ended with an error");
            }
        });
        Running {
            controller,
            leading: leading_tx,
            stop,
            task,
        }
    }

    /// Runs `controller` with a Lease elector named `identity`.
    pub fn run_elected(
        &self,
        controller: Arc<Controller>,
        lease: LeaseConfig,
    ) -> (Running, tokio::task::JoinHandle<()>) {
        let running = self.run(controller.clone(), false);
        let elector = LeaderElector::new(self.api.client(), lease, controller.metrics().clone());
        let leading = running.leading.clone();
        let mut stop_rx = running.stop.subscribe();
        let elector_task = tokio::spawn(async move {
            elector
                .run(leading, async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
        });
        (running, elector_task)
    }

    /// Waits until the controller's caches equal the API server's objects.
    pub async fn caught_up(&self, controller: &Controller) -> bool {
        let stores = controller.stores();
        eventually(Duration::from_secs(10), || async {
            let pods: Vec<Pod> = self
                .api
                .list::<Pod>()
                .into_iter()
                .filter(|p| p.labels().contains_key(POD_LABEL))
                .collect();
            versions(pods) == versions(stores.pods.state().iter().map(|p| (**p).clone()))
                && versions(self.api.list::<Node>())
                    == versions(stores.nodes.state().iter().map(|p| (**p).clone()))
                && versions(self.api.list::<AzureIdentity>())
                    == versions(stores.identities.state().iter().map(|p| (**p).clone()))
                && versions(self.api.list::<AzureIdentityBinding>())
                    == versions(stores.bindings.state().iter().map(|p| (**p).clone()))
                && versions(self.api.list::<AzureAssignedIdentity>())
                    == versions(stores.assigned.state().iter().map(|p| (**p).clone()))
        })
        .await
    }

    /// A scale set with `nodes` nodes named `{name}-{i}`; returns the node names.
    pub fn add_scale_set(
        &self,
        name: &str,
        nodes: usize,
        system_assigned: bool,
        existing: &[String],
    ) -> Vec<String> {
        self.arm.add_resource(
            ResourceKind::ScaleSet,
            SUBSCRIPTION,
            NODE_RESOURCE_GROUP,
            name,
            system_assigned,
            existing,
        );
        (0..nodes)
            .map(|i| {
                let node = format!("{name}-{i}");
                self.add_node(
                    &node,
                    &format!(
                        "azure:///subscriptions/{SUBSCRIPTION}/resourceGroups/{NODE_RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}/virtualMachines/{i}"
                    ),
                );
                node
            })
            .collect()
    }

    /// A standalone VM and its node (same name).
    pub fn add_vm(&self, name: &str, system_assigned: bool, existing: &[String]) -> String {
        self.arm.add_resource(
            ResourceKind::VirtualMachine,
            SUBSCRIPTION,
            NODE_RESOURCE_GROUP,
            name,
            system_assigned,
            existing,
        );
        self.add_node(
            name,
            &format!(
                "azure:///subscriptions/{SUBSCRIPTION}/resourceGroups/{NODE_RESOURCE_GROUP}/providers/Microsoft.Compute/virtualMachines/{name}"
            ),
        );
        name.to_string()
    }

    fn add_node(&self, name: &str, provider_id: &str) {
        let mut node = Node::default();
        node.metadata.name = Some(name.to_string());
        node.spec = Some(NodeSpec {
            provider_id: Some(provider_id.to_string()),
            ..NodeSpec::default()
        });
        self.api.put(&node);
    }

    /// An AzureIdentity (type 0) and a binding whose selector is the
    /// identity's name. Returns the identity's resource ID.
    pub fn add_identity(&self, name: &str, client_id: &str) -> String {
        let resource_id = identity_id(name);
        let mut identity = AzureIdentity::new(
            name,
            AzureIdentitySpec {
                identity_type: 0,
                resource_id: resource_id.clone(),
                client_id: client_id.to_string(),
                ..AzureIdentitySpec::default()
            },
        );
        identity.metadata.namespace = Some(NAMESPACE.into());
        self.api.put(&identity);
        self.add_binding(&format!("{name}-binding"), name, name);
        resource_id
    }

    /// A binding of `identity` to pods labelled `selector`.
    pub fn add_binding(&self, name: &str, identity: &str, selector: &str) {
        let mut binding = AzureIdentityBinding::new(
            name,
            AzureIdentityBindingSpec {
                azure_identity: identity.to_string(),
                selector: selector.to_string(),
                weight: None,
            },
        );
        binding.metadata.namespace = Some(NAMESPACE.into());
        self.api.put(&binding);
    }

    /// A running pod on `node` labelled `aadpodidbinding: selector`.
    pub fn add_pod(&self, name: &str, node: &str, selector: &str) {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.to_string());
        pod.metadata.namespace = Some(NAMESPACE.into());
        pod.metadata.labels = Some([(POD_LABEL.to_string(), selector.to_string())].into());
        pod.spec = Some(PodSpec {
            node_name: Some(node.to_string()),
            ..PodSpec::default()
        });
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        });
        self.api.put(&pod);
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, name: &str) {
        self.api.remove::<Pod>(Some(NAMESPACE), name);
    }

    /// The assignment of `identity` to `pod` (MIC's name, in `default`).
    pub fn assignment(&self, pod: &str, identity: &str) -> Option<AzureAssignedIdentity> {
        self.api.get(
            Some(NAMESPACE),
            &AzureAssignedIdentity::name_for(pod, NAMESPACE, identity),
        )
    }

    /// All assignments.
    pub fn assignments(&self) -> Vec<AzureAssignedIdentity> {
        self.api.list()
    }

    /// How many assignments are `Assigned`.
    pub fn assigned_count(&self) -> usize {
        self.assignments()
            .iter()
            .filter(|a| a.status.as_ref().is_some_and(|s| s.status == "Assigned"))
            .count()
    }

    /// The lower-cased user-assigned identities on a scale set.
    pub fn scale_set_identities(&self, name: &str) -> BTreeSet<String> {
        self.arm
            .identities(
                ResourceKind::ScaleSet,
                SUBSCRIPTION,
                NODE_RESOURCE_GROUP,
                name,
            )
            .unwrap_or_default()
    }

    /// The lower-cased user-assigned identities on a VM.
    pub fn vm_identities(&self, name: &str) -> BTreeSet<String> {
        self.arm
            .identities(
                ResourceKind::VirtualMachine,
                SUBSCRIPTION,
                NODE_RESOURCE_GROUP,
                name,
            )
            .unwrap_or_default()
    }
}
