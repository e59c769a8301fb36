//! A whole node in a box, for end-to-end tests and the demo:
//!
//! - a private network namespace where 169.254.169.254 is a loopback address
//!   and the emulator (IMDS + Entra ID) listens on it, as Azure's IMDS would;
//! - a private bpffs and a cgroup tree (`<root>/agent`, `<root>/<workload>…`);
//! - the real `podid-agent` binary, started in `<root>/agent` (so its own
//!   upstream calls reach the emulator only because it exempts itself), with
//!   the redirect attached to `<root>`.
//!
//! Everything is removed on drop, in reverse order of creation.

use std::{
    fs,
    io::Read,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use podid_agent::audit::AuditRecord;

use crate::{
    IMDS,
    agent_files::{
        AgentFiles, assert_no_leaks, assert_no_node_identity, node_identity_grants, scrape_metrics,
        scratch_dir,
    },
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, IssuedRecord},
    pod_network::{NODE_IP, Pod, PodNetwork},
    privileged::{
        BpffsGuard, CgroupGuard, ChildGuard, NetNsGuard, WorkloadNetnsGuard, in_cgroup,
        in_workload, run_ok, workspace_binary,
    },
};

/// Where the agent listens inside the harness.
pub const AGENT_ADDR: &str = "127.0.0.1:2579";
/// Where the agent's metrics and health endpoint listens.
pub const METRICS_ADDR: &str = "127.0.0.1:9090";

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct HarnessSpec {
    /// The `--workloads` file. `LocalWorkload.spec.cgroup` paths are relative
    /// to the harness's cgroup root.
    pub workloads_yaml: String,
    /// cgroups to create under the root (the workloads' and any others).
    pub cgroups: Vec<String>,
    /// The emulator's configuration (its listen address is overridden).
    pub emulator: EmulatorConfig,
    /// Files to create under the secrets directory (`--secrets-dir`):
    /// (relative path, content).
    pub secrets: Vec<(String, Vec<u8>)>,
    /// Extra `podid-agent run` arguments.
    pub agent_args: Vec<String>,
}

/// Less common ways to set the box up ([`AgentHarness::start_with`]).
#[derive(Debug, Clone, Default)]
pub struct HarnessOptions {
    /// Create the kernel record maps with this capacity: the redirect is
    /// installed by `podid-agent redirect install --record-capacity N`
    /// before the agent starts, and the agent reuses the pinned maps.
    pub record_capacity: Option<u32>,
    /// Directory for the audit log instead of the scratch directory (a
    /// small tmpfs or a read-only mount, for the disk-fault tests).
    pub audit_dir: Option<PathBuf>,
    /// Start the agent with this soft `RLIMIT_NOFILE` (the hard limit is
    /// kept), as a service manager's default of 1024 would.
    pub nofile_soft_limit: Option<u64>,
    /// The agent's log filter (`PODID_LOG`), `info` when `None`.
    pub log_filter: Option<String>,
    /// The test hands out the node's own identity on purpose (exception
    /// pods); otherwise dropping the harness fails if any token of the
    /// node's identity, or its credential, was issued.
    pub node_identity_expected: bool,
    /// Lay the node out as a CNI does ([`PodNetwork`]) with this many pods:
    /// the agent listens on the node IP, IMDS sits beyond the node in a wire
    /// namespace. `None`: everything in one namespace, the agent on
    /// 127.0.0.1, IMDS on its loopback.
    pub pods: Option<usize>,
    /// Build the box but leave starting the agent to the test
    /// ([`AgentHarness::start_agent`]).
    pub defer_agent: bool,
    /// Zero-policy mode (`--listen-mode pod-netns`): the agent opens a
    /// listener in each pod network namespace of [`HarnessOptions::pods`]
    /// (its netns files are linked into a directory of the box's own, the
    /// agent's `--pod-netns-dir`).
    pub pod_netns_mode: bool,
    /// Workloads started on the test's thread (probes, SDK clients) run in
    /// pod 0's network namespace ([`WorkloadNetnsGuard`]) for the harness's
    /// life: a test written for one namespace then runs as a pod.
    pub workloads_in_pod: bool,
}

