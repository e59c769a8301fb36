//! `--emit-denial-events`: refused token requests as Kubernetes Events on
//! the pod (`kubectl describe pod` shows why it got no token), at most one
//! per pod and reason per interval, so a client retrying in a loop cannot
//! flood the API server. Published in the background through kube-runtime's
//! `Recorder` (events.k8s.io/v1 create, and patch for a repeated event).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tracing::{debug, warn};

use super::super::Workload;
use crate::audit::{AuditRecord, Outcome};

/// Reporting controller name on the Events.
pub const REPORTER: &str = "podid-agent";
/// Longest note, in bytes (the API allows 1 kB).
const MAX_NOTE: usize = 1000;
/// Rate-limit entries kept before old ones are pruned.
const MAX_ENTRIES: usize = 10_000;

/// Publishes denial Events, rate-limited per pod and reason.
#[derive(Clone)]
pub struct DenialEvents {
    recorder: Recorder,
    interval: Duration,
    last: Arc<Mutex<HashMap<(String, &'static str), Instant>>>,
}

impl std::fmt::Debug for DenialEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenialEvents")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// The Event reason for a refused request.
pub fn reason_of(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::IdentityNotFound => "IdentityNotFound",
        Outcome::AssignmentPending => "IdentityAssignmentPending",
        Outcome::UpstreamError => "TokenRequestFailed",
        Outcome::Blocked => "InstanceMetadataBlocked",
        Outcome::Unattributed => "Unattributed",
        Outcome::InvalidRequest => "InvalidRequest",
        Outcome::Rejected => "Rejected",
        Outcome::Issued | Outcome::Proxied => "Served",
    }
}

fn note_of(record: &AuditRecord) -> String {
    let mut note = format!(
        "podid refused a token request from container {:?}",
        record.container
    );
    if !record.identity.is_empty() {
        note.push_str(&format!(" for identity {}", record.identity));
    }
    if !record.resource.is_empty() {
        note.push_str(&format!(" (resource {})", record.resource));
    }
    note.push_str(&format!(": {} (HTTP {})", record.reason, record.status));
    if note.len() > MAX_NOTE {
        let mut cut = MAX_NOTE;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    note
}

impl DenialEvents {
    /// Publishes through `client`, at most one Event per pod and reason per
    /// `interval`. `instance` names this agent (its node).
    pub fn new(client: Client, instance: String, interval: Duration) -> Self {
        let reporter = Reporter {
            controller: REPORTER.into(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            interval,
            last: Arc::default(),
        }
    }

    /// Whether an Event for (`pod_uid`, `reason`) may go out now; records it.
    fn admit(&self, pod_uid: &str, reason: &'static str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_ENTRIES {
            let interval = self.interval;
            last.retain(|_, at| now.duration_since(*at) < interval);
        }
        match last.get(&(pod_uid.to_string(), reason)) {
            Some(at) if now.duration_since(*at) < self.interval => false,
            _ => {
                last.insert((pod_uid.to_string(), reason), now);
                true
            }
        }
    }

    /// Publishes an Event for a refused request of `workload`, unless one
    /// for the same pod and reason went out within the interval. Returns
    /// whether one was sent off (publication happens in the background).
    pub fn denied(&self, workload: &Workload, record: &AuditRecord) -> bool {
        if workload.uid.is_empty() {
            return false;
        }
        let reason = reason_of(record.outcome);
        if !self.admit(&workload.uid, reason) {
            debug!(pod = %workload.name, reason, "denial event rate-limited");
            return false;
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(workload.name.clone()),
            namespace: Some(workload.namespace.clone()),
            uid: Some(workload.uid.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note_of(record)),
            action: "GetToken".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let pod = format!("{}/{}", workload.namespace, workload.name);
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%pod, %error, "could not publish a denial event");
            }
        });
        true
    }
}
