//! Emulated Azure Resource Manager (VMs and VM scale sets with their
//! identities), and the in-memory Kubernetes API server the controller
//! tests and benchmark run against.
//!
//! [`ArmEmulator`] follows ARM's documented contract for what the
//! controller uses:
//! - `GET`/`PATCH` of `Microsoft.Compute/virtualMachines/{name}` and
//!   `virtualMachineScaleSets/{name}`, with the `identity` block
//!   (`type`, `principalId`, `userAssignedIdentities`);
//! - PATCH merge semantics: an identity mapped to `null` is removed, one
//!   mapped to `{}` added, the rest kept; `type` transitions (`None`,
//!   `SystemAssigned`, `UserAssigned`, `SystemAssigned, UserAssigned`);
//! - the change takes effect through a long-running operation, followed with
//!   `Azure-AsyncOperation` (or `Location`); a second PATCH during it is a
//!   409;
//! - more than 150 identities in one request is a 400 (ARM's limit);
//!   identities marked invalid fail the whole PATCH with
//!   `FailedIdentityOperation`, naming them;
//! - bearer tokens from its own IMDS and Entra ID token endpoints;
//! - fault injection (429 + Retry-After, 5xx), latency injection, failed
//!   operations, and a log of every request with its raw body.

pub mod apiserver;
pub mod cluster;
mod emulator;

pub use emulator::{
    ArmEmulator, EmulatorConfig, Fault, LroStyle, RecordedRequest, ResourceKind, uami_id,
};
