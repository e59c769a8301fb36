//! The per-request token audit: one JSON record per request, written to the
//! `--audit-log` file (rotated by size) and emitted on the `podid::audit`
//! tracing target, plus `podid-agent audit` to query the file.
//!
//! Records never carry a token, only the first 12 hex characters of its
//! SHA-256 ([`fingerprint`]).

mod query;
mod record;
mod writer;

pub use query::{AuditQuery, QueryError, Summary, read_records, summarize};
pub use record::{AUDIT_TARGET, AuditRecord, CacheUse, Outcome, fingerprint};
pub use writer::{AuditConfig, AuditError, AuditLog};
