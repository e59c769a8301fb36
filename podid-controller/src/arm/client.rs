//! The ARM client: one GET, then the identity delta in PATCHes of at most
//! 150 identities, each followed to the end of its long-running operation.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use azure_core::{
    Context, Method, Pipeline, Request, RetryOptions, TransportOptions, Url,
    auth::{DEFAULT_SCOPE_SUFFIX, TokenCredential},
    headers::{AZURE_ASYNCOPERATION, Headers, LOCATION},
};
use azure_mgmt_compute::package_2024_07_01::{self as compute, models};
use bytes::Bytes;
use futures::TryStreamExt;
use tracing::instrument;

use super::{
    ArmError,
    identity::{self, IdentityState},
    policy::{
        ArmOperation, IDENTITY_BODY, IdentityBodyPolicy, RetrySettings, ThrottlePolicy, retry_after,
    },
    transport::HyperTransport,
};
use crate::{
    metrics::Metrics,
    target::{Target, TargetKind},
};

/// ARM's limit on user-assigned identities in one request (MIC #813, #847).
pub const MAX_IDENTITIES_PER_PATCH: usize = 150;

/// How the client talks to ARM.
#[derive(Clone, Debug)]
pub struct ArmOptions {
    /// ARM endpoint (`https://management.azure.com` or an emulator).
    pub endpoint: Url,
    /// Throttling and retry behaviour.
    pub retry: RetrySettings,
    /// Wait between polls of a long-running operation when ARM gives no
    /// `Retry-After`.
    pub lro_poll_interval: Duration,
    /// Upper bound on a `Retry-After` given for a long-running operation.
    pub lro_max_poll_interval: Duration,
    /// Give up waiting for a long-running operation after this long.
    pub lro_timeout: Duration,
    /// Timeout of one HTTP exchange.
    pub request_timeout: Duration,
    /// Identities per PATCH (ARM's limit is 150).
    pub max_identities_per_patch: usize,
    /// How often a PATCH is retried after cutting out identities ARM named
    /// as invalid.
    pub max_invalid_identity_retries: u32,
}

impl ArmOptions {
    /// Defaults for `endpoint`.
    pub fn new(endpoint: Url) -> Self {
        ArmOptions {
            endpoint,
            retry: RetrySettings::default(),
            lro_poll_interval: Duration::from_secs(2),
            lro_max_poll_interval: Duration::from_secs(15),
            lro_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(60),
            max_identities_per_patch: MAX_IDENTITIES_PER_PATCH,
            max_invalid_identity_retries: 3,
        }
    }
}

/// What an identity update achieved.
#[derive(Debug, Default)]
pub struct UpdateOutcome {
    /// The identities on the target afterwards, as far as ARM confirmed.
    pub state: IdentityState,
    /// PATCH requests sent (each waited to completion).
    pub patches: usize,
    /// Identities ARM named as invalid, with its message; they were cut out
    /// of the batch and the rest was applied.
    pub rejected: BTreeMap<String, String>,
    /// A failure that stopped the update (the state was then read again).
    pub error: Option<ArmError>,
}

/// ARM client for VM and scale set identities.
#[derive(Clone)]
pub struct ArmClient {
    compute: compute::Client,
    pipeline: Pipeline,
    credential: Arc<dyn TokenCredential>,
    scopes: Vec<String>,
    options: ArmOptions,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient")
            .field("endpoint", &self.options.endpoint.as_str())
            .finish_non_exhaustive()
    }
}

enum Lro {
    AsyncOperation(Url),
    Location(Url),
}

