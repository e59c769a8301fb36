//! The `identity` block of a VM or scale set, parsed and built as raw JSON
//! (the generated model would lose `userAssignedIdentities`).

use std::collections::BTreeMap;

use azure_mgmt_compute::package_2024_07_01::models::virtual_machine_identity::Type as IdentityType;
use serde_json::{Map, Value, json};

/// The identities on a VM or scale set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityState {
    /// Whether the system-assigned identity is on.
    pub system_assigned: bool,
    /// Lower-cased user-assigned identity ID → the ID as ARM spelled it.
    pub user_assigned: BTreeMap<String, String>,
}

impl IdentityState {
    /// Whether a user-assigned identity (any case) is present.
    pub fn contains(&self, id: &str) -> bool {
        self.user_assigned.contains_key(&id.to_ascii_lowercase())
    }

    /// The state after a successful PATCH adding and removing these IDs.
    pub fn apply(&mut self, add: &[String], remove: &[String]) {
        for id in add {
            self.user_assigned
                .insert(id.to_ascii_lowercase(), id.clone());
        }
        for id in remove {
            self.user_assigned.remove(&id.to_ascii_lowercase());
        }
    }
}

/// Parses the `identity` of a VM or scale set resource body.
pub fn parse_resource(body: &[u8]) -> Result<IdentityState, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(identity) = value.get("identity").filter(|v| !v.is_null()) else {
        return Ok(IdentityState::default());
    };
    let kind = identity
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("None");
    let system_assigned = kind
        .split(',')
        .any(|part| part.trim().eq_ignore_ascii_case("SystemAssigned"));
    let mut user_assigned = BTreeMap::new();
    match identity.get("userAssignedIdentities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for id in map.keys() {
                user_assigned.insert(id.to_ascii_lowercase(), id.clone());
            }
        }
        Some(other) => {
            return Err(format!(
                "identity.userAssignedIdentities is not an object: {other}"
            ));
        }
    }
    Ok(IdentityState {
        system_assigned,
        user_assigned,
    })
}

/// The identity type that describes `state` (the generated enum carries
/// ARM's exact spellings, e.g. `SystemAssigned, UserAssigned`).
pub fn identity_type(system_assigned: bool, any_user_assigned: bool) -> IdentityType {
    match (system_assigned, any_user_assigned) {
        (true, true) => IdentityType::SystemAssignedUserAssigned,
        (false, true) => IdentityType::UserAssigned,
        (true, false) => IdentityType::SystemAssigned,
        (false, false) => IdentityType::None,
    }
}

/// The PATCH body adding `add` and removing `remove` from `before`: only the
/// delta, removals as `null`. The type keeps the system-assigned identity as
/// it is. When no user-assigned identity would remain, the map is left out
/// and the type alone (`SystemAssigned` or `None`) clears it, as ARM expects.
pub fn patch_body(before: &IdentityState, add: &[String], remove: &[String]) -> Value {
    let mut after = before.clone();
    after.apply(add, remove);
    let kind = identity_type(before.system_assigned, !after.user_assigned.is_empty());
    let kind = serde_json::to_value(kind).unwrap_or(Value::Null);
    if after.user_assigned.is_empty() {
        return json!({ "identity": { "type": kind } });
    }
    let mut map = Map::new();
    for id in add {
        map.insert(id.clone(), json!({}));
    }
    for id in remove {
        // Remove under ARM's own spelling of the key, when known.
        let key = before
            .user_assigned
            .get(&id.to_ascii_lowercase())
            .cloned()
            .unwrap_or_else(|| id.clone());
        map.insert(key, Value::Null);
    }
    json!({ "identity": { "type": kind, "userAssignedIdentities": map } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a";
    const B: &str = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b";

    #[test]
    fn parses_arm_identity_blocks() {
        let body = format!(
            r#"{{"name":"vm","identity":{{"type":"SystemAssigned, UserAssigned","principalId":"p","userAssignedIdentities":{{"{A}":{{"principalId":"x","clientId":"y"}}}}}}}}"#
        );
        let state = parse_resource(body.as_bytes()).unwrap();
        assert!(state.system_assigned);
        assert!(state.contains(&A.to_uppercase()));
        assert_eq!(state.user_assigned.len(), 1);
        assert_eq!(
            parse_resource(b"{\"name\":\"vm\"}").unwrap(),
            IdentityState::default()
        );
        assert!(parse_resource(b"not json").is_err());
        assert!(
            parse_resource(br#"{"identity":{"type":"UserAssigned","userAssignedIdentities":[]}}"#)
                .is_err()
        );
    }

    #[test]
    fn patch_carries_only_the_delta_with_null_removals() {
        let mut before = IdentityState {
            system_assigned: true,
            ..Default::default()
        };
        before.apply(&[A.to_string()], &[]);
        let body = patch_body(&before, &[B.to_string()], &[A.to_lowercase()]);
        assert_eq!(
            body,
            json!({"identity": {"type": "SystemAssigned, UserAssigned", "userAssignedIdentities": {B: {}, A: null}}})
        );
    }

    #[test]
    fn the_last_removal_switches_the_type_and_keeps_the_system_identity() {
        let mut before = IdentityState::default();
        before.apply(&[A.to_string()], &[]);
        assert_eq!(
            patch_body(&before, &[], &[A.to_string()]),
            json!({"identity": {"type": "None"}})
        );
        before.system_assigned = true;
        assert_eq!(
            patch_body(&before, &[], &[A.to_string()]),
            json!({"identity": {"type": "SystemAssigned"}})
        );
        let fresh = IdentityState::default();
        assert_eq!(
            patch_body(&fresh, &[A.to_string()], &[]),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {A: {}}}})
        );
    }
}
