//! Putting the agent together: bind the endpoint, install the kernel
//! redirect, load workloads, serve until SIGTERM. The redirect stays pinned
//! when the agent exits, so pods are never sent to the real IMDS while the
//! agent restarts or upgrades.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::{info, warn};

use crate::{
    attribution::CgroupPaths,
    audit::{AuditConfig, AuditLog},
    config::{ListenMode, Mode, RunArgs},
    health::{self, Readiness},
    identity::NamespaceRule,
    metrics::{Metrics, ScrapeSource},
    pod_listeners::{self, PodListenerConfig},
    redirect::{self, PodListenerRange, Redirect, RedirectOptions, cgroup},
    server::{self, AppState, ServerSettings, admission::RecordRules, forwarding::ForwardPolicy},
    tokens::{
        FileSecretSource, SecretSource, TokenConfig, TokenService, Upstream, UpstreamObserver,
    },
    workloads::{
        WorkloadSource,
        kubernetes::{KubeSecrets, KubernetesConfig, KubernetesSource, remove_taint_until_done},
        standalone::StandaloneSource,
    },
};

/// Where kubelet puts pods, relative to the cgroup2 mount, most common first.
const KUBEPODS_CANDIDATES: [&str; 4] = [
    "kubepods.slice",
    "kubepods",
    "kubelet.slice/kubelet-kubepods.slice",
    "kubelet/kubepods",
];

/// Finds kubelet's pod cgroup under the cgroup2 mount.
pub fn find_kubepods(mount: &Path) -> Option<PathBuf> {
    KUBEPODS_CANDIDATES
        .iter()
        .map(|c| mount.join(c))
        .find(|p| p.is_dir())
}

impl UpstreamObserver for Metrics {
    fn upstream_call(&self, upstream: Upstream, status: Option<u16>, elapsed: Duration) {
        let name = match upstream {
            Upstream::Imds => "imds",
            Upstream::EntraId => "entra_id",
        };
        Metrics::upstream_call(self, name, status, elapsed);
    }
}

#[derive(Debug)]
struct Scrape {
    redirect: Arc<Redirect>,
    audit: Arc<AuditLog>,
    tokens: Arc<TokenService>,
}

impl ScrapeSource for Scrape {
    fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
        self.redirect
            .counters()
            .map(|c| c.iter().collect())
            .unwrap_or_default()
    }

    fn audit_counts(&self) -> (u64, u64) {
        (self.audit.written(), self.audit.lost())
    }

    fn cached_tokens(&self) -> usize {
        self.tokens.cached_len()
    }
}

/// Descriptors the agent needs besides its connections: maps, listeners,
/// upstream connections, the audit file.
const NOFILE_RESERVE: u64 = 256;

