//! A Kubernetes node in a box, for the agent's end-to-end tests in
//! Kubernetes mode:
//!
//! - a private network namespace where 169.254.169.254 is a loopback address
//!   served by the IMDS/Entra ID emulator, and where the fake API server
//!   listens on 127.0.0.1 over plain HTTP;
//! - a generated kubeconfig the agent finds through `KUBECONFIG`, so the
//!   agent's real kube-rs client talks HTTP to the fake API server;
//! - a private bpffs and a cgroup root (`<root>/agent` for the agent; pod
//!   cgroups laid out by kubelet's rules below `<root>`, created on demand);
//! - the real `podid-agent` binary, without `--workloads`, with the redirect
//!   attached to `<root>`.
//!
//! Everything is removed on drop, in reverse order of creation.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use podid_agent::audit::AuditRecord;

use super::FakeApiServer;
use crate::{
    IMDS,
    agent_files::{
        AgentFiles, assert_no_leaks, assert_no_node_identity, node_identity_grants, scrape_metrics,
        scratch_dir,
    },
    emulator::{Emulator, EmulatorConfig, EmulatorHandle},
    harness::{http_get, rss_kib},
    privileged::{BpffsGuard, CgroupGuard, ChildGuard, NetNsGuard, in_cgroup, workspace_binary},
};

/// Where the agent listens and serves metrics inside the box: the same
/// addresses as the standalone harness's.
pub use crate::harness::{AGENT_ADDR, METRICS_ADDR};
/// The node's name.
pub const NODE_NAME: &str = "e2e-node";

/// How kubelet and the runtime lay out a pod's container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodCgroupLayout {
    /// systemd driver, Burstable pod, containerd:
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
    SystemdBurstableContainerd,
    /// systemd driver, Guaranteed pod (no QoS level), CRI-O:
    /// `kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope`.
    SystemdGuaranteedCrio,
    /// cgroupfs driver, BestEffort pod, containerd:
    /// `kubepods/besteffort/pod<uid>/<id>`.
    CgroupfsBestEffort,
}

