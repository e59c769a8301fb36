//! Which `AzureIdentity` specs podid accepts: the same rules in the agent
//! (before it asks anything upstream) and in the controller (before it
//! assigns anything to a VM).
//!
//! Each rule closes a route to an identity the pod must not get:
//! - a user-assigned identity (type 0) must name itself, by `clientID` or
//!   `resourceID`: a request to IMDS that names no identity is answered
//!   with the VM's own (system-assigned) identity;
//! - a `resourceID` must have the shape of a user-assigned identity's ARM
//!   ID, so it cannot name the VM or anything else;
//! - a service principal's `clientPassword` Secret must be in the identity's
//!   namespace wherever the operator asked for namespaced behaviour, so that
//!   whoever may create an identity in one namespace cannot read another's
//!   credentials through it;
//! - `adEndpoint` must be an https URL of a known Entra ID authority (or one
//!   the operator added), so the secret or signed assertion is never sent to
//!   another host;
//! - an identity that is the node's own (the kubelet identity, for one) is
//!   refused unless the operator allows it.

use crate::{AzureIdentity, IdentityType};

/// The Entra ID authority hosts of the Azure clouds, as the Microsoft
/// identity platform documents them ("National clouds",
/// learn.microsoft.com/entra/identity-platform/authentication-national-cloud)
/// and as the Azure SDKs' `AzureAuthorityHosts` name them: global Azure,
/// Azure Government, and Azure operated by 21Vianet (both of its host names).
pub const KNOWN_AUTHORITY_HOSTS: [&str; 4] = [
    "login.microsoftonline.com",
    "login.microsoftonline.us",
    "login.chinacloudapi.cn",
    "login.partner.microsoftonline.cn",
];

/// The operator's choices the rules depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// A `clientPassword` Secret must be in the identity's own namespace
    /// (`--force-namespaced`, managed mode, or the explicit flag).
    pub same_namespace_secrets: bool,
    /// Authorities allowed besides [`KNOWN_AUTHORITY_HOSTS`]: base URLs
    /// (`https://host[:port][/path]`) the operator named, and the configured
    /// default authority.
    pub extra_authorities: Vec<String>,
    /// The node's own identities: client ids and ARM resource ids, compared
    /// case-insensitively.
    pub node_identities: Vec<String>,
    /// Let an AzureIdentity name one of [`IdentityRules::node_identities`].
    pub allow_node_identities: bool,
}

/// The rules' command-line flags, the same in the agent and the controller.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct IdentityRuleArgs {
    /// The node's own identities, by client id or ARM resource id
    /// (comma-separated): every AzureIdentity naming one is refused unless
    /// --allow-node-identities. The cloud config's userAssignedIdentityID
    /// (the kubelet identity on AKS) is added when the cloud config is read.
    #[arg(
        long = "node-identity",
        env = "PODID_NODE_IDENTITIES",
        value_delimiter = ',',
        value_name = "ID"
    )]
    pub node_identities: Vec<String>,

    /// Let an AzureIdentity name one of the node's own identities.
    #[arg(long, env = "PODID_ALLOW_NODE_IDENTITIES")]
    pub allow_node_identities: bool,

    /// Entra ID authorities (base URLs, comma-separated) an AzureIdentity's
    /// adEndpoint may name, besides the Azure clouds' own
    /// (login.microsoftonline.com, .us, login.chinacloudapi.cn,
    /// login.partner.microsoftonline.cn) and the configured default.
    #[arg(
        long = "allowed-authority",
        env = "PODID_ALLOWED_AUTHORITIES",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub allowed_authorities: Vec<String>,

    /// Refuse an AzureIdentity whose clientPassword Secret is in another
    /// namespace, in every mode (always so with --force-namespaced and in
    /// managed mode).
    #[arg(long, env = "PODID_SAME_NAMESPACE_SECRETS")]
    pub same_namespace_secrets: bool,
}

