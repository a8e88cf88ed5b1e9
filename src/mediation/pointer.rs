//! RFC 6901 JSON pointers, parsed once at load time, that can also create and remove what they
//! point to (serde_json only reads them).

use serde_json::{Map, Value};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    tokens: Vec<String>,
    text: String,
}

impl Pointer {
    /// `""` is the whole document; otherwise every token starts with `/`.
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer { tokens: Vec::new(), text: String::new() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "JSON pointer `{text}` must start with `/` (or be empty for the whole document)"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    token.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => token.push('~'),
                    Some('1') => token.push('/'),
                    _ => return Err(format!("JSON pointer `{text}`: `~` must be followed by 0 or 1")),
                }
            }
            tokens.push(token);
        }
        Ok(Pointer { tokens, text: text.to_string() })
    }

    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The last token: the member name or index this pointer ends at.
    pub fn last(&self) -> Option<&str> {
        self.tokens.last().map(String::as_str)
    }

    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let mut at = doc;
        for t in &self.tokens {
            at = match at {
                Value::Object(m) => m.get(t)?,
                Value::Array(a) => a.get(index(t)?)?,
                _ => return None,
            };
        }
        Some(at)
    }

    pub fn get_mut<'a>(&self, doc: &'a mut Value) -> Option<&'a mut Value> {
        let mut at = doc;
        for t in &self.tokens {
            at = match at {
                Value::Object(m) => m.get_mut(t)?,
                Value::Array(a) => a.get_mut(index(t)?)?,
                _ => return None,
            };
        }
        Some(at)
    }

    /// Write `value`, creating objects on the way. An existing scalar on the way is an error
    /// (overwriting it silently would lose data); `-` appends to an array.
    pub fn set(&self, doc: &mut Value, value: Value) -> Result<(), String> {
        let Some((last, parents)) = self.tokens.split_last() else {
            *doc = value;
            return Ok(());
        };
        let mut at = doc;
        for t in parents {
            if at.is_null() {
                *at = Value::Object(Map::new());
            }
            at = match at {
                Value::Object(m) => m.entry(t.clone()).or_insert(Value::Null),
                Value::Array(a) => {
                    let i = index(t).filter(|i| *i < a.len()).ok_or_else(|| self.no_slot(t))?;
                    &mut a[i]
                }
                _ => return Err(format!("cannot write `{}`: `{t}` is inside a scalar", self.text)),
            };
        }
        if at.is_null() {
            *at = Value::Object(Map::new());
        }
        match at {
            Value::Object(m) => {
                m.insert(last.clone(), value);
                Ok(())
            }
            Value::Array(a) if last == "-" => {
                a.push(value);
                Ok(())
            }
            Value::Array(a) => {
                let i = index(last).filter(|i| *i < a.len()).ok_or_else(|| self.no_slot(last))?;
                a[i] = value;
                Ok(())
            }
            _ => Err(format!("cannot write `{}`: its parent is a scalar", self.text)),
        }
    }

    /// Remove and return what the pointer names; the root cannot be removed (it becomes null).
    pub fn take(&self, doc: &mut Value) -> Option<Value> {
        let Some((last, parents)) = self.tokens.split_last() else {
            return Some(std::mem::take(doc));
        };
        let mut at = doc;
        for t in parents {
            at = match at {
                Value::Object(m) => m.get_mut(t)?,
                Value::Array(a) => a.get_mut(index(t)?)?,
                _ => return None,
            };
        }
        match at {
            Value::Object(m) => m.remove(last),
            Value::Array(a) => {
                let i = index(last).filter(|i| *i < a.len())?;
                Some(a.remove(i))
            }
            _ => None,
        }
    }

    fn no_slot(&self, token: &str) -> String {
        format!("cannot write `{}`: `{token}` is not an index of the array there", self.text)
    }
}

fn index(token: &str) -> Option<usize> {
    // RFC 6901: no leading zeros, digits only.
    if token.is_empty()
        || (token.len() > 1 && token.starts_with('0'))
        || !token.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    token.parse().ok()
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Escape one member name for use inside a pointer.
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_escapes_and_rejects_relative_pointers() {
        let p = Pointer::parse("/a~1b/c~0d/0").unwrap();
        assert_eq!(p.get(&json!({"a/b": {"c~d": ["x"]}})), Some(&json!("x")));
        assert!(Pointer::parse("a/b").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse("").unwrap().is_root());
    }

    #[test]
    fn set_creates_objects_and_appends_with_dash() {
        let mut doc = json!({});
        Pointer::parse("/a/b").unwrap().set(&mut doc, json!(1)).unwrap();
        Pointer::parse("/list").unwrap().set(&mut doc, json!([])).unwrap();
        Pointer::parse("/list/-").unwrap().set(&mut doc, json!("x")).unwrap();
        assert_eq!(doc, json!({"a": {"b": 1}, "list": ["x"]}));
        assert!(Pointer::parse("/a/b/c").unwrap().set(&mut doc, json!(2)).is_err(), "b is a scalar");
        assert!(Pointer::parse("/list/5").unwrap().set(&mut doc, json!(2)).is_err());
    }

    #[test]
    fn take_removes_members_and_elements() {
        let mut doc = json!({"a": [1, 2, 3], "b": {"c": null}});
        assert_eq!(Pointer::parse("/a/1").unwrap().take(&mut doc), Some(json!(2)));
        assert_eq!(Pointer::parse("/b/c").unwrap().take(&mut doc), Some(Value::Null));
        assert_eq!(Pointer::parse("/b/zz").unwrap().take(&mut doc), None);
        assert_eq!(Pointer::parse("/a/01").unwrap().take(&mut doc), None, "leading zero is no index");
        assert_eq!(doc, json!({"a": [1, 3], "b": {}}));
    }
}
