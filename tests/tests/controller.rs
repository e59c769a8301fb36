//! The controller against the ARM emulator and the in-memory Kubernetes API
//! (a real `kube::Client` over `tower_test::mock::pair()`, real reflectors):
//! the cases of aad-pod-identity's e2e suite that apply to MIC.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event};
use podid_api::{ASSIGNED_IDENTITY_FINALIZER, AzureAssignedIdentity, NODENAME_LABEL};
use podid_controller::{Controller, ControllerConfig, CycleReport, CycleTrigger, LeaseConfig};
use podid_tests::arm::{
    EmulatorConfig, Fault,
    apiserver::ResourceType,
    cluster::{NAMESPACE, Running, TestCluster, eventually, identity_id},
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn config() -> ControllerConfig {
    ControllerConfig {
        batch_window: Duration::from_millis(100),
        retry_backoff: Duration::from_millis(200),
        max_retry_backoff: Duration::from_secs(1),
        ..ControllerConfig::default()
    }
}

/// A cluster and one controller whose caches watch it but which only runs
/// the cycles the test asks for.
async fn setup(config: ControllerConfig) -> (TestCluster, Running) {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let controller = cluster.controller(config, cluster.arm_options());
    let running = cluster.run(controller, false);
    (cluster, running)
}

async fn cycle(
    cluster: &TestCluster,
    controller: &Controller,
    trigger: CycleTrigger,
) -> CycleReport {
    assert!(
        cluster.caught_up(controller).await,
        "caches never caught up with the API server"
    );
    let report = controller
        .run_cycle(trigger)
        .await
        .unwrap_or_else(|e| panic!("cycle failed: {e}"));
    // Let the watch deliver this cycle's own writes before the next step.
    assert!(
        cluster.caught_up(controller).await,
        "caches never caught up after the cycle"
    );
    report
}

fn status_of(a: &AzureAssignedIdentity) -> &str {
    a.status
        .as_ref()
        .map(|s| s.status.as_str())
        .unwrap_or_default()
}

fn lower(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// The JSON body of every PATCH sent to `name`, as bytes on the wire.
fn patch_bodies(cluster: &TestCluster, name: &str) -> Vec<Value> {
    cluster
        .arm
        .requests()
        .iter()
        .filter(|r| r.is_patch_of(name))
        .map(|r| {
            serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("PATCH body is not JSON: {e}"))
        })
        .collect()
}

/// Case 1: a single identity is assigned and its AzureAssignedIdentity goes
/// Assigned; deleting the pod removes the identity unless another pod on
/// the same VM or scale set uses it.
#[tokio::test]
async fn single_identity_is_assigned_and_removed_only_when_unused() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("pool", 2, false, &[]);
    let vm = cluster.add_vm("vm-0", false, &[]);
    let id = cluster.add_identity("web", "client-web");

    cluster.add_pod("p1", &nodes[0], "web");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.created, 1);
    assert_eq!(report.assigned, 1);
    let aai = cluster.assignment("p1", "web").expect("assignment created");
    assert_eq!(status_of(&aai), "Assigned");
    assert_eq!(aai.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(
        aai.metadata.labels.as_ref().unwrap()[NODENAME_LABEL],
        nodes[0]
    );
    assert_eq!(
        aai.metadata.finalizers.as_deref(),
        Some(&[ASSIGNED_IDENTITY_FINALIZER.to_string()][..])
    );
    assert_eq!(
        (
            aai.spec.pod.as_str(),
            aai.spec.pod_namespace.as_str(),
            aai.spec.nodename.as_str()
        ),
        ("p1", NAMESPACE, nodes[0].as_str())
    );
    assert_eq!(
        aai.spec
            .azure_identity_ref
            .as_ref()
            .unwrap()
            .spec
            .resource_id,
        id
    );
    assert_eq!(
        aai.spec
            .azure_binding_ref
            .as_ref()
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("web-binding")
    );
    assert_eq!(aai.status.as_ref().unwrap().available_replicas, 1);
    assert!(cluster.scale_set_identities("pool").contains(&lower(&id)));

    // Another pod on the same scale set and one on a VM.
    cluster.add_pod("p2", &nodes[1], "web");
    cluster.add_pod("p3", &vm, "web");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 2);
    assert_eq!(
        cluster.arm.patches_of("pool"),
        1,
        "the scale set already had it"
    );
    assert!(cluster.vm_identities("vm-0").contains(&lower(&id)));

    // p1 goes: p2 on the same scale set still uses the identity.
    cluster.delete_pod("p1");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.released, 1);
    assert_eq!(report.patches(), 0);
    assert!(
        cluster.assignment("p1", "web").is_none(),
        "assignment deleted"
    );
    assert!(cluster.scale_set_identities("pool").contains(&lower(&id)));

    // p2 goes: nobody on the scale set uses it any more.
    cluster.delete_pod("p2");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.released, 1);
    assert!(!cluster.scale_set_identities("pool").contains(&lower(&id)));
    assert!(
        cluster.vm_identities("vm-0").contains(&lower(&id)),
        "the VM keeps it for p3"
    );
    assert_eq!(cluster.assignments().len(), 1);
    running.stop().await;
}

