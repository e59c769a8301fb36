//! `podid-agent`: the node agent binary. See the crate documentation.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = podid_agent::cli::Cli::parse();
    podid_agent::cli::run(cli)
}
