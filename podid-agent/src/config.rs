//! `podid-agent run`'s configuration: every flag, also settable as a
//! `PODID_…` environment variable (DESIGN.md's operator interface).

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, ValueEnum};

use podid_api::validation::IdentityRuleArgs;

use crate::{
    redirect::{DEFAULT_PIN_ROOT, GuardInterfaces},
    server::forwarding::{DEFAULT_FORWARD_RULES, ForwardRule},
};

/// aad-pod-identity's operation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The controller assigns identities; the agent serves an identity only
    /// once its AzureAssignedIdentity is `Assigned`.
    Standard,
    /// No controller: identities are assigned to the VMs/VMSS by hand; pod,
    /// binding and identity must share a namespace.
    Managed,
}

/// Where pods' IMDS connections are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListenMode {
    /// To the agent on `<node IP>:2579`: network policy must allow it.
    Node,
    /// To a listener of the agent inside each pod's own network namespace:
    /// the connection never leaves the pod, no policy applies to it
    /// (needs CAP_SYS_ADMIN and the runtime's netns files).
    PodNetns,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The kernel boundary's settings, the same for `run` and `redirect install`.
#[derive(Debug, Clone, Args)]
pub struct BoundaryArgs {
    /// A kernel record of a redirected connection that the agent has not
    /// taken within this time is refused (and another cgroup's connection
    /// with the same addresses may replace it). Covers SYN retransmits at
    /// 1, 3 and 7 s.
    #[arg(long, env = "PODID_RECORD_MAX_AGE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub record_max_age: Duration,

    /// Interfaces the IMDS guard (tc egress) is attached to: `auto` (the
    /// interface the main routing table sends 169.254.169.254 through),
    /// `none`, or interface names (comma-separated).
    #[arg(
        long = "imds-guard-interface",
        env = "PODID_IMDS_GUARD_INTERFACES",
        value_delimiter = ',',
        value_name = "auto|none|IFACE",
        default_value = "auto"
    )]
    pub guard_interfaces: Vec<String>,

    /// Also drop IMDS-bound packets of pods' sockets inside their own
    /// network namespaces (cgroup_skb/egress on the attach cgroup), whatever
    /// interface the node would route them through. The IMDS guard on the
    /// node's interface already drops them when they leave; this costs every
    /// packet every pod sends (see docs/security.md).
    #[arg(long, env = "PODID_EGRESS_GUARD")]
    pub egress_guard: bool,
}

impl BoundaryArgs {
    /// Where the guard goes.
    pub fn guard(&self) -> GuardInterfaces {
        match self.guard_interfaces.as_slice() {
            [one] if one == "auto" => GuardInterfaces::Auto,
            [one] if one == "none" => GuardInterfaces::Off,
            names => GuardInterfaces::Named(
                names
                    .iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect(),
            ),
        }
    }
}

