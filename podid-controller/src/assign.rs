//! One assignment cycle: snapshot → desired state → plan → Kubernetes and
//! ARM writes → report.
//!
//! Per VM / scale set, one GET, then the delta in as few PATCHes as ARM
//! allows (one per 150 identities), each waited to completion. Targets are
//! worked on concurrently; an `AzureAssignedIdentity` becomes `Assigned` only
//! when its identity is on the target afterwards, and is deleted only when
//! its identity is gone or was kept on purpose.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use podid_api::{ASSIGNED_IDENTITY_FINALIZER, AssignedIdentityState, AzureAssignedIdentity};
use serde_json::json;
use tracing::{Instrument, info_span, instrument};

use crate::{
    Error, Result,
    arm::IdentityState,
    controller::Context,
    desired,
    plan::{self, AssignmentKey, Plan, PlanInputs, TargetWork},
    target::Target,
};

/// What started a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CycleTrigger {
    /// Watch events.
    Event,
    /// The periodic full sync.
    Sync,
    /// The periodic re-add check: `Assigned` identities are verified on
    /// their targets.
    Reconcile,
    /// A retry of work a previous cycle could not finish.
    Retry,
}

impl CycleTrigger {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            CycleTrigger::Event => "event",
            CycleTrigger::Sync => "sync",
            CycleTrigger::Reconcile => "reconcile",
            CycleTrigger::Retry => "retry",
        }
    }
}

/// What a cycle did on one VM / scale set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetReport {
    /// GET requests (1, or 2 after a failed PATCH).
    pub gets: usize,
    /// PATCH requests.
    pub patches: usize,
    /// Identities added.
    pub added: usize,
    /// Identities removed.
    pub removed: usize,
    /// Identities ARM rejected (cut out of the batch).
    pub rejected: usize,
    /// Identities re-added after an out-of-band removal.
    pub readded: usize,
    /// The failure that stopped work on the target, if any.
    pub error: Option<String>,
}

/// What one cycle did.
#[derive(Clone, Debug)]
pub struct CycleReport {
    /// Why it ran.
    pub trigger: CycleTrigger,
    /// How long it took.
    pub duration: Duration,
    /// Assignments desired.
    pub desired: usize,
    /// `AzureAssignedIdentity` objects created.
    pub created: usize,
    /// Objects whose spec was replaced.
    pub updated: usize,
    /// Objects that became `Assigned`.
    pub assigned: usize,
    /// Objects deleted.
    pub released: usize,
    /// Assignments left undone by an error (retried later).
    pub failed: usize,
    /// Assignments waiting for their node's VM / scale set to be known.
    pub unplaced: usize,
    /// Per target (`vm/rg/name`, `vmss/rg/name`).
    pub targets: BTreeMap<String, TargetReport>,
}

impl CycleReport {
    fn new(trigger: CycleTrigger) -> Self {
        CycleReport {
            trigger,
            duration: Duration::ZERO,
            desired: 0,
            created: 0,
            updated: 0,
            assigned: 0,
            released: 0,
            failed: 0,
            unplaced: 0,
            targets: BTreeMap::new(),
        }
    }

    /// ARM writes (PATCH requests) in this cycle.
    pub fn patches(&self) -> usize {
        self.targets.values().map(|t| t.patches).sum()
    }

    /// ARM reads (GET requests of VMs / scale sets) in this cycle.
    pub fn gets(&self) -> usize {
        self.targets.values().map(|t| t.gets).sum()
    }

    /// Whether work was left for a retry.
    pub fn needs_retry(&self) -> bool {
        self.failed > 0
    }
}

