//! Validation of an object against a CRD's structural schema
//! (`openAPIV3Schema`), as the API server applies it: types (with integer
//! formats), `nullable`, `required`, `enum`, arrays' `items`, maps'
//! `additionalProperties`, and fields the schema does not know, which the
//! API server would silently prune (reported here, since an object that
//! loses fields does not "work as it is"). `metadata`, `apiVersion` and
//! `kind` at the root are the API server's business and are only checked
//! for their type.

use serde_json::Value;

/// Every problem found in `object` against `schema`, as `path: problem`.
/// Empty means valid.
pub fn validate(schema: &Value, object: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    if let (Some(properties), Some(fields)) = (
        schema.get("properties").and_then(Value::as_object),
        object.as_object(),
    ) {
        for (key, value) in fields {
            match key.as_str() {
                "apiVersion" | "kind" if !value.is_string() => {
                    errors.push(format!("{key}: must be a string"));
                }
                "metadata" if !value.is_object() => {
                    errors.push("metadata: must be an object".into())
                }
                "apiVersion" | "kind" | "metadata" => {}
                _ => match properties.get(key) {
                    Some(property) => check(property, value, key, &mut errors),
                    None => errors.push(format!("{key}: unknown field (would be pruned)")),
                },
            }
        }
        required(schema, fields, "", &mut errors);
    } else {
        check(schema, object, "", &mut errors);
    }
    errors
}

fn required(
    schema: &Value,
    fields: &serde_json::Map<String, Value>,
    path: &str,
    errors: &mut Vec<String>,
) {
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !fields.contains_key(name) {
            errors.push(format!("{}: required field missing", join(path, name)));
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            errors.push(format!("{path}: null is not allowed"));
        }
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match schema.get("type").and_then(Value::as_str) {
        Some("string") if !value.is_string() => errors.push(format!("{path}: must be a string")),
        Some("boolean") if !value.is_boolean() => errors.push(format!("{path}: must be a boolean")),
        Some("number") if !value.is_number() => errors.push(format!("{path}: must be a number")),
        Some("integer") => match value.as_i64() {
            None => errors.push(format!("{path}: must be an integer")),
            Some(n) => {
                if schema.get("format").and_then(Value::as_str) == Some("int32")
                    && i32::try_from(n).is_err()
                {
                    errors.push(format!("{path}: {n} does not fit int32"));
                }
            }
        },
        Some("array") => match value.as_array() {
            None => errors.push(format!("{path}: must be an array")),
            Some(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        check(item_schema, item, &format!("{path}[{i}]"), errors);
                    }
                }
            }
        },
        Some("object") => match value.as_object() {
            None => errors.push(format!("{path}: must be an object")),
            Some(fields) => {
                let properties = schema.get("properties").and_then(Value::as_object);
                let additional = schema.get("additionalProperties");
                for (key, field) in fields {
                    let field_path = join(path, key);
                    match (properties.and_then(|p| p.get(key)), additional) {
                        (Some(property), _) => check(property, field, &field_path, errors),
                        (None, Some(additional)) if additional.is_object() => {
                            check(additional, field, &field_path, errors);
                        }
                        (None, _) if preserve => {}
                        (None, _) => {
                            errors.push(format!("{field_path}: unknown field (would be pruned)"));
                        }
                    }
                }
                required(schema, fields, path, errors);
            }
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn types_unknown_fields_and_required_are_checked() {
        let schema = json!({
            "type": "object",
            "required": ["spec"],
            "properties": {"spec": {"type": "object", "required": ["a"], "properties": {
                "a": {"type": "integer", "format": "int32"},
                "m": {"type": "object", "additionalProperties": {"type": "string"}},
                "n": {"type": "string", "nullable": true},
            }}},
        });
        assert!(
            validate(
                &schema,
                &json!({"kind": "X", "spec": {"a": 1, "m": {"k": "v"}, "n": null}})
            )
            .is_empty()
        );
        let errors = validate(
            &schema,
            &json!({"spec": {"a": "1", "b": 2, "m": {"k": 1}}, "extra": 1}),
        );
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert_eq!(
            validate(&schema, &json!({})),
            vec!["spec: required field missing"]
        );
        assert_eq!(
            validate(&schema, &json!({"spec": {"a": 4_294_967_296_i64}})),
            vec!["spec.a: 4294967296 does not fit int32"]
        );
    }
}