#[cfg(feature = "cli")]
impl IdentityRuleArgs {
    /// The rules: `namespaced` is `--force-namespaced` or managed mode,
    /// `default_authority` the configured one, `discovered` node identities
    /// found elsewhere (the cloud config).
    pub fn rules(
        &self,
        namespaced: bool,
        default_authority: &str,
        discovered: impl IntoIterator<Item = String>,
    ) -> IdentityRules {
        let mut node_identities: Vec<String> = self
            .node_identities
            .iter()
            .chain(&discovered.into_iter().collect::<Vec<_>>())
            .map(|id| id.trim().to_string())
            .filter(|id| !id.is_empty())
            .collect();
        node_identities.sort_by_key(|id| id.to_ascii_lowercase());
        node_identities.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        let mut extra_authorities = self.allowed_authorities.clone();
        if !default_authority.trim().is_empty() {
            extra_authorities.push(default_authority.to_string());
        }
        IdentityRules {
            same_namespace_secrets: self.same_namespace_secrets || namespaced,
            extra_authorities,
            node_identities,
            allow_node_identities: self.allow_node_identities,
        }
    }
}

/// Why an `AzureIdentity` is refused. The text is what the audit record and
/// the Kubernetes Event say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefusal {
    /// `spec.type` is not 0, 1 or 2.
    #[error("unknown AzureIdentity type {0} (expected 0, 1 or 2)")]
    UnknownType(i32),
    /// Type 0 with neither `clientID` nor `resourceID`.
    #[error(
        "a user-assigned identity (type 0) must name itself by clientID or resourceID: IMDS answers a request that names no identity with the node's own identity"
    )]
    NoSelector,
    /// A `resourceID` that is not a user-assigned identity's ARM ID.
    #[error(
        "resourceID {0:?} is not a user-assigned identity (/subscriptions/…/resourceGroups/…/providers/Microsoft.ManagedIdentity/userAssignedIdentities/…)"
    )]
    InvalidResourceId(String),
    /// A service principal without `tenantID` or `clientID`.
    #[error("a service principal (type {kind}) needs tenantID and clientID")]
    IncompletePrincipal {
        /// `spec.type`.
        kind: i32,
    },
    /// A service principal without a `clientPassword` Secret.
    #[error("a service principal (type {kind}) needs a clientPassword Secret reference")]
    NoSecret {
        /// `spec.type`.
        kind: i32,
    },
    /// The Secret is in another namespace while the rules want it local.
    #[error(
        "clientPassword names Secret {secret_namespace}/{secret}, outside the identity's namespace {namespace}; this node only reads Secrets in the identity's own namespace"
    )]
    ForeignSecret {
        /// The Secret's name.
        secret: String,
        /// The Secret's namespace.
        secret_namespace: String,
        /// The identity's namespace.
        namespace: String,
    },
    /// `adEndpoint` is not an https URL of an allowed authority.
    #[error("adEndpoint {endpoint:?} is refused: {why}")]
    Authority {
        /// The value given.
        endpoint: String,
        /// What is wrong with it.
        why: String,
    },
    /// The identity is one of the node's own.
    #[error(
        "{field} {value} is one of the node's own identities; podid gives it to no pod unless the operator allows it (--allow-node-identities)"
    )]
    NodeIdentity {
        /// `clientID` or `resourceID`.
        field: &'static str,
        /// Its value.
        value: String,
    },
}

impl IdentityRefusal {
    /// A short, stable name for metrics and Event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            IdentityRefusal::UnknownType(_) => "unknown_type",
            IdentityRefusal::NoSelector => "no_selector",
            IdentityRefusal::InvalidResourceId(_) => "invalid_resource_id",
            IdentityRefusal::IncompletePrincipal { .. } => "incomplete_principal",
            IdentityRefusal::NoSecret { .. } => "no_secret",
            IdentityRefusal::ForeignSecret { .. } => "foreign_secret",
            IdentityRefusal::Authority { .. } => "authority",
            IdentityRefusal::NodeIdentity { .. } => "node_identity",
        }
    }
}

