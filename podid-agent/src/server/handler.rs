//! One request: route, validate, attribute, decide, get the token, answer,
//! audit. Every path through here leaves exactly one audit record on the
//! connection, which sends it once the response is out (or at once, if the
//! client has already hung up).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use podid_api::{AzureIdentity, IdentityType};
use tracing::{Instrument, debug_span};

use super::{
    AppState, Connection,
    imds::{self, ImdsError, Route},
};
use crate::{
    audit::{AuditRecord, CacheUse, Outcome},
    identity::{RequestedIdentity, bound_identities, choose},
    tokens::{CacheStatus, Credential, SecretRef},
    workloads::{Assignment, Unattributed, Workload, WorkloadSource},
};

/// Behaviour switches and limits of the endpoint.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Upstream IMDS base URL (proxied paths).
    pub imds_endpoint: String,
    /// Answer `/metadata/instance` with 403 instead of proxying it.
    pub block_instance_metadata: bool,
    /// Standard mode: how long to wait for an assignment in progress.
    pub assignment_wait: Duration,
    /// Connections served at once; more are answered 503 at once.
    pub max_connections: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Time allowed for the request head to arrive.
    pub header_timeout: Duration,
    /// Time allowed for a whole request, response included.
    pub request_timeout: Duration,
    /// Time allowed for a proxied IMDS request.
    pub proxy_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            imds_endpoint: "http://169.254.169.254".into(),
            block_instance_metadata: false,
            assignment_wait: Duration::from_secs(5),
            max_connections: 16_384,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(45),
            proxy_timeout: Duration::from_secs(10),
        }
    }
}

/// The answer and what to audit about it.
struct Answer {
    response: Response<Full<Bytes>>,
    outcome: Outcome,
    reason: String,
}

/// Outcomes reported to the workload source as denials.
fn is_denial(outcome: Outcome) -> bool {
    matches!(
        outcome,
        Outcome::IdentityNotFound
            | Outcome::AssignmentPending
            | Outcome::UpstreamError
            | Outcome::Blocked
    )
}

impl Answer {
    fn error(error: ImdsError, outcome: Outcome, reason: impl Into<String>) -> Self {
        Self {
            response: error.response(),
            outcome,
            reason: reason.into(),
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Handles one request from `connection`.
pub(crate) async fn handle<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (cgroup_id, pid) = match &connection.record {
        Ok(Some(r)) => (r.cgroup_id, r.tgid),
        _ => (0, 0),
    };
    let mut audit = AuditRecord {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        node: state.node.clone(),
        cgroup_id,
        pid,
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
        ..AuditRecord::default()
    };
    // Debug level: per-request spans cost formatting on every request, and
    // the audit record carries the same facts at info level.
    let span = debug_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        namespace = tracing::field::Empty,
        pod = tracing::field::Empty,
        identity = tracing::field::Empty,
    );
    let mut workload = None;
    let answer = route(state, connection, request, &mut audit, &mut workload)
        .instrument(span)
        .await;
    let status = answer.response.status().as_u16();
    audit.status = status;
    audit.outcome = answer.outcome;
    audit.reason = answer.reason;
    audit.latency_us = started.elapsed().as_micros() as u64;
    state.metrics.request(
        &audit.namespace,
        &audit.identity,
        audit.outcome,
        status,
        started.elapsed(),
    );
    if audit.outcome == Outcome::Unattributed {
        state.metrics.unattributed(unattributed_kind(&audit.reason));
    }
    if let Some(workload) = &workload
        && is_denial(audit.outcome)
    {
        state.source.on_denied(workload, &audit);
    }
    connection.leave_audit(audit, &state.audit);
    answer.response
}

fn unattributed_kind(reason: &str) -> &'static str {
    if reason.contains("not redirected") {
        "no_record"
    } else if reason.contains("no longer exists") {
        "cgroup_gone"
    } else if reason.contains("not on this node") {
        "unknown_pod"
    } else if reason.contains("terminated") {
        "pod_gone"
    } else if reason.contains("not loaded") {
        "not_ready"
    } else {
        "unknown_cgroup"
    }
}

