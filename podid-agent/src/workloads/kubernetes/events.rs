//! Kubernetes Events the agent publishes, rate-limited so that a client
//! retrying in a loop cannot flood the API server, in the background through
//! kube-runtime's `Recorder` (events.k8s.io/v1 create, and patch for a
//! repeated event):
//! - `--emit-denial-events`: refused token requests on the pod (`kubectl
//!   describe pod` shows why it got no token), at most one per pod and
//!   reason per interval;
//! - always: an `IdentityRefused` Warning on an AzureIdentity that podid's
//!   rules refuse, when a request needed it, at most one per identity per
//!   [`IDENTITY_EVENT_INTERVAL`] from each node.

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
use crate::{
    audit::{AuditRecord, Outcome},
    identity::RefusedIdentity,
};

/// Reporting controller name on the Events.
pub const REPORTER: &str = "podid-agent";
/// Longest note, in bytes (the API allows 1 kB).
const MAX_NOTE: usize = 1000;
/// Rate-limit entries kept before old ones are pruned.
const MAX_ENTRIES: usize = 10_000;

/// Interval between two `IdentityRefused` Events for one identity.
pub const IDENTITY_EVENT_INTERVAL: Duration = Duration::from_secs(600);

/// At most one admission per key and reason per interval.
#[derive(Clone, Debug)]
struct RateLimit {
    interval: Duration,
    last: Arc<Mutex<HashMap<(String, &'static str), Instant>>>,
}

impl RateLimit {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Arc::default(),
        }
    }

    /// Whether an Event for (`key`, `reason`) may go out now; records it.
    fn admit(&self, key: &str, reason: &'static str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.len() >= MAX_ENTRIES {
            let interval = self.interval;
            last.retain(|_, at| now.duration_since(*at) < interval);
        }
        match last.get(&(key.to_string(), reason)) {
            Some(at) if now.duration_since(*at) < self.interval => false,
            _ => {
                last.insert((key.to_string(), reason), now);
                true
            }
        }
    }
}

fn recorder(client: Client, instance: String) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: REPORTER.into(),
            instance: Some(instance),
        },
    )
}

/// Publishes in the background; `what` names the object in the log line.
fn publish(recorder: &Recorder, event: Event, reference: ObjectReference, what: String) {
    let recorder = recorder.clone();
    tokio::spawn(async move {
        if let Err(error) = recorder.publish(&event, &reference).await {
            warn!(%what, %error, "could not publish an event");
        }
    });
}

/// Publishes `IdentityRefused` Events on AzureIdentity objects.
#[derive(Clone)]
pub struct IdentityEvents {
    recorder: Recorder,
    limit: RateLimit,
}

impl std::fmt::Debug for IdentityEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityEvents")
            .field("interval", &self.limit.interval)
            .finish_non_exhaustive()
    }
}

impl IdentityEvents {
    /// Publishes through `client`; `instance` names this agent (its node).
    pub fn new(client: Client, instance: String, interval: Duration) -> Self {
        Self {
            recorder: recorder(client, instance),
            limit: RateLimit::new(interval),
        }
    }

    /// A Warning on the refused identity, unless one for the same identity
    /// and reason went out within the interval. Returns whether one was
    /// sent off.
    pub fn refused(&self, refused: &RefusedIdentity) -> bool {
        let key = format!("{}/{}", refused.namespace, refused.name);
        if !self.limit.admit(&key, refused.refusal.kind()) {
            return false;
        }
        let reference = ObjectReference {
            api_version: Some(format!("{}/{}", podid_api::GROUP, podid_api::VERSION)),
            kind: Some("AzureIdentity".into()),
            name: Some(refused.name.clone()),
            namespace: Some(refused.namespace.clone()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "IdentityRefused".into(),
            note: Some(truncate(format!(
                "podid gives no pod a token for this AzureIdentity: {}",
                refused.refusal
            ))),
            action: "GetToken".into(),
            secondary: None,
        };
        publish(&self.recorder, event, reference, key);
        true
    }
}

/// Publishes denial Events, rate-limited per pod and reason.
#[derive(Clone)]
pub struct DenialEvents {
    recorder: Recorder,
    limit: RateLimit,
}

impl std::fmt::Debug for DenialEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenialEvents")
            .field("interval", &self.limit.interval)
            .finish_non_exhaustive()
    }
}

/// The Event reason for a refused request.
pub fn reason_of(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::IdentityNotFound => "IdentityNotFound",
        Outcome::IdentityRefused => "IdentityRefused",
        Outcome::AssignmentPending => "IdentityAssignmentPending",
        Outcome::UpstreamError => "TokenRequestFailed",
        Outcome::Blocked => "MetadataRequestBlocked",
        Outcome::Unattributed => "Unattributed",
        Outcome::InvalidRequest => "InvalidRequest",
        Outcome::Rejected => "Rejected",
        Outcome::Issued | Outcome::Proxied => "Served",
    }
}

fn note_of(record: &AuditRecord) -> String {
    let mut note = format!(
        "podid refused a request from container {:?}",
        record.container
    );
    if !record.identity.is_empty() {
        note.push_str(&format!(" for identity {}", record.identity));
    }
    if !record.resource.is_empty() {
        note.push_str(&format!(" (resource {})", record.resource));
    }
    note.push_str(&format!(": {} (HTTP {})", record.reason, record.status));
    truncate(note)
}

fn truncate(mut note: String) -> String {
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
        Self {
            recorder: recorder(client, instance),
            limit: RateLimit::new(interval),
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
        if !self.limit.admit(&workload.uid, reason) {
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
        let pod = format!("{}/{}", workload.namespace, workload.name);
        publish(&self.recorder, event, reference, pod);
        true
    }
}
