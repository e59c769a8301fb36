//! Credentials for ARM: the cluster's managed identity through IMDS, or a
//! service principal's client secret against Entra ID (as MIC reads them
//! from `/etc/kubernetes/azure.json`). Tokens are cached until five minutes
//! before they expire.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use azure_core::{
    auth::{AccessToken, TokenCredential},
    error::{Error as CoreError, ErrorKind},
};
use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use url::Url;

use super::transport::HyperTransport;

const REFRESH_BEFORE: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct TokenCache {
    tokens: Mutex<HashMap<String, AccessToken>>,
}

impl TokenCache {
    async fn get(&self, key: &str) -> Option<AccessToken> {
        let tokens = self.tokens.lock().await;
        let token = tokens.get(key)?;
        let fresh = token.expires_on - OffsetDateTime::now_utc() > REFRESH_BEFORE;
        fresh.then(|| token.clone())
    }

    async fn put(&self, key: &str, token: &AccessToken) {
        self.tokens
            .lock()
            .await
            .insert(key.to_string(), token.clone());
    }
}

fn credential_error(message: impl Into<String>) -> CoreError {
    CoreError::message(ErrorKind::Credential, message.into())
}

/// `expires_on`/`expires_in` arrive as strings (IMDS) or numbers (Entra ID).
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(i64),
    Text(String),
}

impl Seconds {
    fn value(&self) -> Option<i64> {
        match self {
            Seconds::Number(n) => Some(*n),
            Seconds::Text(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_on: Option<Seconds>,
    #[serde(default)]
    expires_in: Option<Seconds>,
}

impl TokenResponse {
    fn into_token(self) -> AccessToken {
        let now = OffsetDateTime::now_utc();
        let expires_on = self
            .expires_on
            .and_then(|s| s.value())
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .or_else(|| {
                self.expires_in
                    .and_then(|s| s.value())
                    .map(|secs| now + time::Duration::seconds(secs))
            })
            .unwrap_or(now + time::Duration::minutes(10));
        AccessToken::new(self.access_token, expires_on)
    }
}

/// The resource (audience) IMDS and Entra ID v1 want, from a v2 scope.
fn resource_of(scopes: &[&str]) -> Result<String, CoreError> {
    let scope = scopes
        .first()
        .ok_or_else(|| credential_error("no scope requested"))?;
    Ok(scope
        .strip_suffix(azure_core::auth::DEFAULT_SCOPE_SUFFIX)
        .unwrap_or(scope)
        .to_string())
}

async fn fetch(
    transport: &HyperTransport,
    request: http::Request<Full<Bytes>>,
    what: &str,
) -> Result<AccessToken, CoreError> {
    let response = transport
        .send(request)
        .await
        .map_err(|e| CoreError::message(ErrorKind::Io, format!("{what}: {e}")))?;
    if !(200..300).contains(&response.status) {
        return Err(credential_error(format!(
            "{what}: HTTP {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        )));
    }
    let parsed: TokenResponse = serde_json::from_slice(&response.body)
        .map_err(|e| credential_error(format!("{what}: unexpected token response: {e}")))?;
    Ok(parsed.into_token())
}

/// The node's managed identity, through the Instance Metadata Service.
#[derive(Debug)]
pub struct ImdsCredential {
    endpoint: Url,
    client_id: Option<String>,
    transport: HyperTransport,
    cache: TokenCache,
}

impl ImdsCredential {
    /// The system-assigned identity (`client_id` None) or a user-assigned
    /// one, from IMDS at `endpoint`.
    pub fn new(endpoint: Url, client_id: Option<String>, transport: HyperTransport) -> Self {
        ImdsCredential {
            endpoint,
            client_id: client_id.filter(|c| !c.is_empty()),
            transport,
            cache: TokenCache::default(),
        }
    }
}

#[async_trait]
impl TokenCredential for ImdsCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let resource = resource_of(scopes)?;
        if let Some(token) = self.cache.get(&resource).await {
            return Ok(token);
        }
        let mut url = self
            .endpoint
            .join("/metadata/identity/oauth2/token")
            .map_err(|e| credential_error(format!("IMDS endpoint: {e}")))?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("api-version", "2018-02-01");
            query.append_pair("resource", &resource);
            if let Some(client_id) = &self.client_id {
                query.append_pair("client_id", client_id);
            }
        }
        let request = http::Request::get(url.as_str())
            .header("Metadata", "true")
            .body(Full::new(Bytes::new()))
            .map_err(|e| credential_error(format!("IMDS request: {e}")))?;
        let token = fetch(&self.transport, request, "IMDS token").await?;
        self.cache.put(&resource, &token).await;
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.tokens.lock().await.clear();
        Ok(())
    }
}

/// A service principal with a client secret (Entra ID client credentials).
pub struct ClientSecretCredential {
    authority: Url,
    tenant_id: String,
    client_id: String,
    client_secret: String,
    transport: HyperTransport,
    cache: TokenCache,
}

impl std::fmt::Debug for ClientSecretCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecretCredential")
            .field("authority", &self.authority.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl ClientSecretCredential {
    /// A credential for `client_id` in `tenant_id` at `authority`
    /// (e.g. `https://login.microsoftonline.com`).
    pub fn new(
        authority: Url,
        tenant_id: String,
        client_id: String,
        client_secret: String,
        transport: HyperTransport,
    ) -> Self {
        ClientSecretCredential {
            authority,
            tenant_id,
            client_id,
            client_secret,
            transport,
            cache: TokenCache::default(),
        }
    }
}

#[async_trait]
impl TokenCredential for ClientSecretCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let scope = scopes
            .first()
            .ok_or_else(|| credential_error("no scope requested"))?
            .to_string();
        if let Some(token) = self.cache.get(&scope).await {
            return Ok(token);
        }
        let url = self
            .authority
            .join(&format!("{}/oauth2/v2.0/token", self.tenant_id))
            .map_err(|e| credential_error(format!("authority: {e}")))?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", &self.client_secret)
            .append_pair("scope", &scope)
            .finish();
        let request = http::Request::post(url.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| credential_error(format!("token request: {e}")))?;
        let token = fetch(&self.transport, request, "Entra ID token").await?;
        self.cache.put(&scope, &token).await;
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.tokens.lock().await.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expiry_accepts_strings_and_numbers() {
        let imds: TokenResponse = serde_json::from_str(
            r#"{"access_token":"t","expires_on":"4102444800","expires_in":"3599"}"#,
        )
        .unwrap();
        assert_eq!(imds.into_token().expires_on.unix_timestamp(), 4102444800);
        let aad: TokenResponse =
            serde_json::from_str(r#"{"access_token":"t","expires_in":3600}"#).unwrap();
        let left = aad.into_token().expires_on - OffsetDateTime::now_utc();
        assert!(left > time::Duration::minutes(59) && left <= time::Duration::minutes(60));
    }

    #[test]
    fn scopes_become_resources() {
        assert_eq!(
            resource_of(&["https://management.azure.com/.default"]).unwrap(),
            "https://management.azure.com"
        );
        assert!(resource_of(&[]).is_err());
    }
}
