//! Azure Resource Manager: reading and changing the user-assigned identities
//! of VMs and VM scale sets.
//!
//! The client is `azure_mgmt_compute`'s, with its `azure_core` pipeline. Its
//! generated `UserAssignedIdentities` model (0.21) is an empty struct, so a
//! typed GET or PATCH silently drops the identity map: identity bodies are
//! therefore parsed and built as raw JSON ([`identity`]) and sent through the
//! same pipeline, where a policy puts the raw body on the wire and refuses
//! any identity PATCH that was not built that way ([`policy`]).

mod auth;
mod client;
pub mod identity;
mod policy;
mod transport;

pub use auth::{ClientSecretCredential, ImdsCredential};
pub use client::{ArmClient, ArmOptions, UpdateOutcome};
pub use identity::IdentityState;
pub use policy::{ArmOperation, RetrySettings};
pub use transport::HyperTransport;

use podid_api::validation::is_user_assigned_identity_id;

/// A failed ARM call, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// ARM answered with an error status.
    #[error("{operation} {target}: HTTP {status} {code}: {message}")]
    Status {
        /// e.g. `vmss_update`.
        operation: &'static str,
        /// The VM / scale set.
        target: String,
        /// HTTP status.
        status: u16,
        /// ARM error code (`FailedIdentityOperation`, `LinkedAuthorizationFailed`, …).
        code: String,
        /// ARM error message.
        message: String,
    },
    /// The request could not be sent or the answer not read.
    #[error("{operation} {target}: {source}")]
    Transport {
        /// e.g. `vm_get`.
        operation: &'static str,
        /// The VM / scale set.
        target: String,
        /// The underlying error.
        #[source]
        source: azure_core::Error,
    },
    /// ARM's answer was not what its contract says.
    #[error("{operation} {target}: unexpected response: {message}")]
    Body {
        /// e.g. `vm_get`.
        operation: &'static str,
        /// The VM / scale set.
        target: String,
        /// What was wrong.
        message: String,
    },
    /// The long-running operation ended in failure.
    #[error("identity update of {target} {status}: {code}: {message}")]
    Operation {
        /// The VM / scale set.
        target: String,
        /// `Failed` or `Canceled`.
        status: String,
        /// ARM error code.
        code: String,
        /// ARM error message.
        message: String,
    },
    /// The long-running operation did not finish in time.
    #[error("identity update of {target} did not finish within {seconds} s")]
    Timeout {
        /// The VM / scale set.
        target: String,
        /// The limit.
        seconds: u64,
    },
    /// The client could not be built.
    #[error("ARM client: {0}")]
    Setup(String),
}

impl ArmError {
    /// HTTP status, if ARM answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ArmError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Lower-cased user-assigned identity IDs named in the error (ARM quotes
    /// the identities it could not assign, e.g. `FailedIdentityOperation` or
    /// `LinkedAuthorizationFailed`).
    pub fn identity_ids(&self) -> Vec<String> {
        let text = match self {
            ArmError::Status { message, .. } | ArmError::Operation { message, .. } => message,
            _ => return Vec::new(),
        };
        identity_ids_in(text)
    }
}

/// Finds user-assigned identity ARM IDs inside free text.
pub fn identity_ids_in(text: &str) -> Vec<String> {
    let lower = text.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = lower[from..].find("/subscriptions/") {
        let start = from + pos;
        let end = lower[start..]
            .find(|c: char| c.is_whitespace() || "'\"`,;()[]{}<>\\".contains(c))
            .map(|e| start + e)
            .unwrap_or(lower.len());
        let candidate = lower[start..end].trim_end_matches(['.', ':']);
        if is_user_assigned_identity_id(candidate) && !out.iter().any(|c| c == candidate) {
            out.push(candidate.to_string());
        }
        from = end.max(start + 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_ids_are_found_in_arm_messages() {
        let message = "Identity operation for resource '/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{\"error\":{\"code\":\"NotFound\",\"message\":\"Resource '/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/Missing' does not exist.\"}}'.'.";
        assert_eq!(
            identity_ids_in(message),
            [
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/missing"
            ]
        );
        let linked = "does not have permission to perform action 'Microsoft.ManagedIdentity/userAssignedIdentities/assign/action' on the linked scope(s) '/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a,/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b'";
        assert_eq!(identity_ids_in(linked).len(), 2);
        assert!(identity_ids_in("throttled").is_empty());
    }
}