/// A running harness.
///
/// When it is dropped without a panic in flight, it checks that none of the
/// tokens the emulator issued appears in the agent's stdout or stderr, its
/// audit file or `/metrics` (see [`token_leaks`]): every end-to-end test is
/// also a secrets-hygiene test.
pub struct AgentHarness {
    agent: Option<ChildGuard>,
    /// The cgroup the agent runs in, relative to the root.
    agent_cgroup: String,
    /// The pods' network, when [`HarnessOptions::pods`] asked for one.
    pub network: Option<PodNetwork>,
    /// The emulator, for fault injection and call counts.
    pub emulator: EmulatorHandle,
    runtime: tokio::runtime::Runtime,
    bpffs: BpffsGuard,
    cgroups: CgroupGuard,
    dir: PathBuf,
    spec: HarnessSpec,
    options: HarnessOptions,
    _workloads: Option<WorkloadNetnsGuard>,
    _netns: NetNsGuard,
}

/// GETs `path` from `addr` (plain HTTP/1.1) and returns (status, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Where tokens issued by the emulator appear in `sources` ((name, text)
/// pairs), if anywhere: the whole token, its payload or signature segment,
/// or the first 16 characters of its (random) signature. Returns one line
/// per leak, naming the source and the token's client id and audience.
///
/// The scan splits each text into runs of base64url characters and dots and
/// looks every run and every dot-separated piece up in hash sets, so it is
/// linear in the size of the texts whatever the number of tokens.
pub fn token_leaks(tokens: &[IssuedRecord], sources: &[(&str, &str)]) -> Vec<String> {
    use std::collections::HashMap;
    const PREFIX: usize = 16;
    let mut whole: HashMap<&str, &IssuedRecord> = HashMap::new();
    let mut pieces: HashMap<&str, &IssuedRecord> = HashMap::new();
    let mut prefixes: HashMap<&str, &IssuedRecord> = HashMap::new();
    for token in tokens {
        whole.insert(token.access_token.as_str(), token);
        let parts: Vec<&str> = token.access_token.split('.').collect();
        // The header segment is the same for every token: not distinctive.
        for part in parts.iter().skip(1) {
            if part.len() >= PREFIX {
                pieces.insert(part, token);
            }
        }
        if let Some(signature) = parts.get(2).filter(|s| s.len() >= PREFIX) {
            prefixes.insert(&signature[..PREFIX], token);
        }
    }
    let mut leaks = Vec::new();
    let is_token_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    for (name, text) in sources {
        for run in text.split(|c: char| !is_token_char(c)) {
            if run.len() < PREFIX {
                continue;
            }
            let found = whole.get(run).or_else(|| {
                run.split('.').find_map(|piece| {
                    pieces
                        .get(piece)
                        .or_else(|| piece.get(..PREFIX).and_then(|prefix| prefixes.get(prefix)))
                })
            });
            if let Some(token) = found {
                leaks.push(format!(
                    "{name}: a token issued to {} for {} appears in {:?}",
                    token.client_id,
                    token.resource,
                    run.chars().take(40).collect::<String>()
                ));
            }
        }
    }
    leaks
}

impl AgentHarness {
    /// Builds the box and starts the emulator and the agent; returns once the
    /// agent reports ready. Panics with the agent's output if it does not.
    pub fn start(spec: HarnessSpec) -> Self {
        Self::start_with(spec, HarnessOptions::default())
    }

