//! The `--workloads` file: multi-document YAML → typed, validated objects
//! (`podid_api::parse_documents`) → the standalone snapshot
//! (`WorkloadsSnapshot::parse`).
//!
//! Invariants: nothing panics; accepted documents survive a round trip
//! (serialised to YAML and to JSON, they parse back to the same objects, and
//! still pass validation); a refusal names its document (`document N`, N ≥ 1);
//! the snapshot refuses exactly what the parser refuses plus its own
//! file-level conflicts, names the file, and serves every object it accepted.

#![no_main]

use std::{collections::HashSet, path::Path};

use libfuzzer_sys::fuzz_target;
use podid_agent::{
    identity::{IdentityCatalog, object_key},
    workloads::standalone::{WorkloadsFileError, WorkloadsSnapshot},
};
use podid_api::{Document, DocumentError, parse_documents};
use serde::{Serialize, de::DeserializeOwned};

const FILE: &str = "/etc/podid/workloads.yaml";
const ROOT: &str = "podid.slice";

fn json_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(object: &T) {
    let json = serde_json::to_string(object).expect("serialises to JSON");
    let back: T = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("JSON of an accepted object does not parse ({e}): {json}"));
    assert_eq!(&back, object, "JSON round trip: {json}");
}

fn to_yaml(document: &Document) -> String {
    let yaml = match document {
        Document::Identity(o) => serde_yaml::to_string(o),
        Document::Binding(o) => serde_yaml::to_string(o),
        Document::Exception(o) => serde_yaml::to_string(o),
        Document::Assigned(o) => serde_yaml::to_string(o),
        Document::LocalWorkload(o) => serde_yaml::to_string(o),
    };
    yaml.expect("serialises to YAML")
}

fn json_round_trip_document(document: &Document) {
    match document {
        Document::Identity(o) => json_round_trip(o),
        Document::Binding(o) => json_round_trip(o),
        Document::Exception(o) => json_round_trip(o),
        Document::Assigned(o) => json_round_trip(o),
        Document::LocalWorkload(o) => json_round_trip(o),
    }
}

fn index_of(error: &DocumentError) -> usize {
    match error {
        DocumentError::Yaml { index, .. }
        | DocumentError::MissingType { index }
        | DocumentError::UnsupportedKind { index, .. }
        | DocumentError::Invalid { index, .. }
        | DocumentError::Rejected { index, .. } => *index,
    }
}

/// The file-level conflicts the snapshot refuses in documents that are
/// each fine: controller-owned objects, an identity twice, two workloads
/// on one cgroup.
fn has_conflict(documents: &[Document]) -> bool {
    let mut identities = HashSet::new();
    let mut cgroups = HashSet::new();
    documents.iter().any(|document| match document {
        Document::Assigned(_) => true,
        Document::Identity(identity) => !identities.insert(object_key(
            identity.metadata.namespace.as_deref(),
            identity.metadata.name.as_deref(),
        )),
        Document::LocalWorkload(local) => {
            !cgroups.insert(Path::new(ROOT).join(local.spec.cgroup.trim_matches('/')))
        }
        Document::Binding(_) | Document::Exception(_) => false,
    })
}

fn check_snapshot(documents: &[Document], snapshot: &WorkloadsSnapshot) {
    let locals = documents
        .iter()
        .filter(|d| matches!(d, Document::LocalWorkload(_)))
        .count();
    assert_eq!(snapshot.workload_count(), locals);
    for document in documents {
        match document {
            Document::Identity(identity) => {
                let namespace = identity.metadata.namespace.as_deref();
                let namespace = namespace.filter(|n| !n.is_empty()).unwrap_or("default");
                let name = identity.metadata.name.as_deref().unwrap_or("");
                let found = snapshot
                    .identity(namespace, name)
                    .unwrap_or_else(|| panic!("identity {namespace}/{name} not served"));
                assert_eq!(*found, **identity);
            }
            Document::Binding(binding) => {
                let served = snapshot.bindings_with_selector(&binding.spec.selector);
                assert!(served.iter().any(|b| **b == **binding), "{binding:?}");
                assert!(
                    served
                        .iter()
                        .all(|b| b.spec.selector == binding.spec.selector)
                );
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The agent reads the file as UTF-8; other bytes fail before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_documents(text);
    match &parsed {
        Ok(documents) => {
            let yaml: Vec<String> = documents.iter().map(to_yaml).collect();
            let again = parse_documents(&yaml.join("---\n")).unwrap_or_else(|e| {
                panic!(
                    "accepted documents do not parse back ({e}):\n{}",
                    yaml.join("---\n")
                )
            });
            assert_eq!(
                &again,
                documents,
                "YAML round trip:\n{}",
                yaml.join("---\n")
            );
            documents.iter().for_each(json_round_trip_document);
        }
        Err(error) => {
            let index = index_of(error);
            assert!(index >= 1, "{error}");
            assert!(
                error.to_string().starts_with(&format!("document {index}")),
                "{error}"
            );
        }
    }

    let snapshot = WorkloadsSnapshot::parse(text, Path::new(ROOT), Path::new(FILE));
    if let Err(error) = &snapshot {
        assert!(error.to_string().starts_with(FILE), "{error}");
    }
    match (&parsed, &snapshot) {
        (Err(expected), Err(WorkloadsFileError::Parse { source, .. })) => {
            assert_eq!(source.to_string(), expected.to_string());
        }
        (Ok(documents), Ok(snapshot)) => {
            assert!(!has_conflict(documents), "conflicting file accepted");
            check_snapshot(documents, snapshot);
        }
        (Ok(documents), Err(WorkloadsFileError::Invalid { .. })) => {
            assert!(
                has_conflict(documents),
                "refused a consistent file: {snapshot:?}"
            );
        }
        (parsed, snapshot) => panic!("parser said {parsed:?}, snapshot said {snapshot:?}"),
    }
});
