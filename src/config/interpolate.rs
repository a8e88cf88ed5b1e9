//! `${NAME}` / `${NAME:-fallback}` expanded in every scalar value of a configuration file while
//! it is deserialized: a serde `Deserializer` wrapper around the YAML one. Keys are never
//! expanded; numbers and booleans may come from the environment too (`threads: ${THREADS:-2}`).
//! Expanding values, not the file's text, keeps a value with `#`, `: ` or a newline one value.

use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// What an unset variable without a fallback becomes (`None`: an error).
pub type UnsetValue = Box<dyn Fn(&str) -> Option<String>>;

/// The variables a file may reference, resolved before it is parsed (`None`: unset).
pub struct Vars {
    pub values: HashMap<String, Option<String>>,
    /// What an unset variable without a fallback becomes (offline: a placeholder); `None`
    /// makes the reference an error.
    pub unset: UnsetValue,
    /// The first unset variable an expansion failed on (its message names it; the caller
    /// finds its line).
    pub failed: RefCell<Option<String>>,
}

impl Vars {
    fn expand(&self, value: &str) -> Result<String, String> {
        super::env::expand_with(value, &|name| self.values.get(name).cloned().flatten(), &*self.unset)
            .inspect_err(|_| {
                let unset = super::env::referenced_names(value)
                    .into_iter()
                    .find(|n| !matches!(self.values.get(n), Some(Some(_))));
                if let Some(name) = unset {
                    self.failed.borrow_mut().get_or_insert(name);
                }
            })
    }
}

thread_local! {
    static VARS: RefCell<Option<Rc<Vars>>> = const { RefCell::new(None) };
}

/// Parse `text` as `T` with `vars` expanded in its values.
pub fn from_str<T: de::DeserializeOwned>(
    text: &str,
    vars: Rc<Vars>,
    options: serde_saphyr::Options,
) -> Result<T, serde_saphyr::Error> {
    VARS.with(|v| *v.borrow_mut() = Some(vars));
    let parsed = serde_saphyr::from_str_with_options::<Interpolated<T>>(text, options);
    VARS.with(|v| *v.borrow_mut() = None);
    parsed.map(|i| i.0)
}

struct Interpolated<T>(T);

impl<'de, T: de::Deserialize<'de>> de::Deserialize<'de> for Interpolated<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match VARS.with(|v| v.borrow().clone()) {
            Some(vars) => T::deserialize(Expand { inner: d, vars: &vars }).map(Interpolated),
            None => T::deserialize(d).map(Interpolated),
        }
    }
}

struct Expand<'v, D> {
    inner: D,
    vars: &'v Vars,
}

struct ExpandVisitor<'v, V> {
    inner: V,
    vars: &'v Vars,
}

struct ExpandSeed<'v, S> {
    inner: S,
    vars: &'v Vars,
}

fn needs_expansion(s: &str) -> bool {
    s.contains("${")
}

macro_rules! forward_wrapped {
    ($($method:ident),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.$method(ExpandVisitor { inner: visitor, vars: self.vars })
        }
    )*};
}

