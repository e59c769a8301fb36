//! Arbitrary bytes from a connection, through the steps the server runs:
//! the bounded head read (`read_head`), the parse, an `http::Request` as
//! hyper would build it, then routing, header, method and query checks.
//!
//! Invariants: nothing panics; the head reader's verdict depends only on the
//! bytes, not on how they arrive or on the size limit below the head's end;
//! an accepted head is a complete HTTP request head within the limit; every
//! refusal is a 4xx with IMDS's JSON body (and a well-formed raw response);
//! see `podid_fuzz` for the routing and token-protocol invariants.

#![no_main]

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use podid_agent::server::{
    ServerSettings,
    head::{HeadError, HeadLimits, raw_error_response, read_head},
};
use podid_fuzz::{check_error, check_request, runtime};
use tokio::io::{AsyncRead, ReadBuf};

/// The server's own header cap; the timeout never fires on memory.
fn limits(max_bytes: usize) -> HeadLimits {
    HeadLimits {
        max_bytes,
        timeout: Duration::from_secs(600),
    }
}

/// A small cap, to reach the 431 path with short inputs.
const SMALL_LIMIT: usize = 96;
/// As in `server::head`.
const MAX_HEADERS: usize = 64;

/// A reader handing out at most `step` bytes per read: a client sending its
/// request in pieces.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Head(Bytes),
    Closed,
    Refused { status: u16, reason: &'static str },
}

fn read(data: &[u8], max_bytes: usize, step: usize) -> Verdict {
    let mut reader = Trickle { data, step };
    match runtime().block_on(read_head(&mut reader, limits(max_bytes))) {
        Ok(bytes) => Verdict::Head(bytes),
        Err(HeadError::Closed) => Verdict::Closed,
        Err(HeadError::Reject { error, reason }) => {
            check_error(&error);
            check_raw_response(&raw_error_response(&error), error.status.as_u16());
            Verdict::Refused {
                status: error.status.as_u16(),
                reason,
            }
        }
    }
}

/// The bytes written to a refused client form one complete response whose
/// length and status are right.
fn check_raw_response(raw: &[u8], status: u16) {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = response.parse(raw) else {
        panic!("raw error response does not parse: {raw:?}");
    };
    assert_eq!(response.code, Some(status));
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
        .expect("content-length");
    assert_eq!(length, raw.len() - head_len);
    let body: serde_json::Value =
        serde_json::from_slice(&raw[head_len..]).expect("raw error body is JSON");
    assert!(body["error"].is_string() && body["error_description"].is_string());
}

/// The verdict with only the head part of accepted bytes (how much beyond
/// it one read returned depends on the read size).
fn head_part(verdict: &Verdict, end: Option<usize>) -> Verdict {
    match (verdict, end) {
        (Verdict::Head(bytes), Some(end)) => Verdict::Head(bytes.slice(..end.min(bytes.len()))),
        (Verdict::Head(bytes), None) => Verdict::Head(bytes.clone()),
        (Verdict::Closed, _) => Verdict::Closed,
        (Verdict::Refused { status, reason }, _) => Verdict::Refused {
            status: *status,
            reason,
        },
    }
}

fn parse_status(head: &[u8]) -> Result<httparse::Status<usize>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    httparse::Request::new(&mut headers).parse(head)
}

fuzz_target!(|data: &[u8]| {
    let max_bytes = ServerSettings::default().max_header_bytes;
    // The head ends at the first empty line after the request line; empty
    // lines before it are skipped (RFC 9112 §2.2), as hyper skips them.
    let lead = data
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let end = data[lead..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| lead + i + 4);
    let whole = read(data, max_bytes, usize::MAX);
    let step = 1 + data.first().map_or(0, |b| usize::from(*b % 13));
    let trickled = read(data, max_bytes, step);
    assert_eq!(
        head_part(&whole, end),
        head_part(&trickled, end),
        "the verdict depends on how the bytes arrive (reads of {step})"
    );
    let small = read(data, SMALL_LIMIT, usize::MAX);
    if end.unwrap_or(data.len()) > SMALL_LIMIT {
        assert_eq!(
            small,
            Verdict::Refused {
                status: 431,
                reason: "header_too_large"
            }
        );
    } else {
        assert_eq!(head_part(&small, end), head_part(&whole, end));
    }

    let head = match whole {
        Verdict::Head(bytes) => bytes,
        Verdict::Closed => {
            // Only an empty or cut-short (not yet malformed) head.
            assert!(end.is_none(), "closed after a complete head");
            assert!(data.is_empty() || parse_status(data).is_ok());
            return;
        }
        Verdict::Refused { status, reason } => {
            assert!(
                matches!(
                    (status, reason),
                    (431, "header_too_large" | "too_many_headers") | (400, "malformed_request")
                ),
                "unexpected refusal {status} {reason}"
            );
            if reason != "header_too_large" {
                assert!(parse_status(&data[..end.unwrap_or(data.len())]).is_err());
            }
            return;
        }
    };
    let end = end.expect("an accepted head has its end");
    assert!(end <= max_bytes && head.len() >= end && data.starts_with(&head));

    // What hyper parses next is this head: it must be a complete request.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&head[..end]) {
        Ok(httparse::Status::Complete(n)) => assert!(n <= end),
        other => panic!(
            "accepted a head that is not a complete request ({other:?}); hyper would wait for \
             more with the header limits and time limit already spent"
        ),
    }
    // hyper answers a method, target or header it cannot represent itself.
    let Ok(method) = Method::from_bytes(request.method.unwrap_or("").as_bytes()) else {
        return;
    };
    let Ok(uri) = Uri::try_from(request.path.unwrap_or("")) else {
        return;
    };
    let mut map = HeaderMap::new();
    for header in request.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return;
        };
        map.append(name, value);
    }
    check_request(&method, &uri, &map);
});