/// Flags of `podid-agent run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the token endpoint; pods' IMDS connections are redirected
    /// here. Default: `$NODE_IP:2579`.
    #[arg(long, env = "PODID_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// This node's IP (from the downward API), used for the default --listen.
    #[arg(long, env = "NODE_IP", hide = true)]
    pub node_ip: Option<IpAddr>,

    /// This node's name (from the downward API). Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Upstream IMDS, for user-assigned identity tokens and proxied paths.
    #[arg(
        long,
        env = "PODID_IMDS_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    pub imds_endpoint: String,

    /// Entra ID authority for service-principal identities.
    #[arg(
        long,
        env = "PODID_AAD_AUTHORITY",
        default_value = "https://login.microsoftonline.com"
    )]
    pub aad_authority: String,

    /// Destination whose connections are redirected.
    #[arg(long, env = "PODID_INTERCEPT", default_value = "169.254.169.254:80")]
    pub intercept: SocketAddrV4,

    /// cgroup the redirect is attached to; every process below it is
    /// redirected. Default: kubelet's kubepods cgroup (Kubernetes mode) or
    /// the cgroup2 root (standalone mode).
    #[arg(long, env = "PODID_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Where the host's cgroup2 hierarchy is mounted. Default: the cgroup2
    /// mount found in /proc/self/mountinfo.
    #[arg(long, env = "PODID_CGROUP_MOUNT")]
    pub cgroup_mount: Option<PathBuf>,

    /// bpffs directory for podid's pins.
    #[arg(long, env = "PODID_BPFFS_DIR", default_value = DEFAULT_PIN_ROOT)]
    pub bpffs_dir: PathBuf,

    /// Standalone mode: a YAML file of AzureIdentity, AzureIdentityBinding and
    /// LocalWorkload objects. Without it the agent runs in Kubernetes mode.
    #[arg(long, env = "PODID_WORKLOADS")]
    pub workloads: Option<PathBuf>,

    /// Standalone mode: directory of service-principal secrets
    /// (`<dir>/<namespace>/<name>/…`, see the docs).
    #[arg(long, env = "PODID_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,

    /// standard (needs the controller) or managed.
    #[arg(long, env = "PODID_MODE", value_enum, default_value = "standard")]
    pub mode: Mode,

    /// Pods may only use bindings and identities of their own namespace.
    #[arg(long, env = "PODID_FORCE_NAMESPACED")]
    pub force_namespaced: bool,

    /// Answer /metadata/instance with 403 instead of forwarding it to IMDS.
    #[arg(long, env = "PODID_BLOCK_INSTANCE_METADATA")]
    pub block_instance_metadata: bool,

    /// IMDS paths forwarded for pods besides the token endpoint, each
    /// `METHOD[|METHOD…] /path/prefix` (comma-separated), or `none`. Any other
    /// path is answered 404; /metadata/identity is never forwarded.
    #[arg(
        long = "forward",
        env = "PODID_FORWARD",
        value_delimiter = ',',
        value_name = "RULE",
        default_values = DEFAULT_FORWARD_RULES
    )]
    pub forward: Vec<ForwardRule>,

    /// The cloud provider config (`/etc/kubernetes/azure.json`), read only
    /// for the node's own identity (userAssignedIdentityID), which no
    /// AzureIdentity may name unless --allow-node-identities.
    #[arg(long, env = "PODID_CLOUD_CONFIG", value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,

    /// Which AzureIdentity specs are accepted (shared with the other binary).
    #[command(flatten)]
    pub identity_rules: IdentityRuleArgs,

    /// The kernel boundary (record age, the IMDS guard).
    #[command(flatten)]
    pub boundary: BoundaryArgs,

    /// `node`: pods' IMDS connections go to --listen (network policy must
    /// allow it). `pod-netns`: to a listener of the agent inside each pod's
    /// network namespace (zero-policy mode).
    #[arg(long, env = "PODID_LISTEN_MODE", value_enum, default_value = "node")]
    pub listen_mode: ListenMode,

    /// pod-netns mode: where the container runtime keeps pods' network
    /// namespace files.
    #[arg(long, env = "PODID_POD_NETNS_DIR", default_value = "/var/run/netns")]
    pub pod_netns_dir: PathBuf,

    /// pod-netns mode: the port of the pods' listeners (on 127.64.0.0/10).
    #[arg(long, env = "PODID_POD_LISTENER_PORT", default_value_t = 2579)]
    pub pod_listener_port: u16,

    /// pod-netns mode: pod listeners at most; further pods use the node
    /// listener.
    #[arg(long, env = "PODID_MAX_POD_LISTENERS", default_value_t = 1024)]
    pub max_pod_listeners: usize,

    /// Standard mode: how long a request waits for an identity that is being
    /// assigned, before answering 503 with Retry-After.
    #[arg(long, env = "PODID_ASSIGNMENT_WAIT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub assignment_wait: Duration,

    /// How long a request from a pod the agent has not seen yet waits for it.
    #[arg(long, env = "PODID_POD_WAIT", value_parser = humantime::parse_duration, default_value = "2s")]
    pub pod_wait: Duration,

    /// Audit log file (JSON lines). Records also go to stdout, target podid::audit.
    #[arg(long, env = "PODID_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Rotate the audit log at this size.
    #[arg(long, env = "PODID_AUDIT_LOG_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub audit_log_max_bytes: u64,

    /// Rotated audit files kept.
    #[arg(long, env = "PODID_AUDIT_LOG_MAX_FILES", default_value_t = 5)]
    pub audit_log_max_files: u32,

    /// Prometheus /metrics, /healthz and /readyz.
    #[arg(long, env = "PODID_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Node taint (key) to remove from this node once the redirect is
    /// attached and the Kubernetes source has synced (Kubernetes mode).
    #[arg(long, env = "PODID_STARTUP_TAINT")]
    pub startup_taint: Option<String>,

    /// Also record denials as Kubernetes Events on the pod (rate-limited).
    #[arg(long, env = "PODID_EMIT_DENIAL_EVENTS")]
    pub emit_denial_events: bool,

    /// With --emit-denial-events: at most one Event per pod and reason per
    /// this interval.
    #[arg(long, env = "PODID_DENIAL_EVENT_INTERVAL", value_parser = humantime::parse_duration, default_value = "1m")]
    pub denial_event_interval: Duration,

    /// Connections served at once.
    #[arg(long, env = "PODID_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,

    /// Largest request head, in bytes.
    #[arg(long, env = "PODID_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Time allowed for a request head to arrive.
    #[arg(long, env = "PODID_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub header_timeout: Duration,

    /// Tokens cached at most.
    #[arg(long, env = "PODID_TOKEN_CACHE_SIZE", default_value_t = 10_000)]
    pub token_cache_size: usize,

    /// Concurrent upstream token calls at most, per upstream (IMDS and
    /// Entra ID each). IMDS allows 5 concurrent identity requests per VM and
    /// throttles beyond that.
    #[arg(long, env = "PODID_UPSTREAM_CONCURRENCY", default_value_t = 5)]
    pub upstream_concurrency: usize,

    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    #[arg(long, env = "PODID_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, env = "PODID_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The node identities the cloud config names (`userAssignedIdentityID`,
    /// the kubelet identity on AKS), if `--cloud-config` is given.
    pub fn cloud_config_node_identities(&self) -> Result<Vec<String>, String> {
        let Some(path) = &self.cloud_config else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading --cloud-config {}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("--cloud-config {} is not JSON: {e}", path.display()))?;
        Ok(json
            .get("userAssignedIdentityID")
            .and_then(serde_json::Value::as_str)
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .map(|id| vec![id.to_string()])
            .unwrap_or_default())
    }

    /// `--listen`, or `$NODE_IP:2579`.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .or_else(|| self.node_ip.map(|ip| SocketAddr::new(ip, 2579)))
            .ok_or_else(|| "set --listen (or NODE_IP from the downward API)".to_string())
    }

    /// `--node-name`, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        })
    }
}
