//! The controller's own recent writes to `AzureAssignedIdentity` objects,
//! laid over the watch cache until the cache catches up.
//!
//! Without this a cycle that starts before the watch has delivered the
//! previous cycle's writes would see assignments still `Created` and redo
//! ARM work; and every one of our own writes would trigger a new cycle.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use podid_api::AzureAssignedIdentity;

use crate::plan::AssignmentKey;

/// An expectation older than this is dropped: the cache is then believed.
const EXPIRY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
enum Expected {
    Present(Arc<AzureAssignedIdentity>),
    Deleted,
}

/// Writes made by this controller and not yet seen in the cache.
#[derive(Debug, Default)]
pub(crate) struct Expectations {
    inner: Mutex<HashMap<AssignmentKey, (Expected, Instant)>>,
}

impl Expectations {
    /// We wrote `object` (as returned by the API server).
    pub(crate) fn wrote(&self, object: AzureAssignedIdentity) {
        let key = AssignmentKey::of(&object);
        if let Ok(mut inner) = self.inner.lock() {
            inner.insert(key, (Expected::Present(Arc::new(object)), Instant::now()));
        }
    }

    /// We deleted the object (or it is gone).
    pub(crate) fn deleted(&self, key: AssignmentKey) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.insert(key, (Expected::Deleted, Instant::now()));
        }
    }

    /// Whether a watch event for `object` is the echo of our own write.
    pub(crate) fn is_own_write(&self, object: &AzureAssignedIdentity) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        match inner.get(&AssignmentKey::of(object)) {
            Some((Expected::Present(ours), _)) => {
                ours.metadata.resource_version.is_some()
                    && ours.metadata.resource_version == object.metadata.resource_version
            }
            _ => false,
        }
    }

    /// Whether a watch delete event for `object` is the echo of our delete.
    pub(crate) fn is_own_delete(&self, object: &AzureAssignedIdentity) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        matches!(
            inner.get(&AssignmentKey::of(object)),
            Some((Expected::Deleted, _))
        )
    }

    /// The cache's objects with our newer writes laid over them. Expectations
    /// the cache has caught up with (or that expired) are dropped.
    pub(crate) fn overlay(
        &self,
        cached: Vec<Arc<AzureAssignedIdentity>>,
    ) -> Vec<Arc<AzureAssignedIdentity>> {
        let Ok(mut inner) = self.inner.lock() else {
            return cached;
        };
        let now = Instant::now();
        inner.retain(|_, (_, at)| now.duration_since(*at) < EXPIRY);
        let mut out = Vec::with_capacity(cached.len());
        let mut seen = std::collections::HashSet::new();
        for object in cached {
            let key = AssignmentKey::of(&object);
            match inner.get(&key) {
                Some((Expected::Present(ours), _)) => {
                    if ours.metadata.resource_version == object.metadata.resource_version {
                        inner.remove(&key);
                        out.push(object);
                    } else {
                        out.push(ours.clone());
                    }
                }
                Some((Expected::Deleted, _)) => {}
                None => out.push(object),
            }
            seen.insert(key);
        }
        let mut satisfied = Vec::new();
        for (key, (expected, _)) in inner.iter() {
            if seen.contains(key) {
                continue;
            }
            match expected {
                Expected::Present(ours) => out.push(ours.clone()),
                Expected::Deleted => satisfied.push(key.clone()),
            }
        }
        for key in satisfied {
            inner.remove(&key);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podid_api::{AzureAssignedIdentitySpec, AzureAssignedIdentityStatus};

    fn aai(name: &str, rv: &str, status: &str) -> AzureAssignedIdentity {
        let mut a = AzureAssignedIdentity::new(name, AzureAssignedIdentitySpec::default());
        a.metadata.namespace = Some("default".into());
        a.metadata.resource_version = Some(rv.into());
        a.status = Some(AzureAssignedIdentityStatus {
            available_replicas: 1,
            status: status.into(),
        });
        a
    }

    #[test]
    fn our_writes_win_until_the_cache_catches_up() {
        let e = Expectations::default();
        e.wrote(aai("a", "2", "Assigned"));
        let stale = vec![Arc::new(aai("a", "1", "Created"))];
        let view = e.overlay(stale);
        assert_eq!(view[0].status.as_ref().unwrap().status, "Assigned");
        assert!(e.is_own_write(&aai("a", "2", "Assigned")));
        assert!(!e.is_own_write(&aai("a", "3", "Assigned")));
        // The cache caught up: the expectation is dropped.
        let view = e.overlay(vec![Arc::new(aai("a", "2", "Assigned"))]);
        assert_eq!(view.len(), 1);
        let view = e.overlay(vec![Arc::new(aai("a", "3", "Created"))]);
        assert_eq!(view[0].metadata.resource_version.as_deref(), Some("3"));
    }

    #[test]
    fn created_objects_appear_and_deleted_ones_vanish_before_the_cache_knows() {
        let e = Expectations::default();
        e.wrote(aai("new", "5", "Created"));
        e.deleted(AssignmentKey::of(&aai("old", "1", "Assigned")));
        let view = e.overlay(vec![Arc::new(aai("old", "1", "Assigned"))]);
        let names: Vec<_> = view
            .iter()
            .map(|a| a.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["new"]);
        assert!(e.is_own_delete(&aai("old", "1", "Assigned")));
        // Once the cache dropped it, the delete expectation is satisfied.
        let view = e.overlay(vec![Arc::new(aai("new", "5", "Created"))]);
        assert_eq!(view.len(), 1);
        assert!(!e.is_own_delete(&aai("old", "1", "Assigned")));
    }
}
