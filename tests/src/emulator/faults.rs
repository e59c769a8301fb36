//! Fault injection and request accounting types, shared by the in-process API
//! and the `/_emulator/...` HTTP control API.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which emulated endpoint a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// IMDS `GET /metadata/identity/oauth2/token`.
    Imds,
    /// IMDS `GET /metadata/instance[/...]`.
    Instance,
    /// Entra ID v1 `POST /{tenant}/oauth2/token`.
    EntraV1,
    /// Entra ID v2 `POST /{tenant}/oauth2/v2.0/token`.
    EntraV2,
    /// IMDS "managed identity v2" (`GET /metadata/identity/getplatformmetadata`,
    /// `POST /metadata/identity/issuecredential`): the VM's own credential.
    /// No pod may ever reach it.
    ImdsCredential,
}

impl Endpoint {
    /// Whether this endpoint issues tokens.
    pub fn is_token(self) -> bool {
        !matches!(self, Endpoint::Instance | Endpoint::ImdsCredential)
    }
}

/// A rule that changes how matching requests are answered.
///
/// A rule without `endpoint` matches every token endpoint (not
/// `/metadata/instance`); a rule without `client_id` matches every identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Only requests to this endpoint.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    /// Only requests for this client id (compared case-insensitively; for
    /// IMDS the client id of the identity the request resolves to).
    #[serde(default)]
    pub client_id: Option<String>,
    /// How many requests it applies to; `None` until cleared.
    #[serde(default)]
    pub times: Option<u32>,
    /// What to do.
    pub action: FaultAction,
}

/// What a [`Fault`] does to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// Answer with `status` instead of handling the request.
    Status {
        /// HTTP status.
        status: u16,
        /// Raw `Retry-After` header value (seconds or an HTTP date).
        #[serde(default)]
        retry_after: Option<String>,
        /// JSON body; a body in the endpoint's own error format when absent.
        #[serde(default)]
        body: Option<Value>,
    },
    /// Wait this long, then handle the request normally (or apply a
    /// matching `Status`/`Drop` rule).
    Delay {
        /// Milliseconds to wait.
        millis: u64,
    },
    /// Close the connection without an answer.
    Drop,
}

impl Fault {
    /// Answer the next requests with `status`.
    pub fn status(status: u16) -> Self {
        Self {
            endpoint: None,
            client_id: None,
            times: None,
            action: FaultAction::Status {
                status,
                retry_after: None,
                body: None,
            },
        }
    }

    /// Answer 429 with `Retry-After: <secs>`.
    pub fn throttle(retry_after_secs: u64) -> Self {
        Self::status(429).retry_after(&retry_after_secs.to_string())
    }

    /// Stall the next requests for `delay` before handling them.
    pub fn delay(delay: Duration) -> Self {
        Self {
            endpoint: None,
            client_id: None,
            times: None,
            action: FaultAction::Delay {
                millis: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }

    /// Close the connection of the next requests without answering.
    pub fn drop_connection() -> Self {
        Self {
            endpoint: None,
            client_id: None,
            times: None,
            action: FaultAction::Drop,
        }
    }

    /// Apply to the next `n` matching requests only.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Apply only to requests for `client_id`.
    pub fn for_client(mut self, client_id: &str) -> Self {
        self.client_id = Some(client_id.to_owned());
        self
    }

    /// Apply only to `endpoint`.
    pub fn on(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Set the raw `Retry-After` value of a `Status` fault.
    pub fn retry_after(mut self, value: &str) -> Self {
        if let FaultAction::Status { retry_after, .. } = &mut self.action {
            *retry_after = Some(value.to_owned());
        }
        self
    }

    /// Set the JSON body of a `Status` fault.
    pub fn body(mut self, value: Value) -> Self {
        if let FaultAction::Status { body, .. } = &mut self.action {
            *body = Some(value);
        }
        self
    }

    pub(crate) fn matches(&self, endpoint: Endpoint, client_id: Option<&str>) -> bool {
        let endpoint_ok = match self.endpoint {
            Some(e) => e == endpoint,
            None => endpoint.is_token(),
        };
        let client_ok = match (&self.client_id, client_id) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        endpoint_ok && client_ok && self.times != Some(0)
    }
}

/// One request the emulator answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Endpoint.
    pub endpoint: Endpoint,
    /// Client id the request was for: as sent (Entra ID), or the identity it
    /// resolved to (IMDS; `object_id`/`msi_res_id` are resolved, the raw value
    /// is kept when unknown; the system-assigned identity's client id when the
    /// request names none). Empty when there is none.
    pub client_id: String,
    /// Resource (v1) or scope (v2) as decoded from the request; empty when absent.
    pub resource: String,
    /// `api-version` query parameter (IMDS only).
    pub api_version: Option<String>,
    /// Status answered; 0 when the connection was dropped.
    pub status: u16,
}

/// How many requests went to one (endpoint, client id, resource).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCount {
    /// Endpoint.
    pub endpoint: Endpoint,
    /// Client id (see [`RequestRecord::client_id`]).
    pub client_id: String,
    /// Resource or scope.
    pub resource: String,
    /// Number of requests, whatever their outcome.
    pub count: u64,
}

/// A token the emulator issued.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    /// Endpoint that issued it.
    pub endpoint: Endpoint,
    /// Client id it was issued to.
    pub client_id: String,
    /// Audience (resource).
    pub resource: String,
    /// Expiry, unix seconds.
    pub expires_on: u64,
    /// The token itself (so hygiene tests can search logs for it).
    pub access_token: String,
}

impl std::fmt::Debug for IssuedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedRecord")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("resource", &self.resource)
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}
