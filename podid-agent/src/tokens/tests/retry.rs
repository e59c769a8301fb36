//! Retries, backoff, Retry-After, time budget, and errors after retries.

use std::time::{Duration, Instant, SystemTime};

use podid_tests::emulator::{Endpoint, Fault, ManagedIdentity};

use super::*;
use crate::tokens::{TokenConfig, TokenError, Upstream, test_support::*};

#[tokio::test]
async fn transient_failures_are_retried() {
    let ua = ManagedIdentity::user_assigned("retry");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::status(503).times(2));
    let (svc, recorder) = service_with(config_for(&emu), None);
    svc.token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect("third attempt works");
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 3);
    assert_eq!(
        recorder.calls(),
        vec![
            (Upstream::Imds, Some(503)),
            (Upstream::Imds, Some(503)),
            (Upstream::Imds, Some(200))
        ]
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let ua = ManagedIdentity::user_assigned("throttled");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::throttle(1).times(1));
    let (svc, _) = service_with(config_for(&emu), None);
    let started = Instant::now();
    svc.token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect("after the wait");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited Retry-After"
    );
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 2);

    // The HTTP-date form.
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    emu.inject(Fault::status(503).times(1).retry_after(&at));
    let started = Instant::now();
    svc.token("ns/id", &user_assigned(&ua), SQL)
        .await
        .expect("after the date");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited until the date"
    );
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, SQL), 2);
}

#[tokio::test]
async fn a_retry_after_beyond_the_budget_is_handed_to_the_pod() {
    let ua = ManagedIdentity::user_assigned("busy");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::throttle(30));
    let config = TokenConfig {
        max_total_wait: Duration::from_secs(3),
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, None);
    let started = Instant::now();
    let err = svc
        .token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect_err("throttled");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "did not sit out the wait"
    );
    assert!(matches!(err, TokenError::Throttled { .. }), "{err}");
    assert_eq!(err.http_status(), 429);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 1);
}

#[tokio::test]
async fn persistent_server_errors_become_503_after_max_attempts() {
    let ua = ManagedIdentity::user_assigned("down");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::status(500).for_client(&ua.client_id));
    let (svc, _) = service_with(config_for(&emu), None);
    let err = svc
        .token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect_err("down");
    assert_eq!(err.http_status(), 503, "{err}");
    assert!(
        matches!(
            err,
            TokenError::Unavailable {
                attempts: 3,
                status: Some(500),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 3);

    emu.clear_faults();
    emu.inject(Fault::status(410).for_client(&ua.client_id));
    let err = svc
        .token("ns/id", &user_assigned(&ua), SQL)
        .await
        .expect_err("gone");
    assert_eq!(err.http_status(), 503, "{err}");
    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, SQL), 3);
}

#[tokio::test]
async fn the_time_budget_bounds_a_call() {
    let ua = ManagedIdentity::user_assigned("slow-retry");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::status(503).retry_after("1"));
    let config = TokenConfig {
        max_attempts: 20,
        max_total_wait: Duration::from_millis(2500),
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, None);
    let started = Instant::now();
    let err = svc
        .token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect_err("budget");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(3200), "took {took:?}");
    assert_eq!(err.http_status(), 503, "{err}");
    assert_eq!(
        err.retry_after(),
        Some(Duration::from_secs(1)),
        "upstream's Retry-After"
    );
    let calls = emu.calls(Endpoint::Imds, &ua.client_id, VAULT);
    assert!(
        (2..=3).contains(&calls),
        "{calls} calls in 2.5 s with Retry-After 1"
    );
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let ua = ManagedIdentity::user_assigned("stalled");
    let emu = emulator_with(&[&ua]).await;
    emu.inject(Fault::delay(Duration::from_secs(5)));
    let config = TokenConfig {
        upstream_timeout: Duration::from_millis(300),
        max_attempts: 2,
        ..config_for(&emu)
    };
    let (svc, recorder) = service_with(config, None);
    let started = Instant::now();
    let err = svc
        .token("ns/id", &user_assigned(&ua), VAULT)
        .await
        .expect_err("stalled");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "per-attempt timeout applied"
    );
    assert!(
        matches!(
            err,
            TokenError::Unavailable {
                status: None,
                attempts: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.http_status(), 503);
    assert_eq!(
        recorder.calls(),
        vec![(Upstream::Imds, None), (Upstream::Imds, None)]
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_503() {
    // A port on loopback that nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let config = TokenConfig {
        imds_endpoint: format!("http://{closed}"),
        aad_authority: format!("http://{closed}"),
        retry_base_delay: Duration::from_millis(10),
        max_attempts: 3,
        ..TokenConfig::default()
    };
    let (svc, recorder) = service_with(config, None);
    let err = svc
        .token("ns/id", &Credential::NodeIdentity { selector: None }, VAULT)
        .await
        .expect_err("nothing listens");
    assert_eq!(err.http_status(), 503, "{err}");
    assert!(
        matches!(
            err,
            TokenError::Unavailable {
                status: None,
                attempts: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(recorder.calls().len(), 3);
}

#[tokio::test]
async fn definitive_refusals_are_not_retried() {
    let ua = ManagedIdentity::user_assigned("denied");
    let emu = emulator_with(&[&ua]).await;
    for status in [400, 401, 403] {
        emu.reset();
        emu.inject(Fault::status(status).times(1));
        let (svc, _) = service_with(config_for(&emu), None);
        let err = svc
            .token("ns/id", &user_assigned(&ua), VAULT)
            .await
            .expect_err("refused");
        assert_eq!(err.http_status(), status, "{err}");
        assert_eq!(
            emu.calls(Endpoint::Imds, &ua.client_id, VAULT),
            1,
            "{status} retried"
        );
    }
}
