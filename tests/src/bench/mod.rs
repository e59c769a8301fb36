//! The benchmarks' shared pieces (summary statistics), the redirect and token
//! benchmarks and the load figures (connections, soak).

pub mod load;
pub mod redirect;
pub mod token;

use crate::{
    emulator::{EmulatorConfig, ManagedIdentity},
    harness::{AgentHarness, HarnessOptions, HarnessSpec},
};

/// The box every agent benchmark runs in: one workload cgroup `bench`,
/// bound to `identity`, and the agent started with `agent_args`.
pub fn bench_harness(identity: &ManagedIdentity, agent_args: &[String]) -> AgentHarness {
    bench_harness_with(identity, agent_args, HarnessOptions::default())
}

/// [`bench_harness`] with [`HarnessOptions`] (a pod network, zero-policy
/// mode).
pub fn bench_harness_with(
    identity: &ManagedIdentity,
    agent_args: &[String],
    options: HarnessOptions,
) -> AgentHarness {
    AgentHarness::start_with(
        HarnessSpec {
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
        },
        options,
    )
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

/// A distribution-free 95% confidence interval for the median of `samples`:
/// the order statistics at ranks n/2 ± 0.98·√n (the normal approximation of
/// the binomial sign test). Needs no assumption about the noise's shape, which
/// on a shared 2-core VM is anything but normal. `(0, 0)` for no samples.
pub fn median_ci95(samples: &[f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len() as f64;
    let half_width = 0.98 * n.sqrt();
    let lower = ((n / 2.0 - half_width).floor() as usize).clamp(1, sorted.len());
    let upper = ((n / 2.0 + 1.0 + half_width).ceil() as usize).clamp(1, sorted.len());
    (sorted[lower - 1], sorted[upper - 1])
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

    #[test]
    fn median_interval_brackets_the_median_and_narrows_with_more_samples() {
        let small: Vec<f64> = (1..=40).map(f64::from).collect();
        let (lo, hi) = median_ci95(&small);
        assert!(lo < median(&small) && median(&small) < hi, "{lo} {hi}");
        assert_eq!((lo, hi), (13.0, 28.0));
        // Ten times the samples over the same range: about a third as wide.
        let large: Vec<f64> = (1..=400).map(|i| f64::from(i) / 10.0).collect();
        assert_eq!(median_ci95(&large), (18.0, 22.1));
        assert_eq!(median_ci95(&[]), (0.0, 0.0));
        assert_eq!(median_ci95(&[5.0]), (5.0, 5.0));
    }
}
