//! `events:` of causeway.yaml: who hears what happens to orders (webhook subscribers), how
//! deliveries are signed (Standard Webhooks secrets from the environment) and retried.

use super::Diagnostics;
use base64::Engine;
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The event types the gateway emits; docs/events.md describes each one's `data`.
pub const EVENT_TYPES: &[&str] = &[
    "order.accepted.v1",
    "order.rejected.v1",
    "order.dead_lettered.v1",
    "order.shipped.v1",
    "invoice.issued.v1",
    "payment.received.v1",
    "order.cancelled.v1",
];

/// The CloudEvents `source` when `events.source` is not set.
const DEFAULT_SOURCE: &str = "/causeway/process/v1/orders";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSpec {
    /// The CloudEvents `source` attribute of every event.
    #[serde(default)]
    pub source: Option<String>,
    pub subscribers: BTreeMap<String, Spanned<SubscriberSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberSpec {
    /// Where events are POSTed (http:// or https://).
    pub url: Spanned<String>,
    /// Names of environment variables holding `whsec_…` secrets: one, or two while rotating
    /// (each message is then signed with both).
    pub secret_env: Spanned<Vec<String>>,
    /// Event types this subscriber receives; all when absent.
    #[serde(default)]
    pub types: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// How long an event is retried before it is dead-lettered (`GET /admin/events/dead-letters`).
    #[serde(default = "default_dead_letter_after_seconds")]
    pub dead_letter_after_seconds: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}
fn default_backoff_initial_ms() -> u64 {
    1_000
}
fn default_backoff_max_ms() -> u64 {
    300_000
}
fn default_dead_letter_after_seconds() -> u64 {
    86_400
}

/// A Standard Webhooks signing secret: `whsec_` and a key of 24 to 64 bytes in base64.
#[derive(Clone)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, String> {
        let encoded = text.trim().strip_prefix("whsec_").ok_or_else(|| {
            "a webhook secret starts with `whsec_` followed by the key in base64".to_string()
        })?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("the key after `whsec_` is not base64: {e}"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!("the key is {} bytes; Standard Webhooks keys are 24 to 64 bytes", key.len()));
        }
        Ok(Secret(key))
    }
}

/// `events:` compiled.
#[derive(Debug, Clone)]
pub struct EventsSettings {
    pub source: String,
    pub subscribers: Vec<SubscriberSettings>,
}

#[derive(Debug, Clone)]
pub struct SubscriberSettings {
    pub name: String,
    pub url: String,
    pub secrets: Vec<Secret>,
    /// Empty: every type.
    pub types: Vec<String>,
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub dead_letter_after: Duration,
}

impl SubscriberSettings {
    /// The types as the store filters them: `*` or a comma-separated list.
    pub fn type_filter(&self) -> String {
        if self.types.is_empty() {
            "*".to_string()
        } else {
            self.types.join(",")
        }
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

pub(super) fn compile_events(
    file: &Path,
    spec: &EventsSpec,
    has_process: bool,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<EventsSettings> {
    let before = diags.0.len();
    if !has_process {
        diags.file(file, "events: events are about orders; add a `process:` block or remove `events:`");
    }
    let source = spec.source.clone().unwrap_or_else(|| DEFAULT_SOURCE.to_string());
    if source.is_empty() || source.chars().any(char::is_control) {
        diags.file(file, "events.source must be a non-empty URI reference without control characters");
    }
    let mut subscribers = Vec::new();
    for (name, sub) in &spec.subscribers {
        let s = &sub.value;
        if !valid_name(name) {
            diags.at(
                file,
                sub,
                format!("events.subscribers: `{name}`: a name is 1 to 64 of a-z, 0-9, `-` and `_` (it labels metrics and stored deliveries)"),
            );
        }
        let url = s.url.value.trim();
        let parsed = reqwest::Url::parse(url);
        if !parsed.as_ref().is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
            diags.at(
                file,
                &s.url,
                format!("events.subscribers.{name}.url: `{url}` is not an http:// or https:// URL"),
            );
        }
        let mut secrets = Vec::new();
        if !(1..=2).contains(&s.secret_env.value.len()) {
            diags.at(
                file,
                &s.secret_env,
                format!("events.subscribers.{name}.secret_env: name one environment variable, or two while rotating secrets"),
            );
        }
        for var in &s.secret_env.value {
            match env(var).map(|v| Secret::parse(&v)) {
                None => diags.at(
                    file,
                    &s.secret_env,
                    format!("events.subscribers.{name}.secret_env: `{var}` is not set; set it to a secret like whsec_<base64 of 32 random bytes>"),
                ),
                Some(Err(e)) => {
                    diags.at(file, &s.secret_env, format!("events.subscribers.{name}.secret_env: `{var}`: {e}"))
                }
                Some(Ok(secret)) => secrets.push(secret),
            }
        }
        let types = s.types.as_ref().map_or_else(Vec::new, |t| t.value.clone());
        if let Some(t) = &s.types {
            if t.value.is_empty() {
                diags.at(
                    file,
                    t,
                    format!(
                        "events.subscribers.{name}.types: name at least one type, or leave it out for all"
                    ),
                );
            }
            for unknown in t.value.iter().filter(|ty| !EVENT_TYPES.contains(&ty.as_str())) {
                diags.at(
                    file,
                    t,
                    format!(
                        "events.subscribers.{name}.types: unknown type `{unknown}`; known: {}",
                        EVENT_TYPES.join(", ")
                    ),
                );
            }
        }
        if !(100..=120_000).contains(&s.timeout_ms)
            || s.backoff_initial_ms == 0
            || s.backoff_max_ms < s.backoff_initial_ms
            || s.dead_letter_after_seconds == 0
        {
            diags.at(
                file,
                sub,
                format!("events.subscribers.{name}: timeout_ms must be 100 to 120000, backoff_initial_ms at least 1 and at most backoff_max_ms, dead_letter_after_seconds at least 1"),
            );
        }
        subscribers.push(SubscriberSettings {
            name: name.clone(),
            url: url.to_string(),
            secrets,
            types,
            timeout: Duration::from_millis(s.timeout_ms),
            backoff_initial: Duration::from_millis(s.backoff_initial_ms),
            backoff_max: Duration::from_millis(s.backoff_max_ms),
            dead_letter_after: Duration::from_secs(s.dead_letter_after_seconds),
        });
    }
    (diags.0.len() == before).then_some(EventsSettings { source, subscribers })
}
