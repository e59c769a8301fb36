//! The IMDS-compatible endpoint: accepting redirected connections, tying each
//! to the kernel's record, bounding what a client may cost, and serving the
//! token protocol (hyper 1, HTTP/1.1).
//!
//! Each connection carries one request (`Connection: close`), which is how
//! SDKs use IMDS anyway: attribution is per connection, and a fresh
//! connection per request keeps it exact.

pub mod admission;
mod connection;
pub mod forwarding;
mod handler;
pub mod head;
pub mod imds;
mod proxy;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument, debug, debug_span, warn};

use connection::{Connection, HUNG_UP, TIMED_OUT};
pub use handler::ServerSettings;
use head::{HeadError, HeadLimits, Rewind, raw_error_response, read_head};

use crate::{
    attribution::CgroupPaths,
    audit::{AuditLog, AuditRecord, Outcome},
    metrics::Metrics,
    redirect::{PeerRecord, Redirect, RedirectError},
    tokens::TokenService,
    workloads::WorkloadSource,
};

/// Where the kernel's per-connection records come from.
pub trait PeerRecords: Send + Sync + 'static {
    /// Takes (reads and deletes) the record of the connection `peer → local`.
    fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<PeerRecord>, RedirectError>;
}

impl PeerRecords for Redirect {
    fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<PeerRecord>, RedirectError> {
        self.take_peer_record(peer, local)
    }
}

/// Everything a request handler needs.
pub struct AppState<S> {
    /// Node name, for audit records.
    pub node: String,
    /// Workloads and identity objects.
    pub source: Arc<S>,
    /// Kernel records.
    pub records: Arc<dyn PeerRecords>,
    /// cgroup id → path.
    pub cgroups: Arc<CgroupPaths>,
    /// Tokens.
    pub tokens: Arc<TokenService>,
    /// Audit sink.
    pub audit: Arc<AuditLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Behaviour switches and limits.
    pub settings: ServerSettings,
    /// Upstream HTTP client for proxied paths.
    pub proxy: proxy::Proxy,
    /// Which kernel records are trusted.
    pub record_rules: admission::RecordRules,
    /// Connections being served, over every listener (the node's and, in
    /// zero-policy mode, the pods').
    active: Arc<AtomicUsize>,
}

impl<S> AppState<S> {
    /// Builds the state; `upstream` is the IMDS base URL for proxied paths.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        source: Arc<S>,
        records: Arc<dyn PeerRecords>,
        cgroups: Arc<CgroupPaths>,
        tokens: Arc<TokenService>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        settings: ServerSettings,
        record_rules: admission::RecordRules,
    ) -> Result<Self, proxy::ProxyError> {
        let proxy = proxy::Proxy::new(&settings.imds_endpoint, settings.proxy_timeout)?;
        Ok(Self {
            node,
            source,
            records,
            cgroups,
            tokens,
            audit,
            metrics,
            settings,
            proxy,
            record_rules,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// Serves `listener` until `shutdown` becomes true, then waits (bounded by
/// `settings.request_timeout`) for connections in flight.
pub async fn serve<S: WorkloadSource>(
    listener: TcpListener,
    state: Arc<AppState<S>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let active = state.active.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted_at = Instant::now();
        let record =
            match admission::admit(state.records.as_ref(), &state.record_rules, &stream, peer) {
                Ok(record) => record,
                Err(refusal) => {
                    // Refused before anything is read: it never holds a place.
                    tokio::spawn(refuse_unattributed(
                        stream,
                        state.clone(),
                        refusal,
                        accepted_at,
                    ));
                    continue;
                }
            };
        if active.load(Ordering::Relaxed) >= state.settings.max_connections {
            state.metrics.rejected_connection("connection_limit");
            tokio::spawn(refuse(stream, state.clone(), "connection_limit"));
            continue;
        }
        let guard = Arc::new(ActiveGuard::new(active.clone(), state.clone()));
        let state = state.clone();
        tokio::spawn(serve_connection(stream, peer, record, state, guard));
    }
    let deadline = Instant::now() + state.settings.request_timeout;
    while active.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct ActiveGuard<S> {
    active: Arc<AtomicUsize>,
    state: Arc<AppState<S>>,
}

impl<S> ActiveGuard<S> {
    fn new(active: Arc<AtomicUsize>, state: Arc<AppState<S>>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        state.metrics.active_connections().inc();
        Self { active, state }
    }
}

impl<S> Drop for ActiveGuard<S> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.state.metrics.active_connections().dec();
    }
}

/// Answers `error` at once and closes, bounded to a second; what the
/// client may still be sending is read and dropped, so that closing does not
/// turn the answer into a reset.
async fn answer_and_close(stream: &mut TcpStream, error: &imds::ImdsError) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&raw_error_response(error)).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 1024];
        while matches!(
            tokio::io::AsyncReadExt::read(stream, &mut sink).await,
            Ok(n) if n > 0
        ) {}
    })
    .await;
}

