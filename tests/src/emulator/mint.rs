//! Minting emulated access tokens.
//!
//! A token is JWT-shaped, `header.payload.signature` in base64url, but not
//! signed: the payload names the identity (`appid`, `oid`, `tid`,
//! `xms_mirid`) and the audience (`aud`) so tests can tell whose token a pod
//! got, and the "signature" is 32 random bytes, so every issuance differs.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// Whose token to mint.
pub(crate) struct Subject<'a> {
    pub(crate) tenant_id: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) object_id: &'a str,
    pub(crate) resource_id: Option<&'a str>,
    pub(crate) audience: &'a str,
}

/// A minted token and its times (unix seconds).
pub(crate) struct Minted {
    pub(crate) access_token: String,
    pub(crate) not_before: u64,
    pub(crate) expires_on: u64,
    pub(crate) expires_in: u64,
}

/// Current unix time in seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn mint(subject: &Subject<'_>, lifetime_secs: u64) -> Minted {
    let now = now_unix();
    let expires_on = now + lifetime_secs;
    let jti = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
    let mut claims = json!({
        "aud": subject.audience,
        "iss": format!("https://sts.windows.net/{}/", subject.tenant_id),
        "iat": now,
        "nbf": now,
        "exp": expires_on,
        "appid": subject.client_id,
        "oid": subject.object_id,
        "sub": subject.object_id,
        "tid": subject.tenant_id,
        "idtyp": "app",
        "uti": jti,
        "ver": "1.0",
        "podid_emulator": true,
    });
    if let (Some(rid), Some(map)) = (subject.resource_id, claims.as_object_mut()) {
        map.insert("xms_mirid".to_owned(), Value::from(rid));
    }
    let header = json!({"typ": "JWT", "alg": "none", "kid": "podid-emulator"});
    let access_token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()),
    );
    Minted {
        access_token,
        not_before: now,
        expires_on,
        expires_in: lifetime_secs,
    }
}

/// The claims of a token this emulator minted (or any JWT), without any
/// signature check; `None` when it is not JWT-shaped.
pub fn token_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a token this emulator minted is for a VM's own (system-assigned)
/// identity: its `xms_mirid` names a `Microsoft.Compute/virtualMachines`
/// resource rather than a user-assigned identity.
pub fn is_node_token(token: &str) -> bool {
    token_claims(token)
        .and_then(|c| c["xms_mirid"].as_str().map(str::to_ascii_lowercase))
        .is_some_and(|rid| rid.contains("/providers/microsoft.compute/virtualmachines/"))
}

/// `YYYY-MM-DD HH:MM:SSZ` for unix seconds, as Entra ID writes `timestamp`.
pub(crate) fn format_timestamp(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_timestamp(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(format_timestamp(1_700_000_000), "2023-11-14 22:13:20Z");
    }

    #[test]
    fn minted_tokens_differ_and_name_their_subject() {
        let subject = Subject {
            tenant_id: "t",
            client_id: "c",
            object_id: "o",
            resource_id: Some("/r"),
            audience: "https://vault.azure.net",
        };
        let a = mint(&subject, 60);
        let b = mint(&subject, 60);
        assert_ne!(a.access_token, b.access_token);
        let claims = token_claims(&a.access_token).expect("claims");
        assert_eq!(claims["appid"], "c");
        assert_eq!(claims["oid"], "o");
        assert_eq!(claims["aud"], "https://vault.azure.net");
        assert_eq!(claims["xms_mirid"], "/r");
        assert_eq!(claims["exp"], a.expires_on);
        assert_eq!(a.expires_on - a.not_before, 60);
    }
}
