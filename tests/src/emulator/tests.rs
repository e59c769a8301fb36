//! The emulator through a real socket on 127.0.0.1 with a real HTTP client.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};

use super::*;

const VAULT: &str = "https://vault.azure.net";
const SQL: &str = "https://database.windows.net/";
const IMDS_PATH: &str = "/metadata/identity/oauth2/token";

struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl TestClient {
    fn new(emu: &EmulatorHandle) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: emu.url(),
        }
    }

    async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Result<Reply, hyper_util::client::legacy::Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some((content_type, text)) => {
                req = req.header("content-type", content_type);
                Full::new(Bytes::from(text))
            }
            None => Full::new(Bytes::new()),
        };
        let resp = self
            .client
            .request(req.body(body).expect("valid request"))
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("read body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, String)>,
    ) -> Reply {
        self.try_send(method, path, headers, body)
            .await
            .expect("HTTP exchange with the emulator")
    }

    async fn imds(&self, query: &str) -> Reply {
        self.send(
            Method::GET,
            &format!("{IMDS_PATH}?{query}"),
            &[("Metadata", "true")],
            None,
        )
        .await
    }

    async fn form(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        self.send(
            Method::POST,
            path,
            &[],
            Some(("application/x-www-form-urlencoded", body)),
        )
        .await
    }
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn start(config: EmulatorConfig) -> (EmulatorHandle, TestClient) {
    let emu = Emulator::start(config).await.expect("start emulator");
    let client = TestClient::new(&emu);
    (emu, client)
}

fn assert_imds_error(reply: &Reply, status: u16, error: &str, description: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(reply.body["error"], error, "body: {}", reply.body);
    assert_eq!(
        reply.body["error_description"], description,
        "body: {}",
        reply.body
    );
    assert_eq!(
        reply.headers["content-type"], "application/json; charset=utf-8",
        "IMDS errors are JSON"
    );
}

