//! `causeway diff OLD_DIR NEW_DIR`: what a configuration change adds, removes and changes —
//! routes, policies (rate limits among them), upstreams (their ERP budgets among them) and the
//! main file's other settings — for a pipeline to show before a change is promoted. Files are
//! compared as written: `${VAR}` references are compared as references (the environment of the
//! machine running the diff plays no part), and secrets are masked as `check --print` masks them,
//! so a changed secret does not show.

use super::spec::{MainSpec, PoliciesFile, RoutesFile};
use super::{parse_file, yaml_files, Diagnostics, Env, MAIN_FILE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// What a configuration entity is, in the order the report lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Route,
    Policy,
    Upstream,
    Setting,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Route => "route",
            Kind::Policy => "policy",
            Kind::Upstream => "upstream",
            Kind::Setting => "setting",
        }
    }
}

/// One difference between the two directories.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added {
        kind: Kind,
        name: String,
        file: PathBuf,
    },
    Removed {
        kind: Kind,
        name: String,
        file: PathBuf,
    },
    /// Each changed value: its JSON pointer inside the entity, before and after (absent: null).
    Changed {
        kind: Kind,
        name: String,
        file: PathBuf,
        values: Vec<(String, Value, Value)>,
    },
}

/// Every entity of a directory by kind and name: the file it is in and its settings as JSON.
type Entities = BTreeMap<(Kind, String), (PathBuf, Value)>;

/// The changes from `old` to `new`, routes first; an error when either directory is unreadable.
pub fn diff(old: &Path, new: &Path) -> Result<Vec<Change>, Diagnostics> {
    let (before, after) = (entities(old)?, entities(new)?);
    let mut changes = Vec::new();
    for ((kind, name), (file, value)) in &before {
        match after.get(&(*kind, name.clone())) {
            None => changes.push(Change::Removed { kind: *kind, name: name.clone(), file: file.clone() }),
            Some((new_file, new_value)) if new_value != value => {
                let mut values = Vec::new();
                changed_values("", value, new_value, &mut values);
                changes.push(Change::Changed {
                    kind: *kind,
                    name: name.clone(),
                    file: new_file.clone(),
                    values,
                });
            }
            Some(_) => {}
        }
    }
    for ((kind, name), (file, _)) in &after {
        if !before.contains_key(&(*kind, name.clone())) {
            changes.push(Change::Added { kind: *kind, name: name.clone(), file: file.clone() });
        }
    }
    changes.sort_by(|a, b| key(a).cmp(&key(b)));
    Ok(changes)
}

fn key(change: &Change) -> (Kind, &str) {
    match change {
        Change::Added { kind, name, .. }
        | Change::Removed { kind, name, .. }
        | Change::Changed { kind, name, .. } => (*kind, name),
    }
}

/// The report `causeway diff` prints: one line per entity, one indented line per changed value.
pub fn render(changes: &[Change]) -> String {
    let mut out = String::new();
    let (mut added, mut removed, mut changed) = (0, 0, 0);
    for change in changes {
        match change {
            Change::Added { kind, name, file } => {
                added += 1;
                let _ = writeln!(out, "+ {} {name} ({})", kind.as_str(), file.display());
            }
            Change::Removed { kind, name, file } => {
                removed += 1;
                let _ = writeln!(out, "- {} {name} (was in {})", kind.as_str(), file.display());
            }
            Change::Changed { kind, name, file, values } => {
                changed += 1;
                let _ = writeln!(out, "~ {} {name} ({})", kind.as_str(), file.display());
                for (pointer, before, after) in values {
                    let _ = writeln!(
                        out,
                        "    {}: {} -> {}",
                        display_pointer(pointer),
                        short(before),
                        short(after)
                    );
                }
            }
        }
    }
    if changes.is_empty() {
        out.push_str("no changes\n");
    } else {
        let _ =
            writeln!(out, "{} change(s): {added} added, {removed} removed, {changed} changed", changes.len());
    }
    out
}

fn display_pointer(pointer: &str) -> &str {
    if pointer.is_empty() {
        "/"
    } else {
        pointer
    }
}

