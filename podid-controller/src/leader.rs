//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's
//! leaderelection does it: the holder renews every retry period; another
//! replica takes over once it has seen no renewal for the lease duration
//! (measured on its own clock, so clock skew does not matter); a leader that
//! cannot renew within the renew deadline steps down. Only the leader acts
//! and reports ready.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use std::sync::Arc;
use tokio::{sync::watch, time::Instant};

use crate::metrics::Metrics;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// A lease not renewed for this long may be taken over.
    pub lease_duration: Duration,
    /// The leader steps down when it could not renew for this long.
    pub renew_deadline: Duration,
    /// Renew / retry period.
    pub retry_period: Duration,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Leading,
    Following,
}

/// The last lease record seen, and when (on this replica's clock) it last
/// changed.
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

/// Runs the election for one replica.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    metrics: Arc<Metrics>,
}

impl LeaderElector {
    /// An elector for `config.namespace/config.name`.
    pub fn new(client: Client, config: LeaseConfig, metrics: Arc<Metrics>) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            metrics,
        }
    }

    /// Runs until `shutdown` completes, publishing leadership on `leading`.
    /// On shutdown a held lease is released so a standby takes over at once.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut observed: Option<Observed> = None;
        let mut is_leader = false;
        let mut last_renew = Instant::now();
        loop {
            match self.attempt(&mut observed).await {
                Ok(Attempt::Leading) => {
                    last_renew = Instant::now();
                    if !is_leader {
                        is_leader = true;
                        tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                        self.metrics.set_leader(true);
                        let _ = leading.send(true);
                    }
                }
                Ok(Attempt::Following) => {
                    if is_leader {
                        is_leader = false;
                        tracing::warn!(identity = %self.config.identity, "lease taken by another replica; stepping down");
                        self.metrics.set_leader(false);
                        let _ = leading.send(false);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "lease update failed");
                    if is_leader && last_renew.elapsed() > self.config.renew_deadline {
                        is_leader = false;
                        tracing::warn!(identity = %self.config.identity, "could not renew the lease in time; stepping down");
                        self.metrics.set_leader(false);
                        let _ = leading.send(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = &mut shutdown => {
                    if is_leader {
                        self.release().await;
                        self.metrics.set_leader(false);
                        let _ = leading.send(false);
                    }
                    return;
                }
            }
        }
    }

    async fn attempt(&self, observed: &mut Option<Observed>) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let me = &self.config.identity;
        let duration_secs =
            i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Following),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew_time = spec.renew_time.as_ref().map(|t| t.0);
        let changed = observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
        if changed {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew_time,
                at: Instant::now(),
            });
        }
        let record_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.config.lease_duration);
        let expired = observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= record_duration);
        let mine = holder.as_deref() == Some(me.as_str());
        if !mine && holder.is_some() && !expired {
            return Ok(Attempt::Following);
        }
        let mut next = lease.clone();
        let mut new_spec = spec.clone();
        if !mine {
            new_spec.holder_identity = Some(me.clone());
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.lease_duration_seconds = Some(duration_secs);
        new_spec.renew_time = Some(MicroTime(now));
        next.spec = Some(new_spec);
        // The resourceVersion in `next` makes this a compare-and-swap.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                let spec = written.spec.unwrap_or_default();
                *observed = Some(Observed {
                    holder: spec.holder_identity,
                    renew_time: spec.renew_time.map(|t| t.0),
                    at: Instant::now(),
                });
                if !mine {
                    tracing::info!(identity = %me, previous = ?holder, "took over the lease");
                }
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Following),
            Err(error) => Err(error),
        }
    }

    /// Gives the lease up (holder cleared), so a standby takes over at once.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(identity = %self.config.identity, "released the lease"),
            Err(error) => tracing::warn!(%error, "releasing the lease failed"),
        }
    }
}
