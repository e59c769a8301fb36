//! `azure_core` pipeline policies: throttling and retries per ARM client,
//! metrics per call, and the raw identity body.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use azure_core::{
    Context, Method, Policy, PolicyResult, Request, StatusCode,
    error::{Error as CoreError, ErrorKind},
    headers::{Headers, RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS},
};
use bytes::Bytes;

use crate::metrics::Metrics;

/// What an ARM call does, as labelled in metrics (MIC's operation names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArmOperation {
    /// GET of a VM.
    VmGet,
    /// PATCH of a VM.
    VmUpdate,
    /// GET of a scale set.
    VmssGet,
    /// PATCH of a scale set.
    VmssUpdate,
    /// Polling a long-running operation.
    OperationPoll,
    /// Anything else.
    Other,
}

impl ArmOperation {
    /// Classifies a request by method and path.
    pub fn classify(method: &Method, path: &str) -> Self {
        let path = path.to_ascii_lowercase();
        let write = matches!(method, Method::Patch | Method::Put);
        if path.contains("/operations/") {
            ArmOperation::OperationPoll
        } else if path.contains("/virtualmachinescalesets/") {
            if write {
                ArmOperation::VmssUpdate
            } else {
                ArmOperation::VmssGet
            }
        } else if path.contains("/virtualmachines/") {
            if write {
                ArmOperation::VmUpdate
            } else {
                ArmOperation::VmGet
            }
        } else {
            ArmOperation::Other
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            ArmOperation::VmGet => "vm_get",
            ArmOperation::VmUpdate => "vm_update",
            ArmOperation::VmssGet => "vmss_get",
            ArmOperation::VmssUpdate => "vmss_update",
            ArmOperation::OperationPoll => "operation_poll",
            ArmOperation::Other => "other",
        }
    }
}

/// Retry settings of the throttling policy.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// How many times a 429 is retried (after its Retry-After).
    pub max_throttled_retries: u32,
    /// How many times a 5xx or a transport error is retried.
    pub max_server_error_retries: u32,
    /// First backoff after a 5xx; doubles each time.
    pub server_error_backoff: Duration,
    /// Wait after a 429 without a usable Retry-After.
    pub default_retry_after: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_throttled_retries: 3,
            max_server_error_retries: 3,
            server_error_backoff: Duration::from_millis(500),
            default_retry_after: Duration::from_secs(10),
        }
    }
}

/// Honours `Retry-After` per client (each operation is its own client, as
/// MIC keeps separate reader and writer deadlines for VMs and scale sets):
/// after a 429 every call of that client waits until the deadline, then the
/// throttled call is retried. 5xx and transport errors get bounded retries
/// with exponential backoff. Every attempt on the wire is counted.
#[derive(Debug)]
pub struct ThrottlePolicy {
    settings: RetrySettings,
    deadlines: Mutex<HashMap<ArmOperation, Instant>>,
    metrics: Arc<Metrics>,
}

