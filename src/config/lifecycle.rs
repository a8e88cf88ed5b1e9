//! A route's API lifecycle: the version it serves and its deprecation (RFC 9745 `Deprecation`,
//! RFC 8594 `Sunset`, `Link: rel="deprecation"`), compiled once into the header values every
//! answer of the route carries, and what happens after the sunset (a 410 problem by default).

use crate::clock;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `deprecation:` of a route, as the file says it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeprecationSpec {
    /// When the route was (or will be) deprecated: `2026-06-01` (midnight UTC) or RFC 3339.
    pub since: String,
    /// When the route stops being served; absent: no date is set yet.
    #[serde(default)]
    pub sunset: Option<String>,
    /// Where callers read about the change (an `https://` or `http://` URL).
    #[serde(default)]
    pub link: Option<String>,
    /// After the sunset: `refuse` (410, the default) or `serve` (the headers go on).
    #[serde(default)]
    pub after_sunset: AfterSunset,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSunset {
    #[default]
    Refuse,
    Serve,
}

/// A route's deprecation, compiled.
#[derive(Debug, Clone)]
pub struct Deprecation {
    /// Seconds since the epoch.
    pub since: i64,
    pub sunset: Option<i64>,
    pub link: Option<String>,
    pub after_sunset: AfterSunset,
    /// `Deprecation`, `Sunset` and `Link`, built once for every answer of the route.
    pub headers: Vec<(&'static str, HeaderValue)>,
}

impl Deprecation {
    /// The route answers 410 from now on.
    pub fn refuses_at(&self, now: i64) -> bool {
        self.after_sunset == AfterSunset::Refuse && self.sunset.is_some_and(|s| now >= s)
    }

    /// The sunset has passed (whether or not the route still serves).
    pub fn past_sunset(&self, now: i64) -> bool {
        self.sunset.is_some_and(|s| now >= s)
    }

    /// The route answers 410 now (checked per request of a deprecated route only).
    pub fn refuses_now(&self) -> bool {
        self.refuses_at(clock::now_ms() / 1000)
    }

    /// The sunset as an RFC 3339 date-time (for problems and warnings).
    pub fn sunset_text(&self) -> Option<String> {
        self.sunset.map(|s| clock::format_datetime(s.saturating_mul(1000)))
    }
}

/// The longest version label accepted (it is a metrics label).
const MAX_VERSION: usize = 32;

/// Check a route's `version`: a short label of letters, digits, `.`, `_`, `-`.
pub fn check_version(version: &str) -> Result<Arc<str>, String> {
    let ok = (1..=MAX_VERSION).contains(&version.len())
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(Arc::from(version))
    } else {
        Err(format!(
            "version must be 1 to {MAX_VERSION} letters, digits, `.`, `_` or `-` (it is a metrics label), not {version:?}"
        ))
    }
}

/// Compile `deprecation:`; the error says which field is wrong and how.
pub fn compile(spec: &DeprecationSpec) -> Result<Deprecation, String> {
    let since = parse_date("since", &spec.since)?;
    let sunset = spec.sunset.as_deref().map(|s| parse_date("sunset", s)).transpose()?;
    if let Some(sunset) = sunset {
        if sunset < since {
            return Err(format!(
                "sunset ({}) is before since ({}): a route is deprecated before it is retired",
                spec.sunset.as_deref().unwrap_or_default(),
                spec.since
            ));
        }
    }
    let link = spec.link.as_deref().map(check_link).transpose()?;
    let mut headers = vec![("deprecation", value(format!("@{since}"))?)];
    if let Some(sunset) = sunset {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(sunset).unwrap_or(0));
        headers.push(("sunset", value(httpdate::fmt_http_date(at))?));
    }
    if let Some(link) = &link {
        headers.push(("link", value(format!("<{link}>; rel=\"deprecation\"; type=\"text/html\""))?));
    }
    Ok(Deprecation { since: since.max(0), sunset, link, after_sunset: spec.after_sunset, headers })
}

fn value(text: String) -> Result<HeaderValue, String> {
    HeaderValue::try_from(text).map_err(|_| "the header value is not valid".to_string())
}

