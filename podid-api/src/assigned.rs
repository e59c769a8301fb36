//! `AzureAssignedIdentity`: which identity is assigned to which pod's node,
//! written by the controller and read by the agent in standard mode.

use kube::CustomResource;
use schemars::{JsonSchema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::identity::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    AzureIdentityStatus,
};

/// Finalizer MIC puts on every AzureAssignedIdentity.
pub const ASSIGNED_IDENTITY_FINALIZER: &str =
    "azureassignedidentity.finalizers.aadpodidentity.k8s.io";
/// Label holding the node name, used by the agent's node-filtered watch.
pub const NODENAME_LABEL: &str = "nodename";

/// AzureAssignedIdentitySpec contains the relationship between an
/// AzureIdentity and an AzureIdentityBinding.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureAssignedIdentity",
    plural = "azureassignedidentities",
    namespaced,
    derive = "PartialEq",
    status = "AzureAssignedIdentityStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct AzureAssignedIdentitySpec {
    /// Full copy of the AzureIdentity this assignment is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "embedded_identity")]
    pub azure_identity_ref: Option<AzureIdentity>,
    /// Full copy of the AzureIdentityBinding that selected the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "embedded_binding")]
    pub azure_binding_ref: Option<AzureIdentityBinding>,
    /// Pod name.
    #[serde(default)]
    pub pod: String,
    /// Pod namespace.
    #[serde(default)]
    pub pod_namespace: String,
    /// Node the pod runs on.
    #[serde(default)]
    pub nodename: String,
    /// Unused; kept for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// AzureAssignedIdentityStatus contains the replica status of the resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureAssignedIdentityStatus {
    /// Unused; kept for compatibility (MIC writes 1).
    #[serde(default)]
    pub available_replicas: i32,
    /// `Created`, `Assigned` or `Unassigned`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
}

/// The lifecycle of an assignment, as `status.status` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AssignedIdentityState {
    /// Written before the identity is assigned to the VM/VMSS.
    Created,
    /// The identity is on the VM/VMSS.
    Assigned,
    /// Removed from the VM/VMSS; about to be deleted.
    Unassigned,
}

impl AssignedIdentityState {
    /// The string MIC writes.
    pub fn as_str(self) -> &'static str {
        match self {
            AssignedIdentityState::Created => "Created",
            AssignedIdentityState::Assigned => "Assigned",
            AssignedIdentityState::Unassigned => "Unassigned",
        }
    }

    /// Parses `status.status`. An empty status (written by very old MICs) is
    /// treated as assigned, as NMI does.
    pub fn parse(status: &str) -> Option<Self> {
        match status {
            "Created" => Some(AssignedIdentityState::Created),
            "Assigned" | "" => Some(AssignedIdentityState::Assigned),
            "Unassigned" => Some(AssignedIdentityState::Unassigned),
            _ => None,
        }
    }
}

impl AzureAssignedIdentity {
    /// The assignment's state, `None` for an unknown status string.
    pub fn state(&self) -> Option<AssignedIdentityState> {
        AssignedIdentityState::parse(
            self.status
                .as_ref()
                .map(|s| s.status.as_str())
                .unwrap_or(""),
        )
    }

    /// The name MIC gives the assignment of `identity` to `pod`.
    pub fn name_for(pod_name: &str, pod_namespace: &str, identity_name: &str) -> String {
        format!("{pod_name}-{pod_namespace}-{identity_name}")
    }
}

fn embedded(
    generator: &mut SchemaGenerator,
    spec: schemars::Schema,
    status: schemars::Schema,
    description: &str,
) -> schemars::Schema {
    let _ = generator;
    json_schema!({
        "description": description,
        "type": "object",
        "x-kubernetes-embedded-resource": true,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "spec": spec,
            "status": status,
        },
    })
}

fn embedded_identity(generator: &mut SchemaGenerator) -> schemars::Schema {
    let spec = generator.subschema_for::<AzureIdentitySpec>();
    let status = generator.subschema_for::<AzureIdentityStatus>();
    embedded(
        generator,
        spec,
        status,
        "AzureIdentityRef is an embedded resource referencing the AzureIdentity used by the AzureAssignedIdentity",
    )
}

fn embedded_binding(generator: &mut SchemaGenerator) -> schemars::Schema {
    let spec = generator.subschema_for::<AzureIdentityBindingSpec>();
    let status = generator.subschema_for::<AzureIdentityStatus>();
    embedded(
        generator,
        spec,
        status,
        "AzureBindingRef is an embedded resource referencing the AzureIdentityBinding used by the AzureAssignedIdentity",
    )
}
