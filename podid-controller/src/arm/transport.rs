//! The HTTP transport under the `azure_core` pipeline (and the token
//! requests): hyper with rustls, so no second HTTP stack is pulled in.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use azure_core::{
    StatusCode,
    error::{Error as CoreError, ErrorKind},
    headers::{HeaderName, HeaderValue, Headers},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use super::ArmError;

/// hyper client implementing `azure_core::HttpClient`.
#[derive(Clone)]
pub struct HyperTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport")
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A response read in full.
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl HyperTransport {
    /// A transport whose requests give up after `timeout`. HTTPS uses the
    /// system's root certificates; plain HTTP is allowed (emulators).
    pub fn new(timeout: Duration) -> Result<Self, ArmError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A bad system certificate must not break the others.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            tracing::warn!("no system root certificates found: HTTPS endpoints will fail");
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ArmError::Setup(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(HyperTransport { client, timeout })
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<RawResponse, String> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading the body failed: {e}"))?
                .to_bytes();
            Ok(RawResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }
}

#[async_trait]
impl azure_core::HttpClient for HyperTransport {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        let body = match request.body() {
            azure_core::Body::Bytes(bytes) => bytes.clone(),
            azure_core::Body::SeekableStream(_) => {
                return Err(CoreError::message(
                    ErrorKind::Other,
                    "streamed request bodies are not supported by this transport",
                ));
            }
        };
        let mut builder = http::Request::builder()
            .method(request.method().as_ref())
            .uri(request.url().as_str());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(|e| CoreError::full(ErrorKind::Other, e, "building the HTTP request"))?;
        let raw = self
            .send(http_request)
            .await
            .map_err(|e| CoreError::message(ErrorKind::Io, e))?;
        let status = StatusCode::try_from(raw.status).map_err(|_| {
            CoreError::message(
                ErrorKind::DataConversion,
                format!("unknown HTTP status {}", raw.status),
            )
        })?;
        let mut headers = Headers::new();
        for (name, value) in &raw.headers {
            if let Ok(value) = value.to_str() {
                headers.insert(
                    HeaderName::from(name.as_str().to_string()),
                    HeaderValue::from(value.to_string()),
                );
            }
        }
        let body = raw.body;
        let stream = futures::stream::once(async move { Ok::<Bytes, CoreError>(body) });
        Ok(azure_core::Response::new(status, headers, Box::pin(stream)))
    }
}
