//! `events:` of causeway.yaml: who hears what happens to orders (webhook subscribers), how
//! deliveries are signed (Standard Webhooks secrets from the environment) and retried.

use super::Diagnostics;
use base64::Engine;
use serde::{Deserialize, Serialize};
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

/// The Salesforce REST API version when a subscriber names none.
const DEFAULT_SALESFORCE_API: &str = "v62.0";

/// The CloudEvents `source` when `events.source` is not set.
const DEFAULT_SOURCE: &str = "/causeway/process/v1/orders";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSpec {
    /// The CloudEvents `source` attribute of every event.
    #[serde(default)]
    pub source: Option<String>,
    pub subscribers: BTreeMap<String, Spanned<SubscriberSpec>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberSpec {
    /// A webhook: where events are POSTed (http:// or https://).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// A webhook: names of environment variables holding `whsec_…` secrets: one, or two while
    /// rotating (each message is then signed with both).
    #[serde(default)]
    pub secret_env: Option<Spanned<Vec<String>>>,
    /// Instead of a webhook: write each order's status back to its Salesforce Opportunity.
    #[serde(default)]
    pub salesforce: Option<Spanned<SalesforceSpec>>,
    /// Instead of a webhook: publish to a NATS JetStream stream.
    #[serde(default)]
    pub nats: Option<Spanned<NatsSpec>>,
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

/// `salesforce:` of a subscriber: the org, the connected app's client-credentials flow, the
/// Opportunity fields written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSpec {
    /// The org's My Domain URL, e.g. `https://acme.my.salesforce.com`.
    pub instance_url: Spanned<String>,
    pub client_id_env: Spanned<String>,
    pub client_secret_env: Spanned<String>,
    /// The REST API version (default v62.0).
    #[serde(default)]
    pub api_version: Option<Spanned<String>>,
    #[serde(default)]
    pub fields: OpportunityFields,
}

/// `nats:` of a subscriber: the server, the stream (one per environment) and the subjects.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSpec {
    /// `nats://host:port` (or `tls://`).
    pub url: Spanned<String>,
    /// The JetStream stream, created if missing, e.g. `CAUSEWAY_PRODUCTION`.
    pub stream: Spanned<String>,
    /// Events go to `<subject_prefix>.<type>`, e.g. `causeway.production.order.accepted.v1`.
    pub subject_prefix: Spanned<String>,
    /// The environment variable holding a NATS token, when the server wants one.
    #[serde(default)]
    pub token_env: Option<Spanned<String>>,
}

/// The Opportunity fields the write-back sets (custom fields the org defines).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpportunityFields {
    pub erp_order_number: String,
    pub status: String,
    pub last_error: String,
}

impl Default for OpportunityFields {
    fn default() -> Self {
        OpportunityFields {
            erp_order_number: "ERP_Order_Number__c".into(),
            status: "ERP_Status__c".into(),
            last_error: "ERP_Last_Error__c".into(),
        }
    }
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
    pub sink: Sink,
    /// Empty: every type.
    pub types: Vec<String>,
    pub timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub dead_letter_after: Duration,
}

/// Where a subscriber's events go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// POSTed as CloudEvents, signed per Standard Webhooks.
    Webhook { url: String, secrets: Vec<Secret> },
    /// Written back to the order's Salesforce Opportunity.
    Salesforce(SalesforceSettings),
    /// Published to a NATS JetStream stream.
    Nats(NatsSettings),
}

#[derive(Clone)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct SalesforceSettings {
    pub instance_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub api_version: String,
    pub fields: OpportunityFields,
}

impl std::fmt::Debug for SalesforceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceSettings")
            .field("instance_url", &self.instance_url)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
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
        let sink = match (&s.url, &s.secret_env, &s.salesforce, &s.nats) {
            (Some(url), Some(secret_env), None, None) => {
                webhook_sink(file, name, url, secret_env, env, diags)
            }
            (None, None, Some(sf), None) => salesforce_sink(file, name, sf, env, diags),
            (None, None, None, Some(nats)) => nats_sink(file, name, nats, env, diags),
            _ => {
                diags.at(
                    file,
                    sub,
                    format!("events.subscribers.{name}: give either `url` and `secret_env` (a webhook), a `salesforce:` block or a `nats:` block"),
                );
                None
            }
        };
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
        let Some(sink) = sink else { continue };
        subscribers.push(SubscriberSettings {
            name: name.clone(),
            sink,
            types,
            timeout: Duration::from_millis(s.timeout_ms),
            backoff_initial: Duration::from_millis(s.backoff_initial_ms),
            backoff_max: Duration::from_millis(s.backoff_max_ms),
            dead_letter_after: Duration::from_secs(s.dead_letter_after_seconds),
        });
    }
    (diags.0.len() == before).then_some(EventsSettings { source, subscribers })
}