impl ArmClient {
    /// A client authenticating with `credential`, recording into `metrics`.
    pub fn new(
        options: ArmOptions,
        credential: Arc<dyn TokenCredential>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ArmError> {
        let transport = HyperTransport::new(options.request_timeout)?;
        let mut client_options =
            azure_core::ClientOptions::new(TransportOptions::new(Arc::new(transport)))
                // Retries are the throttle policy's job: per client, honouring
                // Retry-After, bounded.
                .retry(RetryOptions::none());
        client_options
            .per_call_policies_mut()
            .push(Arc::new(IdentityBodyPolicy));
        client_options
            .per_retry_policies_mut()
            .push(Arc::new(ThrottlePolicy::new(
                options.retry.clone(),
                metrics,
            )));
        let scope = options
            .endpoint
            .join(DEFAULT_SCOPE_SUFFIX)
            .map_err(|e| ArmError::Setup(format!("ARM endpoint {}: {e}", options.endpoint)))?
            .to_string();
        let scopes = vec![scope];
        let compute = compute::Client::new(
            options.endpoint.clone(),
            credential.clone(),
            scopes.clone(),
            client_options.clone(),
        );
        // The same policies and transport, for polling operation URLs, which
        // have no generated builder.
        let pipeline = Pipeline::new(
            Some("azure_mgmt_compute"),
            Some("0.21.0"),
            client_options,
            Vec::new(),
            Vec::new(),
        );
        Ok(ArmClient {
            compute,
            pipeline,
            credential,
            scopes,
            options,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ArmOptions {
        &self.options
    }

    /// Reads the identities of a VM or scale set (one GET).
    #[instrument(skip(self), fields(target = %target))]
    pub async fn get_identities(&self, target: &Target) -> Result<IdentityState, ArmError> {
        let operation = match target.kind {
            TargetKind::VirtualMachine => ArmOperation::VmGet,
            TargetKind::ScaleSet => ArmOperation::VmssGet,
        };
        let response = match target.kind {
            TargetKind::VirtualMachine => self
                .compute
                .virtual_machines_client()
                .get(&target.resource_group, &target.name, &target.subscription)
                .send()
                .await
                .map(|r| r.into_raw_response()),
            TargetKind::ScaleSet => self
                .compute
                .virtual_machine_scale_sets_client()
                .get(&target.resource_group, &target.name, &target.subscription)
                .send()
                .await
                .map(|r| r.into_raw_response()),
        }
        .map_err(|e| from_core(operation, target, e))?;
        let body = collect(response, operation, target).await?.1;
        identity::parse_resource(&body).map_err(|message| ArmError::Body {
            operation: operation.label(),
            target: target.to_string(),
            message,
        })
    }

    /// Adds `add` and removes `remove` (identity IDs) on `target`, starting
    /// from `current` (the state just read). Only identities missing from
    /// `current` are added and only present ones removed. Sends at most
    /// `max_identities_per_patch` identities per PATCH and waits for each
    /// operation. Identities ARM names as invalid are cut out and the rest
    /// is retried, so one bad identity never blocks the others.
    #[instrument(skip_all, fields(target = %target, add = add.len(), remove = remove.len()))]
    pub async fn update_identities(
        &self,
        target: &Target,
        current: &IdentityState,
        add: &[String],
        remove: &[String],
    ) -> UpdateOutcome {
        let mut outcome = UpdateOutcome {
            state: current.clone(),
            ..UpdateOutcome::default()
        };
        let mut adds: Vec<String> = Vec::new();
        for id in add {
            if !current.contains(id) && !adds.iter().any(|a| a.eq_ignore_ascii_case(id)) {
                adds.push(id.clone());
            }
        }
        let mut removes: Vec<String> = Vec::new();
        for id in remove {
            if current.contains(id) && !removes.iter().any(|r| r.eq_ignore_ascii_case(id)) {
                removes.push(id.clone());
            }
        }
        // Adds first, then removals, packed into as few PATCHes as allowed.
        let entries: Vec<(String, bool)> = adds
            .into_iter()
            .map(|id| (id, true))
            .chain(removes.into_iter().map(|id| (id, false)))
            .collect();
        let per_patch = self.options.max_identities_per_patch.max(1);
        for chunk in entries.chunks(per_patch) {
            let mut chunk_adds: Vec<String> = chunk
                .iter()
                .filter(|(_, a)| *a)
                .map(|(id, _)| id.clone())
                .collect();
            let chunk_removes: Vec<String> = chunk
                .iter()
                .filter(|(_, a)| !*a)
                .map(|(id, _)| id.clone())
                .collect();
            let mut attempts = 0;
            loop {
                if chunk_adds.is_empty() && chunk_removes.is_empty() {
                    break;
                }
                let body = identity::patch_body(&outcome.state, &chunk_adds, &chunk_removes);
                outcome.patches += 1;
                match self.patch(target, body).await {
                    Ok(()) => {
                        outcome.state.apply(&chunk_adds, &chunk_removes);
                        break;
                    }
                    Err(error) => {
                        let named = error.identity_ids();
                        let bad: Vec<String> = chunk_adds
                            .iter()
                            .filter(|id| named.contains(&id.to_ascii_lowercase()))
                            .cloned()
                            .collect();
                        if !bad.is_empty() && attempts < self.options.max_invalid_identity_retries {
                            attempts += 1;
                            tracing::warn!(%error, rejected = bad.len(), "ARM rejected identities; retrying the batch without them");
                            for id in &bad {
                                outcome
                                    .rejected
                                    .insert(id.to_ascii_lowercase(), error.to_string());
                            }
                            chunk_adds.retain(|id| !bad.contains(id));
                            continue;
                        }
                        tracing::warn!(%error, "identity update failed; reading the state again");
                        // What is really there now decides what is Assigned.
                        match self.get_identities(target).await {
                            Ok(state) => outcome.state = state,
                            Err(again) => tracing::warn!(%again, "re-reading identities failed"),
                        }
                        outcome.error = Some(error);
                        return outcome;
                    }
                }
            }
        }
        outcome
    }

    /// One identity PATCH through the generated builder, with the raw body,
    /// followed to the end of its long-running operation.
    async fn patch(&self, target: &Target, body: serde_json::Value) -> Result<(), ArmError> {
        let operation = match target.kind {
            TargetKind::VirtualMachine => ArmOperation::VmUpdate,
            TargetKind::ScaleSet => ArmOperation::VmssUpdate,
        };
        let bytes = Bytes::from(body.to_string());
        let send = async {
            match target.kind {
                TargetKind::VirtualMachine => self
                    .compute
                    .virtual_machines_client()
                    .update(
                        &target.resource_group,
                        &target.name,
                        models::VirtualMachineUpdate::default(),
                        &target.subscription,
                    )
                    .send()
                    .await
                    .map(|r| r.into_raw_response()),
                TargetKind::ScaleSet => self
                    .compute
                    .virtual_machine_scale_sets_client()
                    .update(
                        &target.resource_group,
                        &target.name,
                        models::VirtualMachineScaleSetUpdate::default(),
                        &target.subscription,
                    )
                    .send()
                    .await
                    .map(|r| r.into_raw_response()),
            }
        };
        let response = IDENTITY_BODY
            .scope(bytes, send)
            .await
            .map_err(|e| from_core(operation, target, e))?;
        let headers = response.headers().clone();
        let status = u16::from(response.status());
        let lro = self.lro_of(&headers);
        // Drain the body so the connection can be reused.
        let _ = collect(response, operation, target).await;
        match (status, lro) {
            (_, Some(lro)) => {
                let first = retry_after(&headers).unwrap_or(self.options.lro_poll_interval);
                self.wait(target, lro, first).await
            }
            (200 | 204, None) => Ok(()),
            (other, None) => Err(ArmError::Body {
                operation: operation.label(),
                target: target.to_string(),
                message: format!("HTTP {other} without an operation to follow"),
            }),
        }
    }

    fn lro_of(&self, headers: &Headers) -> Option<Lro> {
        if let Some(url) = headers
            .get_optional_str(&AZURE_ASYNCOPERATION)
            .and_then(|u| Url::parse(u).ok())
        {
            return Some(Lro::AsyncOperation(url));
        }
        headers
            .get_optional_str(&LOCATION)
            .and_then(|u| Url::parse(u).ok())
            .map(Lro::Location)
    }

    /// Polls a long-running operation until it ends.
    async fn wait(&self, target: &Target, lro: Lro, first_delay: Duration) -> Result<(), ArmError> {
        let operation = ArmOperation::OperationPoll;
        let started = tokio::time::Instant::now();
        let mut delay = first_delay;
        loop {
            let delay_now = delay.min(self.options.lro_max_poll_interval);
            if started.elapsed() + delay_now > self.options.lro_timeout {
                return Err(ArmError::Timeout {
                    target: target.to_string(),
                    seconds: self.options.lro_timeout.as_secs(),
                });
            }
            tokio::time::sleep(delay_now).await;
            let url = match &lro {
                Lro::AsyncOperation(url) | Lro::Location(url) => url.clone(),
            };
            let mut request = Request::new(url, Method::Get);
            let token = self
                .credential
                .get_token(&self.scopes.iter().map(String::as_str).collect::<Vec<_>>())
                .await
                .map_err(|e| from_core(operation, target, e))?;
            request.insert_header(
                azure_core::headers::AUTHORIZATION,
                format!("Bearer {}", token.token.secret()),
            );
            let response = self
                .pipeline
                .send(&Context::new(), &mut request)
                .await
                .map_err(|e| from_core(operation, target, e))?;
            let status = u16::from(response.status());
            delay = retry_after(response.headers()).unwrap_or(self.options.lro_poll_interval);
            let body = collect(response, operation, target).await?.1;
            match &lro {
                Lro::AsyncOperation(_) => {
                    let parsed: OperationStatus =
                        serde_json::from_slice(&body).map_err(|e| ArmError::Body {
                            operation: operation.label(),
                            target: target.to_string(),
                            message: format!("operation status: {e}"),
                        })?;
                    match parsed.status.as_str() {
                        "Succeeded" => return Ok(()),
                        "Failed" | "Canceled" | "Cancelled" => {
                            let error = parsed.error.unwrap_or_default();
                            return Err(ArmError::Operation {
                                target: target.to_string(),
                                status: parsed.status,
                                code: error.code.unwrap_or_default(),
                                message: error.message.unwrap_or_default(),
                            });
                        }
                        _ => continue,
                    }
                }
                Lro::Location(_) => {
                    if status == 202 {
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// The body of an `Azure-AsyncOperation` status.
#[derive(serde::Deserialize)]
struct OperationStatus {
    status: String,
    #[serde(default)]
    error: Option<models::ApiError>,
}

async fn collect(
    response: azure_core::Response,
    operation: ArmOperation,
    target: &Target,
) -> Result<(u16, Bytes), ArmError> {
    let status = u16::from(response.status());
    let chunks: Vec<Bytes> = response
        .into_body()
        .try_collect()
        .await
        .map_err(|e| from_core(operation, target, e))?;
    Ok((status, chunks.concat().into()))
}

/// Turns a pipeline error into an [`ArmError`], keeping ARM's status, code
/// and message when there was an answer.
fn from_core(operation: ArmOperation, target: &Target, error: azure_core::Error) -> ArmError {
    if let Some(http) = error.as_http_error() {
        return ArmError::Status {
            operation: operation.label(),
            target: target.to_string(),
            status: u16::from(http.status()),
            code: http.error_code().unwrap_or_default().to_string(),
            message: http.error_message().unwrap_or_default().to_string(),
        };
    }
    ArmError::Transport {
        operation: operation.label(),
        target: target.to_string(),
        source: error,
    }
}
