//! Certificate credentials (aad-pod-identity type 2): opening the PKCS#12
//! bundle and signing the client assertion JWT Entra ID expects.
//!
//! The assertion: header `{"alg":"RS256","typ":"JWT","x5t":…,"x5t#S256":…}`
//! (base64url SHA-1 and SHA-256 thumbprints of the DER certificate), claims
//! `aud` = the token endpoint, `iss` = `sub` = client id, a random `jti`,
//! `nbf`/`iat` = now and `exp` = now + 10 minutes.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
use rsa::{pkcs8::DecodePrivateKey as _, sha2::Sha256};
use serde_json::json;
use sha1::{Digest as _, Sha1};

/// Lifetime of a client assertion.
const ASSERTION_LIFETIME_SECS: u64 = 600;

/// An RSA key and the thumbprints of its certificate.
pub(crate) struct SigningCert {
    key: rsa::PrivateKey,
    x5t: String,
    x5t_s256: String,
}

impl std::fmt::Debug for SigningCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCert")
            .field("x5t", &self.x5t)
            .finish_non_exhaustive()
    }
}

impl SigningCert {
    /// Opens a PKCS#12 bundle: the first key with its certificate (the leaf
    /// comes first). Errors say what is wrong, never quote key material.
    pub(crate) fn from_pkcs12(bundle: &[u8], password: &str) -> Result<Self, String> {
        let open = |policy| KeyStore::from_pkcs12(bundle, password, policy);
        let store = open(Pkcs12ImportPolicy::Strict).map_err(|e| {
            format!("cannot open the PKCS#12 bundle (wrong password, or not PKCS#12): {e}")
        })?;
        // Strict import drops keys whose certificate it cannot link;
        // relaxed import keeps them, with certificates matched by key id.
        let relaxed;
        let store = if store.private_key_chain().is_some() {
            &store
        } else {
            relaxed = open(Pkcs12ImportPolicy::Relaxed)
                .map_err(|e| format!("cannot open the PKCS#12 bundle: {e}"))?;
            &relaxed
        };
        let (_, chain) = store
            .private_key_chain()
            .ok_or("the PKCS#12 bundle holds no private key")?;
        let cert = chain
            .certs()
            .first()
            .ok_or("the PKCS#12 bundle holds no certificate for its key")?;
        let key = rsa::PrivateKey::from_pkcs8_der(chain.key().as_der())
            .map_err(|_| "the PKCS#12 key is not an RSA key".to_owned())?;
        let der = cert.as_der();
        Ok(Self {
            key,
            x5t: URL_SAFE_NO_PAD.encode(Sha1::digest(der)),
            x5t_s256: URL_SAFE_NO_PAD.encode(<Sha256 as rsa::sha2::Digest>::digest(der)),
        })
    }

    /// A signed client assertion for `client_id` at `audience` (the token
    /// endpoint URL), valid from `now` (unix seconds).
    pub(crate) fn client_assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: u64,
    ) -> Result<String, String> {
        let header = json!({
            "alg": "RS256",
            "typ": "JWT",
            "x5t": self.x5t,
            "x5t#S256": self.x5t_s256,
        });
        let jti: [u8; 16] = rand::random();
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .pkcs1v15_sign::<Sha256>(signed.as_bytes())
            .map_err(|e| format!("signing the client assertion: {e}"))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podid_tests::emulator::TestCertificate;
    use serde_json::Value;

    fn decode(part: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
    }

    #[test]
    fn assertion_is_rs256_signed_by_the_bundle_key() {
        let cert = TestCertificate::shared().expect("certificate");
        let bundle = cert.pkcs12("pw").expect("pkcs12");
        let signing = SigningCert::from_pkcs12(&bundle, "pw").expect("opens");
        let jwt = signing
            .client_assertion("cid", "https://login.example/t/oauth2/token", 1_000)
            .expect("signs");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = decode(parts[0]);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["x5t"], cert.x5t().as_str());
        assert!(header["x5t#S256"].is_string());
        let claims = decode(parts[1]);
        assert_eq!(claims["aud"], "https://login.example/t/oauth2/token");
        assert_eq!(claims["iss"], "cid");
        assert_eq!(claims["sub"], "cid");
        assert_eq!(claims["nbf"], 1_000);
        assert_eq!(claims["exp"], 1_600);
        assert_eq!(claims["jti"].as_str().map(str::len), Some(32));
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).expect("signature");
        cert.public_key()
            .expect("public key")
            .pkcs1v15_verify::<Sha256>(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .expect("signature verifies with the certificate's key");
        let again = signing
            .client_assertion("cid", "https://login.example/t/oauth2/token", 1_000)
            .expect("signs");
        assert_ne!(
            decode(again.split('.').nth(1).expect("claims"))["jti"],
            claims["jti"]
        );
    }

    #[test]
    fn wrong_password_and_garbage_are_refused() {
        let cert = TestCertificate::shared().expect("certificate");
        let bundle = cert.pkcs12("right").expect("pkcs12");
        let err = SigningCert::from_pkcs12(&bundle, "wrong").expect_err("wrong password");
        assert!(err.contains("wrong password"), "{err}");
        assert!(SigningCert::from_pkcs12(b"not pkcs12", "").is_err());
    }
}