/// Case 2: a pre-existing user-assigned identity, the system-assigned
/// identity, an immutable identity and the cluster identity are never
/// touched.
#[tokio::test]
async fn foreign_system_immutable_and_cluster_identities_are_never_removed() {
    let mut cfg = config();
    cfg.protected_client_ids = ["immutable-client", "cluster-client"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (cluster, running) = setup(cfg).await;
    let ctl = &running.controller;
    let foreign = identity_id("kubelet-preexisting");
    let nodes = cluster.add_scale_set("pool", 1, true, std::slice::from_ref(&foreign));
    let vm = cluster.add_vm("vm-0", true, std::slice::from_ref(&foreign));
    let plain = cluster.add_identity("plain", "plain-client");
    let immutable = cluster.add_identity("immutable", "IMMUTABLE-CLIENT");
    let cluster_id = cluster.add_identity("cluster", "cluster-client");
    for (pod, selector) in [("a", "plain"), ("b", "immutable"), ("c", "cluster")] {
        cluster.add_pod(&format!("{pod}-ss"), &nodes[0], selector);
        cluster.add_pod(&format!("{pod}-vm"), &vm, selector);
    }
    cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(cluster.assigned_count(), 6);
    for pod in ["a-ss", "a-vm", "b-ss", "b-vm", "c-ss", "c-vm"] {
        cluster.delete_pod(pod);
    }
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.released, 6);
    assert!(cluster.assignments().is_empty());
    let want: BTreeSet<String> = [&foreign, &immutable, &cluster_id]
        .iter()
        .map(|s| lower(s))
        .collect();
    assert_eq!(cluster.scale_set_identities("pool"), want);
    assert_eq!(cluster.vm_identities("vm-0"), want);
    assert!(
        !cluster
            .scale_set_identities("pool")
            .contains(&lower(&plain))
    );
    assert_eq!(
        cluster.arm.system_assigned(
            podid_tests::arm::ResourceKind::ScaleSet,
            podid_tests::arm::cluster::SUBSCRIPTION,
            podid_tests::arm::cluster::NODE_RESOURCE_GROUP,
            "pool"
        ),
        Some(true)
    );
    // No request ever named the protected ones for removal, and the type
    // always kept the system-assigned identity.
    for body in patch_bodies(&cluster, "pool")
        .iter()
        .chain(patch_bodies(&cluster, "vm-0").iter())
    {
        assert_eq!(
            body["identity"]["type"], "SystemAssigned, UserAssigned",
            "{body}"
        );
        let map = body["identity"]["userAssignedIdentities"]
            .as_object()
            .expect("map present");
        for (key, value) in map {
            if value.is_null() {
                assert_eq!(
                    lower(key),
                    lower(&plain),
                    "only the plain identity is ever removed: {body}"
                );
            }
        }
    }
    running.stop().await;
}

