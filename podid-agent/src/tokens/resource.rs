//! Normalising the `resource` a pod asked for.
//!
//! - Percent-decoded: Python sends `https://database.windows.net/` raw, Node
//!   and Rust percent-encode it; both must be one cache entry. (Decoding a
//!   value the server already decoded changes nothing unless it holds `%`.)
//! - Surrounding whitespace is trimmed.
//! - A trailing `/.default` (a v2 scope; SDKs strip it, but not every
//!   caller does) is removed: IMDS and the v1 endpoint take a resource.
//! - A trailing slash is **kept and significant**: v1 tokens carry the
//!   resource verbatim as `aud`, and some APIs compare `aud` exactly, so
//!   `https://database.windows.net/` and `https://database.windows.net` are
//!   different requests and never share a token.
//! - Case is kept (audiences are compared as given).

use std::borrow::Cow;

use super::TokenError;

/// Longest resource accepted.
const MAX_RESOURCE_LEN: usize = 2048;

/// The normalised resource, or `InvalidResource`.
pub(crate) fn normalise_resource(raw: &str) -> Result<String, TokenError> {
    let invalid = |reason: &'static str| TokenError::InvalidResource {
        resource: raw.chars().take(256).collect(),
        reason,
    };
    let decoded: Cow<'_, str> = percent_encoding::percent_decode_str(raw.trim())
        .decode_utf8()
        .map_err(|_| invalid("not valid UTF-8 once percent-decoded"))?;
    let mut resource = decoded.trim();
    if resource.len() >= "/.default".len() {
        let (head, tail) = resource.split_at(resource.len() - "/.default".len());
        if tail.eq_ignore_ascii_case("/.default") {
            resource = head;
        }
    }
    if resource.is_empty() {
        return Err(invalid("resource cannot be empty"));
    }
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(invalid("resource is too long"));
    }
    if resource.chars().any(char::is_control) {
        return Err(invalid("resource contains control characters"));
    }
    Ok(resource.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_percent_encoded_resources_are_the_same() {
        let raw = normalise_resource("https://database.windows.net/").expect("valid");
        let encoded = normalise_resource("https%3A%2F%2Fdatabase.windows.net%2F").expect("valid");
        assert_eq!(raw, encoded);
        assert_eq!(raw, "https://database.windows.net/");
    }

    #[test]
    fn trailing_slash_is_significant() {
        assert_ne!(
            normalise_resource("https://database.windows.net/").expect("valid"),
            normalise_resource("https://database.windows.net").expect("valid")
        );
    }

    #[test]
    fn a_default_scope_suffix_is_stripped() {
        for scope in [
            "https://vault.azure.net/.default",
            "https%3A%2F%2Fvault.azure.net%2F.default",
            "https://vault.azure.net/.DEFAULT",
        ] {
            assert_eq!(
                normalise_resource(scope).expect("valid"),
                "https://vault.azure.net",
                "{scope}"
            );
        }
        assert_eq!(
            normalise_resource("api://my-app/.default").expect("valid"),
            "api://my-app"
        );
    }

    #[test]
    fn rejects_empty_and_malformed_resources() {
        for bad in ["", "  ", "/.default", "%FF%FE", "https://x\n/", "%0A"] {
            let err = normalise_resource(bad).expect_err("rejected");
            assert_eq!(err.http_status(), 400, "{bad:?}: {err}");
        }
        assert!(normalise_resource(&"a".repeat(MAX_RESOURCE_LEN + 1)).is_err());
    }
}