macro_rules! scalar_from_any {
    ($($method:ident => $kind:expr),*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            // A number or boolean written as `${NAME}` is a string to the YAML parser: read
            // whatever the scalar is, and parse an expanded string as the wanted kind.
            self.inner.deserialize_any(ScalarVisitor { inner: visitor, vars: self.vars, kind: $kind })
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Expand<'_, D> {
    type Error = D::Error;

    forward_wrapped!(
        deserialize_any,
        deserialize_char,
        deserialize_str,
        deserialize_string,
        deserialize_bytes,
        deserialize_byte_buf,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier
    );

    scalar_from_any!(
        deserialize_bool => Kind::Bool,
        deserialize_i8 => Kind::Int,
        deserialize_i16 => Kind::Int,
        deserialize_i32 => Kind::Int,
        deserialize_i64 => Kind::Int,
        deserialize_i128 => Kind::Int,
        deserialize_u8 => Kind::Int,
        deserialize_u16 => Kind::Int,
        deserialize_u32 => Kind::Int,
        deserialize_u64 => Kind::Int,
        deserialize_u128 => Kind::Int,
        deserialize_f32 => Kind::Float,
        deserialize_f64 => Kind::Float
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_unit_struct(name, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_newtype_struct(name, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_tuple(len, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_tuple_struct(name, len, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_struct(name, fields, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_enum(name, variants, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_ignored_any(v)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! visit_forward {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for ExpandVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(f)
    }

    visit_forward!(
        visit_bool: bool, visit_i8: i8, visit_i16: i16, visit_i32: i32, visit_i64: i64,
        visit_i128: i128, visit_u8: u8, visit_u16: u16, visit_u32: u32, visit_u64: u64,
        visit_u128: u128, visit_f32: f32, visit_f64: f64, visit_char: char,
        visit_bytes: &[u8], visit_byte_buf: Vec<u8>
    );

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        if needs_expansion(v) {
            return self.inner.visit_string(self.vars.expand(v).map_err(E::custom)?);
        }
        self.inner.visit_str(v)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
        if needs_expansion(v) {
            return self.inner.visit_string(self.vars.expand(v).map_err(E::custom)?);
        }
        self.inner.visit_borrowed_str(v)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        if needs_expansion(&v) {
            return self.inner.visit_string(self.vars.expand(&v).map_err(E::custom)?);
        }
        self.inner.visit_string(v)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Expand { inner: d, vars: self.vars })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Expand { inner: d, vars: self.vars })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(ExpandSeq { inner: seq, vars: self.vars })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(ExpandMap { inner: map, vars: self.vars })
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(ExpandEnum { inner: data, vars: self.vars })
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for ExpandSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Expand { inner: d, vars: self.vars })
    }
}

struct ExpandSeq<'v, A> {
    inner: A,
    vars: &'v Vars,
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for ExpandSeq<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(ExpandSeed { inner: seed, vars: self.vars })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct ExpandMap<'v, A> {
    inner: A,
    vars: &'v Vars,
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for ExpandMap<'_, A> {
    type Error = A::Error;

    /// Keys are names the files are checked against: never expanded.
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(ExpandSeed { inner: seed, vars: self.vars })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct ExpandEnum<'v, A> {
    inner: A,
    vars: &'v Vars,
}

impl<'de, 'v, A: de::EnumAccess<'de>> de::EnumAccess<'de> for ExpandEnum<'v, A> {
    type Error = A::Error;
    type Variant = ExpandVariant<'v, A::Variant>;

    /// A variant written as a value (`backend: ${STORE:-sqlite}`) may come from the environment.
    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.inner.variant_seed(ExpandSeed { inner: seed, vars: self.vars })?;
        Ok((value, ExpandVariant { inner: variant, vars: self.vars }))
    }
}

struct ExpandVariant<'v, A> {
    inner: A,
    vars: &'v Vars,
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for ExpandVariant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.newtype_variant_seed(ExpandSeed { inner: seed, vars: self.vars })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
        self.inner.tuple_variant(len, ExpandVisitor { inner: v, vars: self.vars })
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, A::Error> {
        self.inner.struct_variant(fields, ExpandVisitor { inner: v, vars: self.vars })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Bool,
    Int,
    Float,
}

/// Reads a scalar of any YAML type for a number or boolean: typed scalars pass through, a
/// string is expanded and parsed as `kind`.
struct ScalarVisitor<'v, V> {
    inner: V,
    vars: &'v Vars,
    kind: Kind,
}

impl<'de, V: Visitor<'de>> ScalarVisitor<'_, V> {
    fn parse<E: de::Error>(self, raw: &str) -> Result<V::Value, E> {
        let text =
            if needs_expansion(raw) { self.vars.expand(raw).map_err(E::custom)? } else { raw.to_string() };
        let text = text.trim();
        let unexpected = || E::invalid_value(de::Unexpected::Str(text), &self.inner);
        match self.kind {
            Kind::Bool => match text {
                "true" => self.inner.visit_bool(true),
                "false" => self.inner.visit_bool(false),
                _ => Err(unexpected()),
            },
            Kind::Int => {
                if let Ok(n) = text.parse::<u64>() {
                    self.inner.visit_u64(n)
                } else if let Ok(n) = text.parse::<i64>() {
                    self.inner.visit_i64(n)
                } else {
                    Err(unexpected())
                }
            }
            Kind::Float => match text {
                // YAML's spellings; the setting's own check says what it accepts.
                ".nan" | ".NaN" | ".NAN" => self.inner.visit_f64(f64::NAN),
                ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => self.inner.visit_f64(f64::INFINITY),
                "-.inf" | "-.Inf" | "-.INF" => self.inner.visit_f64(f64::NEG_INFINITY),
                _ => match text.parse::<f64>() {
                    Ok(n) => self.inner.visit_f64(n),
                    Err(_) => Err(unexpected()),
                },
            },
        }
    }
}

