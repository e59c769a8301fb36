//! Kubernetes mode: workloads are this node's pods, identity objects are
//! aad-pod-identity's custom resources, all read through kube-rs reflectors.
//!
//! - [`cgroup_path`]: a connection's cgroup path → pod UID and container ID
//!   (systemd and cgroupfs drivers, every QoS class, containerd, CRI-O and
//!   Docker, nested node layouts).
//! - [`pods`]: this node's pods by UID, container ID → container name,
//!   deleted and terminated pods.
//! - [`catalog`]: AzureIdentity and AzureIdentityBinding for the identity
//!   decision, and dropping cached tokens when they change.
//! - [`assignments`]: standard mode's AzureAssignedIdentity check and its
//!   bounded wait.
//! - [`secrets`]: service-principal Secrets, read on demand.
//! - [`events`]: the `--emit-denial-events` flag.
//! - [`taint`]: the `--startup-taint` flag.
//! - [`source`]: [`KubernetesSource`], tying them together behind
//!   [`WorkloadSource`](super::WorkloadSource).
//!
//! The API calls the agent makes, and so the RBAC it needs: `list`/`watch`
//! on pods (field selector `spec.nodeName`), azureidentities,
//! azureidentitybindings, azurepodidentityexceptions and (standard mode)
//! azureassignedidentities (label selector `nodename`); `get` on secrets;
//! `get`/`patch` on its own node (`--startup-taint`); `create`/`patch` on
//! events.k8s.io events (`--emit-denial-events`).

pub mod assignments;
pub mod catalog;
pub mod cgroup_path;
pub mod events;
pub mod pods;
mod reflect;
pub mod secrets;
pub mod source;
pub mod taint;

#[cfg(test)]
mod tests;

pub use catalog::TokenInvalidation;
pub use secrets::KubeSecrets;
pub use source::{KubernetesConfig, KubernetesSource};
pub use taint::{remove_taint, remove_taint_until_done};
