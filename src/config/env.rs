//! The environment a configuration is read in: `${NAME}` and `${NAME:-fallback}` references in
//! every string value of the files (listen addresses, URLs, paths, secrets), and the `*_env`
//! settings that name a variable. `causeway check --offline` reads a configuration without its
//! production environment: an unset variable is then a warning, and a placeholder stands in.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where variables come from (the process environment, or a test's map) and what happens when
/// one is unset.
pub struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    offline: bool,
    /// Variables that were unset when read (offline mode replaced them with a placeholder).
    unset: RefCell<BTreeSet<String>>,
    /// The files read, to find where an unset variable is referenced.
    files: RefCell<Vec<(PathBuf, String)>>,
    /// What is worth saying but does not stop the configuration (an expiring certificate, a
    /// file that only the production machine has).
    warnings: RefCell<Vec<super::Diagnostic>>,
}

impl<'a> Env<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>, offline: bool) -> Self {
        Env {
            lookup,
            offline,
            unset: RefCell::default(),
            files: RefCell::default(),
            warnings: RefCell::default(),
        }
    }

    pub fn offline(&self) -> bool {
        self.offline
    }

    /// The value of `name`; an empty value counts as unset. Offline, an unset variable is
    /// recorded and a placeholder returned, so the rest of the file can still be checked.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some(v) = (self.lookup)(name).filter(|v| !v.is_empty()) {
            return Some(v);
        }
        if self.offline {
            self.unset.borrow_mut().insert(name.to_string());
            return Some(placeholder(name));
        }
        None
    }

    /// The value of `name` as the environment has it (an empty value counts as unset).
    pub fn lookup(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.is_empty())
    }

    /// A `${NAME}` reference found `name` unset (it was replaced by a placeholder).
    pub fn record_unset(&self, name: &str) {
        self.unset.borrow_mut().insert(name.to_string());
    }

    /// Remember a file's text, so unset variables can be traced to their lines.
    pub fn read(&self, path: &Path, text: &str) {
        self.files.borrow_mut().push((path.to_path_buf(), text.to_string()));
    }

    pub fn warn(&self, file: &Path, line: u64, column: u64, message: impl Into<String>) {
        let message = format!("warning: {}", message.into());
        self.warnings.borrow_mut().push(super::Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message,
        });
    }

    pub fn warnings(&self) -> Vec<super::Diagnostic> {
        self.warnings.borrow().clone()
    }

    /// Variables found unset, in name order: `${NAME}` references (both modes) and, offline,
    /// `*_env` settings.
    pub fn unset(&self) -> Vec<String> {
        self.unset.borrow().iter().cloned().collect()
    }

    /// Every place a variable is referenced: `${NAME…}` in any file read, or the bare name as
    /// the value of a `*_env` setting.
    pub fn references(&self, name: &str) -> Vec<(PathBuf, u64, u64)> {
        let mut out = Vec::new();
        for (path, text) in self.files.borrow().iter() {
            for (line, col) in find_references(text, name) {
                out.push((path.clone(), line, col));
            }
        }
        out
    }
}

/// What stands in for an unset variable while the rest is checked: long enough for length
/// checks of secrets, a valid header value, and obviously not a real value.
pub fn placeholder(name: &str) -> String {
    format!("causeway-offline-placeholder-for-{name}")
}

/// 1-based (line, column) of each reference to `name` outside comments: `${NAME}`,
/// `${NAME:-…}`, or `NAME` standing alone as a value (a `*_env` setting or a list item).
pub fn find_references(text: &str, name: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = strip_comment(line);
        let braced = [format!("${{{name}}}"), format!("${{{name}:-")];
        let hit = braced.iter().find_map(|p| code.find(p.as_str())).or_else(|| bare_reference(code, name));
        if let Some(col) = hit {
            out.push((n as u64 + 1, col as u64 + 1));
        }
    }
    out
}

/// `NAME` as a whole word (not part of a longer identifier).
fn bare_reference(code: &str, name: &str) -> Option<usize> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    code.match_indices(name).map(|(i, _)| i).find(|&i| {
        let before = code[..i].chars().next_back();
        let after = code[i + name.len()..].chars().next();
        !before.is_some_and(word) && before != Some('{') && !after.is_some_and(word)
    })
}

/// A YAML line without its comment (a `#` at the start or after a space, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut prev) = (false, false, ' ');
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// The names referenced as `${NAME…}` in `text` (comments included: a lookup too many is
/// harmless).
pub fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        if end > 0 {
            names.insert(after[..end].to_string());
        }
        rest = after;
    }
    names
}

/// Expand every reference in `value`; `$${` is a literal `${`. `lookup` is the environment;
/// `unset` decides what a reference to an unset variable without a fallback becomes (`None`:
/// an error).
pub fn expand_with(
    value: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
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
        match (lookup(name).filter(|v| !v.is_empty()), fallback) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(f)) => out.push_str(f),
            (None, None) => match unset(name) {
                Some(v) => out.push_str(&v),
                None => return Err(unset_message(name)),
            },
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub fn unset_message(name: &str) -> String {
    format!("environment variable {name} is not set; export it or write `${{{name}:-default}}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn expand(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
        expand_with(value, lookup, &|_| None)
    }

    #[test]
    fn expands_set_unset_and_fallback() {
        assert_eq!(expand("Bearer ${SET}", &env).unwrap(), "Bearer value");
        assert_eq!(expand("${UNSET:-dev}", &env).unwrap(), "dev");
        assert_eq!(expand("${EMPTY:-dev}", &env).unwrap(), "dev");
        assert_eq!(expand("plain", &env).unwrap(), "plain");
        assert_eq!(expand("0.0.0.0:${UNSET:-8080}", &env).unwrap(), "0.0.0.0:8080");
        assert_eq!(expand("literal $${SET} and ${SET}", &env).unwrap(), "literal ${SET} and value");
        let err = expand("${UNSET}", &env).unwrap_err();
        assert!(err.contains("UNSET is not set"), "{err}");
        assert!(expand("${", &env).is_err());
        assert!(expand("${a b}", &env).is_err());
        assert!(expand("${É}", &env).is_err());
    }

    #[test]
    fn references_are_found_outside_comments() {
        let text = "# token: ${TOKEN}\nlisten:\n  proxy: ${ADDR:-0.0.0.0:8080}  # ${TOKEN}\n  secret_env: [TOKEN, TOKEN_2]\n  url: \"${TOKEN}\"\n";
        assert_eq!(find_references(text, "TOKEN"), vec![(4, 16), (5, 9)]);
        assert_eq!(find_references(text, "ADDR"), vec![(3, 10)]);
        assert_eq!(referenced_names(text), BTreeSet::from(["ADDR".to_string(), "TOKEN".to_string()]));
    }

    #[test]
    fn offline_unset_variables_get_a_placeholder_and_are_recorded() {
        let strict = Env::new(&env, false);
        assert_eq!(strict.get("UNSET"), None);
        assert_eq!(strict.get("EMPTY"), None);
        let offline = Env::new(&env, true);
        assert_eq!(offline.get("SET").as_deref(), Some("value"));
        assert!(offline.get("UNSET").unwrap().contains("UNSET"));
        assert_eq!(offline.unset(), vec!["UNSET".to_string()]);
    }
}
