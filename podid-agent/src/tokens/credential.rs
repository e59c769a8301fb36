//! What to ask upstream for ([`Credential`]), and the cache key built from
//! it: (identity, credential kind + authority + tenant + client id,
//! normalised resource).

use std::fmt;

use podid_api::{
    AzureIdentity, IdentityType,
    validation::{IdentityRefusal, check_authority, is_user_assigned_identity_id},
};

use super::{TokenError, config::base_url, resource::normalise_resource};

/// A reference to a Kubernetes Secret (or its standalone stand-in).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretRef {
    /// Namespace of the Secret.
    pub namespace: String,
    /// Name of the Secret.
    pub name: String,
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a request to IMDS names the managed identity it wants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImdsSelector {
    /// `client_id`: the identity's application (client) id.
    ClientId(String),
    /// `object_id`: its principal (object) id.
    ObjectId(String),
    /// `msi_res_id`: its ARM resource id.
    ResourceId(String),
}

impl ImdsSelector {
    /// The IMDS query parameter and its value.
    pub fn param(&self) -> (&'static str, &str) {
        match self {
            ImdsSelector::ClientId(id) => ("client_id", id),
            ImdsSelector::ObjectId(id) => ("object_id", id),
            ImdsSelector::ResourceId(id) => ("msi_res_id", id),
        }
    }
}

impl fmt::Display for ImdsSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (param, value) = self.param();
        write!(f, "{param}={value}")
    }
}

/// The upstream credential of an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user-assigned managed identity (aad-pod-identity type 0) through
    /// IMDS. It always names the identity: IMDS answers a request that names
    /// none with the node's own identity.
    ManagedIdentity {
        /// Which identity: `clientID`, else `resourceID`.
        selector: ImdsSelector,
    },
    /// The node's own identity through IMDS, for pods an
    /// AzurePodIdentityException matches, and only for them: with the
    /// selector the pod sent, or none (the system-assigned identity).
    NodeIdentity {
        /// What the pod named, if anything.
        selector: Option<ImdsSelector>,
    },
    /// A service principal with a client secret (type 1).
    ClientSecret {
        /// Tenant id (or verified domain).
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// Entra ID authority; the configured default when `None`.
        authority: Option<String>,
        /// Secret holding the client secret (its first value).
        secret: SecretRef,
    },
    /// A service principal with a certificate (type 2): a PKCS#12 bundle
    /// and its password.
    ClientCertificate {
        /// Tenant id (or verified domain).
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// Entra ID authority; the configured default when `None`.
        authority: Option<String>,
        /// Secret holding keys `certificate` and `password`.
        secret: SecretRef,
    },
}

impl TryFrom<&AzureIdentity> for Credential {
    type Error = IdentityRefusal;

    /// The credential to ask upstream with, from an AzureIdentity's spec.
    /// Callers check the spec against the operator's rules first
    /// ([`podid_api::validation::check_identity`]); this conversion refuses
    /// on its own only what would make an upstream request ambiguous.
    fn try_from(identity: &AzureIdentity) -> Result<Self, Self::Error> {
        let spec = &identity.spec;
        let kind = spec.kind().map_err(|e| IdentityRefusal::UnknownType(e.0))?;
        let authority = (!spec.ad_endpoint.trim().is_empty()).then(|| spec.ad_endpoint.clone());
        let secret = || {
            spec.client_password
                .as_ref()
                .filter(|r| !r.name.is_empty())
                .map(|r| SecretRef {
                    namespace: if r.namespace.is_empty() {
                        identity
                            .metadata
                            .namespace
                            .clone()
                            .filter(|n| !n.is_empty())
                            .unwrap_or_else(|| "default".into())
                    } else {
                        r.namespace.clone()
                    },
                    name: r.name.clone(),
                })
                .ok_or(IdentityRefusal::NoSecret {
                    kind: kind.as_i32(),
                })
        };
        Ok(match kind {
            IdentityType::UserAssignedMsi => {
                let selector = if !spec.client_id.trim().is_empty() {
                    ImdsSelector::ClientId(spec.client_id.trim().to_string())
                } else if !spec.resource_id.trim().is_empty() {
                    ImdsSelector::ResourceId(spec.resource_id.trim().to_string())
                } else {
                    return Err(IdentityRefusal::NoSelector);
                };
                Credential::ManagedIdentity { selector }
            }
            IdentityType::ServicePrincipal => Credential::ClientSecret {
                tenant_id: spec.tenant_id.clone(),
                client_id: spec.client_id.clone(),
                authority,
                secret: secret()?,
            },
            IdentityType::ServicePrincipalCertificate => Credential::ClientCertificate {
                tenant_id: spec.tenant_id.clone(),
                client_id: spec.client_id.clone(),
                authority,
                secret: secret()?,
            },
        })
    }
}

