//! The command line: `podid-agent [run]`, `podid-agent redirect …`, `podid-agent audit …`.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    audit::{AuditQuery, Outcome, read_records, summarize},
    config::{BoundaryArgs, LogFormat, RunArgs},
    redirect::{self, DEFAULT_PIN_ROOT, Redirect, RedirectOptions},
    telemetry::{self, LogTarget},
};

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
    /// Run the agent: install the redirect and serve the IMDS endpoint.
    Run(Box<RunArgs>),
    /// Query the audit log.
    Audit(AuditArgs),
    /// Install, inspect or remove the kernel redirect without running the agent.
    #[command(subcommand)]
    Redirect(RedirectCommand),
    /// The IMDS guard for the node-start window (before the agent runs).
    #[command(subcommand)]
    Guard(GuardCommand),
}

/// `podid-agent guard …`
#[derive(Debug, Subcommand)]
pub enum GuardCommand {
    /// Install the tc guard in boot mode and exit: until an agent attaches,
    /// only processes below --allow-cgroup (and the root cgroup) reach IMDS.
    /// Run at boot by the unit `install-unit` writes.
    Boot(BootArgs),
    /// Write the boot unit, its kubelet.service.wants link and a copy of
    /// this binary under a host root (files podid owns only).
    InstallUnit(UnitArgs),
    /// Remove what install-unit wrote.
    UninstallUnit(UnitRootArgs),
}

/// `guard boot` options.
#[derive(Debug, Args, Clone)]
pub struct BootArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// The host cgroup whose processes keep reaching IMDS while the node
    /// boots (the host's services).
    #[arg(
        long,
        env = "PODID_BOOT_ALLOW_CGROUP",
        default_value = "/sys/fs/cgroup/system.slice"
    )]
    pub allow_cgroup: PathBuf,
    /// Destination to guard.
    #[arg(long, env = "PODID_INTERCEPT", default_value = "169.254.169.254:80")]
    pub intercept: SocketAddrV4,
    /// Interfaces the guard is attached to: `auto`, or names (comma-separated).
    #[arg(
        long = "imds-guard-interface",
        env = "PODID_IMDS_GUARD_INTERFACES",
        value_delimiter = ',',
        default_value = "auto"
    )]
    pub guard_interfaces: Vec<String>,
}

/// Where the host's files are.
#[derive(Debug, Args, Clone)]
pub struct UnitRootArgs {
    /// The host's root as mounted here (the chart mounts its
    /// /etc/systemd/system and /opt/podid below /host).
    #[arg(long, default_value = "/host")]
    pub host_root: PathBuf,
}

/// `guard install-unit` options.
#[derive(Debug, Args, Clone)]
pub struct UnitArgs {
    #[command(flatten)]
    pub root: UnitRootArgs,
    /// The host's bpffs pin root, as the unit passes it.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pub bpffs_dir: PathBuf,
    /// The host cgroup whose processes keep IMDS during boot, as the host
    /// sees it.
    #[arg(long, default_value = "/sys/fs/cgroup/system.slice")]
    pub allow_cgroup: PathBuf,
    /// `--imds-guard-interface` for the unit.
    #[arg(long, default_value = "auto")]
    pub imds_guard_interface: String,
}

/// `podid-agent audit`: which workloads got which tokens.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The audit log (rotated files next to it are read too).
    #[arg(long, env = "PODID_AUDIT_LOG")]
    pub file: PathBuf,
    /// Only this workload namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this pod (or LocalWorkload).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this identity: `namespace/name`, a bare name, or a client id.
    #[arg(long)]
    pub identity: Option<String>,
    /// Only this outcome (issued, identity_not_found, unattributed, …).
    #[arg(long)]
    pub outcome: Option<Outcome>,
    /// Only this resource (audience).
    #[arg(long)]
    pub resource: Option<String>,
    /// Only records newer than this: a duration ago (`1h`, `30m`) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only records older than this (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Print one line per (namespace, pod, identity, outcome) with counts.
    #[arg(long)]
    pub summary: bool,
}