#[tokio::test]
async fn imds_issues_string_typed_tokens_for_assigned_identities() {
    let ua = ManagedIdentity::user_assigned("sqlpodid");
    let config = EmulatorConfig::default()
        .with_user_assigned(ua.clone())
        .with_token_lifetime(Duration::from_secs(1234));
    let (emu, client) = start(config).await;
    let system = emu.system_assigned().expect("system identity by default");

    let by_client = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&client_id={}",
            enc(VAULT),
            ua.client_id
        ))
        .await;
    assert_eq!(by_client.status, 200, "{}", by_client.body);
    for field in [
        "access_token",
        "refresh_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
        "client_id",
    ] {
        assert!(
            by_client.body[field].is_string(),
            "IMDS returns {field} as a string: {}",
            by_client.body
        );
    }
    assert_eq!(by_client.body["refresh_token"], "");
    assert_eq!(by_client.body["token_type"], "Bearer");
    assert_eq!(by_client.body["resource"], VAULT);
    assert_eq!(by_client.body["client_id"], ua.client_id.as_str());
    assert_eq!(by_client.body["expires_in"], "1234");
    let expires_on: u64 = by_client.body["expires_on"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric expires_on");
    let not_before: u64 = by_client.body["not_before"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric not_before");
    assert_eq!(expires_on - not_before, 1234);
    assert!(expires_on > mint::now_unix() + 1200);
    let claims =
        token_claims(by_client.body["access_token"].as_str().expect("token")).expect("claims");
    assert_eq!(claims["appid"], ua.client_id.as_str());
    assert_eq!(claims["oid"], ua.object_id.as_str());
    assert_eq!(claims["aud"], VAULT);

    // The same identity named by object id and by resource id (both spellings).
    for param in [
        format!("object_id={}", ua.object_id),
        format!("msi_res_id={}", enc(&ua.resource_id)),
        format!("mi_res_id={}", enc(&ua.resource_id)),
    ] {
        let reply = client
            .imds(&format!(
                "api-version=2019-08-01&resource={}&{param}",
                enc(VAULT)
            ))
            .await;
        assert_eq!(reply.status, 200, "{param}: {}", reply.body);
        assert_eq!(reply.body["client_id"], ua.client_id.as_str(), "{param}");
        assert_ne!(
            reply.body["access_token"], by_client.body["access_token"],
            "every issuance is a distinct token"
        );
    }

    // No identity named: the system-assigned identity.
    let sys = client
        .imds(&format!("api-version=2018-02-01&resource={}", enc(VAULT)))
        .await;
    assert_eq!(sys.status, 200, "{}", sys.body);
    assert_eq!(sys.body["client_id"], system.client_id.as_str());

    assert_eq!(emu.calls(Endpoint::Imds, &ua.client_id, VAULT), 4);
    assert_eq!(emu.calls(Endpoint::Imds, &system.client_id, VAULT), 1);
    assert_eq!(emu.issued_tokens().len(), 5);
}

#[tokio::test]
async fn imds_decodes_resources_sent_raw_or_percent_encoded() {
    let (emu, client) = start(EmulatorConfig::default()).await;
    let system = emu.system_assigned().expect("system identity");
    // Python sends the resource raw, Node and Rust percent-encode it.
    let raw = client
        .imds(&format!("api-version=2018-02-01&resource={SQL}"))
        .await;
    let encoded = client
        .imds(&format!("api-version=2018-02-01&resource={}", enc(SQL)))
        .await;
    assert_eq!(raw.status, 200, "{}", raw.body);
    assert_eq!(encoded.status, 200, "{}", encoded.body);
    assert_eq!(raw.body["resource"], SQL);
    assert_eq!(encoded.body["resource"], SQL);
    assert_eq!(emu.calls(Endpoint::Imds, &system.client_id, SQL), 2);
}

#[tokio::test]
async fn imds_checks_the_metadata_header_before_anything_else() {
    let (_emu, client) = start(EmulatorConfig::default()).await;
    // Node's DefaultAzureCredential probe: no header, no query at all.
    let probe = client.send(Method::GET, IMDS_PATH, &[], None).await;
    assert_imds_error(
        &probe,
        400,
        "invalid_request",
        "Required metadata header not specified",
    );
    let wrong = client
        .send(
            Method::GET,
            &format!("{IMDS_PATH}?api-version=2018-02-01&resource=x"),
            &[("Metadata", "false")],
            None,
        )
        .await;
    assert_imds_error(
        &wrong,
        400,
        "invalid_request",
        "Required metadata header not specified",
    );
    // The Rust SDK's lower-case header is the same header.
    let lower = client
        .send(
            Method::GET,
            &format!("{IMDS_PATH}?api-version=2019-08-01&resource={}", enc(VAULT)),
            &[("metadata", "true")],
            None,
        )
        .await;
    assert_eq!(lower.status, 200, "{}", lower.body);
}

#[tokio::test]
async fn imds_rejects_malformed_requests_like_imds() {
    let ua = ManagedIdentity::user_assigned("known");
    let (emu, client) = start(EmulatorConfig::default().with_user_assigned(ua.clone())).await;
    let xff = client
        .send(
            Method::GET,
            &format!("{IMDS_PATH}?api-version=2018-02-01&resource={}", enc(VAULT)),
            &[("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")],
            None,
        )
        .await;
    assert_eq!(xff.status, 400, "{}", xff.body);
    assert_eq!(xff.body["error"], "invalid_request");

    let post = client
        .send(
            Method::POST,
            &format!("{IMDS_PATH}?api-version=2018-02-01&resource={}", enc(VAULT)),
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert_eq!(post.status, 405, "{}", post.body);

    let no_version = client.imds(&format!("resource={}", enc(VAULT))).await;
    assert_imds_error(
        &no_version,
        400,
        "invalid_request",
        "Required query variable 'api-version' is missing",
    );
    let bad_version = client
        .imds(&format!("api-version=1999-01-01&resource={}", enc(VAULT)))
        .await;
    assert_imds_error(&bad_version, 400, "invalid_request", "Invalid api-version");
    let no_resource = client.imds("api-version=2018-02-01").await;
    assert_imds_error(
        &no_resource,
        400,
        "invalid_request",
        "Required query variable 'resource' is missing",
    );
    let duplicate = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&resource={}",
            enc(VAULT),
            enc(SQL)
        ))
        .await;
    assert_eq!(duplicate.status, 400, "{}", duplicate.body);
    let two_ids = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&client_id={}&object_id={}",
            enc(VAULT),
            ua.client_id,
            ua.object_id
        ))
        .await;
    assert_eq!(two_ids.status, 400, "{}", two_ids.body);

    let unknown = random_guid();
    let not_found = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&client_id={unknown}",
            enc(VAULT)
        ))
        .await;
    assert_imds_error(&not_found, 400, "invalid_request", "Identity not found");
    assert_eq!(
        emu.calls(Endpoint::Imds, &unknown, VAULT),
        1,
        "unknown identities are counted under the id asked for"
    );
    assert!(emu.issued_tokens().is_empty(), "no request above succeeds");

    // Identity assignment changes at run time (as the controller's would).
    emu.unassign_identity(&ua.client_id);
    let gone = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&client_id={}",
            enc(VAULT),
            ua.client_id
        ))
        .await;
    assert_imds_error(&gone, 400, "invalid_request", "Identity not found");
    emu.assign_identity(ua.clone());
    let back = client
        .imds(&format!(
            "api-version=2018-02-01&resource={}&client_id={}",
            enc(VAULT),
            ua.client_id
        ))
        .await;
    assert_eq!(back.status, 200, "{}", back.body);
}

