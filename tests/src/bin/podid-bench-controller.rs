//! `podid-bench-controller`: how fast and with how many ARM calls the
//! controller takes a burst of pods to `Assigned`, against the ARM emulator
//! at a realistic latency and the in-memory Kubernetes API; how many ARM
//! writes it makes in steady state; and how long the desired-state
//! computation takes for a large cluster. Run by `cargo xtask bench
//! controller` (release build).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use podid_api::{
    AzureIdentity, AzureIdentityBinding, AzureIdentityBindingSpec, AzureIdentitySpec, POD_LABEL,
};
use podid_controller::{ControllerConfig, desired};
use podid_tests::arm::{
    EmulatorConfig,
    cluster::{TestCluster, eventually, identity_id},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Case {
    /// Both cases.
    All,
    /// Burst of pods to Assigned, then steady state.
    Burst,
    /// Desired-state computation alone.
    Desired,
}

/// Controller benchmark.
#[derive(Parser, Debug)]
#[command(name = "podid-bench-controller", version, about)]
struct Args {
    /// Which case to run.
    #[arg(long, value_enum, default_value = "all")]
    case: Case,
    /// Pods created at once.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Distinct identities (each scale set ends up carrying all of them).
    #[arg(long, default_value_t = 200)]
    identities: usize,
    /// Nodes.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Scale sets the nodes belong to.
    #[arg(long, default_value_t = 5)]
    scale_sets: usize,
    /// Latency of every ARM answer, in milliseconds.
    #[arg(long, default_value_t = 300)]
    latency_ms: u64,
    /// Duration of an identity update operation, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    lro_ms: u64,
    /// Seconds of steady state observed after the burst.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Reconcile (re-add check) interval during steady state, in seconds.
    #[arg(long, default_value_t = 4)]
    reconcile_secs: u64,
    /// Pods in the desired-state case.
    #[arg(long, default_value_t = 10_000)]
    desired_pods: usize,
    /// Identities (and bindings) in the desired-state case.
    #[arg(long, default_value_t = 1000)]
    desired_identities: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("podid-controller benchmark");
    if matches!(args.case, Case::All | Case::Desired) {
        desired_case(&args);
    }
    if matches!(args.case, Case::All | Case::Burst) {
        burst_case(&args).await?;
    }
    Ok(())
}

fn desired_case(args: &Args) {
    let identities: Vec<Arc<AzureIdentity>> = (0..args.desired_identities)
        .map(|i| {
            let mut identity = AzureIdentity::new(
                &format!("id-{i}"),
                AzureIdentitySpec {
                    identity_type: 0,
                    resource_id: identity_id(&format!("id-{i}")),
                    client_id: format!("client-{i}"),
                    ..AzureIdentitySpec::default()
                },
            );
            identity.metadata.namespace = Some(format!("ns-{}", i % 20));
            identity.metadata.resource_version = Some("1".into());
            Arc::new(identity)
        })
        .collect();
    let bindings: Vec<Arc<AzureIdentityBinding>> = (0..args.desired_identities)
        .map(|i| {
            let mut binding = AzureIdentityBinding::new(
                &format!("id-{i}-binding"),
                AzureIdentityBindingSpec {
                    azure_identity: format!("id-{i}"),
                    selector: format!("sel-{i}"),
                    weight: None,
                },
            );
            binding.metadata.namespace = Some(format!("ns-{}", i % 20));
            binding.metadata.resource_version = Some("1".into());
            Arc::new(binding)
        })
        .collect();
    let pods: Vec<Arc<Pod>> = (0..args.desired_pods)
        .map(|i| {
            let identity = i % args.desired_identities.max(1);
            let mut pod = Pod::default();
            pod.metadata.name = Some(format!("pod-{i}"));
            pod.metadata.namespace = Some(format!("ns-{}", identity % 20));
            pod.metadata.labels = Some([(POD_LABEL.to_string(), format!("sel-{identity}"))].into());
            pod.spec = Some(PodSpec {
                node_name: Some(format!("node-{}", i % 500)),
                ..PodSpec::default()
            });
            pod.status = Some(PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            });
            Arc::new(pod)
        })
        .collect();
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..7 {
        let started = Instant::now();
        let state = desired::compute(
            &pods,
            &bindings,
            &identities,
            false,
            &podid_api::validation::IdentityRules::default(),
        );
        times.push(started.elapsed());
        count = state.assignments.len();
    }
    times.sort();
    let median = times[times.len() / 2];
    println!();
    println!(
        "desired state: {} pods x {} identities -> {} assignments",
        args.desired_pods, args.desired_identities, count
    );
    println!(
        "  computation: median {:.1} ms, min {:.1} ms, max {:.1} ms (target < 100 ms: {})",
        median.as_secs_f64() * 1000.0,
        times[0].as_secs_f64() * 1000.0,
        times[times.len() - 1].as_secs_f64() * 1000.0,
        if median < Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
}

async fn burst_case(args: &Args) -> anyhow::Result<()> {
    let emulator = EmulatorConfig {
        latency: Duration::from_millis(args.latency_ms),
        lro_duration: Duration::from_millis(args.lro_ms),
        ..EmulatorConfig::default()
    };
    let cluster = TestCluster::start(emulator).await;
    let config = ControllerConfig {
        batch_window: Duration::from_millis(200),
        reconcile_interval: Duration::from_secs(args.reconcile_secs.max(1)),
        kube_write_concurrency: 50,
        ..ControllerConfig::default()
    };
    let mut arm_options = cluster.arm_options();
    arm_options.lro_poll_interval = Duration::from_millis(250);
    let running = cluster.run(cluster.controller(config, arm_options), true);

    let per_set = (args.nodes / args.scale_sets.max(1)).max(1);
    let mut sets: Vec<Vec<String>> = Vec::new();
    for s in 0..args.scale_sets.max(1) {
        sets.push(cluster.add_scale_set(&format!("pool-{s}"), per_set, false, &[]));
    }
    for i in 0..args.identities {
        cluster.add_identity(&format!("id-{i}"), &format!("client-{i}"));
    }
    if !cluster.caught_up(&running.controller).await {
        anyhow::bail!("the controller's caches never caught up");
    }
    // Let the leader's first (empty) cycle pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.arm.clear_requests();

    // Pod i goes to scale set i / (pods / sets) and uses identity i % identities,
    // so every scale set carries all identities.
    let per_set_pods = (args.pods / sets.len()).max(1);
    let started = Instant::now();
    for i in 0..args.pods {
        let set = &sets[(i / per_set_pods).min(sets.len() - 1)];
        let node = &set[i % set.len()];
        cluster.add_pod(
            &format!("pod-{i}"),
            node,
            &format!("id-{}", i % args.identities.max(1)),
        );
    }
    let created = started.elapsed();
    let done = eventually(Duration::from_secs(600), || async {
        cluster.assigned_count() == args.pods
    })
    .await;
    let elapsed = started.elapsed();
    if !done {
        anyhow::bail!(
            "only {} of {} assignments reached Assigned",
            cluster.assigned_count(),
            args.pods
        );
    }
    let requests = cluster.arm.requests();
    let gets = requests
        .iter()
        .filter(|r| r.method == "GET" && r.is_resource())
        .count();
    let patches = requests.iter().filter(|r| r.method == "PATCH").count();
    let polls = requests
        .iter()
        .filter(|r| r.method == "GET" && !r.is_resource())
        .count();
    let max_per_set = (0..sets.len())
        .map(|s| cluster.arm.patches_of(&format!("pool-{s}")))
        .max()
        .unwrap_or(0);
    let cycles = running
        .controller
        .history()
        .iter()
        .filter(|r| r.created > 0 || r.assigned > 0)
        .count();
    println!();
    println!(
        "burst: {} pods x {} identities x {} nodes on {} scale sets, ARM latency {} ms, operations {} ms",
        args.pods,
        args.identities,
        args.nodes,
        sets.len(),
        args.latency_ms,
        args.lro_ms
    );
    println!("  pods created in {:.2} s", created.as_secs_f64());
    println!(
        "  all Assigned after {:.2} s ({} cycles with work)",
        elapsed.as_secs_f64(),
        cycles
    );
    println!(
        "  ARM calls: {} GET, {} PATCH, {} operation polls; max PATCH per scale set {} (target <= 2: {})",
        gets,
        patches,
        polls,
        max_per_set,
        if max_per_set <= 2 { "met" } else { "MISSED" }
    );

    // Steady state.
    cluster.arm.clear_requests();
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let requests = cluster.arm.requests();
    let writes = requests.iter().filter(|r| r.method == "PATCH").count();
    let reads = requests.iter().filter(|r| r.method == "GET").count();
    let per_day_reads = (sets.len() as f64) * 86_400.0 / 180.0;
    println!(
        "  steady state over {} s (reconcile every {} s): {} ARM writes (target 0: {}), {} reads",
        args.steady_secs,
        args.reconcile_secs,
        writes,
        if writes == 0 { "met" } else { "MISSED" },
        reads
    );
    println!(
        "  at the default 3 min reconcile: {:.0} ARM reads/day for {} scale sets, 0 writes (MIC users saw 62,230 calls/day, #988)",
        per_day_reads,
        sets.len()
    );
    running.stop().await;
    Ok(())
}
