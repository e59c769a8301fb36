//! Parsing a multi-document YAML of podid/aad-pod-identity objects, as the
//! agent's `--workloads` file and the docs' examples are written.

use serde::Deserialize;

use crate::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    LocalWorkload, local::LOCAL_WORKLOAD_API_VERSION,
};

/// One object from a YAML stream. (Boxed: the objects differ a lot in size.)
#[derive(Debug, Clone, PartialEq)]
pub enum Document {
    /// `aadpodidentity.k8s.io/v1` `AzureIdentity`.
    Identity(Box<AzureIdentity>),
    /// `aadpodidentity.k8s.io/v1` `AzureIdentityBinding`.
    Binding(Box<AzureIdentityBinding>),
    /// `aadpodidentity.k8s.io/v1` `AzurePodIdentityException`.
    Exception(Box<AzurePodIdentityException>),
    /// `aadpodidentity.k8s.io/v1` `AzureAssignedIdentity`.
    Assigned(Box<AzureAssignedIdentity>),
    /// `podid.dev/v1alpha1` `LocalWorkload`.
    LocalWorkload(Box<LocalWorkload>),
}

/// Why a document could not be used. `index` counts documents from 1.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("document {index}: not valid YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {index}: missing apiVersion or kind")]
    MissingType { index: usize },
    #[error(
        "document {index}: unsupported {api_version} {kind} (expected AzureIdentity, AzureIdentityBinding, AzurePodIdentityException or AzureAssignedIdentity in aadpodidentity.k8s.io/v1, or LocalWorkload in podid.dev/v1alpha1)"
    )]
    UnsupportedKind {
        index: usize,
        api_version: String,
        kind: String,
    },
    #[error("document {index} ({kind}): {source}")]
    Invalid {
        index: usize,
        kind: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("document {index} ({kind} {name:?}): {message}")]
    Rejected {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Parses every non-empty document of a YAML stream. The first bad document
/// fails the whole stream, so a caller never applies half a file.
pub fn parse_documents(text: &str) -> Result<Vec<Document>, DocumentError> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|source| DocumentError::Yaml { index, source })?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta = serde_yaml::from_value(value.clone())
            .map_err(|source| DocumentError::Yaml { index, source })?;
        if meta.api_version.is_empty() || meta.kind.is_empty() {
            return Err(DocumentError::MissingType { index });
        }
        let kind = meta.kind.clone();
        let invalid = |source| DocumentError::Invalid {
            index,
            kind: kind.clone(),
            source,
        };
        let doc = match (meta.api_version.as_str(), meta.kind.as_str()) {
            ("aadpodidentity.k8s.io/v1", "AzureIdentity") => {
                Document::Identity(serde_yaml::from_value(value).map_err(invalid)?)
            }
            ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding") => {
                Document::Binding(serde_yaml::from_value(value).map_err(invalid)?)
            }
            ("aadpodidentity.k8s.io/v1", "AzurePodIdentityException") => {
                Document::Exception(serde_yaml::from_value(value).map_err(invalid)?)
            }
            ("aadpodidentity.k8s.io/v1", "AzureAssignedIdentity") => {
                Document::Assigned(serde_yaml::from_value(value).map_err(invalid)?)
            }
            (LOCAL_WORKLOAD_API_VERSION, "LocalWorkload") => {
                Document::LocalWorkload(serde_yaml::from_value(value).map_err(invalid)?)
            }
            _ => {
                return Err(DocumentError::UnsupportedKind {
                    index,
                    api_version: meta.api_version,
                    kind: meta.kind,
                });
            }
        };
        validate(index, &doc)?;
        out.push(doc);
    }
    Ok(out)
}

