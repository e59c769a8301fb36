//! Issued tokens: parsing upstream token responses, and fingerprints.

use std::fmt;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A token from upstream. `Debug` never shows the token itself.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The bearer token. Never log it; use [`IssuedToken::fingerprint`].
    pub access_token: String,
    /// Expiry, unix seconds.
    pub expires_on: u64,
    /// Start of validity, unix seconds.
    pub not_before: u64,
    /// Token type (`Bearer`).
    pub token_type: String,
    /// The (normalised) resource it is for.
    pub resource: String,
    /// Client id of the identity it was issued to (empty if unknown).
    pub client_id: String,
    /// First 12 hex characters of SHA-256 of the token: safe to log.
    pub fingerprint: String,
    /// `"access_token":…,"token_type":…,"client_id":…`, JSON-escaped once:
    /// a cached token is served many times, and escaping a kilobyte of token
    /// per response is measurable.
    json_fields: String,
}

impl IssuedToken {
    /// A token, with its fingerprint and pre-rendered JSON fields.
    pub fn new(
        access_token: String,
        expires_on: u64,
        not_before: u64,
        token_type: String,
        resource: String,
        client_id: String,
    ) -> Self {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
        let json_fields = format!(
            "\"access_token\":{},\"token_type\":{},\"client_id\":{}",
            quote(&access_token),
            quote(&token_type),
            quote(&client_id)
        );
        Self {
            fingerprint: fingerprint(&access_token),
            access_token,
            expires_on,
            not_before,
            token_type,
            resource,
            client_id,
            json_fields,
        }
    }

    /// The JSON members `access_token`, `token_type` and `client_id`, ready to
    /// splice into a response object.
    pub fn json_fields(&self) -> &str {
        &self.json_fields
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .field("not_before", &self.not_before)
            .field("token_type", &self.token_type)
            .field("resource", &self.resource)
            .field("client_id", &self.client_id)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// The first 12 hex characters of SHA-256 of `token`.
pub fn fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// A number that IMDS and the v1 endpoint send as a string and others as a
/// JSON number.
fn unix_field(body: &Value, name: &str) -> Result<Option<u64>, String> {
    match &body[name] {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{name} is not a non-negative integer")),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{name} is not a number")),
        _ => Err(format!("{name} has an unexpected type")),
    }
}

/// Parses a token response (IMDS, Entra ID v1 or v2) received at `now`
/// (unix seconds): `access_token` is required; `expires_on` is taken as is,
/// or computed from `expires_in`; the token must not be expired already.
pub(crate) fn parse_token_response(
    body: &[u8],
    now: u64,
    resource: &str,
    client_id: &str,
) -> Result<IssuedToken, String> {
    let json: Value =
        serde_json::from_slice(body).map_err(|e| format!("response is not JSON: {e}"))?;
    let access_token = json["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("response has no access_token")?
        .to_owned();
    let expires_on = match unix_field(&json, "expires_on")? {
        Some(on) => on,
        None => now.saturating_add(
            unix_field(&json, "expires_in")?
                .ok_or("response has neither expires_on nor expires_in")?,
        ),
    };
    if expires_on <= now {
        return Err(format!(
            "token already expired (expires_on {expires_on}, now {now})"
        ));
    }
    let not_before = unix_field(&json, "not_before")?.unwrap_or(now);
    let token_type = json["token_type"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or("Bearer")
        .to_owned();
    let client_id = json["client_id"]
        .as_str()
        .filter(|c| !c.is_empty())
        .unwrap_or(client_id)
        .to_owned();
    Ok(IssuedToken::new(
        access_token,
        expires_on,
        not_before,
        token_type,
        resource.to_owned(),
        client_id,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_imds_string_fields() {
        let body = br#"{"access_token":"tok","refresh_token":"","expires_in":"3599","expires_on":"2000","not_before":"1000","resource":"r","token_type":"Bearer","client_id":"cid"}"#;
        let t = parse_token_response(body, 1500, "r", "").expect("parses");
        assert_eq!((t.expires_on, t.not_before), (2000, 1000));
        assert_eq!(t.client_id, "cid");
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(t.fingerprint, fingerprint("tok"));
    }

    #[test]
    fn accepts_numbers_and_expires_in_only() {
        let v2 = br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"tok"}"#;
        let t = parse_token_response(v2, 1000, "r", "given").expect("parses");
        assert_eq!(t.expires_on, 4599);
        assert_eq!(t.not_before, 1000);
        assert_eq!(t.client_id, "given");
        let numeric = br#"{"access_token":"tok","expires_on":5000}"#;
        assert_eq!(
            parse_token_response(numeric, 1000, "r", "")
                .expect("parses")
                .expires_on,
            5000
        );
    }

    #[test]
    fn rejects_unusable_responses() {
        for body in [
            &br#"not json"#[..],
            br#"{"expires_on":"2000"}"#,
            br#"{"access_token":"","expires_on":"2000"}"#,
            br#"{"access_token":"t"}"#,
            br#"{"access_token":"t","expires_on":"soon"}"#,
            br#"{"access_token":"t","expires_on":"999"}"#,
        ] {
            let err = parse_token_response(body, 1000, "r", "").expect_err("rejected");
            assert!(
                !err.contains("\"t\""),
                "errors never quote the token: {err}"
            );
        }
    }

    #[test]
    fn debug_redacts_the_token_and_fingerprints_are_12_hex() {
        let t = parse_token_response(
            br#"{"access_token":"super-secret-token","expires_in":"60"}"#,
            1,
            "r",
            "c",
        )
        .expect("parses");
        let debug = format!("{t:?}");
        assert!(!debug.contains("super-secret-token"), "{debug}");
        assert!(debug.contains(&t.fingerprint));
        assert_eq!(t.fingerprint.len(), 12);
        assert!(t.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
        // sha256("abc") = ba7816bf8f01cfea…
        assert_eq!(fingerprint("abc"), "ba7816bf8f01");
    }
}
