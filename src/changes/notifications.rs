//! The inbound end of Business Central's webhooks (`POST /process/v1/erp-notifications`):
//! the validation-token handshake, then notifications. Every notification of a request must
//! carry the subscription's `clientState` (compared in constant time) or the request is refused
//! whole. A notification only ever queues a read of an order the gateway created: it names what
//! changed, never the new values, and cannot create an order. One seen before (same
//! subscription, resource, change type and time, remembered in the store so every replica knows)
//! is a repeat. A request with nothing to act on is refused with a problem saying why.

use super::{ChangeMetrics, Changes, Check};
use crate::error::GatewayError;
use crate::policy::auth::constant_time_eq;
use crate::process::adapter::ChangedResource;
use crate::process::store::lifecycle::TrackedOrder;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};

/// Most notifications one request may carry (Business Central sends a `collection` instead of
/// more than 1,000).
const MAX_NOTIFICATIONS: usize = 1000;
/// Longest validation token echoed back.
const MAX_TOKEN: usize = 1024;
/// Refused resources named in a problem, each cut to [`SHOWN_CHARS`].
const SHOWN_REFUSALS: usize = 5;
const SHOWN_CHARS: usize = 120;

/// What the endpoint answers: a status, a content type and a body.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

#[derive(Deserialize)]
struct Batch {
    value: Vec<Notification>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    subscription_id: String,
    client_state: String,
    resource: String,
    change_type: String,
    #[serde(default)]
    last_modified_date_time: String,
}

