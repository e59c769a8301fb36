//! `--startup-taint KEY`: the node carries a taint (for example
//! `podid.dev/agent-not-ready:NoSchedule`, put there by the node's
//! provisioning) so that no pod is scheduled before the redirect is in
//! place; the agent removes it once the redirect is attached and the
//! Kubernetes source has synced. This closes aad-pod-identity's race at
//! node start (pods reaching the real IMDS before NMI is up).
//!
//! The removal is a JSON merge patch of `spec.taints` carrying the node's
//! `resourceVersion`, so a concurrent change to the taints (by kubelet or
//! another controller) makes the API server answer 409 instead of being
//! overwritten; the agent then reads the node again.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tracing::{info, warn};

/// Attempts after a conflicting concurrent update.
const CONFLICT_ATTEMPTS: u32 = 5;

/// Why the taint could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    /// Reading the node failed.
    #[error("reading node {node}")]
    Get {
        /// The node.
        node: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Patching the node failed.
    #[error("removing taint {key} from node {node}")]
    Patch {
        /// The node.
        node: String,
        /// The taint key.
        key: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The taints kept changing under us.
    #[error(
        "node {node} kept changing; taint {key} not removed after {CONFLICT_ATTEMPTS} attempts"
    )]
    Conflicts {
        /// The node.
        node: String,
        /// The taint key.
        key: String,
    },
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// Removes every taint with `key` from `node`. Returns whether one was there.
pub async fn remove_taint(client: Client, node: &str, key: &str) -> Result<bool, TaintError> {
    let nodes: Api<Node> = Api::all(client);
    for _ in 0..CONFLICT_ATTEMPTS {
        let current = nodes.get(node).await.map_err(|source| TaintError::Get {
            node: node.to_string(),
            source,
        })?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let kept: Vec<_> = taints.iter().filter(|t| t.key != key).cloned().collect();
        if kept.len() == taints.len() {
            return Ok(false);
        }
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": if kept.is_empty() { serde_json::Value::Null } else { json!(kept) }},
        });
        match nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(node, key, "removed the startup taint");
                return Ok(true);
            }
            Err(error) if is_conflict(&error) => {
                warn!(
                    node,
                    key, "the node changed while removing the taint; retrying"
                );
            }
            Err(source) => {
                return Err(TaintError::Patch {
                    node: node.to_string(),
                    key: key.to_string(),
                    source,
                });
            }
        }
    }
    Err(TaintError::Conflicts {
        node: node.to_string(),
        key: key.to_string(),
    })
}

/// Removes the taint, retrying with backoff (up to a minute between
/// attempts) until it succeeds: the node must not stay tainted because the
/// API server was briefly unreachable.
pub async fn remove_taint_until_done(client: Client, node: String, key: String) {
    let mut delay = Duration::from_millis(500);
    loop {
        match remove_taint(client.clone(), &node, &key).await {
            Ok(removed) => {
                if !removed {
                    info!(node, key, "the node has no startup taint to remove");
                }
                return;
            }
            Err(error) => {
                warn!(error = %error_chain(&error), ?delay, "could not remove the startup taint; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// `error: cause: cause…`, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
