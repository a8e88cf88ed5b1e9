//! Change detection on Business Central: webhook subscriptions to the company's sales orders and
//! sales invoices (created, renewed past half their life), what a notification's `resource`
//! names, and what an order shows afterwards. Business Central deletes a sales order once it is
//! fully invoiced, so a missing order is looked for among the invoices before it counts as
//! cancelled. Every call takes the change-detection class of the ERP's budget.

use super::{rejected, BusinessCentral};
use crate::process::adapter::{AdapterError, ChangedResource, Progress};
use serde_json::{json, Value};
use std::time::Duration;

/// The entity sets change detection subscribes to.
const SUBSCRIBED: &[&str] = &["salesOrders", "salesInvoices"];
/// Longest id a notification may name (Business Central ids are GUIDs).
const MAX_ID: usize = 64;

/// `api/v2.0/companies(<company>)/salesOrders(<id>)` (leading slash optional) and the like.
pub(super) fn changed_resource(company: &str, resource: &str) -> Option<ChangedResource> {
    let rest = resource.strip_prefix('/').unwrap_or(resource).strip_prefix("api/v2.0/companies(")?;
    let (named, rest) = rest.split_once(")/")?;
    if !named.trim_matches('\'').eq_ignore_ascii_case(company) {
        return None;
    }
    let (set, id) = match rest.split_once('(') {
        None => (rest, None),
        Some((set, keyed)) => {
            let id = keyed.strip_suffix(')')?.trim_matches('\'');
            let valid = !id.is_empty()
                && id.len() <= MAX_ID
                && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
            (set, Some(valid.then_some(id)?))
        }
    };
    match (set, id) {
        ("salesOrders", Some(id)) => Some(ChangedResource::Order(id.to_ascii_lowercase())),
        ("salesInvoices", Some(id)) => Some(ChangedResource::Invoice(id.to_ascii_lowercase())),
        (set, None) if SUBSCRIBED.contains(&set) => Some(ChangedResource::Collection),
        _ => None,
    }
}

fn quoted(value: &str) -> String {
    value.replace('\'', "''")
}

fn text(v: &Value, key: &str) -> Value {
    v.get(key).cloned().unwrap_or(Value::Null)
}

/// The milestones an invoice shows: shipped (an invoiced order was shipped with it or before),
/// invoiced, and paid once nothing remains.
fn invoice_progress(invoice: &Value) -> Progress {
    let invoiced = json!({
        "invoiceId": text(invoice, "id"),
        "invoiceNumber": text(invoice, "number"),
        "invoiceDate": text(invoice, "invoiceDate"),
        "dueDate": text(invoice, "dueDate"),
        "currencyCode": text(invoice, "currencyCode"),
        "totalAmountIncludingTax": text(invoice, "totalAmountIncludingTax"),
        "erpModifiedAt": text(invoice, "lastModifiedDateTime"),
    });
    let paid = (invoice["status"] == "Paid").then(|| {
        json!({
            "invoiceId": text(invoice, "id"),
            "invoiceNumber": text(invoice, "number"),
            "amount": text(invoice, "totalAmountIncludingTax"),
            "currencyCode": text(invoice, "currencyCode"),
            "erpModifiedAt": text(invoice, "lastModifiedDateTime"),
        })
    });
    Progress { shipped: Some(json!({})), invoiced: Some(invoiced), paid, cancelled: None }
}

impl BusinessCentral {
    async fn change_get(&self, path_and_query: &str) -> Result<Option<Value>, AdapterError> {
        let (status, body) =
            self.send(reqwest::Method::GET, path_and_query, None, &self.change_class, None).await?;
        match status {
            404 => Ok(None),
            s if s >= 400 => Err(rejected(s, &body)),
            _ => serde_json::from_slice(&body).map(Some).map_err(|e| AdapterError::Protocol(e.to_string())),
        }
    }

    pub(super) async fn order_progress(&self, id: &str, number: &str) -> Result<Progress, AdapterError> {
        let path = format!("{}/salesOrders({})", self.company_path, id);
        if let Some(order) = self.change_get(&path).await? {
            let shipped = (order["fullyShipped"] == true)
                .then(|| json!({"shipmentDate": text(&order, "shipmentDate"), "erpModifiedAt": text(&order, "lastModifiedDateTime")}));
            return Ok(Progress { shipped, ..Progress::default() });
        }
        // Gone: invoiced (Business Central deletes a fully invoiced order) or cancelled.
        let filter = format!("orderNumber eq '{}'", quoted(number));
        let query = serde_urlencoded::to_string([("$filter", filter.as_str())]).unwrap_or_default();
        let invoices = self.change_get(&format!("{}/salesInvoices?{query}", self.company_path)).await?;
        match invoices.as_ref().and_then(|l| l["value"].as_array()).and_then(|v| v.first()) {
            Some(invoice) => Ok(invoice_progress(invoice)),
            None => Ok(Progress {
                cancelled: Some(
                    json!({"reason": "The order was deleted in the ERP before it was invoiced."}),
                ),
                ..Progress::default()
            }),
        }
    }