async fn route<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    request: Request<Incoming>,
    audit: &mut AuditRecord,
    workload: &mut Option<Workload>,
) -> Answer {
    match imds::route(request.uri().path()) {
        Route::Token => token(state, connection, request, audit, workload).await,
        Route::MalformedToken => Answer::error(
            ImdsError::bad_request("Invalid request"),
            Outcome::InvalidRequest,
            if imds::is_canonical(request.uri().path()) {
                "a path resembling the token endpoint is never forwarded"
            } else {
                "a non-canonical path (percent-encoding, backslash, empty or dot segment) is never forwarded"
            },
        ),
        Route::Instance if state.settings.block_instance_metadata => {
            if let Err(error) = imds::check_headers(request.headers()) {
                let reason = error.description.clone();
                return Answer::error(error, Outcome::InvalidRequest, reason);
            }
            let attributed = match attribute(state, connection, audit).await {
                Ok(attributed) => attributed,
                Err(answer) => return answer,
            };
            // Exception pods (node add-ons) keep IMDS, as with aad-pod-identity,
            // where they reached it directly.
            let excepted = state.source.is_exception(&attributed);
            *workload = Some(attributed);
            if excepted {
                return proxy(state, connection, request, audit, workload).await;
            }
            Answer::error(
                ImdsError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "Request blocked by podid: instance metadata is disabled on this node",
                ),
                Outcome::Blocked,
                "--block-instance-metadata",
            )
        }
        Route::Instance | Route::Other => proxy(state, connection, request, audit, workload).await,
    }
}

/// Ties the connection to a workload, filling the audit record.
async fn attribute<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    audit: &mut AuditRecord,
) -> Result<Workload, Answer> {
    let unattributed = |reason: String| {
        Answer::error(
            ImdsError::new(
                StatusCode::FORBIDDEN,
                "access_denied",
                format!("podid could not tie this connection to a workload: {reason}"),
            ),
            Outcome::Unattributed,
            reason,
        )
    };
    let record = match &connection.record {
        Ok(Some(record)) => *record,
        Ok(None) => return Err(unattributed(Unattributed::NoRecord.to_string())),
        Err(error) => {
            return Err(unattributed(format!(
                "kernel record lookup failed: {error}"
            )));
        }
    };
    let Some(path) = state.cgroups.path_of(record.cgroup_id) else {
        return Err(unattributed(
            Unattributed::CgroupGone(record.cgroup_id).to_string(),
        ));
    };
    let workload = state
        .source
        .workload(record.cgroup_id, &path)
        .await
        .map_err(|e| unattributed(e.to_string()))?;
    audit.namespace = workload.namespace.clone();
    audit.pod = workload.name.clone();
    audit.pod_uid = workload.uid.clone();
    audit.container = workload.container.clone();
    let span = tracing::Span::current();
    span.record("namespace", workload.namespace.as_str());
    span.record("pod", workload.name.as_str());
    Ok(workload)
}

