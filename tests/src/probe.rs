//! Running `podid-probe`, the workload stand-in, inside a cgroup.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::privileged::{ChildGuard, in_cgroup, in_netns, in_workload, workspace_binary};

/// What a probe should do.
#[derive(Debug, Clone, Default)]
pub struct ProbeSpec {
    /// Destination (before any redirect).
    pub connect: Option<SocketAddrV4>,
    /// Use an AF_INET6 socket with the v4-mapped address.
    pub inet6: bool,
    /// Bind to this local address first.
    pub bind: Option<SocketAddrV4>,
    /// Send `GET <path>` and read the response.
    pub http_path: Option<String>,
    /// Extra request headers, `Name: value`.
    pub headers: Vec<String>,
    /// Keep the connection open this long before closing.
    pub hold: Duration,
    /// Send these bytes instead of a well-formed request.
    pub raw: Option<String>,
    /// Connections opened at once, each doing the same (1 if 0).
    pub concurrency: usize,
    /// Use an `IPPROTO_MPTCP` socket.
    pub mptcp: bool,
    /// Connect with `sendto(MSG_FASTOPEN)` carrying the request.
    pub fastopen: bool,
    /// Set `SO_REUSEADDR` and `SO_REUSEPORT` before binding.
    pub reuse: bool,
    /// Set `IP_FREEBIND` before binding (any source address).
    pub freebind: bool,
    /// After connecting, move the process to this cgroup directory.
    pub move_to: Option<PathBuf>,
    /// After connecting (and moving), create this file.
    pub ready_file: Option<PathBuf>,
    /// After connecting, wait (at most 20 s) for this file before the request.
    pub wait_file: Option<PathBuf>,
    /// Pass the connected socket (SCM_RIGHTS) to a probe in this cgroup,
    /// which sends the request; its report is the `handoff` field.
    pub handoff: Option<PathBuf>,
    /// Fork after connecting; the child moves to this cgroup and sends the
    /// request (its report is the output).
    pub fork_to: Option<PathBuf>,
    /// Repeat connect + request for this long and report a summary.
    pub repeat: Duration,
    /// Pause between repetitions.
    pub interval: Duration,
    /// Connect timeout (the probe's default is 2 s).
    pub connect_timeout: Option<Duration>,
}

impl ProbeSpec {
    /// A plain connect to `addr`.
    pub fn connect(addr: SocketAddrV4) -> Self {
        Self {
            connect: Some(addr),
            ..Self::default()
        }
    }

    /// The command line for this probe.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(workspace_binary("podid-probe"));
        if let Some(addr) = self.connect {
            cmd.arg("--connect").arg(addr.to_string());
        }
        if self.inet6 {
            cmd.arg("--inet6");
        }
        if let Some(bind) = self.bind {
            cmd.arg("--bind").arg(bind.to_string());
        }
        if let Some(path) = &self.http_path {
            cmd.arg("--http").arg(path);
        }
        for header in &self.headers {
            cmd.arg("--header").arg(header);
        }
        if let Some(raw) = &self.raw {
            cmd.arg("--raw").arg(raw);
        }
        if self.concurrency > 1 {
            cmd.arg("--concurrency").arg(self.concurrency.to_string());
        }
        if !self.hold.is_zero() {
            cmd.arg("--hold-ms").arg(self.hold.as_millis().to_string());
        }
        for (set, flag) in [
            (self.mptcp, "--mptcp"),
            (self.fastopen, "--fastopen"),
            (self.reuse, "--reuse"),
            (self.freebind, "--freebind"),
        ] {
            if set {
                cmd.arg(flag);
            }
        }
        for (path, flag) in [
            (&self.move_to, "--move-to"),
            (&self.ready_file, "--ready-file"),
            (&self.wait_file, "--wait-file"),
            (&self.handoff, "--handoff"),
            (&self.fork_to, "--fork-to"),
        ] {
            if let Some(path) = path {
                cmd.arg(flag).arg(path);
            }
        }
        if let Some(timeout) = self.connect_timeout {
            cmd.arg("--connect-timeout-ms")
                .arg(timeout.as_millis().to_string());
        }
        if !self.repeat.is_zero() {
            cmd.arg("--repeat-ms")
                .arg(self.repeat.as_millis().to_string());
            cmd.arg("--interval-ms")
                .arg(self.interval.as_millis().to_string());
        }
        cmd
    }

    /// Starts the probe inside `cgroup` (and the workload network namespace
    /// of a live [`crate::privileged::WorkloadNetnsGuard`]), with stdout
    /// captured.
    pub fn spawn_in(&self, cgroup: &Path) -> ChildGuard {
        let mut cmd = self.command();
        in_workload(&mut cmd, cgroup).stdout(Stdio::piped());
        ChildGuard::new(cmd.spawn().expect("spawn podid-probe"))
    }

    /// Runs the probe inside `cgroup` to completion and returns its JSON report.
    pub fn run_in(&self, cgroup: &Path) -> Value {
        let child = self.spawn_in(cgroup);
        finish(child)
    }

    /// Runs the probe inside `cgroup` and the network namespace at `netns`
    /// (a pod's), to completion.
    pub fn run_in_pod(&self, cgroup: &Path, netns: &Path) -> Value {
        let mut cmd = self.command();
        in_netns(&mut cmd, netns);
        in_cgroup(&mut cmd, cgroup).stdout(Stdio::piped());
        finish(ChildGuard::new(cmd.spawn().expect("spawn podid-probe")))
    }
}

/// Waits for a spawned probe and parses its JSON report.
pub fn finish(guard: ChildGuard) -> Value {
    let child = guard.into_inner();
    let out = child.wait_with_output().expect("wait for podid-probe");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("podid-probe printed {text:?}: {e}"))
}

impl ProbeSpec {
    /// A well-formed IMDS token request for `query`, with `Metadata: true`.
    pub fn token_request(query: &str) -> Self {
        Self {
            connect: Some(crate::IMDS),
            http_path: Some(format!("/metadata/identity/oauth2/token?{query}")),
            headers: vec!["Metadata: true".into()],
            ..Self::default()
        }
    }
}
