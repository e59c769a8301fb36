//! Configuration: command-line flags (each also a `PODID_…` environment
//! variable), the cloud config file MIC reads (`/etc/kubernetes/azure.json`),
//! and the plain settings the controller runs with.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use clap::{ArgAction, Parser, ValueEnum};
use podid_api::validation::{IdentityRuleArgs, IdentityRules};
use serde::Deserialize;
use url::Url;

use crate::{Error, leader::LeaseConfig};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `podid-controller`: assigns the user-assigned identities pods need to
/// their nodes' VMs and VM scale sets, and records the state in
/// AzureAssignedIdentity objects (the role of aad-pod-identity's MIC).
#[derive(Parser, Debug, Clone)]
#[command(name = "podid-controller", version, about, long_about = None)]
pub struct Args {
    /// Cloud provider config, as MIC reads it (`/etc/kubernetes/azure.json`:
    /// cloud, tenantId, aadClientId, aadClientSecret, subscriptionId,
    /// resourceGroup, vmType, useManagedIdentityExtension,
    /// userAssignedIdentityID). Without it, MIC's environment variables are
    /// used: CLOUD, TENANT_ID, CLIENT_ID, CLIENT_SECRET, SUBSCRIPTION_ID,
    /// RESOURCE_GROUP, VM_TYPE, USE_MSI, USER_ASSIGNED_MSI_CLIENT_ID.
    #[arg(long, env = "PODID_CLOUD_CONFIG", value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,

    /// Azure Resource Manager endpoint [default: the cloud's, e.g.
    /// https://management.azure.com]. May point at an emulator.
    #[arg(long, env = "PODID_ARM_ENDPOINT", value_name = "URL")]
    pub arm_endpoint: Option<Url>,

    /// Entra ID authority for a service principal [default: the cloud's,
    /// e.g. https://login.microsoftonline.com]. May point at an emulator.
    #[arg(long, env = "PODID_AAD_AUTHORITY", value_name = "URL")]
    pub aad_authority: Option<Url>,

    /// Instance Metadata Service, for the cluster's managed identity
    /// (useManagedIdentityExtension).
    #[arg(
        long,
        env = "PODID_IMDS_ENDPOINT",
        value_name = "URL",
        default_value = "http://169.254.169.254"
    )]
    pub imds_endpoint: Url,

    /// Client IDs of user-assigned identities never removed from a VM or
    /// scale set (comma-separated). The cluster's own identity
    /// (userAssignedIdentityID) is always added.
    #[arg(
        long,
        env = "PODID_IMMUTABLE_USER_MSIS",
        value_name = "CLIENT_IDS",
        value_delimiter = ','
    )]
    pub immutable_user_msis: Vec<String>,

    /// Only bind identities to pods in the identity's own namespace (also
    /// per identity with the annotation `aadpodidentity.k8s.io/Behavior:
    /// namespaced`).
    #[arg(long, env = "PODID_FORCE_NAMESPACED")]
    pub force_namespaced: bool,

    /// Which AzureIdentity specs are accepted (shared with the other binary).
    #[command(flatten)]
    pub identity_rules: IdentityRuleArgs,

    /// Elect a leader through a coordination.k8s.io Lease; only the leader
    /// acts and reports ready. `--leader-elect=false` for a single replica.
    #[arg(long, env = "PODID_LEADER_ELECT", default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub leader_elect: bool,

    /// Name of the Lease.
    #[arg(
        long,
        env = "PODID_LEADER_ELECTION_NAME",
        default_value = "podid-controller"
    )]
    pub leader_election_name: String,

    /// Namespace of the Lease (the controller's own namespace).
    #[arg(
        long,
        env = "PODID_LEADER_ELECTION_NAMESPACE",
        default_value = "default"
    )]
    pub leader_election_namespace: String,

    /// This replica's identity in the Lease [default: $POD_NAME, else
    /// $HOSTNAME]; the chart sets it from the pod name.
    #[arg(long, env = "PODID_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,

    /// How long a lease is valid without renewal; a standby takes over after it.
    #[arg(long, env = "PODID_LEADER_ELECTION_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_election_duration: Duration,

    /// The leader steps down when it could not renew for this long.
    #[arg(long, env = "PODID_LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// How often the lease is renewed or tried.
    #[arg(long, env = "PODID_LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Where Prometheus `/metrics`, `/healthz` and `/readyz` (ready only
    /// while leader) are served.
    #[arg(
        long,
        env = "PODID_METRICS_LISTEN",
        default_value = "0.0.0.0:8888",
        value_name = "IP:PORT"
    )]
    pub metrics_listen: SocketAddr,

    /// A full cycle runs at least this often, even without events.
    #[arg(long, env = "PODID_SYNC_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// How often the identities recorded as Assigned are checked on their
    /// VMs / scale sets and re-added if removed out of band (reads only,
    /// writes only when something is missing).
    #[arg(long, env = "PODID_RECONCILE_INTERVAL", default_value = "3m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Events are gathered for this long before a cycle starts, so a burst
    /// of pods costs one PATCH per VM / scale set.
    #[arg(long, env = "PODID_BATCH_WINDOW", default_value = "200ms", value_parser = parse_duration)]
    pub batch_window: Duration,

    /// Poll interval of ARM long-running operations when ARM gives no
    /// Retry-After.
    #[arg(long, env = "PODID_LRO_POLL_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub lro_poll_interval: Duration,

    /// Kubernetes writes (AzureAssignedIdentity create/patch/delete) in flight.
    #[arg(long, env = "PODID_KUBE_WRITE_CONCURRENCY", default_value_t = 20)]
    pub kube_write_concurrency: usize,

    /// Log format.
    #[arg(long, env = "PODID_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "PODID_LOG_FILTER", default_value = "info")]
    pub log_filter: String,
}