/// Case 3: an identity removed out of band is re-added by the periodic
/// reconcile (event cycles do not read ARM at all in steady state).
#[tokio::test]
async fn identity_removed_out_of_band_is_readded_by_reconcile() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("pool", 1, false, &[]);
    let id = cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &nodes[0], "web");
    cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert!(cluster.scale_set_identities("pool").contains(&lower(&id)));

    // Steady state: no ARM call at all.
    cluster.arm.clear_requests();
    let report = cycle(&cluster, ctl, CycleTrigger::Sync).await;
    assert_eq!((report.gets(), report.patches()), (0, 0));
    assert!(cluster.arm.requests().is_empty());
    // Reconcile with nothing missing: reads only.
    let report = cycle(&cluster, ctl, CycleTrigger::Reconcile).await;
    assert_eq!((report.gets(), report.patches()), (1, 0));

    assert!(cluster.arm.remove_out_of_band(
        podid_tests::arm::ResourceKind::ScaleSet,
        podid_tests::arm::cluster::SUBSCRIPTION,
        podid_tests::arm::cluster::NODE_RESOURCE_GROUP,
        "pool",
        &id
    ));
    let report = cycle(&cluster, ctl, CycleTrigger::Reconcile).await;
    assert_eq!(report.patches(), 1);
    assert_eq!(report.targets.values().map(|t| t.readded).sum::<usize>(), 1);
    assert!(cluster.scale_set_identities("pool").contains(&lower(&id)));
    assert_eq!(
        status_of(&cluster.assignment("p1", "web").unwrap()),
        "Assigned"
    );
    running.stop().await;
}

/// Case 3, through the loop: the reconcile timer does it by itself.
#[tokio::test]
async fn periodic_reconcile_timer_readds_removed_identity() {
    let mut cfg = config();
    cfg.reconcile_interval = Duration::from_millis(300);
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let running = cluster.run(cluster.controller(cfg, cluster.arm_options()), true);
    let nodes = cluster.add_scale_set("pool", 1, false, &[]);
    let id = cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &nodes[0], "web");
    assert!(eventually(WAIT, || async { cluster.assigned_count() == 1 }).await);
    cluster.arm.remove_out_of_band(
        podid_tests::arm::ResourceKind::ScaleSet,
        podid_tests::arm::cluster::SUBSCRIPTION,
        podid_tests::arm::cluster::NODE_RESOURCE_GROUP,
        "pool",
        &id,
    );
    assert!(!cluster.scale_set_identities("pool").contains(&lower(&id)));
    assert!(
        eventually(WAIT, || async {
            cluster.scale_set_identities("pool").contains(&lower(&id))
        })
        .await,
        "the reconcile timer never re-added the identity"
    );
    running.stop().await;
}

