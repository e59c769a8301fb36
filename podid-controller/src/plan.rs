//! The plan of one cycle: desired assignments compared with the existing
//! `AzureAssignedIdentity` objects, grouped per VM / scale set.
//!
//! Pure, like [`crate::desired`]. The rules that keep identities safe live
//! here:
//! - only identities recorded in an `AzureAssignedIdentity` this controller
//!   assigned (state `Assigned`) are ever candidates for removal, so an
//!   identity that no `AzureIdentity` references (pre-existing on the VM) and
//!   the system-assigned identity are never touched;
//! - an identity still wanted by any pod on the same VM or scale set is not
//!   removed;
//! - identities whose client ID is protected (`--immutable-user-msis` and the
//!   cluster's own identity) are not removed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use kube::ResourceExt;
use podid_api::{AssignedIdentityState, AzureAssignedIdentity};

use crate::{
    desired::{DesiredAssignment, DesiredState, is_arm_identity},
    target::Target,
};

/// Namespace and name of an `AzureAssignedIdentity`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AssignmentKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl AssignmentKey {
    /// The key of an existing object.
    pub fn of(object: &AzureAssignedIdentity) -> Self {
        AssignmentKey {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
        }
    }

    /// The key of a desired assignment.
    pub fn of_desired(desired: &DesiredAssignment) -> Self {
        AssignmentKey {
            namespace: desired.namespace.clone(),
            name: desired.name.clone(),
        }
    }
}

impl std::fmt::Display for AssignmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An identity that must be on a target.
#[derive(Clone, Debug, Default)]
pub struct Ensure {
    /// The identity's ARM ID as written in the `AzureIdentity`.
    pub resource_id: String,
    /// Assignments waiting for it (`Created`), to mark `Assigned` once present.
    pub pending: Vec<Pending>,
    /// Assignments already `Assigned` (present only in a reconcile cycle, to
    /// re-add the identity if it was removed out of band).
    pub assigned: Vec<AssignmentKey>,
}

/// An assignment waiting for its identity.
#[derive(Clone, Debug)]
pub struct Pending {
    /// Which assignment.
    pub key: AssignmentKey,
    /// The desired assignment (pod and binding, for events).
    pub desired: DesiredAssignment,
}

/// An identity to take off a target.
#[derive(Clone, Debug, Default)]
pub struct Removal {
    /// The identity's ARM ID as recorded.
    pub resource_id: String,
    /// Assignments to delete once the identity is gone.
    pub release: Vec<Arc<AzureAssignedIdentity>>,
}

/// The ARM work for one VM or scale set.
#[derive(Clone, Debug, Default)]
pub struct TargetWork {
    /// Lower-cased identity ID → what needs it.
    pub ensure: BTreeMap<String, Ensure>,
    /// Lower-cased identity ID → what to delete after removal.
    pub remove: BTreeMap<String, Removal>,
}

impl TargetWork {
    /// Whether anything here needs ARM at all.
    pub fn is_empty(&self) -> bool {
        self.ensure.is_empty() && self.remove.is_empty()
    }

    /// Whether this target has work beyond the reconcile check.
    pub fn has_changes(&self) -> bool {
        !self.remove.is_empty() || self.ensure.values().any(|e| !e.pending.is_empty())
    }
}

/// An existing assignment whose spec must be replaced.
#[derive(Clone, Debug)]
pub struct Update {
    /// The object as it is.
    pub existing: Arc<AzureAssignedIdentity>,
    /// What it should record.
    pub desired: DesiredAssignment,
    /// The state to write with it.
    pub state: AssignedIdentityState,
}

/// What one cycle does.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// New assignments to create, with their initial state (`Created` for
    /// user-assigned identities, `Assigned` for service principals, which
    /// need no ARM call).
    pub creates: Vec<(DesiredAssignment, AssignedIdentityState)>,
    /// Assignments whose spec changed.
    pub updates: Vec<Update>,
    /// ARM work per target.
    pub targets: BTreeMap<Target, TargetWork>,
    /// Assignments to delete without any ARM call (never assigned, identity
    /// still in use or protected, node gone, service principal).
    pub release: Vec<Arc<AzureAssignedIdentity>>,
    /// Existing `Created` service-principal assignments to mark `Assigned`.
    pub mark_assigned: Vec<AssignmentKey>,
    /// Assignments whose node has no known VM / scale set; they stay
    /// `Created` until it is known.
    pub unplaced: Vec<AssignmentKey>,
}