/// Parses `250ms`, `15s`, `3m`, `1h` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 200ms, 15s, 3m, 1h)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `/etc/kubernetes/azure.json`, the fields MIC reads.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CloudConfig {
    /// `AzurePublicCloud`, `AzureChinaCloud`, `AzureUSGovernmentCloud`, …
    #[serde(default)]
    pub cloud: String,
    /// Tenant of the service principal.
    #[serde(default)]
    pub tenant_id: String,
    /// Service principal client ID.
    #[serde(default)]
    pub aad_client_id: String,
    /// Service principal secret.
    #[serde(default)]
    pub aad_client_secret: String,
    /// Subscription of the cluster.
    #[serde(default)]
    pub subscription_id: String,
    /// Node resource group.
    #[serde(default)]
    pub resource_group: String,
    /// `vmss` or `standard`; parsed but unused (the node's providerID decides).
    #[serde(default)]
    pub vm_type: String,
    /// Authenticate with the node's managed identity through IMDS.
    #[serde(default)]
    pub use_managed_identity_extension: bool,
    /// Client ID of the cluster's user-assigned identity (also never removed).
    #[serde(default, rename = "userAssignedIdentityID")]
    pub user_assigned_identity_id: String,
}

impl std::fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudConfig")
            .field("cloud", &self.cloud)
            .field("tenant_id", &self.tenant_id)
            .field("aad_client_id", &self.aad_client_id)
            .field("aad_client_secret", &"<redacted>")
            .field("subscription_id", &self.subscription_id)
            .field("resource_group", &self.resource_group)
            .field("vm_type", &self.vm_type)
            .field(
                "use_managed_identity_extension",
                &self.use_managed_identity_extension,
            )
            .field("user_assigned_identity_id", &self.user_assigned_identity_id)
            .finish()
    }
}

/// Reads environment variables; a trait so tests pass a map.
pub trait Environment {
    /// The variable's value, if set.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Environment for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

impl CloudConfig {
    /// Parses the JSON file's contents.
    pub fn parse(text: &str, path: &str) -> Result<Self, Error> {
        serde_json::from_str(text).map_err(|e| Error::CloudConfig {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads the file, or MIC's environment variables without one.
    pub fn load(path: Option<&std::path::Path>, env: &dyn Environment) -> Result<Self, Error> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::CloudConfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                Self::parse(&text, &path.display().to_string())
            }
            None => Ok(Self::from_env(env)),
        }
    }

