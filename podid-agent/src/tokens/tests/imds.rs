//! Managed identities through IMDS.

use std::sync::Arc;

use podid_tests::emulator::{EmulatorConfig, Endpoint, ManagedIdentity, token_claims};
use sha2::{Digest as _, Sha256};

use super::*;
use crate::tokens::{CacheStatus, Upstream, test_support::*};

#[tokio::test]
async fn user_assigned_token_is_fetched_once_then_served_from_cache() {
    let ua = ManagedIdentity::user_assigned("sqlpodid");
    let emu = emulator_with(&[&ua]).await;
    let (svc, recorder) = service_with(config_for(&emu), None);
    let credential = user_assigned(&ua);

    let (first, status) = svc
        .token("default/sqlpodid", &credential, VAULT)
        .await
        .expect("token");
    assert_eq!(status, CacheStatus::Miss);
    let (second, status) = svc
        .token("default/sqlpodid", &credential, VAULT)
        .await
        .expect("token");
    assert_eq!(status, CacheStatus::Hit);
    assert!(Arc::ptr_eq(&first, &second), "the cached token is served");

    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 1);
    let issued = emu.issued_tokens();
    assert_eq!(issued.len(), 1);
    assert_eq!(first.access_token, issued[0].access_token);
    assert_eq!(first.expires_on, issued[0].expires_on);
    assert_eq!(first.client_id, ua.client_id);
    assert_eq!(first.resource, VAULT);
    assert_eq!(first.token_type, "Bearer");
    let digest = Sha256::digest(first.access_token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(first.fingerprint, hex[..12]);
    let claims = token_claims(&first.access_token).expect("claims");
    assert_eq!(claims["appid"], ua.client_id.as_str());
    assert_eq!(svc.cached_len(), 1);
    assert_eq!(recorder.calls(), vec![(Upstream::Imds, Some(200))]);
    assert_eq!(
        emu.requests()[0].api_version.as_deref(),
        Some("2018-02-01"),
        "the api-version aad-pod-identity used"
    );
}

#[tokio::test]
async fn node_identity_is_the_vms_own() {
    let emu = emulator(EmulatorConfig::default()).await;
    let system = emu.system_assigned().expect("system identity");
    let (svc, _) = service_with(config_for(&emu), None);
    let node = Credential::NodeIdentity { selector: None };
    let (token, _) = svc.token("node", &node, VAULT).await.expect("token");
    assert_eq!(
        token.client_id, system.client_id,
        "client id from IMDS's answer"
    );
    assert_eq!(emu.calls(Endpoint::Imds, &system.client_id, VAULT), 1);
}

#[tokio::test]
async fn resources_are_normalised_before_keying_and_sending() {
    let ua = ManagedIdentity::user_assigned("norm");
    let emu = emulator_with(&[&ua]).await;
    let (svc, _) = service_with(config_for(&emu), None);
    let cred = user_assigned(&ua);

    // Python sends the resource raw, Node and Rust percent-encode it.
    let (raw, s1) = svc.token("ns/id", &cred, SQL).await.expect("raw");
    let (encoded, s2) = svc
        .token("ns/id", &cred, "https%3A%2F%2Fdatabase.windows.net%2F")
        .await
        .expect("encoded");
    assert_eq!((s1, s2), (CacheStatus::Miss, CacheStatus::Hit));
    assert!(Arc::ptr_eq(&raw, &encoded));
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, SQL), 1);

    // The trailing slash is significant: another audience, another token.
    let no_slash = "https://database.windows.net";
    let (other, status) = svc.token("ns/id", &cred, no_slash).await.expect("no slash");
    assert_eq!(status, CacheStatus::Miss);
    assert_ne!(other.fingerprint, raw.fingerprint);
    assert_eq!(
        token_claims(&other.access_token).expect("claims")["aud"],
        no_slash
    );
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, no_slash), 1);

    // A v2 scope never reaches IMDS; it shares the resource's entry.
    let (scoped, status) = svc
        .token("ns/id", &cred, "https://vault.azure.net/.default")
        .await
        .expect("scope");
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(scoped.resource, VAULT);
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 1);
    assert!(
        emu.requests()
            .iter()
            .all(|r| !r.resource.ends_with("/.default")),
        "/.default was sent to IMDS"
    );
    let (_, status) = svc.token("ns/id", &cred, VAULT).await.expect("vault");
    assert_eq!(status, CacheStatus::Hit);

    let err = svc
        .token("ns/id", &cred, "/.default")
        .await
        .expect_err("empty resource");
    assert_eq!(err.http_status(), 400);
}

#[tokio::test]
async fn unassigned_user_identity_is_a_404_naming_the_client_id() {
    let emu = emulator(EmulatorConfig::default()).await;
    let (svc, recorder) = service_with(config_for(&emu), None);
    let missing = ManagedIdentity::user_assigned("not-on-this-vm");
    let err = svc
        .token("ns/late", &user_assigned(&missing), VAULT)
        .await
        .expect_err("IMDS does not know the identity");
    assert_eq!(err.http_status(), 404, "{err}");
    let (code, description) = err.imds_error();
    assert_eq!(code, "invalid_request");
    assert!(description.contains(&missing.client_id), "{description}");
    assert!(
        description.contains("not assigned to this node"),
        "{description}"
    );
    assert_eq!(
        recorder.calls(),
        vec![(Upstream::Imds, Some(400))],
        "400 is not retried"
    );
    assert_eq!(svc.cached_len(), 0);

    // Once the identity is assigned, the same key works: errors are not cached.
    emu.assign_identity(missing.clone());
    let (_, status) = svc
        .token("ns/late", &user_assigned(&missing), VAULT)
        .await
        .expect("assigned now");
    assert_eq!(status, CacheStatus::Miss);
}

#[tokio::test]
async fn node_without_identity_passes_imds_400_through() {
    let config = EmulatorConfig {
        system_assigned: None,
        ..EmulatorConfig::default()
    };
    let emu = emulator(config).await;
    let (svc, _) = service_with(config_for(&emu), None);
    let err = svc
        .token("node", &Credential::NodeIdentity { selector: None }, VAULT)
        .await
        .expect_err("no system identity");
    assert_eq!(err.http_status(), 400, "{err}");
    assert_eq!(
        err.imds_error(),
        ("invalid_request", "Identity not found".to_owned())
    );
}

#[tokio::test]
async fn other_upstream_4xx_pass_through_with_their_json() {
    let ua = ManagedIdentity::user_assigned("res");
    let config = EmulatorConfig {
        known_resources: Some(vec![VAULT.to_owned()]),
        ..EmulatorConfig::default()
    }
    .with_user_assigned(ua.clone());
    let emu = emulator(config).await;
    let (svc, _) = service_with(config_for(&emu), None);
    let err = svc
        .token("ns/id", &user_assigned(&ua), "https://unknown.example.com")
        .await
        .expect_err("unknown resource");
    assert_eq!(err.http_status(), 400);
    let (code, description) = err.imds_error();
    assert_eq!(code, "invalid_resource");
    assert!(description.starts_with("AADSTS500011"), "{description}");
    let body = err.upstream_body().expect("upstream JSON kept");
    assert_eq!(body["error"], "invalid_resource");
    assert_eq!(
        emu.calls(Endpoint::Imds, &ua.client_id, "https://unknown.example.com"),
        1
    );
}
