//! The command line: `podid-agent [run]`, `podid-agent redirect …`, `podid-agent audit …`.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};

use crate::redirect::{self, DEFAULT_PIN_ROOT, Redirect, RedirectOptions};

/// podid node agent: gives each pod a token for its own Azure identity
/// through the standard IMDS endpoint.
#[derive(Debug, Parser)]
#[command(name = "podid-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install, inspect or remove the kernel redirect without running the agent.
    #[command(subcommand)]
    Redirect(RedirectCommand),
}

/// `podid-agent redirect …`
#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Load and attach the programs to a cgroup and pin them, then exit. The
    /// redirect stays in place (pinned) until `uninstall`.
    Install(InstallArgs),
    /// Detach and unpin everything podid pinned.
    Uninstall(PinArgs),
    /// Print the kernel counters of the pinned redirect as JSON.
    Status(PinArgs),
}

/// Where pins live.
#[derive(Debug, Args, Clone)]
pub struct PinArgs {
    /// bpffs directory for podid's pins.
    #[arg(long, env = "PODID_BPFFS_DIR", default_value = DEFAULT_PIN_ROOT)]
    pub bpffs_dir: PathBuf,
}

/// Options for installing the redirect.
#[derive(Debug, Args, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// cgroup v2 directory to attach to (every process below it is redirected).
    #[arg(long, env = "PODID_CGROUP_ROOT")]
    pub cgroup_root: PathBuf,
    /// Address redirected connections are sent to (the agent's listener).
    #[arg(long, env = "PODID_LISTEN")]
    pub listen: SocketAddr,
    /// Destination to intercept.
    #[arg(long, env = "PODID_INTERCEPT", default_value = "169.254.169.254:80")]
    pub intercept: SocketAddrV4,
    /// Extra cgroup directories whose processes reach the real IMDS.
    #[arg(
        long = "exempt-cgroup",
        env = "PODID_EXEMPT_CGROUPS",
        value_delimiter = ','
    )]
    pub exempt_cgroups: Vec<PathBuf>,
    /// Capacity of each record map when first created.
    #[arg(long, env = "PODID_RECORD_CAPACITY")]
    pub record_capacity: Option<u32>,
}

impl InstallArgs {
    fn options(&self) -> anyhow::Result<RedirectOptions> {
        Ok(RedirectOptions {
            cgroup_root: self.cgroup_root.clone(),
            pin_root: self.pins.bpffs_dir.clone(),
            imds: self.intercept,
            agent: redirect::ipv4_socket(self.listen)?,
            exempt_self: true,
            exempt: self.exempt_cgroups.clone(),
            record_capacity: self.record_capacity,
        })
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PODID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    init_tracing();
    let result = match cli.command {
        Command::Redirect(cmd) => run_redirect(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("podid-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_redirect(cmd: RedirectCommand) -> anyhow::Result<()> {
    match cmd {
        RedirectCommand::Install(args) => {
            let redirect = Redirect::install(&args.options()?)?;
            let attachments: serde_json::Map<String, serde_json::Value> = redirect
                .attachments()
                .iter()
                .map(|(program, how)| {
                    (
                        (*program).to_string(),
                        serde_json::Value::from(format!("{how:?}").to_lowercase()),
                    )
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "cgroup_id": redirect.cgroup_id(),
                    "attachments": attachments,
                })
            );
            Ok(())
        }
        RedirectCommand::Uninstall(args) => {
            let removed = Redirect::uninstall(&args.bpffs_dir)?;
            println!(
                "{}",
                serde_json::json!({
                    "removed": removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                })
            );
            Ok(())
        }
        RedirectCommand::Status(args) => {
            let counters: serde_json::Map<String, serde_json::Value> =
                Redirect::pinned_counters(&args.bpffs_dir)?
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.into()))
                    .collect();
            println!("{}", serde_json::Value::Object(counters));
            Ok(())
        }
    }
}