/// The credential to ask upstream with, from the AzureIdentity's spec.
fn credential_of(identity: &AzureIdentity, kind: IdentityType) -> Result<Credential, String> {
    let spec = &identity.spec;
    let authority = (!spec.ad_endpoint.is_empty()).then(|| spec.ad_endpoint.clone());
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
                        .unwrap_or_else(|| "default".into())
                } else {
                    r.namespace.clone()
                },
                name: r.name.clone(),
            })
            .ok_or_else(|| "the AzureIdentity has no clientPassword secret reference".to_string())
    };
    Ok(match kind {
        IdentityType::UserAssignedMsi => Credential::ManagedIdentity {
            client_id: Some(spec.client_id.clone()).filter(|c| !c.is_empty()),
        },
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

async fn token<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    request: Request<Incoming>,
    audit: &mut AuditRecord,
    attributed: &mut Option<Workload>,
) -> Answer {
    // Header checks first: SDK probes send no Metadata and expect a quick 400.
    let checks = imds::check_headers(request.headers())
        .and_then(|()| imds::check_method(request.method()))
        .and_then(|()| imds::parse_token_query(request.uri().query()));
    let query = match checks {
        Ok(query) => query,
        Err(error) => {
            let reason = error.description.clone();
            return Answer::error(error, Outcome::InvalidRequest, reason);
        }
    };
    audit.resource = query.resource.clone();
    let workload = match attribute(state, connection, audit).await {
        Ok(workload) => workload,
        Err(answer) => return answer,
    };
    *attributed = Some(workload.clone());

    let (identity_key, credential) = if state.source.is_exception(&workload) {
        let client_id = match &query.requested {
            RequestedIdentity::ClientId(id) => Some(id.clone()),
            _ => None,
        };
        audit.identity = "node".to_string();
        audit.client_id = client_id.clone().unwrap_or_default();
        (
            "node".to_string(),
            Credential::ManagedIdentity { client_id },
        )
    } else {
        let catalog = state.source.catalog();
        let chosen = bound_identities(
            catalog.as_ref(),
            state.source.namespace_rule(),
            &workload.namespace,
            &workload.labels,
        )
        .and_then(|bound| choose(&bound, &query.requested));
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err(why) => {
                return Answer::error(
                    ImdsError::identity_not_found(),
                    Outcome::IdentityNotFound,
                    why.to_string(),
                );
            }
        };
        audit.identity = chosen.identity_key();
        audit.binding = chosen.binding_key();
        audit.client_id = chosen.identity.spec.client_id.clone();
        tracing::Span::current().record("identity", audit.identity.as_str());
        match state
            .source
            .assignment(&workload, &chosen, state.settings.assignment_wait)
            .await
        {
            Assignment::Ready => {}
            Assignment::Pending { waited } => {
                let retry = state.settings.assignment_wait.as_secs().max(1);
                return Answer::error(
                    ImdsError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                        format!(
                            "Identity {} is being assigned to this node; retry in {retry} s",
                            audit.identity
                        ),
                    )
                    .with_retry_after(retry),
                    Outcome::AssignmentPending,
                    format!(
                        "assignment still in progress after {} ms",
                        waited.as_millis()
                    ),
                );
            }
            Assignment::Missing => {
                let retry = state.settings.assignment_wait.as_secs().max(1);
                return Answer::error(
                    ImdsError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                        format!(
                            "Identity {} is not assigned to this node yet; retry in {retry} s",
                            audit.identity
                        ),
                    )
                    .with_retry_after(retry),
                    Outcome::AssignmentPending,
                    "no AzureAssignedIdentity for this pod and identity yet",
                );
            }
        }
        let kind = match chosen.identity.spec.kind() {
            Ok(kind) => kind,
            Err(e) => {
                return Answer::error(
                    ImdsError::identity_not_found(),
                    Outcome::IdentityNotFound,
                    e.to_string(),
                );
            }
        };
        let credential = match credential_of(&chosen.identity, kind) {
            Ok(credential) => credential,
            Err(why) => {
                return Answer::error(
                    ImdsError::new(StatusCode::FORBIDDEN, "invalid_request", why.clone()),
                    Outcome::UpstreamError,
                    why,
                );
            }
        };
        (audit.identity.clone(), credential)
    };

    match state
        .tokens
        .token(&identity_key, &credential, &query.resource)
        .await
    {
        Ok((token, cache)) => {
            let hit = matches!(cache, CacheStatus::Hit);
            state.metrics.cache_lookup(hit);
            audit.cache = if hit { CacheUse::Hit } else { CacheUse::Miss };
            audit.expires_on = token.expires_on;
            audit.token_sha256 = token.fingerprint.clone();
            if audit.client_id.is_empty() {
                audit.client_id = token.client_id.clone();
            }
            Answer {
                response: imds::token_response(&token, &query.resource, now_unix()),
                outcome: Outcome::Issued,
                reason: String::new(),
            }
        }
        Err(error) => {
            let (code, description) = error.imds_error();
            let mut imds_error = ImdsError::new(
                StatusCode::from_u16(error.http_status())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                code,
                description,
            );
            if let Some(retry) = error.retry_after() {
                imds_error = imds_error.with_retry_after(retry.as_secs().max(1));
            }
            Answer::error(imds_error, Outcome::UpstreamError, error.to_string())
        }
    }
}

async fn proxy<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    request: Request<Incoming>,
    audit: &mut AuditRecord,
    attributed: &mut Option<Workload>,
) -> Answer {
    if let Err(error) = imds::check_headers(request.headers()) {
        let reason = error.description.clone();
        return Answer::error(error, Outcome::InvalidRequest, reason);
    }
    if attributed.is_none() {
        match attribute(state, connection, audit).await {
            Ok(workload) => *attributed = Some(workload),
            Err(answer) => return answer,
        }
    }
    match state.proxy.forward(request).await {
        Ok(response) => Answer {
            reason: format!("forwarded to IMDS ({})", response.status()),
            response,
            outcome: Outcome::Proxied,
        },
        Err(error) => {
            let reason = format!("{error}");
            Answer::error(
                ImdsError::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    "The instance metadata service did not answer",
                ),
                Outcome::UpstreamError,
                reason,
            )
        }
    }
}
