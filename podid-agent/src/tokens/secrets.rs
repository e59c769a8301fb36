//! Where service principal credentials come from: Kubernetes Secrets, or in
//! standalone mode files laid out like mounted Secret volumes.

use std::path::{Path, PathBuf};

use super::credential::SecretRef;

/// Largest client secret or password file read.
const MAX_TEXT_BYTES: u64 = 64 * 1024;
/// Largest PKCS#12 file read.
const MAX_CERT_BYTES: u64 = 1024 * 1024;

/// Why a secret could not be read. Messages name the secret, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret does not exist.
    #[error("secret {secret} not found ({location})")]
    NotFound {
        /// The secret.
        secret: SecretRef,
        /// Where it was looked for.
        location: String,
    },
    /// The secret exists but lacks a key.
    #[error("secret {secret} has no key {key:?}")]
    MissingKey {
        /// The secret.
        secret: SecretRef,
        /// The key.
        key: String,
    },
    /// The secret's name cannot be a Kubernetes name (for example `..`).
    #[error("secret reference {secret} is not a valid Kubernetes namespace/name")]
    InvalidName {
        /// The reference.
        secret: SecretRef,
    },
    /// The secret's content is unusable (empty, too large, ambiguous).
    #[error("secret {secret}: {reason}")]
    Invalid {
        /// The secret.
        secret: SecretRef,
        /// What is wrong.
        reason: String,
    },
    /// Reading failed.
    #[error("reading secret {secret} at {path}")]
    Io {
        /// The secret.
        secret: SecretRef,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The source could not be asked (for example the API server failed).
    #[error("secret {secret} unavailable: {reason}")]
    Unavailable {
        /// The secret.
        secret: SecretRef,
        /// What failed.
        reason: String,
    },
    /// No secret source is configured.
    #[error("secret {secret} cannot be read: {hint}")]
    Unconfigured {
        /// The secret.
        secret: SecretRef,
        /// What to configure.
        hint: &'static str,
    },
}

/// Reads service principal credentials.
#[async_trait::async_trait]
pub trait SecretSource: Send + Sync {
    /// The client secret of a type-1 identity: aad-pod-identity uses the
    /// first value of the Secret named by `clientPassword`.
    async fn client_secret(&self, secret: &SecretRef) -> Result<String, SecretError>;

    /// The PKCS#12 bundle and its password of a type-2 identity: Secret keys
    /// `certificate` and `password`.
    async fn certificate(&self, secret: &SecretRef) -> Result<(Vec<u8>, String), SecretError>;
}

/// Secrets from files, for standalone mode. The layout mirrors a mounted
/// Kubernetes Secret volume, one directory per Secret and one file per key:
///
/// ```text
/// <dir>/<namespace>/<name>/clientSecret   type 1: the client secret (if there is no
///                                         `clientSecret` file, the directory's only key)
/// <dir>/<namespace>/<name>/certificate    type 2: PKCS#12 bytes
/// <dir>/<namespace>/<name>/password       type 2: its password (absent = empty)
/// <dir>/<namespace>/<name>                type 1 alternative: a regular file holding
///                                         just the client secret
/// ```
///
/// One trailing newline is removed from secrets and passwords. Entries
/// starting with `.` (a volume's `..data` links) are not keys. `namespace`
/// and `name` must be Kubernetes names (lower-case alphanumerics, `-`, `.`),
/// so a reference can never leave `<dir>`.
#[derive(Debug, Clone)]
pub struct FileSecretSource {
    dir: Option<PathBuf>,
}

impl FileSecretSource {
    /// Secrets under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
        }
    }

    /// No directory: every lookup fails, saying to configure one.
    pub fn unconfigured() -> Self {
        Self { dir: None }
    }

    fn secret_path(&self, secret: &SecretRef) -> Result<PathBuf, SecretError> {
        let Some(dir) = &self.dir else {
            return Err(SecretError::Unconfigured {
                secret: secret.clone(),
                hint: "service principal identities need --secrets-dir in standalone mode",
            });
        };
        if !is_k8s_name(&secret.namespace) || !is_k8s_name(&secret.name) {
            return Err(SecretError::InvalidName {
                secret: secret.clone(),
            });
        }
        Ok(dir.join(&secret.namespace).join(&secret.name))
    }
}

