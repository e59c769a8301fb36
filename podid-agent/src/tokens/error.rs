//! Token errors and how each is answered to the pod, in one place.

use std::{sync::Arc, time::Duration};

use serde_json::Value;

use super::{SecretError, SecretRef, Upstream};

/// `Retry-After` given to the pod when upstream gave none.
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why no token could be had. Cheap to clone: one failed upstream call fails
/// every request waiting on it with the same error.
///
/// Answer to the pod ([`http_status`](Self::http_status),
/// [`retry_after`](Self::retry_after), [`imds_error`](Self::imds_error)):
///
/// | error | status | `error` | notes |
/// |---|---|---|---|
/// | `InvalidResource` | 400 | `invalid_request` | empty/malformed resource |
/// | `InvalidCredential`, `Secret`, `Certificate` | 403 | `invalid_request` | names the identity and secret, never a value |
/// | `IdentityNotAssigned` | 404 | `invalid_request` | IMDS said "Identity not found" for a user-assigned client id: not on this node yet; SDKs retry 404 |
/// | `Rejected` | upstream's 4xx | upstream's (known codes) | upstream's description, and its JSON in [`upstream_body`](Self::upstream_body) |
/// | `Throttled` | 429 | `too_many_requests` | `Retry-After` from upstream: when it exceeds the call's budget the pod's SDK waits instead of us |
/// | `Unavailable`, `InvalidResponse` | 503 | `service_unavailable` | after retries (5xx, 410, IMDS 404, timeouts, connection errors); `Retry-After` from upstream or 5 s |
/// | `Config`, `Internal` | 500 | `unknown` | |
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The resource is empty or malformed.
    #[error("invalid resource {resource:?}: {reason}")]
    InvalidResource {
        /// The resource as given (truncated).
        resource: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The identity's credential cannot be used (bad tenant or client id).
    #[error("identity {identity}: {reason}")]
    InvalidCredential {
        /// `namespace/name` of the identity.
        identity: String,
        /// What is wrong.
        reason: String,
    },
    /// The identity's secret could not be read.
    #[error("identity {identity}: cannot read secret {secret}")]
    Secret {
        /// `namespace/name` of the identity.
        identity: String,
        /// The secret.
        secret: SecretRef,
        /// Cause.
        #[source]
        source: Arc<SecretError>,
    },
    /// The identity's PKCS#12 bundle is unusable (wrong password, no RSA key
    /// or certificate).
    #[error("identity {identity}: certificate in secret {secret} is unusable: {reason}")]
    Certificate {
        /// `namespace/name` of the identity.
        identity: String,
        /// The secret.
        secret: SecretRef,
        /// What is wrong.
        reason: String,
    },
    /// IMDS does not know the user-assigned identity: it is not assigned to
    /// this node (yet).
    #[error(
        "user-assigned identity {selector} is not assigned to this node (IMDS: Identity not found)"
    )]
    IdentityNotAssigned {
        /// How the identity was named (`client_id=…` or `msi_res_id=…`).
        selector: String,
    },
    /// Upstream refused the request (4xx); not retried.
    #[error("{upstream} answered {status} {error}: {description}")]
    Rejected {
        /// Which upstream.
        upstream: Upstream,
        /// Its status.
        status: u16,
        /// Its `error` code.
        error: String,
        /// Its `error_description`.
        description: String,
        /// Its JSON body, when it was a JSON object.
        body: Option<Arc<Value>>,
    },
    /// Upstream is throttling; the pod should retry after `retry_after`.
    #[error("{upstream} is throttling; retry after {retry_after:?}")]
    Throttled {
        /// Which upstream.
        upstream: Upstream,
        /// How long to wait.
        retry_after: Duration,
    },
    /// Upstream failed or was unreachable, retries included.
    #[error("{upstream} unavailable after {attempts} attempt(s): {reason}")]
    Unavailable {
        /// Which upstream.
        upstream: Upstream,
        /// Attempts made.
        attempts: u32,
        /// Last status, if there was an answer.
        status: Option<u16>,
        /// Last failure.
        reason: String,
        /// When the pod should retry.
        retry_after: Duration,
    },
    /// Upstream answered 2xx with something that is not a usable token.
    #[error("{upstream} returned an unusable token response: {reason}")]
    InvalidResponse {
        /// Which upstream.
        upstream: Upstream,
        /// What is wrong (never the token).
        reason: String,
    },
    /// The token service is misconfigured.
    #[error("token service configuration: {0}")]
    Config(String),
    /// A bug or a lost task.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Error codes passed through from upstream; others become `invalid_request`.
const KNOWN_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_resource",
    "invalid_scope",
    "unauthorized_client",
    "unsupported_grant_type",
    "unsupported_response_type",
    "access_denied",
    "unknown_source",
    "interaction_required",
    "temporarily_unavailable",
];

impl TokenError {
    /// The HTTP status to answer the pod with.
    pub fn http_status(&self) -> u16 {
        match self {
            TokenError::InvalidResource { .. } => 400,
            TokenError::InvalidCredential { .. }
            | TokenError::Secret { .. }
            | TokenError::Certificate { .. } => 403,
            TokenError::IdentityNotAssigned { .. } => 404,
            TokenError::Rejected { status, .. } => *status,
            TokenError::Throttled { .. } => 429,
            TokenError::Unavailable { .. } | TokenError::InvalidResponse { .. } => 503,
            TokenError::Config(_) | TokenError::Internal(_) => 500,
        }
    }

