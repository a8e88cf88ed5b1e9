//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header): the key is a structured-field
//! string; the request fingerprint is a hash of the JSON body, so formatting and member order do
//! not make a retry look like a different request.

use sha2::{Digest, Sha256};

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// The key from the header value: an sf-string (`"…"`, with `\"` and `\\` escapes). A bare
/// token without quotes is accepted too, since many clients send a raw UUID.
pub fn parse_key(header: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(header).map_err(|_| "is not ASCII".to_string())?.trim();
    let key = if let Some(inner) = text.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = inner.chars();
        loop {
            match chars.next() {
                None => return Err("has no closing quote".into()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some(c @ ('"' | '\\')) => out.push(c),
                    _ => return Err("has an invalid escape (only \\\" and \\\\ are allowed)".into()),
                },
                Some(c) => out.push(c),
            }
        }
        if !chars.as_str().trim().is_empty() {
            return Err("has text after the closing quote".into());
        }
        out
    } else {
        text.to_string()
    };
    if key.is_empty() {
        return Err("is empty".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("is longer than {MAX_KEY_LEN} characters"));
    }
    if !key.chars().all(|c| (' '..='~').contains(&c)) {
        return Err("contains characters other than printable ASCII".into());
    }
    Ok(key)
}

/// SHA-256 of the body's canonical JSON (members sorted, no insignificant whitespace).
pub fn fingerprint(body: &serde_json::Value) -> String {
    // serde_json's map is ordered by key, so `to_string` is canonical for our purpose.
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys() {
        assert_eq!(parse_key(br#""8e03978e-40d5""#).unwrap(), "8e03978e-40d5");
        assert_eq!(parse_key(b"8e03978e-40d5").unwrap(), "8e03978e-40d5");
        assert_eq!(parse_key(br#""a\"b\\c""#).unwrap(), r#"a"b\c"#);
        assert!(parse_key(br#""open"#).is_err());
        assert!(parse_key(br#""""#).is_err());
        assert!(parse_key(br#""a\nb""#).is_err());
        assert!(parse_key(br#""a" x"#).is_err());
        assert!(parse_key("\"é\"".as_bytes()).is_err());
        assert!(parse_key(&[b'a'; 256]).is_err());
    }

    #[test]
    fn fingerprint_ignores_formatting_but_not_content() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1, 2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":[1,2],"b":1}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&json!({"a": [2, 1], "b": 1})));
    }
}