/// A connection whose kernel record cannot be trusted (see [`admission`]):
/// 403 at once, audited, counted.
async fn refuse_unattributed<S>(
    mut stream: TcpStream,
    state: Arc<AppState<S>>,
    refusal: admission::Refusal,
    accepted: Instant,
) {
    state.metrics.unattributed(refusal.kind);
    let error = imds::ImdsError::new(
        http::StatusCode::FORBIDDEN,
        "access_denied",
        format!(
            "podid could not tie this connection to a workload: {}",
            refusal.reason
        ),
    );
    let record = AuditRecord {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        node: state.node.clone(),
        cgroup_id: refusal.cgroup_id,
        pid: refusal.pid,
        status: error.status.as_u16(),
        outcome: Outcome::Unattributed,
        reason: refusal.reason.clone(),
        latency_us: accepted.elapsed().as_micros() as u64,
        ..AuditRecord::default()
    };
    state.metrics.request(
        "",
        "",
        Outcome::Unattributed,
        error.status.as_u16(),
        accepted.elapsed(),
    );
    answer_and_close(&mut stream, &error).await;
    state.audit.record(record);
    debug!(reason = %refusal.reason, "connection refused at accept");
}

async fn refuse<S>(mut stream: TcpStream, state: Arc<AppState<S>>, reason: &'static str) {
    let error = imds::ImdsError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "Too many connections; retry",
    )
    .with_retry_after(1);
    answer_and_close(&mut stream, &error).await;
    debug!(reason, node = %state.node, "connection refused by limit");
}

/// Serves one connection. `active` counts it against `--max-connections`
/// until both the connection and its request's handler are done.
async fn serve_connection<S: WorkloadSource>(
    mut stream: TcpStream,
    peer: SocketAddr,
    record: PeerRecord,
    state: Arc<AppState<S>>,
    active: Arc<ActiveGuard<S>>,
) {
    let accepted = Instant::now();
    let (cgroup_id, pid) = (record.cgroup_id, record.tgid);
    let span = debug_span!("connection", %peer, cgroup_id, pid);
    async move {
        let limits = HeadLimits {
            max_bytes: state.settings.max_header_bytes,
            timeout: state.settings.header_timeout,
        };
        let head = match read_head(&mut stream, limits).await {
            Ok(head) => head,
            Err(HeadError::Closed) => return,
            Err(HeadError::Reject { error, reason }) => {
                state.metrics.rejected_connection(reason);
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(&raw_error_response(&error)).await;
                    let _ = stream.shutdown().await;
                })
                .await;
                let outcome = if reason == "malformed_request" {
                    Outcome::InvalidRequest
                } else {
                    Outcome::Rejected
                };
                let record = AuditRecord {
                    ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                    node: state.node.clone(),
                    cgroup_id,
                    pid,
                    status: error.status.as_u16(),
                    outcome,
                    reason: error.description.clone(),
                    latency_us: accepted.elapsed().as_micros() as u64,
                    ..AuditRecord::default()
                };
                state
                    .metrics
                    .request("", "", outcome, error.status.as_u16(), accepted.elapsed());
                state.audit.record(record);
                return;
            }
        };
        let connection = Arc::new(Connection::new(record));
        let io = TokioIo::new(Rewind::new(head, stream));
        let service_state = state.clone();
        let service_connection = Arc::clone(&connection);
        let service = service_fn(move |request| {
            let state = Arc::clone(&service_state);
            let connection = Arc::clone(&service_connection);
            let active = Arc::clone(&active);
            // A task of its own: hyper drops this future when the client
            // hangs up, and a request that got as far as upstream must still
            // finish and leave its audit record. It holds the connection's
            // place under --max-connections until it is done.
            let handling = tokio::spawn(
                async move {
                    let _active = active;
                    handler::handle(&state, &connection, request).await
                }
                .in_current_span(),
            );
            async move {
                let response = handling.await.unwrap_or_else(|error| {
                    warn!(%error, "request handler failed");
                    imds::ImdsError::new(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal_error",
                        "podid-agent failed to handle the request",
                    )
                    .response()
                });
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let serving = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .max_buf_size(state.settings.max_header_bytes.max(8192))
            .serve_connection(io, service);
        // Why the connection ended matters only when the handler had not
        // finished by then: hyper ends early when the client goes.
        let ended = match tokio::time::timeout(state.settings.request_timeout, serving).await {
            Ok(Ok(())) => HUNG_UP,
            Ok(Err(error)) => {
                debug!(%error, "connection ended with an error");
                HUNG_UP
            }
            Err(_) => {
                state.metrics.rejected_connection("request_timeout");
                debug!("request exceeded the time limit; connection dropped");
                TIMED_OUT
            }
        };
        connection.end(&state.audit, ended);
    }
    .instrument(span)
    .await
}