/// Case 4: a batch with an invalid identity still assigns the valid ones;
/// the invalid one never unassigns existing ones and is backed off instead
/// of being retried every cycle (MIC #1139).
#[tokio::test]
async fn invalid_identity_does_not_block_valid_ones_or_unassign_existing() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("pool", 2, false, &[]);
    let existing = cluster.add_identity("existing", "c0");
    cluster.add_pod("p0", &nodes[0], "existing");
    cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(cluster.assigned_count(), 1);

    let bad = cluster.add_identity("missing", "c-bad");
    cluster.arm.mark_invalid(&bad);
    let good = cluster.add_identity("good", "c1");
    let other = cluster.add_identity("other", "c2");
    // p1 uses both the missing and the good identity (two bindings, one selector).
    cluster.add_binding("good-for-p1", "good", "missing");
    cluster.add_pod("p1", &nodes[0], "missing");
    cluster.add_pod("p2", &nodes[1], "other");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    let pool = report
        .targets
        .values()
        .next()
        .expect("the scale set was worked on");
    assert_eq!(pool.rejected, 1);
    assert_eq!(
        pool.patches, 2,
        "one rejected PATCH, one without the invalid identity"
    );
    let on_pool = cluster.scale_set_identities("pool");
    assert!(
        on_pool.contains(&lower(&good))
            && on_pool.contains(&lower(&other))
            && on_pool.contains(&lower(&existing))
    );
    assert!(!on_pool.contains(&lower(&bad)));
    assert_eq!(
        status_of(&cluster.assignment("p1", "good").unwrap()),
        "Assigned"
    );
    assert_eq!(
        status_of(&cluster.assignment("p2", "other").unwrap()),
        "Assigned"
    );
    assert_eq!(
        status_of(&cluster.assignment("p0", "existing").unwrap()),
        "Assigned"
    );
    assert_eq!(
        status_of(&cluster.assignment("p1", "missing").unwrap()),
        "Created"
    );
    assert_eq!(report.failed, 1);

    // Warning events on the binding and the pod.
    assert!(
        eventually(WAIT, || async {
            let events = cluster.api.list::<Event>();
            let reasons: BTreeSet<_> = events.iter().filter_map(|e| e.reason.clone()).collect();
            reasons.contains("BindingApplyError") && reasons.contains("IdentityAssignmentFailed")
        })
        .await,
        "no assignment-failure events"
    );

    // The invalid identity is in backoff: the next cycle leaves ARM alone.
    cluster.arm.clear_requests();
    let report = cycle(&cluster, ctl, CycleTrigger::Retry).await;
    assert_eq!(report.patches(), 0);
    assert!(
        cluster.arm.requests().is_empty(),
        "{:?}",
        cluster.arm.requests()
    );
    running.stop().await;
}

/// Case 5: 40 pods created at once on 2 scale sets all reach Assigned with
/// at most one PATCH per scale set per cycle, the loop batching the events.
#[tokio::test]
async fn burst_of_40_pods_costs_at_most_one_patch_per_scale_set_per_cycle() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let mut cfg = config();
    cfg.batch_window = Duration::from_millis(300);
    let running = cluster.run(cluster.controller(cfg, cluster.arm_options()), true);
    let a = cluster.add_scale_set("pool-a", 3, false, &[]);
    let b = cluster.add_scale_set("pool-b", 3, false, &[]);
    let nodes: Vec<String> = a.iter().chain(b.iter()).cloned().collect();
    for i in 0..40 {
        cluster.add_identity(&format!("id-{i}"), &format!("client-{i}"));
    }
    assert!(cluster.caught_up(&running.controller).await);
    for i in 0..40 {
        cluster.add_pod(
            &format!("pod-{i}"),
            &nodes[i % nodes.len()],
            &format!("id-{i}"),
        );
    }
    assert!(
        eventually(WAIT, || async { cluster.assigned_count() == 40 }).await,
        "only {} of 40 assigned",
        cluster.assigned_count()
    );
    let history = running.controller.history();
    let summary: Vec<_> = history
        .iter()
        .map(|r| (r.trigger, r.created, r.assigned, r.patches()))
        .collect();
    for report in &history {
        for (target, t) in &report.targets {
            assert!(
                t.patches <= 1,
                "{target}: {} PATCHes in one cycle",
                t.patches
            );
        }
    }
    let cycles_patching = |name: &str| {
        history
            .iter()
            .filter(|r| {
                r.targets
                    .iter()
                    .any(|(t, r)| t.ends_with(&format!("/{name}")) && r.patches > 0)
            })
            .count()
    };
    assert_eq!(cluster.arm.patches_of("pool-a"), cycles_patching("pool-a"));
    assert_eq!(cluster.arm.patches_of("pool-b"), cycles_patching("pool-b"));
    // The burst is batched: one cycle (two if it straddles a cycle boundary).
    for pool in ["pool-a", "pool-b"] {
        let patches = cluster.arm.patches_of(pool);
        assert!(
            (1..=2).contains(&patches),
            "{pool}: {patches} PATCHes for the burst; cycles {summary:?}"
        );
    }
    assert_eq!(
        cluster.scale_set_identities("pool-a").len() + cluster.scale_set_identities("pool-b").len(),
        40
    );
    running.stop().await;
}

