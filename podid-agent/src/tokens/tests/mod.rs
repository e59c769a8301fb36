//! The token service against the emulator, through real sockets on
//! 127.0.0.1: no mock of the HTTP layer.

mod entra;
mod flight;
mod imds;
mod refresh;
mod retry;

use std::time::Duration;

use podid_tests::emulator::{Emulator, EmulatorConfig, EmulatorHandle, ManagedIdentity};

use super::{Credential, ImdsSelector, IssuedToken};

const VAULT: &str = "https://vault.azure.net";
const SQL: &str = "https://database.windows.net/";

async fn emulator(config: EmulatorConfig) -> EmulatorHandle {
    Emulator::start(config)
        .await
        .expect("start emulator on 127.0.0.1")
}

/// An emulator whose VM has the given user-assigned identities.
async fn emulator_with(identities: &[&ManagedIdentity]) -> EmulatorHandle {
    let config = identities.iter().fold(EmulatorConfig::default(), |c, i| {
        c.with_user_assigned((*i).clone())
    });
    emulator(config).await
}

fn user_assigned(identity: &ManagedIdentity) -> Credential {
    Credential::ManagedIdentity {
        selector: ImdsSelector::ClientId(identity.client_id.clone()),
    }
}

fn now_ms() -> u64 {
    super::now_ms()
}

/// Time left on a token, from now.
fn remaining(token: &IssuedToken) -> Duration {
    Duration::from_millis((token.expires_on * 1000).saturating_sub(now_ms()))
}
