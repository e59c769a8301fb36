//! Kubernetes Events (events.k8s.io/v1) on bindings and pods when an
//! identity cannot be assigned or removed, through kube-runtime's
//! `Recorder` (which folds repeats into a series).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use podid_api::{AzureIdentity, AzureIdentityBinding, validation::IdentityRefusal};

/// An identity object's uid, resourceVersion and refusal kind.
type RefusedKey = (String, String, &'static str);

/// Publishes events without blocking the cycle.
#[derive(Clone)]
pub(crate) struct Events {
    recorder: Recorder,
    /// (uid, resourceVersion, reason) of identities already reported as
    /// refused: one Event per version of the object, not one per cycle.
    refused: Arc<Mutex<HashSet<RefusedKey>>>,
}

impl Events {
    pub(crate) fn new(client: Client, controller: &str, instance: &str) -> Self {
        Events {
            refused: Arc::default(),
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: controller.to_string(),
                    instance: Some(instance.to_string()),
                },
            ),
        }
    }

    /// An identity could not be assigned for a pod: a Warning on the pod and
    /// on the binding that selected it (MIC's "binding apply error").
    pub(crate) fn assignment_failed(
        &self,
        pod_namespace: &str,
        pod: &str,
        binding: &AzureIdentityBinding,
        message: &str,
    ) {
        let pod_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.to_string()),
            namespace: Some(pod_namespace.to_string()),
            ..ObjectReference::default()
        };
        let binding_ref = binding.object_ref(&());
        let note: String = message.chars().take(1000).collect();
        self.publish(
            pod_ref.clone(),
            Event {
                type_: EventType::Warning,
                reason: "IdentityAssignmentFailed".into(),
                note: Some(note.clone()),
                action: "AssignIdentity".into(),
                secondary: Some(binding_ref.clone()),
            },
        );
        self.publish(
            binding_ref,
            Event {
                type_: EventType::Warning,
                reason: "BindingApplyError".into(),
                note: Some(note),
                action: "AssignIdentity".into(),
                secondary: Some(pod_ref),
            },
        );
    }

    /// An identity breaks podid's rules: a Warning on it, once per version
    /// of the object. Nothing is assigned for it.
    pub(crate) fn identity_refused(&self, identity: &AzureIdentity, refusal: &IdentityRefusal) {
        let key = (
            identity.metadata.uid.clone().unwrap_or_default(),
            identity
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default(),
            refusal.kind(),
        );
        {
            let mut seen = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() >= 10_000 {
                seen.clear();
            }
            if !seen.insert(key) {
                return;
            }
        }
        let note: String = format!(
            "podid assigns this AzureIdentity to no node and gives no pod a token for it: {refusal}"
        )
        .chars()
        .take(1000)
        .collect();
        self.publish(
            identity.object_ref(&()),
            Event {
                type_: EventType::Warning,
                reason: "IdentityRefused".into(),
                note: Some(note),
                action: "AssignIdentity".into(),
                secondary: None,
            },
        );
    }

    /// An identity could not be removed after its binding stopped applying.
    pub(crate) fn removal_failed(&self, binding: &AzureIdentityBinding, message: &str) {
        let note: String = message.chars().take(1000).collect();
        self.publish(
            binding.object_ref(&()),
            Event {
                type_: EventType::Warning,
                reason: "BindingRemoveError".into(),
                note: Some(note),
                action: "RemoveIdentity".into(),
                secondary: None,
            },
        );
    }

    fn publish(&self, reference: ObjectReference, event: Event) {
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::debug!(%error, reason = %event.reason, "could not publish event");
            }
        });
    }
}
