//! `cargo xtask`: podid's developer commands.
//!
//! - `setup`: installs what the build and the tests need (idempotent, quiet
//!   when everything is present).
//! - `build-ebpf`, `build`: the kernel object, the workspace binaries.
//! - `load`, `unload`: attach the redirect to a cgroup of your choosing.
//! - `test`: lint, drift checks, unit tests, then privileged integration tests
//!   one at a time. This is what CI runs.
//! - `demo`: the whole data path on this machine, in a private network namespace.
//! - `bench`: benchmarks (`redirect`, `token`, `connections`, `soak`, `controller`).
//! - `fuzz`: the cargo-fuzz targets, each for a bounded time.
//! - `codegen`: regenerate the committed generated files.

// Shared with podid-agent's build script, which uses the parts xtask does not.
#[allow(dead_code)]
mod ebpf_build;
mod fuzz;
mod setup;
mod tasks;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "podid developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what is missing: the eBPF toolchain, system tools, Python tools.
    Setup,
    /// Build the kernel object and print its path.
    BuildEbpf,
    /// Build every workspace binary.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Attach the redirect to a cgroup (for experiments). It stays pinned
    /// until `cargo xtask unload`.
    Load {
        /// cgroup v2 directory to attach to.
        #[arg(long)]
        cgroup: PathBuf,
        /// Where redirected connections go.
        #[arg(long, default_value = "127.0.0.1:2579")]
        listen: String,
        /// bpffs pin directory.
        #[arg(long, default_value = "/sys/fs/bpf/podid")]
        bpffs_dir: PathBuf,
    },
    /// Detach and unpin what `load` attached.
    Unload {
        /// bpffs pin directory.
        #[arg(long, default_value = "/sys/fs/bpf/podid")]
        bpffs_dir: PathBuf,
    },
    /// The whole suite: lint, drift checks, unit tests, privileged tests.
    Test(tasks::TestArgs),
    /// Regenerate committed generated files (CRDs, rendered manifests).
    Codegen,
    /// Run a benchmark.
    Bench {
        #[command(subcommand)]
        which: tasks::Bench,
    },
    /// Show a workload getting its token through the redirect, locally.
    Demo,
    /// Run the fuzz targets (`fuzz/`), each for a bounded time.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf => tasks::build_ebpf(),
        Command::Build { release } => tasks::build(release),
        Command::Load {
            cgroup,
            listen,
            bpffs_dir,
        } => tasks::load(&cgroup, &listen, &bpffs_dir),
        Command::Unload { bpffs_dir } => tasks::unload(&bpffs_dir),
        Command::Test(args) => tasks::test(&args),
        Command::Codegen => tasks::codegen(),
        Command::Bench { which } => tasks::bench(&which),
        Command::Demo => tasks::demo(),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
