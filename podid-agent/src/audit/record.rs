//! The audit record.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Tracing target of audit events (on stdout with the rest of the agent's log).
pub const AUDIT_TARGET: &str = "podid::audit";

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A token was returned.
    Issued,
    /// The request broke the IMDS protocol (no `Metadata`, bad query, …).
    #[default]
    InvalidRequest,
    /// The connection could not be tied to a workload (403).
    Unattributed,
    /// No usable identity for the workload, or not the one requested (400).
    IdentityNotFound,
    /// The bound AzureIdentity breaks podid's rules (no selector, a foreign
    /// Secret, an unknown authority, the node's own identity; 400).
    IdentityRefused,
    /// The identity is still being assigned to the node (retryable).
    AssignmentPending,
    /// Upstream (IMDS or Entra ID) failed, or a secret was missing.
    UpstreamError,
    /// A non-token request was forwarded to IMDS.
    Proxied,
    /// A non-token request was blocked by configuration (403).
    Blocked,
    /// Refused by a resource limit (connections, header size, time).
    Rejected,
}

impl Outcome {
    /// The snake_case name, as in the records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::InvalidRequest => "invalid_request",
            Outcome::Unattributed => "unattributed",
            Outcome::IdentityNotFound => "identity_not_found",
            Outcome::IdentityRefused => "identity_refused",
            Outcome::AssignmentPending => "assignment_pending",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Proxied => "proxied",
            Outcome::Blocked => "blocked",
            Outcome::Rejected => "rejected",
        }
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown outcome {s:?}"))
    }
}

/// Whether the token came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheUse {
    /// Served from the cache.
    Hit,
    /// Fetched from upstream.
    Miss,
    /// No token was involved.
    #[default]
    None,
}

/// One request, as DESIGN.md's operator interface lists the fields (plus the
/// request's method/path and the caller's pid, which help troubleshooting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditRecord {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub ts: String,
    /// Node name.
    pub node: String,
    /// Workload namespace ("" if unattributed).
    pub namespace: String,
    /// Pod (or LocalWorkload) name.
    pub pod: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Container name.
    pub container: String,
    /// The caller's cgroup id from the kernel (0 if none).
    pub cgroup_id: u64,
    /// `namespace/name` of the AzureIdentity, or `node` for exception pods.
    pub identity: String,
    /// Client id of that identity.
    pub client_id: String,
    /// `namespace/name` of the binding that granted it.
    pub binding: String,
    /// The requested resource.
    pub resource: String,
    /// HTTP status returned.
    pub status: u16,
    /// What happened.
    pub outcome: Outcome,
    /// Why, in words.
    pub reason: String,
    /// Whether the token came from the cache.
    pub cache: CacheUse,
    /// Time from request to response, in microseconds.
    pub latency_us: u64,
    /// The token's expiry (unix seconds), 0 if none.
    pub expires_on: u64,
    /// First 12 hex characters of the token's SHA-256, "" if none.
    pub token_sha256: String,
    /// HTTP method.
    pub method: String,
    /// Request path (no query string).
    pub path: String,
    /// Process id that opened the connection, from the kernel (0 if none).
    pub pid: u32,
}

/// First 12 hex characters of SHA-256(token): enough to correlate, useless to
/// an attacker.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_12_hex_chars() {
        let f = fingerprint("secret-token");
        assert_eq!(f.len(), 12);
        assert!(f.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(f, fingerprint("secret-token2"));
    }

    #[test]
    fn records_serialize_with_the_documented_field_names() {
        let record = AuditRecord {
            outcome: Outcome::IdentityNotFound,
            cache: CacheUse::Hit,
            ..AuditRecord::default()
        };
        let value = serde_json::to_value(&record).unwrap();
        for field in [
            "ts",
            "node",
            "namespace",
            "pod",
            "pod_uid",
            "container",
            "cgroup_id",
            "identity",
            "client_id",
            "binding",
            "resource",
            "status",
            "outcome",
            "reason",
            "cache",
            "latency_us",
            "expires_on",
            "token_sha256",
        ] {
            assert!(value.get(field).is_some(), "{field} missing");
        }
        assert_eq!(value["outcome"], "identity_not_found");
        assert_eq!(value["cache"], "hit");
        assert_eq!(
            "assignment_pending".parse::<Outcome>(),
            Ok(Outcome::AssignmentPending)
        );
    }
}
