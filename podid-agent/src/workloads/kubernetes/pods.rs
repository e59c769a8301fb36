//! This node's pods: the reflector's store, looked up by UID, and what the
//! watch says about pods that are gone.
//!
//! The store holds the pods of this node only (field selector
//! `spec.nodeName`). [`PodTracker`] follows the watch events to remember the
//! UIDs of deleted pods for a while (tombstones), so a leftover connection of
//! a deleted pod is refused at once instead of waiting for a pod that will
//! never come, and bumps a change counter that waiting requests watch.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::{reflector::Store, watcher};
use tokio::sync::watch;

use super::cgroup_path::ContainerCgroup;

/// How long a deleted pod's UID is remembered.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most tombstones kept (the oldest go first).
const TOMBSTONE_CAPACITY: usize = 16_384;

/// A deleted pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Deleted pods by UID, bounded in number and age.
#[derive(Debug, Default)]
struct Tombstones {
    by_uid: HashMap<String, (Tombstone, Instant)>,
    order: VecDeque<String>,
}

impl Tombstones {
    fn insert(&mut self, uid: String, tombstone: Tombstone) {
        if self
            .by_uid
            .insert(uid.clone(), (tombstone, Instant::now()))
            .is_none()
        {
            self.order.push_back(uid);
        }
        while self.order.len() > TOMBSTONE_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.by_uid.remove(&oldest);
            }
        }
    }

    fn get(&self, uid: &str) -> Option<Tombstone> {
        self.by_uid
            .get(uid)
            .filter(|(_, at)| at.elapsed() < TOMBSTONE_TTL)
            .map(|(t, _)| t.clone())
    }

    /// A UID that reappears (a relist found it after all) is alive.
    fn remove(&mut self, uid: &str) {
        self.by_uid.remove(uid);
    }
}

fn uid_of(pod: &Pod) -> Option<&str> {
    pod.metadata.uid.as_deref().filter(|u| !u.is_empty())
}

fn tombstone_of(pod: &Pod) -> Tombstone {
    Tombstone {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
    }
}

/// Shared view of this node's pods.
#[derive(Clone)]
pub struct Pods {
    store: Store<Pod>,
    tombstones: Arc<Mutex<Tombstones>>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods")
            .field("cached", &self.store.len())
            .finish_non_exhaustive()
    }
}

impl Pods {
    /// A view over the reflector's `store`.
    pub fn new(store: Store<Pod>) -> Self {
        Self {
            store,
            tombstones: Arc::default(),
            changes: watch::Sender::new(0),
        }
    }

    /// The pod with `uid`, if the store has it.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<Pod>> {
        self.store.find(|pod| uid_of(pod) == Some(uid))
    }

    /// The deleted pod with `uid`, if it was deleted recently.
    pub fn deleted(&self, uid: &str) -> Option<Tombstone> {
        self.tombstones
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
    }

    /// A receiver that wakes when the pods change. Subscribe before looking,
    /// then wait on it, so no change is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The tracker that keeps this view's tombstones and change counter up to
    /// date; it sees each watch event after the store applied it.
    pub fn tracker(&self) -> PodTracker {
        PodTracker {
            pods: self.clone(),
            known: HashMap::new(),
            relisted: None,
        }
    }
}

/// Follows the pod watch for [`Pods`].
pub struct PodTracker {
    pods: Pods,
    /// UIDs in the store, with namespace/name.
    known: HashMap<String, Tombstone>,
    /// UIDs seen since the current relist started.
    relisted: Option<HashSet<String>>,
}

impl PodTracker {
    /// Applies one watch event.
    pub fn on_event(&mut self, event: &watcher::Event<Pod>) {
        let mut tombstones = self
            .pods
            .tombstones
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(pod) => {
                if let Some(uid) = uid_of(pod) {
                    tombstones.remove(uid);
                    self.known.insert(uid.to_string(), tombstone_of(pod));
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some(uid) = uid_of(pod) {
                    self.known.remove(uid);
                    tombstones.insert(uid.to_string(), tombstone_of(pod));
                }
            }
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(uid), Some(seen)) = (uid_of(pod), self.relisted.as_mut()) {
                    seen.insert(uid.to_string());
                    tombstones.remove(uid);
                    self.known.insert(uid.to_string(), tombstone_of(pod));
                }
            }
            watcher::Event::InitDone => {
                // Pods the relist no longer has were deleted while the
                // watch was down.
                let seen = self.relisted.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .known
                    .keys()
                    .filter(|uid| !seen.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(tombstone) = self.known.remove(&uid) {
                        tombstones.insert(uid, tombstone);
                    }
                }
            }
        }
        drop(tombstones);
        self.pods.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Whether the pod has finished for good (`Succeeded` or `Failed`).
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    let lists = [
        status.and_then(|s| s.container_statuses.as_ref()),
        status.and_then(|s| s.init_container_statuses.as_ref()),
        status.and_then(|s| s.ephemeral_container_statuses.as_ref()),
    ];
    lists.into_iter().flatten().flatten()
}

/// The ID part of `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
fn status_id(status: &ContainerStatus) -> Option<&str> {
    let id = status.container_id.as_deref()?;
    Some(id.split_once("://").map_or(id, |(_, id)| id))
}