/// Raises the open file limit (see [`crate::limits::raise_nofile_limit`]):
/// at the limit `accept` fails, and so does the metrics listener, taking
/// `/healthz` and `/readyz` with it.
fn raise_nofile_limit(max_connections: usize) {
    let limit = match crate::limits::raise_nofile_limit() {
        Ok(limit) => limit,
        Err(error) => {
            warn!(%error, "cannot raise RLIMIT_NOFILE; connections beyond the current limit wait in the listen backlog");
            return;
        }
    };
    let needed = max_connections as u64 + NOFILE_RESERVE;
    if limit < needed {
        warn!(
            limit,
            needed,
            "the open file limit is below --max-connections; connections beyond it wait in the listen backlog"
        );
    } else {
        info!(limit, "open file limit");
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    raise_nofile_limit(args.max_connections);
    let node = args.node_name();
    let listen = args.listen_addr().map_err(anyhow::Error::msg)?;
    let mount = match &args.cgroup_mount {
        Some(mount) => mount.clone(),
        None => {
            cgroup::cgroup2_mount()
                .context("finding the cgroup2 mount")?
                .mount_point
        }
    };
    let cgroups = Arc::new(
        CgroupPaths::new(&mount)
            .with_context(|| format!("opening the cgroup2 hierarchy at {}", mount.display()))?,
    );
    let cgroup_root = match (&args.cgroup_root, &args.workloads) {
        (Some(root), _) => root.clone(),
        (None, Some(_)) => mount.clone(),
        (None, None) => find_kubepods(&mount).with_context(|| {
            format!(
                "no kubepods cgroup under {}; pass --cgroup-root",
                mount.display()
            )
        })?,
    };
    let root_relative = cgroup_root
        .strip_prefix(&mount)
        .with_context(|| {
            format!(
                "--cgroup-root {} is not below the cgroup2 mount {}",
                cgroup_root.display(),
                mount.display()
            )
        })?
        .to_path_buf();

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    readiness.set_not_ready("starting");
    let (stop, stopped) = watch::channel(false);
    let metrics_listener = health::bind(args.metrics_listen)
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    let health = tokio::spawn(health::serve(
        metrics_listener,
        metrics.clone(),
        readiness.clone(),
        stopped.clone(),
    ));

    // The previous agent's pod listeners died with it: from here on pods
    // are sent to the node listener until their own opens again.
    let stale = Redirect::clear_pinned_pod_listeners(&args.bpffs_dir)
        .context("clearing the previous agent's pod listeners")?;
    if stale > 0 {
        info!(
            pod_listeners = stale,
            "the previous agent's pod listeners are closed; pods use the node listener until theirs reopen"
        );
    }
    // Records written before this point belong to connections nobody
    // accepted (the previous agent is gone): refused.
    let record_rules = RecordRules::starting_now(args.boundary.record_max_age);
    // Bind before redirecting, so redirected connections find a listener.
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen}"))?;
    let redirect = Arc::new(
        Redirect::install(&RedirectOptions {
            cgroup_root: cgroup_root.clone(),
            pin_root: args.bpffs_dir.clone(),
            imds: args.intercept,
            agent: redirect::ipv4_socket(listen)?,
            exempt_self: true,
            exempt: Vec::new(),
            record_capacity: None,
            record_max_age: args.boundary.record_max_age,
            guard: args.boundary.guard(),
            agent_started_ns: record_rules.started_ns,
            egress_guard: args.boundary.egress_guard,
            pod_listeners: (args.listen_mode == ListenMode::PodNetns).then_some(PodListenerRange {
                net: pod_listeners::POD_LISTENER_NET,
                prefix: pod_listeners::POD_LISTENER_PREFIX,
                port: args.pod_listener_port,
            }),
        })
        .context("installing the kernel redirect")?,
    );
    if let Some(ebpf) = redirect.take_ebpf() {
        tokio::spawn(redirect::forward_kernel_logs(ebpf));
    }

    let audit = Arc::new(AuditLog::start(AuditConfig {
        path: args.audit_log.clone(),
        max_bytes: args.audit_log_max_bytes,
        max_files: args.audit_log_max_files,
    }));
    let rule = if args.force_namespaced || args.mode == Mode::Managed {
        NamespaceRule::Namespaced
    } else {
        NamespaceRule::Cluster
    };
    let identity_rules = args.identity_rules.rules(
        rule == NamespaceRule::Namespaced,
        &args.aad_authority,
        args.cloud_config_node_identities()
            .map_err(anyhow::Error::msg)?,
    );
    if !identity_rules.node_identities.is_empty() {
        info!(
            node_identities = ?identity_rules.node_identities,
            allowed = identity_rules.allow_node_identities,
            "the node's own identities"
        );
    }
    let forward = ForwardPolicy::new(args.forward.clone());
    info!(
        forward = ?forward.rules().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "IMDS paths forwarded for pods"
    );
    let token_config = TokenConfig {
        imds_endpoint: args.imds_endpoint.clone(),
        aad_authority: args.aad_authority.clone(),
        allowed_authorities: identity_rules.extra_authorities.clone(),
        max_entries: args.token_cache_size,
        upstream_concurrency: args.upstream_concurrency,
        ..TokenConfig::default()
    };
    let settings = ServerSettings {
        imds_endpoint: args.imds_endpoint.clone(),
        block_instance_metadata: args.block_instance_metadata,
        forward,
        identity_rules: identity_rules.clone(),
        assignment_wait: args.assignment_wait,
        max_connections: args.max_connections,
        max_header_bytes: args.max_header_bytes,
        header_timeout: args.header_timeout,
        ..ServerSettings::default()
    };
    if args.listen_mode == ListenMode::PodNetns
        && (args.max_pod_listeners == 0
            || args.max_pod_listeners > podid_ebpf::POD_LISTENER_CAPACITY as usize)
    {
        anyhow::bail!(
            "--max-pod-listeners must be between 1 and {} (the kernel map's size), got {}",
            podid_ebpf::POD_LISTENER_CAPACITY,
            args.max_pod_listeners
        );
    }
    let pod_listener_config =
        (args.listen_mode == ListenMode::PodNetns).then(|| PodListenerConfig {
            netns_dir: args.pod_netns_dir.clone(),
            port: args.pod_listener_port,
            max: args.max_pod_listeners,
            scan_every: Duration::from_secs(1),
        });
    let serving = Serving {
        pod_listener_config,
        record_rules,
        node: node.clone(),
        listener,
        redirect,
        cgroups,
        audit,
        metrics,
        readiness,
        settings,
        stop,
        stopped,
        health,
    };

    match &args.workloads {
        Some(workloads) => {
            let secrets: Arc<dyn SecretSource> = match &args.secrets_dir {
                Some(dir) => Arc::new(FileSecretSource::new(dir.clone())),
                // Every lookup then fails, saying that --secrets-dir is not set.
                None => Arc::new(FileSecretSource::unconfigured()),
            };
            let tokens = serving.token_service(token_config, secrets.clone())?;
            let source = Arc::new(
                StandaloneSource::load(workloads, &root_relative, rule, secrets)
                    .context("loading --workloads")?,
            );
            tokio::spawn(source.clone().watch(Duration::from_secs(2)));
            if source.is_ready() {
                serving.readiness.set_ready();
            }
            info!(
                %node,
                %listen,
                cgroup_root = %cgroup_root.display(),
                mode = ?args.mode,
                standalone = true,
                "podid-agent ready"
            );
            serving.serve(source, tokens).await
        }
        None => {
            // kube's TLS stack takes rustls's process-wide provider; more
            // than one is compiled in, so name it (an error only means one
            // is installed already).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            if args.secrets_dir.is_some() {
                warn!("--secrets-dir is for standalone mode; Kubernetes mode reads Secrets");
            }
            let secrets: Arc<dyn SecretSource> = Arc::new(KubeSecrets::new(client.clone()));
            let tokens = serving.token_service(token_config, secrets.clone())?;
            let source = Arc::new(KubernetesSource::start(
                client.clone(),
                KubernetesConfig {
                    node: node.clone(),
                    mode: args.mode,
                    rule,
                    pod_wait: args.pod_wait,
                    denial_events: args
                        .emit_denial_events
                        .then_some(args.denial_event_interval),
                },
                secrets,
                tokens.clone(),
            ));
            serving
                .readiness
                .set_not_ready("waiting for the initial list of pods and identity objects");
            // Ready (and untainted) once the redirect is attached, which it
            // is by now, and every watch has listed.
            let readiness = serving.readiness.clone();
            let synced = source.clone();
            let taint = args.startup_taint.clone();
            let taint_node = node.clone();
            tokio::spawn(async move {
                synced.wait_synced().await;
                readiness.set_ready();
                info!(node = %taint_node, "Kubernetes source synced; podid-agent ready");
                if let Some(key) = taint {
                    remove_taint_until_done(client, taint_node, key).await;
                }
            });
            info!(
                %node,
                %listen,
                cgroup_root = %cgroup_root.display(),
                mode = ?args.mode,
                force_namespaced = args.force_namespaced,
                "podid-agent started in Kubernetes mode; waiting for the initial lists"
            );
            serving.serve(source, tokens).await
        }
    }
}

