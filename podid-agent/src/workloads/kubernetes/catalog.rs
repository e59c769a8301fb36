//! The identity objects, read from the reflectors' stores, and the
//! invalidation of cached tokens when they change.
//!
//! [`Catalog`] answers the decision's questions from the stores as they are
//! at the moment of the request: a binding or identity deleted is gone from
//! the next request on. [`Invalidator`] follows the identity and binding
//! watches and drops the cached tokens of every identity that was deleted,
//! changed, or lost (or changed) a binding, so a token fetched under the old
//! objects is never served again.

use std::{collections::HashMap, sync::Arc};

use kube::runtime::reflector::{ObjectRef, Store};
use podid_api::{AzureIdentity, AzureIdentityBinding, AzureIdentitySpec};
use tracing::info;

use crate::{
    identity::{IdentityCatalog, object_key},
    tokens::TokenService,
};

/// Drops cached tokens. Implemented by [`TokenService`]; tests record calls.
pub trait TokenInvalidation: Send + Sync {
    /// Drops every cached token of `identity` (`namespace/name`).
    fn forget_identity(&self, identity: &str);
}

impl TokenInvalidation for TokenService {
    fn forget_identity(&self, identity: &str) {
        TokenService::forget_identity(self, identity);
    }
}

/// A view of the identity objects over the reflectors' stores.
#[derive(Clone)]
pub struct Catalog {
    identities: Store<AzureIdentity>,
    bindings: Store<AzureIdentityBinding>,
}

impl Catalog {
    /// A view over the two stores.
    pub fn new(identities: Store<AzureIdentity>, bindings: Store<AzureIdentityBinding>) -> Self {
        Self {
            identities,
            bindings,
        }
    }
}

impl IdentityCatalog for Catalog {
    fn bindings_with_selector(&self, selector: &str) -> Vec<Arc<AzureIdentityBinding>> {
        self.bindings
            .state_filter(|binding| binding.spec.selector == selector)
    }

    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AzureIdentity>> {
        self.identities.get(&ObjectRef::new(name).within(namespace))
    }
}

/// What a binding grants, for change detection: (identity key, selector).
type BindingGrant = (String, String);

/// Follows identity and binding changes and forgets the tokens they make stale.
pub struct Invalidator {
    tokens: Arc<dyn TokenInvalidation>,
    identities: HashMap<String, AzureIdentitySpec>,
    bindings: HashMap<String, BindingGrant>,
}

fn binding_grant(binding: &AzureIdentityBinding) -> BindingGrant {
    (
        object_key(
            binding.metadata.namespace.as_deref(),
            Some(binding.spec.azure_identity.as_str()),
        ),
        binding.spec.selector.clone(),
    )
}

impl Invalidator {
    /// Forgets through `tokens`.
    pub fn new(tokens: Arc<dyn TokenInvalidation>) -> Self {
        Self {
            tokens,
            identities: HashMap::new(),
            bindings: HashMap::new(),
        }
    }

    fn forget(&self, identity: &str, why: &str) {
        info!(identity, why, "forgetting cached tokens");
        self.tokens.forget_identity(identity);
    }

    /// Compares the identities now in `store` with the last ones seen.
    pub fn identities_changed(&mut self, store: &Store<AzureIdentity>) {
        let now: HashMap<String, AzureIdentitySpec> = store
            .state()
            .iter()
            .map(|i| {
                (
                    object_key(i.metadata.namespace.as_deref(), i.metadata.name.as_deref()),
                    i.spec.clone(),
                )
            })
            .collect();
        for (key, spec) in &self.identities {
            match now.get(key) {
                None => self.forget(key, "AzureIdentity deleted"),
                Some(current) if current != spec => self.forget(key, "AzureIdentity changed"),
                Some(_) => {}
            }
        }
        self.identities = now;
    }

    /// Compares the bindings now in `store` with the last ones seen.
    pub fn bindings_changed(&mut self, store: &Store<AzureIdentityBinding>) {
        let now: HashMap<String, BindingGrant> = store
            .state()
            .iter()
            .map(|b| {
                (
                    object_key(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()),
                    binding_grant(b),
                )
            })
            .collect();
        for (key, grant) in &self.bindings {
            match now.get(key) {
                None => self.forget(&grant.0, "AzureIdentityBinding deleted"),
                Some(current) if current != grant => {
                    self.forget(&grant.0, "AzureIdentityBinding changed")
                }
                Some(_) => {}
            }
        }
        self.bindings = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;
    use podid_api::AzureIdentityBindingSpec;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl TokenInvalidation for Recorder {
        fn forget_identity(&self, identity: &str) {
            self.0.lock().unwrap().push(identity.to_string());
        }
    }

    fn binding(name: &str, identity: &str, selector: &str) -> AzureIdentityBinding {
        let mut b = AzureIdentityBinding::new(
            name,
            AzureIdentityBindingSpec {
                azure_identity: identity.into(),
                selector: selector.into(),
                weight: None,
            },
        );
        b.metadata.namespace = Some("app".into());
        b
    }

    #[test]
    fn changed_or_deleted_bindings_forget_their_identity() {
        let recorder = Arc::new(Recorder::default());
        let mut invalidator = Invalidator::new(recorder.clone());
        let (store, mut writer) = kube::runtime::reflector::store::<AzureIdentityBinding>();
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(binding("b1", "id1", "s1")));
        writer.apply_watcher_event(&Event::InitApply(binding("b2", "id2", "s2")));
        writer.apply_watcher_event(&Event::InitDone);
        invalidator.bindings_changed(&store);
        assert!(recorder.0.lock().unwrap().is_empty());

        writer.apply_watcher_event(&Event::Apply(binding("b1", "id1", "other")));
        invalidator.bindings_changed(&store);
        writer.apply_watcher_event(&Event::Delete(binding("b2", "id2", "s2")));
        invalidator.bindings_changed(&store);
        assert_eq!(*recorder.0.lock().unwrap(), vec!["app/id1", "app/id2"]);
        // Unrelated updates (same grant) forget nothing.
        writer.apply_watcher_event(&Event::Apply(binding("b1", "id1", "other")));
        invalidator.bindings_changed(&store);
        assert_eq!(recorder.0.lock().unwrap().len(), 2);
    }
}
