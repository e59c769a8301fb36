//! Single flight, the upstream concurrency cap, and isolation of identities.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use podid_tests::emulator::{Endpoint, Fault, ManagedIdentity};
use tokio::task::JoinSet;

use super::*;
use crate::tokens::{CacheStatus, TokenConfig, TokenError, test_support::*};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_make_one_upstream_call() {
    let ua = ManagedIdentity::user_assigned("hot");
    let emu = emulator_with(&[&ua]).await;
    // Slow upstream, so all 200 requests arrive while the call is open.
    emu.inject(Fault::delay(Duration::from_millis(300)));
    let (svc, _) = service_with(config_for(&emu), None);
    let credential = user_assigned(&ua);
    let mut tasks = JoinSet::new();
    for _ in 0..200 {
        let (svc, credential) = (svc.clone(), credential.clone());
        tasks.spawn(async move { svc.token("ns/hot", &credential, VAULT).await });
    }
    let mut fingerprints = HashSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (token, _) = joined.expect("task").expect("every waiter gets the token");
        fingerprints.insert(token.fingerprint.clone());
    }
    assert_eq!(
        emu.calls(Endpoint::Imds, &ua.client_id, VAULT),
        1,
        "one upstream call"
    );
    assert_eq!(fingerprints.len(), 1, "everyone got the same token");
    assert_eq!(svc.cached_len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_call_fails_every_waiter_and_does_not_poison_the_key() {
    let ua = ManagedIdentity::user_assigned("flaky");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::delay(Duration::from_millis(300)).times(1));
    emu.inject(Fault::status(403).times(1).for_client(&ua.client_id));
    let (svc, _) = service_with(config_for(&emu), None);
    let credential = user_assigned(&ua);
    let mut tasks = JoinSet::new();
    for _ in 0..50 {
        let (svc, credential) = (svc.clone(), credential.clone());
        tasks.spawn(async move { svc.token("ns/flaky", &credential, VAULT).await });
    }
    while let Some(joined) = tasks.join_next().await {
        let err = joined.expect("task").expect_err("the shared call failed");
        assert_eq!(err.http_status(), 403, "{err}");
        assert!(
            matches!(err, TokenError::Rejected { status: 403, .. }),
            "{err}"
        );
    }
    assert_eq!(
        emu.calls(Endpoint::Imds, &ua.client_id, VAULT),
        1,
        "403 is definitive"
    );
    assert_eq!(svc.cached_len(), 0, "failures are not cached");
    let (_, status) = svc
        .token("ns/flaky", &credential, VAULT)
        .await
        .expect("next call works");
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_concurrency_is_capped() {
    let ua = ManagedIdentity::user_assigned("capped");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::delay(Duration::from_millis(300)));
    let config = TokenConfig {
        upstream_concurrency: 2,
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, None);
    let credential = user_assigned(&ua);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..6 {
        let (svc, credential) = (svc.clone(), credential.clone());
        tasks.spawn(async move {
            svc.token(
                "ns/capped",
                &credential,
                &format!("https://r{i}.example.com"),
            )
            .await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("task").expect("token");
    }
    assert_eq!(emu.calls_to(Endpoint::Imds), 6, "six distinct keys");
    assert_eq!(
        emu.max_concurrent(),
        2,
        "never more than 2 upstream calls at once"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "three waves of two"
    );
}

#[tokio::test]
async fn an_upstream_outage_for_one_identity_never_yields_another_identitys_token() {
    let a = ManagedIdentity::user_assigned("a");
    let b = ManagedIdentity::user_assigned("b");
    let emu = emulator_with(&[&a, &b]).await;
    let (svc, _) = service_with(config_for(&emu), None);
    let (b_token, _) = svc
        .token("ns/b", &user_assigned(&b), VAULT)
        .await
        .expect("b");

    emu.inject(Fault::status(503).for_client(&a.client_id));
    let err = svc
        .token("ns/a", &user_assigned(&a), VAULT)
        .await
        .expect_err("A's upstream is down: an error, never B's token");
    assert_eq!(err.http_status(), 503, "{err}");
    assert!(err.retry_after().is_some());
    assert!(!err.to_string().contains(&b_token.access_token));
    let (still_b, status) = svc
        .token("ns/b", &user_assigned(&b), VAULT)
        .await
        .expect("b");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(still_b.client_id, b.client_id);

    // Two identity objects with the same credential are separate entries.
    let (x, _) = svc
        .token("ns/x", &user_assigned(&b), VAULT)
        .await
        .expect("x");
    assert_ne!(x.fingerprint, b_token.fingerprint);
    assert_eq!(emu.calls(Endpoint::Imds, &b.client_id, VAULT), 2);
    svc.forget_identity("ns/x");
    let (_, status) = svc
        .token("ns/x", &user_assigned(&b), VAULT)
        .await
        .expect("x again");
    assert_eq!(status, CacheStatus::Miss, "forgotten");
    let (_, status) = svc
        .token("ns/b", &user_assigned(&b), VAULT)
        .await
        .expect("b again");
    assert_eq!(status, CacheStatus::Hit, "other identities keep theirs");
}