/// `2026-06-01` (midnight UTC) or an RFC 3339 date-time, from 1970 on, in whole seconds.
fn parse_date(field: &str, text: &str) -> Result<i64, String> {
    match clock::parse_rfc3339(text.trim()) {
        Ok(ms) if ms >= 0 => Ok(ms / 1000),
        _ => Err(format!(
            "{field} must be a date (`2026-06-01`, midnight UTC) or an RFC 3339 date-time (`2026-06-01T12:00:00Z`), not {text:?}"
        )),
    }
}

/// An absolute `http(s)` URL that fits inside `Link: <…>` unescaped.
fn check_link(link: &str) -> Result<String, String> {
    let bad = link.is_empty()
        || link.len() > 2048
        || link.chars().any(|c| c.is_whitespace() || c.is_control() || "<>\"\\".contains(c) || !c.is_ascii());
    let uri: Option<http::Uri> = if bad { None } else { link.parse().ok() };
    match uri {
        Some(u) if matches!(u.scheme_str(), Some("https" | "http")) && u.host().is_some() => Ok(link.to_string()),
        _ => Err(format!(
            "link must be an absolute http(s) URL without spaces, quotes or angle brackets (percent-encode them), not {link:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(since: &str, sunset: Option<&str>, link: Option<&str>) -> DeprecationSpec {
        DeprecationSpec {
            since: since.into(),
            sunset: sunset.map(str::to_string),
            link: link.map(str::to_string),
            after_sunset: AfterSunset::Refuse,
        }
    }

    #[test]
    fn headers_follow_the_rfcs() {
        let d =
            compile(&spec("2026-06-01", Some("2027-01-31T12:00:00Z"), Some("https://dev.example.com/v2")))
                .unwrap();
        let headers: Vec<(&str, &str)> = d.headers.iter().map(|(n, v)| (*n, v.to_str().unwrap())).collect();
        assert_eq!(
            headers,
            [
                ("deprecation", "@1780272000"),
                ("sunset", "Sun, 31 Jan 2027 12:00:00 GMT"),
                ("link", "<https://dev.example.com/v2>; rel=\"deprecation\"; type=\"text/html\""),
            ]
        );
        assert!(!d.refuses_at(1_801_396_799));
        assert!(d.refuses_at(1_801_396_800), "from the sunset second on");
        assert_eq!(d.sunset_text().as_deref(), Some("2027-01-31T12:00:00Z"));
        let served = DeprecationSpec {
            after_sunset: AfterSunset::Serve,
            ..spec("2026-06-01", Some("2027-01-31"), None)
        };
        let served = compile(&served).unwrap();
        assert!(served.past_sunset(1_801_396_800) && !served.refuses_at(1_801_396_800));
        assert_eq!(served.headers.len(), 2, "no link, no Link header");
    }

    #[test]
    fn hostile_and_wrong_values_are_refused_with_the_field_named() {
        for (s, field) in [
            (spec("yesterday", None, None), "since"),
            (spec("2026-13-01", None, None), "since"),
            (spec("1969-12-31", None, None), "since"),
            (spec("2026-06-01", Some("2026-05-01"), None), "before since"),
            (spec("2026-06-01", Some("２０２７-01-01"), None), "sunset"),
            (spec("2026-06-01", None, Some("/docs/v2")), "link"),
            (spec("2026-06-01", None, Some("ftp://x.example/v2")), "link"),
            (spec("2026-06-01", None, Some("https://x.example/a b")), "link"),
            (spec("2026-06-01", None, Some("https://x.example/>; rel=\"next\"")), "link"),
            (spec("2026-06-01", None, Some("https://x.example/\u{202e}")), "link"),
            (spec("2026-06-01", None, Some(&format!("https://x.example/{}", "a".repeat(3000)))), "link"),
        ] {
            let err = compile(&s).unwrap_err();
            assert!(err.contains(field), "{err}");
        }
        assert!(check_version("v2").is_ok());
        for bad in ["", "v 2", "v2\n", "ｖ2", &"v".repeat(33)] {
            assert!(check_version(bad).unwrap_err().contains("metrics label"), "{bad:?}");
        }
    }
}