    /// MIC's environment variables (chart `adminsecret`).
    pub fn from_env(env: &dyn Environment) -> Self {
        let get = |k: &str| env.var(k).unwrap_or_default();
        CloudConfig {
            cloud: get("CLOUD"),
            tenant_id: get("TENANT_ID"),
            aad_client_id: get("CLIENT_ID"),
            aad_client_secret: get("CLIENT_SECRET"),
            subscription_id: get("SUBSCRIPTION_ID"),
            resource_group: get("RESOURCE_GROUP"),
            vm_type: get("VM_TYPE"),
            use_managed_identity_extension: get("USE_MSI").eq_ignore_ascii_case("true"),
            user_assigned_identity_id: get("USER_ASSIGNED_MSI_CLIENT_ID"),
        }
    }

    /// Checks that the credentials it names are complete.
    pub fn validate(&self, path: &str) -> Result<(), Error> {
        if !self.use_managed_identity_extension
            && (self.tenant_id.is_empty()
                || self.aad_client_id.is_empty()
                || self.aad_client_secret.is_empty())
        {
            return Err(Error::CloudConfig {
                path: path.to_string(),
                message: "a service principal needs tenantId, aadClientId and aadClientSecret (or set useManagedIdentityExtension)".into(),
            });
        }
        Ok(())
    }
}

/// ARM and Entra ID endpoints of a named cloud (public cloud by default).
pub fn cloud_endpoints(cloud: &str) -> (&'static str, &'static str) {
    match cloud.to_ascii_lowercase().as_str() {
        "azurechinacloud" => (
            "https://management.chinacloudapi.cn",
            "https://login.chinacloudapi.cn",
        ),
        "azureusgovernmentcloud" => (
            "https://management.usgovcloudapi.net",
            "https://login.microsoftonline.us",
        ),
        "azuregermancloud" => (
            "https://management.microsoftazure.de",
            "https://login.microsoftonline.de",
        ),
        _ => (
            "https://management.azure.com",
            "https://login.microsoftonline.com",
        ),
    }
}

/// Settings of the control loop (plain data).
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespaced mode for every identity.
    pub force_namespaced: bool,
    /// Which AzureIdentity specs may be assigned (the agent's rules).
    pub identity_rules: IdentityRules,
    /// Lower-cased client IDs never removed (immutable + cluster identity).
    pub protected_client_ids: HashSet<String>,
    /// Full cycle at least this often.
    pub sync_interval: Duration,
    /// Re-add check of Assigned identities this often.
    pub reconcile_interval: Duration,
    /// Events gathered this long before a cycle.
    pub batch_window: Duration,
    /// First retry of a cycle that left work undone; doubles up to
    /// `max_retry_backoff`.
    pub retry_backoff: Duration,
    /// Upper bound of the retry backoff.
    pub max_retry_backoff: Duration,
    /// First backoff of an identity ARM rejected; doubles up to 16×.
    pub invalid_identity_backoff: Duration,
    /// Kubernetes writes in flight.
    pub kube_write_concurrency: usize,
    /// VMs / scale sets worked on at once.
    pub target_concurrency: usize,
    /// The name events are reported under, and this replica's instance.
    pub reporter: String,
    /// This replica's identity (events' reporting instance).
    pub instance: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            force_namespaced: false,
            identity_rules: IdentityRules::default(),
            protected_client_ids: HashSet::new(),
            sync_interval: Duration::from_secs(3600),
            reconcile_interval: Duration::from_secs(180),
            batch_window: Duration::from_millis(200),
            retry_backoff: Duration::from_secs(2),
            max_retry_backoff: Duration::from_secs(120),
            invalid_identity_backoff: Duration::from_secs(30),
            kube_write_concurrency: 20,
            target_concurrency: 16,
            reporter: "podid-controller".into(),
            instance: "podid-controller".into(),
        }
    }
}

