//! Which identity a workload gets: bindings whose `selector` equals the
//! workload's `aadpodidbinding` label, their identities, the namespace rules,
//! and the identity the request names. Pure: the caller supplies a
//! [`IdentityCatalog`] snapshot, so the same rules serve standalone and
//! Kubernetes modes and are tested on their own.
//!
//! # Choosing among several identities
//! When several identities are bound to a workload and the request names none
//! (SDKs then ask for "the" managed identity), the agent picks the identity of
//! the binding whose `namespace/name` sorts first, byte-wise. This is stable
//! across restarts and nodes, unlike aad-pod-identity's informer order. To use
//! another of them, name it with `client_id`, `object_id` or `msi_res_id`.

use std::{collections::BTreeMap, sync::Arc};

use podid_api::{
    AzureIdentity, AzureIdentityBinding, POD_LABEL,
    validation::{IdentityRefusal, IdentityRules, check_identity},
};

/// How bindings and identities may cross namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceRule {
    /// aad-pod-identity standard mode: a binding in any namespace may select
    /// the pod; its identity lives in the binding's namespace. An identity
    /// annotated `aadpodidentity.k8s.io/Behavior: namespaced` is usable only
    /// from its own namespace.
    Cluster,
    /// `--force-namespaced`, and managed mode: pod, binding and identity must
    /// share a namespace.
    Namespaced,
}

/// The identity objects the decision reads.
pub trait IdentityCatalog {
    /// Bindings whose `spec.selector` equals `selector`, in any namespace.
    fn bindings_with_selector(&self, selector: &str) -> Vec<Arc<AzureIdentityBinding>>;
    /// The identity `namespace/name`, if it exists.
    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AzureIdentity>>;
}

/// Which identity the request asked for (IMDS query parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedIdentity {
    /// None named: the SDK asks for "the" managed identity.
    Any,
    /// `client_id`.
    ClientId(String),
    /// `object_id`. aad-pod-identity objects do not record object ids, so this
    /// matches only an identity whose `clientID` or `resourceID` equals it.
    ObjectId(String),
    /// `msi_res_id` / `mi_res_id`: the identity's ARM resource id.
    ResourceId(String),
}

/// An identity the workload may use, with the binding that grants it.
#[derive(Debug, Clone)]
pub struct BoundIdentity {
    /// The AzureIdentity.
    pub identity: Arc<AzureIdentity>,
    /// The AzureIdentityBinding that selected the workload.
    pub binding: Arc<AzureIdentityBinding>,
}

impl BoundIdentity {
    /// `namespace/name` of the identity.
    pub fn identity_key(&self) -> String {
        object_key(
            self.identity.metadata.namespace.as_deref(),
            self.identity.metadata.name.as_deref(),
        )
    }

    /// `namespace/name` of the binding.
    pub fn binding_key(&self) -> String {
        object_key(
            self.binding.metadata.namespace.as_deref(),
            self.binding.metadata.name.as_deref(),
        )
    }
}

/// `namespace/name`, with `default` for objects without a namespace (as in a
/// standalone workloads file).
pub fn object_key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.filter(|n| !n.is_empty()).unwrap_or("default"),
        name.unwrap_or("")
    )
}

/// Why no identity was chosen. Every variant is answered with IMDS's
/// 400 `Identity not found`, immediately; the text goes to the audit record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoIdentity {
    #[error("the workload has no {POD_LABEL} label")]
    NoLabel,
    #[error("no AzureIdentityBinding has selector {selector:?}")]
    NoBinding { selector: String },
    #[error(
        "bindings with selector {selector:?} exist, but none is usable from namespace {namespace} ({detail})"
    )]
    NoUsableBinding {
        selector: String,
        namespace: String,
        detail: String,
        /// Identities the bindings named that podid's rules refuse.
        refused: Vec<RefusedIdentity>,
    },
    #[error("the requested identity {requested} is not bound to this workload (bound: {bound})")]
    NotBound { requested: String, bound: String },
}

/// An identity a binding named, refused by podid's rules
/// ([`podid_api::validation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedIdentity {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Why.
    pub refusal: IdentityRefusal,
}

