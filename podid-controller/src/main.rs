//! `podid-controller`: see the crate documentation and `--help`.

use clap::Parser;
use podid_controller::{Args, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, &args.log_filter);
    podid_controller::run(args).await
}