impl Args {
    /// This replica's identity for the lease and events.
    pub fn identity(&self, env: &dyn Environment) -> String {
        self.leader_election_identity
            .clone()
            .or_else(|| env.var("POD_NAME"))
            .or_else(|| env.var("HOSTNAME"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "podid-controller".into())
    }

    /// The control-loop settings, given the cloud config.
    pub fn controller_config(
        &self,
        cloud: &CloudConfig,
        env: &dyn Environment,
    ) -> ControllerConfig {
        let mut protected: HashSet<String> = self
            .immutable_user_msis
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        if !cloud.user_assigned_identity_id.is_empty() {
            protected.insert(cloud.user_assigned_identity_id.to_ascii_lowercase());
        }
        let identity_rules = self.identity_rules.rules(
            self.force_namespaced,
            self.aad_authority.as_ref().map_or("", Url::as_str),
            [cloud.user_assigned_identity_id.clone()],
        );
        ControllerConfig {
            force_namespaced: self.force_namespaced,
            identity_rules,
            protected_client_ids: protected,
            sync_interval: self.sync_interval,
            reconcile_interval: self.reconcile_interval,
            batch_window: self.batch_window,
            kube_write_concurrency: self.kube_write_concurrency.max(1),
            instance: self.identity(env),
            ..ControllerConfig::default()
        }
    }

    /// The Lease settings.
    pub fn lease_config(&self, env: &dyn Environment) -> LeaseConfig {
        LeaseConfig {
            name: self.leader_election_name.clone(),
            namespace: self.leader_election_namespace.clone(),
            identity: self.identity(env),
            lease_duration: self.leader_election_duration,
            renew_deadline: self.leader_election_renew_deadline,
            retry_period: self.leader_election_retry_period,
        }
    }

    /// The ARM endpoint and authority to use.
    pub fn endpoints(&self, cloud: &CloudConfig) -> Result<(Url, Url), Error> {
        let (arm, authority) = cloud_endpoints(&cloud.cloud);
        let parse = |s: &str| {
            Url::parse(s).map_err(|e| Error::CloudConfig {
                path: "endpoints".into(),
                message: e.to_string(),
            })
        };
        Ok((
            self.arm_endpoint.clone().map_or_else(|| parse(arm), Ok)?,
            self.aad_authority
                .clone()
                .map_or_else(|| parse(authority), Ok)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("15s").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn azure_json_fields_as_mic() {
        let cfg = CloudConfig::parse(
            r#"{"cloud":"AzurePublicCloud","tenantId":"t","aadClientId":"c","aadClientSecret":"s",
                "subscriptionId":"sub","resourceGroup":"rg","vmType":"vmss",
                "useManagedIdentityExtension":true,"userAssignedIdentityID":"KUBELET-ID",
                "securityGroupName":"ignored"}"#,
            "azure.json",
        )
        .unwrap();
        assert!(cfg.use_managed_identity_extension);
        assert_eq!(cfg.user_assigned_identity_id, "KUBELET-ID");
        assert_eq!(cfg.subscription_id, "sub");
        assert!(
            !format!("{cfg:?}").contains("\"s\""),
            "secret must not be printed"
        );
        assert!(CloudConfig::parse("{", "x").is_err());
    }

    #[test]
    fn env_fallback_and_validation() {
        let env: HashMap<String, String> = [
            ("TENANT_ID", "t"),
            ("CLIENT_ID", "c"),
            ("USE_MSI", "false"),
            ("SUBSCRIPTION_ID", "sub"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cfg = CloudConfig::load(None, &env).unwrap();
        assert_eq!(cfg.aad_client_id, "c");
        assert!(cfg.validate("env").is_err(), "no secret");
    }

    #[test]
    fn flags_parse_and_protect_the_cluster_identity() {
        let args = Args::try_parse_from([
            "podid-controller",
            "--immutable-user-msis",
            "AAA,bbb",
            "--leader-elect=false",
            "--arm-endpoint",
            "http://127.0.0.1:9999",
        ])
        .unwrap();
        assert!(!args.leader_elect);
        let cloud = CloudConfig {
            user_assigned_identity_id: "Cluster".into(),
            ..Default::default()
        };
        let env: HashMap<String, String> = [("POD_NAME".to_string(), "ctl-0".to_string())].into();
        let cfg = args.controller_config(&cloud, &env);
        let want: HashSet<String> = ["aaa", "bbb", "cluster"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(cfg.protected_client_ids, want);
        assert_eq!(cfg.instance, "ctl-0");
        let (arm, authority) = args.endpoints(&cloud).unwrap();
        assert_eq!(arm.as_str(), "http://127.0.0.1:9999/");
        assert_eq!(authority.as_str(), "https://login.microsoftonline.com/");
        assert_eq!(args.sync_interval, Duration::from_secs(3600));
    }
}
