//! The controller: shared context, the event-batching loop that runs cycles
//! while this replica leads, and the process entry points.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use azure_core::auth::TokenCredential;
use futures::FutureExt;
use kube::Client;
use tokio::sync::{Notify, watch};

use crate::{
    Result,
    arm::{ArmClient, ArmOptions, ClientSecretCredential, HyperTransport, ImdsCredential},
    assign::{self, CycleReport, CycleTrigger, Rejections},
    config::{Args, CloudConfig, ControllerConfig, Environment, ProcessEnv},
    events::Events,
    expectations::Expectations,
    leader::LeaderElector,
    metrics::Metrics,
    plan::AssignmentKey,
    server,
    stores::{self, Stores, Writers},
};

/// How many cycle reports are kept for [`Controller::history`].
const HISTORY: usize = 256;

/// Everything a cycle needs.
pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) arm: ArmClient,
    pub(crate) stores: Stores,
    pub(crate) config: ControllerConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) events: Events,
    pub(crate) expectations: Arc<Expectations>,
    pub(crate) rejected: Rejections,
    created_at: Mutex<HashMap<AssignmentKey, Instant>>,
}

impl Context {
    pub(crate) fn note_created(&self, key: &AssignmentKey) {
        if let Ok(mut map) = self.created_at.lock() {
            map.insert(key.clone(), Instant::now());
        }
    }

    pub(crate) fn take_created_at(&self, key: &AssignmentKey) -> Option<Duration> {
        self.created_at
            .lock()
            .ok()
            .and_then(|mut map| map.remove(key))
            .map(|at| at.elapsed())
    }
}

/// The assignment controller of one replica.
pub struct Controller {
    ctx: Arc<Context>,
    writers: Mutex<Option<Writers>>,
    trigger: Arc<Notify>,
    history: Mutex<VecDeque<CycleReport>>,
}

impl Controller {
    /// A controller using `client` for Kubernetes and `arm` for Azure.
    pub fn new(
        client: Client,
        arm: ArmClient,
        config: ControllerConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (stores, writers) = stores::stores();
        let events = Events::new(client.clone(), &config.reporter, &config.instance);
        Controller {
            ctx: Arc::new(Context {
                client,
                arm,
                stores,
                config,
                metrics,
                events,
                expectations: Arc::new(Expectations::default()),
                rejected: Rejections::default(),
                created_at: Mutex::new(HashMap::new()),
            }),
            writers: Mutex::new(Some(writers)),
            trigger: Arc::new(Notify::new()),
            history: Mutex::new(VecDeque::new()),
        }
    }

    #[cfg(test)]
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }

    /// The watch caches.
    pub fn stores(&self) -> &Stores {
        &self.ctx.stores
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    /// Takes the cache writers, to feed the caches directly (reflector
    /// tests); [`Controller::run`] then starts no watches.
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers.lock().ok().and_then(|mut w| w.take())
    }

    /// Asks for a cycle, as a watch event does.
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// Runs one cycle now (the loop in [`Controller::run`] does this on
    /// events and timers).
    pub async fn run_cycle(&self, trigger: CycleTrigger) -> Result<CycleReport> {
        let report = assign::run_cycle(&self.ctx, trigger).await;
        match &report {
            Ok(report) => {
                if let Ok(mut history) = self.history.lock() {
                    if history.len() == HISTORY {
                        history.pop_front();
                    }
                    history.push_back(report.clone());
                }
            }
            Err(error) => {
                self.ctx.metrics.failure(error.metric_label());
                self.ctx
                    .metrics
                    .cycle(trigger.label(), "error", Duration::ZERO);
            }
        }
        report
    }

    /// The most recent cycle reports, oldest first.
    pub fn history(&self) -> Vec<CycleReport> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Watches (unless the writers were taken) and, while `leading` is true,
    /// runs cycles: on events (gathered for the batch window), every sync
    /// interval, every reconcile interval (re-add check) and on retries.
    /// Returns when `shutdown` completes.
    pub async fn run(
        &self,
        mut leading: watch::Receiver<bool>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let watch_task = self.take_writers().map(|writers| {
            tokio::spawn(stores::watch(
                self.ctx.client.clone(),
                writers,
                self.trigger.clone(),
                self.ctx.expectations.clone(),
            ))
        });
        tokio::pin!(shutdown);
        let result = async {
            loop {
                while !*leading.borrow_and_update() {
                    tokio::select! {
                        changed = leading.changed() => if changed.is_err() { return Ok(()) },
                        _ = &mut shutdown => return Ok(()),
                    }
                }
                tokio::select! {
                    ready = self.ctx.stores.wait_until_ready(Duration::from_secs(600)) => ready?,
                    _ = &mut shutdown => return Ok(()),
                }
                match self.lead(&mut leading, &mut shutdown).await {
                    Stop::Shutdown => return Ok(()),
                    Stop::LostLease => {
                        tracing::warn!("no longer leader: standing by");
                    }
                }
            }
        }
        .await;
        if let Some(task) = watch_task {
            task.abort();
        }
        result
    }

    async fn lead<S>(
        &self,
        leading: &mut watch::Receiver<bool>,
        shutdown: &mut std::pin::Pin<&mut S>,
    ) -> Stop
    where
        S: Future<Output = ()>,
    {
        let config = &self.ctx.config;
        let now = tokio::time::Instant::now();
        let mut next_sync = now + config.sync_interval;
        let mut next_reconcile = now + config.reconcile_interval;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut backoff = config.retry_backoff;
        // A new leader starts with a full cycle from the shared records.
        let mut due = Some(CycleTrigger::Sync);
        loop {
            let trigger = match due.take() {
                Some(trigger) => trigger,
                None => {
                    let retry = retry_at.unwrap_or(now + Duration::from_secs(86_400 * 365));
                    tokio::select! {
                        _ = self.trigger.notified() => {
                            // Gather the rest of the burst.
                            tokio::select! {
                                _ = tokio::time::sleep(config.batch_window) => {},
                                _ = shutdown.as_mut() => return Stop::Shutdown,
                            }
                            CycleTrigger::Event
                        }
                        _ = tokio::time::sleep_until(next_sync) => CycleTrigger::Sync,
                        _ = tokio::time::sleep_until(next_reconcile) => CycleTrigger::Reconcile,
                        _ = tokio::time::sleep_until(retry), if retry_at.is_some() => CycleTrigger::Retry,
                        changed = leading.changed() => {
                            if changed.is_err() || !*leading.borrow_and_update() {
                                return Stop::LostLease;
                            }
                            continue;
                        }
                        _ = shutdown.as_mut() => return Stop::Shutdown,
                    }
                }
            };
            // Events that arrived so far are all in this cycle's snapshot.
            let _ = self.trigger.notified().now_or_never();
            let started = tokio::time::Instant::now();
            match trigger {
                CycleTrigger::Sync => next_sync = started + config.sync_interval,
                CycleTrigger::Reconcile => next_reconcile = started + config.reconcile_interval,
                _ => {}
            }
            let outcome = tokio::select! {
                outcome = self.run_cycle(trigger) => outcome,
                _ = lost(leading) => return Stop::LostLease,
                _ = shutdown.as_mut() => return Stop::Shutdown,
            };
            let clean = match outcome {
                Ok(report) => !report.needs_retry(),
                Err(error) => {
                    tracing::warn!(%error, "cycle failed");
                    false
                }
            };
            if clean {
                retry_at = None;
                backoff = config.retry_backoff;
            } else {
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(config.max_retry_backoff);
            }
        }
    }
}