/// Inputs of [`plan`] besides the desired state.
pub struct PlanInputs<'a> {
    /// Existing `AzureAssignedIdentity` objects.
    pub existing: &'a [Arc<AzureAssignedIdentity>],
    /// Node name → its VM / scale set.
    pub node_targets: &'a HashMap<String, Target>,
    /// Lower-cased client IDs that are never removed.
    pub protected_client_ids: &'a HashSet<String>,
    /// Reconcile cycle: also check that `Assigned` identities are present.
    pub verify_assigned: bool,
}

/// Compares desired and existing assignments.
pub fn plan(desired: &DesiredState, inputs: &PlanInputs<'_>) -> Plan {
    let mut out = Plan::default();

    // Identities wanted per target, by any pod: never removed from it.
    let mut in_use: HashMap<&Target, HashSet<String>> = HashMap::new();
    for d in &desired.assignments {
        if d.needs_arm()
            && let Some(target) = inputs.node_targets.get(&d.node)
        {
            in_use.entry(target).or_default().insert(d.resource_key());
        }
    }

    let mut existing: HashMap<AssignmentKey, &Arc<AzureAssignedIdentity>> = HashMap::new();
    for object in inputs.existing {
        existing.insert(AssignmentKey::of(object), object);
    }

    let mut wanted: HashSet<AssignmentKey> = HashSet::new();
    for d in &desired.assignments {
        let key = AssignmentKey::of_desired(d);
        wanted.insert(key.clone());
        let Some(current) = existing.get(&key).copied() else {
            if d.needs_arm() {
                out.creates
                    .push((d.clone(), AssignedIdentityState::Created));
                ensure_pending(&mut out, inputs, d, key);
            } else {
                out.creates
                    .push((d.clone(), AssignedIdentityState::Assigned));
            }
            continue;
        };
        if current.metadata.deletion_timestamp.is_some() {
            // Handled below as a deletion; recreated once it is gone.
            continue;
        }
        let state = current.state();
        if d.matches(current) {
            match state {
                Some(AssignedIdentityState::Assigned) => {
                    if d.needs_arm()
                        && inputs.verify_assigned
                        && let Some(target) = inputs.node_targets.get(&d.node)
                    {
                        let entry = out
                            .targets
                            .entry(target.clone())
                            .or_default()
                            .ensure
                            .entry(d.resource_key())
                            .or_insert_with(|| Ensure {
                                resource_id: d.identity.spec.resource_id.clone(),
                                ..Ensure::default()
                            });
                        entry.assigned.push(key);
                    }
                }
                Some(AssignedIdentityState::Created | AssignedIdentityState::Unassigned) | None => {
                    if d.needs_arm() {
                        ensure_pending(&mut out, inputs, d, key);
                    } else {
                        out.mark_assigned.push(key);
                    }
                }
            }
            continue;
        }
        // Same name, different content: replace the spec.
        let old_target = inputs.node_targets.get(&current.spec.nodename);
        let new_target = inputs.node_targets.get(&d.node);
        let old_id = recorded_resource_key(current);
        let unchanged_on_arm = state == Some(AssignedIdentityState::Assigned)
            && old_id.as_deref() == Some(d.resource_key().as_str())
            && old_target.is_some()
            && old_target == new_target;
        let new_state = if !d.needs_arm() || unchanged_on_arm {
            AssignedIdentityState::Assigned
        } else {
            AssignedIdentityState::Created
        };
        if !unchanged_on_arm {
            consider_removal(&mut out, inputs, &in_use, current, false);
        }
        if new_state == AssignedIdentityState::Created {
            ensure_pending(&mut out, inputs, d, key);
        }
        out.updates.push(Update {
            existing: current.clone(),
            desired: d.clone(),
            state: new_state,
        });
    }

    for object in inputs.existing {
        let key = AssignmentKey::of(object);
        if wanted.contains(&key) && object.metadata.deletion_timestamp.is_none() {
            continue;
        }
        consider_removal(&mut out, inputs, &in_use, object, true);
    }
    out
}

