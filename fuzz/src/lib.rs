//! Invariants the fuzz targets share: what every IMDS refusal, route, header
//! check and token query must satisfy, whatever the input.
//!
//! Each check panics (so libFuzzer records a crash) with the input that broke
//! it. The models here are written independently of the agent's code, from
//! the protocol (`reference/peers-and-clients.md` §C/§E) and from
//! aad-pod-identity's router, so a check is not the code under test restated.

use std::{collections::HashSet, sync::LazyLock};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use podid_agent::{
    identity::RequestedIdentity,
    server::imds::{self, ImdsError, Route, TokenQuery},
};

/// One current-thread runtime for the whole fuzzing process (the head reader
/// is async and uses tokio's timer).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds")
    });
    &RUNTIME
}

fn body_of(response: Response<Full<Bytes>>) -> Bytes {
    runtime()
        .block_on(response.into_body().collect())
        .map(|collected| collected.to_bytes())
        .unwrap_or_else(|never| match never {})
}

/// Every refusal is a 4xx with IMDS's JSON error body and the headers that
/// go with its status.
pub fn check_error(error: &ImdsError) {
    assert!(
        error.status.is_client_error(),
        "a request's own fault must be a 4xx: {error:?}"
    );
    assert!(!error.error.is_empty(), "empty error code: {error:?}");
    let response = error.response();
    assert_eq!(response.status(), error.status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/json; charset=utf-8"
    );
    if error.status == StatusCode::METHOD_NOT_ALLOWED {
        assert_eq!(
            response.headers()[header::ALLOW],
            error.allow.as_deref().unwrap_or("GET")
        );
    }
    if let Some(seconds) = error.retry_after {
        assert_eq!(
            response.headers()[header::RETRY_AFTER],
            seconds.to_string().as_str()
        );
    }
    let body = body_of(response);
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    let object = json.as_object().expect("error body is a JSON object");
    assert_eq!(object.len(), 2, "{json}");
    assert_eq!(object["error"], error.error, "{json}");
    assert_eq!(object["error_description"], error.description.as_str());
}

/// The path as an upstream HTTP server may see it after the normalisations
/// servers commonly apply (gorilla/mux in aad-pod-identity's NMI: percent-
/// decoding and path cleaning): percent-decoded once, `\` as `/`, empty and
/// `.` segments dropped, `..` applied, lower-cased.
pub fn normalised_path(path: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    format!("/{}", segments.join("/")).to_ascii_lowercase()
}

/// NMI's second route, `/(?i:metadata)/identity(.*?)oauth2(.*?)token`, on a
/// lower-cased path.
fn resembles_token_path(lower: &str) -> bool {
    lower
        .strip_prefix("/metadata/identity")
        .is_some_and(|rest| {
            rest.find("oauth2")
                .is_some_and(|at| rest[at + "oauth2".len()..].contains("token"))
        })
}

/// Routing: nothing an upstream could take for the token endpoint is ever
/// forwarded (the real IMDS would answer with the node's identity), and
/// `/metadata/instance` cannot be reached under another spelling (it would
/// slip past `--block-instance-metadata`).
pub fn check_route(path: &str) -> Route {
    let route = imds::route(path);
    let normal = normalised_path(path);
    if resembles_token_path(&normal) {
        assert!(
            matches!(route, Route::Token | Route::MalformedToken),
            "{path:?} (upstream may read it as {normal:?}) would be forwarded to IMDS: {route:?}"
        );
    }
    let lower = normal.to_ascii_lowercase();
    if lower == "/metadata/identity" || lower.starts_with("/metadata/identity/") {
        assert!(
            matches!(
                route,
                Route::Token | Route::MalformedToken | Route::IdentityOther
            ),
            "{path:?} (upstream may read it as {normal:?}) is in the identity namespace but would be forwarded: {route:?}"
        );
    }
    if normal == "/metadata/instance" || normal.starts_with("/metadata/instance/") {
        assert_ne!(
            route,
            Route::Other,
            "{path:?} (upstream may read it as {normal:?}) escapes the instance-metadata route"
        );
    }
    if route == Route::Token {
        assert_eq!(
            normal, "/metadata/identity/oauth2/token",
            "{path:?} routed as the token endpoint"
        );
    }
    route
}

