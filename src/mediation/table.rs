//! Declarative mapping tables: an ordered list of operations on JSON pointers, compiled once
//! at load time. What a table cannot say goes to a jq program (see `jq.rs`).
//!
//! Two modes. `passthrough` (default) starts from a copy of the input and edits it: fields no
//! operation names are kept. `build` starts from an empty object and takes only what `copy` and
//! `move` bring over from the input: fields no operation names are dropped.

use super::convert::{kind, Conversion};
use super::pointer::Pointer;
use serde::Deserialize;
use serde_json::{Map, Value};

/// What a mapping file (or an inline `map:`) says.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    #[serde(default)]
    pub mode: Mode,
    pub ops: Vec<OpSpec>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Passthrough,
    Build,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OpSpec {
    /// Copy a value to another place (in `passthrough`, the source stays).
    Copy(TransferSpec),
    /// Copy, then remove the source (in `build` the input is never changed, so it equals copy).
    Move(TransferSpec),
    /// Rename the member a pointer ends at, in place.
    Rename { at: String, to: String },
    /// A constant.
    Set { at: String, value: Value },
    /// A value for a member that is absent or null.
    Default { at: String, value: Value },
    /// Remove a member or element.
    Drop(String),
    /// Convert a value in place.
    Convert { at: String, with: String },
    /// Map every element of an array with a nested table.
    Each(EachSpec),
    /// Map one sub-document (an object, e.g. OData v2's `d`) with a nested table.
    Apply(EachSpec),
    /// Find the first element of an array whose members equal `match`, take a value from it.
    Lookup(LookupSpec),
    /// Append to an array an element made from a template and one value from the source, when
    /// the source is present and not null (SAP pricing elements from a price and a discount).
    Append(AppendSpec),
    /// Replace a code by its counterpart (`A` → `Open`); unknown codes stay, or become `otherwise`.
    Translate {
        at: String,
        values: serde_json::Map<String, Value>,
        #[serde(default)]
        otherwise: Option<Value>,
    },
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AppendSpec {
    pub from: String,
    /// The array appended to (created when absent).
    pub to: String,
    /// The element's template.
    pub value: Value,
    /// Where in the element the source value goes.
    pub at: String,
    #[serde(default)]
    pub convert: Option<String>,
}

/// Numbers the mapped elements of an `each`: `start`, `start + step`, ... at `to` in each element.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    pub to: String,
    #[serde(default = "one")]
    pub start: i64,
    #[serde(default = "one")]
    pub step: i64,
    /// Write the number as a string (OData v2 item numbers: `"10"`).
    #[serde(default)]
    pub as_string: bool,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    pub from: String,
    #[serde(rename = "match")]
    pub matcher: serde_json::Map<String, Value>,
    /// Pointer inside the found element.
    pub take: String,
    pub to: String,
    #[serde(default)]
    pub convert: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct TransferSpec {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub convert: Option<String>,
    /// Used when the source is absent or null.
    #[serde(default)]
    pub default: Option<Value>,
    /// An absent source is an error (the default, if any, is used first).
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EachSpec {
    pub from: String,
    /// Where the mapped array goes; default: `from`.
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// The element mapping inline ...
    #[serde(default)]
    pub ops: Vec<OpSpec>,
    /// ... or in another mapping file (relative to this one), shared e.g. by a list and its item.
    #[serde(default)]
    pub map: Option<String>,
    /// Number the mapped elements (`each` only).
    #[serde(default)]
    pub index: Option<IndexSpec>,
}

/// A compiled table.
#[derive(Debug, Clone)]
pub struct Table {
    mode: Mode,
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    Transfer {
        from: Pointer,
        to: Pointer,
        remove: bool,
        convert: Option<Conversion>,
        default: Option<Value>,
        required: bool,
    },
    Rename {
        at: Pointer,
        to: String,
    },
    Set {
        at: Pointer,
        value: Value,
        only_if_missing: bool,
    },
    Drop(Pointer),
    Convert {
        at: Pointer,
        with: Conversion,
    },
    Each {
        from: Pointer,
        to: Pointer,
        table: Table,
        /// Element pointer, start, step, as a string.
        index: Option<(Pointer, i64, i64, bool)>,
    },
    Apply {
        from: Pointer,
        to: Pointer,
        table: Table,
    },
    Append {
        from: Pointer,
        to: Pointer,
        value: Value,
        at: Pointer,
        convert: Option<Conversion>,
    },
    Lookup {
        from: Pointer,
        matcher: Vec<(String, Value)>,
        take: Pointer,
        to: Pointer,
        convert: Option<Conversion>,
    },
    Translate {
        at: Pointer,
        values: serde_json::Map<String, Value>,
        otherwise: Option<Value>,
    },
}

/// A mapping failure, at the pointer (in the document being mapped) where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct MapError {
    pub pointer: String,
    pub message: String,
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", if self.pointer.is_empty() { "/" } else { &self.pointer }, self.message)
    }
}

