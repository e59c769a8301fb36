//! The controller's process entry point (`run_with_client`, as `main` runs
//! it): flags, the cloud config file with a service principal (tokens from
//! the emulated Entra ID), leader election, and the `/metrics`, `/healthz`,
//! `/readyz` listener.

use std::{collections::HashMap, time::Duration};

use clap::Parser;
use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event as K8sEvent};
use podid_controller::Args;
use podid_tests::arm::{
    EmulatorConfig,
    cluster::{TestCluster, eventually},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to the metrics listener: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test]
async fn process_runs_with_a_service_principal_and_serves_health_and_metrics() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let dir = std::env::temp_dir().join(format!("podid-controller-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cloud_config = dir.join("azure.json");
    std::fs::write(
        &cloud_config,
        r#"{"cloud":"AzurePublicCloud","tenantId":"tenant-1","aadClientId":"sp-client","aadClientSecret":"sp-secret",
            "subscriptionId":"00000000-0000-0000-0000-00000000cafe","resourceGroup":"MC_podid_nodes","vmType":"vmss",
            "useManagedIdentityExtension":false,"userAssignedIdentityID":"cluster-client"}"#,
    )
    .expect("write azure.json");
    let port = free_port();
    let url = cluster.arm.url();
    let args = Args::try_parse_from([
        "podid-controller",
        "--cloud-config",
        cloud_config.to_str().expect("UTF-8 path"),
        "--arm-endpoint",
        &url,
        "--aad-authority",
        &url,
        "--imds-endpoint",
        &url,
        "--metrics-listen",
        &format!("127.0.0.1:{port}"),
        "--leader-election-namespace",
        "kube-system",
        "--leader-election-identity",
        "controller-0",
        "--leader-election-duration",
        "2s",
        "--leader-election-retry-period",
        "200ms",
        "--batch-window",
        "50ms",
        "--lro-poll-interval",
        "10ms",
    ])
    .expect("flags parse");
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let client = cluster.api.client();
    let task = tokio::spawn(async move {
        let env: HashMap<String, String> = HashMap::new();
        podid_controller::run_with_client(client, args, &env, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        })
        .await
    });

    // As on AKS, the cluster identity (userAssignedIdentityID) is already on
    // the scale set before the controller starts.
    let cluster_identity = podid_tests::arm::cluster::identity_id("cluster");
    let nodes = cluster.add_scale_set("pool", 2, false, std::slice::from_ref(&cluster_identity));
    cluster.add_identity("cluster", "cluster-client");
    cluster.add_identity("web", "client-web");
    cluster.add_pod("p1", &nodes[0], "web");
    cluster.add_pod("p2", &nodes[1], "cluster");
    assert!(
        eventually(WAIT, || async { cluster.assigned_count() == 1 }).await,
        "never assigned"
    );
    assert!(
        cluster.assignment("p1", "web").is_some(),
        "{:?}",
        cluster.assignments()
    );
    assert!(
        cluster.assignment("p2", "cluster").is_none(),
        "a pod may not bind the cluster's own identity: {:?}",
        cluster.assignments()
    );
    assert!(
        eventually(WAIT, || async {
            cluster.api.list::<K8sEvent>().iter().any(|e| {
                e.reason.as_deref() == Some("IdentityRefused")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cluster")
            })
        })
        .await,
        "the refusal is an Event on the AzureIdentity"
    );
    assert!(
        cluster.arm.token_requests() >= 1,
        "the service principal token came from the emulated Entra ID"
    );

    let (status, body) = http_get(port, "/readyz").await;
    assert_eq!((status, body.trim()), (200, "leader"));
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    let (status, metrics) = http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"podid_controller_arm_requests_total{operation="vmss_update",status="200"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains("podid_controller_leader 1"), "{metrics}");
    assert!(
        metrics.contains("podid_controller_cycles_total"),
        "{metrics}"
    );

    // The cluster identity (userAssignedIdentityID) is protected: removing
    // the last pod's identity leaves it on the scale set.
    cluster.delete_pod("p1");
    assert!(
        eventually(WAIT, || async {
            cluster.assignments().is_empty()
                && !cluster
                    .scale_set_identities("pool")
                    .contains(&podid_tests::arm::cluster::identity_id("web").to_ascii_lowercase())
        })
        .await,
        "web was never removed"
    );
    assert!(
        cluster
            .scale_set_identities("pool")
            .contains(&cluster_identity.to_ascii_lowercase())
    );

    let _ = stop.send(true);
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("joins");
    assert!(result.is_ok(), "{result:?}");
    let lease: Lease = cluster
        .api
        .get(Some("kube-system"), "podid-controller")
        .expect("lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "the lease is released on shutdown"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn incomplete_cloud_config_is_refused_at_start() {
    let cluster = TestCluster::start(EmulatorConfig::default()).await;
    let args = Args::try_parse_from([
        "podid-controller",
        "--arm-endpoint",
        &cluster.arm.url(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .expect("flags parse");
    // No file, and MIC's environment variables name no credentials.
    let env: HashMap<String, String> = [("SUBSCRIPTION_ID".to_string(), "s".to_string())].into();
    let error = podid_controller::run_with_client(cluster.api.client(), args, &env, async {})
        .await
        .expect_err("must refuse");
    assert!(error.to_string().contains("aadClientSecret"), "{error}");
}