/// What both modes serve with, once the source is known.
struct Serving {
    pod_listener_config: Option<PodListenerConfig>,
    record_rules: RecordRules,
    node: String,
    listener: TcpListener,
    redirect: Arc<Redirect>,
    cgroups: Arc<CgroupPaths>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    settings: ServerSettings,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    health: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// The token service, reading secrets through `secrets`.
    fn token_service(
        &self,
        config: TokenConfig,
        secrets: Arc<dyn SecretSource>,
    ) -> anyhow::Result<Arc<TokenService>> {
        let tokens = Arc::new(
            TokenService::new(config, secrets, self.metrics.clone())
                .context("configuring the token service")?,
        );
        self.metrics.set_scrape_source(Arc::new(Scrape {
            redirect: self.redirect.clone(),
            audit: self.audit.clone(),
            tokens: tokens.clone(),
        }));
        Ok(tokens)
    }

    /// Serves requests with `source` until SIGTERM or SIGINT.
    async fn serve<S: WorkloadSource>(
        self,
        source: Arc<S>,
        tokens: Arc<TokenService>,
    ) -> anyhow::Result<()> {
        let records: Arc<dyn server::PeerRecords> = self.redirect.clone();
        let metrics = self.metrics.clone();
        let state = Arc::new(AppState::new(
            self.node,
            source,
            records,
            self.cgroups,
            tokens,
            self.audit.clone(),
            self.metrics,
            self.settings,
            self.record_rules,
        )?);
        let serving = tokio::spawn(server::serve(
            self.listener,
            state.clone(),
            self.stopped.clone(),
        ));
        if let Some(config) = self.pod_listener_config {
            let stopped = self.stopped.clone();
            let serve = move |listener| {
                tokio::spawn(server::serve(listener, state.clone(), stopped.clone()))
            };
            tokio::spawn(pod_listeners::run(
                config,
                self.redirect.clone(),
                metrics,
                serve,
                self.stopped.clone(),
            ));
        }

        wait_for_signal().await;
        info!("shutting down; the kernel redirect stays pinned");
        self.readiness.set_not_ready("shutting down");
        let _ = self.stop.send(true);
        if let Err(error) = serving.await {
            warn!(%error, "server task failed");
        }
        let _ = self.health.await;
        self.audit.flush();
        Ok(())
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            warn!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