fn binding_namespace(binding: &AzureIdentityBinding) -> &str {
    binding
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// Identities bound to a workload in `namespace` with `labels`, in the
/// documented deterministic order (binding `namespace/name`).
pub fn bound_identities(
    catalog: &dyn IdentityCatalog,
    rule: NamespaceRule,
    checks: &IdentityRules,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Vec<BoundIdentity>, NoIdentity> {
    let selector = labels.get(POD_LABEL).ok_or(NoIdentity::NoLabel)?;
    let mut bindings = catalog.bindings_with_selector(selector);
    if bindings.is_empty() {
        return Err(NoIdentity::NoBinding {
            selector: selector.clone(),
        });
    }
    bindings
        .sort_by_key(|b| object_key(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()));
    let mut bound = Vec::new();
    let mut skipped = Vec::new();
    let mut refused = Vec::new();
    for binding in bindings {
        let binding_ns = binding_namespace(&binding).to_string();
        if rule == NamespaceRule::Namespaced && binding_ns != namespace {
            skipped.push(format!(
                "binding {binding_ns}/{} is in another namespace",
                binding.metadata.name.as_deref().unwrap_or("")
            ));
            continue;
        }
        let Some(identity) = catalog.identity(&binding_ns, &binding.spec.azure_identity) else {
            skipped.push(format!(
                "binding {binding_ns}/{} names AzureIdentity {binding_ns}/{}, which does not exist",
                binding.metadata.name.as_deref().unwrap_or(""),
                binding.spec.azure_identity
            ));
            continue;
        };
        if identity.is_namespaced() && binding_ns != namespace {
            skipped.push(format!(
                "AzureIdentity {binding_ns}/{} is namespaced",
                binding.spec.azure_identity
            ));
            continue;
        }
        if let Err(refusal) = check_identity(&identity, checks) {
            skipped.push(format!(
                "AzureIdentity {binding_ns}/{} is refused: {refusal}",
                binding.spec.azure_identity
            ));
            refused.push(RefusedIdentity {
                namespace: binding_ns.clone(),
                name: binding.spec.azure_identity.clone(),
                refusal,
            });
            continue;
        }
        bound.push(BoundIdentity { identity, binding });
    }
    if bound.is_empty() {
        return Err(NoIdentity::NoUsableBinding {
            selector: selector.clone(),
            namespace: namespace.to_string(),
            detail: skipped.join("; "),
            refused,
        });
    }
    Ok(bound)
}

/// Picks the identity the request gets from the bound ones.
pub fn choose(
    bound: &[BoundIdentity],
    requested: &RequestedIdentity,
) -> Result<BoundIdentity, NoIdentity> {
    let matches = |b: &&BoundIdentity| {
        let spec = &b.identity.spec;
        match requested {
            RequestedIdentity::Any => true,
            RequestedIdentity::ClientId(id) => spec.client_id.eq_ignore_ascii_case(id),
            RequestedIdentity::ObjectId(id) => {
                spec.client_id.eq_ignore_ascii_case(id) || spec.resource_id.eq_ignore_ascii_case(id)
            }
            RequestedIdentity::ResourceId(id) => spec.resource_id.eq_ignore_ascii_case(id),
        }
    };
    bound
        .iter()
        .find(matches)
        .cloned()
        .ok_or_else(|| NoIdentity::NotBound {
            requested: match requested {
                RequestedIdentity::Any => "any".to_string(),
                RequestedIdentity::ClientId(id) => format!("client_id={id}"),
                RequestedIdentity::ObjectId(id) => format!("object_id={id}"),
                RequestedIdentity::ResourceId(id) => format!("msi_res_id={id}"),
            },
            bound: bound
                .iter()
                .map(BoundIdentity::identity_key)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use podid_api::{AzureIdentityBindingSpec, AzureIdentitySpec, BEHAVIOR_ANNOTATION};

    #[derive(Default)]
    struct Catalog {
        identities: Vec<Arc<AzureIdentity>>,
        bindings: Vec<Arc<AzureIdentityBinding>>,
    }

    impl IdentityCatalog for Catalog {
        fn bindings_with_selector(&self, selector: &str) -> Vec<Arc<AzureIdentityBinding>> {
            self.bindings
                .iter()
                .filter(|b| b.spec.selector == selector)
                .cloned()
                .collect()
        }

        fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AzureIdentity>> {
            self.identities
                .iter()
                .find(|i| {
                    i.metadata.namespace.as_deref() == Some(namespace)
                        && i.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
    }

    impl Catalog {
        fn identity(mut self, ns: &str, name: &str, client_id: &str, namespaced: bool) -> Self {
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
            identity.metadata.namespace = Some(ns.into());
            if namespaced {
                identity.metadata.annotations =
                    Some([(BEHAVIOR_ANNOTATION.to_string(), "namespaced".to_string())].into());
            }
            self.identities.push(Arc::new(identity));
            self
        }

        fn binding(mut self, ns: &str, name: &str, identity: &str, selector: &str) -> Self {
            let mut binding = AzureIdentityBinding::new(
                name,
                AzureIdentityBindingSpec {
                    azure_identity: identity.into(),
                    selector: selector.into(),
                    weight: None,
                },
            );
            binding.metadata.namespace = Some(ns.into());
            self.bindings.push(Arc::new(binding));
            self
        }
    }

    fn labels(selector: &str) -> BTreeMap<String, String> {
        [(POD_LABEL.to_string(), selector.to_string())].into()
    }

    #[test]
    fn selector_gives_the_bound_identity() {
        let catalog = Catalog::default()
            .identity("app", "sql", "c-sql", false)
            .binding("app", "sql-binding", "sql", "sqlpodid");
        let bound = bound_identities(
            &catalog,
            NamespaceRule::Cluster,
            &IdentityRules::default(),
            "app",
            &labels("sqlpodid"),
        )
        .unwrap();
        let chosen = choose(&bound, &RequestedIdentity::Any).unwrap();
        assert_eq!(chosen.identity_key(), "app/sql");
        assert_eq!(chosen.binding_key(), "app/sql-binding");
    }

    #[test]
    fn no_label_no_binding_and_missing_identity_are_definite() {
        let catalog = Catalog::default().binding("app", "b", "ghost", "sqlpodid");
        assert_eq!(
            bound_identities(
                &catalog,
                NamespaceRule::Cluster,
                &IdentityRules::default(),
                "app",
                &BTreeMap::new()
            )
            .unwrap_err(),
            NoIdentity::NoLabel
        );
        assert!(matches!(
            bound_identities(
                &catalog,
                NamespaceRule::Cluster,
                &IdentityRules::default(),
                "app",
                &labels("other")
            ),
            Err(NoIdentity::NoBinding { .. })
        ));
        let err = bound_identities(
            &catalog,
            NamespaceRule::Cluster,
            &IdentityRules::default(),
            "app",
            &labels("sqlpodid"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn namespaced_rules_refuse_cross_namespace_bindings() {
        let catalog = Catalog::default()
            .identity("team-a", "id", "c-a", false)
            .binding("team-a", "b", "id", "shared");
        // Cluster rule: a pod in team-b is selected by team-a's binding (MIC semantics).
        assert!(
            bound_identities(
                &catalog,
                NamespaceRule::Cluster,
                &IdentityRules::default(),
                "team-b",
                &labels("shared")
            )
            .is_ok()
        );
        // Forced namespaced: refused.
        let err = bound_identities(
            &catalog,
            NamespaceRule::Namespaced,
            &IdentityRules::default(),
            "team-b",
            &labels("shared"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("another namespace"), "{err}");
        // Per-identity annotation: refused even under the cluster rule.
        let annotated = Catalog::default()
            .identity("team-a", "id", "c-a", true)
            .binding("team-a", "b", "id", "shared");
        let err = bound_identities(
            &annotated,
            NamespaceRule::Cluster,
            &IdentityRules::default(),
            "team-b",
            &labels("shared"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is namespaced"), "{err}");
        assert!(
            bound_identities(
                &annotated,
                NamespaceRule::Cluster,
                &IdentityRules::default(),
                "team-a",
                &labels("shared")
            )
            .is_ok()
        );
    }

    #[test]
    fn requested_identity_must_be_bound() {
        let catalog = Catalog::default()
            .identity("app", "a", "AAAA", false)
            .identity("app", "b", "bbbb", false)
            .binding("app", "zz-binding", "a", "sel")
            .binding("app", "aa-binding", "b", "sel");
        let bound = bound_identities(
            &catalog,
            NamespaceRule::Cluster,
            &IdentityRules::default(),
            "app",
            &labels("sel"),
        )
        .unwrap();
        // Deterministic default: binding app/aa-binding sorts first → identity b.
        assert_eq!(
            choose(&bound, &RequestedIdentity::Any)
                .unwrap()
                .identity_key(),
            "app/b"
        );
        // client ids compare case-insensitively.
        assert_eq!(
            choose(&bound, &RequestedIdentity::ClientId("aaaa".into()))
                .unwrap()
                .identity_key(),
            "app/a"
        );
        let by_resource = choose(
            &bound,
            &RequestedIdentity::ResourceId(
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a".into(),
            ),
        )
        .unwrap();
        assert_eq!(by_resource.identity_key(), "app/a");
        let err = choose(&bound, &RequestedIdentity::ClientId("someone-else".into())).unwrap_err();
        assert!(matches!(err, NoIdentity::NotBound { .. }));
        assert!(err.to_string().contains("client_id=someone-else"));
    }
}