/// Runs one cycle.
#[instrument(skip(ctx), fields(trigger = trigger.label()))]
pub(crate) async fn run_cycle(ctx: &Context, trigger: CycleTrigger) -> Result<CycleReport> {
    let started = Instant::now();
    let mut report = CycleReport::new(trigger);
    let snapshot = ctx.stores.snapshot(&ctx.expectations);
    let desired = desired::compute(
        &snapshot.pods,
        &snapshot.bindings,
        &snapshot.identities,
        ctx.config.force_namespaced,
        &ctx.config.identity_rules,
    );
    for skipped in &desired.skipped {
        tracing::debug!(pod = %skipped.pod, binding = %skipped.binding, reason = ?skipped.reason, "binding does not apply");
        if let (Some(identity), desired::SkipReason::Refused(refusal)) =
            (&skipped.identity, &skipped.reason)
        {
            ctx.events.identity_refused(identity, refusal);
        }
    }
    report.desired = desired.assignments.len();
    let plan = plan::plan(
        &desired,
        &PlanInputs {
            existing: &snapshot.assigned,
            node_targets: &snapshot.node_targets,
            protected_client_ids: &ctx.config.protected_client_ids,
            verify_assigned: trigger == CycleTrigger::Reconcile,
        },
    );
    execute(ctx, plan, &mut report).await?;
    report.duration = started.elapsed();
    let result = if report.needs_retry() {
        "partial"
    } else {
        "ok"
    };
    ctx.metrics.cycle(trigger.label(), result, report.duration);
    if report.created + report.updated + report.assigned + report.released + report.failed > 0
        || report.gets() > 0
    {
        tracing::info!(
            desired = report.desired,
            created = report.created,
            updated = report.updated,
            assigned = report.assigned,
            released = report.released,
            failed = report.failed,
            arm_gets = report.gets(),
            arm_patches = report.patches(),
            duration_ms = report.duration.as_millis() as u64,
            "cycle done"
        );
    }
    Ok(report)
}

