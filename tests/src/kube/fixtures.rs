//! Kubernetes objects the node tests apply to the fake API server: running
//! pods on the harness's node as kubelet reports them, and identity +
//! binding pairs for an emulator identity.

use k8s_openapi::api::core::v1::Pod;
use podid_api::{AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec};
use serde_json::json;

use super::node::NODE_NAME;
use crate::emulator::ManagedIdentity;

/// A running pod on the harness's node, labelled `aadpodidbinding:
/// selector`, with one container `container` whose runtime ID is
/// `containerd://<container_id>`.
pub fn running_pod(
    namespace: &str,
    name: &str,
    uid: &str,
    selector: &str,
    container: &str,
    container_id: &str,
) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid,
                     "labels": {"aadpodidbinding": selector}},
        "spec": {"nodeName": NODE_NAME, "containers": [{"name": container}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": container, "containerID": format!("containerd://{container_id}"),
            "image": "app", "imageID": "", "ready": true, "restartCount": 0,
        }]},
    }))
    .expect("a valid Pod")
}

/// A type-0 AzureIdentity `name` in `namespace` for `identity`, and the
/// binding `binding` that selects it for pods labelled `selector`.
pub fn identity_and_binding(
    namespace: &str,
    name: &str,
    binding: &str,
    selector: &str,
    identity: &ManagedIdentity,
) -> (AzureIdentity, AzureIdentityBinding) {
    let mut azure_identity = AzureIdentity::new(
        name,
        AzureIdentitySpec {
            identity_type: 0,
            resource_id: identity.resource_id.clone(),
            client_id: identity.client_id.clone(),
            ..AzureIdentitySpec::default()
        },
    );
    azure_identity.metadata.namespace = Some(namespace.into());
    let mut azure_binding = AzureIdentityBinding::new(
        binding,
        AzureIdentityBindingSpec {
            azure_identity: name.into(),
            selector: selector.into(),
            weight: None,
        },
    );
    azure_binding.metadata.namespace = Some(namespace.into());
    (azure_identity, azure_binding)
}