fn webhook_sink(
    file: &Path,
    name: &str,
    url: &Spanned<String>,
    secret_env: &Spanned<Vec<String>>,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<Sink> {
    let trimmed = url.value.trim();
    let parsed = reqwest::Url::parse(trimmed);
    if !parsed.as_ref().is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
        diags.at(
            file,
            url,
            format!("events.subscribers.{name}.url: `{trimmed}` is not an http:// or https:// URL"),
        );
    }
    let mut secrets = Vec::new();
    if !(1..=2).contains(&secret_env.value.len()) {
        diags.at(
            file,
            secret_env,
            format!("events.subscribers.{name}.secret_env: name one environment variable, or two while rotating secrets"),
        );
    }
    for var in &secret_env.value {
        match env(var).map(|v| Secret::parse(&v)) {
            None => diags.at(
                file,
                secret_env,
                format!("events.subscribers.{name}.secret_env: `{var}` is not set; set it to a secret like whsec_<base64 of 32 random bytes>"),
            ),
            Some(Err(e)) => diags.at(file, secret_env, format!("events.subscribers.{name}.secret_env: `{var}`: {e}")),
            Some(Ok(secret)) => secrets.push(secret),
        }
    }
    Some(Sink::Webhook { url: trimmed.to_string(), secrets })
}

/// A Salesforce custom field's API name: letters, digits and underscores, ending in `__c`
/// unless it is a standard field.
fn valid_field(name: &str) -> bool {
    (1..=80).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn salesforce_sink(
    file: &Path,
    name: &str,
    sf: &Spanned<SalesforceSpec>,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<Sink> {
    let spec = &sf.value;
    let url = spec.instance_url.value.trim().trim_end_matches('/');
    if !reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some()) {
        diags.at(
            file,
            &spec.instance_url,
            format!("events.subscribers.{name}.salesforce.instance_url: `{url}` is not the org's https:// My Domain URL"),
        );
    }
    let version = spec.api_version.as_ref().map_or(DEFAULT_SALESFORCE_API, |v| v.value.as_str()).to_string();
    let numeric = version.strip_prefix('v').and_then(|v| v.split_once('.')).is_some_and(|(major, minor)| {
        !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()) && minor == "0"
    });
    if let (false, Some(v)) = (numeric, &spec.api_version) {
        diags.at(
            file,
            v,
            format!("events.subscribers.{name}.salesforce.api_version: `{version}` is not a REST API version like v62.0"),
        );
    }
    let f = &spec.fields;
    for field in [&f.erp_order_number, &f.status, &f.last_error] {
        if !valid_field(field) {
            diags.at(
                file,
                sf,
                format!("events.subscribers.{name}.salesforce.fields: `{field}` is not a Salesforce field API name"),
            );
        }
    }
    let mut secret = |var: &Spanned<String>, what: &str| match env(&var.value).filter(|v| !v.is_empty()) {
        Some(v) => Some(v),
        None => {
            diags.at(
                file,
                var,
                format!("events.subscribers.{name}.salesforce.{what}: `{}` is not set; export the connected app's {}", var.value, what.trim_end_matches("_env").replace('_', " ")),
            );
            None
        }
    };
    let client_id = secret(&spec.client_id_env, "client_id_env");
    let client_secret = secret(&spec.client_secret_env, "client_secret_env");
    Some(Sink::Salesforce(SalesforceSettings {
        instance_url: url.to_string(),
        client_id: client_id?,
        client_secret: client_secret?,
        api_version: version,
        fields: f.clone(),
    }))
}

fn nats_sink(
    file: &Path,
    name: &str,
    nats: &Spanned<NatsSpec>,
    env: &dyn Fn(&str) -> Option<String>,
    diags: &mut Diagnostics,
) -> Option<Sink> {
    let spec = &nats.value;
    let url = spec.url.value.trim();
    if !reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "nats" | "tls") && u.host().is_some()) {
        diags.at(file, &spec.url, format!("events.subscribers.{name}.nats.url: `{url}` is not a nats://host:port or tls://host:port URL"));
    }
    let stream = &spec.stream.value;
    let stream_ok = (1..=64).contains(&stream.len())
        && stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !stream_ok {
        diags.at(
            file,
            &spec.stream,
            format!("events.subscribers.{name}.nats.stream: `{stream}` is not a stream name (1 to 64 of A-Z, a-z, 0-9, `_`, `-`)"),
        );
    }
    let prefix = &spec.subject_prefix.value;
    let prefix_ok = (1..=128).contains(&prefix.len())
        && prefix
            .split('.')
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    if !prefix_ok {
        diags.at(
            file,
            &spec.subject_prefix,
            format!("events.subscribers.{name}.nats.subject_prefix: `{prefix}` is not a subject of plain tokens separated by dots (no wildcards, no spaces)"),
        );
    }
    let token = match &spec.token_env {
        None => None,
        Some(var) => match env(&var.value).filter(|t| !t.is_empty()) {
            Some(t) => Some(t),
            None => {
                diags.at(
                    file,
                    var,
                    format!("events.subscribers.{name}.nats.token_env: `{}` is not set", var.value),
                );
                return None;
            }
        },
    };
    Some(Sink::Nats(NatsSettings {
        url: url.to_string(),
        stream: stream.clone(),
        subject_prefix: prefix.clone(),
        token,
    }))
}