/// The header check, against its definition: some `Metadata` value is
/// `true` (any case, surrounding blanks allowed) and there is no
/// `X-Forwarded-For`.
pub fn check_headers(headers: &HeaderMap) -> Result<(), ImdsError> {
    let result = imds::check_headers(headers);
    let metadata = headers
        .get_all("metadata")
        .iter()
        .any(|value| value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"true"));
    let forwarded = headers.contains_key("x-forwarded-for");
    match &result {
        Ok(()) => assert!(metadata && !forwarded, "accepted headers {headers:?}"),
        Err(error) => {
            check_error(error);
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            if !metadata {
                // SDK probes tell "IMDS is here" from this exact answer.
                assert_eq!(error.description, "Required metadata header not specified");
            } else {
                assert!(forwarded, "refused good headers {headers:?}: {error:?}");
            }
        }
    }
    result
}

/// Only GET is served, with a 405 naming it otherwise.
pub fn check_method(method: &Method) -> Result<(), ImdsError> {
    let result = imds::check_method(method);
    match &result {
        Ok(()) => assert_eq!(method, Method::GET),
        Err(error) => {
            check_error(error);
            assert_ne!(method, Method::GET);
            assert_eq!(error.status, StatusCode::METHOD_NOT_ALLOWED);
        }
    }
    result
}

/// `YYYY-MM-DD` with an optional `-suffix`, not before 2018-02-01.
fn api_version_ok(version: &str) -> bool {
    let bytes = version.as_bytes();
    if bytes.len() < 10 || (bytes.len() > 10 && bytes[10] != b'-') {
        return false;
    }
    let date = &bytes[..10];
    let shape = date.iter().enumerate().all(|(i, b)| {
        if i == 4 || i == 7 {
            *b == b'-'
        } else {
            b.is_ascii_digit()
        }
    });
    shape && date >= b"2018-02-01".as_slice()
}

const IDENTITY_KEYS: [&str; 5] = [
    "client_id",
    "object_id",
    "msi_res_id",
    "mi_res_id",
    "msi-res-id",
];

/// The token query parser against a model of IMDS's rules: duplicates are
/// always refused; then api-version, resource, at most one identity.
pub fn check_token_query(query: Option<&str>) -> Result<TokenQuery, ImdsError> {
    let result = imds::parse_token_query(query);
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut seen = HashSet::new();
    let duplicate = pairs.iter().any(|(k, _)| !seen.insert(k.as_str()));
    let get = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let api_version = get("api-version");
    let resource = get("resource");
    let named: Vec<(&str, &str)> = IDENTITY_KEYS
        .iter()
        .map(|key| (*key, get(key)))
        .filter(|(_, value)| !value.is_empty())
        .collect();
    let expected_refusal = if duplicate {
        Some("Duplicate query parameter")
    } else if api_version.is_empty() {
        Some("Required api-version parameter not specified")
    } else if !api_version_ok(api_version) {
        Some("Unsupported api-version")
    } else if resource.trim().is_empty() {
        Some("Required audience parameter not specified")
    } else if named.len() > 1 {
        Some("Only one of client_id, object_id and msi_res_id")
    } else {
        None
    };
    match (&result, expected_refusal) {
        (Ok(parsed), None) => {
            assert_eq!(parsed.api_version, api_version);
            assert_eq!(parsed.resource, resource);
            assert!(!parsed.resource.trim().is_empty());
            let expected = match named.first() {
                None => RequestedIdentity::Any,
                Some(("client_id", v)) => RequestedIdentity::ClientId(v.to_string()),
                Some(("object_id", v)) => RequestedIdentity::ObjectId(v.to_string()),
                Some((_, v)) => RequestedIdentity::ResourceId(v.to_string()),
            };
            assert_eq!(parsed.requested, expected, "{query:?}");
        }
        (Err(error), Some(reason)) => {
            check_error(error);
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(
                error.description.starts_with(reason),
                "{query:?}: expected {reason:?}, got {error:?}"
            );
        }
        (result, expected) => {
            panic!("{query:?}: expected refusal {expected:?}, got {result:?}")
        }
    }
    result
}

/// What the endpoint answers for a request, step by step as the handler
/// runs them (route; for the token path headers, then method, then query).
/// Returns the refusal, if any, after checking every step's invariants.
pub fn check_request(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<ImdsError> {
    match check_route(uri.path()) {
        Route::Token => {
            // Every step runs, for its own invariants; the first refusal is
            // the answer (headers first: SDK probes rely on that).
            let headers = check_headers(headers);
            let method = check_method(method);
            let query = check_token_query(uri.query()).map(|_| ());
            headers.and(method).and(query).err()
        }
        Route::MalformedToken => {
            let error = ImdsError::bad_request("Invalid request");
            check_error(&error);
            Some(error)
        }
        Route::IdentityOther => {
            let error = ImdsError::not_found("Not found");
            check_error(&error);
            Some(error)
        }
        Route::Instance | Route::Other => check_headers(headers).err(),
    }
}