    /// The `Retry-After` to send the pod, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Throttled { retry_after, .. }
            | TokenError::Unavailable { retry_after, .. } => Some(*retry_after),
            TokenError::InvalidResponse { .. } => Some(DEFAULT_RETRY_AFTER),
            _ => None,
        }
    }

    /// IMDS-style `error` code and `error_description` for the pod.
    pub fn imds_error(&self) -> (&'static str, String) {
        match self {
            TokenError::Rejected {
                error, description, ..
            } => {
                let code = KNOWN_CODES
                    .iter()
                    .find(|c| c.eq_ignore_ascii_case(error))
                    .copied()
                    .unwrap_or("invalid_request");
                let description = if description.is_empty() {
                    self.to_string()
                } else {
                    description.clone()
                };
                (code, description)
            }
            TokenError::IdentityNotAssigned { selector } => (
                "invalid_request",
                format!(
                    "The user-assigned identity {selector} is not assigned to this node yet; retry later"
                ),
            ),
            TokenError::Throttled { .. } => ("too_many_requests", self.to_string()),
            TokenError::Unavailable { .. } | TokenError::InvalidResponse { .. } => {
                ("service_unavailable", self.to_string())
            }
            TokenError::Config(_) | TokenError::Internal(_) => ("unknown", self.to_string()),
            TokenError::InvalidResource { .. }
            | TokenError::InvalidCredential { .. }
            | TokenError::Certificate { .. } => ("invalid_request", self.to_string()),
            TokenError::Secret { source, .. } => ("invalid_request", format!("{self}: {source}")),
        }
    }

    /// Upstream's JSON error body, for a server that passes 4xx answers
    /// through unchanged.
    pub fn upstream_body(&self) -> Option<&Value> {
        match self {
            TokenError::Rejected { body, .. } => body.as_deref(),
            _ => None,
        }
    }

    /// A short label for metrics and logs (`throttled`, `unavailable`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::InvalidResource { .. } => "invalid_resource",
            TokenError::InvalidCredential { .. } => "invalid_credential",
            TokenError::Secret { .. } => "secret",
            TokenError::Certificate { .. } => "certificate",
            TokenError::IdentityNotAssigned { .. } => "identity_not_assigned",
            TokenError::Rejected { .. } => "rejected",
            TokenError::Throttled { .. } => "throttled",
            TokenError::Unavailable { .. } => "unavailable",
            TokenError::InvalidResponse { .. } => "invalid_response",
            TokenError::Config(_) => "config",
            TokenError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_documented_mapping() {
        let secret = SecretRef {
            namespace: "ns".into(),
            name: "sp-secret".into(),
        };
        let cases: Vec<(TokenError, u16, &str, Option<u64>)> = vec![
            (
                TokenError::IdentityNotAssigned {
                    selector: "client_id=cid-1".into(),
                },
                404,
                "invalid_request",
                None,
            ),
            (
                TokenError::Throttled {
                    upstream: Upstream::Imds,
                    retry_after: Duration::from_secs(30),
                },
                429,
                "too_many_requests",
                Some(30),
            ),
            (
                TokenError::Unavailable {
                    upstream: Upstream::EntraId,
                    attempts: 3,
                    status: Some(500),
                    reason: "HTTP 500".into(),
                    retry_after: DEFAULT_RETRY_AFTER,
                },
                503,
                "service_unavailable",
                Some(5),
            ),
            (
                TokenError::Secret {
                    identity: "ns/id".into(),
                    secret: secret.clone(),
                    source: Arc::new(SecretError::NotFound {
                        secret,
                        location: "/x".into(),
                    }),
                },
                403,
                "invalid_request",
                None,
            ),
            (
                TokenError::Rejected {
                    upstream: Upstream::EntraId,
                    status: 401,
                    error: "invalid_client".into(),
                    description: "AADSTS7000215: Invalid client secret provided.".into(),
                    body: None,
                },
                401,
                "invalid_client",
                None,
            ),
            (
                TokenError::Rejected {
                    upstream: Upstream::Imds,
                    status: 400,
                    error: "some_new_code".into(),
                    description: String::new(),
                    body: None,
                },
                400,
                "invalid_request",
                None,
            ),
        ];
        for (error, status, code, retry) in cases {
            assert_eq!(error.http_status(), status, "{error}");
            assert_eq!(error.imds_error().0, code, "{error}");
            assert_eq!(error.retry_after().map(|d| d.as_secs()), retry, "{error}");
            assert!(!error.imds_error().1.is_empty());
        }
    }

    #[test]
    fn not_assigned_names_the_client_and_asks_to_retry() {
        let (_, description) = TokenError::IdentityNotAssigned {
            selector: "client_id=3c9e2b4a".into(),
        }
        .imds_error();
        assert!(description.contains("3c9e2b4a"), "{description}");
        assert!(
            description.contains("not assigned to this node"),
            "{description}"
        );
        // Clients treat "Identity not found" as final; a 404 must not say it.
        assert!(!description.contains("Identity not found"), "{description}");
    }

    #[test]
    fn secret_errors_name_the_secret() {
        let secret = SecretRef {
            namespace: "ns".into(),
            name: "sp-secret".into(),
        };
        let error = TokenError::Secret {
            identity: "ns/id".into(),
            secret: secret.clone(),
            source: Arc::new(SecretError::MissingKey {
                secret,
                key: "clientSecret".into(),
            }),
        };
        let (_, description) = error.imds_error();
        assert!(description.contains("ns/sp-secret"), "{description}");
        assert!(description.contains("clientSecret"), "{description}");
    }
}
