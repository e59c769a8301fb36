//! Refresh ahead of expiry, the safety margin, failed refreshes, and the
//! bound on cached tokens. Tokens here live a few seconds.

use std::time::Duration;

use podid_tests::emulator::{EmulatorConfig, Endpoint, Fault, ManagedIdentity};

use super::*;
use crate::tokens::{CacheStatus, TokenConfig, test_support::*};

fn short_lived(ua: &ManagedIdentity, lifetime_secs: u64) -> EmulatorConfig {
    EmulatorConfig::default()
        .with_user_assigned(ua.clone())
        .with_token_lifetime(Duration::from_secs(lifetime_secs))
}

fn refresh_config(emu: &podid_tests::emulator::EmulatorHandle) -> TokenConfig {
    TokenConfig {
        refresh_ahead: Duration::ZERO,
        safety_margin: Duration::from_millis(500),
        refresh_retry: Duration::from_millis(300),
        ..config_for(emu)
    }
}

#[tokio::test]
async fn tokens_are_refreshed_in_the_background_before_expiry() {
    let ua = ManagedIdentity::user_assigned("refresh");
    let emu = emulator(short_lived(&ua, 6)).await;
    let (svc, _) = service_with(refresh_config(&emu), None);
    let cred = user_assigned(&ua);
    let (first, _) = svc.token("ns/id", &cred, VAULT).await.expect("first");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (again, status) = svc.token("ns/id", &cred, VAULT).await.expect("again");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(again.fingerprint, first.fingerprint);
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 1);

    // The refresh point is at most 4 s in (a third of the lifetime left);
    // no request is made in between.
    tokio::time::sleep(Duration::from_millis(3800)).await;
    assert_eq!(
        emu.calls(Endpoint::Imds, &ua.client_id, VAULT),
        2,
        "refreshed without a request"
    );
    let (fresh, status) = svc.token("ns/id", &cred, VAULT).await.expect("fresh");
    assert_eq!(status, CacheStatus::Hit, "the refreshed token was ready");
    assert_ne!(fresh.fingerprint, first.fingerprint);
    assert!(fresh.expires_on > first.expires_on);
}

#[tokio::test]
async fn idle_tokens_are_dropped_instead_of_refreshed() {
    let ua = ManagedIdentity::user_assigned("idle");
    let emu = emulator(short_lived(&ua, 4)).await;
    let (svc, _) = service_with(refresh_config(&emu), None);
    svc.token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect("token");
    // First refresh point (~2.7 s): asked for since fetched, so refreshed.
    // Second (~5.3 s): not asked for since, so dropped.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 2);
    assert_eq!(svc.cached_len(), 0, "the idle token was dropped");
    let (_, status) = svc
        .token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect("token");
    assert_eq!(status, CacheStatus::Miss);
}

#[tokio::test]
async fn a_failed_refresh_keeps_serving_the_old_token_until_the_margin() {
    let ua = ManagedIdentity::user_assigned("keep");
    let emu = emulator(short_lived(&ua, 6)).await;
    let config = TokenConfig {
        safety_margin: Duration::from_secs(1),
        ..refresh_config(&emu)
    };
    let (svc, _) = service_with(config, None);
    let cred = user_assigned(&ua);
    let (old, _) = svc.token("ns/id", &cred, VAULT).await.expect("first");
    emu.inject(Fault::status(503).for_client(&ua.client_id));

    // Past the refresh point (at most 4 s in, at least 2 s before expiry):
    // the refresh fails, the old token is still served.
    let wait = remaining(&old).saturating_sub(Duration::from_millis(1700));
    tokio::time::sleep(wait).await;
    let (served, status) = svc.token("ns/id", &cred, VAULT).await.expect("old token");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(served.fingerprint, old.fingerprint);
    assert!(
        remaining(&served) > Duration::from_secs(1),
        "outside the margin"
    );
    let calls = emu.calls(Endpoint::Imds, &ua.client_id, VAULT);
    assert!(calls >= 2, "a refresh was attempted ({calls} calls)");

    // Inside the safety margin the old token is never served.
    tokio::time::sleep(remaining(&old).saturating_sub(Duration::from_millis(800))).await;
    let err = svc
        .token("ns/id", &cred, VAULT)
        .await
        .expect_err("no servable token and upstream down");
    assert_eq!(err.http_status(), 503, "{err}");
    let calls = emu.calls(Endpoint::Imds, &ua.client_id, VAULT);
    assert!(
        calls <= 1 + 3 * 6,
        "refresh retries are spaced out ({calls} calls)"
    );

    emu.clear_faults();
    let (new, status) = svc.token("ns/id", &cred, VAULT).await.expect("recovered");
    assert_eq!(status, CacheStatus::Miss);
    assert_ne!(new.fingerprint, old.fingerprint);
}

#[tokio::test]
async fn a_token_within_the_safety_margin_is_never_served() {
    let ua = ManagedIdentity::user_assigned("margin");
    let emu = emulator(short_lived(&ua, 3)).await;
    let margin = Duration::from_millis(1500);
    let config = TokenConfig {
        safety_margin: margin,
        ..refresh_config(&emu)
    };
    let (svc, _) = service_with(config, None);
    let cred = user_assigned(&ua);
    let mut hits = 0;
    for _ in 0..40 {
        let (token, status) = svc.token("ns/id", &cred, VAULT).await.expect("token");
        if status == CacheStatus::Hit {
            hits += 1;
            assert!(
                remaining(&token) > margin,
                "served a token with {:?} left",
                remaining(&token)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hits > 0, "some requests were served from the cache");
    assert!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT) >= 2);
}

#[tokio::test]
async fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
    let ua = ManagedIdentity::user_assigned("lru");
    let emu = emulator_with(&[&ua]).await;
    let config = TokenConfig {
        max_entries: 3,
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, None);
    let cred = user_assigned(&ua);
    let r = |i: u32| format!("https://r{i}.example.com");
    for i in 1..=3 {
        svc.token("ns/id", &cred, &r(i)).await.expect("token");
    }
    assert_eq!(svc.cached_len(), 3);
    let (_, status) = svc.token("ns/id", &cred, &r(1)).await.expect("r1");
    assert_eq!(status, CacheStatus::Hit, "r1 is now the most recently used");
    svc.token("ns/id", &cred, &r(4)).await.expect("r4");
    assert_eq!(svc.cached_len(), 3, "bounded");
    for i in [1, 3, 4] {
        let (_, status) = svc.token("ns/id", &cred, &r(i)).await.expect("cached");
        assert_eq!(status, CacheStatus::Hit, "r{i} stays cached");
    }
    let (_, status) = svc.token("ns/id", &cred, &r(2)).await.expect("r2");
    assert_eq!(status, CacheStatus::Miss, "r2 was evicted");
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, &r(2)), 2);
}
