//! The emulated IMDS endpoints: the managed-identity token endpoint and
//! instance metadata.

use http::{Method, Response, request::Parts};
use serde_json::{Value, json};

use super::{
    faults::{Endpoint, FaultAction, RequestRecord},
    mint::{self, Subject},
    respond::{self, Body, Dropped},
    state::{IdentityQuery, Shared},
};

/// api-versions the emulated token endpoint accepts (the SDKs send
/// 2018-02-01 or 2019-08-01).
const TOKEN_API_VERSIONS: &[&str] = &[
    "2017-09-01",
    "2018-02-01",
    "2019-03-11",
    "2019-08-01",
    "2019-11-01",
    "2020-06-01",
    "2020-09-01",
    "2021-02-01",
    "2021-05-01",
    "2021-10-01",
    "2021-12-13",
    "2023-07-01",
];

/// api-versions the emulated instance endpoint accepts, newest first.
const INSTANCE_API_VERSIONS: &[&str] = &[
    "2023-07-01",
    "2021-12-13",
    "2021-11-15",
    "2021-10-01",
    "2021-05-01",
    "2021-02-01",
    "2020-09-01",
    "2020-06-01",
    "2019-11-01",
    "2019-08-15",
    "2019-06-01",
    "2019-03-11",
    "2018-10-01",
    "2018-04-02",
    "2017-12-01",
    "2017-08-01",
    "2017-04-02",
];

/// The identity parameters IMDS understands; `msi-res-id` (sic) is what the
/// .NET probe sends.
const IDENTITY_PARAMS: &[&str] = &[
    "client_id",
    "object_id",
    "msi_res_id",
    "mi_res_id",
    "msi-res-id",
];