fn shown(text: &str) -> String {
    let cut: String = text.chars().take(SHOWN_CHARS).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

fn count(outcome: &str, n: usize) {
    if n > 0 {
        ChangeMetrics::global().notifications.with_label_values(&[outcome]).inc_by(n as u64);
    }
}

impl Changes {
    /// Answer one call of the ERP: `query` is the request's query string, `body` its body.
    pub async fn receive(&self, query: Option<&str>, body: &[u8]) -> Result<Answer, GatewayError> {
        let Some(settings) = &self.settings.notifications else { return Err(GatewayError::ChangesDisabled) };
        if let Some(token) = validation_token(query)? {
            return Ok(Answer {
                status: 200,
                content_type: "text/plain; charset=utf-8",
                body: token.into_bytes(),
            });
        }
        let batch: Batch = serde_json::from_slice(body).map_err(|e| {
            count("malformed", 1);
            GatewayError::BadRequest {
                detail: format!(
                    "A notification request is {{\"value\": [{{subscriptionId, clientState, resource, changeType, lastModifiedDateTime}}]}}: {e}"
                ),
            }
        })?;
        if batch.value.is_empty() || batch.value.len() > MAX_NOTIFICATIONS {
            count("malformed", 1);
            return Err(GatewayError::BadRequest {
                detail: format!(
                    "A notification request carries 1 to {MAX_NOTIFICATIONS} notifications; this one has {}.",
                    batch.value.len()
                ),
            });
        }
        let secret = settings.client_state.as_bytes();
        if !batch.value.iter().all(|n| constant_time_eq(n.client_state.as_bytes(), secret)) {
            count("unauthenticated", batch.value.len());
            return Err(GatewayError::NotificationUnauthenticated);
        }
        self.judge(batch.value).await
    }

    /// Decide what each authenticated notification asks for, then queue it (or refuse).
    async fn judge(&self, notifications: Vec<Notification>) -> Result<Answer, GatewayError> {
        let lifecycle = self.lifecycle().await?;
        let adapter = self.service.adapter();
        let mut refused = Vec::new();
        let mut ignored = 0;
        let mut wanted: Vec<(Option<Check>, &Notification)> = Vec::new();
        // A storm names the same few orders many times: each is looked up once per request.
        let mut known: HashMap<String, Option<TrackedOrder>> = HashMap::new();
        for n in &notifications {
            let resource = adapter.changed_resource(&n.resource);
            let check = match (n.change_type.as_str(), resource) {
                ("collection", Some(ChangedResource::Collection)) => Some(Check::Sweep(String::new())),
                ("created" | "updated" | "deleted", Some(ChangedResource::Order(erp_id))) => {
                    let tracked = match known.get(&erp_id) {
                        Some(t) => t.clone(),
                        None => {
                            let t = lifecycle.tracked(Some(&erp_id), None).await?;
                            known.insert(erp_id.clone(), t.clone());
                            t
                        }
                    };
                    match tracked {
                        // A new order has nothing to read yet; a finished one will not change.
                        Some(o) if n.change_type == "created" || o.finished() => None,
                        Some(o) => Some(Check::Order {
                            id: o.id,
                            erp_id: o.erp_order_id,
                            erp_number: o.erp_order_number,
                        }),
                        None => {
                            ignored += 1;
                            refused.push(format!(
                                "`{}` is not an order this gateway created",
                                shown(&n.resource)
                            ));
                            continue;
                        }
                    }
                }
                ("created" | "updated" | "deleted", Some(ChangedResource::Invoice(id))) => {
                    Some(Check::Invoice(id))
                }
                (change, _) => {
                    refused.push(format!(
                        "`{}` ({}) is not a resource this gateway follows",
                        shown(&n.resource),
                        shown(change)
                    ));
                    continue;
                }
            };
            wanted.push((check, n));
        }
        let checks = wanted.iter().filter(|(c, _)| c.is_some()).count();
        if !self.has_room(checks) {
            count("backlog_full", notifications.len());
            return Err(GatewayError::ChangeBacklogFull);
        }
        // Repeats within the request count like repeats of earlier ones.
        let keys: Vec<String> = wanted.iter().map(|(_, n)| sighting_key(n)).collect();
        let mut in_request = HashSet::new();
        let first = lifecycle.first_sight(&keys).await?;
        let (mut accepted, mut repeated) = (0, 0);
        let mut checks = HashSet::new();
        for (((check, _), key), first) in wanted.into_iter().zip(&keys).zip(first) {
            if !first || !in_request.insert(key) {
                repeated += 1;
                continue;
            }
            accepted += 1;
            checks.extend(check);
        }
        for check in checks {
            self.enqueue(check);
        }
        count("accepted", accepted);
        count("repeated", repeated);
        count("ignored", ignored);
        count("unknown_resource", refused.len() - ignored);
        if accepted == 0 {
            return Err(if refused.is_empty() {
                GatewayError::NotificationReplayed
            } else {
                refused.truncate(SHOWN_REFUSALS);
                GatewayError::NotificationUnknownResource { refused }
            });
        }
        refused.truncate(SHOWN_REFUSALS);
        let body = json!({ "accepted": accepted, "repeated": repeated, "refused": refused });
        Ok(Answer { status: 202, content_type: "application/json", body: body.to_string().into_bytes() })
    }
}

/// The handshake's `validationToken`, when the query has one.
fn validation_token(query: Option<&str>) -> Result<Option<String>, GatewayError> {
    let Some(query) = query else { return Ok(None) };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| GatewayError::BadRequest { detail: format!("The query string cannot be read: {e}") })?;
    let Some((_, token)) = pairs.into_iter().find(|(k, _)| k == "validationToken") else { return Ok(None) };
    if token.is_empty() || token.len() > MAX_TOKEN || token.chars().any(char::is_control) {
        return Err(GatewayError::BadRequest {
            detail: format!("A validationToken is 1 to {MAX_TOKEN} bytes of printable text."),
        });
    }
    Ok(Some(token))
}

/// What makes a notification the same one again.
fn sighting_key(n: &Notification) -> String {
    let mut h = Sha256::new();
    for part in [&n.subscription_id, &n.resource, &n.change_type, &n.last_modified_date_time] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validation_token_is_echoed_only_when_it_is_sane() {
        assert_eq!(validation_token(None).unwrap(), None);
        assert_eq!(validation_token(Some("a=1")).unwrap(), None);
        assert_eq!(validation_token(Some("validationToken=abc%20d")).unwrap().as_deref(), Some("abc d"));
        assert_eq!(validation_token(Some("validationToken=%C3%BC")).unwrap().as_deref(), Some("ü"));
        for bad in ["validationToken=", "validationToken=a%0Ab", "validationToken=a%00"] {
            assert!(validation_token(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("validationToken={}", "a".repeat(MAX_TOKEN + 1));
        assert!(validation_token(Some(&long)).is_err());
    }

    #[test]
    fn a_sighting_is_the_notification_not_its_client_state() {
        let n = |state: &str, at: &str| Notification {
            subscription_id: "s".into(),
            client_state: state.into(),
            resource: "r".into(),
            change_type: "updated".into(),
            last_modified_date_time: at.into(),
        };
        assert_eq!(sighting_key(&n("a", "t1")), sighting_key(&n("b", "t1")));
        assert_ne!(sighting_key(&n("a", "t1")), sighting_key(&n("a", "t2")));
    }
}
