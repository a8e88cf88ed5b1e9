//! Change detection on Tryton, which has no push: sales changed since a cursor (their
//! `write_date`, ascending), and what a sale shows afterwards: its shipment state, its invoices
//! (posted, paid) and whether it was cancelled. Every call takes the change-detection class of
//! the ERP's budget.

use super::{decimal, text, Tryton};
use crate::process::adapter::{AdapterError, Progress};
use serde_json::{json, Value};

/// Sales read per poll; the cursor moves past them and the next poll reads on.
const PAGE: i64 = 500;

/// Tryton's `{"__class__": "datetime", "year": …}` (UTC) as RFC 3339.
fn datetime(v: &Value) -> Value {
    let n = |k: &str| v[k].as_i64().unwrap_or(0);
    if v["__class__"] != "datetime" {
        return Value::Null;
    }
    json!(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        n("year"),
        n("month"),
        n("day"),
        n("hour"),
        n("minute"),
        n("second"),
        n("microsecond") / 1000
    ))
}

fn date(v: &Value) -> Value {
    let n = |k: &str| v[k].as_i64().unwrap_or(0);
    if v["__class__"] != "date" {
        return Value::Null;
    }
    json!(format!("{:04}-{:02}-{:02}", n("year"), n("month"), n("day")))
}

impl Tryton {
    pub(super) async fn sale_progress(&self, id: &str) -> Result<Progress, AdapterError> {
        let id: i64 =
            id.parse().map_err(|_| AdapterError::Protocol(format!("`{id}` is not a Tryton sale id")))?;
        let fields = json!(["state", "shipment_state", "invoice_state", "invoices", "write_date"]);
        let sales = self.call("model.sale.sale.read", vec![json!([id]), fields], &self.change_class).await?;
        let Some(sale) = sales.as_array().and_then(|s| s.first()) else {
            return Err(AdapterError::Protocol(format!("Tryton has no sale {id}")));
        };
        let modified = datetime(&sale["write_date"]);
        if sale["state"] == "cancelled" {
            return Ok(Progress {
                cancelled: Some(
                    json!({"reason": "The sale was cancelled in the ERP.", "erpModifiedAt": modified}),
                ),
                ..Progress::default()
            });
        }
        let shipped = (sale["shipment_state"] == "sent").then(|| json!({"erpModifiedAt": modified}));
        let ids = sale["invoices"].clone();
        let invoices = if ids.as_array().is_some_and(|i| !i.is_empty()) {
            let fields =
                json!(["number", "state", "total_amount", "invoice_date", "write_date", "currency.code"]);
            self.call("model.account.invoice.read", vec![ids, fields], &self.change_class).await?
        } else {
            json!([])
        };
        let posted = invoices
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["state"] == "posted" || i["state"] == "paid");
        let invoiced = posted.map(|i| {
            json!({
                "invoiceId": i["id"].to_string(),
                "invoiceNumber": text(&i["number"]),
                "invoiceDate": date(&i["invoice_date"]),
                "currencyCode": i["currency."]["code"],
                "totalAmountIncludingTax": decimal(&i["total_amount"]),
                "erpModifiedAt": datetime(&i["write_date"]),
            })
        });
        let paid = posted.filter(|i| i["state"] == "paid" || sale["invoice_state"] == "paid").map(|i| {
            json!({
                "invoiceId": i["id"].to_string(),
                "invoiceNumber": text(&i["number"]),
                "amount": decimal(&i["total_amount"]),
                "currencyCode": i["currency."]["code"],
                "erpModifiedAt": datetime(&i["write_date"]),
            })
        });
        Ok(Progress { shipped, invoiced, paid, cancelled: None })
    }

    /// Sales written at or after `cursor` (a Tryton datetime as JSON), oldest first, and the
    /// cursor after them; without one, no sales and the latest write to start from.
    pub(super) async fn sales_changed_since(
        &self,
        cursor: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>), AdapterError> {
        let from: Option<Value> = cursor.and_then(|c| serde_json::from_str(c).ok());
        let (domain, order, limit) = match &from {
            Some(at) => {
                (json!([["write_date", ">=", at]]), json!([["write_date", "ASC"], ["id", "ASC"]]), PAGE)
            }
            None => (json!([]), json!([["write_date", "DESC"], ["id", "DESC"]]), 1),
        };
        let fields = json!(["write_date"]);
        let sales = self
            .call(
                "model.sale.sale.search_read",
                vec![domain, json!(0), json!(limit), order, fields],
                &self.change_class,
            )
            .await?;
        let sales = sales.as_array().cloned().unwrap_or_default();
        let last = sales.last().map(|s| s["write_date"].to_string()).or_else(|| cursor.map(str::to_string));
        if from.is_none() {
            return Ok((Vec::new(), last));
        }
        Ok((sales.iter().filter_map(|s| s["id"].as_i64()).map(|id| id.to_string()).collect(), last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tryton_dates_become_rfc3339_and_anything_else_null() {
        let at = json!({"__class__": "datetime", "year": 2026, "month": 11, "day": 30, "hour": 19, "minute": 2, "second": 5, "microsecond": 657468});
        assert_eq!(datetime(&at), "2026-11-30T19:02:05.657Z");
        assert_eq!(date(&json!({"__class__": "date", "year": 2026, "month": 1, "day": 9})), "2026-01-09");
        assert_eq!(datetime(&json!("2026-11-30")), Value::Null);
        assert_eq!(date(&json!(null)), Value::Null);
    }
}
