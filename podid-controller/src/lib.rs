//! podid's cluster controller: the role of aad-pod-identity's MIC.
//!
//! It watches pods carrying the `aadpodidbinding` label, `AzureIdentity`,
//! `AzureIdentityBinding`, `AzureAssignedIdentity` objects and nodes, works
//! out which user-assigned identities each node's VM or VM scale set must
//! carry ([`desired`]), compares that with the `AzureAssignedIdentity`
//! records ([`plan`]), assigns and removes identities through Azure Resource
//! Manager ([`arm`]) and records the outcome in `AzureAssignedIdentity`
//! objects exactly as MIC writes them, so that the agent (and existing
//! tooling) can read them ([`assign`]).
//!
//! What it does better than MIC:
//! - one GET and at most one PATCH (per 150 identities) per VM or scale set
//!   per cycle, carrying only the delta; events arriving during a cycle are
//!   batched into the next one;
//! - nothing is read from ARM in steady state except the periodic re-add
//!   check, and nothing is written unless something is missing;
//! - `Retry-After` is honoured per ARM client, 5xx responses get bounded
//!   retries, and an invalid identity is cut out of its batch and backed off
//!   instead of blocking the valid ones;
//! - identities it did not assign, the system-assigned identity, immutable
//!   identities and the cluster's own identity are never removed.
//!
//! [`run`] is the entry point used by `main`; [`Controller::run_cycle`] runs
//! one cycle directly (tests and the benchmark use it).

#![warn(missing_docs)]

pub mod arm;
pub mod assign;
pub mod config;
pub mod desired;
mod events;
mod expectations;
pub mod leader;
pub mod metrics;
pub mod plan;
mod server;
pub mod stores;
pub mod target;
pub mod telemetry;

mod controller;

pub use assign::{CycleReport, CycleTrigger, TargetReport};
pub use config::{Args, CloudConfig, ControllerConfig};
pub use controller::{Controller, run, run_with_client};
pub use leader::{LeaderElector, LeaseConfig};
pub use metrics::Metrics;
pub use stores::Stores;
pub use target::{Target, TargetKind};

/// Everything that can go wrong in the controller outside ARM calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
    /// The cloud configuration could not be read or is incomplete.
    #[error("cloud config {path}: {message}")]
    CloudConfig {
        /// The file (or `environment`).
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// An ARM client could not be built or a call failed.
    #[error(transparent)]
    Arm(#[from] arm::ArmError),
    /// The metrics/health listener could not be started.
    #[error("metrics listener on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The watch caches never became ready.
    #[error("watch caches did not become ready: {0}")]
    CacheNotReady(String),
    /// This replica lost the leader lease while acting.
    #[error("lost the leader lease")]
    LostLease,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short label for metrics (`error_policy`-style accounting).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::CloudConfig { .. } => "cloud_config",
            Error::Arm(_) => "arm",
            Error::Listen { .. } => "listen",
            Error::CacheNotReady(_) => "cache",
            Error::LostLease => "lease",
        }
    }
}