    pub(super) async fn progress_of_invoice(
        &self,
        invoice_id: &str,
    ) -> Result<Option<(String, Progress)>, AdapterError> {
        let path = format!("{}/salesInvoices({})", self.company_path, invoice_id);
        let Some(invoice) = self.change_get(&path).await? else { return Ok(None) };
        let number = invoice["orderNumber"].as_str().unwrap_or_default().to_string();
        Ok((!number.is_empty()).then(|| (number, invoice_progress(&invoice))))
    }

    /// Create the missing subscriptions, renew those past half their life or with another
    /// `clientState`; the next look is due at a quarter of the shortest life left.
    pub(super) async fn ensure_subscriptions(
        &self,
        url: &str,
        client_state: &str,
    ) -> Result<Duration, AdapterError> {
        const PATH: &str = "/api/v2.0/subscriptions";
        let listed = self.change_get(PATH).await?.unwrap_or(Value::Null);
        let existing = listed["value"].as_array().cloned().unwrap_or_default();
        let now = crate::clock::now_ms();
        let mut next = Duration::from_secs(3600);
        for set in SUBSCRIBED {
            let resource = format!("{}/{set}", self.company_path);
            let same = |s: &&Value| {
                s["notificationUrl"] == url
                    && s["resource"].as_str().is_some_and(|r| {
                        r.trim_start_matches('/').eq_ignore_ascii_case(resource.trim_start_matches('/'))
                    })
            };
            let body = serde_json::to_vec(
                &json!({"notificationUrl": url, "resource": resource, "clientState": client_state}),
            )
            .map_err(|e| AdapterError::Protocol(e.to_string()))?;
            let answer = match existing.iter().find(same) {
                Some(s) => {
                    let expires = millis(&s["expirationDateTime"]);
                    let modified = millis(&s["lastModifiedDateTime"]);
                    let life = (expires - modified).max(1000);
                    if expires - now > life / 2 && s["clientState"] == client_state {
                        next = next.min(Duration::from_millis(((expires - now) / 4).max(1000) as u64));
                        continue;
                    }
                    let id = s["subscriptionId"].as_str().unwrap_or_default();
                    let tag = s["@odata.etag"].as_str().unwrap_or("*");
                    let path = format!("{PATH}('{}')", quoted(id));
                    self.send(reqwest::Method::PATCH, &path, Some(body), &self.change_class, Some(tag))
                        .await?
                }
                None => self.send(reqwest::Method::POST, PATH, Some(body), &self.change_class, None).await?,
            };
            let (status, answer) = answer;
            if status >= 400 {
                return Err(rejected(status, &answer));
            }
            let s: Value =
                serde_json::from_slice(&answer).map_err(|e| AdapterError::Protocol(e.to_string()))?;
            let left = millis(&s["expirationDateTime"]) - now;
            tracing::info!(resource = %resource, expires = %s["expirationDateTime"], "ERP change subscription in place");
            next = next.min(Duration::from_millis((left / 4).max(1000) as u64));
        }
        Ok(next)
    }
}

/// An RFC 3339 date-time as ms since the epoch (0 when unreadable: treated as expired).
fn millis(v: &Value) -> i64 {
    v.as_str().and_then(|s| crate::clock::parse_rfc3339(s).ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPANY: &str = "3f1d8a52-4c1e-4d2a-9b8e-5a3c2b1d0e01";

    #[test]
    fn notification_resources_are_read_strictly() {
        let order =
            format!("api/v2.0/companies({COMPANY})/salesOrders(00000050-0000-4000-8000-0000000003E9)");
        assert_eq!(
            changed_resource(COMPANY, &order),
            Some(ChangedResource::Order("00000050-0000-4000-8000-0000000003e9".into()))
        );
        assert_eq!(changed_resource(COMPANY, &format!("/{order}")), changed_resource(COMPANY, &order));
        assert_eq!(
            changed_resource(COMPANY, &format!("api/v2.0/companies({COMPANY})/salesInvoices")),
            Some(ChangedResource::Collection)
        );
        for unknown in [
            "api/v2.0/companies(00000000-0000-0000-0000-000000000000)/salesOrders(1)".to_string(),
            format!("api/v2.0/companies({COMPANY})/vendors(1)"),
            format!("api/v2.0/companies({COMPANY})/customers"),
            format!("api/v2.0/companies({COMPANY})/salesOrders(1)/salesOrderLines"),
            format!("api/v2.0/companies({COMPANY})/salesOrders(../../x)"),
            format!("api/v2.0/companies({COMPANY})/salesOrders(Ünïcødé)"),
            format!("api/v2.0/companies({COMPANY})/salesOrders({})", "a".repeat(65)),
            format!("api/v2.0/companies({COMPANY})/salesOrders()"),
            "https://evil.example/api".to_string(),
            String::new(),
        ] {
            assert_eq!(changed_resource(COMPANY, &unknown), None, "{unknown}");
        }
    }

    #[test]
    fn a_paid_invoice_shows_every_milestone_before_it() {
        let p = invoice_progress(
            &json!({"id": "i", "number": "PS-1", "status": "Paid", "totalAmountIncludingTax": 10.5}),
        );
        assert!(p.shipped.is_some() && p.invoiced.is_some() && p.cancelled.is_none());
        assert_eq!(p.paid.unwrap()["amount"], 10.5);
        let open = invoice_progress(&json!({"id": "i", "number": "PS-1", "status": "Open"}));
        assert!(open.invoiced.is_some() && open.paid.is_none());
    }
}
