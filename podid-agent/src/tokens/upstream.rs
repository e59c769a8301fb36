//! Calling upstream (IMDS, Entra ID): one HTTP client (plain HTTP for IMDS,
//! rustls for Entra ID), a concurrency cap per upstream, and bounded retries
//! with backoff that honour `Retry-After`.

use std::{
    fmt,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::TokenConfig;

/// Largest upstream response body read.
const MAX_BODY: usize = 256 * 1024;
/// Longest `Retry-After` honoured or passed on.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Longest backoff between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// An attempt with less time than this left is not started.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// An upstream token service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// The Instance Metadata Service (managed identities).
    Imds,
    /// Entra ID's token endpoint (service principals).
    EntraId,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Upstream::Imds => "IMDS",
            Upstream::EntraId => "Entra ID",
        })
    }
}

/// Told about every upstream attempt (for metrics).
pub trait UpstreamObserver: Send + Sync {
    /// One attempt ended: `status` is `None` for a transport error or timeout.
    fn upstream_call(&self, upstream: Upstream, status: Option<u16>, elapsed: Duration);
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl UpstreamObserver for NoopObserver {
    fn upstream_call(&self, _: Upstream, _: Option<u16>, _: Duration) {}
}

/// One request to send (possibly several times).
#[derive(Clone)]
pub(crate) struct UpstreamRequest {
    pub(crate) upstream: Upstream,
    pub(crate) method: Method,
    pub(crate) url: String,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// Request body. For Entra ID it holds the client secret or assertion:
    /// never log it.
    pub(crate) body: Bytes,
}

/// An upstream answer.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamResponse {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<Duration>,
    pub(crate) body: Bytes,
}

/// Why an attempt got no answer.
#[derive(Debug, Clone)]
pub(crate) enum NoAnswer {
    Timeout(Duration),
    Transport(String),
    /// The concurrency cap left no slot within the budget.
    Busy,
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoAnswer::Timeout(after) => write!(f, "no answer within {after:?}"),
            NoAnswer::Transport(e) => write!(f, "{e}"),
            NoAnswer::Busy => f.write_str("no upstream slot free within the time budget"),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone)]
pub(crate) enum CallFailure {
    /// A definitive answer (4xx other than 408/429, and IMDS 404): not retried.
    Rejected(UpstreamResponse),
    /// Retries or time ran out.
    GaveUp {
        attempts: u32,
        last: Result<UpstreamResponse, NoAnswer>,
        /// Upstream's last `Retry-After`, or the wait that no longer fit.
        retry_after: Option<Duration>,
    },
}

/// Retry limits of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) max_total_wait: Duration,
    pub(crate) upstream_timeout: Duration,
    pub(crate) base_delay: Duration,
}

impl RetryPolicy {
    pub(crate) fn from_config(config: &TokenConfig) -> Self {
        Self {
            max_attempts: config.max_attempts,
            max_total_wait: config.max_total_wait,
            upstream_timeout: config.upstream_timeout,
            base_delay: config.retry_base_delay,
        }
    }

    /// Backoff before attempt `attempt + 1`, jittered to 50–100 %.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        exp.mul_f64(rand::random_range(0.5..=1.0))
    }
}

/// Whether a status is worth retrying.
fn retryable(upstream: Upstream, status: u16) -> bool {
    match status {
        408 | 410 | 429 | 500..=599 => true,
        // IMDS answers 404 while it is updating.
        404 => upstream == Upstream::Imds,
        _ => false,
    }
}

/// Parses `Retry-After`: delay seconds or an HTTP date; capped.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The HTTP client and concurrency caps.
pub(crate) struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    imds_slots: Semaphore,
    entra_slots: Semaphore,
}

