//! Service principals through Entra ID, secrets from files, and hygiene:
//! tokens and secrets never reach logs, errors or Debug output.

use std::time::Duration;

use podid_tests::emulator::{
    EmulatorConfig, Endpoint, ManagedIdentity, RegisteredClient, TestCertificate, random_guid,
    token_claims,
};

use super::*;
use crate::tokens::{CacheStatus, SecretRef, TokenConfig, TokenError, Upstream, test_support::*};

const TENANT: &str = "0b6b2c14-5a0c-4a43-9d1e-3f1f6d6c7e01";
const SECRET: &str = "s3cr3t~value.with_chars";
const PASSWORD: &str = "p12-password";

fn secret_ref(name: &str) -> SecretRef {
    SecretRef {
        namespace: "ns".into(),
        name: name.into(),
    }
}

fn secret_credential(client_id: &str, secret: &str, authority: Option<String>) -> Credential {
    Credential::ClientSecret {
        tenant_id: TENANT.into(),
        client_id: client_id.into(),
        authority,
        secret: secret_ref(secret),
    }
}

fn cert_credential(client_id: &str, secret: &str) -> Credential {
    Credential::ClientCertificate {
        tenant_id: TENANT.into(),
        client_id: client_id.into(),
        authority: None,
        secret: secret_ref(secret),
    }
}

#[tokio::test]
async fn client_secret_credentials() {
    let client_id = random_guid();
    let emu = emulator(
        EmulatorConfig::default()
            .with_client(RegisteredClient::with_secret(TENANT, &client_id, SECRET)),
    )
    .await;
    let dir = TempDir::new("entra-secret");
    dir.write("ns/sp/clientSecret", format!("{SECRET}\n").as_bytes());
    dir.write("ns/sp-wrong/clientSecret", b"not-the-secret");
    let (svc, recorder) = service_with(config_for(&emu), Some(dir.path()));

    let cred = secret_credential(&client_id, "sp", None);
    let (token, status) = svc
        .token("ns/sp-identity", &cred, VAULT)
        .await
        .expect("token");
    assert_eq!(status, CacheStatus::Miss);
    let claims = token_claims(&token.access_token).expect("claims");
    assert_eq!(claims["appid"], client_id.as_str());
    assert_eq!(claims["aud"], VAULT);
    assert_eq!(token.client_id, client_id);
    let (_, status) = svc
        .token("ns/sp-identity", &cred, VAULT)
        .await
        .expect("cached");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(emu.calls(Endpoint::EntraV1, &client_id, VAULT), 1);
    assert_eq!(recorder.calls(), vec![(Upstream::EntraId, Some(200))]);

    let wrong = secret_credential(&client_id, "sp-wrong", None);
    let err = svc
        .token("ns/wrong", &wrong, VAULT)
        .await
        .expect_err("wrong secret");
    assert_eq!(err.http_status(), 401, "{err}");
    let (code, description) = err.imds_error();
    assert_eq!(code, "invalid_client");
    assert!(description.starts_with("AADSTS7000215"), "{description}");
    assert_eq!(
        err.upstream_body().map(|b| b["error_codes"][0].clone()),
        Some(7_000_215.into())
    );
    assert!(!format!("{err} {err:?} {description}").contains("not-the-secret"));
    assert_eq!(
        emu.calls(Endpoint::EntraV1, &client_id, VAULT),
        2,
        "401 is not retried"
    );

    let missing = secret_credential(&client_id, "absent", None);
    let err = svc
        .token("ns/missing", &missing, VAULT)
        .await
        .expect_err("no secret");
    assert_eq!(err.http_status(), 403, "{err}");
    let (_, description) = err.imds_error();
    assert!(
        description.contains("ns/absent"),
        "names the secret: {description}"
    );
    assert_eq!(
        emu.calls(Endpoint::EntraV1, &client_id, VAULT),
        2,
        "no upstream call"
    );
}

#[tokio::test]
async fn client_certificate_credentials() {
    let cert = TestCertificate::shared().expect("certificate");
    let client_id = random_guid();
    let emu = emulator(
        EmulatorConfig::default().with_client(RegisteredClient::with_certificate(
            TENANT, &client_id, &cert,
        )),
    )
    .await;
    let dir = TempDir::new("entra-cert");
    let bundle = cert.pkcs12(PASSWORD).expect("pkcs12");
    dir.write("ns/sp-cert/certificate", &bundle);
    dir.write("ns/sp-cert/password", format!("{PASSWORD}\n").as_bytes());
    dir.write("ns/sp-badpw/certificate", &bundle);
    dir.write("ns/sp-badpw/password", b"wrong");
    let (svc, _) = service_with(config_for(&emu), Some(dir.path()));

    let (token, _) = svc
        .token(
            "ns/cert-identity",
            &cert_credential(&client_id, "sp-cert"),
            SQL,
        )
        .await
        .expect("the emulator verified the assertion");
    let claims = token_claims(&token.access_token).expect("claims");
    assert_eq!(claims["appid"], client_id.as_str());
    assert_eq!(claims["aud"], SQL);
    assert_eq!(emu.calls(Endpoint::EntraV1, &client_id, SQL), 1);

    let err = svc
        .token("ns/badpw", &cert_credential(&client_id, "sp-badpw"), SQL)
        .await
        .expect_err("wrong password");
    assert_eq!(err.http_status(), 403, "{err}");
    assert!(matches!(err, TokenError::Certificate { .. }), "{err}");
    assert!(err.to_string().contains("ns/sp-badpw"), "{err}");
    assert!(!err.to_string().contains(PASSWORD) && !err.to_string().contains("wrong\""));
    assert_eq!(
        emu.calls(Endpoint::EntraV1, &client_id, SQL),
        1,
        "no upstream call"
    );

    // Another registered certificate does not verify this key's assertions.
    let other = TestCertificate::generate("other").expect("other certificate");
    let stranger = random_guid();
    emu.register_client(&RegisteredClient::with_certificate(
        TENANT, &stranger, &other,
    ))
    .expect("register");
    let err = svc
        .token("ns/stranger", &cert_credential(&stranger, "sp-cert"), SQL)
        .await
        .expect_err("signed by the wrong key");
    assert_eq!(err.http_status(), 401, "{err}");
    assert!(err.imds_error().1.starts_with("AADSTS700027"), "{err}");
}