impl Credential {
    /// A short name of the credential kind (logs, cache key).
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::ManagedIdentity { .. } => "managed-identity",
            Credential::NodeIdentity { .. } => "node-identity",
            Credential::ClientSecret { .. } => "client-secret",
            Credential::ClientCertificate { .. } => "client-certificate",
        }
    }

    /// The client id the credential names, if any.
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Credential::ManagedIdentity {
                selector: ImdsSelector::ClientId(id),
            }
            | Credential::NodeIdentity {
                selector: Some(ImdsSelector::ClientId(id)),
            } => Some(id),
            Credential::ManagedIdentity { .. } | Credential::NodeIdentity { .. } => None,
            Credential::ClientSecret { client_id, .. }
            | Credential::ClientCertificate { client_id, .. } => Some(client_id),
        }
    }

    /// The IMDS selector of a managed-identity credential.
    pub fn imds_selector(&self) -> Option<&ImdsSelector> {
        match self {
            Credential::ManagedIdentity { selector } => Some(selector),
            Credential::NodeIdentity { selector } => selector.as_ref(),
            _ => None,
        }
    }
}

/// Client ids are GUIDs; allow what a GUID or app id URI-less id can hold.
fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A selector must be a plain id, and a binding's resource id a user-assigned
/// identity's: IMDS would otherwise answer for whatever it names.
fn check_selector(selector: &ImdsSelector, binding: bool) -> Result<(), String> {
    match selector {
        ImdsSelector::ClientId(id) | ImdsSelector::ObjectId(id) if !valid_client_id(id) => {
            Err(format!("{selector} is not a valid id"))
        }
        ImdsSelector::ResourceId(id)
            if id.is_empty()
                || id.len() > 512
                || (binding && !is_user_assigned_identity_id(id)) =>
        {
            Err(format!(
                "{selector} is not a user-assigned identity's resource id"
            ))
        }
        _ => Ok(()),
    }
}

/// Tenant ids are GUIDs or verified domains; anything else could change the
/// token endpoint's path.
fn valid_tenant(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !id.starts_with('.')
}

/// One cache entry's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    /// `namespace/name` of the identity the request was decided for.
    pub(crate) identity: String,
    pub(crate) kind: &'static str,
    /// Authority (service principals only), lower-case.
    pub(crate) authority: String,
    /// Tenant, lower-case.
    pub(crate) tenant: String,
    /// Client id, lower-case.
    pub(crate) client_id: String,
    /// Normalised resource.
    pub(crate) resource: String,
}

/// A validated request: the cache key, the resource to send upstream and
/// the authority to use.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) key: CacheKey,
    pub(crate) resource: String,
    /// Base URL of the Entra ID authority (service principals).
    pub(crate) authority: String,
}

