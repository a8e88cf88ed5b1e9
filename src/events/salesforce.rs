//! The Salesforce write-back subscriber: each event of an order updates its Opportunity (the
//! order's `opportunityId`) over the REST API, `PATCH /services/data/<version>/sobjects/
//! Opportunity/<id>`, with the ERP order number, a status (`Accepted`, `Rejected`,
//! `Needs attention`, `Shipped`, `Invoiced`, `Paid`, `Cancelled`) and the last error with its
//! remedy. The token comes from the connected app's OAuth 2.0 client-credentials flow
//! (`POST /services/oauth2/token`), is kept until Salesforce refuses it, then fetched again
//! once. The outbox delivers one order's events in order, so the Opportunity ends with the
//! latest status.

use super::dispatch::{excerpt, Failure};
use super::StoredEvent;
use crate::config::events::SalesforceSettings;
use serde_json::{json, Map, Value};

/// Salesforce text fields hold 255 characters unless the org made them longer.
const TEXT_FIELD: usize = 255;

pub struct Writer {
    client: reqwest::Client,
    settings: SalesforceSettings,
    token: tokio::sync::Mutex<Option<String>>,
}

/// A Salesforce record id: 15 or 18 letters and digits (an Opportunity's begin with `006`).
fn is_record_id(id: &str) -> bool {
    (id.len() == 15 || id.len() == 18) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn cut(text: &str) -> String {
    text.chars().take(TEXT_FIELD).collect()
}

/// What the event changes on the Opportunity: field API name → value.
pub fn opportunity_update(
    fields: &crate::config::events::OpportunityFields,
    kind: &str,
    data: &Value,
) -> Value {
    let mut update = Map::new();
    if let Some(number) = data["erpOrderNumber"].as_str() {
        update.insert(fields.erp_order_number.clone(), json!(cut(number)));
    }
    let (status, error) = match kind {
        "order.accepted.v1" => ("Accepted", Some(String::new())),
        "order.rejected.v1" => ("Rejected", Some(refusal(data))),
        "order.dead_lettered.v1" => ("Needs attention", Some(refusal(data))),
        "order.shipped.v1" => ("Shipped", None),
        "invoice.issued.v1" => ("Invoiced", None),
        "payment.received.v1" => ("Paid", None),
        "order.cancelled.v1" => ("Cancelled", Some(data["reason"].as_str().unwrap_or_default().to_string())),
        _ => ("Updated", None),
    };
    update.insert(fields.status.clone(), json!(status));
    if let Some(error) = error {
        // An empty text clears the field (Salesforce stores null).
        let value = if error.is_empty() { Value::Null } else { json!(cut(&error)) };
        update.insert(fields.last_error.clone(), value);
    }
    Value::Object(update)
}

/// The violations with their remedies, or the reason.
fn refusal(data: &Value) -> String {
    let violations: Vec<String> = data["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            format!(
                "{}: {} Fix: {}",
                v["code"].as_str().unwrap_or_default(),
                v["message"].as_str().unwrap_or_default(),
                v["remedy"].as_str().unwrap_or_default()
            )
        })
        .collect();
    if violations.is_empty() {
        data["reason"].as_str().unwrap_or_default().to_string()
    } else {
        violations.join(" | ")
    }
}

impl Writer {
    pub fn new(client: reqwest::Client, settings: SalesforceSettings) -> Writer {
        Writer { client, settings, token: tokio::sync::Mutex::new(None) }
    }

