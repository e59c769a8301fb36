//! The IMDS token protocol as SDKs speak it: request validation, query
//! parsing, and the exact response shapes (every field a string; errors as
//! `{"error", "error_description"}`). See `reference/peers-and-clients.md` §C.

use std::collections::HashMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use crate::{identity::RequestedIdentity, tokens::IssuedToken};

/// Oldest api-version IMDS's identity endpoint accepts.
const OLDEST_API_VERSION: &str = "2018-02-01";

/// An error answered the way IMDS answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `error` code.
    pub error: &'static str,
    /// The `error_description`.
    pub description: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// The `Allow` header of a 405 (`GET` when not set).
    pub allow: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl ImdsError {
    /// An error with no Retry-After.
    pub fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            retry_after: None,
            allow: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// IMDS's answer for an identity that is not available: 400
    /// `Identity not found`, which SDKs treat as definite.
    pub fn identity_not_found() -> Self {
        Self::bad_request("Identity not found")
    }

    /// 404 `not_found`, as IMDS answers a path it does not serve.
    pub fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", description)
    }

    /// 405 naming the methods allowed.
    pub fn method_not_allowed(method: &Method, allowed: &[Method]) -> Self {
        let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        let mut error = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            format!(
                "Method {method} is not allowed here; use {}",
                allow.join(" or ")
            ),
        );
        error.allow = Some(allow.join(", "));
        error
    }

    /// Adds a Retry-After.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The HTTP response.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec(&ErrorBody {
            error: self.error,
            error_description: &self.description,
        })
        .unwrap_or_default();
        let mut response = json_response(self.status, body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            let allow = self
                .allow
                .as_deref()
                .and_then(|a| HeaderValue::from_str(a).ok())
                .unwrap_or(HeaderValue::from_static("GET"));
            response.headers_mut().insert(header::ALLOW, allow);
        }
        response
    }
}

/// A JSON response with IMDS's content type.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// What kind of request a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/metadata/identity/oauth2/token` ("metadata" in any case).
    Token,
    /// Looks like the token path but is not it: never forwarded.
    MalformedToken,
    /// Anything else under `/metadata/identity`: never forwarded (404). On a
    /// VM where Azure enables them, its "managed identity v2" endpoints
    /// (`getplatformmetadata`, `issuecredential`) hand out the VM's own
    /// credential.
    IdentityOther,
    /// `/metadata/instance…`.
    Instance,
    /// Anything else: forwarded to IMDS for attributed workloads.
    Other,
}

/// Whether `path` has the only shape IMDS's own paths have: `/` and
/// segments of letters, digits, `-`, `_`, `.` and `~`, none of them empty
/// (but for a trailing `/`), `.` or `..`.
///
/// Anything else (percent-encoding, `\`, `//`, dot segments, `;`) may be
/// read differently upstream: a front end like HTTP.sys decodes and
/// canonicalises paths, so `/metadata/identity/oauth2/%74oken` reaches IMDS
/// as its token endpoint, which then answers with whatever identity the
/// query names. Such paths are never forwarded.
pub fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    rest.is_empty()
        || rest.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
        })
}

/// Classifies a request path as NMI's router does. A non-canonical path
/// (see [`is_canonical`]) is [`Route::MalformedToken`]: never forwarded.
pub fn route(path: &str) -> Route {
    if !is_canonical(path) {
        return Route::MalformedToken;
    }
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let first = segments.next().unwrap_or("");
    let rest = segments.next().unwrap_or("");
    let is_metadata = first.eq_ignore_ascii_case("metadata");
    if is_metadata && (rest == "identity/oauth2/token" || rest == "identity/oauth2/token/") {
        return Route::Token;
    }
    let lower = path.to_ascii_lowercase();
    if let Some(after) = lower.strip_prefix("/metadata/identity")
        && let Some(oauth) = after.find("oauth2")
        && after[oauth..].contains("token")
    {
        return Route::MalformedToken;
    }
    if let Some(after) = lower.strip_prefix("/metadata/identity")
        && (after.is_empty() || after.starts_with('/'))
    {
        return Route::IdentityOther;
    }
    // Case-insensitive: an upstream that ignores case must not see an
    // instance path that escaped --block-instance-metadata.
    if let Some(rest) = lower.strip_prefix("/metadata/")
        && (rest == "instance" || rest.starts_with("instance/"))
    {
        return Route::Instance;
    }
    Route::Other
}

/// Checks the headers every IMDS request must satisfy. Runs before any other
/// validation: SDK probes send no `Metadata` and must get a quick 400.
pub fn check_headers(headers: &HeaderMap) -> Result<(), ImdsError> {
    let metadata_ok = headers.get_all("metadata").iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
    });
    if !metadata_ok {
        return Err(ImdsError::bad_request(
            "Required metadata header not specified",
        ));
    }
    if headers.contains_key("x-forwarded-for") {
        return Err(ImdsError::bad_request(
            "Requests with X-Forwarded-For are not allowed: the metadata endpoint only answers the workload itself",
        ));
    }
    Ok(())
}

