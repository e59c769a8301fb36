//! Watch caches (kube-runtime reflectors) of everything the desired state
//! depends on, and the filter that turns watch events into cycle triggers.
//!
//! Every replica keeps its caches warm, so a standby that becomes leader
//! can act at once, from the same records the old leader wrote.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher::{self, Event},
    },
};
use podid_api::{AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, POD_LABEL};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::{Error, expectations::Expectations, target::Target};

/// Read handles of the caches.
#[derive(Clone)]
pub struct Stores {
    /// Pods with the `aadpodidbinding` label.
    pub pods: Store<Pod>,
    /// AzureIdentityBindings.
    pub bindings: Store<AzureIdentityBinding>,
    /// AzureIdentities.
    pub identities: Store<AzureIdentity>,
    /// AzureAssignedIdentities.
    pub assigned: Store<AzureAssignedIdentity>,
    /// Nodes.
    pub nodes: Store<Node>,
}

/// Write handles of the caches, fed by [`watch`] (or by tests).
pub struct Writers {
    /// Pods.
    pub pods: Writer<Pod>,
    /// Bindings.
    pub bindings: Writer<AzureIdentityBinding>,
    /// Identities.
    pub identities: Writer<AzureIdentity>,
    /// Assigned identities.
    pub assigned: Writer<AzureAssignedIdentity>,
    /// Nodes.
    pub nodes: Writer<Node>,
}

/// A consistent-enough view of the caches for one cycle.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Pods.
    pub pods: Vec<Arc<Pod>>,
    /// Bindings.
    pub bindings: Vec<Arc<AzureIdentityBinding>>,
    /// Identities.
    pub identities: Vec<Arc<AzureIdentity>>,
    /// Assigned identities (with the controller's own pending writes).
    pub assigned: Vec<Arc<AzureAssignedIdentity>>,
    /// Node name → VM / scale set.
    pub node_targets: HashMap<String, Target>,
}

/// Empty caches and their writers.
pub fn stores() -> (Stores, Writers) {
    let (pods, pods_w) = reflector::store();
    let (bindings, bindings_w) = reflector::store();
    let (identities, identities_w) = reflector::store();
    let (assigned, assigned_w) = reflector::store();
    let (nodes, nodes_w) = reflector::store();
    (
        Stores {
            pods,
            bindings,
            identities,
            assigned,
            nodes,
        },
        Writers {
            pods: pods_w,
            bindings: bindings_w,
            identities: identities_w,
            assigned: assigned_w,
            nodes: nodes_w,
        },
    )
}

impl Stores {
    /// Waits until every cache has had its initial list.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), Error> {
        let all = async {
            self.pods.wait_until_ready().await?;
            self.bindings.wait_until_ready().await?;
            self.identities.wait_until_ready().await?;
            self.assigned.wait_until_ready().await?;
            self.nodes.wait_until_ready().await
        };
        match tokio::time::timeout(timeout, all).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::CacheNotReady(e.to_string())),
            Err(_) => Err(Error::CacheNotReady(format!(
                "not ready within {timeout:?}"
            ))),
        }
    }

    pub(crate) fn snapshot(&self, expectations: &Expectations) -> Snapshot {
        let mut node_targets = HashMap::new();
        for node in self.nodes.state() {
            if let (Some(name), Some(target)) = (node.metadata.name.clone(), Target::of_node(&node))
            {
                node_targets.insert(name, target);
            }
        }
        Snapshot {
            pods: self.pods.state(),
            bindings: self.bindings.state(),
            identities: self.identities.state(),
            assigned: expectations.overlay(self.assigned.state()),
            node_targets,
        }
    }
}

/// What of a pod matters to the desired state.
#[derive(Clone, PartialEq, Eq)]
struct PodFingerprint {
    node: Option<String>,
    label: Option<String>,
    finished: bool,
}

fn fingerprint(pod: &Pod) -> PodFingerprint {
    PodFingerprint {
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        label: pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_LABEL).cloned()),
        finished: matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
    }
}

fn pod_key(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// Runs one reflector, calling `relevant` on each event to decide whether it
/// triggers a cycle.
async fn reflect<K, F>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    trigger: Arc<Notify>,
    mut relevant: F,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    F: FnMut(&Event<K>) -> bool,
{
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    futures::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => {
                if relevant(&event) {
                    trigger.notify_one();
                }
            }
            Ok(None) => return,
            Err(error) => {
                // The backoff already paces retries; the stream goes on.
                tracing::warn!(%error, kind = %K::kind(&K::DynamicType::default()), "watch failed");
            }
        }
    }
}