fn imds_error(status: u16, error: &str, description: &str) -> Response<Body> {
    respond::json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// The body of an injected failure, in IMDS's format.
pub(crate) fn fault_body(status: u16) -> Value {
    let (error, description) = match status {
        404 => ("not_found", "IMDS is updating; retry later"),
        410 => (
            "gone",
            "IMDS is updating and will be available within 70 seconds",
        ),
        429 => (
            "too_many_requests",
            "Too many requests; retry after the time in Retry-After",
        ),
        500 => ("unknown", "An unexpected error occurred"),
        502..=504 => (
            "service_unavailable",
            "The service is temporarily unavailable",
        ),
        _ => ("invalid_request", "Injected failure"),
    };
    json!({"error": error, "error_description": description})
}

/// `GET /metadata/identity/oauth2/token`.
pub(crate) async fn token(shared: &Shared, parts: &Parts) -> Result<Response<Body>, Dropped> {
    let _in_flight = shared.enter();
    let pairs = respond::query_pairs(parts.uri.query());
    let pairs_ref = pairs.as_deref().unwrap_or(&[]);
    let client_id = resolve_client_id(shared, pairs_ref);
    let mut record = RequestRecord {
        endpoint: Endpoint::Imds,
        client_id: client_id.clone().unwrap_or_default(),
        resource: respond::param(pairs_ref, "resource")
            .unwrap_or_default()
            .to_owned(),
        api_version: respond::param(pairs_ref, "api-version").map(str::to_owned),
        status: 0,
    };
    let result = answer_token(shared, parts, pairs, client_id.as_deref()).await;
    record.status = result.as_ref().map_or(0, |r| r.status().as_u16());
    shared.lock().record(record);
    result
}

/// The client id an IMDS request resolves to, for accounting and fault
/// matching: the named identity's client id when it is known, the raw value
/// otherwise, the system-assigned identity's when the request names none.
fn resolve_client_id(shared: &Shared, pairs: &[(String, String)]) -> Option<String> {
    let st = shared.lock();
    let query = identity_query(pairs).ok()?;
    match st.find_identity(query) {
        Some(identity) => Some(identity.client_id.clone()),
        None => match query {
            IdentityQuery::System => None,
            IdentityQuery::ClientId(v)
            | IdentityQuery::ObjectId(v)
            | IdentityQuery::ResourceId(v) => Some(v.to_owned()),
        },
    }
}

/// Which identity the request names; `Err` when it names more than one.
fn identity_query(pairs: &[(String, String)]) -> Result<IdentityQuery<'_>, ()> {
    let named: Vec<(&str, &str)> = pairs
        .iter()
        .filter(|(k, _)| IDENTITY_PARAMS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match named.as_slice() {
        [] => Ok(IdentityQuery::System),
        [("client_id", v)] => Ok(IdentityQuery::ClientId(v)),
        [("object_id", v)] => Ok(IdentityQuery::ObjectId(v)),
        [(_, v)] => Ok(IdentityQuery::ResourceId(v)),
        _ => Err(()),
    }
}

/// Applies matching faults: waits for a delay, then answers or drops for a
/// `Status`/`Drop` rule. `Ok(None)` means handle the request normally.
pub(crate) async fn apply_faults(
    shared: &Shared,
    endpoint: Endpoint,
    client_id: Option<&str>,
    default_body: impl Fn(u16) -> Value,
) -> Result<Option<Response<Body>>, Dropped> {
    let decision = shared.lock().take_faults(endpoint, client_id);
    if let Some(delay) = decision.delay {
        tokio::time::sleep(delay).await;
    }
    match decision.action {
        None | Some(FaultAction::Delay { .. }) => Ok(None),
        Some(FaultAction::Drop) => Err(Dropped),
        Some(FaultAction::Status {
            status,
            retry_after,
            body,
        }) => {
            let body = body.unwrap_or_else(|| default_body(status));
            Ok(Some(respond::with_retry_after(
                respond::json(status, &body),
                retry_after.as_deref(),
            )))
        }
    }
}

async fn answer_token(
    shared: &Shared,
    parts: &Parts,
    pairs: Result<Vec<(String, String)>, String>,
    client_id: Option<&str>,
) -> Result<Response<Body>, Dropped> {
    // Header checks come first: SDK probes send no Metadata header and must
    // get this 400, whatever else is wrong with the request.
    let metadata_ok = parts
        .headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !metadata_ok {
        return Ok(imds_error(
            400,
            "invalid_request",
            "Required metadata header not specified",
        ));
    }
    if parts.headers.contains_key("x-forwarded-for") {
        return Ok(imds_error(
            400,
            "invalid_request",
            "Requests with an X-Forwarded-For header are not allowed",
        ));
    }
    if parts.method != Method::GET {
        return Ok(imds_error(
            405,
            "invalid_request",
            "The requested method is not allowed; use GET",
        ));
    }
    if let Some(resp) = apply_faults(shared, Endpoint::Imds, client_id, fault_body).await? {
        return Ok(resp);
    }
    let pairs = match pairs {
        Ok(p) => p,
        Err(dup) => {
            return Ok(imds_error(
                400,
                "invalid_request",
                &format!("Query parameter '{dup}' is specified more than once"),
            ));
        }
    };
    match respond::param(&pairs, "api-version") {
        None | Some("") => {
            return Ok(imds_error(
                400,
                "invalid_request",
                "Required query variable 'api-version' is missing",
            ));
        }
        Some(v) if !TOKEN_API_VERSIONS.contains(&v) => {
            return Ok(imds_error(400, "invalid_request", "Invalid api-version"));
        }
        Some(_) => {}
    }
    let resource = match respond::param(&pairs, "resource") {
        None | Some("") => {
            return Ok(imds_error(
                400,
                "invalid_request",
                "Required query variable 'resource' is missing",
            ));
        }
        Some(r) => r,
    };
    let Ok(query) = identity_query(&pairs) else {
        return Ok(imds_error(
            400,
            "invalid_request",
            "Only one of client_id, object_id and msi_res_id may be specified",
        ));
    };
    let st = shared.lock();
    let Some(identity) = st.find_identity(query).cloned() else {
        return Ok(imds_error(400, "invalid_request", "Identity not found"));
    };
    if !st.resource_known(resource) || resource.ends_with("/.default") {
        return Ok(imds_error(
            400,
            "invalid_resource",
            &format!(
                "AADSTS500011: The resource principal named {resource} was not found in the tenant named {}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.",
                st.tenant_id
            ),
        ));
    }
    let minted = mint::mint(
        &Subject {
            tenant_id: &st.tenant_id,
            client_id: &identity.client_id,
            object_id: &identity.object_id,
            resource_id: Some(&identity.resource_id),
            audience: resource,
        },
        st.token_lifetime.as_secs().max(1),
    );
    drop(st);
    let body = json!({
        "access_token": minted.access_token,
        "refresh_token": "",
        "expires_in": minted.expires_in.to_string(),
        "expires_on": minted.expires_on.to_string(),
        "ext_expires_in": minted.expires_in.to_string(),
        "not_before": minted.not_before.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": identity.client_id,
    });
    shared.lock().record_issued(super::faults::IssuedRecord {
        endpoint: Endpoint::Imds,
        client_id: identity.client_id.clone(),
        resource: resource.to_owned(),
        expires_on: minted.expires_on,
        access_token: minted.access_token,
    });
    Ok(respond::json(200, &body))
}

fn instance_error(status: u16, message: &str) -> Response<Body> {
    respond::json(status, &json!({"error": message}))
}

/// `GET /metadata/instance[/<path>]`.
pub(crate) async fn instance(shared: &Shared, parts: &Parts) -> Result<Response<Body>, Dropped> {
    let pairs = respond::query_pairs(parts.uri.query()).unwrap_or_default();
    let api_version = respond::param(&pairs, "api-version").map(str::to_owned);
    let result = answer_instance(shared, parts, &pairs).await;
    shared.lock().record(RequestRecord {
        endpoint: Endpoint::Instance,
        client_id: String::new(),
        resource: String::new(),
        api_version,
        status: result.as_ref().map_or(0, |r| r.status().as_u16()),
    });
    result
}

async fn answer_instance(
    shared: &Shared,
    parts: &Parts,
    pairs: &[(String, String)],
) -> Result<Response<Body>, Dropped> {
    let metadata_ok = parts
        .headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if !metadata_ok {
        return Ok(instance_error(
            400,
            "Bad request. Required metadata header not specified",
        ));
    }
    if parts.headers.contains_key("x-forwarded-for") {
        return Ok(instance_error(
            400,
            "Bad request. Requests with an X-Forwarded-For header are not allowed",
        ));
    }
    if parts.method != Method::GET {
        return Ok(instance_error(405, "Method not allowed"));
    }
    if let Some(resp) = apply_faults(shared, Endpoint::Instance, None, fault_body).await? {
        return Ok(resp);
    }
    let version_ok =
        respond::param(pairs, "api-version").is_some_and(|v| INSTANCE_API_VERSIONS.contains(&v));
    if !version_ok {
        return Ok(respond::json(
            400,
            &json!({
                "error": "Bad request. api-version is invalid or was not specified in the request. For more information refer to aka.ms/azureimds",
                "newest-versions": INSTANCE_API_VERSIONS[..3],
            }),
        ));
    }
    let doc = shared.lock().instance.clone();
    let sub = parts
        .uri
        .path()
        .strip_prefix("/metadata/instance")
        .unwrap_or("")
        .trim_end_matches('/');
    let Some(value) = doc.pointer(sub) else {
        return Ok(not_found());
    };
    if respond::param(pairs, "format") == Some("text") {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut resp = http::Response::new(Body::from(text));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return Ok(resp);
    }
    Ok(respond::json(200, value))
}

/// The IMDS "managed identity v2" endpoints, as MSAL.NET's
/// `ImdsV2ManagedIdentitySource` uses them: `GET getplatformmetadata`
/// (discovery; 400 without `Metadata`, which tells a client v2 exists) and
/// `POST issuecredential`, which answers with a credential of the VM's own
/// identity. Every request is recorded: an agent that forwards these hands a
/// pod the node's credential, and tests assert none ever arrives.
pub(crate) fn credential_v2(shared: &Shared, parts: &Parts) -> Response<Body> {
    let mut st = shared.lock();
    let node = st.system_assigned.clone();
    let metadata_ok = parts
        .headers
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let path = parts.uri.path();
    let response = match (node, metadata_ok) {
        (None, _) => instance_error(404, "Not found"),
        (Some(_), false) => {
            instance_error(400, "Bad request. Required metadata header not specified")
        }
        (Some(node), true)
            if path.ends_with("/getplatformmetadata") && parts.method == Method::GET =>
        {
            respond::json(
                200,
                &json!({
                    "client_id": node.client_id,
                    "tenant_id": st.tenant_id,
                    "cuid": {"vmId": "0d5c3b2a-1e4f-4a6b-8c7d-9e0f1a2b3c4d"},
                    "attestation_endpoint": "",
                }),
            )
        }
        (Some(node), true)
            if path.ends_with("/issuecredential") && parts.method == Method::POST =>
        {
            respond::json(
                200,
                &json!({
                    "client_id": node.client_id,
                    "tenant_id": st.tenant_id,
                    "credential": format!("NODE-CREDENTIAL-OF-{}", node.client_id),
                    "mtls_authentication_endpoint": "https://login.microsoftonline.com",
                }),
            )
        }
        (Some(_), true) => instance_error(405, "Method not allowed"),
    };
    let client_id = st
        .system_assigned
        .as_ref()
        .map(|n| n.client_id.clone())
        .unwrap_or_default();
    st.record(RequestRecord {
        endpoint: Endpoint::ImdsCredential,
        client_id,
        resource: String::new(),
        api_version: None,
        status: response.status().as_u16(),
    });
    response
}

/// IMDS's answer for a path it does not serve.
pub(crate) fn not_found() -> Response<Body> {
    instance_error(404, "Not found")
}