/// Whether `id` has the shape of a user-assigned identity's ARM ID:
/// `/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME`
/// (case-insensitive), as MIC checks before assigning.
pub fn is_user_assigned_identity_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix('/') else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    parts.len() == 8
        && parts.iter().all(|p| !p.is_empty())
        && parts[0].eq_ignore_ascii_case("subscriptions")
        && parts[2].eq_ignore_ascii_case("resourcegroups")
        && parts[4].eq_ignore_ascii_case("providers")
        && parts[5].eq_ignore_ascii_case("Microsoft.ManagedIdentity")
        && parts[6].eq_ignore_ascii_case("userAssignedIdentities")
}

/// `scheme://authority` and the path of an https URL, lower-cased scheme
/// and host; `None` if it is not one.
fn https_origin(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| {
            url.get(..8)
                .filter(|s| s.eq_ignore_ascii_case("https://"))
                .map(|_| &url[8..])
        })
        .ok_or_else(|| "it is not an https URL".to_string())?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err("it has no plain host (user information is not allowed)".into());
    }
    if path.contains(['?', '#']) {
        return Err("it has a query or fragment".into());
    }
    Ok((
        authority.to_ascii_lowercase(),
        path.trim_end_matches('/').to_string(),
    ))
}

/// Checks an authority base URL (an `adEndpoint`) against the known Entra ID
/// hosts and `extra`, the base URLs the operator allowed (compared whole,
/// case-insensitively, without a trailing `/`).
pub fn check_authority(endpoint: &str, extra: &[String]) -> Result<(), IdentityRefusal> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    if extra.iter().any(|allowed| {
        allowed
            .trim()
            .trim_end_matches('/')
            .eq_ignore_ascii_case(trimmed)
    }) {
        return Ok(());
    }
    let refuse = |why: String| IdentityRefusal::Authority {
        endpoint: endpoint.to_string(),
        why,
    };
    let (authority, path) = https_origin(endpoint.trim()).map_err(refuse)?;
    if KNOWN_AUTHORITY_HOSTS.contains(&authority.as_str()) && path.is_empty() {
        Ok(())
    } else {
        Err(refuse(format!(
            "not a known Entra ID authority ({}) nor one the operator allowed",
            KNOWN_AUTHORITY_HOSTS.join(", ")
        )))
    }
}