#[tokio::test]
async fn a_vm_without_system_identity_has_no_default_identity() {
    let config = EmulatorConfig {
        system_assigned: None,
        ..EmulatorConfig::default()
    };
    let (_emu, client) = start(config).await;
    let reply = client
        .imds(&format!("api-version=2018-02-01&resource={}", enc(VAULT)))
        .await;
    assert_imds_error(&reply, 400, "invalid_request", "Identity not found");
}

#[tokio::test]
async fn instance_metadata_and_unknown_paths() {
    let (_emu, client) = start(EmulatorConfig::default()).await;
    let doc = client
        .send(
            Method::GET,
            "/metadata/instance?api-version=2021-02-01",
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert_eq!(doc.status, 200, "{}", doc.body);
    assert_eq!(doc.body["compute"]["name"], "podid-emulated-vm");
    let name = client
        .send(
            Method::GET,
            "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert_eq!(name.status, 200);
    assert_eq!(name.body, Value::String("podid-emulated-vm".into()));
    let no_header = client
        .send(
            Method::GET,
            "/metadata/instance?api-version=2021-02-01",
            &[],
            None,
        )
        .await;
    assert_eq!(no_header.status, 400);
    assert_eq!(
        no_header.body["error"],
        "Bad request. Required metadata header not specified"
    );
    let no_version = client
        .send(
            Method::GET,
            "/metadata/instance",
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert_eq!(no_version.status, 400);
    assert!(
        no_version.body["newest-versions"].is_array(),
        "{}",
        no_version.body
    );
    let missing = client
        .send(
            Method::GET,
            "/metadata/instance/compute/nope?api-version=2021-02-01",
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert_eq!(missing.status, 404);
    let unknown = client
        .send(Method::GET, "/doesnotexist", &[("Metadata", "true")], None)
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["error"], "Not found");
}

const TENANT: &str = "0b6b2c14-5a0c-4a43-9d1e-3f1f6d6c7e01";

fn assert_entra_error(reply: &Reply, status: u16, error: &str, code: u64) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.body["error"], error, "{}", reply.body);
    let description = reply.body["error_description"]
        .as_str()
        .expect("error_description");
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "description starts with the AADSTS code: {description}"
    );
    assert!(description.contains("Trace ID: ") && description.contains("Correlation ID: "));
    assert_eq!(reply.body["error_codes"], json!([code]));
    for field in ["timestamp", "trace_id", "correlation_id"] {
        assert!(reply.body[field].is_string(), "{field} in {}", reply.body);
    }
}

