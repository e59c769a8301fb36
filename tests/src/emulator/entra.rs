//! The emulated Entra ID token endpoints (client-credentials grant):
//! `POST /{tenant}/oauth2/token` (v1, `resource`) and
//! `POST /{tenant}/oauth2/v2.0/token` (v2, `scope`).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{Method, Response, request::Parts};
use rsa::sha2::Sha256;
use serde_json::{Value, json};

use super::{
    config::random_guid,
    faults::{Endpoint, IssuedRecord, RequestRecord},
    imds::apply_faults,
    mint::{self, Subject},
    respond::{self, Body, Dropped},
    state::{Client, Shared},
};

/// `client_assertion_type` of a JWT client assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Largest request body the emulated endpoints read.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Tolerated clock skew for assertion `nbf`/`exp`.
const SKEW_SECS: u64 = 300;

/// An Entra ID error response: `error`, `error_description` starting with
/// the AADSTS code and ending with trace and correlation ids, `error_codes`,
/// `timestamp`, `trace_id`, `correlation_id`, `error_uri`.
pub(crate) fn entra_error(status: u16, error: &str, code: u32, message: &str) -> Response<Body> {
    respond::json(status, &entra_error_body(error, code, message))
}

fn entra_error_body(error: &str, code: u32, message: &str) -> Value {
    let trace_id = random_guid();
    let correlation_id = random_guid();
    let timestamp = mint::format_timestamp(mint::now_unix());
    json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

/// The body of an injected failure, in Entra ID's format.
pub(crate) fn fault_body(status: u16) -> Value {
    match status {
        429 => entra_error_body(
            "temporarily_unavailable",
            50196,
            "The server is busy; too many requests. Retry after the time in Retry-After.",
        ),
        500..=599 => entra_error_body(
            "temporarily_unavailable",
            50001,
            "The service is temporarily unavailable.",
        ),
        _ => entra_error_body("invalid_request", 90000, "Injected failure."),
    }
}

/// The tenant and version of an Entra ID token path, if `path` is one.
pub(crate) fn route(path: &str) -> Option<(String, Endpoint)> {
    let rest = path.strip_prefix('/')?;
    let (tenant, tail) = rest.split_once('/')?;
    if tenant.is_empty() || tenant.starts_with('_') {
        return None;
    }
    let endpoint = match tail {
        "oauth2/token" => Endpoint::EntraV1,
        "oauth2/v2.0/token" => Endpoint::EntraV2,
        _ => return None,
    };
    Some((tenant.to_owned(), endpoint))
}

/// One Entra ID token request.
pub(crate) async fn token(
    shared: &Shared,
    parts: &Parts,
    body: &[u8],
    tenant: &str,
    endpoint: Endpoint,
) -> Result<Response<Body>, Dropped> {
    let _in_flight = shared.enter();
    let form: Vec<(String, String)> = form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let target_param = if endpoint == Endpoint::EntraV2 {
        "scope"
    } else {
        "resource"
    };
    let mut record = RequestRecord {
        endpoint,
        client_id: respond::param(&form, "client_id")
            .unwrap_or_default()
            .to_owned(),
        resource: respond::param(&form, target_param)
            .unwrap_or_default()
            .to_owned(),
        api_version: None,
        status: 0,
    };
    let result = answer(shared, parts, &form, tenant, endpoint).await;
    record.status = result.as_ref().map_or(0, |r| r.status().as_u16());
    shared.lock().record(record);
    result
}

async fn answer(
    shared: &Shared,
    parts: &Parts,
    form: &[(String, String)],
    tenant: &str,
    endpoint: Endpoint,
) -> Result<Response<Body>, Dropped> {
    if parts.method != Method::POST {
        return Ok(entra_error(
            400,
            "invalid_request",
            900_561,
            "The endpoint only accepts POST requests. Received a GET request.",
        ));
    }
    let client_id = respond::param(form, "client_id");
    if let Some(resp) = apply_faults(shared, endpoint, client_id, fault_body).await? {
        return Ok(resp);
    }
    let st = shared.lock();
    if !st.tenant_known(tenant) {
        return Ok(entra_error(
            400,
            "invalid_request",
            90_002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ));
    }
    match respond::param(form, "grant_type") {
        None | Some("") => return Ok(missing_parameter("grant_type")),
        Some("client_credentials") => {}
        Some(other) => {
            return Ok(entra_error(
                400,
                "unsupported_grant_type",
                70_003,
                &format!("The app requested an unsupported grant type '{other}'."),
            ));
        }
    }
    let Some(client_id) = client_id.filter(|c| !c.is_empty()) else {
        return Ok(missing_parameter("client_id"));
    };
    let Some(client) = st.client(tenant, client_id).cloned() else {
        return Ok(entra_error(
            400,
            "unauthorized_client",
            700_016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        ));
    };
    let audience = match endpoint {
        Endpoint::EntraV2 => match respond::param(form, "scope") {
            None | Some("") => return Ok(missing_parameter("scope")),
            Some(scope) => match scope.strip_suffix("/.default") {
                Some(resource) if !resource.is_empty() => resource.to_owned(),
                _ => {
                    return Ok(entra_error(
                        400,
                        "invalid_scope",
                        1_002_012,
                        &format!(
                            "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
                        ),
                    ));
                }
            },
        },
        _ => match respond::param(form, "resource") {
            None | Some("") => return Ok(missing_parameter("resource")),
            Some(r) => r.to_owned(),
        },
    };
    if let Err(resp) = authenticate(&client, form, parts, tenant) {
        return Ok(*resp);
    }
    if !st.resource_known(&audience) {
        return Ok(entra_error(
            400,
            "invalid_resource",
            500_011,
            &format!(
                "The resource principal named {audience} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        ));
    }
    let object_id = format!("sp-{}", client.client_id.to_ascii_lowercase());
    let minted = mint::mint(
        &Subject {
            tenant_id: tenant,
            client_id: &client.client_id,
            object_id: &object_id,
            resource_id: None,
            audience: &audience,
        },
        st.token_lifetime.as_secs().max(1),
    );
    drop(st);
    let body = match endpoint {
        Endpoint::EntraV2 => json!({
            "token_type": "Bearer",
            "expires_in": minted.expires_in,
            "ext_expires_in": minted.expires_in,
            "access_token": minted.access_token,
        }),
        _ => json!({
            "token_type": "Bearer",
            "expires_in": minted.expires_in.to_string(),
            "ext_expires_in": minted.expires_in.to_string(),
            "expires_on": minted.expires_on.to_string(),
            "not_before": minted.not_before.to_string(),
            "resource": audience,
            "access_token": minted.access_token,
        }),
    };
    shared.lock().record_issued(IssuedRecord {
        endpoint,
        client_id: client.client_id.clone(),
        resource: audience,
        expires_on: minted.expires_on,
        access_token: minted.access_token,
    });
    Ok(respond::json(200, &body))
}

fn missing_parameter(name: &str) -> Response<Body> {
    entra_error(
        400,
        "invalid_request",
        900_144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

fn invalid_client(code: u32, message: &str) -> Box<Response<Body>> {
    Box::new(entra_error(401, "invalid_client", code, message))
}

/// Checks the client's credential: a secret, or a JWT assertion signed by
/// one of its certificates.
fn authenticate(
    client: &Client,
    form: &[(String, String)],
    parts: &Parts,
    tenant: &str,
) -> Result<(), Box<Response<Body>>> {
    if let Some(secret) = respond::param(form, "client_secret") {
        return match &client.secret {
            Some(expected) if expected == secret => Ok(()),
            _ => Err(invalid_client(
                7_000_215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                    client.client_id
                ),
            )),
        };
    }
    let Some(assertion) = respond::param(form, "client_assertion") else {
        return Err(invalid_client(
            7_000_218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        ));
    };
    if respond::param(form, "client_assertion_type") != Some(JWT_BEARER) {
        return Err(Box::new(entra_error(
            400,
            "invalid_request",
            900_144,
            "The request body must contain the following parameter: 'client_assertion_type' with value 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
        )));
    }
    verify_assertion(client, assertion, parts, tenant)
}

fn decode_json(part: &str) -> Option<Value> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Verifies a client assertion as Entra ID does: RS256 signature by a
/// registered certificate (chosen by `x5t`/`x5t#S256` when present), `aud`
/// = this token endpoint, `iss` = `sub` = client id, `exp`/`nbf` current.
fn verify_assertion(
    client: &Client,
    assertion: &str,
    parts: &Parts,
    tenant: &str,
) -> Result<(), Box<Response<Body>>> {
    let malformed = || invalid_client(50_027, "JWT token is invalid or malformed.");
    let mut it = assertion.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(malformed());
    };
    let (Some(header), Some(claims)) = (decode_json(h), decode_json(p)) else {
        return Err(malformed());
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')) else {
        return Err(malformed());
    };
    if header["alg"] != "RS256" {
        return Err(invalid_client(
            5_002_738,
            "Invalid JWT token. 'RS256' is the only supported signing algorithm.",
        ));
    }
    let candidates: Vec<_> = client
        .certificates
        .iter()
        .filter(
            |c| match (header["x5t"].as_str(), header["x5t#S256"].as_str()) {
                (Some(x5t), _) => c.x5t == x5t,
                (None, Some(x5t_s256)) => c.x5t_s256 == x5t_s256,
                (None, None) => true,
            },
        )
        .collect();
    if candidates.is_empty() {
        return Err(invalid_client(
            700_027,
            &format!(
                "The certificate with identifier used to sign the client assertion is not registered on application '{}'.",
                client.client_id
            ),
        ));
    }
    let signed = format!("{h}.{p}");
    let verified = candidates.iter().any(|c| {
        c.public_key
            .pkcs1v15_verify::<Sha256>(signed.as_bytes(), &signature)
            .is_ok()
    });
    if !verified {
        return Err(invalid_client(
            700_027,
            "Client assertion failed signature validation.",
        ));
    }
    let host = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let aud = claims["aud"].as_str().unwrap_or("");
    let accepted_audiences = [
        format!("http://{host}/{tenant}/oauth2/token"),
        format!("http://{host}/{tenant}/oauth2/v2.0/token"),
        format!("https://{host}/{tenant}/oauth2/token"),
        format!("https://{host}/{tenant}/oauth2/v2.0/token"),
        format!("https://login.microsoftonline.com/{tenant}/oauth2/token"),
        format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
    ];
    if !accepted_audiences
        .iter()
        .any(|a| a.eq_ignore_ascii_case(aud))
    {
        return Err(invalid_client(
            700_212,
            &format!("Client assertion audience claim '{aud}' does not match the token endpoint."),
        ));
    }
    let is_client = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&client.client_id))
    };
    if !is_client(&claims["iss"]) || !is_client(&claims["sub"]) {
        return Err(invalid_client(
            700_023,
            "Client assertion contains an invalid issuer or subject; both must be the client id.",
        ));
    }
    let now = mint::now_unix();
    let exp = claims["exp"].as_u64();
    let nbf = claims["nbf"].as_u64().unwrap_or(0);
    if exp.is_none_or(|exp| exp + SKEW_SECS <= now) || nbf > now + SKEW_SECS {
        return Err(invalid_client(
            700_024,
            "Client assertion is not within its valid time range.",
        ));
    }
    if claims["jti"].as_str().is_none_or(str::is_empty) {
        return Err(malformed());
    }
    Ok(())
}