impl ThrottlePolicy {
    /// A policy recording into `metrics`.
    pub fn new(settings: RetrySettings, metrics: Arc<Metrics>) -> Self {
        ThrottlePolicy {
            settings,
            deadlines: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn deadline(&self, operation: ArmOperation) -> Option<Instant> {
        self.deadlines
            .lock()
            .ok()
            .and_then(|d| d.get(&operation).copied())
    }

    fn throttle_until(&self, operation: ArmOperation, until: Instant) {
        if let Ok(mut deadlines) = self.deadlines.lock() {
            let entry = deadlines.entry(operation).or_insert(until);
            if *entry < until {
                *entry = until;
            }
        }
    }
}

/// The server's requested wait, from `retry-after-ms`, `x-ms-retry-after-ms`
/// or `Retry-After` (seconds or HTTP date).
pub fn retry_after(headers: &Headers) -> Option<Duration> {
    for name in [RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS] {
        if let Some(ms) = headers
            .get_optional_str(&name)
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    let value = headers.get_optional_str(&RETRY_AFTER)?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = azure_core::date::parse_rfc1123(value).ok()?;
    let now = time::OffsetDateTime::now_utc();
    Some(if when > now {
        Duration::try_from(when - now).unwrap_or_default()
    } else {
        Duration::ZERO
    })
}

#[async_trait]
impl Policy for ThrottlePolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let operation = ArmOperation::classify(request.method(), request.url().path());
        let mut throttled = 0;
        let mut server_errors = 0;
        loop {
            if let Some(deadline) = self.deadline(operation) {
                let now = Instant::now();
                if deadline > now {
                    let wait = deadline - now;
                    tracing::debug!(
                        operation = operation.label(),
                        ?wait,
                        "ARM client throttled: waiting for Retry-After"
                    );
                    self.metrics.arm_throttle_wait(wait);
                    tokio::time::sleep_until(deadline.into()).await;
                }
            }
            let started = Instant::now();
            let result = match next.first() {
                Some(policy) => policy.send(ctx, request, &next[1..]).await,
                None => Err(CoreError::message(
                    ErrorKind::Other,
                    "pipeline has no transport",
                )),
            };
            let elapsed = started.elapsed();
            match result {
                Ok(response) => {
                    let status = response.status();
                    self.metrics
                        .arm_call(operation.label(), u16::from(status), elapsed);
                    if status == StatusCode::TooManyRequests {
                        let wait = retry_after(response.headers())
                            .unwrap_or(self.settings.default_retry_after);
                        self.throttle_until(operation, Instant::now() + wait);
                        self.metrics.arm_throttled(operation.label());
                        tracing::warn!(
                            operation = operation.label(),
                            ?wait,
                            "ARM throttled the call (429)"
                        );
                        if throttled < self.settings.max_throttled_retries {
                            throttled += 1;
                            continue;
                        }
                        return Ok(response);
                    }
                    let code = u16::from(status);
                    if (500..600).contains(&code)
                        && code != 501
                        && server_errors < self.settings.max_server_error_retries
                    {
                        let backoff =
                            self.settings.server_error_backoff * 2u32.saturating_pow(server_errors);
                        server_errors += 1;
                        tracing::warn!(
                            operation = operation.label(),
                            status = code,
                            ?backoff,
                            "ARM server error, retrying"
                        );
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    return Ok(response);
                }
                Err(error) => {
                    self.metrics.arm_call(operation.label(), 0, elapsed);
                    if *error.kind() == ErrorKind::Io
                        && server_errors < self.settings.max_server_error_retries
                    {
                        let backoff =
                            self.settings.server_error_backoff * 2u32.saturating_pow(server_errors);
                        server_errors += 1;
                        tracing::warn!(operation = operation.label(), %error, ?backoff, "ARM call failed, retrying");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    return Err(error);
                }
            }
        }
    }
}

tokio::task_local! {
    /// The raw JSON body of the identity PATCH being sent by this task.
    pub(crate) static IDENTITY_BODY: Bytes;
}

/// Puts the raw identity JSON on the wire for PATCH requests sent through
/// the generated `update` builders (whose typed model would drop the
/// identity map), and refuses any PATCH that was not given one, so a typed
/// identity PATCH can never silently go out with an empty map.
#[derive(Debug, Default)]
pub struct IdentityBodyPolicy;

#[async_trait]
impl Policy for IdentityBodyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        if *request.method() == Method::Patch {
            match IDENTITY_BODY.try_with(Bytes::clone) {
                Ok(body) => request.set_body(body),
                Err(_) => {
                    return Err(CoreError::message(
                        ErrorKind::Other,
                        "refusing a PATCH without a raw identity body: azure_mgmt_compute 0.21's typed model drops userAssignedIdentities",
                    ));
                }
            }
        }
        match next.first() {
            Some(policy) => policy.send(ctx, request, &next[1..]).await,
            None => Err(CoreError::message(
                ErrorKind::Other,
                "pipeline has no transport",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::{
        Response, Url,
        headers::{HeaderName, HeaderValue},
    };
    use azure_mgmt_compute::package_2024_07_01::models;
    use serde_json::json;

    /// A transport that records request bodies and answers 200.
    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<Bytes>>);

    #[async_trait]
    impl Policy for Capture {
        async fn send(
            &self,
            _ctx: &Context,
            request: &mut Request,
            _next: &[Arc<dyn Policy>],
        ) -> PolicyResult {
            let body = match request.body() {
                azure_core::Body::Bytes(bytes) => bytes.clone(),
                azure_core::Body::SeekableStream(_) => Bytes::new(),
            };
            self.0
                .lock()
                .map_err(|_| CoreError::message(ErrorKind::Other, "poisoned"))?
                .push(body);
            Ok(Response::new(
                StatusCode::Ok,
                Headers::new(),
                Box::pin(futures::stream::empty()),
            ))
        }
    }

    #[test]
    fn the_generated_model_drops_the_identity_map() {
        // Why identity bodies are raw JSON: azure_mgmt_compute 0.21's
        // UserAssignedIdentities is an empty struct.
        let typed = models::VirtualMachineUpdate {
            identity: Some(models::VirtualMachineIdentity {
                type_: Some(models::virtual_machine_identity::Type::UserAssigned),
                user_assigned_identities: Some(models::UserAssignedIdentities::new()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sent = serde_json::to_value(&typed).unwrap();
        assert_eq!(sent["identity"]["userAssignedIdentities"], json!({}));
        let got: models::VirtualMachineIdentity = serde_json::from_value(json!({
            "type": "UserAssigned",
            "userAssignedIdentities": {"/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a": {}}
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(got.user_assigned_identities).unwrap(),
            json!({})
        );
    }

    #[tokio::test]
    async fn identity_patches_go_out_only_with_their_raw_body() {
        let capture = Arc::new(Capture::default());
        let chain: Vec<Arc<dyn Policy>> = vec![Arc::new(IdentityBodyPolicy), capture.clone()];
        let ctx = Context::new();
        let url = Url::parse("http://127.0.0.1:1/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm").unwrap();
        let mut patch = Request::new(url.clone(), Method::Patch);
        patch.set_body(Bytes::from_static(
            br#"{"identity":{"type":"UserAssigned","userAssignedIdentities":{}}}"#,
        ));
        let refused = chain[0].send(&ctx, &mut patch, &chain[1..]).await;
        assert!(
            refused.is_err(),
            "a typed identity PATCH must never reach the wire"
        );
        assert!(capture.0.lock().unwrap().is_empty());

        let raw = Bytes::from_static(
            br#"{"identity":{"type":"UserAssigned","userAssignedIdentities":{"/x":{},"/y":null}}}"#,
        );
        IDENTITY_BODY
            .scope(raw.clone(), chain[0].send(&ctx, &mut patch, &chain[1..]))
            .await
            .unwrap();
        let mut get = Request::new(url, Method::Get);
        chain[0].send(&ctx, &mut get, &chain[1..]).await.unwrap();
        let seen = capture.0.lock().unwrap().clone();
        assert_eq!(seen, [raw, Bytes::new()]);
    }

    #[test]
    fn operations_are_classified_from_the_path() {
        let vmss = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss";
        let vm =
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm";
        let op = "/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/operations/123";
        assert_eq!(
            ArmOperation::classify(&Method::Get, vmss),
            ArmOperation::VmssGet
        );
        assert_eq!(
            ArmOperation::classify(&Method::Patch, vmss),
            ArmOperation::VmssUpdate
        );
        assert_eq!(
            ArmOperation::classify(&Method::Get, vm),
            ArmOperation::VmGet
        );
        assert_eq!(
            ArmOperation::classify(&Method::Patch, vm),
            ArmOperation::VmUpdate
        );
        assert_eq!(
            ArmOperation::classify(&Method::Get, op),
            ArmOperation::OperationPoll
        );
    }

    #[test]
    fn retry_after_headers_in_order_of_precision() {
        let mut h = Headers::new();
        h.insert(
            HeaderName::from("retry-after".to_string()),
            HeaderValue::from("7".to_string()),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            HeaderName::from("retry-after-ms".to_string()),
            HeaderValue::from("1500".to_string()),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut date = Headers::new();
        date.insert(
            HeaderName::from("retry-after".to_string()),
            HeaderValue::from("Fri, 01 Jan 2021 00:00:00 GMT".to_string()),
        );
        assert_eq!(retry_after(&date), Some(Duration::ZERO));
        assert_eq!(retry_after(&Headers::new()), None);
    }
}