impl HttpClient {
    pub(crate) fn new(config: &TokenConfig) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.upstream_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS configuration: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Self {
            client,
            imds_slots: Semaphore::new(config.upstream_concurrency),
            entra_slots: Semaphore::new(config.upstream_concurrency),
        })
    }

    async fn attempt(
        &self,
        req: &UpstreamRequest,
        timeout: Duration,
    ) -> Result<UpstreamResponse, NoAnswer> {
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(&req.url)
            .header(
                header::USER_AGENT,
                concat!("podid-agent/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in &req.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(req.body.clone()))
            .map_err(|e| NoAnswer::Transport(format!("building the request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| NoAnswer::Transport(error_chain(&e)))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| NoAnswer::Transport(format!("reading the response: {e}")))?
                .to_bytes();
            Ok(UpstreamResponse {
                status,
                retry_after,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(NoAnswer::Timeout(timeout)))
    }

    /// Sends `req` until it succeeds (2xx), is definitively refused, or the
    /// policy's attempts or time run out.
    pub(crate) async fn call(
        &self,
        req: &UpstreamRequest,
        policy: RetryPolicy,
        observer: &dyn UpstreamObserver,
    ) -> Result<UpstreamResponse, CallFailure> {
        let started = Instant::now();
        let deadline = started + policy.max_total_wait;
        let slots = match req.upstream {
            Upstream::Imds => &self.imds_slots,
            Upstream::EntraId => &self.entra_slots,
        };
        let mut attempts = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let permit = match tokio::time::timeout(remaining, slots.acquire()).await {
                Ok(Ok(permit)) => permit,
                _ => {
                    return Err(CallFailure::GaveUp {
                        attempts,
                        last: Err(NoAnswer::Busy),
                        retry_after: None,
                    });
                }
            };
            let per_try = policy
                .upstream_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            if per_try < MIN_ATTEMPT {
                return Err(CallFailure::GaveUp {
                    attempts,
                    last: Err(NoAnswer::Timeout(per_try)),
                    retry_after: None,
                });
            }
            attempts += 1;
            let attempt_started = Instant::now();
            let result = self.attempt(req, per_try).await;
            drop(permit);
            let elapsed = attempt_started.elapsed();
            observer.upstream_call(
                req.upstream,
                result.as_ref().ok().map(|r| r.status),
                elapsed,
            );
            let (last, retry_after) = match result {
                Ok(resp) if (200..300).contains(&resp.status) => {
                    debug!(upstream = %req.upstream, status = resp.status, attempt = attempts, ?elapsed, "upstream answered");
                    return Ok(resp);
                }
                Ok(resp) if !retryable(req.upstream, resp.status) => {
                    warn!(upstream = %req.upstream, status = resp.status, attempt = attempts, "upstream refused the request");
                    return Err(CallFailure::Rejected(resp));
                }
                Ok(resp) => {
                    warn!(upstream = %req.upstream, status = resp.status, attempt = attempts, retry_after = ?resp.retry_after, "upstream failed");
                    let retry_after = resp.retry_after;
                    (Ok(resp), retry_after)
                }
                Err(why) => {
                    warn!(upstream = %req.upstream, error = %why, attempt = attempts, "upstream unreachable");
                    (Err(why), None)
                }
            };
            if attempts >= policy.max_attempts {
                return Err(CallFailure::GaveUp {
                    attempts,
                    last,
                    retry_after,
                });
            }
            let wait = retry_after.unwrap_or_else(|| policy.backoff(attempts));
            if Instant::now() + wait + MIN_ATTEMPT >= deadline {
                // The wait does not fit: hand it to the pod's SDK instead.
                return Err(CallFailure::GaveUp {
                    attempts,
                    last,
                    retry_after: retry_after.or(Some(wait)),
                });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// `error: cause: cause…` of an error and its sources.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // 2015-10-21 07:28:00 GMT is 10 s after `now`.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse_retry_after("86400", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn what_is_retried() {
        for status in [408, 410, 429, 500, 502, 503, 504] {
            assert!(retryable(Upstream::EntraId, status), "{status}");
        }
        for status in [400, 401, 403, 404] {
            assert!(!retryable(Upstream::EntraId, status), "{status}");
        }
        assert!(retryable(Upstream::Imds, 404), "IMDS 404 means updating");
        assert!(!retryable(Upstream::Imds, 400));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            max_total_wait: Duration::from_secs(20),
            upstream_timeout: Duration::from_secs(1),
            base_delay: Duration::from_millis(400),
        };
        for _ in 0..50 {
            let first = policy.backoff(1);
            assert!(first >= Duration::from_millis(200) && first <= Duration::from_millis(400));
            let third = policy.backoff(3);
            assert!(third >= Duration::from_millis(800) && third <= Duration::from_millis(1600));
            assert!(policy.backoff(30) <= MAX_BACKOFF);
        }
    }
}
