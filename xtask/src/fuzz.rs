//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/`, each for a
//! bounded time, and the short smoke run `cargo xtask test` makes.
//!
//! The committed seeds (`fuzz/corpus/<target>/`) are only read: libFuzzer
//! writes what it learns to the first corpus directory it is given, which
//! is `target/fuzz-corpus/<target>/`, kept between runs. Crashes land in
//! `fuzz/artifacts/<target>/`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};
use clap::Args;

use crate::setup::workspace;

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 5] = [
    "request_head",
    "request_target",
    "cgroup_path",
    "workloads_file",
    "crd_json",
];
/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 12;
/// Longest time one input may take before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

/// `cargo xtask fuzz` options.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Only this target (default: every target, one after the other).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Seconds per target (libFuzzer reads 0 as "forever", so at least 1).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
}

/// How to reach a toolchain that accepts `-Zsanitizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    /// rustup's nightly.
    Nightly,
    /// The current (stable) toolchain with `RUSTC_BOOTSTRAP=1`.
    Bootstrapped,
}

impl Toolchain {
    fn detect() -> Self {
        let nightly = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if nightly {
            Toolchain::Nightly
        } else {
            Toolchain::Bootstrapped
        }
    }

    /// `cargo fuzz <args>` in `fuzz/`.
    fn cargo_fuzz(self) -> Command {
        let mut cmd = match self {
            Toolchain::Nightly => {
                let mut cmd = Command::new("rustup");
                cmd.args(["run", "nightly", "cargo"]);
                cmd
            }
            Toolchain::Bootstrapped => {
                let mut cmd =
                    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
                cmd.env("RUSTC_BOOTSTRAP", "1");
                cmd
            }
        };
        // Whatever toolchain runs xtask must not leak into the fuzz build.
        for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO"] {
            cmd.env_remove(var);
        }
        cmd.current_dir(workspace().join("fuzz")).arg("fuzz");
        cmd
    }
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    crate::setup::run()?;
    let targets: Vec<&str> = match &args.target {
        Some(target) => vec![target.as_str()],
        None => TARGETS.to_vec(),
    };
    fuzz(&targets, args.seconds, Build::Optimised)
}

/// Every target briefly: regressions in the seeds, and shallow new bugs.
/// Unoptimised, because building with optimisations and sanitizers costs
/// minutes that a short run never wins back.
pub fn smoke() -> anyhow::Result<()> {
    fuzz(&TARGETS, SMOKE_SECONDS, Build::Dev)
}

/// How the fuzz targets are compiled (always with AddressSanitizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Build {
    /// cargo-fuzz's default: release with debug assertions.
    Optimised,
    /// `--dev`: no optimisations, quick to build.
    Dev,
}

impl Build {
    fn args(self) -> &'static [&'static str] {
        match self {
            Build::Optimised => &[],
            Build::Dev => &["--dev"],
        }
    }
}

fn fuzz(targets: &[&str], seconds: u64, build: Build) -> anyhow::Result<()> {
    let toolchain = Toolchain::detect();
    let started = Instant::now();
    let status = toolchain
        .cargo_fuzz()
        .arg("build")
        .args(build.args())
        .status()
        .context("running cargo fuzz (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    eprintln!(
        "xtask: cargo fuzz build ({toolchain:?}, {build:?}): ok ({:.0?})",
        started.elapsed()
    );
    let mut summaries = Vec::new();
    for target in targets {
        summaries.push(run_target(toolchain, build, target, seconds)?);
    }
    for summary in summaries {
        eprintln!("xtask: fuzz {summary}");
    }
    Ok(())
}

fn run_target(
    toolchain: Toolchain,
    build: Build,
    target: &str,
    seconds: u64,
) -> anyhow::Result<String> {
    let root = workspace();
    let seeds = root.join("fuzz/corpus").join(target);
    let learned = root.join("target/fuzz-corpus").join(target);
    std::fs::create_dir_all(&learned).with_context(|| format!("creating {}", learned.display()))?;
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let mut cmd = toolchain.cargo_fuzz();
    cmd.arg("run")
        .args(build.args())
        .arg(target)
        .arg(&learned)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1");
    let dictionary = root
        .join("fuzz/dictionaries")
        .join(format!("{target}.dict"));
    if dictionary.is_file() {
        cmd.arg(format!("-dict={}", dictionary.display()));
    }
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        bail!(
            "fuzz target {target} failed ({}); the input is in {}",
            output.status,
            artifacts(&root, target).display()
        );
    }
    Ok(summarise(target, &log))
}

fn artifacts(root: &Path, target: &str) -> PathBuf {
    root.join("fuzz/artifacts").join(target)
}

/// One line from libFuzzer's final report: runs, speed, coverage, corpus.
fn summarise(target: &str, log: &str) -> String {
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map(str::trim)
            .unwrap_or("?")
            .to_string()
    };
    let last_status = log.lines().rev().find(|l| l.contains(" cov: "));
    let field = |name: &str| {
        last_status
            .and_then(|l| l.split_whitespace().skip_while(|w| *w != name).nth(1))
            .unwrap_or("?")
            .to_string()
    };
    format!(
        "{target}: {} runs ({} exec/s), cov {}, ft {}, corpus {}, {} new, peak RSS {} MB",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        field("cov:"),
        field("ft:"),
        field("corp:"),
        stat("new_units_added"),
        stat("peak_rss_mb"),
    )
}