#[tokio::test]
async fn entra_client_secret_v1_and_v2() {
    let client_id = random_guid();
    let config = EmulatorConfig::default()
        .with_client(RegisteredClient::with_secret(
            TENANT,
            &client_id,
            "right-secret",
        ))
        .with_token_lifetime(Duration::from_secs(3599));
    let (emu, client) = start(config).await;
    let v1 = format!("/{TENANT}/oauth2/token");
    let ok = client
        .form(
            &v1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("resource", VAULT),
                ("client_secret", "right-secret"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    for field in [
        "token_type",
        "expires_in",
        "ext_expires_in",
        "expires_on",
        "not_before",
        "resource",
        "access_token",
    ] {
        assert!(
            ok.body[field].is_string(),
            "v1 returns {field} as a string: {}",
            ok.body
        );
    }
    assert_eq!(ok.body["expires_in"], "3599");
    assert_eq!(ok.body["resource"], VAULT);
    let claims = token_claims(ok.body["access_token"].as_str().expect("token")).expect("claims");
    assert_eq!(claims["appid"], client_id.as_str());
    assert_eq!(claims["tid"], TENANT);

    let wrong = client
        .form(
            &v1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("resource", VAULT),
                ("client_secret", "wrong-secret"),
            ],
        )
        .await;
    assert_entra_error(&wrong, 401, "invalid_client", 7_000_215);
    assert!(
        !wrong.body.to_string().contains("right-secret")
            && !wrong.body.to_string().contains("wrong-secret"),
        "errors never echo secrets"
    );

    let v2 = client
        .form(
            &format!("/{TENANT}/oauth2/v2.0/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("scope", &format!("{VAULT}/.default")),
                ("client_secret", "right-secret"),
            ],
        )
        .await;
    assert_eq!(v2.status, 200, "{}", v2.body);
    assert_eq!(v2.body["expires_in"], 3599, "v2 returns numbers");
    assert_eq!(v2.body["token_type"], "Bearer");
    assert!(v2.body.get("resource").is_none());
    let claims = token_claims(v2.body["access_token"].as_str().expect("token")).expect("claims");
    assert_eq!(claims["aud"], VAULT);

    let bad_scope = client
        .form(
            &format!("/{TENANT}/oauth2/v2.0/token"),
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("scope", VAULT),
                ("client_secret", "right-secret"),
            ],
        )
        .await;
    assert_entra_error(&bad_scope, 400, "invalid_scope", 1_002_012);

    let unknown_client = client
        .form(
            &v1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &random_guid()),
                ("resource", VAULT),
                ("client_secret", "x"),
            ],
        )
        .await;
    assert_entra_error(&unknown_client, 400, "unauthorized_client", 700_016);
    let unknown_tenant = client
        .form(
            "/not-a-tenant/oauth2/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("resource", VAULT),
                ("client_secret", "right-secret"),
            ],
        )
        .await;
    assert_entra_error(&unknown_tenant, 400, "invalid_request", 90_002);
    let no_credential = client
        .form(
            &v1,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &client_id),
                ("resource", VAULT),
            ],
        )
        .await;
    assert_entra_error(&no_credential, 401, "invalid_client", 7_000_218);
    let bad_grant = client
        .form(
            &v1,
            &[
                ("grant_type", "password"),
                ("client_id", &client_id),
                ("resource", VAULT),
            ],
        )
        .await;
    assert_entra_error(&bad_grant, 400, "unsupported_grant_type", 70_003);

    // ok, wrong, unknown tenant, no credential, bad grant.
    assert_eq!(emu.calls(Endpoint::EntraV1, &client_id, VAULT), 5);
    assert_eq!(
        emu.calls(Endpoint::EntraV2, &client_id, &format!("{VAULT}/.default")),
        1
    );
    assert_eq!(emu.issued_tokens().len(), 2);
}

fn assertion_claims(client_id: &str, aud: &str, exp_offset: i64) -> Value {
    let now = i64::try_from(mint::now_unix()).expect("time fits");
    json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": random_guid(),
        "nbf": now,
        "exp": now + exp_offset,
    })
}

