//! One request: route, validate, attribute, decide, get the token, answer,
//! audit. Every path through here leaves exactly one audit record on the
//! connection, which sends it once the response is out (or at once, if the
//! client has already hung up).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::{Instrument, debug_span};

use podid_api::validation::IdentityRules;

use super::{
    AppState, Connection,
    forwarding::{ForwardPolicy, Forwarding},
    imds::{self, ImdsError, Route},
};
use crate::{
    audit::{AuditRecord, CacheUse, Outcome},
    identity::{NoIdentity, RequestedIdentity, bound_identities, choose},
    tokens::{CacheStatus, Credential, ImdsSelector},
    workloads::{Assignment, Unattributed, Workload, WorkloadSource},
};

/// The `identity` of audit records for exception pods' node identity.
pub(crate) const NODE_IDENTITY: &str = "node";

/// Behaviour switches and limits of the endpoint.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Upstream IMDS base URL (proxied paths).
    pub imds_endpoint: String,
    /// Answer `/metadata/instance` with 403 instead of proxying it.
    pub block_instance_metadata: bool,
    /// Which other IMDS paths are forwarded, with which methods.
    pub forward: ForwardPolicy,
    /// Which AzureIdentity specs may be used.
    pub identity_rules: IdentityRules,
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
            forward: ForwardPolicy::default(),
            identity_rules: IdentityRules::default(),
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
            | Outcome::IdentityRefused
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
    let (cgroup_id, pid) = (connection.record.cgroup_id, connection.record.tgid);
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
        Route::IdentityOther => {
            blocked(
                state,
                connection,
                audit,
                workload,
                ImdsError::not_found(
                    "Not found: of /metadata/identity, pods may use only the token endpoint",
                ),
                "the identity namespace is never forwarded: only its token endpoint is served",
            )
            .await
        }
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

/// Answers `error` without forwarding anything, auditing who asked as far as
/// the connection can be attributed.
async fn blocked<S: WorkloadSource>(
    state: &AppState<S>,
    connection: &Connection,
    audit: &mut AuditRecord,
    workload: &mut Option<Workload>,
    error: ImdsError,
    reason: &str,
) -> Answer {
    if let Ok(attributed) = attribute(state, connection, audit).await {
        *workload = Some(attributed);
    }
    Answer::error(error, Outcome::Blocked, reason)
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
    let record = connection.record;
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

    let excepted = state.source.is_exception(&workload);
    let (identity_key, credential) = if excepted {
        // Only here does a request reach IMDS for the node's own identity,
        // with the selector the pod sent (none: the system-assigned one).
        let selector = match &query.requested {
            RequestedIdentity::Any => None,
            RequestedIdentity::ClientId(id) => Some(ImdsSelector::ClientId(id.clone())),
            RequestedIdentity::ObjectId(id) => Some(ImdsSelector::ObjectId(id.clone())),
            RequestedIdentity::ResourceId(id) => Some(ImdsSelector::ResourceId(id.clone())),
        };
        audit.identity = NODE_IDENTITY.to_string();
        audit.client_id = match &selector {
            Some(ImdsSelector::ClientId(id)) => id.clone(),
            _ => String::new(),
        };
        (
            NODE_IDENTITY.to_string(),
            Credential::NodeIdentity { selector },
        )
    } else {
        let catalog = state.source.catalog();
        let chosen = bound_identities(
            catalog.as_ref(),
            state.source.namespace_rule(),
            &state.settings.identity_rules,
            &workload.namespace,
            &workload.labels,
        )
        .and_then(|bound| choose(&bound, &query.requested));
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err(NoIdentity::NoUsableBinding {
                refused, detail, ..
            }) if !refused.is_empty() => {
                for refusal in &refused {
                    state.source.on_identity_refused(refusal);
                }
                return Answer::error(
                    ImdsError::identity_not_found(),
                    Outcome::IdentityRefused,
                    detail,
                );
            }
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
        let credential = match Credential::try_from(chosen.identity.as_ref()) {
            Ok(credential) => credential,
            Err(refusal) => {
                return Answer::error(
                    ImdsError::identity_not_found(),
                    Outcome::IdentityRefused,
                    format!("AzureIdentity {} is refused: {refusal}", audit.identity),
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
                reason: if excepted {
                    "the node's own identity: an AzurePodIdentityException matches this pod".into()
                } else {
                    String::new()
                },
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
    match state
        .settings
        .forward
        .decide(request.method(), request.uri().path())
    {
        Forwarding::Allowed => {}
        Forwarding::NotListed => {
            return blocked(
                state,
                connection,
                audit,
                attributed,
                ImdsError::not_found("Not found: podid does not forward this path"),
                "not on the forwarding allowlist (--forward)",
            )
            .await;
        }
        Forwarding::MethodNotAllowed(allowed) => {
            return blocked(
                state,
                connection,
                audit,
                attributed,
                ImdsError::method_not_allowed(request.method(), &allowed),
                "method not on the forwarding allowlist (--forward)",
            )
            .await;
        }
    }
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
