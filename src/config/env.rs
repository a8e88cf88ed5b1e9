//! `${NAME}` and `${NAME:-fallback}` references to environment variables in secret-bearing values.

/// Expand every reference in `value`. `lookup` is the environment (injected for tests).
pub fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated `${{` in `{value}`"))?;
        let inner = &after[..end];
        let (name, fallback) = match inner.split_once(":-") {
            Some((n, f)) => (n, Some(f)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{inner}}}` is not a valid environment variable reference"));
        }
        match (lookup(name), fallback) {
            (Some(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(f)) => out.push_str(f),
            _ => {
                return Err(format!(
                    "environment variable {name} is not set; export it or write `${{{name}:-default}}`"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_string())
    }

    #[test]
    fn expands_set_unset_and_fallback() {
        assert_eq!(expand("Bearer ${SET}", &env).unwrap(), "Bearer value");
        assert_eq!(expand("${UNSET:-dev}", &env).unwrap(), "dev");
        assert_eq!(expand("plain", &env).unwrap(), "plain");
        let err = expand("${UNSET}", &env).unwrap_err();
        assert!(err.contains("UNSET is not set"), "{err}");
        assert!(expand("${", &env).is_err());
        assert!(expand("${a b}", &env).is_err());
    }
}
