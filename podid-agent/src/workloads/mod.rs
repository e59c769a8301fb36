//! Where workloads and their identity objects come from.
//!
//! A [`WorkloadSource`] answers the questions the server asks about a
//! connection once the kernel has named its cgroup: which workload is that
//! (a pod, or a standalone `LocalWorkload`), which identity objects exist,
//! whether the workload is an exception, and, in standard mode, whether an
//! identity is assigned to the node yet. Standalone mode reads a file
//! ([`standalone`]); Kubernetes mode watches the API server.

pub mod kubernetes;
pub mod standalone;

use std::{collections::BTreeMap, future::Future, path::Path, sync::Arc, time::Duration};

use crate::{
    audit::AuditRecord,
    identity::{BoundIdentity, IdentityCatalog, NamespaceRule, RefusedIdentity},
    tokens::SecretSource,
};

/// A process group the agent attributes requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Namespace (of the pod, or of the LocalWorkload).
    pub namespace: String,
    /// Pod name, or LocalWorkload name.
    pub name: String,
    /// Pod UID; empty for local workloads.
    pub uid: String,
    /// Container name; empty for the pod sandbox or a local workload.
    pub container: String,
    /// Labels; `aadpodidbinding` selects bindings.
    pub labels: BTreeMap<String, String>,
}

/// Why a connection could not be tied to a workload. Answered with 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unattributed {
    #[error("the connection was not redirected by the kernel (no connect record)")]
    NoRecord,
    #[error("cgroup {0} no longer exists")]
    CgroupGone(u64),
    #[error("cgroup {path} is not a known workload")]
    UnknownCgroup { path: String },
    #[error(
        "cgroup {path} belongs to pod {uid}, which is not on this node (waited {waited_ms} ms)"
    )]
    UnknownPod {
        path: String,
        uid: String,
        waited_ms: u64,
    },
    #[error("pod {namespace}/{name} is terminated")]
    PodGone { namespace: String, name: String },
    #[error("workloads are not loaded yet")]
    NotReady,
}

/// Whether an identity may be used now (standard mode's assignment check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    /// Assigned to the node (or no controller in this mode).
    Ready,
    /// Still being assigned after waiting; the SDK should retry.
    Pending { waited: Duration },
    /// Not assigned and not being assigned.
    Missing,
}

/// The questions the server asks about workloads.
pub trait WorkloadSource: Send + Sync + 'static {
    /// The workload owning the cgroup at `cgroup_path` (relative to the
    /// cgroup2 mount). May wait, bounded, for a pod the source has not seen yet.
    fn workload(
        &self,
        cgroup_id: u64,
        cgroup_path: &Path,
    ) -> impl Future<Output = Result<Workload, Unattributed>> + Send;

    /// A snapshot of the identity objects.
    fn catalog(&self) -> Arc<dyn IdentityCatalog + Send + Sync>;

    /// Namespace rule for bindings.
    fn namespace_rule(&self) -> NamespaceRule;

    /// Whether `workload` is excepted (served with the node's identity).
    fn is_exception(&self, workload: &Workload) -> bool;

    /// Standard mode: waits up to `wait` for the identity to be assigned.
    fn assignment(
        &self,
        workload: &Workload,
        bound: &BoundIdentity,
        wait: Duration,
    ) -> impl Future<Output = Assignment> + Send;

    /// Where service-principal secrets come from.
    fn secrets(&self) -> Arc<dyn SecretSource>;

    /// Whether the source has loaded (initial sync done).
    fn is_ready(&self) -> bool;

    /// Called once per request refused for an attributed workload (no
    /// identity, assignment pending, upstream failure), with its audit
    /// record. Kubernetes mode can turn these into Events on the pod.
    fn on_denied(&self, workload: &Workload, record: &AuditRecord) {
        let _ = (workload, record);
    }

    /// Called when a request was refused because an AzureIdentity its
    /// binding named breaks podid's rules. Kubernetes mode records a Warning
    /// Event on that identity (rate-limited).
    fn on_identity_refused(&self, refused: &RefusedIdentity) {
        let _ = refused;
    }
}