/// Validates a request and builds its cache key.
pub(crate) fn resolve(
    identity: &str,
    credential: &Credential,
    resource: &str,
    default_authority: &str,
    allowed_authorities: &[String],
) -> Result<Resolved, TokenError> {
    let resource = normalise_resource(resource)?;
    let invalid = |reason: String| TokenError::InvalidCredential {
        identity: identity.to_owned(),
        reason,
    };
    let (tenant, client_id, authority) = match credential {
        Credential::ManagedIdentity { selector } => {
            check_selector(selector, true).map_err(invalid)?;
            (String::new(), selector.to_string(), String::new())
        }
        Credential::NodeIdentity { selector } => {
            if let Some(selector) = selector {
                check_selector(selector, false).map_err(invalid)?;
            }
            (
                String::new(),
                selector
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                String::new(),
            )
        }
        Credential::ClientSecret {
            tenant_id,
            client_id,
            authority,
            ..
        }
        | Credential::ClientCertificate {
            tenant_id,
            client_id,
            authority,
            ..
        } => {
            if !valid_tenant(tenant_id) {
                return Err(invalid(format!("tenant id {tenant_id:?} is not valid")));
            }
            if !valid_client_id(client_id) {
                return Err(invalid(format!("client id {client_id:?} is not valid")));
            }
            let authority = match authority.as_deref().filter(|a| !a.trim().is_empty()) {
                Some(a) => {
                    // Checked here too, whatever the caller checked: the
                    // secret or the signed assertion goes to this host.
                    check_authority(a, allowed_authorities)
                        .map_err(|refusal| invalid(refusal.to_string()))?;
                    base_url(a).map_err(|e| invalid(format!("authority: {e}")))?
                }
                None => default_authority.to_owned(),
            };
            (tenant_id.clone(), client_id.clone(), authority)
        }
    };
    Ok(Resolved {
        key: CacheKey {
            identity: identity.to_owned(),
            kind: credential.kind(),
            authority: authority.to_ascii_lowercase(),
            tenant: tenant.to_ascii_lowercase(),
            client_id: client_id.to_ascii_lowercase(),
            resource: resource.clone(),
        },
        resource,
        authority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTHORITY: &str = "https://login.microsoftonline.com";

    fn secret_credential(tenant: &str, client: &str) -> Credential {
        Credential::ClientSecret {
            tenant_id: tenant.into(),
            client_id: client.into(),
            authority: None,
            secret: SecretRef {
                namespace: "default".into(),
                name: "sp".into(),
            },
        }
    }

    #[test]
    fn keys_separate_identities_kinds_and_clients() {
        let mi = Credential::ManagedIdentity {
            selector: ImdsSelector::ClientId("AAAA-1".into()),
        };
        let a = resolve("ns/a", &mi, "https://vault.azure.net", AUTHORITY, &[]).expect("valid");
        let b = resolve("ns/b", &mi, "https://vault.azure.net", AUTHORITY, &[]).expect("valid");
        assert_ne!(a.key, b.key, "identity is part of the key");
        let node = resolve(
            "ns/a",
            &Credential::NodeIdentity { selector: None },
            "https://vault.azure.net",
            AUTHORITY,
            &[],
        )
        .expect("valid");
        assert_ne!(a.key, node.key);
        let lower = resolve(
            "ns/a",
            &Credential::ManagedIdentity {
                selector: ImdsSelector::ClientId("aaaa-1".into()),
            },
            "https://vault.azure.net",
            AUTHORITY,
            &[],
        )
        .expect("valid");
        assert_eq!(a.key, lower.key, "client ids compare case-insensitively");
        let sp = resolve(
            "ns/a",
            &secret_credential("t1", "AAAA-1"),
            "https://vault.azure.net",
            AUTHORITY,
            &[],
        )
        .expect("valid");
        assert_ne!(a.key, sp.key, "same client id, other credential kind");
        assert_eq!(sp.authority, AUTHORITY);
    }

    #[test]
    fn rejects_ids_that_could_change_the_request() {
        for (tenant, client) in [
            ("../x", "c"),
            ("t/oauth2", "c"),
            ("t", "c&resource=x"),
            ("", "c"),
            ("t", ""),
        ] {
            let err = resolve(
                "ns/a",
                &secret_credential(tenant, client),
                "r",
                AUTHORITY,
                &[],
            )
            .expect_err("invalid ids are rejected");
            assert_eq!(err.http_status(), 403, "{err}");
        }
        let err = resolve(
            "ns/a",
            &Credential::ManagedIdentity {
                selector: ImdsSelector::ClientId("x&client_id=y".into()),
            },
            "r",
            AUTHORITY,
            &[],
        )
        .expect_err("invalid client id");
        assert_eq!(err.http_status(), 403);
    }

    #[test]
    fn a_credential_may_name_its_own_authority() {
        let credential = Credential::ClientCertificate {
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "c".into(),
            authority: Some("https://login.microsoftonline.us/".into()),
            secret: SecretRef {
                namespace: "n".into(),
                name: "s".into(),
            },
        };
        let resolved = resolve("ns/a", &credential, "r", AUTHORITY, &[]).expect("valid");
        assert_eq!(resolved.authority, "https://login.microsoftonline.us");
        assert_eq!(resolved.key.authority, "https://login.microsoftonline.us");
    }
}