impl Table {
    /// Compile a table that includes no other file; errors name the operation by its
    /// position (`ops[3].each.ops[1]`).
    pub fn compile(spec: &TableSpec) -> Result<Table, String> {
        Table::compile_with(spec, &|file| Err(format!("`map: {file}` cannot be resolved here")))
    }

    /// Compile, reading `each.map` includes through `include`.
    pub fn compile_with(
        spec: &TableSpec,
        include: &dyn Fn(&str) -> Result<TableSpec, String>,
    ) -> Result<Table, String> {
        compile_ops(spec.mode, &spec.ops, "ops", include, 0)
    }

    pub fn apply(&self, input: &Value) -> Result<Value, MapError> {
        self.apply_at(input, "")
    }

    fn apply_at(&self, input: &Value, base: &str) -> Result<Value, MapError> {
        let mut out = match self.mode {
            Mode::Passthrough => input.clone(),
            Mode::Build => Value::Object(Map::new()),
        };
        let err = |p: &Pointer, message: String| MapError { pointer: format!("{base}{p}"), message };
        for op in &self.ops {
            match op {
                Op::Transfer { from, to, remove, convert, default, required } => {
                    let source = match self.mode {
                        Mode::Build => from.get(input).cloned(),
                        Mode::Passthrough if *remove => from.take(&mut out),
                        Mode::Passthrough => from.get(&out).cloned(),
                    };
                    let value = match (source, default) {
                        (Some(Value::Null) | None, Some(d)) => d.clone(),
                        (Some(v), _) => match convert {
                            Some(c) => c.apply(&v).map_err(|m| err(from, m))?,
                            None => v,
                        },
                        (None, None) if *required => return Err(err(from, "is required but absent".into())),
                        (None, None) => continue,
                    };
                    to.set(&mut out, value).map_err(|m| err(to, m))?;
                }
                Op::Rename { at, to } => {
                    if let Some(v) = at.take(&mut out) {
                        let parent = parent_of(at);
                        let target = Pointer::parse(&format!("{parent}/{}", super::pointer::escape(to)))
                            .map_err(|m| err(at, m))?;
                        target.set(&mut out, v).map_err(|m| err(at, m))?;
                    }
                }
                Op::Set { at, value, only_if_missing } => {
                    let present = at.get(&out).is_some_and(|v| !v.is_null());
                    if !(*only_if_missing && present) {
                        at.set(&mut out, value.clone()).map_err(|m| err(at, m))?;
                    }
                }
                Op::Drop(at) => {
                    if at.is_root() {
                        out = Value::Null;
                    } else {
                        at.take(&mut out);
                    }
                }
                Op::Convert { at, with } => {
                    if let Some(slot) = at.get_mut(&mut out) {
                        *slot = with.apply(slot).map_err(|m| err(at, m))?;
                    }
                }
                Op::Each { from, to, table, index } => {
                    let source = match self.mode {
                        Mode::Build => from.get(input),
                        Mode::Passthrough => from.get(&out),
                    };
                    let items = match source {
                        None | Some(Value::Null) => continue,
                        Some(Value::Array(items)) => items,
                        Some(other) => {
                            return Err(err(from, format!("expected an array, found {}", kind(other))))
                        }
                    };
                    let mut mapped = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let mut element = table.apply_at(item, &format!("{base}{from}/{i}"))?;
                        if let Some((at, start, step, as_string)) = index {
                            let n = start.saturating_add(step.saturating_mul(i as i64));
                            let n = if *as_string { Value::String(n.to_string()) } else { Value::from(n) };
                            at.set(&mut element, n).map_err(|m| err(at, m))?;
                        }
                        mapped.push(element);
                    }
                    to.set(&mut out, Value::Array(mapped)).map_err(|m| err(to, m))?;
                }
                Op::Apply { from, to, table } => {
                    let source = match self.mode {
                        Mode::Build => from.get(input),
                        Mode::Passthrough => from.get(&out),
                    };
                    let Some(source) = source.filter(|v| !v.is_null()) else { continue };
                    let mapped = table.apply_at(source, &format!("{base}{from}"))?;
                    to.set(&mut out, mapped).map_err(|m| err(to, m))?;
                }
                Op::Append { from, to, value, at, convert } => {
                    let source = match self.mode {
                        Mode::Build => from.get(input).cloned(),
                        Mode::Passthrough => from.get(&out).cloned(),
                    };
                    let Some(source) = source.filter(|v| !v.is_null()) else { continue };
                    let source = match convert {
                        Some(c) => c.apply(&source).map_err(|m| err(from, m))?,
                        None => source,
                    };
                    let mut element = value.clone();
                    at.set(&mut element, source).map_err(|m| err(at, m))?;
                    match to.get_mut(&mut out) {
                        Some(Value::Array(list)) => list.push(element),
                        Some(Value::Null) | None => {
                            to.set(&mut out, Value::Array(vec![element])).map_err(|m| err(to, m))?
                        }
                        Some(other) => {
                            return Err(err(
                                to,
                                format!("expected an array to append to, found {}", kind(other)),
                            ))
                        }
                    }
                }
                Op::Lookup { from, matcher, take, to, convert } => {
                    let source = match self.mode {
                        Mode::Build => from.get(input),
                        Mode::Passthrough => from.get(&out),
                    };
                    let Some(Value::Array(items)) = source else { continue };
                    let found = items
                        .iter()
                        .find(|item| matcher.iter().all(|(k, v)| item.get(k) == Some(v)))
                        .and_then(|item| take.get(item));
                    let Some(value) = found.cloned() else { continue };
                    let value = match convert {
                        Some(c) => c.apply(&value).map_err(|m| err(from, m))?,
                        None => value,
                    };
                    to.set(&mut out, value).map_err(|m| err(to, m))?;
                }
                Op::Translate { at, values, otherwise } => {
                    let Some(slot) = at.get_mut(&mut out) else { continue };
                    let key = match slot {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        Value::Bool(b) => Some(b.to_string()),
                        _ => None,
                    };
                    match (key.and_then(|k| values.get(&k)), otherwise) {
                        (Some(v), _) => *slot = v.clone(),
                        (None, Some(o)) => *slot = o.clone(),
                        (None, None) => {}
                    }
                }
            }
        }
        Ok(out)
    }
}

