//! Test certificates for service principals that sign in with a certificate
//! (aad-pod-identity type 2): an RSA key, a self-signed X.509 certificate and
//! the PKCS#12 bundle a Kubernetes Secret would hold.

use std::sync::OnceLock;

use p12_keystore::{KeyStore, KeyStoreEntry, PrivateKeyChain};
use rsa::pkcs8::{DecodePublicKey, EncodePrivateKey};
use sha1::{Digest as _, Sha1};

/// Errors while making or reading a test certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// RSA key generation or encoding failed.
    #[error("RSA key: {0}")]
    Key(String),
    /// Building or signing the X.509 certificate failed.
    #[error("building the certificate")]
    Certificate(#[source] rcgen::Error),
    /// Writing or reading the PKCS#12 bundle failed.
    #[error("PKCS#12 bundle: {0}")]
    Pkcs12(String),
    /// The certificate could not be parsed, or its key is not RSA.
    #[error("parsing the certificate: {0}")]
    Parse(String),
}

/// A self-signed RSA certificate with its private key.
#[derive(Clone)]
pub struct TestCertificate {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
}

impl std::fmt::Debug for TestCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCertificate")
            .field("x5t", &self.x5t())
            .finish_non_exhaustive()
    }
}

/// RSA key size of generated certificates (the minimum Entra ID accepts).
pub const KEY_BITS: usize = 2048;

impl TestCertificate {
    /// Generates a new RSA key and a self-signed certificate with subject
    /// `CN=<common_name>`. Key generation is slow in unoptimised builds
    /// (about a second); tests that need "a" certificate should use
    /// [`Self::shared`].
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, KEY_BITS)
            .map_err(|e| CertError::Key(e.to_string()))?;
        Self::from_rsa_key(common_name, &key)
    }

    /// A certificate generated once per process and shared (cloned), so a
    /// test suite pays for RSA key generation once.
    pub fn shared() -> Result<Self, CertError> {
        static SHARED: OnceLock<Result<TestCertificate, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Self::generate("podid-test-shared").map_err(|e| e.to_string()))
            .clone()
            .map_err(CertError::Key)
    }

    /// A new self-signed certificate for an existing RSA key.
    pub fn from_rsa_key(common_name: &str, key: &rsa::PrivateKey) -> Result<Self, CertError> {
        let key_pkcs8_der = key
            .to_pkcs8_der()
            .map_err(|e| CertError::Key(e.to_string()))?
            .as_bytes()
            .to_vec();
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &key_pkcs8_der.as_slice().into(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(CertError::Certificate)?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(CertError::Certificate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = params
            .self_signed(&key_pair)
            .map_err(CertError::Certificate)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pkcs8_der,
        })
    }

    /// The PKCS#12 bundle (key + certificate) protected by `password`, as the
    /// `certificate` key of an aad-pod-identity type-2 Secret holds it.
    pub fn pkcs12(&self, password: &str) -> Result<Vec<u8>, CertError> {
        let key = p12_keystore::PrivateKey::from_der(&self.key_pkcs8_der)
            .map_err(|e| CertError::Pkcs12(e.to_string()))?;
        let cert = p12_keystore::Certificate::from_der(&self.cert_der)
            .map_err(|e| CertError::Pkcs12(e.to_string()))?;
        let local_key_id = Sha1::digest(&self.cert_der).to_vec();
        let chain = PrivateKeyChain::new(local_key_id, key, vec![cert]);
        let mut store = KeyStore::new();
        store.add_entry("podid-test", KeyStoreEntry::PrivateKeyChain(chain));
        store
            .writer(password)
            .write()
            .map_err(|e| CertError::Pkcs12(e.to_string()))
    }

    /// The base64url SHA-1 thumbprint of the certificate (a JWT `x5t`).
    pub fn x5t(&self) -> String {
        thumbprint_sha1(&self.cert_der)
    }

    /// A JWT signed RS256 with this certificate's key, with header
    /// `{"alg":"RS256","typ":"JWT","x5t":<thumbprint>}` and the given claims.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<String, CertError> {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        use rsa::pkcs8::DecodePrivateKey;
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t()});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let key = rsa::PrivateKey::from_pkcs8_der(&self.key_pkcs8_der)
            .map_err(|e| CertError::Key(e.to_string()))?;
        let sig = key
            .pkcs1v15_sign::<rsa::sha2::Sha256>(signed.as_bytes())
            .map_err(|e| CertError::Key(e.to_string()))?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// The certificate's RSA public key.
    pub fn public_key(&self) -> Result<rsa::PublicKey, CertError> {
        public_key_of(&self.cert_der)
    }
}

/// The base64url (unpadded) SHA-1 thumbprint of a DER certificate.
pub fn thumbprint_sha1(cert_der: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha1::digest(cert_der))
}

/// The base64url (unpadded) SHA-256 thumbprint of a DER certificate (a JWT
/// `x5t#S256`).
pub fn thumbprint_sha256(cert_der: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(cert_der))
}

/// The RSA public key of a DER certificate.
pub fn public_key_of(cert_der: &[u8]) -> Result<rsa::PublicKey, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| CertError::Parse(e.to_string()))?;
    rsa::PublicKey::from_public_key_der(cert.public_key().raw)
        .map_err(|e| CertError::Parse(format!("not an RSA key: {e}")))
}

/// Reads a certificate given as PEM (`-----BEGIN CERTIFICATE-----`) or as
/// base64 of its DER, and returns the DER.
pub fn cert_der_from_text(text: &str) -> Result<Vec<u8>, CertError> {
    use base64::Engine as _;
    let body: String = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|e| CertError::Parse(format!("certificate is neither PEM nor base64 DER: {e}")))?;
    public_key_of(&der)?;
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::sha2::Sha256;

    #[test]
    fn pkcs12_round_trip_keeps_key_and_certificate() {
        let cert = TestCertificate::shared().expect("generate certificate");
        let p12 = cert.pkcs12("s3cret").expect("write PKCS#12");
        let store = KeyStore::from_pkcs12(&p12, "s3cret", p12_keystore::Pkcs12ImportPolicy::Strict)
            .expect("read PKCS#12 back");
        let (_, chain) = store.private_key_chain().expect("a key chain");
        assert_eq!(chain.key().as_der(), cert.key_pkcs8_der.as_slice());
        assert_eq!(chain.certs()[0].as_der(), cert.cert_der.as_slice());
        assert!(
            KeyStore::from_pkcs12(&p12, "wrong", p12_keystore::Pkcs12ImportPolicy::Strict).is_err(),
            "a wrong password must not open the bundle"
        );
    }

    #[test]
    fn certificate_public_key_verifies_key_signatures() {
        use rsa::pkcs8::DecodePrivateKey;
        let cert = TestCertificate::shared().expect("generate certificate");
        let key = rsa::PrivateKey::from_pkcs8_der(&cert.key_pkcs8_der).expect("key");
        let sig = key.pkcs1v15_sign::<Sha256>(b"hello").expect("sign");
        let public = cert.public_key().expect("public key");
        public
            .pkcs1v15_verify::<Sha256>(b"hello", &sig)
            .expect("signature verifies");
        assert!(public.pkcs1v15_verify::<Sha256>(b"hellO", &sig).is_err());
        let der = cert_der_from_text(&cert.cert_pem).expect("PEM parses");
        assert_eq!(der, cert.cert_der);
        assert_eq!(cert.x5t().len(), 27, "base64url of 20 bytes, unpadded");
    }
}