enum Stop {
    Shutdown,
    LostLease,
}

/// Completes when `leading` turns false (or its sender is gone).
async fn lost(leading: &mut watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}

/// Builds the ARM credential the cloud config names.
fn credential(
    args: &Args,
    cloud: &CloudConfig,
    authority: url::Url,
) -> Result<Arc<dyn TokenCredential>> {
    let transport = HyperTransport::new(Duration::from_secs(30))?;
    Ok(if cloud.use_managed_identity_extension {
        Arc::new(ImdsCredential::new(
            args.imds_endpoint.clone(),
            Some(cloud.user_assigned_identity_id.clone()),
            transport,
        ))
    } else {
        Arc::new(ClientSecretCredential::new(
            authority,
            cloud.tenant_id.clone(),
            cloud.aad_client_id.clone(),
            cloud.aad_client_secret.clone(),
            transport,
        ))
    })
}

/// Runs the controller process with an existing Kubernetes client until
/// `shutdown` completes: cloud config, ARM client, metrics listener, leader
/// election and the control loop.
pub async fn run_with_client(
    client: Client,
    args: Args,
    env: &(dyn Environment + Sync),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let cloud = CloudConfig::load(args.cloud_config.as_deref(), env)?;
    let source = args
        .cloud_config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "environment".into());
    cloud.validate(&source)?;
    let (arm_endpoint, authority) = args.endpoints(&cloud)?;
    let mut arm_options = ArmOptions::new(arm_endpoint);
    arm_options.lro_poll_interval = args.lro_poll_interval;
    let arm = ArmClient::new(
        arm_options,
        credential(&args, &cloud, authority)?,
        metrics.clone(),
    )?;
    let config = args.controller_config(&cloud, env);
    tracing::info!(
        arm = %arm.options().endpoint,
        protected = config.protected_client_ids.len(),
        force_namespaced = config.force_namespaced,
        leader_elect = args.leader_elect,
        "starting podid-controller"
    );
    let controller = Controller::new(client.clone(), arm, config, metrics.clone());

    let (leading_tx, leading_rx) = watch::channel(!args.leader_elect);
    metrics.set_leader(!args.leader_elect);
    let (bound, server_task) =
        server::serve(args.metrics_listen, metrics.clone(), leading_rx.clone()).await?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let elector = args.leader_elect.then(|| {
        let elector = LeaderElector::new(client, args.lease_config(env), metrics.clone());
        tokio::spawn(elector.run(leading_tx, stopped(stop_rx.clone())))
    });
    let run = controller.run(leading_rx, stopped(stop_rx));
    tokio::pin!(run);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        result = &mut run => result,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            run.await
        }
    };
    let _ = stop_tx.send(true);
    if let Some(elector) = elector {
        // Lets the elector release the lease.
        let _ = tokio::time::timeout(Duration::from_secs(5), elector).await;
    }
    server_task.abort();
    result
}

/// The process: connects to the Kubernetes API from the environment
/// (in-cluster or kubeconfig) and runs until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    run_with_client(client, args, &ProcessEnv, shutdown_signal())
        .await
        .map_err(anyhow::Error::from)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
