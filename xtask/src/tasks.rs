//! The xtask commands other than setup.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::{
    ebpf_build,
    setup::{self, workspace},
};

/// `cargo xtask test` options.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only the unprivileged tests.
    #[arg(long)]
    pub unit_only: bool,
    /// Extra arguments for the privileged test run (a test name filter, for example).
    #[arg(last = true)]
    pub filter: Vec<String>,
}

/// `cargo xtask bench …`
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// connect+close: no hook vs our redirect vs an iptables DNAT rule.
    Redirect {
        /// Connections per variant.
        #[arg(long, default_value_t = 20_000)]
        connections: u32,
        /// Also report the kernel-measured cost of each program (adds
        /// overhead to variant b while on).
        #[arg(long)]
        program_stats: bool,
        /// Also attach the agent's optional `--egress-guard` program.
        #[arg(long)]
        egress_guard: bool,
    },
    /// Cached-token requests through the redirect vs a bare hyper floor.
    Token {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// 10,000 connections through the redirect held open at once by the agent.
    Connections {
        /// Connections opened at once.
        #[arg(long, default_value_t = 10_000)]
        count: u32,
    },
    /// A steady request rate through the redirect; the agent's RSS over time.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Requests per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
    },
    /// Controller: burst to Assigned, and desired-state computation.
    Controller {
        /// Extra arguments for podid-bench-controller.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace());
    cmd
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    eprintln!("xtask: {what}: ok ({:.0?})", started.elapsed());
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn build_ebpf() -> anyhow::Result<()> {
    setup::run()?;
    let root = workspace();
    let object = ebpf_build::build(&root, &ebpf_build::default_target_dir(&root), false)
        .map_err(anyhow::Error::msg)?;
    println!("{}", object.display());
    Ok(())
}

pub fn build(release: bool) -> anyhow::Result<()> {
    setup::run()?;
    let mut cmd = cargo();
    cmd.args(["build", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd, "cargo build")
}

fn agent_binary() -> std::path::PathBuf {
    workspace().join("target/debug/podid-agent")
}

pub fn load(cgroup: &Path, listen: &str, bpffs_dir: &Path) -> anyhow::Result<()> {
    build(false)?;
    run(
        Command::new(agent_binary())
            .args(["redirect", "install", "--cgroup-root"])
            .arg(cgroup)
            .args(["--listen", listen, "--bpffs-dir"])
            .arg(bpffs_dir),
        "podid-agent redirect install",
    )
}

pub fn unload(bpffs_dir: &Path) -> anyhow::Result<()> {
    build(false)?;
    run(
        Command::new(agent_binary())
            .args(["redirect", "uninstall", "--bpffs-dir"])
            .arg(bpffs_dir),
        "podid-agent redirect uninstall",
    )
}

fn manifests_check(update: bool) -> anyhow::Result<()> {
    let script = workspace().join("manifests/tests/check_manifests.py");
    if !script.is_file() {
        bail!("{} is missing", script.display());
    }
    let mut cmd = Command::new(setup::venv().join("bin/python"));
    cmd.current_dir(workspace()).arg(&script);
    if update {
        cmd.arg("--update");
    }
    run(&mut cmd, "manifest checks")
}

pub fn codegen() -> anyhow::Result<()> {
    setup::run()?;
    run(
        cargo().env("PODID_UPDATE_GENERATED", "1").args([
            "test",
            "-p",
            "podid-api",
            "--lib",
            "committed_crds_match_the_types",
        ]),
        "regenerate CRDs",
    )?;
    manifests_check(true)
}

/// The suites `cargo xtask test` runs a second time in zero-policy mode.
const HARDENING_SUITES: [&str; 4] = [
    "hardening_hostile",
    "hardening_hygiene",
    "hardening_bounds",
    "hardening_faults",
];

pub fn test(args: &TestArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    if !args.no_lint {
        run(
            cargo().args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check",
        )?;
        run(
            cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
            "cargo clippy",
        )?;
    }
    run(cargo().args(["build", "--bins", "--tests"]), "cargo build")?;
    run(
        cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "podid-ebpf",
            "--exclude",
            "podid-tests",
        ]),
        "unit tests",
    )?;
    run(
        cargo().args(["test", "-p", "podid-tests", "--lib", "--bins"]),
        "test-support unit tests",
    )?;
    manifests_check(false)?;
    crate::fuzz::smoke()?;
    if !args.unit_only {
        if !is_root() {
            bail!("the privileged integration tests need root (use --unit-only to skip them)");
        }
        let mut cmd = cargo();
        cmd.env("PODID_REQUIRE_PRIVILEGED", "1")
            .args(["test", "-p", "podid-tests", "--tests", "--"])
            .arg("--test-threads=1")
            .args(&args.filter);
        run(&mut cmd, "privileged integration tests")?;
        // The hardening cases again with the agent in zero-policy mode and
        // every workload in a pod's own network namespace.
        let mut cmd = cargo();
        cmd.env("PODID_REQUIRE_PRIVILEGED", "1")
            .env("PODID_HARDENING_LISTEN_MODE", "pod-netns")
            .args(["test", "-p", "podid-tests"]);
        for suite in HARDENING_SUITES {
            cmd.args(["--test", suite]);
        }
        cmd.args(["--", "--test-threads=1"]).args(&args.filter);
        run(&mut cmd, "hardening suites in zero-policy mode")?;
    }
    eprintln!(
        "xtask: test: everything passed in {:.0?}",
        Duration::from_secs(started.elapsed().as_secs())
    );
    Ok(())
}

fn bench_binary(name: &str, args: &[String]) -> anyhow::Result<()> {
    run(
        cargo()
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "podid-tests",
                "--bin",
                name,
                "--",
            ])
            .args(args),
        name,
    )
}

/// A benchmark that runs the release agent in a box of its own.
fn agent_bench(name: &str, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the {name} benchmark needs root");
    }
    run(
        cargo().args(["build", "--release", "--bins"]),
        "cargo build --release",
    )?;
    bench_binary("podid-bench", args)
}

pub fn bench(which: &Bench) -> anyhow::Result<()> {
    setup::run()?;
    match which {
        Bench::Redirect {
            connections,
            program_stats,
            egress_guard,
        } => {
            if !is_root() {
                bail!("the redirect benchmark needs root");
            }
            let mut args = vec![
                "redirect".to_string(),
                "--connections".into(),
                connections.to_string(),
            ];
            if *egress_guard {
                args.push("--egress-guard".into());
            }
            if *program_stats {
                args.push("--program-stats".into());
            }
            bench_binary("podid-bench", &args)
        }
        Bench::Token { seconds } => agent_bench(
            "token",
            &["token".into(), "--seconds".into(), seconds.to_string()],
        ),
        Bench::Connections { count } => agent_bench(
            "connections",
            &["connections".into(), "--count".into(), count.to_string()],
        ),
        Bench::Soak { minutes, rate } => agent_bench(
            "soak",
            &[
                "soak".into(),
                "--minutes".into(),
                minutes.to_string(),
                "--rate".into(),
                rate.to_string(),
            ],
        ),
        Bench::Controller { args } => bench_binary("podid-bench-controller", args),
    }
}

pub fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates a network namespace: run it as root");
    }
    setup::run()?;
    run(cargo().args(["build", "--quiet", "--bins"]), "cargo build")?;
    let status = Command::new(workspace().join("target/debug/podid-demo"))
        .env("PODID_VENV", setup::venv())
        .status()
        .context("running podid-demo")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}
