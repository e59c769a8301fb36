//! Emulated Azure IMDS and Entra ID token endpoints, for end-to-end tests and
//! `cargo xtask demo`. Prints the bound address (`IP:PORT`) as the first line
//! on stdout once it accepts connections; logs go to stderr. Stops on
//! SIGINT/SIGTERM.
//!
//! ```text
//! podid-emulator [--listen 127.0.0.1:8080] [--token-lifetime 3600] [--config FILE]
//!                [--user-assigned CLIENT_ID[,OBJECT_ID[,RESOURCE_ID]]]...
//!                [--client-secret TENANT,CLIENT_ID,SECRET]...
//! ```
//!
//! `--config` takes the JSON form of `podid_tests::emulator::EmulatorConfig`;
//! flags override or add to it. Control API: `/_emulator/...` (see
//! `podid_tests::emulator::control`).

use std::{io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser;
use podid_tests::emulator::{
    DEFAULT_SUBSCRIPTION_ID, Emulator, EmulatorConfig, ManagedIdentity, RegisteredClient,
    random_guid,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(about = "Emulated Azure IMDS and Entra ID token endpoints")]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long)]
    token_lifetime: Option<u64>,
    /// JSON configuration file (EmulatorConfig).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A user-assigned identity of the VM: CLIENT_ID[,OBJECT_ID[,RESOURCE_ID]].
    #[arg(long, value_name = "CLIENT_ID[,OBJECT_ID[,RESOURCE_ID]]")]
    user_assigned: Vec<String>,
    /// A service principal signing in with a secret: TENANT,CLIENT_ID,SECRET.
    #[arg(long, value_name = "TENANT,CLIENT_ID,SECRET")]
    client_secret: Vec<String>,
}

fn user_assigned(spec: &str) -> anyhow::Result<ManagedIdentity> {
    let mut parts = spec.splitn(3, ',');
    let client_id = parts
        .next()
        .filter(|s| !s.is_empty())
        .context("empty client id")?;
    let object_id = parts.next().map_or_else(random_guid, str::to_owned);
    let resource_id = parts.next().map_or_else(
        || {
            format!(
                "/subscriptions/{DEFAULT_SUBSCRIPTION_ID}/resourcegroups/podid-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{client_id}"
            )
        },
        str::to_owned,
    );
    Ok(ManagedIdentity {
        client_id: client_id.to_owned(),
        object_id,
        resource_id,
    })
}

fn client_secret(spec: &str) -> anyhow::Result<RegisteredClient> {
    let parts: Vec<&str> = spec.splitn(3, ',').collect();
    let [tenant, client_id, secret] = parts.as_slice() else {
        bail!("expected TENANT,CLIENT_ID,SECRET");
    };
    Ok(RegisteredClient::with_secret(tenant, client_id, secret))
}

fn config(args: &Args) -> anyhow::Result<EmulatorConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ..EmulatorConfig::default()
        },
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(secs) = args.token_lifetime {
        config = config.with_token_lifetime(Duration::from_secs(secs));
    }
    for spec in &args.user_assigned {
        config
            .user_assigned
            .push(user_assigned(spec).with_context(|| format!("--user-assigned {spec}"))?);
    }
    for spec in &args.client_secret {
        config
            .clients
            .push(client_secret(spec).context("--client-secret")?);
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = config(&args)?;
    let emulator = Emulator::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", emulator.addr())?;
        out.flush()?;
    }
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    emulator.shutdown().await;
    Ok(())
}
