//! Kubernetes for the agent's tests: an in-memory API server
//! ([`FakeApiServer`]) reachable through a real `kube::Client` (in-process,
//! through a tower-test mock pair) or over plain HTTP (for the agent binary,
//! through a generated kubeconfig), and a node-in-a-box harness
//! ([`KubeNodeHarness`]) that runs the real agent in Kubernetes mode against
//! it, with kubelet-style pod cgroups.

mod apiserver;
mod fixtures;
pub(crate) mod merge_patch;
mod node;
pub mod schema;

pub use apiserver::{ApiCall, FakeApiServer};
pub use fixtures::{identity_and_binding, running_pod};
pub use node::{KubeNodeHarness, KubeNodeSpec, NODE_NAME, PodCgroupLayout, pod_cgroup_path};