/// `podid-agent redirect …`
#[derive(Debug, Subcommand)]
pub enum RedirectCommand {
    /// Load and attach the programs to a cgroup and pin them, then exit. The
    /// redirect stays in place (pinned) until `uninstall`.
    Install(InstallArgs),
    /// Detach and unpin podid's own pins under --bpffs-dir (its version
    /// directories and the names it gives its maps, programs and links);
    /// anything else there stays. Refuses a directory that is not on a BPF
    /// filesystem.
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
    /// The kernel boundary (record age, the IMDS guard).
    #[command(flatten)]
    pub boundary: BoundaryArgs,
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
            record_max_age: self.boundary.record_max_age,
            guard: self.boundary.guard(),
            agent_started_ns: 0,
            egress_guard: self.boundary.egress_guard,
            pod_listeners: None,
        })
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => {
            telemetry::init(&args.log_level, args.log_format, LogTarget::Stdout);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(crate::agent::run(*args)))
        }
        Command::Audit(args) => run_audit(args),
        Command::Redirect(cmd) => {
            telemetry::init("info", LogFormat::Text, LogTarget::Stderr);
            run_redirect(cmd)
        }
        Command::Guard(cmd) => {
            telemetry::init("info", LogFormat::Text, LogTarget::Stderr);
            run_guard(cmd)
        }
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

fn run_guard(cmd: GuardCommand) -> anyhow::Result<()> {
    let paths = |list: Vec<std::path::PathBuf>| {
        list.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    match cmd {
        GuardCommand::Boot(args) => {
            let guard = BoundaryArgs {
                record_max_age: redirect::DEFAULT_RECORD_MAX_AGE,
                guard_interfaces: args.guard_interfaces.clone(),
                egress_guard: false,
            }
            .guard();
            let guarded = redirect::install_boot_guard(&redirect::BootGuardOptions {
                pin_root: args.pins.bpffs_dir.clone(),
                imds: args.intercept,
                allow_cgroup: args.allow_cgroup.clone(),
                guard,
            })?;
            println!("{}", serde_json::json!({ "guarded": guarded }));
            Ok(())
        }
        GuardCommand::InstallUnit(args) => {
            let binary = std::env::current_exe()?;
            let written = crate::boot_unit::install(
                &args.root.host_root,
                &crate::boot_unit::UnitSettings {
                    bpffs_dir: args.bpffs_dir,
                    allow_cgroup: args.allow_cgroup,
                    guard_interfaces: args.imds_guard_interface,
                },
                &binary,
            )?;
            println!("{}", serde_json::json!({ "written": paths(written) }));
            Ok(())
        }
        GuardCommand::UninstallUnit(args) => {
            let removed = crate::boot_unit::uninstall(&args.host_root)?;
            println!("{}", serde_json::json!({ "removed": paths(removed) }));
            Ok(())
        }
    }
}

/// `--since`/`--until`: a duration ago, or an RFC 3339 time.
fn parse_time(value: &str) -> anyhow::Result<std::time::SystemTime> {
    if let Ok(ago) = humantime::parse_duration(value) {
        return std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| anyhow::anyhow!("{value} is too long ago"));
    }
    humantime::parse_rfc3339_weak(value).map_err(|e| {
        anyhow::anyhow!("{value:?} is neither a duration (1h) nor an RFC 3339 time: {e}")
    })
}

fn run_audit(args: AuditArgs) -> anyhow::Result<()> {
    let query = AuditQuery {
        namespace: args.namespace,
        pod: args.pod,
        identity: args.identity,
        outcome: args.outcome,
        resource: args.resource,
        since: args.since.as_deref().map(parse_time).transpose()?,
        until: args.until.as_deref().map(parse_time).transpose()?,
    };
    let records = read_records(&args.file, &query)?;
    if args.summary {
        println!(
            "{:<20} {:<30} {:<30} {:<20} {:>8}  LAST",
            "NAMESPACE", "POD", "IDENTITY", "OUTCOME", "REQUESTS"
        );
        for s in summarize(&records) {
            println!(
                "{:<20} {:<30} {:<30} {:<20} {:>8}  {}",
                s.namespace,
                s.pod,
                s.identity,
                s.outcome.as_str(),
                s.requests,
                s.last
            );
        }
    } else {
        for record in records {
            println!("{}", serde_json::to_string(&record)?);
        }
    }
    Ok(())
}