/// The container cgroup of (`uid`, `container_id`) under `layout`,
/// relative to the cgroup root kubelet uses.
pub fn pod_cgroup_path(layout: PodCgroupLayout, uid: &str, container_id: &str) -> String {
    let underscored = uid.replace('-', "_");
    match layout {
        PodCgroupLayout::SystemdBurstableContainerd => format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/cri-containerd-{container_id}.scope"
        ),
        PodCgroupLayout::SystemdGuaranteedCrio => {
            format!("kubepods.slice/kubepods-pod{underscored}.slice/crio-{container_id}.scope")
        }
        PodCgroupLayout::CgroupfsBestEffort => {
            format!("kubepods/besteffort/pod{uid}/{container_id}")
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct KubeNodeSpec {
    /// The emulator's configuration (its listen address is overridden).
    pub emulator: EmulatorConfig,
    /// Extra `podid-agent run` arguments.
    pub agent_args: Vec<String>,
    /// Taints the node carries before the agent starts (key, effect).
    pub node_taints: Vec<(String, String)>,
    /// The test hands out the node's own identity on purpose (exception
    /// pods); otherwise dropping the harness fails if any token of the
    /// node's identity, or its credential, was issued.
    pub node_identity_expected: bool,
}

/// A running box.
///
/// When it is dropped without a panic in flight, it checks that none of the
/// tokens the emulator issued appears in the agent's stdout or stderr, its
/// audit file or `/metrics` (see [`token_leaks`]).
pub struct KubeNodeHarness {
    agent: Option<ChildGuard>,
    /// The emulator, for call counts and tokens.
    pub emulator: EmulatorHandle,
    /// The fake API server the agent talks to.
    pub api: FakeApiServer,
    api_addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    bpffs: BpffsGuard,
    cgroups: CgroupGuard,
    dir: PathBuf,
    spec: KubeNodeSpec,
    _netns: NetNsGuard,
}

impl KubeNodeHarness {
    /// Builds the box (network namespace, emulator, API server with the
    /// node object, bpffs, cgroups). The agent is started by
    /// [`KubeNodeHarness::start_agent`], so tests can write objects first.
    pub fn new(spec: KubeNodeSpec) -> Self {
        let netns = NetNsGuard::new();
        netns.add_loopback_address("169.254.169.254/32");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = spec.emulator.clone();
        config.listen = SocketAddr::V4(IMDS);
        let emulator = runtime
            .block_on(Emulator::start(config))
            .expect("start the emulator on 169.254.169.254:80");
        let api = FakeApiServer::new();
        let api_addr = runtime
            .block_on(api.serve_http(SocketAddr::from(([127, 0, 0, 1], 0))))
            .expect("start the fake API server");
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": NODE_NAME},
            "spec": {"taints": spec.node_taints.iter()
                .map(|(key, effect)| serde_json::json!({"key": key, "effect": effect}))
                .collect::<Vec<_>>()},
        }))
        .expect("node object");
        api.apply(&node);
        let bpffs = BpffsGuard::new();
        let mut cgroups = CgroupGuard::new("kube");
        cgroups.child("agent");
        let dir = scratch_dir("kube");
        fs::write(
            dir.join("kubeconfig"),
            FakeApiServer::kubeconfig(api_addr, "podid"),
        )
        .expect("write kubeconfig");
        Self {
            agent: None,
            emulator,
            api,
            api_addr,
            runtime,
            bpffs,
            cgroups,
            dir,
            spec,
            _netns: netns,
        }
    }

    /// The fake API server's address (inside the box).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    fn agent_command(&self) -> Command {
        let mut cmd = Command::new(workspace_binary("podid-agent"));
        cmd.arg("run")
            .args(["--listen", AGENT_ADDR, "--metrics-listen", METRICS_ADDR])
            .args(["--node-name", NODE_NAME, "--log-format", "json"])
            .arg("--cgroup-root")
            .arg(self.cgroups.path())
            .arg("--bpffs-dir")
            .arg(self.bpffs.pin_root())
            .arg("--audit-log")
            .arg(self.audit_path())
            .args(&self.spec.agent_args)
            .env_remove("NODE_IP")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("PODID_LOG", "info");
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Starts the agent and waits until `/readyz` answers 200 (the redirect
    /// is attached and every watch has listed). Panics with the agent's
    /// output if it does not within 30 s.
    pub fn start_agent(&mut self) {
        let (stdout, stderr) = self.files().open_outputs();
        let mut cmd = self.agent_command();
        in_cgroup(&mut cmd, &self.cgroups.path().join("agent"))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let mut child = ChildGuard::new(cmd.spawn().expect("spawn podid-agent"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.inner().try_wait().ok().flatten() {
                panic!(
                    "podid-agent exited ({status}) before becoming ready:\n{}\n{}",
                    self.agent_stdout(),
                    self.agent_stderr()
                );
            }
            if http_get(METRICS_ADDR, "/readyz").is_some_and(|(status, _)| status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "podid-agent not ready within 30 s:\n{}\n{}",
                self.agent_stdout(),
                self.agent_stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agent = Some(child);
    }

    /// SIGKILLs the agent (the pinned redirect stays).
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// The agent's PID, if running.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(ChildGuard::id)
    }

    /// The agent's resident set size in KiB, if it is running.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        rss_kib(self.agent_pid()?)
    }

    /// `/metrics` text (empty if the agent does not answer).
    pub fn metrics(&self) -> String {
        scrape_metrics()
    }

    /// Tokens the emulator issued that appear in the agent's stdout, stderr,
    /// audit files or `/metrics` (read now, if the agent runs).
    pub fn secrets_leaks(&self) -> Vec<String> {
        let metrics = if self.agent.is_some() {
            self.metrics()
        } else {
            String::new()
        };
        self.files().leaks(&self.emulator.issued_tokens(), &metrics)
    }

    /// The agent's output files.
    fn files(&self) -> AgentFiles<'_> {
        AgentFiles::new(&self.dir, self.audit_path())
    }

    /// Creates the container cgroup of (`uid`, `container_id`) laid out as
    /// kubelet and the runtime would, below the root; returns its directory.
    pub fn pod_cgroup(
        &mut self,
        layout: PodCgroupLayout,
        uid: &str,
        container_id: &str,
    ) -> PathBuf {
        self.cgroups
            .child(&pod_cgroup_path(layout, uid, container_id))
    }

    /// The cgroup root (where the redirect is attached).
    pub fn cgroup_root(&self) -> &Path {
        self.cgroups.path()
    }

    /// The audit log file.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Everything the agent printed on stdout so far.
    pub fn agent_stdout(&self) -> String {
        self.files().stdout()
    }

    /// Everything the agent printed on stderr so far.
    pub fn agent_stderr(&self) -> String {
        self.files().stderr()
    }

    /// Audit records, waiting (bounded) until at least `at_least` are there.
    pub fn audit_records(&self, at_least: usize) -> Vec<AuditRecord> {
        self.files().audit_records(at_least)
    }

    /// Runs a future on the box's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }
}

impl Drop for KubeNodeHarness {
    fn drop(&mut self) {
        let (leaks, grants) = if std::thread::panicking() {
            (Vec::new(), Vec::new())
        } else if self.spec.node_identity_expected {
            (self.secrets_leaks(), Vec::new())
        } else {
            (self.secrets_leaks(), node_identity_grants(&self.emulator))
        };
        self.kill_agent();
        if std::thread::panicking() {
            self.files().dump();
        }
        let _ = fs::remove_dir_all(&self.dir);
        assert_no_leaks(&leaks);
        assert_no_node_identity(&grants);
    }
}