impl<'de, V: Visitor<'de>> Visitor<'de> for ScalarVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(f)
    }

    visit_forward!(
        visit_bool: bool, visit_i8: i8, visit_i16: i16, visit_i32: i32, visit_i64: i64,
        visit_i128: i128, visit_u8: u8, visit_u16: u16, visit_u32: u32, visit_u64: u64,
        visit_u128: u128, visit_f32: f32, visit_f64: f64, visit_char: char
    );

    fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
        self.parse(v)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
        self.parse(&v)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Expand { inner: d, vars: self.vars })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Expand { inner: d, vars: self.vars })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(ExpandSeq { inner: seq, vars: self.vars })
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(ExpandMap { inner: map, vars: self.vars })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_saphyr::Spanned;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        addr: Spanned<String>,
        quoted: String,
        threads: u32,
        ratio: f64,
        on: bool,
        list: Vec<String>,
        maybe: Option<String>,
        mode: Mode,
        nested: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        literal: Option<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Sqlite,
        Postgres,
    }

    fn vars(pairs: &[(&str, Option<&str>)]) -> Rc<Vars> {
        Rc::new(Vars {
            values: pairs.iter().map(|(k, v)| (k.to_string(), v.map(String::from))).collect(),
            unset: Box::new(|_| None),
            failed: RefCell::new(None),
        })
    }

    const DOC: &str = "addr: ${ADDR:-127.0.0.1:8080}\nquoted: \"a # ${SECRET} b\"\nthreads: ${THREADS:-2}\nratio: ${RATIO}\non: ${ON}\nlist: [x, '${SECRET}']\nmaybe: ${SECRET}\nmode: ${MODE:-sqlite}\nnested: { '${KEY}': \"${SECRET}\" }\nliteral: cost $${HERE}\n";

    #[test]
    fn every_value_is_expanded_and_keys_are_not() {
        let v = vars(&[
            ("ADDR", Some("0.0.0.0:9000")),
            ("SECRET", Some("s3cr#t: \"x\"\n")),
            ("THREADS", None),
            ("RATIO", Some("0.25")),
            ("ON", Some("true")),
            ("MODE", Some("postgres")),
            ("KEY", Some("k")),
        ]);
        let doc: Doc = from_str(DOC, v, serde_saphyr::Options::default()).unwrap();
        assert_eq!(doc.addr.value, "0.0.0.0:9000");
        assert_eq!(doc.addr.referenced.line(), 1, "spans still point at the file");
        assert_eq!(doc.quoted, "a # s3cr#t: \"x\"\n b");
        assert_eq!(doc.threads, 2);
        assert_eq!(doc.ratio, 0.25);
        assert!(doc.on);
        assert_eq!(doc.list, vec!["x".to_string(), "s3cr#t: \"x\"\n".to_string()]);
        assert_eq!(doc.maybe.as_deref(), Some("s3cr#t: \"x\"\n"));
        assert_eq!(doc.mode, Mode::Postgres);
        assert_eq!(doc.nested.keys().next().unwrap(), "${KEY}");
        assert_eq!(doc.literal.as_deref(), Some("cost ${HERE}"));
    }

    #[test]
    fn an_unset_variable_fails_and_is_named() {
        let v = vars(&[("ADDR", None), ("SECRET", None), ("RATIO", Some("1")), ("ON", Some("false"))]);
        let err = from_str::<Doc>(DOC, v.clone(), serde_saphyr::Options::default()).unwrap_err();
        assert!(err.to_string().contains("SECRET is not set"), "{err}");
        assert_eq!(v.failed.borrow().as_deref(), Some("SECRET"));
    }

    #[test]
    fn a_number_from_the_environment_must_be_a_number() {
        let v =
            vars(&[("THREADS", Some("two")), ("SECRET", Some("s")), ("RATIO", Some("1")), ("ON", Some("x"))]);
        let err = from_str::<Doc>(DOC, v, serde_saphyr::Options::default()).unwrap_err();
        assert!(err.to_string().contains("two"), "{err}");
    }
}
