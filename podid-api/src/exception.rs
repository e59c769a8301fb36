//! `AzurePodIdentityException`: pods (matched by label, per namespace) that
//! are served with the node's own identity.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// AzurePodIdentityExceptionSpec matches pods with the selector defined. If a
/// request originates from a pod that matches the selector, it is sent
/// straight to IMDS (here: served with the node identity, through the agent).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    plural = "azurepodidentityexceptions",
    namespaced,
    derive = "PartialEq",
    status = "ExceptionStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct AzurePodIdentityExceptionSpec {
    /// Any single pair present on a pod (value compared case-insensitively)
    /// makes it an exception.
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
}

/// Status of an AzurePodIdentityException.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ExceptionStatus {
    /// Unused; kept for compatibility.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}

impl AzurePodIdentityException {
    /// Whether a pod with `labels` is excepted by this object (as NMI decides:
    /// any one label present with a case-insensitively equal value).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec.pod_labels.iter().any(|(key, value)| {
            labels
                .get(key)
                .is_some_and(|actual| actual.eq_ignore_ascii_case(value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exception(labels: &[(&str, &str)]) -> AzurePodIdentityException {
        AzurePodIdentityException::new(
            "mic",
            AzurePodIdentityExceptionSpec {
                pod_labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
    }

    #[test]
    fn any_single_label_matches_case_insensitively() {
        let e = exception(&[("app", "mic"), ("component", "mic")]);
        let pod: BTreeMap<_, _> = [("app".to_string(), "MIC".to_string())].into();
        assert!(e.matches(&pod));
        let other: BTreeMap<_, _> = [("app".to_string(), "web".to_string())].into();
        assert!(!e.matches(&other));
        assert!(!e.matches(&BTreeMap::new()));
    }
}
