//! `LocalWorkload` (`podid.dev/v1alpha1`): a workload in standalone mode,
//! named by a cgroup instead of a pod.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// API version of [`LocalWorkload`].
pub const LOCAL_WORKLOAD_API_VERSION: &str = "podid.dev/v1alpha1";

/// A workload outside Kubernetes: every process in (or below) `spec.cgroup`
/// is this workload, with these labels (for example `aadpodidbinding`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkload {
    /// Always `podid.dev/v1alpha1`.
    pub api_version: String,
    /// Always `LocalWorkload`.
    pub kind: String,
    /// Name, namespace and labels, as a pod's.
    pub metadata: LocalWorkloadMetadata,
    /// Which cgroup is the workload.
    pub spec: LocalWorkloadSpec,
}

/// Metadata of a [`LocalWorkload`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkloadMetadata {
    /// Workload name (plays the pod name in audit records).
    pub name: String,
    /// Namespace (bindings and identities are looked up here).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels; `aadpodidbinding` selects bindings.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Spec of a [`LocalWorkload`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalWorkloadSpec {
    /// cgroup path relative to the agent's `--cgroup-root`, for example
    /// `system.slice/reporting.service`. Processes in this cgroup or any
    /// cgroup below it are this workload.
    pub cgroup: String,
}

fn default_namespace() -> String {
    "default".to_string()
}
