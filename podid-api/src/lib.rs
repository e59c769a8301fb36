//! The custom resources podid shares with Azure AD Pod Identity
//! (`aadpodidentity.k8s.io/v1`), so that existing `AzureIdentity`,
//! `AzureIdentityBinding`, `AzureAssignedIdentity` and
//! `AzurePodIdentityException` objects keep working unchanged, plus podid's
//! own `LocalWorkload` (`podid.dev/v1alpha1`) for standalone mode.
//!
//! Field names, types and printer columns follow aad-pod-identity v1.8's CRDs.
//! [`crds`] renders the CustomResourceDefinitions; `manifests/crds/` holds the
//! committed copy, kept in sync by a drift test.

mod assigned;
mod crd;
mod documents;
mod exception;
mod identity;
mod local;
pub mod validation;

pub use assigned::{
    ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity,
    AzureAssignedIdentitySpec, AzureAssignedIdentityStatus, NODENAME_LABEL,
};
pub use crd::{crds, crds_yaml};
pub use documents::{Document, DocumentError, parse_documents};
pub use exception::{AzurePodIdentityException, AzurePodIdentityExceptionSpec, ExceptionStatus};
pub use identity::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec,
    AzureIdentityStatus, BEHAVIOR_ANNOTATION, BEHAVIOR_NAMESPACED, IdentityType, SecretReference,
    UnknownIdentityType,
};
pub use local::{LocalWorkload, LocalWorkloadMetadata, LocalWorkloadSpec};

/// API group of the aad-pod-identity resources.
pub const GROUP: &str = "aadpodidentity.k8s.io";
/// Their only version.
pub const VERSION: &str = "v1";
/// The pod label whose value is matched against a binding's `selector`.
pub const POD_LABEL: &str = "aadpodidbinding";
