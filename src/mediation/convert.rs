//! Type conversions between the canonical API and ERP dialects: decimals carried as JSON
//! strings (SAP OData v2) and OData v2 `/Date(ms)/` timestamps. Every conversion is exact or
//! refuses: a gateway must never quietly change an amount or a date.

use crate::clock::{format_date, format_datetime, parse_rfc3339};
use serde_json::{Number, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Number → decimal string (`9.5` → `"9.5"`); a decimal string passes unchanged.
    NumberToString,
    /// Decimal string → number (`"2.000"` → `2`); a number passes unchanged.
    StringToNumber,
    /// RFC 3339 date or date-time → `/Date(ms)/`.
    DateToOdata,
    /// `/Date(ms)/` at midnight UTC → `YYYY-MM-DD`.
    OdataToDate,
    /// `/Date(ms)/` → RFC 3339 date-time in UTC.
    OdataToDatetime,
    /// Any scalar → string.
    ToString,
}

pub const NAMES: &str =
    "number_to_string, string_to_number, date_to_odata, odata_to_date, odata_to_datetime, to_string";

impl Conversion {
    pub fn parse(name: &str) -> Result<Conversion, String> {
        Ok(match name {
            "number_to_string" => Conversion::NumberToString,
            "string_to_number" => Conversion::StringToNumber,
            "date_to_odata" => Conversion::DateToOdata,
            "odata_to_date" => Conversion::OdataToDate,
            "odata_to_datetime" => Conversion::OdataToDatetime,
            "to_string" => Conversion::ToString,
            other => return Err(format!("unknown conversion `{other}` (one of: {NAMES})")),
        })
    }

