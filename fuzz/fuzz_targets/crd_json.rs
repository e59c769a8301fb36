//! The custom resources as the agent's reflectors receive them: JSON from
//! the API server, deserialised into `AzureIdentity`, `AzureIdentityBinding`,
//! `AzureAssignedIdentity` and `AzurePodIdentityException`.
//!
//! Invariants: nothing panics (deserialising, or the accessors the agent
//! calls on each object); an accepted object survives a JSON round trip and
//! a YAML one; and the same text read as the workloads file (JSON is YAML)
//! yields the same object whenever both readers accept it.

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use podid_api::{
    AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException,
    Document, parse_documents,
};
use serde::{Serialize, de::DeserializeOwned};

fn read<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let object: T = serde_json::from_slice(data).ok()?;
    let json = serde_json::to_vec(&object).expect("serialises to JSON");
    let back: T = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "JSON of an accepted object does not parse ({e}): {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(back, object, "JSON round trip");
    let yaml = serde_yaml::to_string(&object).expect("serialises to YAML");
    let back: T = serde_yaml::from_str(&yaml)
        .unwrap_or_else(|e| panic!("YAML of an accepted object does not parse ({e}): {yaml}"));
    assert_eq!(back, object, "YAML round trip:\n{yaml}");
    Some(object)
}

fuzz_target!(|data: &[u8]| {
    let identity = read::<AzureIdentity>(data);
    if let Some(identity) = &identity {
        let _ = identity.spec.kind();
        let _ = identity.is_namespaced();
    }
    let binding = read::<AzureIdentityBinding>(data);
    let assigned = read::<AzureAssignedIdentity>(data);
    if let Some(assigned) = &assigned {
        let _ = assigned.state();
    }
    let exception = read::<AzurePodIdentityException>(data);
    if let Some(exception) = &exception {
        // Matching is by any one label, so a pod carrying all of them matches
        // unless there are none.
        let labels: BTreeMap<String, String> = exception.spec.pod_labels.clone();
        assert_eq!(exception.matches(&labels), !labels.is_empty());
    }

    // The same text as a workloads file document.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(documents) = parse_documents(text) else {
        return;
    };
    let [document] = documents.as_slice() else {
        return;
    };
    match (document, identity, binding, assigned, exception) {
        (Document::Identity(yaml), Some(json), ..) => assert_eq!(**yaml, json),
        (Document::Binding(yaml), _, Some(json), ..) => assert_eq!(**yaml, json),
        (Document::Assigned(yaml), _, _, Some(json), _) => assert_eq!(**yaml, json),
        (Document::Exception(yaml), .., Some(json)) => assert_eq!(**yaml, json),
        _ => {}
    }
});