/// A DNS-1123 subdomain: what Kubernetes allows for namespaces and Secret
/// names. Excludes `.`, `..`, `/` and empty names.
fn is_k8s_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

fn trim_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

async fn read_limited(
    secret: &SecretRef,
    path: &Path,
    limit: u64,
) -> Result<Option<Vec<u8>>, SecretError> {
    let io = |source| SecretError::Io {
        secret: secret.clone(),
        path: path.to_owned(),
        source,
    };
    let meta = match tokio::fs::metadata(path).await {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_file() {
        return Err(SecretError::Invalid {
            secret: secret.clone(),
            reason: format!("{} is not a regular file", path.display()),
        });
    }
    if meta.len() > limit {
        return Err(SecretError::Invalid {
            secret: secret.clone(),
            reason: format!("{} is larger than {limit} bytes", path.display()),
        });
    }
    tokio::fs::read(path).await.map(Some).map_err(io)
}

async fn read_text(secret: &SecretRef, path: &Path) -> Result<Option<String>, SecretError> {
    match read_limited(secret, path, MAX_TEXT_BYTES).await? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(|s| Some(trim_newline(s)))
            .map_err(|_| SecretError::Invalid {
                secret: secret.clone(),
                reason: format!("{} is not UTF-8 text", path.display()),
            }),
    }
}