    /// [`AgentHarness::start`] with [`HarnessOptions`].
    pub fn start_with(spec: HarnessSpec, options: HarnessOptions) -> Self {
        let netns = NetNsGuard::new();
        let network = options.pods.map(PodNetwork::new);
        if network.is_none() {
            netns.add_loopback_address("169.254.169.254/32");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut config = spec.emulator.clone();
        config.listen = SocketAddr::V4(IMDS);
        let start = || {
            runtime
                .block_on(Emulator::start(config))
                .expect("start the emulator on 169.254.169.254:80")
        };
        // Beyond the node, where a pod's packets can only arrive if the node
        // forwards them.
        let emulator = match &network {
            Some(network) => network.wire.netns.enter_while(start),
            None => start(),
        };
        let bpffs = BpffsGuard::new();
        let mut cgroups = CgroupGuard::new("e2e");
        cgroups.child("agent");
        for cgroup in &spec.cgroups {
            cgroups.child(cgroup);
        }
        let dir = scratch_dir("harness");
        fs::write(dir.join("workloads.yaml"), &spec.workloads_yaml).expect("write workloads");
        for (path, content) in &spec.secrets {
            let path = dir.join("secrets").join(path);
            fs::create_dir_all(path.parent().expect("secret path has a parent"))
                .expect("create secrets dir");
            fs::write(&path, content).expect("write secret");
        }
        let workloads = options.workloads_in_pod.then(|| {
            let network = network
                .as_ref()
                .expect("workloads_in_pod needs a pod network (HarnessOptions::pods)");
            WorkloadNetnsGuard::enter(network.pods[0].netns.path())
        });
        let mut harness = Self {
            agent: None,
            agent_cgroup: "agent".into(),
            network,
            emulator,
            runtime,
            bpffs,
            cgroups,
            dir,
            spec,
            options,
            _workloads: workloads,
            _netns: netns,
        };
        if harness.network.is_some() {
            fs::create_dir_all(harness.pod_netns_dir()).expect("pod netns dir");
            for index in 0..harness.network.as_ref().map_or(0, |n| n.pods.len()) {
                harness.link_pod_netns(index);
            }
        }
        if let Some(capacity) = harness.options.record_capacity {
            harness.preinstall_redirect(capacity);
        }
        if !harness.options.defer_agent {
            harness.start_agent();
        }
        harness
    }

    /// Installs the redirect with record maps of `capacity` entries, as a
    /// separate loader would; the agent then finds and reuses the pins.
    fn preinstall_redirect(&self, capacity: u32) {
        run_ok(
            Command::new(workspace_binary("podid-agent"))
                .args(["redirect", "install", "--listen", &self.agent_addr()])
                .arg("--cgroup-root")
                .arg(self.cgroups.path())
                .arg("--bpffs-dir")
                .arg(self.bpffs.pin_root())
                .arg("--record-capacity")
                .arg(capacity.to_string())
                .env("PODID_LOG", "warn"),
        );
    }

    /// The agent's command line.
    fn agent_command(&self) -> Command {
        let mut cmd = Command::new(workspace_binary("podid-agent"));
        cmd.arg("run")
            .args([
                "--listen",
                &self.agent_addr(),
                "--metrics-listen",
                METRICS_ADDR,
            ])
            .args(["--node-name", "e2e-node", "--log-format", "json"])
            .arg("--cgroup-root")
            .arg(self.cgroups.path())
            .arg("--bpffs-dir")
            .arg(self.bpffs.pin_root())
            .arg("--workloads")
            .arg(self.dir.join("workloads.yaml"))
            .arg("--audit-log")
            .arg(self.audit_path())
            .arg("--secrets-dir")
            .arg(self.dir.join("secrets"))
            .args(&self.spec.agent_args)
            .args(if self.options.pod_netns_mode {
                vec![
                    "--listen-mode".into(),
                    "pod-netns".into(),
                    "--pod-netns-dir".into(),
                    self.pod_netns_dir().display().to_string(),
                ]
            } else {
                Vec::new()
            })
            .env_remove("NODE_IP")
            .env(
                "PODID_LOG",
                self.options.log_filter.as_deref().unwrap_or("info"),
            );
        cmd
    }

    /// Starts (or restarts) the agent and waits for readiness.
    pub fn start_agent(&mut self) {
        let (stdout, stderr) = self.files().open_outputs();
        let mut cmd = self.agent_command();
        in_cgroup(&mut cmd, &self.cgroup(&self.agent_cgroup))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        if let Some(soft) = self.options.nofile_soft_limit {
            // SAFETY: getrlimit/setrlimit are async-signal-safe.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        let mut child = ChildGuard::new(cmd.spawn().expect("spawn podid-agent"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.inner().try_wait().ok().flatten() {
                panic!(
                    "podid-agent exited ({status}) before becoming ready:\n{}\n{}",
                    self.agent_stdout(),
                    fs::read_to_string(self.dir.join("agent.stderr")).unwrap_or_default()
                );
            }
            if http_get(METRICS_ADDR, "/readyz").is_some_and(|(status, _)| status == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "podid-agent not ready within 30 s:\n{}",
                self.agent_stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.agent = Some(child);
    }

    /// Kills the agent, removes its cgroup (as kubelet does with a dead
    /// container's) and starts it again in a new cgroup `name`.
    pub fn restart_agent_in_fresh_cgroup(&mut self, name: &str) {
        self.kill_agent();
        self.cgroups.remove_child(&self.agent_cgroup);
        self.cgroups.child(name);
        self.agent_cgroup = name.to_string();
        self.start_agent();
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

    /// Stops the agent with SIGSTOP (it accepts nothing until resumed).
    pub fn pause_agent(&self) {
        self.signal_agent(libc::SIGSTOP);
    }

    /// Resumes an agent stopped by [`AgentHarness::pause_agent`].
    pub fn resume_agent(&self) {
        self.signal_agent(libc::SIGCONT);
    }

    fn signal_agent(&self, signal: libc::c_int) {
        let pid = self.agent_pid().expect("the agent is running") as libc::pid_t;
        // SAFETY: a signal to our own child, by PID.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The agent's resident set size in KiB (VmRSS), if it is running.
    pub fn agent_rss_kib(&self) -> Option<u64> {
        rss_kib(self.agent_pid()?)
    }

    /// Where the agent listens: the node IP with a pod network, else
    /// [`AGENT_ADDR`].
    pub fn agent_addr(&self) -> String {
        match &self.network {
            Some(_) => format!("{NODE_IP}:2579"),
            None => AGENT_ADDR.to_string(),
        }
    }

    /// The directory the agent finds pod network namespaces in
    /// (zero-policy mode): links to the box's own pods only.
    pub fn pod_netns_dir(&self) -> PathBuf {
        self.dir.join("netns")
    }

    fn link_pod_netns(&self, index: usize) {
        let pod = self.pod(index);
        let _ = std::os::unix::fs::symlink(
            pod.netns.path(),
            self.pod_netns_dir().join(format!("pod-{index}")),
        );
    }

    /// Adds a pod to the pod network (and, in zero-policy mode, to the
    /// agent's netns directory); returns its index.
    pub fn add_pod(&mut self) -> usize {
        let network = self.network.as_mut().expect("a pod network");
        network.add_pod();
        let index = network.pods.len() - 1;
        self.link_pod_netns(index);
        index
    }

    /// Pod `index` of the pod network.
    pub fn pod(&self, index: usize) -> &Pod {
        &self
            .network
            .as_ref()
            .expect("a pod network (HarnessOptions::pods)")
            .pods[index]
    }

    /// The cgroup directory of `relative` (as given in the spec).
    pub fn cgroup(&self, relative: &str) -> PathBuf {
        self.cgroups.path().join(relative)
    }

    /// The harness's cgroup root (where the redirect is attached).
    pub fn cgroup_root(&self) -> &Path {
        self.cgroups.path()
    }

    /// The pin root.
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs.pin_root()
    }

    /// The audit log file.
    pub fn audit_path(&self) -> PathBuf {
        self.options
            .audit_dir
            .as_deref()
            .unwrap_or(&self.dir)
            .join("audit.log")
    }

    /// The workloads file (tests may rewrite it).
    pub fn workloads_path(&self) -> PathBuf {
        self.dir.join("workloads.yaml")
    }

    /// The harness's scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything the agent printed on stdout so far.
    pub fn agent_stdout(&self) -> String {
        self.files().stdout()
    }

    /// Everything the agent printed on stderr so far.
    pub fn agent_stderr(&self) -> String {
        self.files().stderr()
    }

    /// Audit records in the file, waiting (bounded) until at least `at_least`
    /// are there: the writer thread appends asynchronously.
    pub fn audit_records(&self, at_least: usize) -> Vec<AuditRecord> {
        self.files().audit_records(at_least)
    }

    /// The first audit record that `matches`, waiting (bounded) for it.
    pub fn audit_record_where(
        &self,
        what: &str,
        matches: impl Fn(&AuditRecord) -> bool,
    ) -> AuditRecord {
        self.files().audit_record_where(what, matches)
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        scrape_metrics()
    }

    /// Runs an async block on the harness's runtime (for the emulator's API).
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Checks that no token the emulator issued appears in the agent's
    /// stdout, stderr, audit files (rotated ones too) or `/metrics` (read
    /// now, if the agent runs). Returns the leaks found.
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
}

/// VmRSS of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Drop for AgentHarness {
    fn drop(&mut self) {
        let (leaks, grants) = if std::thread::panicking() {
            (Vec::new(), Vec::new())
        } else if self.options.node_identity_expected {
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

/// Path of the Python virtualenv `cargo xtask setup` creates.
pub fn venv() -> PathBuf {
    std::env::var_os("PODID_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/venv"))
}

/// Path of the npm prefix `cargo xtask setup` installs `@azure/identity` into.
pub fn node_prefix() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/node")
}

/// Runs a program in `cgroup` with a clean environment (no proxies) and
/// returns its stdout parsed as JSON, with a bound on its run time.
pub fn run_client_json(mut cmd: Command, cgroup: &Path, timeout: Duration) -> serde_json::Value {
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    for var in [
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_POD_IDENTITY_AUTHORITY_HOST",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "MSI_ENDPOINT",
        "MSI_SECRET",
    ] {
        cmd.env_remove(var);
    }
    in_workload(&mut cmd, cgroup)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::new(cmd.spawn().expect("spawn client"));
    let status = child.wait_timeout(timeout);
    let mut inner = child.into_inner();
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut stdout) = inner.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Some(mut stderr) = inner.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    let _ = inner.kill();
    let _ = inner.wait();
    assert!(
        status.is_some(),
        "client did not finish within {timeout:?}: {out}\n{err}"
    );
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("client printed {out:?} ({e}); stderr: {err}"))
}

/// The official Python client (`azure-identity`): `ManagedIdentityCredential`
/// with `client_id` (or none), getting a token for `scope`.
pub fn python_client(client_id: Option<&str>, scope: &str) -> Command {
    const SCRIPT: &str = r#"
import json, sys, time
from azure.identity import ManagedIdentityCredential
client_id = sys.argv[1] or None
scope = sys.argv[2]
started = time.monotonic()
try:
    credential = ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    token = credential.get_token(scope)
    print(json.dumps({"token": token.token, "expires_on": token.expires_on, "seconds": time.monotonic() - started}))
except Exception as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__, "seconds": time.monotonic() - started}))
"#;
    let mut cmd = Command::new(venv().join("bin/python"));
    cmd.arg("-c")
        .arg(SCRIPT)
        .arg(client_id.unwrap_or(""))
        .arg(scope);
    cmd
}

/// The official Node.js client (`@azure/identity`).
pub fn node_client(client_id: Option<&str>, scope: &str) -> Command {
    const SCRIPT: &str = r#"
const { ManagedIdentityCredential } = require("@azure/identity");
const [clientId, scope] = process.argv.slice(1);
const started = Date.now();
const credential = clientId ? new ManagedIdentityCredential({ clientId }) : new ManagedIdentityCredential();
credential.getToken(scope).then(
  (t) => console.log(JSON.stringify({ token: t.token, expires_on: t.expiresOnTimestamp, seconds: (Date.now() - started) / 1000 })),
  (e) => console.log(JSON.stringify({ error: String(e && e.message || e), type: e && e.name, seconds: (Date.now() - started) / 1000 })),
);
"#;
    let mut cmd = Command::new("node");
    cmd.arg("-e")
        .arg(SCRIPT)
        .arg(client_id.unwrap_or(""))
        .arg(scope)
        .env("NODE_PATH", node_prefix().join("node_modules"));
    cmd
}
