//! The upstream requests: IMDS's managed-identity token endpoint and Entra
//! ID's v1 client-credentials grant (v1 takes a `resource`, as ADAL, which
//! aad-pod-identity used, did).

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, header};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::{
    credential::ImdsSelector,
    upstream::{Upstream, UpstreamRequest},
};

/// api-version sent to IMDS (what aad-pod-identity and most SDKs send).
pub(crate) const IMDS_API_VERSION: &str = "2018-02-01";

/// `client_assertion_type` of a JWT client assertion.
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Everything but RFC 3986 unreserved characters is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn enc(value: &str) -> String {
    utf8_percent_encode(value, COMPONENT).to_string()
}

/// `GET {imds}/metadata/identity/oauth2/token?api-version=…&resource=…[&client_id|object_id|msi_res_id=…]`
/// with `Metadata: true`. Only the node-identity credential of exception
/// pods ever sends no selector.
pub(crate) fn imds_token(
    imds_base: &str,
    resource: &str,
    selector: Option<&ImdsSelector>,
) -> UpstreamRequest {
    let mut url = format!(
        "{imds_base}/metadata/identity/oauth2/token?api-version={IMDS_API_VERSION}&resource={}",
        enc(resource)
    );
    if let Some(selector) = selector {
        let (param, value) = selector.param();
        url.push('&');
        url.push_str(param);
        url.push('=');
        url.push_str(&enc(value));
    }
    UpstreamRequest {
        upstream: Upstream::Imds,
        method: Method::GET,
        url,
        headers: vec![(
            HeaderName::from_static("metadata"),
            HeaderValue::from_static("true"),
        )],
        body: Bytes::new(),
    }
}

/// The v1 token endpoint of `tenant` (also the `aud` of client assertions).
pub(crate) fn entra_token_url(authority: &str, tenant: &str) -> String {
    format!("{authority}/{tenant}/oauth2/token")
}

/// How a service principal proves itself.
pub(crate) enum ClientAuth<'a> {
    Secret(&'a str),
    Assertion(&'a str),
}

/// `POST {authority}/{tenant}/oauth2/token` with
/// `grant_type=client_credentials&client_id&resource` and the credential.
pub(crate) fn entra_token(
    url: &str,
    client_id: &str,
    resource: &str,
    auth: ClientAuth<'_>,
) -> UpstreamRequest {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials")
        .append_pair("client_id", client_id)
        .append_pair("resource", resource);
    match auth {
        ClientAuth::Secret(secret) => {
            form.append_pair("client_secret", secret);
        }
        ClientAuth::Assertion(jwt) => {
            form.append_pair("client_assertion_type", JWT_BEARER)
                .append_pair("client_assertion", jwt);
        }
    }
    UpstreamRequest {
        upstream: Upstream::EntraId,
        method: Method::POST,
        url: url.to_owned(),
        headers: vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            ),
            (header::ACCEPT, HeaderValue::from_static("application/json")),
        ],
        body: Bytes::from(form.finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imds_request_encodes_the_resource_and_sends_metadata() {
        let req = imds_token(
            "http://169.254.169.254",
            "https://database.windows.net/",
            Some(&ImdsSelector::ClientId("cid-1".into())),
        );
        assert_eq!(
            req.url,
            "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fdatabase.windows.net%2F&client_id=cid-1"
        );
        assert_eq!(req.method, Method::GET);
        assert!(
            req.headers
                .iter()
                .any(|(k, v)| k == "metadata" && v == "true")
        );
        let by_resource = imds_token(
            "http://x",
            "r",
            Some(&ImdsSelector::ResourceId(
                "/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a&client_id=x".into(),
            )),
        );
        assert_eq!(
            by_resource.url,
            "http://x/metadata/identity/oauth2/token?api-version=2018-02-01&resource=r&msi_res_id=%2Fsubscriptions%2Fs%2Fresourcegroups%2Fg%2Fproviders%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fa%26client_id%3Dx",
            "the selector is one parameter, whatever it holds"
        );
        let node = imds_token("http://x", "r", None);
        assert!(!node.url.contains("client_id"));
    }

    #[test]
    fn entra_request_is_a_v1_client_credentials_form() {
        let url = entra_token_url("https://login.microsoftonline.com", "tenant-1");
        assert_eq!(
            url,
            "https://login.microsoftonline.com/tenant-1/oauth2/token"
        );
        let req = entra_token(
            &url,
            "cid",
            "https://vault.azure.net",
            ClientAuth::Secret("a&b=c"),
        );
        let form: Vec<(String, String)> = form_urlencoded::parse(&req.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("grant_type"), Some("client_credentials"));
        assert_eq!(get("client_id"), Some("cid"));
        assert_eq!(get("resource"), Some("https://vault.azure.net"));
        assert_eq!(get("client_secret"), Some("a&b=c"));
        let req = entra_token(&url, "cid", "r", ClientAuth::Assertion("h.p.s"));
        let form: Vec<(String, String)> = form_urlencoded::parse(&req.body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert!(form.contains(&("client_assertion_type".into(), JWT_BEARER.into())));
        assert!(form.contains(&("client_assertion".into(), "h.p.s".into())));
        assert!(!form.iter().any(|(k, _)| k == "client_secret"));
    }
}