    /// A token from the client-credentials flow.
    async fn fetch_token(&self) -> Result<String, Failure> {
        let url = format!("{}/services/oauth2/token", self.settings.instance_url);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", self.settings.client_secret.as_str()),
        ];
        let body = serde_urlencoded::to_string(form).map_err(|e| Failure::retry(e.to_string()))?;
        let answer = self
            .client
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::retry(format!("cannot reach Salesforce's token endpoint: {e}")))?;
        if !answer.status().is_success() {
            let status = answer.status().as_u16();
            return Err(Failure::retry(format!(
                "Salesforce refused the client credentials ({status}): {}; check the connected app's client id and secret",
                excerpt(answer).await
            )));
        }
        let token: Value =
            answer.json().await.map_err(|e| Failure::retry(format!("token answer unreadable: {e}")))?;
        token["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Failure::retry("Salesforce's token answer has no access_token".into()))
    }

    async fn token(&self, stale: Option<&str>) -> Result<String, Failure> {
        let mut held = self.token.lock().await;
        match held.as_deref() {
            Some(t) if Some(t) != stale => Ok(t.to_string()),
            _ => {
                let fresh = self.fetch_token().await?;
                *held = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// Update the event's Opportunity; `None` once Salesforce took it.
    pub async fn write(&self, event: &StoredEvent) -> Option<Failure> {
        let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        let opportunity = data["opportunityId"].as_str().unwrap_or_default();
        if !is_record_id(opportunity) {
            return Some(Failure {
                message: format!("`{}` is not a Salesforce record id (15 or 18 letters and digits); the order did not come from a Salesforce Opportunity", cut(opportunity)),
                permanent: true,
            });
        }
        let update = opportunity_update(&self.settings.fields, &event.kind, &data);
        let url = format!(
            "{}/services/data/{}/sobjects/Opportunity/{opportunity}",
            self.settings.instance_url, self.settings.api_version
        );
        let mut stale = None;
        for _ in 0..2 {
            let token = match self.token(stale.as_deref()).await {
                Ok(t) => t,
                Err(f) => return Some(f),
            };
            let sent = self.client.patch(&url).bearer_auth(&token).json(&update).send().await;
            let answer = match sent {
                Ok(a) => a,
                Err(e) => return Some(Failure::retry(format!("cannot reach Salesforce: {e}"))),
            };
            match answer.status().as_u16() {
                200..=299 => return None,
                // The session expired or was revoked: a new token, once.
                401 if stale.is_none() => stale = Some(token),
                status => {
                    let body = excerpt(answer).await;
                    // A missing record or field will not appear by retrying; a lock or limit may pass.
                    let permanent = status == 404 || (status == 400 && body.contains("INVALID_FIELD"));
                    return Some(Failure {
                        message: format!("Salesforce answered {status}: {body}"),
                        permanent,
                    });
                }
            }
        }
        Some(Failure::retry("Salesforce refused a fresh token too".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::events::OpportunityFields;

    #[test]
    fn each_event_sets_the_status_and_a_rejection_its_remedies() {
        let f = OpportunityFields::default();
        let accepted = opportunity_update(&f, "order.accepted.v1", &json!({"erpOrderNumber": "S-1"}));
        assert_eq!(
            accepted,
            json!({"ERP_Order_Number__c": "S-1", "ERP_Status__c": "Accepted", "ERP_Last_Error__c": null})
        );
        let paid = opportunity_update(&f, "payment.received.v1", &json!({"erpOrderNumber": "S-1"}));
        assert_eq!(paid, json!({"ERP_Order_Number__c": "S-1", "ERP_Status__c": "Paid"}));
        let violations = json!([{"code": "pricing.price_mismatch", "message": "19.99 is not 18.39 \u{202e}🦀", "remedy": "quote 18.39"}]);
        let rejected = opportunity_update(&f, "order.rejected.v1", &json!({"violations": violations}));
        assert_eq!(rejected["ERP_Status__c"], "Rejected");
        let error = rejected["ERP_Last_Error__c"].as_str().unwrap();
        assert!(error.contains("pricing.price_mismatch") && error.contains("Fix: quote 18.39"), "{error}");
        let long = opportunity_update(&f, "order.dead_lettered.v1", &json!({"reason": "x".repeat(10_000)}));
        assert_eq!(long["ERP_Last_Error__c"].as_str().unwrap().chars().count(), TEXT_FIELD);
    }

    #[test]
    fn only_salesforce_record_ids_are_written() {
        assert!(is_record_id("006Hs00000LIFE01AA") && is_record_id("006Hs00000LIFE0"));
        for bad in ["", "006", "006Hs00000LIFE01A", "006Hs00000LIFE/1AA", "006Hs00000LIFE01ÄA", "../../x"] {
            assert!(!is_record_id(bad), "{bad}");
        }
    }
}