fn namespace_of(identity: &AzureIdentity) -> &str {
    identity
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// The checks that need no operator choice: a known type, a user-assigned
/// identity that names itself (by a well-formed `resourceID` or a
/// `clientID`), a service principal with tenant, client and Secret. The
/// standalone workloads file is held to these when it loads.
pub fn check_shape(identity: &AzureIdentity) -> Result<(), IdentityRefusal> {
    let spec = &identity.spec;
    let kind = spec.kind().map_err(|e| IdentityRefusal::UnknownType(e.0))?;
    match kind {
        IdentityType::UserAssignedMsi => {
            if spec.client_id.trim().is_empty() && spec.resource_id.trim().is_empty() {
                return Err(IdentityRefusal::NoSelector);
            }
            if !spec.resource_id.is_empty() && !is_user_assigned_identity_id(&spec.resource_id) {
                return Err(IdentityRefusal::InvalidResourceId(spec.resource_id.clone()));
            }
        }
        IdentityType::ServicePrincipal | IdentityType::ServicePrincipalCertificate => {
            let kind = kind.as_i32();
            if spec.tenant_id.trim().is_empty() || spec.client_id.trim().is_empty() {
                return Err(IdentityRefusal::IncompletePrincipal { kind });
            }
            if spec
                .client_password
                .as_ref()
                .is_none_or(|s| s.name.is_empty())
            {
                return Err(IdentityRefusal::NoSecret { kind });
            }
        }
    }
    Ok(())
}

/// Checks `identity` against its shape ([`check_shape`]) and the operator's
/// rules. `Ok` means podid may use it.
pub fn check_identity(
    identity: &AzureIdentity,
    rules: &IdentityRules,
) -> Result<(), IdentityRefusal> {
    check_shape(identity)?;
    let spec = &identity.spec;
    let is_node = |value: &str| {
        !value.is_empty()
            && rules
                .node_identities
                .iter()
                .any(|node| node.trim().eq_ignore_ascii_case(value.trim()))
    };
    for (field, value) in [
        ("clientID", &spec.client_id),
        ("resourceID", &spec.resource_id),
    ] {
        if !rules.allow_node_identities && is_node(value) {
            return Err(IdentityRefusal::NodeIdentity {
                field,
                value: value.clone(),
            });
        }
    }
    if let Some(secret) = spec.client_password.as_ref().filter(|s| !s.name.is_empty()) {
        let namespace = namespace_of(identity);
        let secret_namespace = if secret.namespace.is_empty() {
            namespace
        } else {
            secret.namespace.as_str()
        };
        if rules.same_namespace_secrets
            && secret_namespace != namespace
            && spec.kind() != Ok(IdentityType::UserAssignedMsi)
        {
            return Err(IdentityRefusal::ForeignSecret {
                secret: secret.name.clone(),
                secret_namespace: secret_namespace.to_string(),
                namespace: namespace.to_string(),
            });
        }
    }
    if spec.kind() != Ok(IdentityType::UserAssignedMsi) && !spec.ad_endpoint.trim().is_empty() {
        check_authority(&spec.ad_endpoint, &rules.extra_authorities)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AzureIdentitySpec, SecretReference};

    const UAMI: &str = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app";

    fn identity(namespace: &str, spec: AzureIdentitySpec) -> AzureIdentity {
        let mut identity = AzureIdentity::new("id", spec);
        identity.metadata.namespace = Some(namespace.into());
        identity
    }

    fn principal(secret_namespace: &str, ad_endpoint: &str) -> AzureIdentitySpec {
        AzureIdentitySpec {
            identity_type: 1,
            client_id: "app-id".into(),
            tenant_id: "tenant".into(),
            client_password: Some(SecretReference {
                name: "sp".into(),
                namespace: secret_namespace.into(),
            }),
            ad_endpoint: ad_endpoint.into(),
            ..AzureIdentitySpec::default()
        }
    }

    #[test]
    fn user_assigned_identities_must_name_themselves() {
        let rules = IdentityRules::default();
        let neither = identity("app", AzureIdentitySpec::default());
        assert_eq!(
            check_identity(&neither, &rules),
            Err(IdentityRefusal::NoSelector)
        );
        let by_resource = identity(
            "app",
            AzureIdentitySpec {
                resource_id: UAMI.into(),
                ..AzureIdentitySpec::default()
            },
        );
        assert_eq!(check_identity(&by_resource, &rules), Ok(()));
        let by_client = identity(
            "app",
            AzureIdentitySpec {
                client_id: "c".into(),
                ..AzureIdentitySpec::default()
            },
        );
        assert_eq!(check_identity(&by_client, &rules), Ok(()));
        let vm = identity(
            "app",
            AzureIdentitySpec {
                resource_id:
                    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"
                        .into(),
                ..AzureIdentitySpec::default()
            },
        );
        assert!(matches!(
            check_identity(&vm, &rules),
            Err(IdentityRefusal::InvalidResourceId(_))
        ));
        let unknown = identity(
            "app",
            AzureIdentitySpec {
                identity_type: 7,
                client_id: "c".into(),
                ..AzureIdentitySpec::default()
            },
        );
        assert_eq!(
            check_identity(&unknown, &rules),
            Err(IdentityRefusal::UnknownType(7))
        );
    }

    #[test]
    fn secrets_stay_in_the_identity_namespace_when_asked() {
        let foreign = identity("team-a", principal("team-b", ""));
        let lax = IdentityRules::default();
        assert_eq!(check_identity(&foreign, &lax), Ok(()));
        let strict = IdentityRules {
            same_namespace_secrets: true,
            ..IdentityRules::default()
        };
        let refusal = check_identity(&foreign, &strict).unwrap_err();
        assert_eq!(refusal.kind(), "foreign_secret");
        assert!(refusal.to_string().contains("team-b/sp"), "{refusal}");
        // An empty namespace means the identity's own.
        let local = identity("team-a", principal("", ""));
        assert_eq!(check_identity(&local, &strict), Ok(()));
        let explicit = identity("team-a", principal("team-a", ""));
        assert_eq!(check_identity(&explicit, &strict), Ok(()));
    }

    #[test]
    fn authorities_are_https_and_known() {
        let rules = IdentityRules::default();
        for ok in [
            "https://login.microsoftonline.com",
            "https://login.microsoftonline.com/",
            "https://LOGIN.microsoftonline.us",
            "https://login.chinacloudapi.cn/",
            "https://login.partner.microsoftonline.cn",
        ] {
            let id = identity("a", principal("", ok));
            assert_eq!(check_identity(&id, &rules), Ok(()), "{ok}");
        }
        for bad in [
            "http://login.microsoftonline.com",
            "https://login.microsoftonline.com.evil.example",
            "https://evil.example",
            "https://login.microsoftonline.com@evil.example",
            "https://login.microsoftonline.com/x",
            "https://login.microsoftonline.com?x=1",
            "login.microsoftonline.com",
            "ftp://login.microsoftonline.com",
        ] {
            let id = identity("a", principal("", bad));
            let refusal = check_identity(&id, &rules).unwrap_err();
            assert_eq!(refusal.kind(), "authority", "{bad}");
        }
        let custom = IdentityRules {
            extra_authorities: vec!["https://login.example.internal:8443/".into()],
            ..IdentityRules::default()
        };
        let id = identity("a", principal("", "https://login.example.internal:8443"));
        assert_eq!(check_identity(&id, &custom), Ok(()));
        let other_port = identity("a", principal("", "https://login.example.internal:9443"));
        assert!(check_identity(&other_port, &custom).is_err());
    }

    #[test]
    fn node_identities_are_refused_unless_allowed() {
        let kubelet = identity(
            "app",
            AzureIdentitySpec {
                client_id: "KUBELET-ID".into(),
                ..AzureIdentitySpec::default()
            },
        );
        let by_resource = identity(
            "app",
            AzureIdentitySpec {
                resource_id: UAMI.into(),
                ..AzureIdentitySpec::default()
            },
        );
        let rules = IdentityRules {
            node_identities: vec!["kubelet-id".into(), UAMI.to_uppercase()],
            ..IdentityRules::default()
        };
        assert_eq!(
            check_identity(&kubelet, &rules).unwrap_err().kind(),
            "node_identity"
        );
        assert_eq!(
            check_identity(&by_resource, &rules).unwrap_err().kind(),
            "node_identity"
        );
        let allowed = IdentityRules {
            allow_node_identities: true,
            ..rules
        };
        assert_eq!(check_identity(&kubelet, &allowed), Ok(()));
    }

    #[test]
    fn resource_id_shape() {
        assert!(is_user_assigned_identity_id(UAMI));
        assert!(is_user_assigned_identity_id(
            "/SUBSCRIPTIONS/s/RESOURCEGROUPS/rg/PROVIDERS/microsoft.managedidentity/USERASSIGNEDIDENTITIES/x"
        ));
        assert!(!is_user_assigned_identity_id(&UAMI[1..]));
        assert!(!is_user_assigned_identity_id(""));
        assert!(!is_user_assigned_identity_id(&format!("{UAMI}/extra")));
        assert!(!is_user_assigned_identity_id(
            "/subscriptions//resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a"
        ));
    }
}