fn ensure_pending(
    out: &mut Plan,
    inputs: &PlanInputs<'_>,
    d: &DesiredAssignment,
    key: AssignmentKey,
) {
    let Some(target) = inputs.node_targets.get(&d.node) else {
        out.unplaced.push(key);
        return;
    };
    let entry = out
        .targets
        .entry(target.clone())
        .or_default()
        .ensure
        .entry(d.resource_key())
        .or_insert_with(|| Ensure {
            resource_id: d.identity.spec.resource_id.clone(),
            ..Ensure::default()
        });
    entry.pending.push(Pending {
        key,
        desired: d.clone(),
    });
}

/// The lower-cased identity ID an assignment recorded, if it is a
/// user-assigned identity.
fn recorded_resource_key(object: &AzureAssignedIdentity) -> Option<String> {
    let identity = object.spec.azure_identity_ref.as_ref()?;
    is_arm_identity(identity).then(|| identity.spec.resource_id.to_ascii_lowercase())
}

/// Decides what happens to the identity of an assignment that goes away
/// (`release`: the object is deleted) or changes.
fn consider_removal(
    out: &mut Plan,
    inputs: &PlanInputs<'_>,
    in_use: &HashMap<&Target, HashSet<String>>,
    object: &Arc<AzureAssignedIdentity>,
    release: bool,
) {
    let assigned = matches!(
        object.state(),
        Some(AssignedIdentityState::Assigned | AssignedIdentityState::Unassigned)
    );
    let target = inputs.node_targets.get(&object.spec.nodename);
    let identity = object.spec.azure_identity_ref.as_ref();
    let protected = identity.is_some_and(|i| {
        inputs
            .protected_client_ids
            .contains(&i.spec.client_id.to_ascii_lowercase())
    });
    let removable = match (assigned, target, recorded_resource_key(object)) {
        (true, Some(target), Some(id)) if !protected => {
            let used = in_use.get(target).is_some_and(|ids| ids.contains(&id));
            (!used).then_some((target, id))
        }
        _ => None,
    };
    match removable {
        Some((target, id)) => {
            let resource_id = identity
                .map(|i| i.spec.resource_id.clone())
                .unwrap_or_else(|| id.clone());
            let removal = out
                .targets
                .entry(target.clone())
                .or_default()
                .remove
                .entry(id)
                .or_insert_with(|| Removal {
                    resource_id,
                    release: Vec::new(),
                });
            if release {
                removal.release.push(object.clone());
            }
        }
        None => {
            if release {
                out.release.push(object.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{desired, target::TargetKind};
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::Time};
    use podid_api::{
        AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, POD_LABEL,
    };

    fn uami(name: &str) -> String {
        format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    struct World {
        pods: Vec<Arc<Pod>>,
        bindings: Vec<Arc<AzureIdentityBinding>>,
        identities: Vec<Arc<AzureIdentity>>,
        nodes: HashMap<String, Target>,
    }

    impl World {
        fn new() -> Self {
            let ss = Target::new(TargetKind::ScaleSet, "s", "rg", "pool");
            let vm = Target::new(TargetKind::VirtualMachine, "s", "rg", "vm-a");
            World {
                pods: vec![],
                bindings: vec![],
                identities: vec![],
                nodes: [
                    ("ss-0".to_string(), ss.clone()),
                    ("ss-1".to_string(), ss),
                    ("vm-a".to_string(), vm),
                ]
                .into(),
            }
        }
        fn identity(&mut self, name: &str, client: &str) {
            let mut i = AzureIdentity::new(
                name,
                AzureIdentitySpec {
                    identity_type: 0,
                    resource_id: uami(name),
                    client_id: client.into(),
                    ..Default::default()
                },
            );
            i.metadata.namespace = Some("default".into());
            i.metadata.resource_version = Some("1".into());
            self.identities.push(Arc::new(i));
            let mut b = AzureIdentityBinding::new(
                &format!("{name}-binding"),
                AzureIdentityBindingSpec {
                    azure_identity: name.into(),
                    selector: name.into(),
                    weight: None,
                },
            );
            b.metadata.namespace = Some("default".into());
            b.metadata.resource_version = Some("1".into());
            self.bindings.push(Arc::new(b));
        }
        fn pod(&mut self, name: &str, node: &str, selector: &str) {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.metadata.namespace = Some("default".into());
            p.metadata.labels = Some([(POD_LABEL.to_string(), selector.to_string())].into());
            p.spec = Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            });
            self.pods.push(Arc::new(p));
        }
        fn desired(&self) -> DesiredState {
            desired::compute(
                &self.pods,
                &self.bindings,
                &self.identities,
                false,
                &podid_api::validation::IdentityRules::default(),
            )
        }
        fn plan(
            &self,
            existing: &[Arc<AzureAssignedIdentity>],
            protected: &[&str],
            verify: bool,
        ) -> Plan {
            let protected: HashSet<String> = protected.iter().map(|s| s.to_string()).collect();
            plan(
                &self.desired(),
                &PlanInputs {
                    existing,
                    node_targets: &self.nodes,
                    protected_client_ids: &protected,
                    verify_assigned: verify,
                },
            )
        }
        /// The assignments as they are after a successful cycle.
        fn assigned(&self) -> Vec<Arc<AzureAssignedIdentity>> {
            self.desired()
                .assignments
                .iter()
                .map(|d| Arc::new(d.to_object(AssignedIdentityState::Assigned)))
                .collect()
        }
    }

    fn target(kind: TargetKind, name: &str) -> Target {
        Target::new(kind, "s", "rg", name)
    }

    #[test]
    fn new_pods_create_assignments_and_one_ensure_per_identity_per_target() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "ss-0", "a");
        w.pod("p2", "ss-1", "a");
        w.pod("p3", "vm-a", "a");
        let plan = w.plan(&[], &[], false);
        assert_eq!(plan.creates.len(), 3);
        assert!(
            plan.creates
                .iter()
                .all(|(_, s)| *s == AssignedIdentityState::Created)
        );
        assert_eq!(plan.targets.len(), 2);
        let ss = &plan.targets[&target(TargetKind::ScaleSet, "pool")];
        assert_eq!(ss.ensure.len(), 1);
        assert_eq!(ss.ensure[&uami("a").to_ascii_lowercase()].pending.len(), 2);
        assert!(ss.remove.is_empty());
    }

    #[test]
    fn steady_state_plans_nothing_and_reconcile_only_verifies() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "ss-0", "a");
        let existing = w.assigned();
        let plan = w.plan(&existing, &[], false);
        assert!(plan.creates.is_empty() && plan.updates.is_empty() && plan.release.is_empty());
        assert!(plan.targets.is_empty());
        let verify = w.plan(&existing, &[], true);
        let work = &verify.targets[&target(TargetKind::ScaleSet, "pool")];
        assert!(!work.has_changes());
        assert_eq!(work.ensure.values().next().unwrap().assigned.len(), 1);
    }

    #[test]
    fn deleted_pod_removes_identity_unless_another_pod_on_the_same_scale_set_uses_it() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "ss-0", "a");
        w.pod("p2", "ss-1", "a");
        w.pod("p3", "vm-a", "a");
        let existing = w.assigned();
        w.pods.retain(|p| p.metadata.name.as_deref() != Some("p1"));
        let plan = w.plan(&existing, &[], false);
        // p2 on the same scale set still uses it: delete p1's record only.
        assert!(plan.targets.is_empty(), "{:?}", plan.targets);
        assert_eq!(plan.release.len(), 1);
        assert_eq!(plan.release[0].spec.pod, "p1");

        w.pods.retain(|p| p.metadata.name.as_deref() != Some("p2"));
        let plan = w.plan(&existing, &[], false);
        let ss = &plan.targets[&target(TargetKind::ScaleSet, "pool")];
        let removal = &ss.remove[&uami("a").to_ascii_lowercase()];
        assert_eq!(removal.release.len(), 2);
        // The VM keeps it for p3.
        assert!(
            !plan
                .targets
                .contains_key(&target(TargetKind::VirtualMachine, "vm-a"))
        );
    }

    #[test]
    fn protected_client_ids_are_never_removed() {
        let mut w = World::new();
        w.identity("immutable", "IMMUTABLE-CLIENT");
        w.pod("p1", "vm-a", "immutable");
        let existing = w.assigned();
        w.pods.clear();
        let plan = w.plan(&existing, &["immutable-client"], false);
        assert!(plan.targets.is_empty());
        assert_eq!(plan.release.len(), 1);
    }

    #[test]
    fn created_assignments_are_retried_and_never_trigger_removal() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "vm-a", "a");
        let created: Vec<_> = w
            .desired()
            .assignments
            .iter()
            .map(|d| Arc::new(d.to_object(AssignedIdentityState::Created)))
            .collect();
        let plan = w.plan(&created, &[], false);
        assert!(plan.creates.is_empty());
        let vm = &plan.targets[&target(TargetKind::VirtualMachine, "vm-a")];
        assert_eq!(vm.ensure.values().next().unwrap().pending.len(), 1);

        w.pods.clear();
        let plan = w.plan(&created, &[], false);
        assert!(plan.targets.is_empty());
        assert_eq!(plan.release.len(), 1);
    }

    #[test]
    fn assignments_on_unknown_nodes_stay_created_and_release_without_arm() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "gone-node", "a");
        let plan = w.plan(&[], &[], false);
        assert_eq!(plan.creates.len(), 1);
        assert_eq!(plan.unplaced.len(), 1);
        assert!(plan.targets.is_empty());
        let existing = w.assigned();
        w.pods.clear();
        let plan = w.plan(&existing, &[], false);
        assert!(plan.targets.is_empty());
        assert_eq!(plan.release.len(), 1);
    }

    #[test]
    fn an_assignment_being_deleted_is_released_and_its_identity_kept_if_still_wanted() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "vm-a", "a");
        let mut existing = (*w.assigned()[0]).clone();
        existing.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        let plan = w.plan(&[Arc::new(existing)], &[], false);
        assert!(plan.creates.is_empty(), "recreated only once it is gone");
        assert!(plan.targets.is_empty());
        assert_eq!(plan.release.len(), 1);
    }

    #[test]
    fn a_pod_moving_node_updates_the_spec_and_moves_the_identity() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "vm-a", "a");
        let existing = w.assigned();
        w.pods.clear();
        w.pod("p1", "ss-0", "a");
        let plan = w.plan(&existing, &[], false);
        assert_eq!(plan.updates.len(), 1);
        assert_eq!(plan.updates[0].state, AssignedIdentityState::Created);
        let vm = &plan.targets[&target(TargetKind::VirtualMachine, "vm-a")];
        assert_eq!(vm.remove.len(), 1);
        assert!(vm.remove.values().next().unwrap().release.is_empty());
        let ss = &plan.targets[&target(TargetKind::ScaleSet, "pool")];
        assert_eq!(ss.ensure.values().next().unwrap().pending.len(), 1);
    }

    #[test]
    fn a_binding_change_that_keeps_the_identity_keeps_it_assigned() {
        let mut w = World::new();
        w.identity("a", "ca");
        w.pod("p1", "vm-a", "a");
        let existing = w.assigned();
        let mut b = (*w.bindings[0]).clone();
        b.metadata.resource_version = Some("2".into());
        w.bindings = vec![Arc::new(b)];
        let plan = w.plan(&existing, &[], false);
        assert_eq!(plan.updates.len(), 1);
        assert_eq!(plan.updates[0].state, AssignedIdentityState::Assigned);
        assert!(plan.targets.is_empty());
    }
}
