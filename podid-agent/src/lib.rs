//! podid node agent.
//!
//! The agent runs on every node (a DaemonSet with host networking). It installs
//! the kernel redirect that sends pods' IMDS connections to it ([`redirect`]),
//! learns from the kernel which cgroup (and so which pod) opened each
//! connection, and answers the IMDS token protocol with a token for the
//! identity bound to that pod, writing one audit record per request.

pub mod cli;
pub mod redirect;
pub mod tokens;
