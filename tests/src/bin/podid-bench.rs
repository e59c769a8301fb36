//! `cargo xtask bench redirect|token|connections|soak`: benchmarks that need
//! root, run inside network namespaces and cgroups this process creates (and
//! removes). Each lives in `podid_tests::bench`; this only parses arguments.
//!
//! Figures are medians over interleaved batches, so the variants see the same
//! machine conditions; ratios are computed within one run.

use std::time::Duration;

use podid_tests::{bench::redirect::RedirectBench, privileged::missing_preconditions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(why) = missing_preconditions() {
        anyhow::bail!("the benchmarks need root, cgroup v2 and BTF: {why}");
    }
    let value = |flag: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match args.first().map(String::as_str) {
        Some("redirect") => podid_tests::bench::redirect::run(RedirectBench {
            connections: value("--connections", 20_000) as u32,
            program_stats: args.iter().any(|a| a == "--program-stats"),
            egress_guard: args.iter().any(|a| a == "--egress-guard"),
        }),
        Some("floor") => match (args.get(1), args.get(2)) {
            (Some(listen), Some(body)) => {
                podid_tests::bench::token::floor_process(listen.parse()?, body.as_ref())
            }
            _ => anyhow::bail!("usage: podid-bench floor LISTEN BODY_FILE"),
        },
        Some("token") => {
            podid_tests::bench::token::run(Duration::from_secs(value("--seconds", 10)))
        }
        Some("connections") => {
            podid_tests::bench::load::connections(value("--count", 10_000) as usize)
        }
        Some("soak") => podid_tests::bench::load::soak(
            Duration::from_secs(value("--minutes", 10) * 60 + value("--seconds", 0)),
            value("--rate", 200),
            Duration::from_secs(value("--sample-seconds", 5).max(1)),
        ),
        _ => anyhow::bail!(
            "usage: podid-bench redirect [--connections N] [--program-stats] [--egress-guard] | token [--seconds N]\n\
             \x20      | connections [--count N] | soak [--minutes N] [--seconds N] [--rate R] [--sample-seconds N]"
        ),
    }
}
