//! podid's test support: guards for privileged tests (network namespaces,
//! cgroups, bpffs, child processes), a workload stand-in (`podid-probe`), and
//! the Azure emulators the end-to-end tests and the demo run against.

pub mod agent_files;
pub mod arm;
pub mod bench;
pub mod emulator;
pub mod harness;
pub mod http_server;
pub mod kube;
pub mod pod_network;
pub mod policy;
pub mod privileged;
pub mod probe;

/// The IMDS address every workload dials.
pub const IMDS: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(169, 254, 169, 254), 80);
