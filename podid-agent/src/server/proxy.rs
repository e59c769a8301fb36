//! Forwarding non-token IMDS requests (instance metadata, attested data, …)
//! to the real IMDS for attributed workloads, as NMI does.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// Largest request or response body forwarded.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Headers that describe one hop and are not forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid upstream IMDS URL {url:?}: {message}")]
    BadUpstream { url: String, message: String },
    #[error("forwarding to IMDS failed")]
    Forward(#[source] hyper_util::client::legacy::Error),
    #[error("IMDS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("building the forwarded request: {0}")]
    Build(String),
}

/// Forwards to one upstream IMDS.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    authority: http::uri::Authority,
    scheme: http::uri::Scheme,
    timeout: Duration,
}

impl Proxy {
    /// A proxy to `upstream` (an `http://host[:port]` URL).
    pub fn new(upstream: &str, timeout: Duration) -> Result<Self, ProxyError> {
        let bad = |message: &str| ProxyError::BadUpstream {
            url: upstream.to_string(),
            message: message.to_string(),
        };
        let uri: Uri = upstream.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| bad("no scheme"))?;
        if scheme != http::uri::Scheme::HTTP {
            return Err(bad("IMDS is plain http"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| bad("no host"))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            authority,
            scheme,
            timeout,
        })
    }

    /// Forwards `request` unchanged but for hop-by-hop headers and `Host`,
    /// and returns IMDS's answer unchanged but for hop-by-hop headers.
    pub async fn forward(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, ProxyError> {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|_| ProxyError::TooLarge)?
            .to_bytes();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::Build(e.to_string()))?;
        let mut upstream = Request::builder()
            .method(parts.method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| ProxyError::Build(e.to_string()))?;
        *upstream.headers_mut() = strip_hop_by_hop(parts.headers);
        upstream.headers_mut().remove(header::HOST);
        let response = tokio::time::timeout(self.timeout, self.client.request(upstream))
            .await
            .map_err(|_| ProxyError::Timeout(self.timeout))?
            .map_err(ProxyError::Forward)?;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(self.timeout, Limited::new(body, MAX_BODY).collect())
            .await
            .map_err(|_| ProxyError::Timeout(self.timeout))?
            .map_err(|_| ProxyError::TooLarge)?
            .to_bytes();
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = parts.status;
        *response.headers_mut() = strip_hop_by_hop(parts.headers);
        response.headers_mut().remove(header::CONTENT_LENGTH);
        Ok(response)
    }
}

fn strip_hop_by_hop(mut headers: HeaderMap) -> HeaderMap {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(name.as_str());
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_upstreams_are_accepted() {
        assert!(Proxy::new("http://127.0.0.1:8080", Duration::from_secs(1)).is_ok());
        assert!(Proxy::new("https://127.0.0.1", Duration::from_secs(1)).is_err());
        assert!(Proxy::new("not a url", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("metadata", "true".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        let out = strip_hop_by_hop(headers);
        assert!(out.get("metadata").is_some());
        assert!(out.get("x-private").is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::TRANSFER_ENCODING).is_none());
    }
}