/// Case 5: 200 identities on one target are split into two PATCHes of at
/// most 150 (ARM rejects more).
#[tokio::test]
async fn two_hundred_identities_on_one_scale_set_take_two_patches() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("big", 4, false, &[]);
    for i in 0..200 {
        cluster.add_identity(&format!("id-{i}"), &format!("client-{i}"));
        cluster.add_pod(&format!("pod-{i}"), &nodes[i % 4], &format!("id-{i}"));
    }
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 200);
    assert_eq!(report.patches(), 2);
    let sizes: Vec<usize> = patch_bodies(&cluster, "big")
        .iter()
        .map(|b| {
            b["identity"]["userAssignedIdentities"]
                .as_object()
                .map_or(0, |m| m.len())
        })
        .collect();
    assert_eq!(sizes, [150, 50]);
    assert_eq!(cluster.scale_set_identities("big").len(), 200);
    running.stop().await;
}

/// Case 6: a 429 with Retry-After delays the next call of that client by at
/// least that long, and everything converges; 5xx answers are retried a
/// bounded number of times.
#[tokio::test]
async fn throttled_client_waits_for_retry_after_and_converges() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("pool", 1, false, &[]);
    let id = cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &nodes[0], "web");
    cluster.arm.inject(Fault {
        method: Some("PATCH".into()),
        path_contains: Some("virtualMachineScaleSets".into()),
        count: 1,
        status: 429,
        retry_after: Some(1),
    });
    cluster.arm.inject(Fault {
        method: Some("GET".into()),
        path_contains: Some("virtualMachineScaleSets".into()),
        count: 2,
        status: 503,
        retry_after: None,
    });
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 1, "{report:?}");
    assert!(cluster.scale_set_identities("pool").contains(&lower(&id)));
    let requests = cluster.arm.requests();
    let gets: Vec<u16> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.is_resource())
        .map(|r| r.status)
        .collect();
    assert_eq!(gets, [503, 503, 200]);
    let patches: Vec<_> = requests.iter().filter(|r| r.is_patch_of("pool")).collect();
    assert_eq!(
        patches.iter().map(|r| r.status).collect::<Vec<_>>(),
        [429, 200]
    );
    let waited = patches[1].at.duration_since(patches[0].at);
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After"
    );
    let metrics = ctl.metrics().encode();
    assert!(
        metrics.contains(r#"podid_controller_arm_throttled_total{operation="vmss_update"} 1"#),
        "{metrics}"
    );

    // A 429 on one client delays that client's next call, even in a later cycle.
    cluster.arm.inject(Fault {
        method: Some("GET".into()),
        path_contains: Some("virtualMachineScaleSets".into()),
        count: 1,
        status: 429,
        retry_after: Some(1),
    });
    cluster.add_identity("second", "client-2");
    cluster.add_pod("p2", &nodes[0], "second");
    cluster.arm.clear_requests();
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 1);
    let gets: Vec<_> = cluster
        .arm
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.is_resource())
        .collect();
    assert_eq!(gets.len(), 2);
    assert!(gets[1].at.duration_since(gets[0].at) >= Duration::from_secs(1));
    running.stop().await;
}

