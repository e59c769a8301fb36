//! `cargo xtask demo`: the whole data path on this machine.
//!
//! In a private network namespace (where 169.254.169.254 is served by the
//! IMDS/Entra ID emulator), it starts the agent in standalone mode with
//! aad-pod-identity's example AzureIdentity and AzureIdentityBinding and two
//! local workloads, then runs the official Python Azure SDK in each
//! workload's cgroup. One is bound and gets its token through the kernel
//! redirect; the other gets IMDS's definite 400. It prints what happened and
//! the audit records, then removes everything it created.

use std::time::Duration;

use podid_tests::{
    emulator::{EmulatorConfig, ManagedIdentity, token_claims},
    harness::{AgentHarness, HarnessSpec, python_client, run_client_json},
    privileged::missing_preconditions,
};

const SCOPE: &str = "https://database.windows.net/.default";

fn workloads(identity: &ManagedIdentity) -> String {
    format!(
        r#"# aad-pod-identity's example objects, unchanged:
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata:
  name: sqlpodidentity
spec:
  type: 0
  resourceID: {resource_id}
  clientID: {client_id}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata:
  name: sqlpodidentity-binding
spec:
  azureIdentity: sqlpodidentity
  selector: sqlpodid
---
# Two workloads, named by their cgroups:
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: sql-reporter
  labels:
    aadpodidbinding: sqlpodid
spec:
  cgroup: demo/sql-reporter
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: nightly-batch
  labels:
    aadpodidbinding: no-such-binding
spec:
  cgroup: demo/nightly-batch
"#,
        resource_id = identity.resource_id,
        client_id = identity.client_id,
    )
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn main() -> anyhow::Result<()> {
    if let Some(why) = missing_preconditions() {
        anyhow::bail!("the demo needs root, cgroup v2 and a kernel with BTF: {why}");
    }
    let identity = ManagedIdentity::user_assigned("sqlpodidentity");
    let yaml = workloads(&identity);
    step(
        "Starting the IMDS/Entra ID emulator on 169.254.169.254:80 inside a private network namespace, and podid-agent in standalone mode",
    );
    println!("workloads file:\n{}", indent(&yaml));
    let harness = AgentHarness::start(HarnessSpec {
        workloads_yaml: yaml,
        cgroups: vec!["demo/sql-reporter".into(), "demo/nightly-batch".into()],
        emulator: EmulatorConfig::default().with_user_assigned(identity.clone()),
        secrets: Vec::new(),
        agent_args: Vec::new(),
    });
    println!(
        "agent ready (pid {}), redirect attached to {} and pinned under {}",
        harness.agent_pid().unwrap_or(0),
        harness.cgroup_root().display(),
        harness.pin_root().display()
    );

    for (workload, expect_token) in [("sql-reporter", true), ("nightly-batch", false)] {
        step(&format!(
            "{workload}: the Python azure-identity SDK calls ManagedIdentityCredential().get_token({SCOPE:?}) at 169.254.169.254"
        ));
        let result = run_client_json(
            python_client(None, SCOPE),
            &harness.cgroup(&format!("demo/{workload}")),
            Duration::from_secs(60),
        );
        match (result["token"].as_str(), expect_token) {
            (Some(token), true) => {
                let claims = token_claims(token).unwrap_or_default();
                println!(
                    "got a token for client id {} (audience {}), expires_on {}",
                    claims["appid"], claims["aud"], result["expires_on"]
                );
                anyhow::ensure!(
                    claims["appid"] == identity.client_id.as_str(),
                    "the token is not for the bound identity"
                );
            }
            (None, false) => println!(
                "refused at once, as IMDS refuses an unknown identity: {} ({})",
                result["error"]
                    .as_str()
                    .unwrap_or_default()
                    .lines()
                    .next()
                    .unwrap_or_default(),
                result["type"].as_str().unwrap_or_default()
            ),
            _ => anyhow::bail!("unexpected result for {workload}: {result}"),
        }
    }

    step("The audit records (one per request; never the token, only a 12-hex fingerprint)");
    for record in harness.audit_records(2) {
        println!("{}", serde_json::to_string(&record).unwrap_or_default());
    }
    step("Cleaning up (agent stopped, pins and cgroups removed, namespace left)");
    drop(harness);
    println!("done");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
