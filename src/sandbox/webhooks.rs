//! Business Central's webhook subscriptions (`/api/v2.0/subscriptions`): create with the
//! validation-token handshake, renew with `PATCH` + `If-Match` (the handshake again), delete; a
//! subscription lives `subscription_lifetime_seconds` (three days) unless renewed. Changes to a
//! subscribed entity set are gathered for `notification_delay_ms` and POSTed as
//! `{"value":[{subscriptionId, clientState, expirationDateTime, resource, changeType,
//! lastModifiedDateTime}]}`; more than [`COLLECTION_THRESHOLD`] at once become one `collection`
//! notification, as Business Central sends. A failed POST is sent again a few times, then dropped.

// Handlers return a finished error response as `Err`; boxing it would only add noise here.
#![allow(clippy::result_large_err)]

use super::{bc_error, data, Sandbox};
use crate::clock::{format_datetime, now_ms};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Beyond this many changes of one subscription in one batch, one `collection` notification.
const COLLECTION_THRESHOLD: usize = 1000;
/// Attempts at one batch before it is dropped.
const SEND_ATTEMPTS: u32 = 4;
/// The subscriber has this long to echo the validation token (Business Central: 5 seconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Entity sets a subscription may name.
const SUBSCRIBABLE: &[&str] = &["customers", "items", "salesOrders", "salesInvoices"];

#[derive(Debug, Clone)]
pub(super) struct Subscription {
    id: String,
    notification_url: String,
    /// As given, e.g. `/api/v2.0/companies(<id>)/salesOrders`.
    resource: String,
    entity_set: String,
    client_state: String,
    expires_ms: i64,
    version: u64,
    created_ms: i64,
    modified_ms: i64,
}

impl Subscription {
    fn json(&self) -> Value {
        json!({
            "@odata.etag": etag(self.version),
            "subscriptionId": self.id,
            "notificationUrl": self.notification_url,
            "resource": self.resource,
            "userId": "00000000-0000-0000-0000-000000000001",
            "lastModifiedDateTime": format_datetime(self.modified_ms),
            "clientState": self.client_state,
            "expirationDateTime": format_datetime(self.expires_ms),
            "systemCreatedAt": format_datetime(self.created_ms),
            "systemCreatedBy": "00000000-0000-0000-0000-000000000001",
            "systemModifiedAt": format_datetime(self.modified_ms),
            "systemModifiedBy": "00000000-0000-0000-0000-000000000001"
        })
    }
}

/// A change waiting to be notified.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    subscription: String,
    entity_set: String,
    id: String,
    change_type: &'static str,
    at_ms: i64,
}

fn etag(version: u64) -> String {
    format!("W/\"JzIwOzE4{version}Oyc=\"")
}

/// `/api/v2.0/companies(<id>)/<set>` → `<set>` when the company is the sandbox's and the set
/// may be subscribed to.
fn entity_set_of(resource: &str) -> Option<&str> {
    let rest = resource.trim_start_matches('/').strip_prefix("api/v2.0/companies(")?;
    let (company, set) = rest.split_once(")/")?;
    let company = company.trim_matches('\'');
    (company == data::COMPANY_ID && SUBSCRIBABLE.contains(&set)).then_some(set)
}

impl Sandbox {
    /// Record that `id` in `entity_set` was `created`, `updated` or `deleted`, for every live
    /// subscription to that set.
    pub(super) fn changed(&self, entity_set: &str, id: &str, change_type: &'static str) {
        let now = now_ms();
        let subscriptions = self.inner.subscriptions.lock();
        let mut pending = self.inner.pending_notifications.lock();
        for s in subscriptions.values().filter(|s| s.entity_set == entity_set && s.expires_ms > now) {
            pending.push(Pending {
                subscription: s.id.clone(),
                entity_set: entity_set.to_string(),
                id: id.to_string(),
                change_type,
                at_ms: now,
            });
        }
        if !pending.is_empty() {
            self.inner.notify.notify_one();
        }
    }