/// The token endpoint only answers GET.
pub fn check_method(method: &Method) -> Result<(), ImdsError> {
    if method == Method::GET {
        Ok(())
    } else {
        Err(ImdsError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            format!("Method {method} is not allowed; use GET"),
        ))
    }
}

/// A validated token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenQuery {
    /// `api-version`.
    pub api_version: String,
    /// `resource`, percent-decoded, exactly as the client meant it.
    pub resource: String,
    /// Which identity the client named.
    pub requested: RequestedIdentity,
}

/// Parses and validates the token request's query string.
pub fn parse_token_query(query: Option<&str>) -> Result<TokenQuery, ImdsError> {
    let mut params: HashMap<String, String> = HashMap::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let key = key.into_owned();
        if params.insert(key.clone(), value.into_owned()).is_some() {
            return Err(ImdsError::bad_request(format!(
                "Duplicate query parameter {key}"
            )));
        }
    }
    let api_version = params.get("api-version").cloned().unwrap_or_default();
    if api_version.is_empty() {
        return Err(ImdsError::bad_request(
            "Required api-version parameter not specified",
        ));
    }
    if !api_version_supported(&api_version) {
        return Err(ImdsError::bad_request(format!(
            "Unsupported api-version {api_version:?}; use {OLDEST_API_VERSION} or newer"
        )));
    }
    let resource = params.get("resource").cloned().unwrap_or_default();
    if resource.trim().is_empty() {
        return Err(ImdsError::bad_request(
            "Required audience parameter not specified",
        ));
    }
    let mut named = Vec::new();
    for key in [
        "client_id",
        "object_id",
        "msi_res_id",
        "mi_res_id",
        "msi-res-id",
    ] {
        if let Some(value) = params.get(key).filter(|v| !v.is_empty()) {
            named.push((key, value.clone()));
        }
    }
    let requested = match named.as_slice() {
        [] => RequestedIdentity::Any,
        [(key, value)] => match *key {
            "client_id" => RequestedIdentity::ClientId(value.clone()),
            "object_id" => RequestedIdentity::ObjectId(value.clone()),
            _ => RequestedIdentity::ResourceId(value.clone()),
        },
        _ => {
            return Err(ImdsError::bad_request(format!(
                "Only one of client_id, object_id and msi_res_id may be given (got {})",
                named.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            )));
        }
    };
    Ok(TokenQuery {
        api_version,
        resource,
        requested,
    })
}

/// `YYYY-MM-DD` (optionally with a `-preview` style suffix) not older than
/// 2018-02-01.
fn api_version_supported(version: &str) -> bool {
    let date = version.get(..10).unwrap_or("");
    let well_formed = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        })
        && (version.len() == 10 || version.as_bytes()[10] == b'-');
    well_formed && date >= OLDEST_API_VERSION
}

