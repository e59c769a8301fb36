//! The benchmarks' shared pieces (summary statistics), the token benchmark
//! and the load figures (connections, soak).

pub mod load;
pub mod token;

use crate::{
    emulator::{EmulatorConfig, ManagedIdentity},
    harness::{AgentHarness, HarnessSpec},
};

/// The box every agent benchmark runs in: one workload cgroup `bench`,
/// bound to `identity`, and the agent started with `agent_args`.
pub fn bench_harness(identity: &ManagedIdentity, agent_args: &[String]) -> AgentHarness {
    AgentHarness::start(HarnessSpec {
        workloads_yaml: format!(
            r#"
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {{name: bench}}
spec: {{type: 0, clientID: {}, resourceID: {}}}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {{name: bench}}
spec: {{azureIdentity: bench, selector: bench}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: bench, labels: {{aadpodidbinding: bench}}}}
spec: {{cgroup: bench}}
"#,
            identity.client_id, identity.resource_id
        ),
        cgroups: vec!["bench".into()],
        emulator: EmulatorConfig::default().with_user_assigned(identity.clone()),
        secrets: Vec::new(),
        agent_args: agent_args.to_vec(),
    })
}

/// The median of `samples` (0 for none).
pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

/// The `q`-quantile (nearest rank) of `samples` (0 for none).
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// p10/p50/p90/p99 of a sample set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Stats {
    /// Summarises `samples`.
    pub fn of(samples: &[f64]) -> Self {
        Self {
            p10: percentile(samples, 0.10),
            p50: percentile(samples, 0.50),
            p90: percentile(samples, 0.90),
            p99: percentile(samples, 0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median(&samples), 50.0);
        assert_eq!(percentile(&samples, 0.99), 99.0);
        assert_eq!(percentile(&samples, 1.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }
}