/// What a container cgroup is within its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerMatch {
    /// A container (also an init or ephemeral one) with this name.
    Named(String),
    /// The pod itself: its own cgroup, the sandbox (pause) container, or
    /// CRI-O's conmon.
    Pod,
    /// An ID no status names yet while some container has no ID yet: most
    /// likely a container that just started, before kubelet reported it.
    Starting,
}

/// Maps a container cgroup to the container's name through the pod's
/// `status.containerStatuses` (and init and ephemeral ones).
pub fn container_of(pod: &Pod, container: Option<&ContainerCgroup>) -> ContainerMatch {
    let Some(container) = container.filter(|c| !c.conmon) else {
        return ContainerMatch::Pod;
    };
    if let Some(status) = statuses(pod).find(|s| status_id(s) == Some(container.id.as_str())) {
        return ContainerMatch::Named(status.name.clone());
    }
    let spec = pod.spec.as_ref();
    let declared = spec.map_or(0, |s| {
        s.containers.len()
            + s.init_containers.as_ref().map_or(0, Vec::len)
            + s.ephemeral_containers.as_ref().map_or(0, Vec::len)
    });
    let with_ids = statuses(pod).filter(|s| status_id(s).is_some()).count();
    if with_ids < declared && !is_terminated(pod) {
        ContainerMatch::Starting
    } else {
        // Every container is accounted for: this is the sandbox.
        ContainerMatch::Pod
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::kubernetes::cgroup_path::Runtime;
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus};

    fn status(name: &str, id: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            container_id: id.map(|i| format!("containerd://{i}")),
            ..ContainerStatus::default()
        }
    }

    fn cgroup(id: &str) -> ContainerCgroup {
        ContainerCgroup {
            runtime: Runtime::Containerd,
            id: id.into(),
            conmon: false,
        }
    }

    fn pod(containers: &[&str], statuses: Vec<ContainerStatus>, init: Vec<ContainerStatus>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: containers
                    .iter()
                    .map(|n| Container {
                        name: n.to_string(),
                        ..Container::default()
                    })
                    .collect(),
                init_containers: (!init.is_empty()).then(|| {
                    init.iter()
                        .map(|s| Container {
                            name: s.name.clone(),
                            ..Container::default()
                        })
                        .collect()
                }),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                container_statuses: Some(statuses),
                init_container_statuses: (!init.is_empty()).then_some(init),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn container_ids_map_to_names_and_the_sandbox_is_the_pod() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let init = "c".repeat(64);
        let sandbox = "d".repeat(64);
        let running = pod(
            &["app", "sidecar"],
            vec![status("app", Some(&a)), status("sidecar", Some(&b))],
            vec![status("setup", Some(&init))],
        );
        assert_eq!(
            container_of(&running, Some(&cgroup(&a))),
            ContainerMatch::Named("app".into())
        );
        assert_eq!(
            container_of(&running, Some(&cgroup(&b))),
            ContainerMatch::Named("sidecar".into())
        );
        assert_eq!(
            container_of(&running, Some(&cgroup(&init))),
            ContainerMatch::Named("setup".into())
        );
        assert_eq!(
            container_of(&running, Some(&cgroup(&sandbox))),
            ContainerMatch::Pod
        );
        assert_eq!(container_of(&running, None), ContainerMatch::Pod);
        let conmon = ContainerCgroup {
            conmon: true,
            ..cgroup(&a)
        };
        assert_eq!(container_of(&running, Some(&conmon)), ContainerMatch::Pod);

        let starting = pod(
            &["app", "sidecar"],
            vec![status("app", Some(&a)), status("sidecar", None)],
            vec![],
        );
        assert_eq!(
            container_of(&starting, Some(&cgroup(&b))),
            ContainerMatch::Starting
        );
    }

    #[test]
    fn tracker_remembers_deleted_pods_also_across_a_relist() {
        let (store, mut writer) = kube::runtime::reflector::store::<Pod>();
        let pods = Pods::new(store);
        let mut tracker = pods.tracker();
        let named = |name: &str, uid: &str| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("ns".into());
            p.metadata.uid = Some(uid.into());
            p
        };
        let mut apply = |event: watcher::Event<Pod>| {
            writer.apply_watcher_event(&event);
            tracker.on_event(&event);
        };
        apply(watcher::Event::Init);
        apply(watcher::Event::InitApply(named("a", "uid-a")));
        apply(watcher::Event::InitApply(named("b", "uid-b")));
        apply(watcher::Event::InitDone);
        assert!(pods.by_uid("uid-a").is_some());
        apply(watcher::Event::Delete(named("a", "uid-a")));
        assert!(pods.by_uid("uid-a").is_none());
        assert_eq!(pods.deleted("uid-a").map(|t| t.name), Some("a".into()));
        // b vanishes while the watch is down: the relist says so.
        apply(watcher::Event::Init);
        apply(watcher::Event::InitApply(named("c", "uid-c")));
        apply(watcher::Event::InitDone);
        assert_eq!(pods.deleted("uid-b").map(|t| t.name), Some("b".into()));
        assert!(pods.deleted("uid-c").is_none());
        assert!(pods.by_uid("uid-c").is_some());
    }
}