/// The 200 response, IMDS's shape: every field a string. The token's own
/// members come pre-escaped from the cache ([`IssuedToken::json_fields`]).
pub fn token_response(token: &IssuedToken, resource: &str, now: u64) -> Response<Full<Bytes>> {
    let resource = serde_json::to_string(resource).unwrap_or_else(|_| "\"\"".into());
    let body = format!(
        "{{{},\"refresh_token\":\"\",\"expires_in\":\"{}\",\"expires_on\":\"{}\",\"not_before\":\"{}\",\"resource\":{}}}",
        token.json_fields(),
        token.expires_on.saturating_sub(now),
        token.expires_on,
        token.not_before,
        resource
    );
    json_response(StatusCode::OK, body.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_nmi() {
        assert_eq!(route("/metadata/identity/oauth2/token"), Route::Token);
        assert_eq!(route("/METADATA/identity/oauth2/token"), Route::Token);
        assert_eq!(route("/Metadata/identity/oauth2/token/"), Route::Token);
        assert_eq!(
            route("/metadata/identity/OAUTH2/token"),
            Route::MalformedToken
        );
        assert_eq!(
            route("/metadata/identity/x/oauth2/y/token"),
            Route::MalformedToken
        );
        assert_eq!(route("/metadata/instance"), Route::Instance);
        assert_eq!(route("/Metadata/instance/compute"), Route::Instance);
        assert_eq!(route("/metadata/instancex"), Route::Other);
        assert_eq!(route("/doesnotexist"), Route::Other);
        assert_eq!(route("/METADATA/INSTANCE/compute"), Route::Instance);
        for path in [
            "/metadata/identity/getplatformmetadata",
            "/metadata/identity/issuecredential",
            "/Metadata/Identity/credential",
            "/metadata/identity",
            "/metadata/identity/",
            "/metadata/identity/oauth2",
        ] {
            assert_eq!(route(path), Route::IdentityOther, "{path}");
        }
        assert_eq!(route("/metadata/identityx"), Route::Other);
    }

    #[test]
    fn non_canonical_paths_are_never_forwarded() {
        for path in [
            "/metadata/identity/oauth2/%74oken",
            "/%6detadata/identity/oauth2/token",
            "/metadata/identity%2Foauth2%2Ftoken",
            "/metadata/identity/oauth2/x/../token",
            "/metadata/./identity/oauth2/token",
            "/metadata//identity/oauth2/token",
            "//metadata/identity/oauth2/token",
            "/metadata\\identity\\oauth2\\token",
            "/metadata/%69nstance",
            "/metadata/instance;x",
            "metadata/instance",
            "",
        ] {
            assert!(!is_canonical(path), "{path}");
            assert_eq!(route(path), Route::MalformedToken, "{path}");
        }
        for path in [
            "/",
            "/metadata/instance/compute/tagsList",
            "/metadata/identity/oauth2/token/",
            "/metadata/attested/document",
            "/metadata/versions",
        ] {
            assert!(is_canonical(path), "{path}");
        }
    }

    #[test]
    fn metadata_header_comes_first_and_xff_is_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            check_headers(&headers).unwrap_err().description,
            "Required metadata header not specified"
        );
        headers.insert("metadata", HeaderValue::from_static("false"));
        assert!(check_headers(&headers).is_err());
        headers.insert("metadata", HeaderValue::from_static("true"));
        assert!(check_headers(&headers).is_ok());
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        assert!(
            check_headers(&headers)
                .unwrap_err()
                .description
                .contains("X-Forwarded-For")
        );
    }

    #[test]
    fn parses_what_each_sdk_sends() {
        // Python: resource not percent-encoded.
        let q = parse_token_query(Some(
            "api-version=2018-02-01&resource=https://database.windows.net/&client_id=abc",
        ))
        .unwrap();
        assert_eq!(q.resource, "https://database.windows.net/");
        assert_eq!(q.requested, RequestedIdentity::ClientId("abc".into()));
        // Rust: 2019-08-01, encoded resource, msi_res_id.
        let q = parse_token_query(Some(
            "api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net&msi_res_id=%2Fsubscriptions%2Fx",
        ))
        .unwrap();
        assert_eq!(q.resource, "https://vault.azure.net");
        assert_eq!(
            q.requested,
            RequestedIdentity::ResourceId("/subscriptions/x".into())
        );
        for alias in ["mi_res_id", "msi-res-id"] {
            let q = parse_token_query(Some(&format!(
                "api-version=2018-02-01&resource=r&{alias}=/subscriptions/y"
            )))
            .unwrap();
            assert_eq!(
                q.requested,
                RequestedIdentity::ResourceId("/subscriptions/y".into())
            );
        }
        let q = parse_token_query(Some("api-version=2025-04-07&resource=r&object_id=o")).unwrap();
        assert_eq!(q.requested, RequestedIdentity::ObjectId("o".into()));
    }

    #[test]
    fn rejects_bad_queries() {
        let cases = [
            (None, "api-version"),
            (Some("resource=r"), "api-version"),
            (
                Some("api-version=2017-09-01&resource=r"),
                "Unsupported api-version",
            ),
            (
                Some("api-version=latest&resource=r"),
                "Unsupported api-version",
            ),
            (Some("api-version=2018-02-01"), "audience"),
            (Some("api-version=2018-02-01&resource="), "audience"),
            (
                Some("api-version=2018-02-01&resource=a&resource=b"),
                "Duplicate",
            ),
            (
                Some("api-version=2018-02-01&resource=a&client_id=x&object_id=y"),
                "Only one",
            ),
        ];
        for (query, expected) in cases {
            let error = parse_token_query(query).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(error.description.contains(expected), "{query:?}: {error:?}");
        }
    }

    #[test]
    fn token_bodies_have_every_field_as_a_string() {
        let token = IssuedToken::new(
            "a\"b".into(),
            2000,
            1000,
            "Bearer".into(),
            "https://vault.azure.net".into(),
            "cid".into(),
        );
        let response = token_response(&token, "https://vault.azure.net/", 1500);
        let body = futures_lite_body(response);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for (field, value) in [
            ("access_token", "a\"b"),
            ("refresh_token", ""),
            ("expires_in", "500"),
            ("expires_on", "2000"),
            ("not_before", "1000"),
            ("resource", "https://vault.azure.net/"),
            ("token_type", "Bearer"),
            ("client_id", "cid"),
        ] {
            assert_eq!(json[field], value, "{field}");
        }
    }

    fn futures_lite_body(response: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn error_bodies_are_imds_json() {
        let response = ImdsError::identity_not_found()
            .with_retry_after(5)
            .response();
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
    }
}