    /// Null converts to null: "absent" is the mapping table's business, not the conversion's.
    pub fn apply(self, v: &Value) -> Result<Value, String> {
        if v.is_null() {
            return Ok(Value::Null);
        }
        match self {
            Conversion::NumberToString => match v {
                Value::Number(n) => Ok(Value::String(number_to_decimal(n))),
                Value::String(s) => decimal_to_number(s).map(|_| v.clone()),
                other => Err(format!("expected a number, found {}", kind(other))),
            },
            Conversion::StringToNumber => match v {
                Value::String(s) => decimal_to_number(s).map(Value::Number),
                Value::Number(_) => Ok(v.clone()),
                other => Err(format!("expected a decimal string, found {}", kind(other))),
            },
            Conversion::DateToOdata => {
                let s = v.as_str().ok_or_else(|| format!("expected a date string, found {}", kind(v)))?;
                let ms = parse_rfc3339(s)?;
                Ok(Value::String(format!("/Date({ms})/")))
            }
            Conversion::OdataToDate => {
                let ms = parse_odata_date(v)?;
                if ms.rem_euclid(86_400_000) != 0 {
                    return Err(format!(
                        "{} has a time of day; a date field cannot hold it (use odata_to_datetime)",
                        v
                    ));
                }
                Ok(Value::String(format_date(ms)))
            }
            Conversion::OdataToDatetime => Ok(Value::String(format_datetime(parse_odata_date(v)?))),
            Conversion::ToString => match v {
                Value::String(_) => Ok(v.clone()),
                Value::Number(n) => Ok(Value::String(number_to_decimal(n))),
                Value::Bool(b) => Ok(Value::String(b.to_string())),
                other => Err(format!("expected a scalar, found {}", kind(other))),
            },
        }
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Shortest exact decimal text, never in exponent form; negative zero is `"0"`.
pub fn number_to_decimal(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if f == 0.0 {
        return "0".into();
    }
    // Rust's float Display is the shortest text that reads back as the same f64, without exponent.
    format!("{f}")
}

/// A decimal string (`-12.50`, `3`) as a JSON number: an integer when integral, otherwise the
/// f64 whose shortest text has the same value. More digits than an f64 holds is an error.
pub fn decimal_to_number(s: &str) -> Result<Number, String> {
    let t = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    let valid = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(t.contains('.') && frac.is_empty());
    if !valid {
        return Err(format!("`{s}` is not a decimal number (digits, optional `-` and `.`)"));
    }
    let frac = frac.trim_end_matches('0');
    let negative = s.starts_with('-');
    if frac.is_empty() {
        let digits = int.trim_start_matches('0');
        if digits.is_empty() {
            return Ok(Number::from(0));
        }
        if let Ok(i) = format!("{}{digits}", if negative { "-" } else { "" }).parse::<i64>() {
            return Ok(Number::from(i));
        }
        if !negative {
            if let Ok(u) = digits.parse::<u64>() {
                return Ok(Number::from(u));
            }
        }
    }
    let f: f64 = s.parse().map_err(|_| format!("`{s}` is not a decimal number"))?;
    let exact = Number::from_f64(f).filter(|n| same_decimal(&number_to_decimal(n), s));
    exact.ok_or_else(|| format!("`{s}` has more digits than a JSON number holds exactly; keep it a string"))
}

/// Whether two decimal texts denote the same value (ignoring zero padding and sign of zero).
fn same_decimal(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> (bool, String, String) {
        let neg = s.starts_with('-');
        let t = s.trim_start_matches('-');
        let (i, f) = t.split_once('.').unwrap_or((t, ""));
        let i = i.trim_start_matches('0').to_string();
        let f = f.trim_end_matches('0').to_string();
        let zero = i.is_empty() && f.is_empty();
        (neg && !zero, i, f)
    }
    norm(a) == norm(b)
}

fn parse_odata_date(v: &Value) -> Result<i64, String> {
    let s = v.as_str().ok_or_else(|| format!("expected an OData date string, found {}", kind(v)))?;
    let inner = s
        .strip_prefix("/Date(")
        .and_then(|r| r.strip_suffix(")/"))
        .ok_or_else(|| format!("`{s}` is not an OData date (`/Date(<ms>)/`)"))?;
    // An optional `+hhmm`/`-hhmm` suffix is informational in OData v2 JSON: the ms are UTC.
    let digits_end = inner.char_indices().skip(1).find(|(_, c)| *c == '+' || *c == '-').map(|(i, _)| i);
    let (ms, offset) = digits_end.map_or((inner, ""), |i| inner.split_at(i));
    let offset_ok =
        offset.is_empty() || (offset.len() == 5 && offset.bytes().skip(1).all(|b| b.is_ascii_digit()));
    if !offset_ok {
        return Err(format!("`{s}`: the offset must be +hhmm or -hhmm"));
    }
    let ms: i64 = ms.parse().map_err(|_| format!("`{s}`: the milliseconds are not an integer"))?;
    // Years 0000..=9999 keep RFC 3339 text valid.
    if !(-62_167_219_200_000..=253_402_300_799_999).contains(&ms) {
        return Err(format!("`{s}` is outside the years 0000-9999"));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(c: Conversion, v: Value) -> Result<Value, String> {
        c.apply(&v)
    }

    #[test]
    fn decimals_to_strings_are_exact_and_never_exponential() {
        use Conversion::NumberToString as N;
        assert_eq!(conv(N, json!(9.5)).unwrap(), json!("9.5"));
        assert_eq!(conv(N, json!(0.1 + 0.2)).unwrap(), json!("0.30000000000000004"));
        assert_eq!(conv(N, json!(123456789012345i64)).unwrap(), json!("123456789012345"));
        assert_eq!(conv(N, json!(1234567890123.45)).unwrap(), json!("1234567890123.45"));
        assert_eq!(conv(N, json!(-0.0)).unwrap(), json!("0"), "negative zero is zero");
        assert_eq!(conv(N, json!(1e-7)).unwrap(), json!("0.0000001"));
        assert_eq!(conv(N, json!(u64::MAX)).unwrap(), json!(u64::MAX.to_string()));
        assert_eq!(conv(N, json!("2.50")).unwrap(), json!("2.50"), "already a decimal string");
        assert!(conv(N, json!("abc")).is_err());
        assert!(conv(N, json!(true)).is_err());
        assert_eq!(conv(N, Value::Null).unwrap(), Value::Null);
    }

    #[test]
    fn strings_to_numbers_are_exact_or_refused() {
        use Conversion::StringToNumber as S;
        assert_eq!(conv(S, json!("2.000")).unwrap(), json!(2));
        assert_eq!(conv(S, json!("-1.50")).unwrap(), json!(-1.5));
        assert_eq!(conv(S, json!("0.30000000000000004")).unwrap(), json!(0.1 + 0.2));
        assert_eq!(conv(S, json!("0.3")).unwrap(), json!(0.3));
        assert_eq!(conv(S, json!("123456789012345")).unwrap(), json!(123456789012345i64));
        assert_eq!(conv(S, json!("1234567890123.45")).unwrap(), json!(1234567890123.45));
        assert_eq!(conv(S, json!("-0")).unwrap(), json!(0));
        assert_eq!(conv(S, json!("-0.00")).unwrap(), json!(0));
        assert_eq!(conv(S, json!("18446744073709551615")).unwrap(), json!(u64::MAX));
        let too_precise = conv(S, json!("12345678901234567.89")).unwrap_err();
        assert!(too_precise.contains("keep it a string"), "{too_precise}");
        for bad in ["", "-", "1.", ".5", "1e5", "1,5", " 1", "NaN", "0x10", "--1"] {
            assert!(conv(S, json!(bad)).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(conv(S, json!(7)).unwrap(), json!(7));
    }

    #[test]
    fn odata_dates_round_trip_with_rfc3339() {
        assert_eq!(
            conv(Conversion::DateToOdata, json!("2019-01-09")).unwrap(),
            json!("/Date(1546992000000)/")
        );
        assert_eq!(
            conv(Conversion::OdataToDate, json!("/Date(1546992000000)/")).unwrap(),
            json!("2019-01-09")
        );
        assert_eq!(
            conv(Conversion::DateToOdata, json!("2026-11-27T10:30:00.250+01:00")).unwrap(),
            json!("/Date(1795771800250)/")
        );
        assert_eq!(
            conv(Conversion::OdataToDatetime, json!("/Date(1795771800250)/")).unwrap(),
            json!("2026-11-27T09:30:00.250Z")
        );
        assert_eq!(
            conv(Conversion::OdataToDatetime, json!("/Date(0+0100)/")).unwrap(),
            json!("1970-01-01T00:00:00Z")
        );
        assert_eq!(conv(Conversion::OdataToDate, json!("/Date(-86400000)/")).unwrap(), json!("1969-12-31"));
        assert_eq!(
            conv(Conversion::DateToOdata, json!("2024-02-29")).unwrap(),
            json!("/Date(1709164800000)/")
        );
        assert!(conv(Conversion::OdataToDate, json!("/Date(1546992000001)/")).is_err(), "time of day");
        let no_day = conv(Conversion::DateToOdata, json!("2023-02-29")).unwrap_err();
        assert!(no_day.contains("no such day"), "not a leap year: {no_day}");
        assert!(conv(Conversion::DateToOdata, json!("2026-13-01")).is_err());
        assert!(conv(Conversion::DateToOdata, json!("2026-11-27T25:00:00Z")).is_err());
        assert!(conv(Conversion::DateToOdata, json!("2026-11-27T10:00:00.1234Z")).is_err(), "sub-ms lost");
        assert!(conv(Conversion::DateToOdata, json!("27.11.2026")).is_err());
        assert!(conv(Conversion::OdataToDate, json!("/Date(abc)/")).is_err());
        assert!(conv(Conversion::OdataToDate, json!("/Date(99999999999999999)/")).is_err());
        assert!(conv(Conversion::OdataToDate, json!(5)).is_err());
    }

    #[test]
    fn non_ascii_and_odd_text_is_refused_never_a_panic() {
        for bad in [
            "2026-12-01T00:00:00éabcd",
            "2026-12-01T00:00:00é",
            "2026-12-01Té0:00:00Z",
            "2026-1é-01",
            "éééééééééé",
            "2026-12-01T00:00:00.ééZ",
            "2026-12-01T00:00:00+0é:00",
            "２０２６-12-01",
            "2026-12-01T00:00:00\u{0}Z",
            "",
            "+10000-01-01",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} must be refused");
            assert!(conv(Conversion::DateToOdata, json!(bad)).is_err());
        }
        assert!(conv(Conversion::OdataToDate, json!("/Date(1é)/")).is_err());
        assert!(conv(Conversion::OdataToDate, json!("/Date(1+é000)/")).is_err());
    }

    #[test]
    fn every_day_of_four_centuries_round_trips_through_text() {
        for days in (-146_097 * 2)..(146_097 * 2) {
            let ms = days * 86_400_000;
            if !(-62_167_219_200_000..=253_402_300_799_999).contains(&ms) {
                continue;
            }
            assert_eq!(parse_rfc3339(&format_date(ms)).unwrap(), ms);
        }
        assert_eq!(format_datetime(1_795_771_800_250), "2026-11-27T09:30:00.250Z");
    }

    #[test]
    fn to_string_takes_scalars() {
        assert_eq!(conv(Conversion::ToString, json!(true)).unwrap(), json!("true"));
        assert_eq!(conv(Conversion::ToString, json!(12)).unwrap(), json!("12"));
        assert_eq!(conv(Conversion::ToString, json!("ü")).unwrap(), json!("ü"));
        assert!(conv(Conversion::ToString, json!([1])).is_err());
    }
}