/// Watches pods (with the `aadpodidbinding` label), bindings, identities,
/// assigned identities and nodes into `writers`, notifying `trigger` when
/// something that can change the desired state happens. Runs until the
/// streams end (never, in practice).
pub(crate) async fn watch(
    client: Client,
    writers: Writers,
    trigger: Arc<Notify>,
    expectations: Arc<Expectations>,
) {
    let Writers {
        pods,
        bindings,
        identities,
        assigned,
        nodes,
    } = writers;

    let mut fingerprints: HashMap<(String, String), PodFingerprint> = HashMap::new();
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(POD_LABEL),
        pods,
        trigger.clone(),
        move |event| match event {
            Event::Apply(pod) | Event::InitApply(pod) => {
                let print = fingerprint(pod);
                fingerprints.insert(pod_key(pod), print.clone()) != Some(print)
            }
            Event::Delete(pod) => {
                fingerprints.remove(&pod_key(pod));
                true
            }
            Event::Init => false,
            Event::InitDone => true,
        },
    );

    let mut node_targets: HashMap<String, Option<String>> = HashMap::new();
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        nodes,
        trigger.clone(),
        move |event| match event {
            Event::Apply(node) | Event::InitApply(node) => {
                let key = Target::of_node(node).map(|t| t.key().to_string());
                node_targets.insert(node.metadata.name.clone().unwrap_or_default(), key.clone())
                    != Some(key)
            }
            Event::Delete(node) => {
                node_targets.remove(&node.metadata.name.clone().unwrap_or_default());
                true
            }
            Event::Init => false,
            Event::InitDone => true,
        },
    );

    let bindings = reflect(
        Api::<AzureIdentityBinding>::all(client.clone()),
        watcher::Config::default(),
        bindings,
        trigger.clone(),
        |event| !matches!(event, Event::Init),
    );
    let identities = reflect(
        Api::<AzureIdentity>::all(client.clone()),
        watcher::Config::default(),
        identities,
        trigger.clone(),
        |event| !matches!(event, Event::Init),
    );
    let assigned = reflect(
        Api::<AzureAssignedIdentity>::all(client),
        watcher::Config::default(),
        assigned,
        trigger,
        move |event| match event {
            Event::Apply(object) => !expectations.is_own_write(object),
            Event::Delete(object) => !expectations.is_own_delete(object),
            Event::InitApply(_) | Event::Init => false,
            Event::InitDone => true,
        },
    );
    let _ = futures::join!(pods, nodes, bindings, identities, assigned);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, PodSpec, PodStatus};

    fn node(name: &str, provider_id: &str) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.into());
        node.spec = Some(NodeSpec {
            provider_id: Some(provider_id.into()),
            ..NodeSpec::default()
        });
        node
    }

    fn pod(node: Option<&str>, label: &str, phase: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("default".into());
        pod.metadata.labels = Some([(POD_LABEL.to_string(), label.to_string())].into());
        pod.spec = Some(PodSpec {
            node_name: node.map(String::from),
            ..PodSpec::default()
        });
        pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn snapshot_maps_nodes_to_targets_from_the_caches() {
        let (stores, mut writers) = stores();
        writers.nodes.apply_watcher_event(&Event::Apply(node(
            "ss-0",
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/0",
        )));
        writers
            .nodes
            .apply_watcher_event(&Event::Apply(node("kind-node", "kind://docker/x")));
        writers
            .pods
            .apply_watcher_event(&Event::Apply(pod(Some("ss-0"), "web", "Running")));
        let snapshot = stores.snapshot(&Expectations::default());
        assert_eq!(snapshot.pods.len(), 1);
        assert_eq!(
            snapshot.node_targets.len(),
            1,
            "a node without an Azure provider ID has no target"
        );
        assert_eq!(snapshot.node_targets["ss-0"].name, "pool");
        writers
            .nodes
            .apply_watcher_event(&Event::Delete(node("ss-0", "")));
        assert!(
            stores
                .snapshot(&Expectations::default())
                .node_targets
                .is_empty()
        );
    }

    #[test]
    fn only_placement_label_and_completion_changes_matter() {
        let running = fingerprint(&pod(Some("n"), "web", "Running"));
        assert!(
            running == fingerprint(&pod(Some("n"), "web", "Pending")),
            "status churn is ignored"
        );
        assert!(running != fingerprint(&pod(Some("m"), "web", "Running")));
        assert!(running != fingerprint(&pod(Some("n"), "api", "Running")));
        assert!(running != fingerprint(&pod(Some("n"), "web", "Succeeded")));
        assert!(running != fingerprint(&pod(None, "web", "Pending")));
    }
}
