//! Getting, caching and refreshing tokens from upstream.
//!
//! The server decides which identity a request gets; [`TokenService::token`]
//! returns a token for it:
//! - **Upstream**: IMDS for managed identities (user-assigned by client id,
//!   or the node's own), Entra ID's v1 client-credentials endpoint for
//!   service principals (client secret, or a client assertion signed with
//!   the PKCS#12 certificate), secrets read through a [`SecretSource`].
//! - **Cache** keyed by (identity, credential kind + authority + tenant +
//!   client id, normalised resource), bounded to `max_entries` (least
//!   recently used evicted). Resources are percent-decoded and lose a
//!   trailing `/.default`; a trailing slash stays significant (`aud` is the
//!   resource verbatim).
//! - **Single flight**: concurrent misses for one key make one upstream call
//!   and share its result, success or error; a failure is not cached.
//! - **Refresh ahead**: a token is refreshed in the background at its
//!   refresh point (or by the first request after it) if it was asked for
//!   since it was fetched; idle entries are dropped instead. A cached token
//!   within `safety_margin` of expiry is never served. A failed refresh
//!   keeps the old token in service and is retried with backoff.
//! - **Bounded** upstream calls: a concurrency cap per upstream, retries with
//!   backoff and `Retry-After`, and a total time budget per call.
//!
//! Tokens never reach logs, errors or `Debug` output; logs carry
//! [`IssuedToken::fingerprint`].

mod assertion;
mod cache;
mod config;
mod credential;
mod error;
mod issued;
mod requests;
mod resource;
mod secrets;
mod upstream;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::{
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use config::TokenConfig;
pub use credential::{Credential, ImdsSelector, SecretRef};
pub use error::TokenError;
pub use issued::{IssuedToken, fingerprint};
pub use secrets::{FileSecretSource, SecretError, SecretSource};
pub use upstream::{NoopObserver, Upstream, UpstreamObserver};

use cache::{Cache, Flight, FlightResult};
use credential::{CacheKey, Resolved};
use requests::ClientAuth;
use upstream::{CallFailure, HttpClient, RetryPolicy};

/// Whether a token came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache.
    Hit,
    /// Fetched from upstream for this request (or a concurrent one).
    Miss,
}

/// Longest wait between failed refreshes.
const MAX_REFRESH_RETRY: Duration = Duration::from_secs(300);
/// Slack on top of `max_total_wait` before a fetch is abandoned.
const FETCH_GRACE: Duration = Duration::from_secs(5);

/// Gets, caches and refreshes tokens. Cheap to clone (shared state).
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("imds", &self.inner.imds_base)
            .field("cached", &self.cached_len())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: TokenConfig,
    imds_base: String,
    default_authority: String,
    /// Authorities an identity may name: the operator's, and the default.
    allowed_authorities: Vec<String>,
    policy: RetryPolicy,
    http: HttpClient,
    secrets: Arc<dyn SecretSource>,
    observer: Arc<dyn UpstreamObserver>,
    cache: Mutex<Cache>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a lookup decided.
enum Lookup {
    Hit(Arc<IssuedToken>),
    Wait(watch::Receiver<Option<FlightResult>>),
}

impl TokenService {
    /// A token service with its own HTTP client (plain HTTP and HTTPS with
    /// webpki roots). Fails only on an invalid configuration.
    pub fn new(
        config: TokenConfig,
        secrets: Arc<dyn SecretSource>,
        observer: Arc<dyn UpstreamObserver>,
    ) -> Result<Self, TokenError> {
        config.validate().map_err(TokenError::Config)?;
        let imds_base = config::base_url(&config.imds_endpoint).map_err(TokenError::Config)?;
        let default_authority =
            config::base_url(&config.aad_authority).map_err(TokenError::Config)?;
        let http = HttpClient::new(&config).map_err(TokenError::Config)?;
        let mut allowed_authorities = config.allowed_authorities.clone();
        allowed_authorities.push(default_authority.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                policy: RetryPolicy::from_config(&config),
                cache: Mutex::new(Cache::new(config.max_entries)),
                config,
                imds_base,
                default_authority,
                allowed_authorities,
                http,
                secrets,
                observer,
            }),
        })
    }

    /// A token for `identity` (`namespace/name`, part of the cache key) with
    /// `credential`, for `resource` (normalised: see the module docs).
    pub async fn token(
        &self,
        identity: &str,
        credential: &Credential,
        resource: &str,
    ) -> Result<(Arc<IssuedToken>, CacheStatus), TokenError> {
        let resolved = credential::resolve(
            identity,
            credential,
            resource,
            &self.inner.default_authority,
            &self.inner.allowed_authorities,
        )?;
        match self.inner.lookup(&resolved, credential) {
            Lookup::Hit(token) => Ok((token, CacheStatus::Hit)),
            Lookup::Wait(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(result) => match result.as_ref() {
                    Some(Ok(token)) => Ok((Arc::clone(token), CacheStatus::Miss)),
                    Some(Err(e)) => Err(e.clone()),
                    None => Err(TokenError::Internal(
                        "token fetch ended without a result".into(),
                    )),
                },
                Err(_) => Err(TokenError::Internal("token fetch was abandoned".into())),
            },
        }
    }

    /// Drops every cached token of `identity` (deleted or changed).
    pub fn forget_identity(&self, identity: &str) {
        let removed = self.inner.lock().remove_identity(identity);
        if removed > 0 {
            info!(identity, removed, "forgot cached tokens");
        }
    }

    /// Number of cached tokens.
    pub fn cached_len(&self) -> usize {
        self.inner.lock().token_count()
    }
}

