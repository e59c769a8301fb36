//! `AzureIdentity` and `AzureIdentityBinding`.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation on an `AzureIdentity` that makes it usable only by pods in its
/// own namespace (as `--forceNamespaced` does for all identities).
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";
/// Value of [`BEHAVIOR_ANNOTATION`] for namespaced behaviour.
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";

/// AzureIdentity is the specification of the identity data structure.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    plural = "azureidentities",
    namespaced,
    derive = "PartialEq",
    status = "AzureIdentityStatus",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"ClientID","type":"string","jsonPath":".spec.clientID"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentitySpec {
    /// UserAssignedMSI (0), service principal with a secret (1) or with a
    /// certificate (2).
    #[serde(rename = "type", default)]
    pub identity_type: i32,
    /// User assigned MSI resource id.
    #[serde(
        rename = "resourceID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub resource_id: String,
    /// Both User Assigned MSI and SP can use this field.
    #[serde(rename = "clientID", default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    /// Used for service principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_password: Option<SecretReference>,
    /// Service principal primary tenant id.
    #[serde(rename = "tenantID", default, skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    /// Service principal auxiliary tenant ids.
    #[serde(
        rename = "auxiliaryTenantIDs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auxiliary_tenant_ids: Option<Vec<String>>,
    /// Authority (Entra ID endpoint) override for service principals.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ad_endpoint: String,
    /// For service principal. Option param for specifying the AD details.
    #[serde(
        rename = "adResourceID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub ad_resource_id: String,
    /// Unused; kept for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
}

/// AzureIdentityStatus contains the replica status of the resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentityStatus {
    /// Unused; kept for compatibility.
    #[serde(default)]
    pub available_replicas: i32,
}

/// A reference to a Secret (`clientPassword`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretReference {
    /// Name is unique within a namespace to reference a secret resource.
    #[serde(default)]
    pub name: String,
    /// Namespace defines the space within which the secret name must be unique.
    #[serde(default)]
    pub namespace: String,
}

/// The kinds of identity `spec.type` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityType {
    /// 0: a user-assigned managed identity; tokens come from IMDS.
    UserAssignedMsi,
    /// 1: a service principal with a client secret.
    ServicePrincipal,
    /// 2: a service principal with a client certificate.
    ServicePrincipalCertificate,
}

/// `spec.type` holds a value no version of aad-pod-identity defines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown AzureIdentity type {0} (expected 0, 1 or 2)")]
pub struct UnknownIdentityType(pub i32);

impl IdentityType {
    /// The numeric value used in `spec.type`.
    pub fn as_i32(self) -> i32 {
        match self {
            IdentityType::UserAssignedMsi => 0,
            IdentityType::ServicePrincipal => 1,
            IdentityType::ServicePrincipalCertificate => 2,
        }
    }
}

impl TryFrom<i32> for IdentityType {
    type Error = UnknownIdentityType;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(IdentityType::UserAssignedMsi),
            1 => Ok(IdentityType::ServicePrincipal),
            2 => Ok(IdentityType::ServicePrincipalCertificate),
            other => Err(UnknownIdentityType(other)),
        }
    }
}

impl AzureIdentitySpec {
    /// The identity's kind, if `spec.type` is valid.
    pub fn kind(&self) -> Result<IdentityType, UnknownIdentityType> {
        IdentityType::try_from(self.identity_type)
    }
}

impl AzureIdentity {
    /// Whether the identity is restricted to its own namespace by annotation.
    pub fn is_namespaced(&self) -> bool {
        self.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BEHAVIOR_ANNOTATION))
            .is_some_and(|v| v.eq_ignore_ascii_case(BEHAVIOR_NAMESPACED))
    }
}

/// AzureIdentityBinding brings together the spec of matching pods and the
/// identity which they can use.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    namespaced,
    derive = "PartialEq",
    status = "AzureIdentityStatus",
    printcolumn = r#"{"name":"AzureIdentity","type":"string","jsonPath":".spec.azureIdentity"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".spec.selector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AzureIdentityBindingSpec {
    /// Name of the AzureIdentity, in the binding's namespace.
    #[serde(default)]
    pub azure_identity: String,
    /// Matched for equality against the pod label `aadpodidbinding`.
    #[serde(default)]
    pub selector: String,
    /// Unused by aad-pod-identity; kept for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
}
