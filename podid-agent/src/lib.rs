//! podid node agent.
//!
//! The agent runs on every node (a DaemonSet with host networking). It installs
//! the kernel redirect that sends pods' IMDS connections to it ([`redirect`]),
//! learns from the kernel which cgroup (and so which pod) opened each
//! connection ([`attribution`], [`workloads`]), decides which identity that
//! workload may use ([`identity`]), gets the token ([`tokens`]) and answers in
//! IMDS's exact format ([`server`]), writing one audit record per request
//! ([`audit`]) and exposing Prometheus metrics ([`metrics`]).

pub mod agent;
pub mod attribution;
pub mod audit;
pub mod boot_unit;
pub mod cli;
pub mod config;
pub mod health;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod pod_listeners;
pub mod redirect;
pub mod server;
pub mod telemetry;
pub mod tokens;
pub mod workloads;