impl Inner {
    /// Locks the cache. Updates are single steps, so a panic elsewhere
    /// cannot leave it inconsistent: poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lookup(self: &Arc<Self>, resolved: &Resolved, credential: &Credential) -> Lookup {
        let now = now_ms();
        let mut cache = self.lock();
        let flight_id = cache.flight_id();
        if let Some(entry) = cache.touch(&resolved.key) {
            entry.requested = true;
            if let Some(token) = entry.token.clone()
                && cache::servable(&token, now, self.config.safety_margin)
            {
                if now >= entry.refresh_at_ms && now >= entry.retry_at_ms && entry.flight.is_none()
                {
                    debug!(identity = %resolved.key.identity, resource = %resolved.resource, fingerprint = %token.fingerprint, "refreshing token on request");
                    entry.flight = Some(self.start_flight(
                        resolved.clone(),
                        credential.clone(),
                        flight_id,
                        false,
                    ));
                }
                return Lookup::Hit(token);
            }
            if let Some(flight) = &mut entry.flight {
                // A refresh in progress now has waiters: its token is asked for.
                flight.for_miss = true;
                return Lookup::Wait(flight.rx.clone());
            }
            let flight = self.start_flight(resolved.clone(), credential.clone(), flight_id, true);
            let rx = flight.rx.clone();
            entry.flight = Some(flight);
            return Lookup::Wait(rx);
        }
        let flight = self.start_flight(resolved.clone(), credential.clone(), flight_id, true);
        let rx = flight.rx.clone();
        cache.insert(resolved, credential).flight = Some(flight);
        Lookup::Wait(rx)
    }

    /// Starts the upstream call for a key in a task of its own, so it
    /// completes for every waiter even if the request that started it goes.
    fn start_flight(
        self: &Arc<Self>,
        resolved: Resolved,
        credential: Credential,
        id: u64,
        for_miss: bool,
    ) -> Flight {
        let (tx, rx) = watch::channel(None);
        let guard = FlightGuard {
            inner: Arc::downgrade(self),
            key: resolved.key.clone(),
            id,
            tx: Some(tx),
        };
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let budget = inner.config.max_total_wait + FETCH_GRACE;
            let result =
                match tokio::time::timeout(budget, inner.fetch(&resolved, &credential)).await {
                    Ok(result) => result.map(Arc::new),
                    Err(_) => Err(TokenError::Unavailable {
                        upstream: upstream_of(&credential),
                        attempts: 0,
                        status: None,
                        reason: format!("no token within {budget:?}"),
                        retry_after: error::DEFAULT_RETRY_AFTER,
                    }),
                };
            match &result {
                Ok(token) => info!(
                    identity = %resolved.key.identity,
                    kind = credential.kind(),
                    client_id = %token.client_id,
                    resource = %resolved.resource,
                    fingerprint = %token.fingerprint,
                    expires_on = token.expires_on,
                    refresh = !for_miss,
                    "token fetched"
                ),
                Err(e) => warn!(
                    identity = %resolved.key.identity,
                    kind = credential.kind(),
                    resource = %resolved.resource,
                    error = %e,
                    refresh = !for_miss,
                    "token fetch failed"
                ),
            }
            drop(inner);
            guard.finish(result);
        });
        Flight { id, rx, for_miss }
    }

    /// Records a flight's result in the cache (if the entry is still there
    /// and still waiting for this flight).
    fn complete(self: &Arc<Self>, key: &CacheKey, id: u64, result: &FlightResult) {
        let now = now_ms();
        let mut cache = self.lock();
        let Some(entry) = cache.get_mut(key) else {
            return;
        };
        let Some(flight) = entry.flight.take_if(|f| f.id == id) else {
            return;
        };
        match result {
            Ok(token) => {
                entry.token = Some(Arc::clone(token));
                entry.refresh_at_ms = cache::refresh_at_ms(
                    token,
                    now,
                    self.config.refresh_ahead,
                    self.config.safety_margin,
                );
                entry.retry_at_ms = 0;
                entry.failures = 0;
                // Waiters of a miss asked for this token; a refreshed one
                // has not been asked for yet.
                entry.requested = flight.for_miss;
                let at = entry.refresh_at_ms;
                entry.set_timer(self.schedule_refresh(key.clone(), at, now));
            }
            Err(e) => {
                let old_servable = entry
                    .token
                    .as_ref()
                    .is_some_and(|t| cache::servable(t, now, self.config.safety_margin));
                if !old_servable {
                    // Nothing left to serve; the next request tries afresh.
                    cache.remove(key);
                    return;
                }
                entry.failures += 1;
                let backoff = self
                    .config
                    .refresh_retry
                    .saturating_mul(1u32 << (entry.failures - 1).min(16))
                    .min(MAX_REFRESH_RETRY);
                let backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
                entry.retry_at_ms = now.saturating_add(backoff_ms);
                debug!(identity = %key.identity, failures = entry.failures, retry_in = ?backoff, error = %e, "refresh failed; still serving the old token");
                let at = entry.retry_at_ms;
                entry.set_timer(self.schedule_refresh(key.clone(), at, now));
            }
        }
    }

    /// A task that calls [`Inner::refresh_due`] at `at_ms`.
    fn schedule_refresh(
        self: &Arc<Self>,
        key: CacheKey,
        at_ms: u64,
        now_ms: u64,
    ) -> tokio::task::AbortHandle {
        let weak = Arc::downgrade(self);
        let wake = Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms));
        tokio::spawn(async move {
            tokio::time::sleep_until(wake.into()).await;
            if let Some(inner) = weak.upgrade() {
                inner.refresh_due(&key);
            }
        })
        .abort_handle()
    }

    /// A token reached its refresh point (or a failed refresh may be
    /// retried): refresh it if it was asked for, drop it if idle.
    fn refresh_due(self: &Arc<Self>, key: &CacheKey) {
        let now = now_ms();
        let mut cache = self.lock();
        let flight_id = cache.flight_id();
        let Some(entry) = cache.get_mut(key) else {
            return;
        };
        if entry.flight.is_some() {
            return;
        }
        let servable = entry
            .token
            .as_ref()
            .is_some_and(|t| cache::servable(t, now, self.config.safety_margin));
        if !servable || !entry.requested {
            debug!(identity = %key.identity, resource = %key.resource, servable, "dropping idle token instead of refreshing it");
            cache.remove(key);
            return;
        }
        debug!(identity = %key.identity, resource = %key.resource, "refreshing token ahead of expiry");
        // The timer task is this one: forget its handle without aborting it.
        entry.timer = None;
        entry.flight = Some(self.start_flight(
            entry.resolved.clone(),
            entry.credential.clone(),
            flight_id,
            false,
        ));
    }

    /// One upstream token fetch (with retries).
    async fn fetch(
        &self,
        resolved: &Resolved,
        credential: &Credential,
    ) -> Result<IssuedToken, TokenError> {
        let identity = &resolved.key.identity;
        let request =
            match credential {
                Credential::ManagedIdentity { selector } => {
                    requests::imds_token(&self.imds_base, &resolved.resource, Some(selector))
                }
                Credential::NodeIdentity { selector } => {
                    requests::imds_token(&self.imds_base, &resolved.resource, selector.as_ref())
                }
                Credential::ClientSecret {
                    tenant_id,
                    client_id,
                    secret,
                    ..
                } => {
                    let value = self.secrets.client_secret(secret).await.map_err(|e| {
                        TokenError::Secret {
                            identity: identity.clone(),
                            secret: secret.clone(),
                            source: Arc::new(e),
                        }
                    })?;
                    let url = requests::entra_token_url(&resolved.authority, tenant_id);
                    requests::entra_token(
                        &url,
                        client_id,
                        &resolved.resource,
                        ClientAuth::Secret(&value),
                    )
                }
                Credential::ClientCertificate {
                    tenant_id,
                    client_id,
                    secret,
                    ..
                } => {
                    let (bundle, password) =
                        self.secrets
                            .certificate(secret)
                            .await
                            .map_err(|e| TokenError::Secret {
                                identity: identity.clone(),
                                secret: secret.clone(),
                                source: Arc::new(e),
                            })?;
                    let url = requests::entra_token_url(&resolved.authority, tenant_id);
                    let (audience, client) = (url.clone(), client_id.clone());
                    // PKCS#12 decryption and RSA signing are CPU work.
                    let assertion = tokio::task::spawn_blocking(move || {
                        let cert = assertion::SigningCert::from_pkcs12(&bundle, &password)?;
                        cert.client_assertion(&client, &audience, now_ms() / 1000)
                    })
                    .await
                    .map_err(|e| TokenError::Internal(format!("signing task failed: {e}")))?
                    .map_err(|reason| TokenError::Certificate {
                        identity: identity.clone(),
                        secret: secret.clone(),
                        reason,
                    })?;
                    requests::entra_token(
                        &url,
                        client_id,
                        &resolved.resource,
                        ClientAuth::Assertion(&assertion),
                    )
                }
            };
        let upstream = request.upstream;
        let response = self
            .http
            .call(&request, self.policy, self.observer.as_ref())
            .await
            .map_err(|failure| failure_error(failure, upstream, credential))?;
        issued::parse_token_response(
            &response.body,
            now_ms() / 1000,
            &resolved.resource,
            credential.client_id().unwrap_or(""),
        )
        .map_err(|reason| TokenError::InvalidResponse { upstream, reason })
    }
}

