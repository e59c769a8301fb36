//! What the emulator knows: the VM's managed identities, the registered
//! service principals, token lifetime and the instance metadata document.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::certs::TestCertificate;

/// The tenant every emulated identity lives in unless configured otherwise.
pub const DEFAULT_TENANT_ID: &str = "6f1c2a4e-0d3b-4c5a-9e8f-7a6b5c4d3e2f";

/// The subscription used in generated resource IDs.
pub const DEFAULT_SUBSCRIPTION_ID: &str = "2b7e1d3c-8f4a-4e6b-a5c9-0d1e2f3a4b5c";

/// Emulator configuration. Also the format of `podid-emulator --config FILE`
/// (JSON; every field optional).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmulatorConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Lifetime of issued tokens, in seconds.
    pub token_lifetime_secs: u64,
    /// Tenant of the managed identities (the `tid` claim of their tokens).
    pub tenant_id: String,
    /// The VM's system-assigned identity, if it has one.
    pub system_assigned: Option<ManagedIdentity>,
    /// User-assigned identities assigned to "this VM".
    pub user_assigned: Vec<ManagedIdentity>,
    /// Service principals Entra ID knows (client credentials).
    pub clients: Vec<RegisteredClient>,
    /// The `/metadata/instance` document; a small default when absent.
    pub instance: Option<Value>,
    /// When set, IMDS and Entra ID answer `invalid_resource` (AADSTS500011)
    /// for any other resource, as Entra ID does for unknown resources.
    pub known_resources: Option<Vec<String>>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token_lifetime_secs: 3600,
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            system_assigned: Some(ManagedIdentity::system_assigned("podid-emulated-vm")),
            user_assigned: Vec::new(),
            clients: Vec::new(),
            instance: None,
            known_resources: None,
        }
    }
}

impl EmulatorConfig {
    /// The token lifetime as a [`Duration`].
    pub fn token_lifetime(&self) -> Duration {
        Duration::from_secs(self.token_lifetime_secs)
    }

    /// Sets the token lifetime (whole seconds, at least 1).
    pub fn with_token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime_secs = lifetime.as_secs().max(1);
        self
    }

    /// Adds a user-assigned identity.
    pub fn with_user_assigned(mut self, identity: ManagedIdentity) -> Self {
        self.user_assigned.push(identity);
        self
    }

    /// Adds a registered service principal.
    pub fn with_client(mut self, client: RegisteredClient) -> Self {
        self.clients.push(client);
        self
    }

    /// The instance metadata document served at `/metadata/instance`.
    pub(crate) fn instance_document(&self) -> Value {
        self.instance.clone().unwrap_or_else(|| {
            json!({
                "compute": {
                    "azEnvironment": "AzurePublicCloud",
                    "location": "westeurope",
                    "name": "podid-emulated-vm",
                    "osType": "Linux",
                    "resourceGroupName": "podid-rg",
                    "subscriptionId": DEFAULT_SUBSCRIPTION_ID,
                    "vmId": "0d5c3b2a-1e4f-4a6b-8c7d-9e0f1a2b3c4d",
                    "vmScaleSetName": "",
                    "vmSize": "Standard_D2s_v5",
                    "zone": "1"
                },
                "network": {
                    "interface": [{
                        "ipv4": {
                            "ipAddress": [{"privateIpAddress": "10.240.0.4", "publicIpAddress": ""}],
                            "subnet": [{"address": "10.240.0.0", "prefix": "16"}]
                        },
                        "ipv6": {"ipAddress": []},
                        "macAddress": "000D3A4B5C6D"
                    }]
                }
            })
        })
    }
}

/// A managed identity as IMDS knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedIdentity {
    /// Application (client) id: IMDS `client_id`, token claim `appid`.
    pub client_id: String,
    /// Object (principal) id: IMDS `object_id`, token claim `oid`.
    pub object_id: String,
    /// ARM resource id: IMDS `msi_res_id`/`mi_res_id`, token claim `xms_mirid`.
    pub resource_id: String,
}

impl ManagedIdentity {
    /// A user-assigned identity named `name` with fresh random ids.
    pub fn user_assigned(name: &str) -> Self {
        Self {
            client_id: random_guid(),
            object_id: random_guid(),
            resource_id: format!(
                "/subscriptions/{DEFAULT_SUBSCRIPTION_ID}/resourcegroups/podid-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
        }
    }

    /// A VM's system-assigned identity with fresh random ids.
    pub fn system_assigned(vm_name: &str) -> Self {
        Self {
            client_id: random_guid(),
            object_id: random_guid(),
            resource_id: format!(
                "/subscriptions/{DEFAULT_SUBSCRIPTION_ID}/resourcegroups/podid-rg/providers/Microsoft.Compute/virtualMachines/{vm_name}"
            ),
        }
    }
}

/// A service principal registered in Entra ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredClient {
    /// Tenant the application lives in.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// Client secret, if it may sign in with one.
    #[serde(default)]
    pub secret: Option<String>,
    /// Certificates it may sign client assertions with: PEM, or base64 DER.
    #[serde(default)]
    pub certificates: Vec<String>,
}

impl RegisteredClient {
    /// A client that signs in with `secret`.
    pub fn with_secret(tenant_id: &str, client_id: &str, secret: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            client_id: client_id.to_owned(),
            secret: Some(secret.to_owned()),
            certificates: Vec::new(),
        }
    }

    /// A client that signs in with a client assertion signed by `cert`'s key.
    pub fn with_certificate(tenant_id: &str, client_id: &str, cert: &TestCertificate) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            client_id: client_id.to_owned(),
            secret: None,
            certificates: vec![cert.cert_pem.clone()],
        }
    }
}

/// A random GUID in the usual 8-4-4-4-12 form (version 4 layout).
pub fn random_guid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