async fn execute(ctx: &Context, plan: Plan, report: &mut CycleReport) -> Result<()> {
    let failed_before = report.failed;
    let Plan {
        creates,
        updates,
        targets,
        release,
        mark_assigned,
        unplaced,
    } = plan;
    report.unplaced = unplaced.len();
    let concurrency = ctx.config.kube_write_concurrency.max(1);

    // 1. Records first, so the agent sees `Created` while ARM works.
    let created: Vec<Result<(), AssignmentKey>> = stream::iter(creates)
        .map(|(desired, state)| async move {
            let key = AssignmentKey::of_desired(&desired);
            let object = desired.to_object(state);
            match create(ctx, &key, &object).await {
                Ok(()) => {
                    if state == AssignedIdentityState::Assigned {
                        ctx.metrics.assignment("assigned", 1);
                    }
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(%key, %error, "creating AzureAssignedIdentity failed");
                    Err(key)
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let failed_creates: HashSet<AssignmentKey> = created
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    report.created = created.len() - failed_creates.len();
    ctx.metrics.assignment("created", report.created);
    report.failed += failed_creates.len();

    let updated: Vec<bool> = stream::iter(updates)
        .map(|update| async move {
            let key = AssignmentKey::of(&update.existing);
            let mut object = update.desired.to_object(update.state);
            object.metadata.resource_version = update.existing.metadata.resource_version.clone();
            let mut labels = update.existing.metadata.labels.clone().unwrap_or_default();
            labels.extend(object.metadata.labels.take().unwrap_or_default());
            object.metadata.labels = Some(labels);
            object.metadata.annotations = update.existing.metadata.annotations.clone();
            let mut finalizers = update
                .existing
                .metadata
                .finalizers
                .clone()
                .unwrap_or_default();
            if !finalizers.iter().any(|f| f == ASSIGNED_IDENTITY_FINALIZER) {
                finalizers.push(ASSIGNED_IDENTITY_FINALIZER.to_string());
            }
            object.metadata.finalizers = Some(finalizers);
            let api: Api<AzureAssignedIdentity> =
                Api::namespaced(ctx.client.clone(), &key.namespace);
            match api
                .replace(&key.name, &PostParams::default(), &object)
                .await
            {
                Ok(written) => {
                    ctx.expectations.wrote(written);
                    true
                }
                Err(error) => {
                    ctx.metrics.kube_error("assigned_identity_update");
                    tracing::warn!(%key, %error, "updating AzureAssignedIdentity failed");
                    false
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    report.updated = updated.iter().filter(|ok| **ok).count();
    report.failed += updated.len() - report.updated;

    // 2. Service principals need no ARM call.
    let marked = set_assigned_all(ctx, mark_assigned).await;
    report.assigned += marked;

    // 3. Deletions that need no ARM call.
    let released = release_all(ctx, release).await;
    report.released += released;

    // 4. ARM, per target, concurrently.
    let results: Vec<(String, TargetReport, TargetCounts)> = stream::iter(targets)
        .map(|(target, work)| {
            let span = info_span!("target", target = %target);
            let failed_creates = &failed_creates;
            async move {
                let (target_report, counts) =
                    process_target(ctx, &target, work, failed_creates).await;
                (target.to_string(), target_report, counts)
            }
            .instrument(span)
        })
        .buffer_unordered(ctx.config.target_concurrency.max(1))
        .collect()
        .await;
    for (name, target_report, counts) in results {
        report.assigned += counts.assigned;
        report.released += counts.released;
        report.failed += counts.failed;
        if target_report != TargetReport::default() {
            report.targets.insert(name, target_report);
        }
    }
    ctx.metrics
        .assignment("failed", report.failed - failed_before);
    Ok(())
}

#[derive(Default)]
struct TargetCounts {
    assigned: usize,
    released: usize,
    failed: usize,
}

async fn process_target(
    ctx: &Context,
    target: &Target,
    work: TargetWork,
    failed_creates: &HashSet<AssignmentKey>,
) -> (TargetReport, TargetCounts) {
    let mut report = TargetReport::default();
    let mut counts = TargetCounts::default();
    if work.is_empty() {
        return (report, counts);
    }
    // Nothing but identities in backoff: leave ARM alone this cycle.
    let backing_off = |id: &str| ctx.rejected.in_backoff(target, id);
    if work.remove.is_empty()
        && work
            .ensure
            .iter()
            .all(|(id, e)| e.pending.is_empty() || backing_off(id))
        && work.ensure.values().all(|e| e.assigned.is_empty())
    {
        counts.failed += work.ensure.values().map(|e| e.pending.len()).sum::<usize>();
        return (report, counts);
    }

    report.gets += 1;
    let current = match ctx.arm.get_identities(target).await {
        Ok(state) => state,
        Err(error) if error.status() == Some(404) => {
            tracing::warn!(%error, "VM / scale set not found; its assignments cannot be made");
            IdentityState::default()
        }
        Err(error) => {
            tracing::warn!(%error, "reading identities failed");
            counts.failed += work.ensure.values().map(|e| e.pending.len()).sum::<usize>()
                + work.remove.values().map(|r| r.release.len()).sum::<usize>();
            fail_pending(ctx, &work, &error.to_string());
            report.error = Some(error.to_string());
            return (report, counts);
        }
    };

    let mut add = Vec::new();
    for (id, ensure) in &work.ensure {
        if current.contains(id) {
            continue;
        }
        if ensure.pending.is_empty() && ensure.assigned.is_empty() {
            continue;
        }
        if ctx.rejected.in_backoff(target, id) {
            continue;
        }
        if ensure.pending.is_empty() {
            tracing::info!(identity = %ensure.resource_id, "identity removed out of band; re-adding");
            report.readded += 1;
        }
        add.push(ensure.resource_id.clone());
    }
    let remove: Vec<String> = work
        .remove
        .iter()
        .filter(|(id, _)| current.contains(id))
        .map(|(_, r)| r.resource_id.clone())
        .collect();

    let state = if add.is_empty() && remove.is_empty() {
        current
    } else {
        let outcome = ctx
            .arm
            .update_identities(target, &current, &add, &remove)
            .await;
        report.patches += outcome.patches;
        if outcome.error.is_some() {
            report.gets += 1;
        }
        report.added = add.iter().filter(|id| outcome.state.contains(id)).count();
        report.removed = remove
            .iter()
            .filter(|id| !outcome.state.contains(id))
            .count();
        report.rejected = outcome.rejected.len();
        for (id, message) in &outcome.rejected {
            ctx.rejected
                .reject(target, id, ctx.config.invalid_identity_backoff);
            if let Some(ensure) = work.ensure.get(id) {
                for pending in &ensure.pending {
                    ctx.events.assignment_failed(
                        &pending.desired.pod_namespace,
                        &pending.desired.pod,
                        &pending.desired.binding,
                        message,
                    );
                }
            }
        }
        if let Some(error) = &outcome.error {
            report.error = Some(error.to_string());
        }
        outcome.state
    };

    // Assigned only for identities really there.
    let mut to_assign = Vec::new();
    for (id, ensure) in &work.ensure {
        let present = state.contains(id);
        if present {
            ctx.rejected.clear(target, id);
        }
        for pending in &ensure.pending {
            if failed_creates.contains(&pending.key) {
                continue;
            }
            if present {
                to_assign.push(pending.key.clone());
            } else {
                counts.failed += 1;
                if let Some(error) = &report.error
                    && !ctx.rejected.in_backoff(target, id)
                {
                    ctx.events.assignment_failed(
                        &pending.desired.pod_namespace,
                        &pending.desired.pod,
                        &pending.desired.binding,
                        error,
                    );
                }
            }
        }
    }
    counts.assigned += set_assigned_all(ctx, to_assign).await;

    // Deleted only once the identity is gone.
    let mut to_release = Vec::new();
    for (id, removal) in work.remove {
        if state.contains(&id) {
            counts.failed += removal.release.len();
            for object in &removal.release {
                if let Some(binding) = object.spec.azure_binding_ref.as_ref() {
                    ctx.events.removal_failed(
                        binding,
                        report.error.as_deref().unwrap_or("identity still present"),
                    );
                }
            }
        } else {
            to_release.extend(removal.release);
        }
    }
    counts.released += release_all(ctx, to_release).await;
    (report, counts)
}

fn fail_pending(ctx: &Context, work: &TargetWork, message: &str) {
    for ensure in work.ensure.values() {
        for pending in &ensure.pending {
            ctx.events.assignment_failed(
                &pending.desired.pod_namespace,
                &pending.desired.pod,
                &pending.desired.binding,
                message,
            );
        }
    }
}

async fn create(ctx: &Context, key: &AssignmentKey, object: &AzureAssignedIdentity) -> Result<()> {
    let api: Api<AzureAssignedIdentity> = Api::namespaced(ctx.client.clone(), &key.namespace);
    match api.create(&PostParams::default(), object).await {
        Ok(written) => {
            ctx.expectations.wrote(written);
            ctx.note_created(key);
            Ok(())
        }
        // Already there: the cache is behind; the next cycle sees it.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => {
            ctx.metrics.kube_error("assigned_identity_addition");
            Err(Error::Kube {
                action: format!("create AzureAssignedIdentity {key}"),
                source,
            })
        }
    }
}

async fn set_assigned_all(ctx: &Context, keys: Vec<AssignmentKey>) -> usize {
    let results: Vec<bool> = stream::iter(keys)
        .map(|key| async move {
            match set_state(ctx, &key, AssignedIdentityState::Assigned).await {
                Ok(()) => {
                    if let Some(latency) = ctx.take_created_at(&key) {
                        ctx.metrics.assignment_latency(latency);
                    }
                    true
                }
                Err(error) => {
                    tracing::warn!(%key, %error, "marking AzureAssignedIdentity Assigned failed");
                    false
                }
            }
        })
        .buffer_unordered(ctx.config.kube_write_concurrency.max(1))
        .collect()
        .await;
    let done = results.iter().filter(|ok| **ok).count();
    ctx.metrics.assignment("assigned", done);
    done
}

async fn set_state(ctx: &Context, key: &AssignmentKey, state: AssignedIdentityState) -> Result<()> {
    let api: Api<AzureAssignedIdentity> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // No status subresource on these CRDs (as aad-pod-identity's): the
    // status is patched through the main resource, as MIC does.
    let patch = json!({ "status": { "availableReplicas": 1, "status": state.as_str() } });
    match api
        .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(written) => {
            ctx.expectations.wrote(written);
            Ok(())
        }
        Err(source) => {
            ctx.metrics
                .kube_error("update_azure_assigned_identity_status");
            Err(Error::Kube {
                action: format!("set {key} {}", state.as_str()),
                source,
            })
        }
    }
}

async fn release_all(ctx: &Context, objects: Vec<Arc<AzureAssignedIdentity>>) -> usize {
    let results: Vec<bool> = stream::iter(objects)
        .map(|object| async move {
            let key = AssignmentKey::of(&object);
            match release(ctx, &object).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(%key, %error, "deleting AzureAssignedIdentity failed");
                    false
                }
            }
        })
        .buffer_unordered(ctx.config.kube_write_concurrency.max(1))
        .collect()
        .await;
    let done = results.iter().filter(|ok| **ok).count();
    ctx.metrics.assignment("released", done);
    done
}

/// Deletes an assignment: DELETE (the finalizer keeps the object), then
/// `Unassigned` with the finalizer removed in one patch, conditional on the
/// resourceVersion, after which the API server removes it.
async fn release(ctx: &Context, object: &AzureAssignedIdentity) -> Result<()> {
    let key = AssignmentKey::of(object);
    let api: Api<AzureAssignedIdentity> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let kube_error = |action: &str, source| {
        ctx.metrics.kube_error("assigned_identity_deletion");
        Error::Kube {
            action: format!("{action} {key}"),
            source,
        }
    };
    let current = if object.metadata.deletion_timestamp.is_some() {
        Some(object.clone())
    } else {
        match api.delete(&key.name, &DeleteParams::default()).await {
            Ok(either) => either.left(),
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(source) => return Err(kube_error("delete", source)),
        }
    };
    if let Some(current) = current {
        let finalizers = current.metadata.finalizers.clone().unwrap_or_default();
        if finalizers.iter().any(|f| f == ASSIGNED_IDENTITY_FINALIZER) {
            let remaining: Vec<&String> = finalizers
                .iter()
                .filter(|f| *f != ASSIGNED_IDENTITY_FINALIZER)
                .collect();
            let patch = json!({
                "metadata": {
                    "resourceVersion": current.metadata.resource_version,
                    "finalizers": remaining,
                },
                "status": { "availableReplicas": 1, "status": AssignedIdentityState::Unassigned.as_str() },
            });
            match api
                .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(source) => return Err(kube_error("remove finalizer of", source)),
            }
        }
    }
    ctx.expectations.deleted(key);
    Ok(())
}

/// Identities ARM rejected, per target, with exponential backoff so that a
/// bad identity is not sent again every cycle (MIC #1139).
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    inner: std::sync::Mutex<std::collections::HashMap<(String, String), (Instant, u32)>>,
}

impl Rejections {
    pub(crate) fn in_backoff(&self, target: &Target, id: &str) -> bool {
        let Ok(inner) = self.inner.lock() else {
            return false;
        };
        inner
            .get(&(target.key().to_string(), id.to_ascii_lowercase()))
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    pub(crate) fn reject(&self, target: &Target, id: &str, base: Duration) {
        if let Ok(mut inner) = self.inner.lock() {
            let entry = inner
                .entry((target.key().to_string(), id.to_ascii_lowercase()))
                .or_insert((Instant::now(), 0));
            let step = entry.1.min(4);
            entry.0 = Instant::now() + base * 2u32.pow(step);
            entry.1 += 1;
        }
    }

    pub(crate) fn clear(&self, target: &Target, id: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.remove(&(target.key().to_string(), id.to_ascii_lowercase()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Metrics,
        arm::{ArmClient, ArmOptions},
        config::ControllerConfig,
        controller::Controller,
    };
    use azure_core::auth::{AccessToken, TokenCredential};
    use http::{Request, Response};
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
    use kube::client::Body;
    use podid_api::AzureAssignedIdentitySpec;
    use serde_json::Value;

    #[derive(Debug)]
    struct NoCredential;

    #[async_trait::async_trait]
    impl TokenCredential for NoCredential {
        async fn get_token(&self, _scopes: &[&str]) -> azure_core::Result<AccessToken> {
            Err(azure_core::Error::message(
                azure_core::error::ErrorKind::Credential,
                "unused",
            ))
        }
        async fn clear_cache(&self) -> azure_core::Result<()> {
            Ok(())
        }
    }

    fn controller(client: kube::Client) -> Controller {
        let metrics = Arc::new(Metrics::new());
        let endpoint = url::Url::parse("http://127.0.0.1:9").unwrap();
        let arm = ArmClient::new(
            ArmOptions::new(endpoint),
            Arc::new(NoCredential),
            metrics.clone(),
        )
        .unwrap();
        Controller::new(client, arm, ControllerConfig::default(), metrics)
    }

    fn assignment(rv: &str, finalizers: &[&str]) -> AzureAssignedIdentity {
        let mut a =
            AzureAssignedIdentity::new("p-default-id", AzureAssignedIdentitySpec::default());
        a.metadata.namespace = Some("default".into());
        a.metadata.resource_version = Some(rv.into());
        a.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        a
    }

    /// The API server verifier: each expected call, in order, with its exact
    /// method, URI and body, answered as the API server would.
    #[tokio::test]
    async fn release_deletes_then_drops_only_its_finalizer_conditionally() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let ctl = controller(kube::Client::new(service, "default"));
        let object = assignment("7", &[ASSIGNED_IDENTITY_FINALIZER, "example.com/keep"]);
        let path = "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities/p-default-id";
        let mut terminating = assignment("8", &[ASSIGNED_IDENTITY_FINALIZER, "example.com/keep"]);
        terminating.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let verifier = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a DELETE");
            assert_eq!(request.method(), http::Method::DELETE);
            assert_eq!(request.uri().path(), path);
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&terminating).unwrap(),
            )));

            let (request, send) = handle.next_request().await.expect("a PATCH");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(request.uri().path(), path);
            assert_eq!(
                request.headers().get(http::header::CONTENT_TYPE).unwrap(),
                "application/merge-patch+json"
            );
            let body: Value =
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap();
            assert_eq!(
                body,
                json!({
                    "metadata": {"resourceVersion": "8", "finalizers": ["example.com/keep"]},
                    "status": {"availableReplicas": 1, "status": "Unassigned"}
                })
            );
            let done = assignment("9", &["example.com/keep"]);
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&done).unwrap(),
            )));
        });
        tokio::time::timeout(Duration::from_secs(5), release(ctl.context(), &object))
            .await
            .expect("release finished")
            .expect("release succeeded");
        tokio::time::timeout(Duration::from_secs(5), verifier)
            .await
            .expect("verifier finished")
            .expect("all calls as expected");
    }

    #[tokio::test]
    async fn status_goes_through_the_main_resource_as_a_merge_patch() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let ctl = controller(kube::Client::new(service, "team"));
        let verifier = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a PATCH");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().path(),
                "/apis/aadpodidentity.k8s.io/v1/namespaces/default/azureassignedidentities/p-default-id"
            );
            let body: Value =
                serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap())
                    .unwrap();
            assert_eq!(
                body,
                json!({"status": {"availableReplicas": 1, "status": "Assigned"}})
            );
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&assignment("3", &[ASSIGNED_IDENTITY_FINALIZER])).unwrap(),
            )));
        });
        let key = AssignmentKey {
            namespace: "default".into(),
            name: "p-default-id".into(),
        };
        set_state(ctl.context(), &key, AssignedIdentityState::Assigned)
            .await
            .expect("patched");
        verifier.await.expect("all calls as expected");
    }
}
