//! Emulated Azure token endpoints: IMDS (managed identities of "this VM") and
//! Entra ID (client credentials), on one plain-HTTP server.
//!
//! Faithful to the contracts in `reference/peers-and-clients.md` §C:
//! - `GET /metadata/identity/oauth2/token?api-version=…&resource=…[&client_id|object_id|msi_res_id|mi_res_id=…]`
//!   needs `Metadata: true` (checked first: SDK probes send none) and no
//!   `X-Forwarded-For`; an identity not assigned to the VM gets 400
//!   `{"error":"invalid_request","error_description":"Identity not found"}`;
//!   a 200 has every field as a string.
//! - `GET /metadata/instance[/…]?api-version=…[&format=text]`; any other path
//!   gets IMDS's 404.
//! - The "managed identity v2" credential endpoints
//!   (`GET /metadata/identity/getplatformmetadata`,
//!   `POST /metadata/identity/issuecredential`), answering with a credential
//!   of the VM's own identity, as a VM where Azure enables them does.
//! - A token request that names no identity gets the VM's system-assigned
//!   ("node") identity, whose tokens carry a `xms_mirid` of a
//!   `Microsoft.Compute/virtualMachines` resource ([`is_node_token`]).
//! - `POST /{tenant}/oauth2/token` (v1, `resource`; string fields) and
//!   `POST /{tenant}/oauth2/v2.0/token` (v2, `scope`; numeric fields), with
//!   `client_secret` or an RS256 `client_assertion`; errors in Entra ID's
//!   JSON shape with AADSTS codes.
//!
//! Tokens are unsigned JWT-shaped strings naming their identity and audience
//! ([`token_claims`]), distinct per issuance, expiring after the configured
//! lifetime. Faults (status, `Retry-After`, stalls, dropped connections) and
//! accounting (calls per endpoint, client id and resource; issued tokens;
//! peak concurrency) are available on [`EmulatorHandle`] and over HTTP under
//! `/_emulator/` (see [`control`]).

mod certs;
mod config;
pub mod control;
mod entra;
mod faults;
mod imds;
mod mint;
mod respond;
mod state;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

pub use certs::{
    CertError, KEY_BITS, TestCertificate, cert_der_from_text, public_key_of, thumbprint_sha1,
    thumbprint_sha256,
};
pub use config::{
    DEFAULT_SUBSCRIPTION_ID, DEFAULT_TENANT_ID, EmulatorConfig, ManagedIdentity, RegisteredClient,
    random_guid,
};
pub use entra::JWT_BEARER;
pub use faults::{CallCount, Endpoint, Fault, FaultAction, IssuedRecord, RequestRecord};
pub use mint::{is_node_token, token_claims};

use respond::{Body, Dropped};
use state::Shared;

/// How long open connections get to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Errors starting or configuring the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The listen address could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A registered client's certificate is unusable.
    #[error("registered client {client_id}")]
    Client {
        /// The client.
        client_id: String,
        /// Cause.
        #[source]
        source: CertError,
    },
}

/// The emulator server.
pub struct Emulator;

impl Emulator {
    /// Binds `config.listen` and serves until the handle is shut down or
    /// dropped.
    pub async fn start(config: EmulatorConfig) -> Result<EmulatorHandle, EmulatorError> {
        let shared = Arc::new(Shared::new(&config)?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.listen,
                source,
            })?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), stopped));
        tracing::info!(%addr, "emulator listening");
        Ok(EmulatorHandle {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }
}

/// A running emulator. Dropping it stops the server (in the background);
/// [`EmulatorHandle::shutdown`] stops it and waits.
pub struct EmulatorHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EmulatorHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`: the IMDS endpoint and the Entra ID authority.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tenant of the emulated managed identities.
    pub fn tenant_id(&self) -> String {
        self.shared.lock().tenant_id.clone()
    }

    /// The VM's system-assigned identity, if configured.
    pub fn system_assigned(&self) -> Option<ManagedIdentity> {
        self.shared.lock().system_assigned.clone()
    }

    /// Adds a fault rule (applied in the order added).
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().add_fault(fault);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.lock().clear_faults();
    }

    /// Requests to `endpoint` for `client_id` (case-insensitive) and
    /// `resource` (exact), whatever their outcome.
    pub fn calls(&self, endpoint: Endpoint, client_id: &str, resource: &str) -> u64 {
        self.shared.lock().count(endpoint, client_id, resource)
    }

    /// All requests to `endpoint`.
    pub fn calls_to(&self, endpoint: Endpoint) -> u64 {
        self.shared
            .lock()
            .counts()
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .map(|c| c.count)
            .sum()
    }

    /// Request counts per (endpoint, client id, resource).
    pub fn call_counts(&self) -> Vec<CallCount> {
        self.shared.lock().counts()
    }

    /// The most recent requests (up to 100 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests()
    }

    /// Tokens issued (up to the 100 000 most recent), oldest first.
    pub fn issued_tokens(&self) -> Vec<IssuedRecord> {
        self.shared.lock().issued()
    }

    /// The largest number of token requests being handled at once since
    /// start or the last [`reset`](Self::reset).
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_in_flight()
    }

    /// Clears counts, records, issued tokens and faults.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Assigns a user-assigned identity to the VM (replacing one with the
    /// same client id).
    pub fn assign_identity(&self, identity: ManagedIdentity) {
        self.shared.lock().assign(identity);
    }

    /// Removes a user-assigned identity from the VM; false if it was not there.
    pub fn unassign_identity(&self, client_id: &str) -> bool {
        self.shared.lock().unassign(client_id)
    }

    /// Registers (or replaces) an Entra ID client.
    pub fn register_client(&self, client: &RegisteredClient) -> Result<(), EmulatorError> {
        self.shared
            .register_client(client)
            .map_err(|source| EmulatorError::Client {
                client_id: client.client_id.clone(),
                source,
            })
    }

    /// Sets the lifetime of tokens issued from now on (whole seconds, ≥ 1).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().token_lifetime = Duration::from_secs(lifetime.as_secs().max(1));
    }

    /// Stops accepting, lets open connections finish (briefly) and waits.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let shared = Arc::clone(&shared);
                    let mut stop = stop.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req| {
                            let shared = Arc::clone(&shared);
                            async move { route(&shared, req).await }
                        });
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                        tokio::pin!(conn);
                        let stopping = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            () = stopping => {
                                conn.as_mut().graceful_shutdown();
                                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Result<http::Response<Body>, Dropped> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/metadata/identity/oauth2/token" {
        return imds::token(shared, &parts).await;
    }
    if path == "/metadata/instance" || path.starts_with("/metadata/instance/") {
        return imds::instance(shared, &parts).await;
    }
    if path == "/metadata/identity/getplatformmetadata"
        || path == "/metadata/identity/issuecredential"
    {
        return Ok(imds::credential_v2(shared, &parts));
    }
    let entra = entra::route(&path);
    let is_control = path.starts_with("/_emulator/");
    if entra.is_none() && !is_control {
        return Ok(imds::not_found());
    }
    let body: Bytes = match Limited::new(body, entra::MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(respond::json(
                413,
                &serde_json::json!({"error": "request body too large or unreadable"}),
            ));
        }
    };
    match entra {
        Some((tenant, endpoint)) => entra::token(shared, &parts, &body, &tenant, endpoint).await,
        None => Ok(control::handle(shared, &parts, &body)),
    }
}

#[cfg(test)]
mod tests;