/// Case 6: a persistent failure leaves assignments Created (never falsely
/// Assigned); they converge once ARM recovers.
#[tokio::test]
async fn failed_operations_never_mark_assigned_and_converge_later() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("pool", 1, false, &[]);
    let id = cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &nodes[0], "web");
    cluster.arm.fail_next_operations("pool", 1);
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.failed, 1);
    assert_eq!(
        report.targets.values().next().unwrap().gets,
        2,
        "state read again after the failure"
    );
    let metrics = ctl.metrics().encode();
    assert!(
        metrics.contains(r#"podid_controller_assignments_total{operation="failed"} 1"#),
        "{metrics}"
    );
    assert_eq!(
        status_of(&cluster.assignment("p1", "web").unwrap()),
        "Created"
    );
    assert!(!cluster.scale_set_identities("pool").contains(&lower(&id)));
    let report = cycle(&cluster, ctl, CycleTrigger::Retry).await;
    assert_eq!(report.assigned, 1);
    assert_eq!(
        status_of(&cluster.assignment("p1", "web").unwrap()),
        "Assigned"
    );
    running.stop().await;
}

/// Case 7: leader failover. The standby takes over once the lease expires,
/// and does not redo completed work.
#[tokio::test]
async fn standby_takes_over_after_lease_expiry_without_redoing_work() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let lease = |identity: &str| LeaseConfig {
        name: "podid-controller".into(),
        namespace: "kube-system".into(),
        identity: identity.into(),
        lease_duration: Duration::from_millis(3000),
        renew_deadline: Duration::from_millis(2000),
        retry_period: Duration::from_millis(250),
    };
    let (a, a_elector) = cluster.run_elected(
        cluster.controller(config(), cluster.arm_options()),
        lease("controller-a"),
    );
    let mut a_leading = a.leading.subscribe();
    assert!(
        tokio::time::timeout(WAIT, a_leading.wait_for(|l| *l))
            .await
            .is_ok(),
        "A never led"
    );
    let (b, b_elector) = cluster.run_elected(
        cluster.controller(config(), cluster.arm_options()),
        lease("controller-b"),
    );

    let nodes = cluster.add_scale_set("pool", 2, false, &[]);
    for i in 0..4 {
        cluster.add_identity(&format!("id-{i}"), &format!("c-{i}"));
        cluster.add_pod(&format!("pod-{i}"), &nodes[i % 2], &format!("id-{i}"));
    }
    assert!(eventually(WAIT, || async { cluster.assigned_count() == 4 }).await);
    assert!(!*b.leading.borrow(), "B must stand by while A renews");
    assert!(b.controller.history().is_empty(), "the standby ran a cycle");
    assert!(
        cluster.caught_up(&b.controller).await,
        "the standby's caches are warm"
    );

    // A crashes: no release, its lease just stops being renewed.
    a_elector.abort();
    a.kill();
    let crashed = std::time::Instant::now();
    let held: Lease = cluster
        .api
        .get(Some("kube-system"), "podid-controller")
        .expect("lease exists");
    assert_eq!(
        held.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("controller-a"),
        "A held the lease until it crashed"
    );
    let patches_before = cluster.arm.resource_calls("PATCH");
    let creates_before = cluster
        .api
        .call_count("create", &ResourceType::of::<AzureAssignedIdentity>());
    let mut b_leading = b.leading.subscribe();
    assert!(
        tokio::time::timeout(WAIT, b_leading.wait_for(|l| *l))
            .await
            .is_ok(),
        "B never took over"
    );
    assert!(
        crashed.elapsed() >= Duration::from_millis(2500),
        "took over before the lease could expire"
    );
    let lease: Lease = cluster
        .api
        .get(Some("kube-system"), "podid-controller")
        .expect("lease exists");
    let spec = lease.spec.unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some("controller-b"));
    assert_eq!(spec.lease_transitions, Some(1));

    // The new leader's first cycle finds everything done.
    assert!(eventually(WAIT, || async { !b.controller.history().is_empty() }).await);
    let first = &b.controller.history()[0];
    assert_eq!(
        (
            first.created,
            first.assigned,
            first.released,
            first.patches()
        ),
        (0, 0, 0, 0),
        "{first:?}"
    );
    assert_eq!(cluster.arm.resource_calls("PATCH"), patches_before);
    assert_eq!(
        cluster
            .api
            .call_count("create", &ResourceType::of::<AzureAssignedIdentity>()),
        creates_before
    );

    // And it does new work.
    cluster.add_identity("late", "c-late");
    cluster.add_pod("late", &nodes[0], "late");
    assert!(eventually(WAIT, || async { cluster.assigned_count() == 5 }).await);
    b.stop().await;
    let _ = b_elector.await;
}

