//! The official Rust client (crates.io `azure_identity`) as a workload:
//! `podid-rust-client [CLIENT_ID] SCOPE` gets a token with
//! `ManagedIdentityCredential` and prints one JSON line (the token, or the
//! error). End-to-end tests run it inside a workload's cgroup.

use std::time::Instant;

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (client_id, scope) = match args.as_slice() {
        [scope] => (None, scope.clone()),
        [client_id, scope] => (
            Some(client_id.clone()).filter(|c| !c.is_empty()),
            scope.clone(),
        ),
        _ => {
            println!(
                "{}",
                json!({"error": "usage: podid-rust-client [CLIENT_ID] SCOPE"})
            );
            return;
        }
    };
    let started = Instant::now();
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(UserAssignedId::ClientId),
        ..Default::default()
    };
    let result = match ManagedIdentityCredential::new(Some(options)) {
        Ok(credential) => credential.get_token(&[scope.as_str()], None).await,
        Err(error) => Err(error),
    };
    let seconds = started.elapsed().as_secs_f64();
    let output = match result {
        Ok(token) => json!({
            "token": token.token.secret(),
            "expires_on": token.expires_on.unix_timestamp(),
            "seconds": seconds,
        }),
        Err(error) => json!({"error": error.to_string(), "seconds": seconds}),
    };
    println!("{output}");
}
