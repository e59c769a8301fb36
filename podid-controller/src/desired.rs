//! The desired state: which `AzureAssignedIdentity` objects should exist,
//! computed from pods × bindings (by selector) × identities.
//!
//! A pure function of its inputs, as MIC computes it:
//! - a pod counts once it is scheduled (`spec.nodeName`) and has not
//!   finished (`Succeeded`/`Failed` pods need no identity);
//! - every binding, in any namespace, whose `selector` equals the pod's
//!   `aadpodidbinding` label applies, in namespace/name order;
//! - the binding's identity is looked up in the binding's namespace;
//! - in namespaced mode (`--force-namespaced`, or the identity's
//!   `aadpodidentity.k8s.io/Behavior: namespaced` annotation) pod, binding
//!   and identity must share a namespace;
//! - an identity podid's rules refuse ([`podid_api::validation`], the same
//!   rules the agent applies) is skipped, and so is a user-assigned
//!   identity (type 0) without a `resourceID`, which cannot be assigned;
//! - the object is named `<pod>-<podNamespace>-<identity>` and lives in the
//!   identity's namespace in namespaced mode, else in `default`; when two
//!   assignments get the same name the first wins (MIC #1065).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::ResourceExt;
use podid_api::{
    ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity,
    AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, AzureIdentity, AzureIdentityBinding,
    IdentityType, NODENAME_LABEL, POD_LABEL,
    validation::{IdentityRefusal, IdentityRules, check_identity, is_user_assigned_identity_id},
};

/// Namespace of assignments outside namespaced mode (MIC's choice).
pub const DEFAULT_ASSIGNMENT_NAMESPACE: &str = "default";

/// One assignment that should exist.
#[derive(Clone, Debug)]
pub struct DesiredAssignment {
    /// `AzureAssignedIdentity` name.
    pub name: String,
    /// `AzureAssignedIdentity` namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Node the pod is scheduled on.
    pub node: String,
    /// The identity.
    pub identity: Arc<AzureIdentity>,
    /// The binding that selected the pod.
    pub binding: Arc<AzureIdentityBinding>,
}

/// Why a pod × binding pair produced no assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The binding names an identity that does not exist in its namespace.
    IdentityNotFound,
    /// A user-assigned identity without a `resourceID` (only a `clientID`):
    /// nothing to assign; managed mode's way of naming an identity.
    NoResourceId,
    /// The identity breaks podid's rules.
    Refused(IdentityRefusal),
    /// Namespaced mode, and the pod is in another namespace.
    NamespaceMismatch,
    /// Another assignment already has this name.
    DuplicateName,
}

/// A pod × binding pair that was skipped, for logs and events.
#[derive(Clone, Debug)]
pub struct Skipped {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// `namespace/name` of the binding.
    pub binding: String,
    /// The identity, when the skip is its fault ([`SkipReason::Refused`]).
    pub identity: Option<Arc<AzureIdentity>>,
    /// Why.
    pub reason: SkipReason,
}

/// The result of [`compute`].
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    /// Assignments, sorted by namespace and name, names unique.
    pub assignments: Vec<DesiredAssignment>,
    /// Pairs that produced nothing.
    pub skipped: Vec<Skipped>,
}