/// Case 8: the PATCH body on the wire carries the exact
/// `userAssignedIdentities` delta, with `null` for removals (the generated
/// model of azure_mgmt_compute 0.21 would send an empty map).
#[tokio::test]
async fn patch_body_on_the_wire_is_the_exact_identity_delta() {
    let (cluster, running) = setup(config()).await;
    let ctl = &running.controller;
    let foreign = identity_id("foreign");
    let nodes = cluster.add_scale_set("pool", 1, false, std::slice::from_ref(&foreign));
    let a = cluster.add_identity("a", "ca");
    let b = cluster.add_identity("b", "cb");
    let c = cluster.add_identity("c", "cc");
    cluster.add_pod("pa", &nodes[0], "a");
    cluster.add_pod("pb", &nodes[0], "b");
    cycle(&cluster, ctl, CycleTrigger::Event).await;
    let first = patch_bodies(&cluster, "pool");
    assert_eq!(
        first,
        [json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {&a: {}, &b: {}}}})]
    );

    cluster.delete_pod("pa");
    cluster.add_pod("pc", &nodes[0], "c");
    cluster.arm.clear_requests();
    cycle(&cluster, ctl, CycleTrigger::Event).await;
    let raw: Vec<_> = cluster
        .arm
        .requests()
        .into_iter()
        .filter(|r| r.is_patch_of("pool"))
        .collect();
    assert_eq!(raw.len(), 1);
    let text = String::from_utf8(raw[0].body.to_vec()).expect("UTF-8 body");
    assert!(text.contains("\"userAssignedIdentities\""), "{text}");
    assert!(text.contains(&format!("\"{c}\":{{}}")), "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let map = body["identity"]["userAssignedIdentities"]
        .as_object()
        .expect("map");
    assert_eq!(map.len(), 2, "{text}");
    assert_eq!(map[&c], json!({}));
    let (removed, value) = map
        .iter()
        .find(|(k, _)| lower(k) == lower(&a))
        .expect("a is removed");
    assert!(value.is_null(), "{removed}: {value}");
    assert_eq!(body["identity"]["type"], "UserAssigned");
    assert!(
        !text.to_ascii_lowercase().contains(&lower(&foreign)),
        "the foreign identity is never sent: {text}"
    );
    let want: BTreeSet<String> = [&foreign, &b, &c].iter().map(|s| lower(s)).collect();
    assert_eq!(cluster.scale_set_identities("pool"), want);
    running.stop().await;
}

