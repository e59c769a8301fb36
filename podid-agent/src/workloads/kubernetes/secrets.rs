//! Service-principal credentials read from Kubernetes Secrets, on demand
//! (one `get` per token fetch; tokens are cached, so this is rare). The agent
//! needs `get` on Secrets and nothing else: no list, no watch.
//!
//! Type 1 (`clientPassword` → a Secret): the client secret is the value of
//! key `clientSecret` (any case) or, as aad-pod-identity takes "the first
//! value", the only key; a Secret with several other keys is ambiguous and
//! refused rather than guessed at (Go's map order is random). Type 2: keys
//! `certificate` (PKCS#12) and `password` (absent means empty). One trailing
//! newline is removed from text values, as for `--secrets-dir`.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tracing::debug;

use crate::tokens::{SecretError, SecretRef, SecretSource};

/// Largest value read.
const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Reads Secrets through the API server.
#[derive(Clone)]
pub struct KubeSecrets {
    client: Client,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSecrets").finish_non_exhaustive()
    }
}

/// A DNS-1123 subdomain, what namespaces and Secret names are; anything else
/// could change the request's URL.
fn is_k8s_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

fn text(secret: &SecretRef, key: &str, bytes: &[u8]) -> Result<String, SecretError> {
    let mut value = String::from_utf8(bytes.to_vec()).map_err(|_| SecretError::Invalid {
        secret: secret.clone(),
        reason: format!("key {key:?} is not UTF-8 text"),
    })?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    Ok(value)
}

impl KubeSecrets {
    /// Reads through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn fetch(&self, secret: &SecretRef) -> Result<Secret, SecretError> {
        if !is_k8s_name(&secret.namespace) || !is_k8s_name(&secret.name) {
            return Err(SecretError::InvalidName {
                secret: secret.clone(),
            });
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
        debug!(%secret, "reading Secret");
        match api.get_opt(&secret.name).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(SecretError::NotFound {
                secret: secret.clone(),
                location: "the Kubernetes API".into(),
            }),
            Err(error) => Err(SecretError::Unavailable {
                secret: secret.clone(),
                reason: error.to_string(),
            }),
        }
    }
}

fn data(secret: &SecretRef, found: &Secret) -> Result<Vec<(String, Vec<u8>)>, SecretError> {
    let values: Vec<(String, Vec<u8>)> = found
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    if let Some((key, _)) = values.iter().find(|(_, v)| v.len() > MAX_VALUE_BYTES) {
        return Err(SecretError::Invalid {
            secret: secret.clone(),
            reason: format!("key {key:?} is larger than {MAX_VALUE_BYTES} bytes"),
        });
    }
    Ok(values)
}

#[async_trait]
impl SecretSource for KubeSecrets {
    async fn client_secret(&self, secret: &SecretRef) -> Result<String, SecretError> {
        let found = self.fetch(secret).await?;
        let values = data(secret, &found)?;
        let chosen = values
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("clientSecret"))
            .or(match values.as_slice() {
                [only] => Some(only),
                _ => None,
            })
            .ok_or_else(|| SecretError::MissingKey {
                secret: secret.clone(),
                key: "clientSecret".into(),
            })?;
        let value = text(secret, &chosen.0, &chosen.1)?;
        if value.is_empty() {
            return Err(SecretError::Invalid {
                secret: secret.clone(),
                reason: "the client secret is empty".into(),
            });
        }
        Ok(value)
    }

    async fn certificate(&self, secret: &SecretRef) -> Result<(Vec<u8>, String), SecretError> {
        let found = self.fetch(secret).await?;
        let values = data(secret, &found)?;
        let value = |key: &str| values.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let bundle = value("certificate")
            .filter(|b| !b.is_empty())
            .cloned()
            .ok_or_else(|| SecretError::MissingKey {
                secret: secret.clone(),
                key: "certificate".into(),
            })?;
        let password = match value("password") {
            Some(bytes) => text(secret, "password", bytes)?,
            None => String::new(),
        };
        Ok((bundle, password))
    }
}
