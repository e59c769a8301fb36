//! Reading a request head before hyper sees it, so that malformed, oversized
//! and slow requests get an IMDS-style JSON answer (hyper's own would have no
//! body) and a slow client cannot hold a connection open (slowloris).
//! The bytes read are replayed to hyper through [`Rewind`].

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::imds::ImdsError;

/// Headers parsed at most; more is a malformed request.
const MAX_HEADERS: usize = 64;

/// Limits on a request head.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Largest head (request line + headers) accepted.
    pub max_bytes: usize,
    /// Time allowed for the whole head to arrive.
    pub timeout: Duration,
}

/// Why a head was refused.
#[derive(Debug)]
pub enum HeadError {
    /// The peer closed before sending anything: nothing to answer.
    Closed,
    /// An answer to send before closing, and a reason for metrics.
    Reject {
        error: ImdsError,
        reason: &'static str,
    },
}

impl HeadError {
    fn reject(status: StatusCode, reason: &'static str, description: String) -> Self {
        HeadError::Reject {
            error: ImdsError::new(status, "invalid_request", description),
            reason,
        }
    }
}

/// Reads until the end of the head (`\r\n\r\n`) and checks that it parses.
/// Returns every byte read (the head and anything after it).
pub async fn read_head<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: HeadLimits,
) -> Result<Bytes, HeadError> {
    let mut buf = BytesMut::with_capacity(1024);
    let read = async {
        loop {
            let end = find_head_end(&buf);
            if end.unwrap_or(buf.len()) > limits.max_bytes {
                return Err(HeadError::reject(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "header_too_large",
                    format!("Request header too large (over {} bytes)", limits.max_bytes),
                ));
            }
            if let Some(end) = end {
                return check_parse(&buf[..end]);
            }
            let n = reader
                .read_buf(&mut buf)
                .await
                .map_err(|_| HeadError::Closed)?;
            if n == 0 {
                if buf.is_empty() {
                    return Err(HeadError::Closed);
                }
                // A truncated head: answer as malformed if it already is.
                return check_parse(&buf).and(Err(HeadError::Closed));
            }
        }
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(())) => Ok(buf.freeze()),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(HeadError::reject(
            StatusCode::REQUEST_TIMEOUT,
            "slow_request",
            format!(
                "Request header not received within {} ms",
                limits.timeout.as_millis()
            ),
        )),
    }
}

/// Where the head ends: the first empty line after the request line. Empty
/// lines before the request line are skipped, as httparse and hyper skip
/// them (RFC 9112 §2.2), so that `\r\n\r\nGET …` is not taken for a
/// complete (empty) head.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    buf[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

fn check_parse(head: &[u8]) -> Result<(), HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(_) => {
            if request.version == Some(0) {
                // HTTP/1.0 clients do not exist among the SDKs; accept anyway.
            }
            Ok(())
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::reject(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            format!("More than {MAX_HEADERS} request headers"),
        )),
        Err(error) => Err(HeadError::reject(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("Malformed HTTP request: {error}"),
        )),
    }
}

/// An IO that first yields `prefix`, then reads from `inner`.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// Replays `prefix` before `inner`.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes a complete HTTP/1.1 response for a refused head and closes.
pub fn raw_error_response(error: &ImdsError) -> Vec<u8> {
    let body = serde_json::json!({
        "error": error.error,
        "error_description": error.description,
    })
    .to_string();
    // The 503 of the connection cap carries one, so SDKs pace their retries.
    let retry_after = error
        .retry_after
        .map(|seconds| format!("retry-after: {seconds}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: {}\r\n{retry_after}connection: close\r\n\r\n{}",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len(),
        body
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 256,
        timeout: Duration::from_millis(200),
    };

    async fn read(input: &[u8]) -> Result<Bytes, HeadError> {
        let mut reader = input;
        read_head(&mut reader, LIMITS).await
    }

    fn status(result: Result<Bytes, HeadError>) -> u16 {
        match result {
            Err(HeadError::Reject { error, .. }) => error.status.as_u16(),
            Err(HeadError::Closed) => 0,
            Ok(_) => 200,
        }
    }

    #[tokio::test]
    async fn accepts_a_normal_head_and_keeps_every_byte() {
        let input = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nextra";
        assert_eq!(&read(input).await.unwrap()[..], &input[..]);
    }

    #[tokio::test]
    async fn refuses_malformed_oversized_and_slow_heads() {
        assert_eq!(status(read(b"NOT A REQUEST\r\n\r\n").await), 400);
        // Empty lines before the request line are skipped, not a head.
        let input = b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(&read(input).await.unwrap()[..], &input[..]);
        assert_eq!(status(read(b"\r\n\r\nGET /x HT").await), 0);
        assert_eq!(status(read(b"\r\n\r\nd=").await), 400);
        assert_eq!(
            status(read(b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n").await),
            400
        );
        let big = format!("GET /x HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(400));
        assert_eq!(status(read(big.as_bytes()).await), 431);
        assert_eq!(status(read(b"").await), 0);
        // A client that stops sending mid-head.
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /x HTTP/1.1\r\n")
            .await
            .unwrap();
        assert_eq!(status(read_head(&mut server, LIMITS).await), 408);
    }

    #[test]
    fn raw_error_is_a_complete_json_response() {
        let text = String::from_utf8(raw_error_response(&ImdsError::bad_request("x"))).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with(r#"{"error":"invalid_request","error_description":"x"}"#));
        assert!(!text.contains("retry-after"));
        let text = String::from_utf8(raw_error_response(
            &ImdsError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "busy",
            )
            .with_retry_after(1),
        ))
        .unwrap();
        assert!(text.contains("\r\nretry-after: 1\r\n"), "{text}");
    }
}