/// The Kubernetes API verbs and resources the controller uses: the chart's
/// RBAC must grant exactly these.
#[tokio::test]
async fn kubernetes_calls_stay_within_the_documented_rbac() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let lease = LeaseConfig {
        name: "podid-controller".into(),
        namespace: "kube-system".into(),
        identity: "controller-0".into(),
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(1),
        retry_period: Duration::from_millis(200),
    };
    let (running, elector) =
        cluster.run_elected(cluster.controller(config(), cluster.arm_options()), lease);
    let nodes = cluster.add_scale_set("pool", 1, false, &[]);
    let id = cluster.add_identity("web", "cw");
    cluster
        .arm
        .mark_invalid(&cluster.add_identity("bad", "cbad"));
    cluster.add_pod("p1", &nodes[0], "web");
    cluster.add_pod("p2", &nodes[0], "bad");
    assert!(eventually(WAIT, || async { cluster.assigned_count() == 1 }).await);
    // Move p1 so its record is replaced, then delete it.
    cluster.add_pod("p1", "pool-missing-node", "web");
    assert!(
        eventually(WAIT, || async {
            cluster
                .assignment("p1", "web")
                .is_some_and(|a| a.spec.nodename == "pool-missing-node")
        })
        .await
    );
    cluster.delete_pod("p1");
    assert!(eventually(WAIT, || async { cluster.assignment("p1", "web").is_none() }).await);
    assert!(eventually(WAIT, || async { !cluster.api.list::<Event>().is_empty() }).await);
    running.stop().await;
    let _ = elector.await;
    let _ = id;

    let allowed: BTreeSet<(String, String)> = [
        ("list", "pods"),
        ("watch", "pods"),
        ("list", "nodes"),
        ("watch", "nodes"),
        ("list", "azureidentities.aadpodidentity.k8s.io"),
        ("watch", "azureidentities.aadpodidentity.k8s.io"),
        ("list", "azureidentitybindings.aadpodidentity.k8s.io"),
        ("watch", "azureidentitybindings.aadpodidentity.k8s.io"),
        ("list", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("watch", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("create", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("update", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("patch", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("delete", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("get", "leases.coordination.k8s.io"),
        ("create", "leases.coordination.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
        ("create", "events.events.k8s.io"),
        ("patch", "events.events.k8s.io"),
    ]
    .iter()
    .map(|(v, r)| (v.to_string(), r.to_string()))
    .collect();
    let used = cluster.api.calls();
    let outside: Vec<_> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "calls outside the RBAC list: {outside:?}"
    );
    for needed in [
        ("create", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("update", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("patch", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("delete", "azureassignedidentities.aadpodidentity.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            used.contains(&(needed.0.to_string(), needed.1.to_string())),
            "{needed:?} never used"
        );
    }
}

/// Long-running operations announced with `Location` (202 until done) are
/// followed as well as `Azure-AsyncOperation` ones.
#[tokio::test]
async fn location_style_operations_are_followed() {
    let cluster = TestCluster::start(EmulatorConfig {
        lro_style: podid_tests::arm::LroStyle::Location,
        lro_duration: Duration::from_millis(100),
        ..EmulatorConfig::default()
    })
    .await;
    let running = cluster.run(cluster.controller(config(), cluster.arm_options()), false);
    let ctl = &running.controller;
    let vm = cluster.add_vm("vm-0", false, &[]);
    let id = cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &vm, "web");
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 1);
    assert!(cluster.vm_identities("vm-0").contains(&lower(&id)));
    let polls: Vec<u16> = cluster
        .arm
        .requests()
        .iter()
        .filter(|r| r.path.contains("/operations/"))
        .map(|r| r.status)
        .collect();
    assert!(
        polls.len() >= 2 && polls[..polls.len() - 1].iter().all(|s| *s == 202),
        "{polls:?}"
    );
    assert_eq!(polls.last(), Some(&200));
    running.stop().await;
}

/// The emulator enforces ARM's 150-identity limit, which is why the client
/// splits: a client configured past the limit gets ARM's error and marks
/// nothing Assigned.
#[tokio::test]
async fn more_than_150_identities_in_one_patch_is_refused() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let mut options = cluster.arm_options();
    options.max_identities_per_patch = 200;
    let running = cluster.run(cluster.controller(config(), options), false);
    let ctl = &running.controller;
    let nodes = cluster.add_scale_set("big", 2, false, &[]);
    for i in 0..160 {
        cluster.add_identity(&format!("id-{i}"), &format!("c-{i}"));
        cluster.add_pod(&format!("pod-{i}"), &nodes[i % 2], &format!("id-{i}"));
    }
    let report = cycle(&cluster, ctl, CycleTrigger::Event).await;
    assert_eq!(report.assigned, 0);
    assert_eq!(report.failed, 160);
    let error = report
        .targets
        .values()
        .next()
        .and_then(|t| t.error.clone())
        .unwrap_or_default();
    assert!(error.contains("exceed limit '150'"), "{error}");
    assert!(cluster.scale_set_identities("big").is_empty());
    running.stop().await;
}
