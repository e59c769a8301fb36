//! One watch per kind, each feeding a kube-runtime reflector store, restarted
//! with backoff when the API server drops or refuses it, and the initial-sync
//! bookkeeping readiness waits on.

use std::{collections::BTreeMap, fmt::Debug, sync::Mutex};

use futures::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{info, warn};

use super::taint::error_chain;

/// Which watches have completed their first list.
#[derive(Debug)]
pub struct SyncTracker {
    kinds: Mutex<BTreeMap<&'static str, bool>>,
    all: watch::Sender<bool>,
}

impl SyncTracker {
    /// Tracks `kinds`, none synced yet.
    pub fn new(kinds: &[&'static str]) -> Self {
        Self {
            kinds: Mutex::new(kinds.iter().map(|k| (*k, false)).collect()),
            all: watch::Sender::new(kinds.is_empty()),
        }
    }

    /// Records that `kind` completed a list; returns whether it was its first.
    pub fn mark(&self, kind: &'static str) -> bool {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let first = kinds.insert(kind, true) != Some(true);
        let all = kinds.values().all(|synced| *synced);
        drop(kinds);
        self.all.send_if_modified(|current| {
            let changed = *current != all;
            *current = all;
            changed
        });
        first
    }

    /// Whether every watch has completed its first list.
    pub fn is_synced(&self) -> bool {
        *self.all.borrow()
    }

    /// The kinds not synced yet.
    pub fn pending(&self) -> Vec<&'static str> {
        self.kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, synced)| !**synced)
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// Waits until every watch has completed its first list.
    pub async fn wait(&self) {
        let mut all = self.all.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = all.wait_for(|synced| *synced).await;
    }
}

/// Runs the watch of `kind` into `writer` for ever: list, then watch; after
/// the API server drops the watch it resumes from the last resourceVersion,
/// or lists again if that is too old; errors back off (kube-runtime's
/// default: 0.8 s doubling to 30 s, with jitter). `on_event` sees each event
/// after the store applied it.
pub async fn run<K, F>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    sync: std::sync::Arc<SyncTracker>,
    mut on_event: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(&watcher::Event<K>) + Send + 'static,
{
    let stream = watcher(api, config)
        .default_backoff()
        // The agent never reads managed fields: keep them out of memory.
        .modify(|object: &mut K| object.managed_fields_mut().clear());
    let stream = reflector::reflector(writer, stream);
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone) {
                    if sync.mark(kind) {
                        info!(kind, "initial list done");
                    } else {
                        info!(kind, "listed again after the watch was lost");
                    }
                }
                on_event(&event);
            }
            Err(error) => {
                warn!(kind, error = %error_chain(&error), "watch failed; retrying with backoff");
            }
        }
    }
}