fn parent_of(p: &Pointer) -> String {
    let s = p.as_str();
    s.rfind('/').map_or(String::new(), |i| s[..i].to_string())
}

/// Includes may nest this deep (a file including itself would otherwise never end).
const MAX_INCLUDE_DEPTH: usize = 8;

fn compile_ops(
    mode: Mode,
    specs: &[OpSpec],
    path: &str,
    include: &dyn Fn(&str) -> Result<TableSpec, String>,
    depth: usize,
) -> Result<Table, String> {
    let mut ops = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let here = format!("{path}[{i}]");
        let ptr = |s: &str| Pointer::parse(s).map_err(|e| format!("{here}: {e}"));
        let conversion = |s: &str| Conversion::parse(s).map_err(|e| format!("{here}: {e}"));
        ops.push(match spec {
            OpSpec::Copy(t) | OpSpec::Move(t) => {
                let to = ptr(&t.to)?;
                let from = ptr(&t.from)?;
                if matches!(spec, OpSpec::Move(_)) && from.is_root() && mode == Mode::Passthrough {
                    return Err(format!("{here}: moving the whole document empties it; use copy"));
                }
                Op::Transfer {
                    from,
                    to,
                    remove: matches!(spec, OpSpec::Move(_)),
                    convert: t.convert.as_deref().map(conversion).transpose()?,
                    default: t.default.clone(),
                    required: t.required,
                }
            }
            OpSpec::Rename { at, to } => {
                let at = ptr(at)?;
                if at.is_root() {
                    return Err(format!("{here}: the whole document has no name to rename"));
                }
                if to.is_empty() {
                    return Err(format!("{here}: the new name is empty"));
                }
                Op::Rename { at, to: to.clone() }
            }
            OpSpec::Set { at, value } => {
                Op::Set { at: ptr(at)?, value: value.clone(), only_if_missing: false }
            }
            OpSpec::Default { at, value } => {
                Op::Set { at: ptr(at)?, value: value.clone(), only_if_missing: true }
            }
            OpSpec::Drop(at) => Op::Drop(ptr(at)?),
            OpSpec::Convert { at, with } => Op::Convert { at: ptr(at)?, with: conversion(with)? },
            OpSpec::Each(e) | OpSpec::Apply(e) => {
                let from = ptr(&e.from)?;
                let to = match &e.to {
                    Some(t) => ptr(t)?,
                    None => from.clone(),
                };
                let table = match (&e.map, e.ops.is_empty()) {
                    (Some(file), true) => {
                        if depth >= MAX_INCLUDE_DEPTH {
                            return Err(format!(
                                "{here}: includes nest deeper than {MAX_INCLUDE_DEPTH} (a cycle?)"
                            ));
                        }
                        let spec = include(file).map_err(|e| format!("{here}: {e}"))?;
                        // The included file's own `mode` wins: it describes one element.
                        compile_ops(
                            spec.mode,
                            &spec.ops,
                            &format!("{here}.each.map({file}).ops"),
                            include,
                            depth + 1,
                        )?
                    }
                    (None, _) => compile_ops(e.mode, &e.ops, &format!("{here}.each.ops"), include, depth)?,
                    (Some(_), false) => return Err(format!("{here}: each takes `ops` or `map`, not both")),
                };
                let index = match (&e.index, spec) {
                    (Some(ix), OpSpec::Each(_)) => Some((ptr(&ix.to)?, ix.start, ix.step, ix.as_string)),
                    (Some(_), _) => return Err(format!("{here}: `index` belongs to each, not apply")),
                    (None, _) => None,
                };
                if matches!(spec, OpSpec::Apply(_)) {
                    Op::Apply { from, to, table }
                } else {
                    Op::Each { from, to, table, index }
                }
            }
            OpSpec::Append(a) => Op::Append {
                from: ptr(&a.from)?,
                to: ptr(&a.to)?,
                value: a.value.clone(),
                at: ptr(&a.at)?,
                convert: a.convert.as_deref().map(conversion).transpose()?,
            },
            OpSpec::Lookup(l) => Op::Lookup {
                from: ptr(&l.from)?,
                matcher: l.matcher.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                take: ptr(&l.take)?,
                to: ptr(&l.to)?,
                convert: l.convert.as_deref().map(conversion).transpose()?,
            },
            OpSpec::Translate { at, values, otherwise } => {
                Op::Translate { at: ptr(at)?, values: values.clone(), otherwise: otherwise.clone() }
            }
        });
    }
    Ok(Table { mode, ops })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(yaml: &str) -> Table {
        let spec: TableSpec = serde_saphyr::from_str(yaml).expect("table spec parses");
        Table::compile(&spec).expect("table compiles")
    }

    #[test]
    fn copy_in_build_mode_takes_only_named_fields() {
        let t =
            table("mode: build\nops:\n  - copy: {from: /a, to: /x/y}\n  - copy: {from: /missing, to: /m}\n");
        assert_eq!(t.apply(&json!({"a": "ä€𝄞", "b": 2})).unwrap(), json!({"x": {"y": "ä€𝄞"}}));
    }

    #[test]
    fn move_removes_the_source_in_passthrough() {
        let t = table("ops:\n  - move: {from: /a, to: /b/c}\n");
        assert_eq!(t.apply(&json!({"a": 1, "keep": true})).unwrap(), json!({"b": {"c": 1}, "keep": true}));
    }

    #[test]
    fn rename_keeps_the_value_in_place() {
        let t = table("ops:\n  - rename: {at: /h/old, to: new}\n  - rename: {at: /absent, to: x}\n");
        assert_eq!(t.apply(&json!({"h": {"old": [1], "o": 2}})).unwrap(), json!({"h": {"new": [1], "o": 2}}));
    }

    #[test]
    fn default_fills_absent_and_null_but_not_present_values() {
        let t = table("ops:\n  - default: {at: /a, value: 0}\n  - default: {at: /b, value: 0}\n  - default: {at: /c, value: 0}\n");
        assert_eq!(t.apply(&json!({"b": null, "c": 5})).unwrap(), json!({"a": 0, "b": 0, "c": 5}));
        let transfer = table(
            "mode: build\nops:\n  - copy: {from: /d, to: /d, default: X}\n  - copy: {from: /n, to: /n}\n",
        );
        assert_eq!(
            transfer.apply(&json!({"n": null})).unwrap(),
            json!({"d": "X", "n": null}),
            "null is copied"
        );
    }

    #[test]
    fn set_and_drop() {
        let t = table(
            "ops:\n  - set: {at: /kind, value: {nested: [1, 2]}}\n  - drop: /secret\n  - drop: /absent\n",
        );
        assert_eq!(
            t.apply(&json!({"kind": "old", "secret": "s"})).unwrap(),
            json!({"kind": {"nested": [1, 2]}})
        );
    }

    #[test]
    fn required_absent_source_is_an_error_with_its_pointer() {
        let t = table("mode: build\nops:\n  - each:\n      from: /lines\n      mode: build\n      ops:\n        - copy: {from: /sku, to: /item, required: true}\n");
        let e = t.apply(&json!({"lines": [{"sku": "A"}, {"qty": 1}]})).unwrap_err();
        assert_eq!(e.pointer, "/lines/1/sku");
    }

    #[test]
    fn each_maps_array_elements_and_tolerates_absent_arrays() {
        let t = table(
            "mode: build\nops:\n  - each:\n      from: /lines\n      to: /salesOrderLines\n      mode: build\n      ops:\n        - set: {at: /lineType, value: Item}\n        - copy: {from: /qty, to: /quantity, convert: string_to_number}\n",
        );
        assert_eq!(
            t.apply(&json!({"lines": [{"qty": "2.000"}, {"qty": "0.5"}]})).unwrap(),
            json!({"salesOrderLines": [{"lineType": "Item", "quantity": 2}, {"lineType": "Item", "quantity": 0.5}]})
        );
        assert_eq!(t.apply(&json!({})).unwrap(), json!({}));
        assert_eq!(t.apply(&json!({"lines": []})).unwrap(), json!({"salesOrderLines": []}));
        let e = t.apply(&json!({"lines": {"qty": 1}})).unwrap_err();
        assert_eq!(e.pointer, "/lines");
        let e = t.apply(&json!({"lines": [{"qty": "x"}]})).unwrap_err();
        assert_eq!(e.pointer, "/lines/0/qty");
    }

    #[test]
    fn convert_in_place_and_root_pointers() {
        let t = table("ops:\n  - convert: {at: /when, with: date_to_odata}\n  - convert: {at: /absent, with: to_string}\n");
        assert_eq!(
            t.apply(&json!({"when": "2019-01-09"})).unwrap(),
            json!({"when": "/Date(1546992000000)/"})
        );
        let wrap = table("mode: build\nops:\n  - copy: {from: '', to: /d}\n");
        assert_eq!(wrap.apply(&json!({"a": 1})).unwrap(), json!({"d": {"a": 1}}));
        let unwrap = table("mode: build\nops:\n  - copy: {from: /d/results, to: ''}\n");
        assert_eq!(unwrap.apply(&json!({"d": {"results": [1]}})).unwrap(), json!([1]));
    }

    #[test]
    fn each_numbers_elements_and_append_builds_arrays_from_templates() {
        let t = table(concat!(
            "mode: build\nops:\n  - each:\n      from: /lines\n      to: /items\n      mode: build\n",
            "      index: {to: /No, start: 10, step: 10, as_string: true}\n      ops:\n",
            "        - append: {from: /price, to: /pricing, value: {Type: PR00}, at: /Rate, convert: number_to_string}\n",
            "        - append: {from: /discount, to: /pricing, value: {Type: K007}, at: /Rate, convert: number_to_string}\n",
        ));
        let out = t
            .apply(&json!({"lines": [{"price": 9.5, "discount": 5}, {"discount": null}, {"price": 0.1}]}))
            .unwrap();
        assert_eq!(
            out,
            json!({"items": [
                {"No": "10", "pricing": [{"Type": "PR00", "Rate": "9.5"}, {"Type": "K007", "Rate": "5"}]},
                {"No": "20"},
                {"No": "30", "pricing": [{"Type": "PR00", "Rate": "0.1"}]}
            ]})
        );
        let numbers =
            table("mode: build\nops:\n  - each: {from: /l, to: /l, mode: build, index: {to: /n}, ops: []}\n");
        assert_eq!(numbers.apply(&json!({"l": [{}, {}]})).unwrap(), json!({"l": [{"n": 1}, {"n": 2}]}));
    }

    #[test]
    fn apply_maps_a_sub_document() {
        let t = table("mode: build\nops:\n  - apply:\n      from: /d\n      to: ''\n      mode: build\n      ops:\n        - copy: {from: /A, to: /a}\n");
        assert_eq!(t.apply(&json!({"d": {"A": 1, "B": 2}})).unwrap(), json!({"a": 1}));
        assert_eq!(t.apply(&json!({"x": 1})).unwrap(), json!({}));
    }

    #[test]
    fn lookup_finds_an_element_by_its_members() {
        let t = table(
            "mode: build\nops:\n  - lookup: {from: /p, match: {type: PR00}, take: /rate, to: /price, convert: string_to_number}\n  - lookup: {from: /p, match: {type: K999}, take: /rate, to: /none}\n",
        );
        let input = json!({"p": [{"type": "K007", "rate": "5"}, {"type": "PR00", "rate": "9.50"}]});
        assert_eq!(t.apply(&input).unwrap(), json!({"price": 9.5}));
    }

    #[test]
    fn translate_replaces_known_codes() {
        let t = table("ops:\n  - translate: {at: /s, values: {A: Open, C: Completed}}\n  - translate: {at: /t, values: {A: Open}, otherwise: Unknown}\n");
        assert_eq!(t.apply(&json!({"s": "C", "t": "Z"})).unwrap(), json!({"s": "Completed", "t": "Unknown"}));
        assert_eq!(t.apply(&json!({"s": "Q"})).unwrap(), json!({"s": "Q"}));
    }

    #[test]
    fn each_can_include_another_mapping_and_cycles_are_refused() {
        let line: TableSpec =
            serde_saphyr::from_str("mode: build\nops:\n  - copy: {from: /a, to: /b}\n").unwrap();
        let outer: TableSpec = serde_saphyr::from_str(
            "mode: build\nops:\n  - each: {from: /value, to: /items, map: line.yaml}\n",
        )
        .unwrap();
        let t = Table::compile_with(&outer, &|f| {
            if f == "line.yaml" {
                Ok(line.clone())
            } else {
                Err("no".into())
            }
        })
        .unwrap();
        assert_eq!(t.apply(&json!({"value": [{"a": 1}]})).unwrap(), json!({"items": [{"b": 1}]}));
        let cyclic = outer.clone();
        let e = Table::compile_with(&outer, &|_| Ok(cyclic.clone())).unwrap_err();
        assert!(e.contains("cycle"), "{e}");
    }

    #[test]
    fn compile_errors_name_the_operation() {
        let bad =
            |yaml: &str| Table::compile(&serde_saphyr::from_str::<TableSpec>(yaml).unwrap()).unwrap_err();
        assert!(bad("ops:\n  - copy: {from: a, to: /b}\n").starts_with("ops[0]:"));
        assert!(bad("ops:\n  - set: {at: /a, value: 1}\n  - convert: {at: /a, with: nope}\n")
            .starts_with("ops[1]:"));
        assert!(bad("ops:\n  - each: {from: /l, ops: [{drop: x}]}\n").starts_with("ops[0].each.ops[0]:"));
        assert!(bad("ops:\n  - move: {from: '', to: /x}\n").contains("use copy"));
    }
}