#[tokio::test]
async fn entra_client_assertion_is_verified_against_the_registered_certificate() {
    let cert = TestCertificate::shared().expect("certificate");
    let other = TestCertificate::generate("someone-else").expect("other certificate");
    let client_id = random_guid();
    let config = EmulatorConfig::default().with_client(RegisteredClient::with_certificate(
        TENANT, &client_id, &cert,
    ));
    let (emu, client) = start(config).await;
    let path = format!("/{TENANT}/oauth2/token");
    let aud = format!("{}{path}", emu.url());
    let post = |assertion: String| {
        let client = &client;
        let path = path.clone();
        let client_id = client_id.clone();
        async move {
            client
                .form(
                    &path,
                    &[
                        ("grant_type", "client_credentials"),
                        ("client_id", &client_id),
                        ("resource", VAULT),
                        ("client_assertion_type", JWT_BEARER),
                        ("client_assertion", &assertion),
                    ],
                )
                .await
        }
    };

    let good = post(
        cert.sign_jwt(&assertion_claims(&client_id, &aud, 600))
            .expect("sign"),
    )
    .await;
    assert_eq!(good.status, 200, "{}", good.body);
    let claims = token_claims(good.body["access_token"].as_str().expect("token")).expect("claims");
    assert_eq!(claims["appid"], client_id.as_str());

    let wrong_key = post(
        other
            .sign_jwt(&assertion_claims(&client_id, &aud, 600))
            .expect("sign"),
    )
    .await;
    assert_entra_error(&wrong_key, 401, "invalid_client", 700_027);

    // Right thumbprint, signature by another key.
    let forged = {
        let genuine = cert
            .sign_jwt(&assertion_claims(&client_id, &aud, 600))
            .expect("sign");
        let by_other = other
            .sign_jwt(&assertion_claims(&client_id, &aud, 600))
            .expect("sign");
        let head: Vec<&str> = genuine.split('.').collect();
        let tail: Vec<&str> = by_other.split('.').collect();
        format!("{}.{}.{}", head[0], tail[1], tail[2])
    };
    let forged = post(forged).await;
    assert_entra_error(&forged, 401, "invalid_client", 700_027);

    let wrong_aud = post(
        cert.sign_jwt(&assertion_claims(
            &client_id,
            "https://example.com/x/oauth2/token",
            600,
        ))
        .expect("sign"),
    )
    .await;
    assert_entra_error(&wrong_aud, 401, "invalid_client", 700_212);
    let expired = post(
        cert.sign_jwt(&assertion_claims(&client_id, &aud, -3600))
            .expect("sign"),
    )
    .await;
    assert_entra_error(&expired, 401, "invalid_client", 700_024);
    let mut wrong_issuer = assertion_claims(&client_id, &aud, 600);
    wrong_issuer["iss"] = json!(random_guid());
    let wrong_issuer = post(cert.sign_jwt(&wrong_issuer).expect("sign")).await;
    assert_entra_error(&wrong_issuer, 401, "invalid_client", 700_023);
    let garbage = post("not.a.jwt".to_owned()).await;
    assert_entra_error(&garbage, 401, "invalid_client", 50_027);
    assert_eq!(emu.issued_tokens().len(), 1);
}

#[tokio::test]
async fn faults_fail_then_recover_and_are_scoped_by_client() {
    let a = ManagedIdentity::user_assigned("a");
    let b = ManagedIdentity::user_assigned("b");
    let config = EmulatorConfig::default()
        .with_user_assigned(a.clone())
        .with_user_assigned(b.clone());
    let (emu, client) = start(config).await;
    let query = |id: &str| {
        format!(
            "api-version=2018-02-01&resource={}&client_id={id}",
            enc(VAULT)
        )
    };

    emu.inject(Fault::status(503).times(2).for_client(&a.client_id));
    assert_eq!(
        client.imds(&query(&b.client_id)).await.status,
        200,
        "other clients unaffected"
    );
    let first = client.imds(&query(&a.client_id)).await;
    assert_eq!(first.status, 503);
    assert_eq!(first.body["error"], "service_unavailable");
    assert_eq!(client.imds(&query(&a.client_id)).await.status, 503);
    assert_eq!(
        client.imds(&query(&a.client_id)).await.status,
        200,
        "fault used up"
    );

    emu.inject(Fault::throttle(7).times(1));
    let throttled = client.imds(&query(&b.client_id)).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.headers["retry-after"], "7");

    emu.inject(
        Fault::status(410)
            .times(1)
            .retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
    );
    let gone = client.imds(&query(&b.client_id)).await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.headers["retry-after"], "Wed, 21 Oct 2015 07:28:00 GMT");

    // A fault for Entra ID leaves IMDS alone.
    emu.inject(Fault::status(500).on(Endpoint::EntraV1));
    assert_eq!(client.imds(&query(&b.client_id)).await.status, 200);
    emu.clear_faults();

    let statuses: Vec<u16> = emu.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 503, 503, 200, 429, 410, 200]);
    assert_eq!(emu.calls(Endpoint::Imds, &a.client_id, VAULT), 3);
    assert_eq!(emu.calls(Endpoint::Imds, &b.client_id, VAULT), 4);
    assert_eq!(emu.issued_tokens().len(), 3);
    emu.reset();
    assert_eq!(emu.calls_to(Endpoint::Imds), 0);
    assert!(emu.issued_tokens().is_empty());
}