/// A value on one line, cut at 120 characters (a schema or a mapping can be long).
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The leaves that differ between two values: objects are compared key by key, anything else
/// (numbers, strings, lists) as a whole.
fn changed_values(pointer: &str, before: &Value, after: &Value, out: &mut Vec<(String, Value, Value)>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let (x, y) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
                if x != y {
                    let escaped = k.replace('~', "~0").replace('/', "~1");
                    changed_values(&format!("{pointer}/{escaped}"), x, y, out);
                }
            }
        }
        _ if before != after => out.push((pointer.to_string(), before.clone(), after.clone())),
        _ => {}
    }
}

/// The routes, policies, upstreams and settings of a configuration directory, as written.
fn entities(dir: &Path) -> Result<Entities, Diagnostics> {
    let mut diags = Diagnostics::default();
    if !dir.join(MAIN_FILE).is_file() {
        diags.file(dir, format!("not a configuration directory: no {MAIN_FILE} in it"));
        return Err(diags);
    }
    // No environment: `${VAR}` stays a reference, whatever the machine running the diff has.
    let none = |_: &str| None;
    let env = Env::new(&none, true);
    let mut out = Entities::new();
    let relative = |file: &Path| file.strip_prefix(dir).unwrap_or(file).to_path_buf();
    let main_path = dir.join(MAIN_FILE);
    if let Some(main) = parse_file::<MainSpec>(&main_path, &env, &mut diags) {
        if let Value::Object(settings) = to_json(&main, &main_path, &mut diags) {
            for (name, value) in settings {
                if name == "upstreams" {
                    for (upstream, spec) in value.as_object().cloned().unwrap_or_default() {
                        out.insert((Kind::Upstream, upstream), (relative(&main_path), spec));
                    }
                } else {
                    out.insert((Kind::Setting, name), (relative(&main_path), value));
                }
            }
        }
    }
    for file in yaml_files(&dir.join("routes"), &mut diags) {
        if let Some(routes) = parse_file::<RoutesFile>(&file, &env, &mut diags) {
            for route in routes.routes {
                let value = to_json(&route, &file, &mut diags);
                insert_once(
                    &mut out,
                    (Kind::Route, route.value.name.value.clone()),
                    (relative(&file), value),
                    &file,
                    &mut diags,
                );
            }
        }
    }
    for file in yaml_files(&dir.join("policies"), &mut diags) {
        if let Some(policies) = parse_file::<PoliciesFile>(&file, &env, &mut diags) {
            for policy in policies.policies {
                let value = to_json(&policy, &file, &mut diags);
                let name = value.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
                insert_once(&mut out, (Kind::Policy, name), (relative(&file), value), &file, &mut diags);
            }
        }
    }
    if diags.0.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// A name defined twice would hide one of its definitions from the comparison: refused, as
/// `check` refuses it.
fn insert_once(
    out: &mut Entities,
    key: (Kind, String),
    entry: (PathBuf, Value),
    file: &Path,
    diags: &mut Diagnostics,
) {
    if let Some((first, _)) = out.get(&key) {
        let message =
            format!("{} `{}` is defined twice (also in {})", key.0.as_str(), key.1, first.display());
        diags.file(file, message);
        return;
    }
    out.insert(key, entry);
}

fn to_json<T: serde::Serialize>(value: &T, file: &Path, diags: &mut Diagnostics) -> Value {
    serde_json::to_value(value).unwrap_or_else(|e| {
        diags.file(file, format!("cannot compare: {e}"));
        Value::Null
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_leaves_that_differ_are_listed() {
        let before = json!({"a": 1, "b": {"c": [1, 2], "d": "x", "e/f": true}});
        let after = json!({"a": 1, "b": {"c": [1, 3], "e/f": false}, "g": null, "h": 2});
        let mut out = Vec::new();
        changed_values("", &before, &after, &mut out);
        let pointers: Vec<&str> = out.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(pointers, ["/b/c", "/b/d", "/b/e~1f", "/h"]);
        assert_eq!(out[1], ("/b/d".into(), json!("x"), Value::Null));
        assert_eq!(short(&json!("é".repeat(200))).chars().count(), 121);
    }
}
