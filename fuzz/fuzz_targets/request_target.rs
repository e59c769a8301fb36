//! A request target (path and query) and headers, without HTTP framing, so
//! mutations go straight at routing and the token query. Input: the target
//! on the first line, then `name: value` header lines.
//!
//! Invariants (`podid_fuzz`): no spelling of the token path that an upstream
//! could normalise to it is ever forwarded to IMDS, nor can
//! `/metadata/instance` be reached under another name; the token query
//! follows IMDS's rules exactly (duplicates always refused, a non-empty
//! resource, a supported api-version, at most one identity); every refusal
//! is a 4xx with IMDS's JSON body.

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use podid_fuzz::{check_request, check_route, check_token_query};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("").trim_end_matches('\r');
    // The parsers on their own, on text no URI parser vetted.
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    check_route(path);
    let _ = check_token_query(query);

    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim_start()),
        ) {
            headers.append(name, value);
        }
    }
    check_request(&Method::GET, &uri, &headers);
});