#[tokio::test]
async fn stalls_delay_responses_and_dropped_connections_fail() {
    let (emu, client) = start(EmulatorConfig::default()).await;
    let query = format!("api-version=2018-02-01&resource={}", enc(VAULT));
    emu.inject(Fault::delay(Duration::from_millis(300)).times(1));
    let started = Instant::now();
    assert_eq!(client.imds(&query).await.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the stall delays the answer"
    );
    let started = Instant::now();
    assert_eq!(client.imds(&query).await.status, 200);
    assert!(started.elapsed() < Duration::from_millis(300), "only once");

    emu.inject(Fault::drop_connection().times(1));
    let dropped = client
        .try_send(
            Method::GET,
            &format!("{IMDS_PATH}?{query}"),
            &[("Metadata", "true")],
            None,
        )
        .await;
    assert!(
        dropped.is_err(),
        "a dropped connection is a transport error"
    );
    assert_eq!(emu.requests().last().map(|r| r.status), Some(0));
}

#[tokio::test]
async fn peak_concurrency_is_measured() {
    let (emu, client) = start(EmulatorConfig::default()).await;
    let query = format!("api-version=2018-02-01&resource={}", enc(VAULT));
    emu.inject(Fault::delay(Duration::from_millis(300)));
    let replies = futures::future::join_all((0..5).map(|_| client.imds(&query))).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(emu.max_concurrent(), 5);
    emu.reset();
    assert_eq!(emu.max_concurrent(), 0);
}

#[tokio::test]
async fn control_api_over_http() {
    let (emu, client) = start(EmulatorConfig::default()).await;
    let ua = ManagedIdentity::user_assigned("late");
    let query = format!(
        "api-version=2018-02-01&resource={}&client_id={}",
        enc(VAULT),
        ua.client_id
    );
    let json_body = |v: Value| Some(("application/json", v.to_string()));

    assert_eq!(client.imds(&query).await.status, 400, "not assigned yet");
    let assign = client
        .send(
            Method::POST,
            "/_emulator/identities",
            &[],
            json_body(serde_json::to_value(&ua).expect("json")),
        )
        .await;
    assert_eq!(assign.status, 204, "{}", assign.body);
    assert_eq!(client.imds(&query).await.status, 200);

    let fault = json!({"client_id": ua.client_id, "times": 1, "action": {"kind": "status", "status": 429, "retry_after": "3"}});
    assert_eq!(
        client
            .send(Method::POST, "/_emulator/faults", &[], json_body(fault))
            .await
            .status,
        204
    );
    let throttled = client.imds(&query).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.headers["retry-after"], "3");

    let calls = client
        .send(Method::GET, "/_emulator/calls", &[], None)
        .await;
    assert_eq!(calls.status, 200);
    let counts = calls.body["counts"].as_array().expect("counts");
    let ours = counts
        .iter()
        .find(|c| c["client_id"] == ua.client_id.as_str() && c["endpoint"] == "imds")
        .expect("our identity counted");
    assert_eq!(ours["count"], 3);
    assert_eq!(ours["resource"], VAULT);

    let tokens = client
        .send(Method::GET, "/_emulator/tokens", &[], None)
        .await;
    let issued = tokens.body.as_array().expect("issued list");
    assert_eq!(issued.len(), 1);
    assert_eq!(
        issued[0]["access_token"].as_str(),
        emu.issued_tokens().first().map(|t| t.access_token.as_str())
    );

    let lifetime = client
        .send(
            Method::PUT,
            "/_emulator/token-lifetime",
            &[],
            json_body(json!({"seconds": 42})),
        )
        .await;
    assert_eq!(lifetime.status, 204);
    assert_eq!(client.imds(&query).await.body["expires_in"], "42");

    let unassign = client
        .send(
            Method::DELETE,
            &format!("/_emulator/identities/{}", ua.client_id),
            &[],
            None,
        )
        .await;
    assert_eq!(unassign.status, 204);
    assert_eq!(client.imds(&query).await.status, 400);

    assert_eq!(
        client
            .send(Method::POST, "/_emulator/reset", &[], None)
            .await
            .status,
        204
    );
    assert_eq!(emu.calls_to(Endpoint::Imds), 0);
    let bad = client
        .send(
            Method::POST,
            "/_emulator/faults",
            &[],
            Some(("application/json", "{".into())),
        )
        .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let (emu, client) = start(EmulatorConfig::default()).await;
    let addr = emu.addr();
    assert_eq!(
        client
            .send(Method::GET, "/_emulator/healthz", &[], None)
            .await
            .status,
        200
    );
    emu.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}