fn validate(index: usize, doc: &Document) -> Result<(), DocumentError> {
    let reject = |kind: &str, name: &str, message: String| DocumentError::Rejected {
        index,
        kind: kind.to_string(),
        name: name.to_string(),
        message,
    };
    match doc {
        Document::Identity(identity) => {
            let name = identity.metadata.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(reject(
                    "AzureIdentity",
                    &name,
                    "metadata.name is required".into(),
                ));
            }
            if let Err(refusal) = crate::validation::check_shape(identity) {
                return Err(reject("AzureIdentity", &name, refusal.to_string()));
            }
        }
        Document::Binding(binding) => {
            let name = binding.metadata.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err(reject(
                    "AzureIdentityBinding",
                    &name,
                    "metadata.name is required".into(),
                ));
            }
            if binding.spec.azure_identity.is_empty() {
                return Err(reject(
                    "AzureIdentityBinding",
                    &name,
                    "spec.azureIdentity is required".into(),
                ));
            }
            if binding.spec.selector.is_empty() {
                return Err(reject(
                    "AzureIdentityBinding",
                    &name,
                    "spec.selector is required".into(),
                ));
            }
        }
        Document::LocalWorkload(workload) => {
            let name = &workload.metadata.name;
            if name.is_empty() {
                return Err(reject(
                    "LocalWorkload",
                    name,
                    "metadata.name is required".into(),
                ));
            }
            let cgroup = workload.spec.cgroup.trim_matches('/');
            if cgroup.is_empty() || cgroup.split('/').any(|part| part == ".." || part == ".") {
                return Err(reject(
                    "LocalWorkload",
                    name,
                    format!(
                        "spec.cgroup {:?} must be a non-empty path below the cgroup root, without . or ..",
                        workload.spec.cgroup
                    ),
                ));
            }
        }
        Document::Exception(_) | Document::Assigned(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdentityType;

    /// aad-pod-identity's documented example objects, exactly as users write them.
    const SEED: &str = r#"
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata:
  name: sqlpodidentity
spec:
  type: 0
  resourceID: /subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/myrg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/sqlpodidentity
  clientID: 11111111-1111-1111-1111-111111111111
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata:
  name: sqlpodidentity-binding
spec:
  azureIdentity: sqlpodidentity
  selector: sqlpodid
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata:
  name: reporting
  namespace: default
  labels:
    aadpodidbinding: sqlpodid
spec:
  cgroup: system.slice/reporting.service
"#;

    #[test]
    fn parses_the_aad_pod_identity_examples_unchanged() {
        let docs = parse_documents(SEED).unwrap();
        assert_eq!(docs.len(), 3);
        let Document::Identity(identity) = &docs[0] else {
            panic!("{docs:?}")
        };
        assert_eq!(identity.spec.kind(), Ok(IdentityType::UserAssignedMsi));
        assert_eq!(
            identity.spec.client_id,
            "11111111-1111-1111-1111-111111111111"
        );
        let Document::Binding(binding) = &docs[1] else {
            panic!()
        };
        assert_eq!(binding.spec.selector, "sqlpodid");
        let Document::LocalWorkload(workload) = &docs[2] else {
            panic!()
        };
        assert_eq!(workload.metadata.labels["aadpodidbinding"], "sqlpodid");
    }

    #[test]
    fn bad_documents_are_rejected_with_their_position() {
        let cases = [
            ("kind: AzureIdentity\n", "missing apiVersion"),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
                "unsupported v1 Pod",
            ),
            (
                "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: x}\nspec: {type: 7, clientID: a}\n",
                "unknown AzureIdentity type 7",
            ),
            (
                "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {name: x}\nspec: {type: 0}\n",
                "must name itself by clientID or resourceID",
            ),
            (
                "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata: {name: b}\nspec: {azureIdentity: x}\n",
                "spec.selector is required",
            ),
            (
                "apiVersion: podid.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {name: w}\nspec: {cgroup: ../escape}\n",
                "without . or ..",
            ),
            (
                "apiVersion: podid.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {name: w}\nspec: {cgroup: a, extra: 1}\n",
                "unknown field",
            ),
            ("a: [unclosed\n", "not valid YAML"),
        ];
        for (text, expected) in cases {
            let error = parse_documents(&format!("---\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.starts_with("document 1"), "{error}");
        }
    }

    #[test]
    fn empty_documents_are_skipped() {
        assert!(parse_documents("---\n---\n").unwrap().is_empty());
    }
}