/// Computes the desired assignments. Pure: same inputs, same output.
pub fn compute(
    pods: &[Arc<Pod>],
    bindings: &[Arc<AzureIdentityBinding>],
    identities: &[Arc<AzureIdentity>],
    force_namespaced: bool,
    rules: &IdentityRules,
) -> DesiredState {
    let mut by_selector: HashMap<&str, Vec<&Arc<AzureIdentityBinding>>> = HashMap::new();
    for binding in bindings {
        if binding.spec.selector.is_empty() {
            continue;
        }
        by_selector
            .entry(binding.spec.selector.as_str())
            .or_default()
            .push(binding);
    }
    for list in by_selector.values_mut() {
        list.sort_by(|a, b| {
            (a.namespace().unwrap_or_default(), a.name_any())
                .cmp(&(b.namespace().unwrap_or_default(), b.name_any()))
        });
    }
    let mut by_name: HashMap<(&str, &str), &Arc<AzureIdentity>> = HashMap::new();
    for identity in identities {
        if let (Some(ns), Some(name)) = (
            identity.metadata.namespace.as_deref(),
            identity.metadata.name.as_deref(),
        ) {
            by_name.insert((ns, name), identity);
        }
    }

    // Pods in a stable order, so that "first one wins" is deterministic.
    let mut pods: Vec<&Arc<Pod>> = pods.iter().collect();
    pods.sort_by(|a, b| {
        (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
            .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
    });

    let mut out = DesiredState::default();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for pod in pods {
        let Some(node) = scheduled_node(pod) else {
            continue;
        };
        let Some(selector) = pod.metadata.labels.as_ref().and_then(|l| l.get(POD_LABEL)) else {
            continue;
        };
        let Some(matching) = by_selector.get(selector.as_str()) else {
            continue;
        };
        let (Some(pod_name), Some(pod_ns)) = (
            pod.metadata.name.as_deref(),
            pod.metadata.namespace.as_deref(),
        ) else {
            continue;
        };
        for binding in matching {
            let binding_ns = binding.metadata.namespace.as_deref().unwrap_or_default();
            let skip = |reason| Skipped {
                pod: format!("{pod_ns}/{pod_name}"),
                binding: format!("{binding_ns}/{}", binding.name_any()),
                identity: None,
                reason,
            };
            let Some(identity) = by_name
                .get(&(binding_ns, binding.spec.azure_identity.as_str()))
                .copied()
            else {
                out.skipped.push(skip(SkipReason::IdentityNotFound));
                continue;
            };
            if let Err(refusal) = check_identity(identity, rules) {
                out.skipped.push(Skipped {
                    identity: Some(identity.clone()),
                    ..skip(SkipReason::Refused(refusal))
                });
                continue;
            }
            if identity.spec.kind() == Ok(IdentityType::UserAssignedMsi)
                && identity.spec.resource_id.is_empty()
            {
                out.skipped.push(skip(SkipReason::NoResourceId));
                continue;
            }
            let namespaced = force_namespaced || identity.is_namespaced();
            if namespaced && binding_ns != pod_ns {
                out.skipped.push(skip(SkipReason::NamespaceMismatch));
                continue;
            }
            let identity_name = identity.name_any();
            let name = AzureAssignedIdentity::name_for(pod_name, pod_ns, &identity_name);
            let namespace = if namespaced {
                binding_ns.to_string()
            } else {
                DEFAULT_ASSIGNMENT_NAMESPACE.to_string()
            };
            if !seen.insert((namespace.clone(), name.clone())) {
                out.skipped.push(skip(SkipReason::DuplicateName));
                continue;
            }
            out.assignments.push(DesiredAssignment {
                name,
                namespace,
                pod: pod_name.to_string(),
                pod_namespace: pod_ns.to_string(),
                node: node.to_string(),
                identity: identity.clone(),
                binding: (*binding).clone(),
            });
        }
    }
    out.assignments
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// The node a pod is scheduled on, if it still needs an identity.
fn scheduled_node(pod: &Pod) -> Option<&str> {
    let node = pod.spec.as_ref()?.node_name.as_deref()?;
    if node.is_empty() {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    Some(node)
}

impl DesiredAssignment {
    /// Whether the identity is assigned to the VM/VMSS (type 0). Service
    /// principals (types 1 and 2) need no ARM call.
    pub fn needs_arm(&self) -> bool {
        is_arm_identity(&self.identity)
    }

    /// The identity's lower-cased ARM ID (the key ARM compares on).
    pub fn resource_key(&self) -> String {
        self.identity.spec.resource_id.to_ascii_lowercase()
    }

    /// The `AzureAssignedIdentity` object MIC would write for this
    /// assignment, in `state`.
    pub fn to_object(&self, state: AssignedIdentityState) -> AzureAssignedIdentity {
        let mut object = AzureAssignedIdentity::new(
            &self.name,
            AzureAssignedIdentitySpec {
                azure_identity_ref: Some(embedded(&self.identity)),
                azure_binding_ref: Some(embedded(&self.binding)),
                pod: self.pod.clone(),
                pod_namespace: self.pod_namespace.clone(),
                nodename: self.node.clone(),
                replicas: None,
            },
        );
        object.metadata = ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some([(NODENAME_LABEL.to_string(), self.node.clone())].into()),
            finalizers: Some(vec![ASSIGNED_IDENTITY_FINALIZER.to_string()]),
            ..ObjectMeta::default()
        };
        object.status = Some(AzureAssignedIdentityStatus {
            available_replicas: 1,
            status: state.as_str().to_string(),
        });
        object
    }

    /// Whether `existing` records this same assignment (MIC's match: binding
    /// and identity by name and resourceVersion, pod, namespace and node).
    pub fn matches(&self, existing: &AzureAssignedIdentity) -> bool {
        let spec = &existing.spec;
        let same_ref = |embedded: Option<&ObjectMeta>, live: &ObjectMeta| {
            embedded
                .is_some_and(|m| m.name == live.name && m.resource_version == live.resource_version)
        };
        spec.pod == self.pod
            && spec.pod_namespace == self.pod_namespace
            && spec.nodename == self.node
            && same_ref(
                spec.azure_identity_ref.as_ref().map(|i| &i.metadata),
                &self.identity.metadata,
            )
            && same_ref(
                spec.azure_binding_ref.as_ref().map(|b| &b.metadata),
                &self.binding.metadata,
            )
    }
}

/// Whether an identity is a user-assigned managed identity that lives on
/// the VM/VMSS.
pub fn is_arm_identity(identity: &AzureIdentity) -> bool {
    identity.spec.kind() == Ok(IdentityType::UserAssignedMsi)
        && is_user_assigned_identity_id(&identity.spec.resource_id)
}

/// A copy of an object for embedding: what identifies it, without the
/// server's bookkeeping (managedFields) that would bloat every assignment.
fn embedded<K>(object: &K) -> K
where
    K: Clone + kube::Resource,
{
    let mut copy = object.clone();
    let meta = copy.meta_mut();
    meta.managed_fields = None;
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use podid_api::{AzureIdentityBindingSpec, AzureIdentitySpec, BEHAVIOR_ANNOTATION};

    fn uami(sub: &str, name: &str) -> String {
        format!(
            "/subscriptions/{sub}/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
    }

    pub(crate) fn identity(ns: &str, name: &str, rv: &str) -> Arc<AzureIdentity> {
        let mut i = AzureIdentity::new(
            name,
            AzureIdentitySpec {
                identity_type: 0,
                resource_id: uami("sub", name),
                client_id: format!("client-{name}"),
                ..Default::default()
            },
        );
        i.metadata.namespace = Some(ns.into());
        i.metadata.resource_version = Some(rv.into());
        Arc::new(i)
    }

    pub(crate) fn binding(
        ns: &str,
        name: &str,
        identity: &str,
        selector: &str,
    ) -> Arc<AzureIdentityBinding> {
        let mut b = AzureIdentityBinding::new(
            name,
            AzureIdentityBindingSpec {
                azure_identity: identity.into(),
                selector: selector.into(),
                weight: None,
            },
        );
        b.metadata.namespace = Some(ns.into());
        b.metadata.resource_version = Some("1".into());
        Arc::new(b)
    }

    pub(crate) fn pod(
        ns: &str,
        name: &str,
        node: Option<&str>,
        label: Option<&str>,
        phase: &str,
    ) -> Arc<Pod> {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some(ns.into());
        if let Some(label) = label {
            p.metadata.labels = Some([(POD_LABEL.to_string(), label.to_string())].into());
        }
        p.spec = Some(PodSpec {
            node_name: node.map(String::from),
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        Arc::new(p)
    }

    fn names(state: &DesiredState) -> Vec<String> {
        state
            .assignments
            .iter()
            .map(|a| format!("{}/{}", a.namespace, a.name))
            .collect()
    }

    #[test]
    fn pod_binding_identity_make_one_assignment_named_as_mic() {
        let state = compute(
            &[pod("app", "web-0", Some("node-1"), Some("web"), "Running")],
            &[binding("app", "web-binding", "web-id", "web")],
            &[identity("app", "web-id", "7")],
            false,
            &IdentityRules::default(),
        );
        assert_eq!(names(&state), ["default/web-0-app-web-id"]);
        let a = &state.assignments[0];
        assert_eq!(a.node, "node-1");
        assert!(a.needs_arm());
        let object = a.to_object(AssignedIdentityState::Created);
        assert_eq!(object.labels()[NODENAME_LABEL], "node-1");
        assert_eq!(object.finalizers(), [ASSIGNED_IDENTITY_FINALIZER]);
        assert_eq!(object.spec.pod_namespace, "app");
        assert_eq!(
            object
                .status
                .as_ref()
                .map(|s| (s.available_replicas, s.status.as_str())),
            Some((1, "Created"))
        );
        assert!(a.matches(&object));
    }

    #[test]
    fn unscheduled_finished_and_unlabelled_pods_need_nothing() {
        let bindings = [binding("app", "b", "id", "sel")];
        let identities = [identity("app", "id", "1")];
        let state = compute(
            &[
                pod("app", "pending", None, Some("sel"), "Pending"),
                pod("app", "done", Some("n"), Some("sel"), "Succeeded"),
                pod("app", "failed", Some("n"), Some("sel"), "Failed"),
                pod("app", "nolabel", Some("n"), None, "Running"),
                pod("app", "other", Some("n"), Some("other"), "Running"),
            ],
            &bindings,
            &identities,
            false,
            &IdentityRules::default(),
        );
        assert!(state.assignments.is_empty(), "{:?}", names(&state));
    }

    #[test]
    fn identity_is_looked_up_in_the_binding_namespace() {
        let state = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[binding("team", "b", "id", "sel")],
            &[identity("app", "id", "1")],
            false,
            &IdentityRules::default(),
        );
        assert!(state.assignments.is_empty());
        assert_eq!(state.skipped[0].reason, SkipReason::IdentityNotFound);
    }

    #[test]
    fn cross_namespace_binding_works_unless_namespaced() {
        let pods = [pod("app", "p", Some("n"), Some("sel"), "Running")];
        let bindings = [binding("team", "b", "id", "sel")];
        let identities = [identity("team", "id", "1")];
        let open = compute(
            &pods,
            &bindings,
            &identities,
            false,
            &IdentityRules::default(),
        );
        assert_eq!(names(&open), ["default/p-app-id"]);

        let forced = compute(
            &pods,
            &bindings,
            &identities,
            true,
            &IdentityRules::default(),
        );
        assert!(forced.assignments.is_empty());
        assert_eq!(forced.skipped[0].reason, SkipReason::NamespaceMismatch);

        let mut annotated = (*identities[0]).clone();
        annotated.metadata.annotations =
            Some([(BEHAVIOR_ANNOTATION.to_string(), "namespaced".to_string())].into());
        let by_annotation = compute(
            &pods,
            &bindings,
            &[Arc::new(annotated)],
            false,
            &IdentityRules::default(),
        );
        assert!(by_annotation.assignments.is_empty());
    }

    #[test]
    fn namespaced_assignments_live_in_the_identity_namespace() {
        let state = compute(
            &[pod("team", "p", Some("n"), Some("sel"), "Running")],
            &[binding("team", "b", "id", "sel")],
            &[identity("team", "id", "1")],
            true,
            &IdentityRules::default(),
        );
        assert_eq!(names(&state), ["team/p-team-id"]);
    }

    #[test]
    fn several_bindings_give_several_assignments_and_duplicates_keep_the_first() {
        let state = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[
                binding("b-ns", "b2", "id", "sel"),
                binding("a-ns", "b1", "id", "sel"),
                binding("app", "b3", "other", "sel"),
            ],
            &[
                identity("a-ns", "id", "1"),
                identity("b-ns", "id", "1"),
                identity("app", "other", "1"),
            ],
            false,
            &IdentityRules::default(),
        );
        assert_eq!(names(&state), ["default/p-app-id", "default/p-app-other"]);
        let first = state
            .assignments
            .iter()
            .find(|a| a.name == "p-app-id")
            .unwrap();
        assert_eq!(first.binding.namespace().as_deref(), Some("a-ns"));
        assert_eq!(state.skipped.len(), 1);
        assert_eq!(state.skipped[0].reason, SkipReason::DuplicateName);
    }

    #[test]
    fn malformed_resource_ids_are_skipped_but_service_principals_are_kept() {
        let mut bad = (*identity("app", "bad", "1")).clone();
        bad.spec.resource_id =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/x"
                .into();
        let mut sp = (*identity("app", "sp", "1")).clone();
        sp.spec.identity_type = 1;
        sp.spec.resource_id.clear();
        sp.spec.tenant_id = "tenant".into();
        sp.spec.client_password = Some(podid_api::SecretReference {
            name: "sp".into(),
            namespace: String::new(),
        });
        let state = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[
                binding("app", "b1", "bad", "sel"),
                binding("app", "b2", "sp", "sel"),
            ],
            &[Arc::new(bad), Arc::new(sp)],
            false,
            &IdentityRules::default(),
        );
        assert_eq!(names(&state), ["default/p-app-sp"]);
        assert!(!state.assignments[0].needs_arm());
        assert!(matches!(
            state.skipped[0].reason,
            SkipReason::Refused(IdentityRefusal::InvalidResourceId(_))
        ));
    }

    #[test]
    fn identities_the_rules_refuse_are_skipped_and_named() {
        let mut names_nothing = (*identity("app", "nothing", "1")).clone();
        names_nothing.spec.resource_id.clear();
        names_nothing.spec.client_id.clear();
        let kubelet = identity("app", "kubelet", "1");
        let rules = IdentityRules {
            node_identities: vec![kubelet.spec.resource_id.to_uppercase()],
            ..IdentityRules::default()
        };
        let state = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[
                binding("app", "b1", "nothing", "sel"),
                binding("app", "b2", "kubelet", "sel"),
            ],
            &[Arc::new(names_nothing), kubelet],
            false,
            &rules,
        );
        assert!(state.assignments.is_empty());
        let kinds: Vec<&str> = state
            .skipped
            .iter()
            .map(|s| match &s.reason {
                SkipReason::Refused(refusal) => refusal.kind(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["no_selector", "node_identity"]);
        assert!(state.skipped.iter().all(|s| s.identity.is_some()));
    }

    #[test]
    fn a_changed_identity_no_longer_matches() {
        let state = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[binding("app", "b", "id", "sel")],
            &[identity("app", "id", "1")],
            false,
            &IdentityRules::default(),
        );
        let old = state.assignments[0].to_object(AssignedIdentityState::Assigned);
        let changed = compute(
            &[pod("app", "p", Some("n"), Some("sel"), "Running")],
            &[binding("app", "b", "id", "sel")],
            &[identity("app", "id", "2")],
            false,
            &IdentityRules::default(),
        );
        assert!(!changed.assignments[0].matches(&old));
        let moved = compute(
            &[pod("app", "p", Some("other"), Some("sel"), "Running")],
            &[binding("app", "b", "id", "sel")],
            &[identity("app", "id", "1")],
            false,
            &IdentityRules::default(),
        );
        assert!(!moved.assignments[0].matches(&old));
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let pods = [
            pod("a", "p1", Some("n1"), Some("s"), "Running"),
            pod("b", "p2", Some("n2"), Some("s"), "Running"),
        ];
        let bindings = [binding("a", "b", "id", "s"), binding("b", "b", "id", "s")];
        let identities = [identity("a", "id", "1"), identity("b", "id", "1")];
        let one = compute(
            &pods,
            &bindings,
            &identities,
            false,
            &IdentityRules::default(),
        );
        let mut pods_rev = pods.to_vec();
        pods_rev.reverse();
        let mut bindings_rev = bindings.to_vec();
        bindings_rev.reverse();
        let two = compute(
            &pods_rev,
            &bindings_rev,
            &identities,
            false,
            &IdentityRules::default(),
        );
        assert_eq!(names(&one), names(&two));
        let binding_of = |s: &DesiredState| {
            s.assignments
                .iter()
                .map(|a| a.binding.namespace())
                .collect::<Vec<_>>()
        };
        assert_eq!(binding_of(&one), binding_of(&two));
    }
}