/// Delivers a flight's result exactly once, even if the task panics.
struct FlightGuard {
    inner: Weak<Inner>,
    key: CacheKey,
    id: u64,
    tx: Option<watch::Sender<Option<FlightResult>>>,
}

impl FlightGuard {
    fn finish(mut self, result: FlightResult) {
        self.deliver(result);
    }

    fn deliver(&mut self, result: FlightResult) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        if let Some(inner) = self.inner.upgrade() {
            inner.complete(&self.key, self.id, &result);
        }
        let _ = tx.send(Some(result));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.deliver(Err(TokenError::Internal(
                "token fetch task ended early".into(),
            )));
        }
    }
}

fn upstream_of(credential: &Credential) -> Upstream {
    match credential {
        Credential::ManagedIdentity { .. } | Credential::NodeIdentity { .. } => Upstream::Imds,
        _ => Upstream::EntraId,
    }
}

/// Maps a failed upstream call to what the pod is told.
fn failure_error(failure: CallFailure, upstream: Upstream, credential: &Credential) -> TokenError {
    match failure {
        CallFailure::Rejected(resp) => {
            let json: Option<Value> = serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .filter(Value::is_object);
            let field = |name: &str| {
                json.as_ref()
                    .and_then(|j| j[name].as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            let error = field("error");
            let mut description = field("error_description");
            if description.is_empty() && json.is_none() {
                description = String::from_utf8_lossy(&resp.body)
                    .chars()
                    .take(200)
                    .collect();
            }
            if upstream == Upstream::Imds
                && resp.status == 400
                && description
                    .to_ascii_lowercase()
                    .contains("identity not found")
                && let Credential::ManagedIdentity { selector } = credential
            {
                return TokenError::IdentityNotAssigned {
                    selector: selector.to_string(),
                };
            }
            TokenError::Rejected {
                upstream,
                status: resp.status,
                error,
                description,
                body: json.map(Arc::new),
            }
        }
        CallFailure::GaveUp {
            attempts,
            last,
            retry_after,
        } => match last {
            Ok(resp) if resp.status == 429 => TokenError::Throttled {
                upstream,
                retry_after: retry_after.unwrap_or(error::DEFAULT_RETRY_AFTER),
            },
            Ok(resp) => TokenError::Unavailable {
                upstream,
                attempts,
                status: Some(resp.status),
                reason: format!("HTTP {}", resp.status),
                retry_after: retry_after.unwrap_or(error::DEFAULT_RETRY_AFTER),
            },
            Err(why) => TokenError::Unavailable {
                upstream,
                attempts,
                status: None,
                reason: why.to_string(),
                retry_after: retry_after.unwrap_or(error::DEFAULT_RETRY_AFTER),
            },
        },
    }
}
