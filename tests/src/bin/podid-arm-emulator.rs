//! `podid-arm-emulator`: the ARM emulator as a process, for the demo and
//! manual runs of `podid-controller --arm-endpoint`. Listens on 127.0.0.1
//! only; it also serves IMDS (`/metadata/identity/oauth2/token`) and Entra
//! ID (`/{tenant}/oauth2/v2.0/token`) token endpoints for the controller.

use std::time::Duration;

use clap::Parser;
use podid_tests::arm::{ArmEmulator, EmulatorConfig, LroStyle, ResourceKind};

/// Emulated Azure Resource Manager for VMs and VM scale sets.
#[derive(Parser, Debug)]
#[command(name = "podid-arm-emulator", version, about)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one; the URL is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Subscription of the resources.
    #[arg(long, default_value = "00000000-0000-0000-0000-000000000000")]
    subscription: String,
    /// Resource group of the resources.
    #[arg(long, default_value = "podid-nodes")]
    resource_group: String,
    /// VM scale sets to create (repeatable).
    #[arg(long = "vmss")]
    scale_sets: Vec<String>,
    /// VMs to create (repeatable).
    #[arg(long = "vm")]
    vms: Vec<String>,
    /// Give the resources a system-assigned identity.
    #[arg(long)]
    system_assigned: bool,
    /// Latency added to every ARM answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Duration of identity updates (long-running operations), in milliseconds.
    #[arg(long, default_value_t = 500)]
    lro_ms: u64,
    /// Announce operations with `Location` instead of `Azure-AsyncOperation`.
    #[arg(long)]
    location_lro: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = EmulatorConfig {
        latency: Duration::from_millis(args.latency_ms),
        lro_duration: Duration::from_millis(args.lro_ms),
        lro_style: if args.location_lro {
            LroStyle::Location
        } else {
            LroStyle::AsyncOperation
        },
        ..EmulatorConfig::default()
    };
    let emulator = ArmEmulator::start_on(args.port, config).await?;
    for name in &args.scale_sets {
        emulator.add_resource(
            ResourceKind::ScaleSet,
            &args.subscription,
            &args.resource_group,
            name,
            args.system_assigned,
            &[],
        );
    }
    for name in &args.vms {
        emulator.add_resource(
            ResourceKind::VirtualMachine,
            &args.subscription,
            &args.resource_group,
            name,
            args.system_assigned,
            &[],
        );
    }
    println!("{}", emulator.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
