//! JSON Schema (draft 2020-12 unless the file's `$schema` says otherwise), compiled once at
//! load time. Remote and file `$ref`s are not fetched: a schema is one file with `$defs`.

use crate::error::Violation;
use serde_json::Value;

/// At most this many violations are reported: enough to fix a document, bounded for the caller.
pub const MAX_VIOLATIONS: usize = 100;

pub struct Schema {
    validator: jsonschema::Validator,
    pub file: String,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Schema({})", self.file)
    }
}

impl Schema {
    pub fn compile(value: &Value, file: &str) -> Result<Schema, String> {
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(value)
            .map_err(|e| format!("schema {file}: invalid JSON Schema at `{}`: {e}", e.instance_path()))?;
        Ok(Schema { validator, file: file.to_string() })
    }

    /// Every violation (up to [`MAX_VIOLATIONS`]), not only the first.
    pub fn violations(&self, location: &'static str, instance: &Value) -> Vec<Violation> {
        self.validator
            .iter_errors(instance)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                location,
                pointer: e.instance_path().to_string(),
                keyword: e.kind().keyword().to_string(),
                message: e.to_string(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_every_violation_with_pointer_and_keyword() {
        let schema = Schema::compile(
            &json!({
                "type": "object",
                "required": ["customer", "lines"],
                "properties": {
                    "customer": {},
                    "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
                    "orderDate": {"type": "string", "format": "date"},
                    "lines": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "properties": {"quantity": {"type": "number", "exclusiveMinimum": 0}}
                    }}
                },
                "additionalProperties": false
            }),
            "test",
        )
        .unwrap();
        let v = schema.violations(
            "body",
            &json!({"currency": "usd", "orderDate": "2026-13-45", "lines": [{"quantity": 0}], "x": 1}),
        );
        let found: Vec<(&str, &str)> = v.iter().map(|v| (v.pointer.as_str(), v.keyword.as_str())).collect();
        for expected in [
            ("", "required"),
            ("/currency", "pattern"),
            ("/orderDate", "format"),
            ("/lines/0/quantity", "exclusiveMinimum"),
            ("", "additionalProperties"),
        ] {
            assert!(found.contains(&expected), "{expected:?} missing from {found:?}");
        }
        assert!(schema.violations("body", &json!({"customer": 1, "lines": [{"quantity": 1}]})).is_empty());
    }

    #[test]
    fn an_invalid_schema_is_a_load_error() {
        let e = Schema::compile(&json!({"type": "no-such-type"}), "bad.json").unwrap_err();
        assert!(e.contains("bad.json"), "{e}");
    }
}
