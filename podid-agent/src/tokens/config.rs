//! Token service configuration: plain data, checked once by
//! [`TokenConfig::validate`].

use std::time::Duration;

use http::Uri;

/// The SDKs give up on one IMDS request after 60 s; a call must end well
/// before, with a status they retry.
const SDK_TRY_TIMEOUT: Duration = Duration::from_secs(60);

/// How the token service talks to upstream and caches tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// Upstream IMDS base URL (`http://169.254.169.254`).
    pub imds_endpoint: String,
    /// Entra ID authority for service principals without their own
    /// (`https://login.microsoftonline.com`).
    pub aad_authority: String,
    /// Authorities an AzureIdentity's `adEndpoint` may name besides the
    /// Azure clouds' own Entra ID hosts and `aad_authority` (base URLs).
    pub allowed_authorities: Vec<String>,
    /// Refresh a cached token this long before it expires, or when less than
    /// a third of its lifetime is left, whichever comes first (and at least
    /// twice `safety_margin` before; never before half its lifetime).
    pub refresh_ahead: Duration,
    /// Never serve a cached token that expires within this margin.
    pub safety_margin: Duration,
    /// After a failed background refresh, wait at least this long before the
    /// next (doubling per failure, up to 5 minutes) while the old token stays
    /// servable.
    pub refresh_retry: Duration,
    /// Most tokens cached; the least recently used is evicted.
    pub max_entries: usize,
    /// Time allowed for one upstream attempt (connect, request and body).
    pub upstream_timeout: Duration,
    /// Most attempts per upstream call (retries of 429, 5xx, 410, timeouts
    /// and connection errors; IMDS 404 too, which means "updating").
    pub max_attempts: u32,
    /// Time budget of one call, attempts, backoff and `Retry-After` waits
    /// included. Must stay well under the SDKs' 60 s per try.
    pub max_total_wait: Duration,
    /// First backoff between attempts; doubles per attempt (up to 8 s), with
    /// jitter (50–100 % of the value).
    pub retry_base_delay: Duration,
    /// Most upstream calls in flight at once, per upstream (IMDS and Entra
    /// ID each); IMDS allows 5 concurrent identity requests per VM.
    pub upstream_concurrency: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            imds_endpoint: "http://169.254.169.254".to_owned(),
            aad_authority: "https://login.microsoftonline.com".to_owned(),
            allowed_authorities: Vec::new(),
            refresh_ahead: Duration::from_secs(300),
            safety_margin: Duration::from_secs(60),
            refresh_retry: Duration::from_secs(30),
            max_entries: 10_000,
            upstream_timeout: Duration::from_secs(8),
            max_attempts: 4,
            max_total_wait: Duration::from_secs(20),
            retry_base_delay: Duration::from_millis(500),
            upstream_concurrency: 5,
        }
    }
}

impl TokenConfig {
    /// Checks the configuration; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        base_url(&self.imds_endpoint).map_err(|e| format!("imds_endpoint: {e}"))?;
        base_url(&self.aad_authority).map_err(|e| format!("aad_authority: {e}"))?;
        if self.max_entries == 0 {
            return Err("max_entries must be at least 1".into());
        }
        if self.upstream_concurrency == 0 {
            return Err("upstream_concurrency must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.upstream_timeout.is_zero() {
            return Err("upstream_timeout must be positive".into());
        }
        if self.max_total_wait.is_zero() || self.max_total_wait >= SDK_TRY_TIMEOUT {
            return Err(format!(
                "max_total_wait must be positive and well under the SDKs' {} s per try (got {:?})",
                SDK_TRY_TIMEOUT.as_secs(),
                self.max_total_wait
            ));
        }
        Ok(())
    }
}

/// Parses an `http://` or `https://` base URL (no query), without a trailing
/// slash.
pub(crate) fn base_url(text: &str) -> Result<String, String> {
    let trimmed = text.trim().trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query"));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_point_at_azure() {
        let config = TokenConfig::default();
        config.validate().expect("defaults are valid");
        assert_eq!(config.imds_endpoint, "http://169.254.169.254");
        assert_eq!(config.aad_authority, "https://login.microsoftonline.com");
        assert!(config.max_total_wait < Duration::from_secs(30));
    }

    #[test]
    fn rejects_unusable_settings() {
        let bad = [
            TokenConfig {
                max_total_wait: Duration::from_secs(60),
                ..TokenConfig::default()
            },
            TokenConfig {
                max_entries: 0,
                ..TokenConfig::default()
            },
            TokenConfig {
                upstream_concurrency: 0,
                ..TokenConfig::default()
            },
            TokenConfig {
                max_attempts: 0,
                ..TokenConfig::default()
            },
            TokenConfig {
                imds_endpoint: "169.254.169.254".into(),
                ..TokenConfig::default()
            },
            TokenConfig {
                aad_authority: "ftp://login.microsoftonline.com".into(),
                ..TokenConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} must be rejected");
        }
    }

    #[test]
    fn base_urls_lose_their_trailing_slash() {
        assert_eq!(
            base_url("https://login.microsoftonline.com/").as_deref(),
            Ok("https://login.microsoftonline.com")
        );
        assert_eq!(
            base_url("http://127.0.0.1:8080").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert!(base_url("http://x/?a=b").is_err());
    }
}
