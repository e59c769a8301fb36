//! Kubernetes Events (events.k8s.io/v1) on bindings and pods when an
//! identity cannot be assigned or removed, through kube-runtime's
//! `Recorder` (which folds repeats into a series).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use podid_api::AzureIdentityBinding;

/// Publishes events without blocking the cycle.
#[derive(Clone)]
pub(crate) struct Events {
    recorder: Recorder,
}

impl Events {
    pub(crate) fn new(client: Client, controller: &str, instance: &str) -> Self {
        Events {
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