/// The key files of a Secret directory (names not starting with `.`).
async fn keys(secret: &SecretRef, dir: &Path) -> Result<Vec<String>, SecretError> {
    let io = |source| SecretError::Io {
        secret: secret.clone(),
        path: dir.to_owned(),
        source,
    };
    let mut entries = tokio::fs::read_dir(dir).await.map_err(io)?;
    let mut names = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(io)? {
        if let Some(name) = entry.file_name().to_str()
            && !name.starts_with('.')
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[async_trait::async_trait]
impl SecretSource for FileSecretSource {
    async fn client_secret(&self, secret: &SecretRef) -> Result<String, SecretError> {
        let path = self.secret_path(secret)?;
        let value = match tokio::fs::metadata(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretError::NotFound {
                    secret: secret.clone(),
                    location: path.display().to_string(),
                });
            }
            Err(source) => {
                return Err(SecretError::Io {
                    secret: secret.clone(),
                    path,
                    source,
                });
            }
            Ok(meta) if meta.is_dir() => {
                let names = keys(secret, &path).await?;
                let only = match names.as_slice() {
                    [only] => Some(only),
                    _ => None,
                };
                let key = names
                    .iter()
                    .find(|n| n.eq_ignore_ascii_case("clientSecret"))
                    .or(only)
                    .ok_or_else(|| SecretError::MissingKey {
                        secret: secret.clone(),
                        key: "clientSecret".into(),
                    })?;
                read_text(secret, &path.join(key)).await?
            }
            Ok(_) => read_text(secret, &path).await?,
        };
        match value {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(SecretError::Invalid {
                secret: secret.clone(),
                reason: "the client secret is empty".into(),
            }),
            None => Err(SecretError::NotFound {
                secret: secret.clone(),
                location: path.display().to_string(),
            }),
        }
    }

    async fn certificate(&self, secret: &SecretRef) -> Result<(Vec<u8>, String), SecretError> {
        let dir = self.secret_path(secret)?;
        if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            return Err(SecretError::NotFound {
                secret: secret.clone(),
                location: dir.display().to_string(),
            });
        }
        let bundle = read_limited(secret, &dir.join("certificate"), MAX_CERT_BYTES)
            .await?
            .filter(|b| !b.is_empty())
            .ok_or_else(|| SecretError::MissingKey {
                secret: secret.clone(),
                key: "certificate".into(),
            })?;
        let password = read_text(secret, &dir.join("password"))
            .await?
            .unwrap_or_default();
        Ok((bundle, password))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::test_support::TempDir;

    fn sref(namespace: &str, name: &str) -> SecretRef {
        SecretRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[tokio::test]
    async fn reads_each_documented_layout() {
        let tmp = TempDir::new("secrets-layouts");
        tmp.write("ns/dir-secret/clientSecret", b"s3cret\n");
        tmp.write("ns/only-key/anything", b"other\r\n");
        tmp.write("ns/plain-file", b"plain");
        // A mounted Secret volume: hidden `..data` entries are not keys.
        tmp.write("ns/mounted/..data/ignored", b"x");
        tmp.write("ns/mounted/clientsecret", b"mounted");
        tmp.write("ns/cert/certificate", b"\x30\x82pkcs12");
        tmp.write("ns/cert/password", b"pw\n");
        tmp.write("ns/cert-nopw/certificate", b"\x30\x82");
        let source = FileSecretSource::new(tmp.path());

        assert_eq!(
            source
                .client_secret(&sref("ns", "dir-secret"))
                .await
                .expect("dir"),
            "s3cret"
        );
        assert_eq!(
            source
                .client_secret(&sref("ns", "only-key"))
                .await
                .expect("only key"),
            "other"
        );
        assert_eq!(
            source
                .client_secret(&sref("ns", "plain-file"))
                .await
                .expect("file"),
            "plain"
        );
        assert_eq!(
            source
                .client_secret(&sref("ns", "mounted"))
                .await
                .expect("mounted"),
            "mounted"
        );
        let (bundle, password) = source.certificate(&sref("ns", "cert")).await.expect("cert");
        assert_eq!(bundle, b"\x30\x82pkcs12");
        assert_eq!(password, "pw");
        let (_, password) = source
            .certificate(&sref("ns", "cert-nopw"))
            .await
            .expect("cert");
        assert_eq!(password, "");
    }

    #[tokio::test]
    async fn errors_name_the_secret_not_its_value() {
        let tmp = TempDir::new("secrets-errors");
        tmp.write("ns/two-keys/a", b"value-a");
        tmp.write("ns/two-keys/b", b"value-b");
        tmp.write("ns/empty/clientSecret", b"\n");
        let source = FileSecretSource::new(tmp.path());

        let missing = source
            .client_secret(&sref("ns", "absent"))
            .await
            .expect_err("missing");
        assert!(matches!(missing, SecretError::NotFound { .. }), "{missing}");
        assert!(missing.to_string().contains("ns/absent"), "{missing}");
        let ambiguous = source
            .client_secret(&sref("ns", "two-keys"))
            .await
            .expect_err("ambiguous");
        assert!(
            matches!(ambiguous, SecretError::MissingKey { .. }),
            "{ambiguous}"
        );
        assert!(!ambiguous.to_string().contains("value-"), "{ambiguous}");
        let empty = source
            .client_secret(&sref("ns", "empty"))
            .await
            .expect_err("empty");
        assert!(matches!(empty, SecretError::Invalid { .. }), "{empty}");
        let no_cert = source
            .certificate(&sref("ns", "two-keys"))
            .await
            .expect_err("no cert");
        assert!(
            matches!(no_cert, SecretError::MissingKey { .. }),
            "{no_cert}"
        );

        let unconfigured = FileSecretSource::unconfigured()
            .client_secret(&sref("ns", "x"))
            .await
            .expect_err("unconfigured");
        assert!(
            unconfigured.to_string().contains("--secrets-dir"),
            "{unconfigured}"
        );
    }

    #[tokio::test]
    async fn references_cannot_leave_the_directory() {
        let tmp = TempDir::new("secrets-traversal");
        tmp.write("outside", b"do-not-read");
        tmp.write("base/ns/ok", b"fine");
        let source = FileSecretSource::new(tmp.path().join("base"));
        for (namespace, name) in [
            ("..", "outside"),
            ("ns", "../../outside"),
            ("ns/..", "x"),
            (".", "ok"),
            ("ns", ""),
            ("NS", "ok"),
            ("ns", "a/b"),
        ] {
            let err = source
                .client_secret(&sref(namespace, name))
                .await
                .expect_err("traversal rejected");
            assert!(
                matches!(err, SecretError::InvalidName { .. }),
                "{namespace}/{name}: {err}"
            );
        }
        assert_eq!(
            source.client_secret(&sref("ns", "ok")).await.expect("ok"),
            "fine"
        );
    }
}
