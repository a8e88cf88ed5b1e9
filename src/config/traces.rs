//! `traces:` of causeway.yaml: where OTLP traces go (`crate::observe::traces`). Off without it.

use super::Diagnostics;
use crate::observe::traces::TraceSettings;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracesSpec {
    /// The collector's OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: Spanned<String>,
    #[serde(default)]
    pub service_name: Option<Spanned<String>>,
    /// Share of the traces this gateway starts that are exported (0 to 1; default 1).
    #[serde(default)]
    pub sample_ratio: Option<Spanned<f64>>,
    /// How often queued spans are sent (100 to 60,000 ms; default 5,000).
    #[serde(default)]
    pub flush_interval_ms: Option<Spanned<u64>>,
    /// Spans waiting to be sent, beyond which they are dropped (64 to 100,000; default 2,048).
    #[serde(default)]
    pub max_queue: Option<Spanned<u64>>,
    /// How long one export may take (100 to 60,000 ms; default 10,000).
    #[serde(default)]
    pub export_timeout_ms: Option<Spanned<u64>>,
    /// Request headers for the collector, each value from an environment variable (an API key).
    #[serde(default)]
    pub headers_env: Option<Spanned<BTreeMap<String, String>>>,
}

/// `value` of `field` when within `range`, else a diagnostic at its line; `default` when absent.
fn within(
    file: &Path,
    field: &str,
    value: &Option<Spanned<u64>>,
    range: std::ops::RangeInclusive<u64>,
    default: u64,
    diags: &mut Diagnostics,
) -> u64 {
    match value {
        Some(v) if !range.contains(&v.value) => {
            diags.at(
                file,
                v,
                format!("traces.{field}: {} is not between {} and {}", v.value, range.start(), range.end()),
            );
            default
        }
        Some(v) => v.value,
        None => default,
    }
}

pub fn compile_traces(
    file: &Path,
    spec: &TracesSpec,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<TraceSettings> {
    let before = diags.0.len();
    let written = spec.endpoint.value.trim();
    // The exporter parses the normalised form (an `http::Uri`); credentials belong in
    // `headers_env`, never in a URL that is logged.
    let parsed = reqwest::Url::parse(written).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https")
            && u.host().is_some()
            && u.username().is_empty()
            && u.password().is_none()
            && u.query().is_none()
            && u.fragment().is_none()
            && u.as_str().parse::<http::Uri>().is_ok()
    });
    let endpoint = match parsed {
        Some(u) => u.to_string(),
        None => {
            diags.at(
                file,
                &spec.endpoint,
                format!("traces.endpoint: `{written}` is not an http:// or https:// URL without credentials, query or fragment, such as http://127.0.0.1:4318/v1/traces"),
            );
            String::new()
        }
    };
    let service_name = match &spec.service_name {
        Some(name) => {
            let n = name.value.trim();
            if !(1..=128).contains(&n.len()) || n.chars().any(char::is_control) {
                diags.at(file, name, "traces.service_name: 1 to 128 printable characters".to_string());
            }
            n.to_string()
        }
        None => "causeway".to_string(),
    };
    let sample_ratio = match &spec.sample_ratio {
        Some(r) if !(0.0..=1.0).contains(&r.value) => {
            diags.at(file, r, format!("traces.sample_ratio: {} is not between 0 and 1", r.value));
            1.0
        }
        Some(r) => r.value,
        None => 1.0,
    };
    let flush_ms = within(file, "flush_interval_ms", &spec.flush_interval_ms, 100..=60_000, 5_000, diags);
    let max_queue = within(file, "max_queue", &spec.max_queue, 64..=100_000, 2_048, diags);
    let timeout_ms = within(file, "export_timeout_ms", &spec.export_timeout_ms, 100..=60_000, 10_000, diags);
    let mut headers = Vec::new();
    if let Some(h) = &spec.headers_env {
        for (name, var) in &h.value {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                diags.at(file, h, format!("traces.headers_env: `{name}` is not a header name"));
                continue;
            }
            match env(var).filter(|v| http::HeaderValue::from_str(v).is_ok()) {
                Some(value) => headers.push((name.clone(), value)),
                None => diags.at(
                    file,
                    h,
                    format!("traces.headers_env.{name}: `{var}` is not set, or not a valid header value; set it or remove the header"),
                ),
            }
        }
    }
    (diags.0.len() == before).then(|| TraceSettings {
        endpoint,
        service_name,
        headers,
        flush_interval: Duration::from_millis(flush_ms),
        max_queue: max_queue as usize,
        sample_ratio,
        export_timeout: Duration::from_millis(timeout_ms),
    })
}
