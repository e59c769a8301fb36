//! podid's test support: guards for privileged tests (network namespaces,
//! cgroups, bpffs, child processes), a workload stand-in (`podid-probe`), and
//! the Azure emulators the end-to-end tests and the demo run against.

pub mod arm;
pub mod emulator;
pub mod privileged;
pub mod probe;