    /// Send gathered notifications, forever (spawned with the first subscription).
    async fn notifier(self) {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        loop {
            self.inner.notify.notified().await;
            let delay = self.inner.limits.spec().notification_delay_ms;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let batch = std::mem::take(&mut *self.inner.pending_notifications.lock());
            let mut per_subscription: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
            for p in batch {
                per_subscription.entry(p.subscription.clone()).or_default().push(p);
            }
            for (id, changes) in per_subscription {
                let Some(s) = self.inner.subscriptions.lock().get(&id).cloned() else { continue };
                let body = notification_body(&s, &changes);
                let (sb, client) = (self.clone(), client.clone());
                tokio::spawn(async move { sb.send(&client, &s.notification_url, body).await });
            }
        }
    }

    async fn send(&self, client: &reqwest::Client, url: &str, body: Value) {
        for attempt in 0..SEND_ATTEMPTS {
            let sent = client.post(url).json(&body).send().await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    self.inner.counters.lock().notifications_sent += 1;
                    return;
                }
                Ok(r) => {
                    tracing::debug!(status = r.status().as_u16(), "sandbox notification refused");
                    // A refusal is final for Business Central too when the subscriber says why.
                    if r.status().is_client_error() {
                        break;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "sandbox notification not delivered"),
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        self.inner.counters.lock().notifications_failed += 1;
    }
}

fn notification_body(s: &Subscription, changes: &[Pending]) -> Value {
    let common = |resource: String, change_type: &str, at: i64| {
        json!({
            "subscriptionId": s.id,
            "clientState": s.client_state,
            "expirationDateTime": format_datetime(s.expires_ms),
            "resource": resource,
            "changeType": change_type,
            "lastModifiedDateTime": format_datetime(at),
        })
    };
    let company = format!("api/v2.0/companies({})", data::COMPANY_ID);
    if changes.len() > COLLECTION_THRESHOLD {
        let first = changes.iter().map(|c| c.at_ms).min().unwrap_or_else(now_ms);
        return json!({ "value": [common(format!("{company}/{}", s.entity_set), "collection", first)] });
    }
    let value: Vec<Value> = changes
        .iter()
        .map(|c| common(format!("{company}/{}({})", c.entity_set, c.id), c.change_type, c.at_ms))
        .collect();
    json!({ "value": value })
}

/// `/api/v2.0/subscriptions` and `/api/v2.0/subscriptions('<id>')`.
pub(super) async fn handle(
    sb: &Sandbox,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let rest = uri.path().trim_end_matches('/').strip_prefix("/api/v2.0/subscriptions").unwrap_or_default();
    let id = match rest {
        "" => None,
        keyed => match keyed.strip_prefix("('").and_then(|k| k.strip_suffix("')")) {
            Some(id) => Some(id.to_string()),
            None => {
                return bc_error(
                    StatusCode::NOT_FOUND,
                    "BadRequest_NotFound",
                    "The request URL is not valid.",
                )
            }
        },
    };
    match (method.as_str(), id) {
        ("GET", None) => {
            let all: Vec<Value> = sb.inner.subscriptions.lock().values().map(Subscription::json).collect();
            Json(json!({ "value": all })).into_response()
        }
        ("GET", Some(id)) => match sb.inner.subscriptions.lock().get(&id) {
            Some(s) => Json(s.json()).into_response(),
            None => not_found(),
        },
        ("POST", None) => create(sb, body).await,
        ("PATCH", Some(id)) => renew(sb, &id, headers, body).await,
        ("DELETE", Some(id)) => {
            let mut all = sb.inner.subscriptions.lock();
            let Some(s) = all.get(&id) else { return not_found() };
            if let Err(resp) = if_match(headers, s) {
                return resp;
            }
            all.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => bc_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "BadRequest_MethodNotAllowed",
            "The HTTP method is not allowed on this resource.",
        ),
    }
}

fn not_found() -> Response {
    bc_error(StatusCode::NOT_FOUND, "BadRequest_NotFound", "The subscription does not exist.")
}

fn bad_request(message: &str) -> Response {
    bc_error(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn if_match(headers: &HeaderMap, s: &Subscription) -> Result<(), Response> {
    super::odata::check_if_match(headers, &json!({ "@odata.etag": etag(s.version) }))
}

struct Fields {
    notification_url: Option<String>,
    resource: Option<String>,
    client_state: Option<String>,
}

fn fields(body: &[u8]) -> Result<Fields, Response> {
    let v: Value = serde_json::from_slice(body).map_err(|e| bad_request(&format!("Invalid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad_request("The request body must be a JSON object."))?;
    const WRITABLE: &[&str] = &["notificationUrl", "resource", "clientState"];
    if let Some(unknown) = obj.keys().find(|k| !WRITABLE.contains(&k.as_str())) {
        return Err(bad_request(&format!(
            "The property '{unknown}' does not exist on type 'Microsoft.NAV.subscriptions'."
        )));
    }
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    let f = Fields {
        notification_url: text("notificationUrl"),
        resource: text("resource"),
        client_state: text("clientState"),
    };
    if f.client_state.as_ref().is_some_and(|c| c.chars().count() > 2048) {
        return Err(bad_request("The clientState may be at most 2048 characters."));
    }
    if let Some(resource) = &f.resource {
        if entity_set_of(resource).is_none() {
            return Err(bad_request(&format!("The resource '{resource}' cannot be subscribed to.")));
        }
    }
    Ok(f)
}

async fn create(sb: &Sandbox, body: &[u8]) -> Response {
    let f = match fields(body) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let (Some(url), Some(resource)) = (f.notification_url, f.resource) else {
        return bad_request("A subscription needs notificationUrl and resource.");
    };
    if let Err(resp) = handshake(sb, &url).await {
        return resp;
    }
    let now = now_ms();
    let lifetime = sb.inner.limits.spec().subscription_lifetime_seconds as i64 * 1000;
    let s = Subscription {
        id: format!("{:032x}", rand::random::<u128>()),
        entity_set: entity_set_of(&resource).unwrap_or_default().to_string(),
        notification_url: url,
        resource,
        client_state: f.client_state.unwrap_or_default(),
        expires_ms: now + lifetime,
        version: 1,
        created_ms: now,
        modified_ms: now,
    };
    let created = s.json();
    sb.inner.subscriptions.lock().insert(s.id.clone(), s);
    sb.start_notifier();
    (StatusCode::CREATED, Json(created)).into_response()
}

async fn renew(sb: &Sandbox, id: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let f = match fields(body) {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let url = {
        let all = sb.inner.subscriptions.lock();
        let Some(s) = all.get(id) else { return not_found() };
        if let Err(resp) = if_match(headers, s) {
            return resp;
        }
        f.notification_url.clone().unwrap_or_else(|| s.notification_url.clone())
    };
    if let Err(resp) = handshake(sb, &url).await {
        return resp;
    }
    let now = now_ms();
    let lifetime = sb.inner.limits.spec().subscription_lifetime_seconds as i64 * 1000;
    let mut all = sb.inner.subscriptions.lock();
    let Some(s) = all.get_mut(id) else { return not_found() };
    s.notification_url = url;
    if let Some(resource) = f.resource {
        s.entity_set = entity_set_of(&resource).unwrap_or_default().to_string();
        s.resource = resource;
    }
    if let Some(client_state) = f.client_state {
        s.client_state = client_state;
    }
    s.expires_ms = now + lifetime;
    s.modified_ms = now;
    s.version += 1;
    Json(s.json()).into_response()
}

/// POST `url?validationToken=<t>`; the subscriber must answer 200 with exactly `t`.
async fn handshake(sb: &Sandbox, url: &str) -> Result<(), Response> {
    let token = format!("{:032x}", rand::random::<u128>());
    let refused = |why: String| {
        bc_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("The subscription could not be validated: the notification URL {why}."),
        )
    };
    let Ok(mut target) = reqwest::Url::parse(url) else { return Err(refused("is not a valid URL".into())) };
    if !matches!(target.scheme(), "http" | "https") {
        return Err(refused("is not http(s)".into()));
    }
    target.query_pairs_mut().append_pair("validationToken", &token);
    let client = reqwest::Client::builder().timeout(HANDSHAKE_TIMEOUT).build().unwrap_or_default();
    sb.inner.counters.lock().handshakes += 1;
    match client.post(target).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::OK => match r.text().await {
            Ok(text) if text == token => Ok(()),
            _ => Err(refused("did not answer with the validation token".into())),
        },
        Ok(r) => Err(refused(format!("answered {}", r.status().as_u16()))),
        Err(e) => Err(refused(format!("could not be reached ({e})"))),
    }
}

impl Sandbox {
    fn start_notifier(&self) {
        if !self.inner.notifier_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tokio::spawn(self.clone().notifier());
        }
    }
}