#[tokio::test]
async fn a_credential_may_carry_its_own_authority() {
    let client_id = random_guid();
    let emu = emulator(
        EmulatorConfig::default()
            .with_client(RegisteredClient::with_secret(TENANT, &client_id, SECRET)),
    )
    .await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let dir = TempDir::new("entra-authority");
    dir.write("ns/sp", SECRET.as_bytes());
    let config = TokenConfig {
        aad_authority: format!("http://{closed}"),
        allowed_authorities: vec![emu.url()],
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, Some(dir.path()));
    let own = secret_credential(&client_id, "sp", Some(format!("{}/", emu.url())));
    svc.token("ns/own", &own, VAULT)
        .await
        .expect("the credential's authority is used");
    // An authority nobody allowed is never contacted: the secret would go
    // to whoever listens there.
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let foreign_url = format!("https://{}", foreign.local_addr().expect("addr"));
    let err = svc
        .token(
            "ns/foreign",
            &secret_credential(&client_id, "sp", Some(foreign_url)),
            VAULT,
        )
        .await
        .expect_err("an unlisted authority is refused");
    assert_eq!(err.http_status(), 403, "{err}");
    assert!(
        err.to_string().contains("not a known Entra ID authority"),
        "{err}"
    );
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), foreign.accept())
            .await
            .is_err(),
        "the foreign authority was contacted"
    );
    let default = secret_credential(&client_id, "sp", None);
    let err = svc
        .token("ns/default", &default, VAULT)
        .await
        .expect_err("default is closed");
    assert_eq!(err.http_status(), 503, "{err}");
}

#[tokio::test(flavor = "current_thread")]
async fn tokens_and_secrets_never_reach_logs_errors_or_debug_output() {
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // A callsite that another test thread registered while this subscriber
    // was being installed may have cached "never"; recompute every interest
    // now that this subscriber is in place.
    tracing::callsite::rebuild_interest_cache();

    let cert = TestCertificate::shared().expect("certificate");
    let ua = ManagedIdentity::user_assigned("hygiene");
    let (secret_client, cert_client) = (random_guid(), random_guid());
    let emu = emulator(
        EmulatorConfig::default()
            .with_user_assigned(ua.clone())
            .with_client(RegisteredClient::with_secret(
                TENANT,
                &secret_client,
                SECRET,
            ))
            .with_client(RegisteredClient::with_certificate(
                TENANT,
                &cert_client,
                &cert,
            ))
            .with_token_lifetime(Duration::from_secs(4)),
    )
    .await;
    let dir = TempDir::new("hygiene");
    dir.write("ns/sp", SECRET.as_bytes());
    dir.write(
        "ns/sp-cert/certificate",
        &cert.pkcs12(PASSWORD).expect("pkcs12"),
    );
    dir.write("ns/sp-cert/password", PASSWORD.as_bytes());
    let config = TokenConfig {
        refresh_ahead: Duration::ZERO,
        safety_margin: Duration::from_millis(500),
        ..config_for(&emu)
    };
    let (svc, _) = service_with(config, Some(dir.path()));

    let mut outputs = Vec::new();
    for (identity, credential) in [
        ("ns/mi", user_assigned(&ua)),
        ("ns/sp", secret_credential(&secret_client, "sp", None)),
        ("ns/cert", cert_credential(&cert_client, "sp-cert")),
    ] {
        // Again before each fetch: a thread of another test that began
        // registering the "token fetched" callsite before this subscriber
        // existed (a heavily loaded machine can stall it there) would
        // otherwise leave it cached as "never".
        tracing::callsite::rebuild_interest_cache();
        let (token, _) = svc
            .token(identity, &credential, VAULT)
            .await
            .expect("token");
        outputs.push(format!("{token:?} {credential:?} {svc:?}"));
        assert!(
            capture.text().contains(&token.fingerprint),
            "logs carry the fingerprint"
        );
    }
    // Background refreshes log too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = svc
        .token(
            "ns/x",
            &secret_credential(&secret_client, "absent", None),
            VAULT,
        )
        .await
        .expect_err("no secret");
    outputs.push(format!("{err} {err:?} {:?}", err.imds_error()));

    let issued = emu.issued_tokens();
    assert!(
        issued.len() >= 4,
        "initial tokens and refreshes: {}",
        issued.len()
    );
    let logs = capture.text();
    assert!(logs.contains("token fetched"), "the capture works");
    for token in &issued {
        assert!(!logs.contains(&token.access_token), "a token was logged");
        for text in &outputs {
            assert!(
                !text.contains(&token.access_token),
                "a token in Debug/error output"
            );
        }
    }
    for secret in [SECRET, PASSWORD] {
        assert!(!logs.contains(secret), "a secret was logged");
        assert!(
            outputs.iter().all(|t| !t.contains(secret)),
            "a secret in output"
        );
    }
}
