//! Standard mode: whether an identity is assigned to this node for a pod,
//! from the controller's AzureAssignedIdentity objects.
//!
//! The controller writes one AzureAssignedIdentity per (pod, identity) with
//! `status.status` `Created` while it assigns the identity to the node's
//! VM/VMSS, `Assigned` once it is there, `Unassigned` while it removes it.
//! An assignment counts for a request when it names the pod (name and
//! namespace), this node, and the identity the decision chose, with the same
//! client and resource ids (after an identity changes, the controller
//! re-assigns it; until then the old assignment does not count).
//!
//! [`Assignments::wait`] answers at once when the identity is assigned, and
//! otherwise waits, bounded, for the watch to report it assigned: as
//! aad-pod-identity's NMI does, but for seconds instead of 80–100 s.

use std::{sync::Arc, time::Duration};

use kube::runtime::{reflector::Store, watcher};
use podid_api::{AssignedIdentityState, AzureAssignedIdentity, AzureIdentity};
use tokio::{sync::watch, time::Instant};

use super::super::{Assignment, Workload};
use crate::identity::BoundIdentity;

/// The controller's assignments for this node.
#[derive(Clone)]
pub struct Assignments {
    store: Store<AzureAssignedIdentity>,
    node: String,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for Assignments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignments")
            .field("node", &self.node)
            .field("cached", &self.store.len())
            .finish_non_exhaustive()
    }
}

fn same_identity(embedded: &AzureIdentity, live: &AzureIdentity) -> bool {
    let namespace = |i: &AzureIdentity| {
        i.metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into())
    };
    embedded.metadata.name == live.metadata.name
        && namespace(embedded) == namespace(live)
        && embedded
            .spec
            .client_id
            .eq_ignore_ascii_case(&live.spec.client_id)
        && embedded
            .spec
            .resource_id
            .eq_ignore_ascii_case(&live.spec.resource_id)
}

impl Assignments {
    /// A view over the reflector's `store` (already limited to `node`).
    pub fn new(store: Store<AzureAssignedIdentity>, node: String) -> Self {
        Self {
            store,
            node,
            changes: watch::Sender::new(0),
        }
    }

    /// Called after the store applied a watch event: wakes waiting requests.
    pub fn on_event(&self, _event: &watcher::Event<AzureAssignedIdentity>) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The best state of the assignments of `bound` to `workload` on this
    /// node: `Assigned` over `Created` over `Unassigned`.
    pub fn state(
        &self,
        workload: &Workload,
        bound: &BoundIdentity,
    ) -> Option<AssignedIdentityState> {
        let matching = self.store.state_filter(|assigned: &AzureAssignedIdentity| {
            let spec = &assigned.spec;
            spec.pod == workload.name
                && spec.pod_namespace == workload.namespace
                && (spec.nodename.is_empty() || spec.nodename == self.node)
                && spec
                    .azure_identity_ref
                    .as_ref()
                    .is_some_and(|embedded| same_identity(embedded, &bound.identity))
        });
        let rank = |state: AssignedIdentityState| match state {
            AssignedIdentityState::Assigned => 3,
            AssignedIdentityState::Created => 2,
            AssignedIdentityState::Unassigned => 1,
        };
        matching
            .iter()
            .filter_map(|a: &Arc<AzureAssignedIdentity>| a.state())
            .max_by_key(|s| rank(*s))
    }

    /// Waits up to `wait` for `bound` to be assigned for `workload`.
    pub async fn wait(
        &self,
        workload: &Workload,
        bound: &BoundIdentity,
        wait: Duration,
    ) -> Assignment {
        let started = Instant::now();
        let deadline = started + wait;
        loop {
            let mut changes = self.changes.subscribe();
            changes.borrow_and_update();
            let state = self.state(workload, bound);
            if state == Some(AssignedIdentityState::Assigned) {
                return Assignment::Ready;
            }
            let woke = tokio::time::timeout_at(deadline, changes.changed()).await;
            if !matches!(woke, Ok(Ok(()))) {
                let state = self.state(workload, bound);
                return match state {
                    Some(AssignedIdentityState::Assigned) => Assignment::Ready,
                    Some(AssignedIdentityState::Created) => Assignment::Pending {
                        waited: started.elapsed(),
                    },
                    _ => Assignment::Missing,
                };
            }
        }
    }
}
